"""Following an agent run from outside its coordinator: its events, its result, and taking it over.

When the coordinator stops answering, the follower asks the run's backup node (which holds a copy of
its journal) to resume it, and goes on reading events there from where it was.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc

from edgeswarm.proto import tasks_pb2 as pb
from edgeswarm.proto import tasks_pb2_grpc as pb_grpc
from edgeswarm.protocol.constants import (
    MAX_ATTEMPTS,
    RUN_CONTROL_TIMEOUT,
    RUN_START_TIMEOUT,
)
from edgeswarm.swarm.errors import SwarmError

logger = logging.getLogger(__name__)

FINISHED = "run.finished"
RETRY_PAUSE = 1.0


class RunLostError(SwarmError):
    """The run's coordinator and every node that could take it over are gone."""


@dataclass
class RunLocation:
    """Where a run is coordinated, and where its journal copy is."""

    run_id: str
    coordinator: str
    coordinator_address: str
    backup: str = ""
    backup_address: str = ""

    @classmethod
    def from_reply(cls, reply: pb.RunReply) -> RunLocation:
        return cls(reply.run_id, reply.coordinator, reply.coordinator_address, reply.backup, reply.backup_address)


class RunFollower:
    """Streams a run's events (dicts with a "type") until it finishes, moving to its backup if its
    coordinator dies. `channel(address, node_id)` gives a gRPC channel to a node."""

    def __init__(self, location: RunLocation, channel: Callable[[str, str], grpc.Channel], max_takeovers: int = MAX_ATTEMPTS):
        self.location = location
        self._channel = channel
        self.max_takeovers = max_takeovers
        self.last_seq = -1
        self.takeovers = 0

    def stub(self, address: str | None = None, node_id: str | None = None) -> pb_grpc.TaskServiceStub:
        """A stub for the run's coordinator, or for the node `node_id` at `address`."""
        if address is None:
            address, node_id = self.location.coordinator_address, self.location.coordinator
        return pb_grpc.TaskServiceStub(self._channel(address, node_id))

    def events(self) -> Iterator[dict]:
        """Every event after the last one seen; ends with the "run.finished" event."""
        while True:
            request = pb.WatchRequest(run_id=self.location.run_id, after_seq=self.last_seq)
            try:
                for message in self.stub().WatchRun(request):
                    self.last_seq = message.seq
                    event = json.loads(message.event_json)
                    if event.get("type") == "run.backup":
                        self.location.backup, self.location.backup_address = event["node"], event["address"]
                    yield event
                    if event.get("type") == FINISHED:
                        return
                raise RunLostError(f"run {self.location.run_id}: the event stream ended before the run did")
            except grpc.RpcError as error:
                if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise RunLostError(f"run {self.location.run_id}: {error.code().name}: {error.details()}") from error
                self._take_over(error)

    def _take_over(self, error: grpc.RpcError) -> None:
        """Asks the backup node to resume the run (it may already have, on its own)."""
        location = self.location
        if not location.backup_address or self.takeovers >= self.max_takeovers:
            raise RunLostError(
                f"run {location.run_id}: coordinator {location.coordinator} is unreachable ({error.details()}) "
                "and no backup can take over"
            ) from error
        self.takeovers += 1
        logger.warning("coordinator %s of run %s is unreachable; resuming on %s", location.coordinator, location.run_id, location.backup)
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                reply = self.stub(location.backup_address, location.backup).ResumeRun(pb.RunQuery(run_id=location.run_id), timeout=RUN_START_TIMEOUT)
                self.location = RunLocation.from_reply(reply)
                if reply.resumed_seq > 0:  # events seen past the journal copy were the dead coordinator's
                    self.last_seq = min(self.last_seq, reply.resumed_seq - 1)
                return
            except grpc.RpcError as resume_error:
                if attempt == MAX_ATTEMPTS or resume_error.code() == grpc.StatusCode.NOT_FOUND:
                    raise RunLostError(f"run {location.run_id}: backup {location.backup} cannot resume it: {resume_error.details()}") from resume_error
                time.sleep(RETRY_PAUSE)

    def cancel(self) -> pb.RunReply:
        return self.stub().CancelRun(pb.RunQuery(run_id=self.location.run_id), timeout=RUN_CONTROL_TIMEOUT)
