"""The gRPC TaskService of a node: agent steps (node.task_worker), agent runs (agent.coordinator) and
memory replication between memory nodes (agent.memory_replication)."""

from __future__ import annotations

import json
import logging
import queue
import threading
import time

import grpc

from edgeswarm.agent.coordinator import RunCoordinator, UnknownRunError
from edgeswarm.agent.memory_replication import MemoryReplicator
from edgeswarm.agent.runtime import RunSpec
from edgeswarm.agent.steps import NODE_STEP_KINDS
from edgeswarm.node.task_worker import StepError, TaskWorker
from edgeswarm.proto import tasks_pb2 as pb
from edgeswarm.proto import tasks_pb2_grpc as pb_grpc
from edgeswarm.protocol.memory_access import MemoryAccessError
from edgeswarm.protocol.principals import principal_of
from edgeswarm.protocol.request_parsing import add_servicer

logger = logging.getLogger(__name__)

MAX_ARGS_BYTES = 1 << 20
MAX_JOURNAL_BYTES = 16 << 20
MAX_ID_CHARS = 256


class TaskServicer(pb_grpc.TaskServiceServicer):
    """Runs steps with `worker`, runs with `coordinator`, and serves memory replication with `replicator`
    (None on a node that keeps no memory); bad requests get INVALID_ARGUMENT or NOT_FOUND, callers without
    the right PERMISSION_DENIED."""

    def __init__(self, worker: TaskWorker, coordinator: RunCoordinator, replicator: MemoryReplicator | None = None):
        self.worker = worker
        self.coordinator = coordinator
        self.replicator = replicator

    def RunStep(self, request: pb.StepRequest, context: grpc.ServicerContext):
        if request.kind not in NODE_STEP_KINDS:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown step kind {request.kind!r}; expected one of {NODE_STEP_KINDS}")
        args = _json_object(request.args_json, "args_json", MAX_ARGS_BYTES, context)
        _check_id(request.run_id, "run_id", context)
        try:
            self.worker.authorize(request.kind, args, principal_of(context))
        except MemoryAccessError as error:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(error))
        except StepError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        yield pb.StepUpdate(accepted=True)  # the step starts only after the caller knows it was accepted
        updates: queue.Queue = queue.Queue()
        began = time.perf_counter()

        def execute() -> None:
            try:
                value = self.worker.execute(request.run_id, request.kind, args, lambda text: updates.put(pb.StepUpdate(text=text)))
                result = pb.StepResult(ok=True, value_json=json.dumps(value))
            except Exception as error:  # the step failed; the node serves on
                if not isinstance(error, ValueError):
                    logger.warning("%s step %s of run %s failed", request.kind, request.step_id, request.run_id, exc_info=True)
                result = pb.StepResult(ok=False, error=str(error) or type(error).__name__)
            result.node_id, result.seconds = self.worker.node_id, time.perf_counter() - began
            updates.put(pb.StepUpdate(result=result))

        threading.Thread(target=execute, name=f"step-{request.step_id[:16]}", daemon=True).start()
        while context.is_active():
            try:
                update = updates.get(timeout=1.0)
            except queue.Empty:
                continue
            yield update
            if update.WhichOneof("update") == "result":
                return

    def StartRun(self, request: pb.RunRequest, context: grpc.ServicerContext) -> pb.RunReply:
        _check_id(request.run_id, "run_id", context)
        try:
            spec = RunSpec.from_dict(_json_object(request.spec_json, "spec_json", MAX_ARGS_BYTES, context))
            return self.coordinator.start(request.run_id, spec)
        except MemoryAccessError as error:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"the run's memory: {error}")
        except ValueError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))

    def WatchRun(self, request: pb.WatchRequest, context: grpc.ServicerContext):
        try:
            for seq, event in self.coordinator.watch(request.run_id, request.after_seq, context.is_active):
                yield pb.RunEvent(seq=seq, event_json=json.dumps(event))
        except UnknownRunError as error:
            context.abort(grpc.StatusCode.NOT_FOUND, str(error))

    def GetRun(self, request: pb.RunQuery, context: grpc.ServicerContext) -> pb.RunReply:
        return self._known(context, self.coordinator.info, request.run_id)

    def CancelRun(self, request: pb.RunQuery, context: grpc.ServicerContext) -> pb.RunReply:
        return self._known(context, self.coordinator.cancel, request.run_id)

    def ResumeRun(self, request: pb.RunQuery, context: grpc.ServicerContext) -> pb.RunReply:
        return self._known(context, self.coordinator.resume, request.run_id)

    def EndRun(self, request: pb.RunQuery, context: grpc.ServicerContext) -> pb.RunReply:
        _check_id(request.run_id, "run_id", context)
        self.worker.end_run(request.run_id)
        return pb.RunReply(run_id=request.run_id)

    def ReplicateRun(self, request: pb.RunJournal, context: grpc.ServicerContext) -> pb.RunReply:
        _check_id(request.run_id, "run_id", context)
        export = _json_object(request.export_json, "export_json", MAX_JOURNAL_BYTES, context)
        try:
            self.coordinator.accept_replica(request.run_id, export, request.coordinator)
        except (ValueError, KeyError, TypeError) as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unusable journal copy: {error}")
        return pb.RunReply(run_id=request.run_id)

    def CompareMemory(self, request: pb.MemoryDigests, context: grpc.ServicerContext) -> pb.MemoryInventories:
        replicator = self._replication_peer(context)
        try:
            differing = replicator.compare({digest.store: digest.digest for digest in request.stores})
        except ValueError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return pb.MemoryInventories(
            stores=[
                pb.MemoryInventory(store=store, record_ids=list(entries), created=list(entries.values()))
                for store, entries in differing.items()
            ]
        )

    def PutMemoryRecords(self, request: pb.MemoryRecords, context: grpc.ServicerContext) -> pb.MemoryPutReply:
        replicator = self._replication_peer(context)
        try:
            return pb.MemoryPutReply(stored=replicator.accept(request.store, list(request.records_json)))
        except ValueError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))

    def _replication_peer(self, context: grpc.ServicerContext) -> MemoryReplicator:
        """This node's replicator, if the caller is another memory node; aborts the call otherwise."""
        if self.replicator is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"node {self.worker.node_id} keeps no memory")
        caller = principal_of(context)
        if not self.replicator.is_peer(caller):
            who = caller.id if caller else "an anonymous caller"
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"only the swarm's memory nodes replicate memory; {who} is not one")
        return self.replicator

    def _known(self, context: grpc.ServicerContext, action, run_id: str) -> pb.RunReply:
        try:
            return action(run_id)
        except UnknownRunError as error:
            context.abort(grpc.StatusCode.NOT_FOUND, str(error))


def _json_object(text: str, field: str, limit: int, context: grpc.ServicerContext) -> dict:
    if len(text) > limit:
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{field} has {len(text)} bytes; at most {limit}")
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError as error:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{field} is not JSON: {error}")
    if not isinstance(value, dict):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{field} must be a JSON object")
    return value


def _check_id(value: str, field: str, context: grpc.ServicerContext) -> None:
    if not value or len(value) > MAX_ID_CHARS:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{field} must be 1 to {MAX_ID_CHARS} characters")


def add_task_service(server: grpc.Server, servicer: TaskServicer) -> None:
    add_servicer(pb_grpc.add_TaskServiceServicer_to_server, servicer, server)  # unparsable bytes: INVALID_ARGUMENT
