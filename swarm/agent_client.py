"""The client side of agent runs: submitting one to a coordinator node and following it (`AgentTask`),
and reading or writing the swarm's memory directly."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import grpc

from agent.capabilities import CapabilityDirectory
from agent.run_client import FINISHED, RunFollower, RunLocation, RunLostError
from agent.runtime import RunSpec
from agent.scheduler import NoCapableNodeError, StepScheduler
from agent.steps import Step
from proto import tasks_pb2 as pb
from proto import tasks_pb2_grpc as pb_grpc


class AgentRunError(RuntimeError):
    """The run failed, was cancelled, or was lost with every node that could carry it on."""


class AgentTask:
    """A submitted agent run. Events are collected in the background from the moment it is submitted, so
    `events()` always starts from the first one; `result()` waits for the answer."""

    def __init__(self, follower: RunFollower):
        self._follower = follower
        self._events: list[dict] = []
        self._finished = threading.Event()
        self._changed = threading.Condition()
        self._error: Exception | None = None
        threading.Thread(target=self._collect, name=f"agent-{self.run_id[:8]}", daemon=True).start()

    @property
    def run_id(self) -> str:
        return self._follower.location.run_id

    @property
    def coordinator(self) -> str:
        """The node coordinating the run now (it changes if the run was taken over)."""
        return self._follower.location.coordinator

    def _collect(self) -> None:
        try:
            for event in self._follower.events():
                with self._changed:
                    self._events.append(event)
                    self._changed.notify_all()
        except (RunLostError, grpc.RpcError) as error:
            self._error = error
        finally:
            self._finished.set()
            with self._changed:
                self._changed.notify_all()

    def events(self, timeout: float | None = None) -> Iterator[dict]:
        """Every event of the run, in order: "run.started", "step.started" / "step.finished" (with the node
        that ran it), "token", "plan", "message", "answer", ..., "run.finished"."""
        index = 0
        while True:
            with self._changed:
                if index >= len(self._events) and not self._finished.is_set():
                    if not self._changed.wait(timeout=timeout) and timeout is not None:
                        raise TimeoutError(f"no event of run {self.run_id} within {timeout}s")
                pending, done = self._events[index:], self._finished.is_set()
            yield from pending
            index += len(pending)
            if done and index >= len(self._events):
                return

    def result(self, timeout: float | None = None) -> str:
        """The final answer; raises AgentRunError if the run failed or was cancelled, TimeoutError if late."""
        if not self._finished.wait(timeout):
            raise TimeoutError(f"run {self.run_id} has not finished within {timeout}s")
        final = self.final_event()
        if final is None:
            raise AgentRunError(f"run {self.run_id} was lost: {self._error}")
        if final["status"] != "succeeded":
            raise AgentRunError(f"run {self.run_id} {final['status']}: {final.get('error')}")
        return final.get("answer") or ""

    def final_event(self) -> dict | None:
        """The "run.finished" event, once the run has ended (None before)."""
        with self._changed:
            return next((event for event in reversed(self._events) if event.get("type") == FINISHED), None)

    def cancel(self) -> None:
        """Asks the coordinator to stop the run; in-flight steps are cancelled and it ends "cancelled"."""
        self._follower.cancel()

    @property
    def done(self) -> bool:
        return self._finished.is_set()


class AgentGateway:
    """What `SwarmClient` uses for agents: the capability records, and a scheduler for memory steps."""

    def __init__(self, dht, model_id: str):
        self.directory = CapabilityDirectory(dht, model_id)
        self.scheduler = StepScheduler(self.directory)

    def submit(self, spec: RunSpec, run_id: str | None = None, coordinator: str | None = None) -> AgentTask:
        """Starts the run on `coordinator` (a node id) or else the least loaded node that accepts it."""
        run_id = run_id or uuid.uuid4().hex
        candidates = self.scheduler.candidates(Step("run", "subagent", spec.to_dict()))
        if coordinator is not None:
            candidates = [node for node in candidates if node.node_id == coordinator]
            if not candidates:
                raise NoCapableNodeError(f"node {coordinator} does not coordinate agent runs here")
        errors = []
        for node in candidates:
            try:
                stub = pb_grpc.TaskServiceStub(self.scheduler.channel(node.address))
                reply = stub.StartRun(pb.RunRequest(run_id=run_id, spec_json=json.dumps(spec.to_dict())), timeout=30)
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise ValueError(error.details()) from error
                errors.append(f"{node.node_id}: {error.details()}")
                self.scheduler.ban(node.node_id)
                continue
            return AgentTask(RunFollower(RunLocation.from_reply(reply), self.scheduler.channel))
        raise NoCapableNodeError(f"no node coordinates agent runs ({'; '.join(errors) or 'none announced'})")

    def memory_step(self, kind: str, args: dict[str, Any]) -> Any:
        outcome = self.scheduler.run("client", Step(f"client.{uuid.uuid4().hex[:8]}", kind, args))
        if not outcome.ok:
            raise AgentRunError(outcome.error)
        return outcome.value

    def close(self) -> None:
        self.scheduler.close()
