"""Placing agent steps on capable nodes and running them there over gRPC, retrying elsewhere on failure.

Placement: a tool step goes to a node hosting the tool; an llm step to the node that ran the run's
previous llm step (it holds the run's KV prefix) unless that node is much busier; memory steps follow
the namespace's rendezvous replicas; otherwise the least loaded capable node wins.

Retries: a node that cannot be reached, or that fails while running an idempotent step, is skipped for
`ban_seconds` and the step goes to the next candidate. A non-idempotent step that a node had accepted
is never sent again: its outcome is an error saying it may or may not have run. A node only starts a
step after telling the caller it accepted it (see node.task_service), so a step that was never accepted
never ran.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager

import grpc

from agent.capabilities import TaskCapabilities
from agent.memory import replica_nodes
from agent.steps import Step, StepOutcome
from proto import tasks_pb2 as pb
from proto import tasks_pb2_grpc as pb_grpc
from protocol.channels import open_channel

logger = logging.getLogger(__name__)

AFFINITY_SLACK = 2.0  # an llm step stays on its run's node unless that node is this much busier than the idlest
MEMORY_REPLICAS = 2

TextCallback = Callable[[str], None]
DispatchCallback = Callable[[str, int], None]  # (node id, attempt number) just before a node is sent the step
FailureCallback = Callable[[str, int, str], None]  # (node id, attempt number, why) when a node failed the step


class NoCapableNodeError(RuntimeError):
    """No node in the swarm can take this step (or all that could have failed)."""


class StepScheduler:
    """Runs steps on the swarm's nodes. Thread-safe: a run's parallel branches share one scheduler."""

    def __init__(
        self,
        capabilities: Callable[[], list[TaskCapabilities]],
        connect_timeout: float = 3.0,
        step_timeout: float = 600.0,
        ban_seconds: float = 30.0,
        max_attempts: int = 3,
    ):
        self._capabilities = capabilities
        self.connect_timeout = connect_timeout
        self.step_timeout = step_timeout
        self.ban_seconds = ban_seconds
        self.max_attempts = max_attempts
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}  # node id -> steps this scheduler has running there
        self._banned_until: dict[str, float] = {}
        self._channels: dict[str, grpc.Channel] = {}
        self._calls: dict[str, set] = {}  # run id -> RunStep calls in flight, for cancellation
        self._cancelled_runs: set[str] = set()
        self._llm_nodes: dict[str, dict[str, str]] = {}  # run id -> node id -> address of nodes that ran its llm steps

    # --- placement -------------------------------------------------------------------------------

    def nodes(self) -> list[TaskCapabilities]:
        """The announced nodes minus those that failed recently."""
        now = time.monotonic()
        with self._lock:
            banned = {node for node, until in self._banned_until.items() if until > now}
        return [node for node in self._capabilities() if node.node_id not in banned]

    def load(self, node: TaskCapabilities) -> float:
        """Lower is better: steps running there (as announced and as sent from here) plus busy CPU."""
        with self._lock:
            local = self._in_flight.get(node.node_id, 0)
        return max(node.running_steps, local) + (1.0 - node.free_cpu)

    def candidates(self, step: Step, exclude: set[str] = frozenset()) -> list[TaskCapabilities]:
        """The nodes that can run `step`, best first."""
        kind = "run" if step.kind == "subagent" else step.kind
        capable = [n for n in self.nodes() if n.can_run(kind, step.tool) and n.node_id not in exclude]
        if step.kind.startswith("memory."):
            return _by_replica_rank(capable, step.args.get("namespace", ""))
        ranked = sorted(capable, key=lambda node: (self.load(node), node.node_id))
        if step.prefer_node is not None and ranked:
            preferred = next((n for n in ranked if n.node_id == step.prefer_node), None)
            if preferred is not None and self.load(preferred) <= self.load(ranked[0]) + AFFINITY_SLACK:
                ranked.remove(preferred)
                ranked.insert(0, preferred)
        return ranked

    def ban(self, node_id: str) -> None:
        with self._lock:
            self._banned_until[node_id] = time.monotonic() + self.ban_seconds

    # --- running ---------------------------------------------------------------------------------

    def run(
        self,
        run_id: str,
        step: Step,
        first_attempt: int = 0,
        on_text: TextCallback | None = None,
        on_dispatch: DispatchCallback | None = None,
        on_failure: FailureCallback | None = None,
    ) -> StepOutcome:
        """Runs a node step (llm, tool, memory.*) on the best node that answers; see the module doc."""
        if step.kind == "memory.write":
            return self._write_replicated(run_id, step, first_attempt, on_dispatch, on_failure)
        tried: list[str] = []
        attempt = first_attempt
        while len(tried) < self.max_attempts:
            candidates = self.candidates(step, exclude=set(tried))
            if not candidates:
                break
            node = candidates[0]
            tried.append(node.node_id)
            if on_dispatch is not None:
                on_dispatch(node.node_id, attempt)
            outcome, accepted = self._send(run_id, step, attempt, node, on_text)
            outcome.tried = list(tried)
            if step.kind == "llm" and outcome.node_id:  # that node may keep the run's session open
                with self._lock:
                    self._llm_nodes.setdefault(run_id, {})[node.node_id] = node.address
            if outcome.ok or outcome.node_id:  # the node answered: its answer stands, even an error
                return outcome
            if on_failure is not None:
                on_failure(node.node_id, attempt, outcome.error or "failed")
            self.ban(node.node_id)
            if accepted and not step.idempotent:
                outcome.error = (
                    f"node {node.node_id} failed while running non-idempotent {step.describe()} "
                    f"({outcome.error}); it may or may not have taken effect, so it is not run again"
                )
                return outcome
            attempt += 1
        where = f"after trying {', '.join(tried)}" if tried else "and no node can take it"
        return StepOutcome(ok=False, error=f"{step.describe()} could not run: {where}", tried=tried)

    def _write_replicated(self, run_id, step, attempt, on_dispatch, on_failure) -> StepOutcome:
        """Writes a memory record on the namespace's first `MEMORY_REPLICAS` nodes that answer."""
        began = time.perf_counter()
        written, tried, errors = [], [], []
        for node in self.candidates(step):
            if len(written) == MEMORY_REPLICAS:
                break
            tried.append(node.node_id)
            if on_dispatch is not None:
                on_dispatch(node.node_id, attempt)
            outcome, _ = self._send(run_id, step, attempt, node, None)
            if outcome.ok:
                written.append(node.node_id)
            else:
                errors.append(outcome.error or "failed")
                if on_failure is not None:
                    on_failure(node.node_id, attempt, outcome.error or "failed")
                if not outcome.node_id:
                    self.ban(node.node_id)
            attempt += 1
        seconds = time.perf_counter() - began
        if not written:
            return StepOutcome(ok=False, error=f"memory write failed on every node: {errors}", tried=tried, seconds=seconds)
        value = {"record_id": step.args.get("record_id"), "replicas": written}
        return StepOutcome(ok=True, value=value, node_id=written[0], seconds=seconds, tried=tried)

    def _send(self, run_id: str, step: Step, attempt: int, node: TaskCapabilities, on_text) -> tuple[StepOutcome, bool]:
        """Sends one attempt; returns its outcome (node_id empty if the node never answered) and whether
        the node accepted the step before anything went wrong."""
        channel = self._channel(node.address)
        try:
            grpc.channel_ready_future(channel).result(timeout=self.connect_timeout)
        except grpc.FutureTimeoutError:
            return StepOutcome(ok=False, error=f"node {node.node_id} at {node.address} is unreachable"), False
        request = pb.StepRequest(
            run_id=run_id, step_id=step.step_id, attempt=attempt, kind=step.kind, args_json=json.dumps(step.args)
        )
        accepted = False
        with self.occupy(run_id, node.node_id) as calls:
            call = pb_grpc.TaskServiceStub(channel).RunStep(request, timeout=self.step_timeout)
            with self._lock:
                calls.add(call)
                cancelled = run_id in self._cancelled_runs
            if cancelled:  # cancelled while this step was being sent
                call.cancel()
            try:
                for update in call:
                    which = update.WhichOneof("update")
                    if which == "accepted":
                        accepted = True
                    elif which == "text" and on_text is not None:
                        on_text(update.text)
                    elif which == "result":
                        return _outcome(update.result), accepted
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.CANCELLED:
                    return StepOutcome(ok=False, error="cancelled", node_id=node.node_id), accepted
                if error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED):
                    return StepOutcome(ok=False, error=error.details(), node_id=node.node_id), accepted
                return StepOutcome(ok=False, error=f"{error.code().name}: {error.details()}"), accepted
            finally:
                with self._lock:
                    calls.discard(call)
        return StepOutcome(ok=False, error=f"node {node.node_id} closed the step without a result"), accepted

    @contextmanager
    def occupy(self, run_id: str, node_id: str):
        """Counts work of `run_id` on a node while the block runs (for least-loaded placement); yields the
        set of that run's calls in flight, which `cancel_run` cancels."""
        with self._lock:
            self._in_flight[node_id] = self._in_flight.get(node_id, 0) + 1
            calls = self._calls.setdefault(run_id, set())
        try:
            yield calls
        finally:
            with self._lock:
                self._in_flight[node_id] -= 1
                if not calls and self._calls.get(run_id) is calls:
                    del self._calls[run_id]

    def cancel_run(self, run_id: str) -> None:
        """Cancels every step of `run_id` in flight from this scheduler, and any it sends until `forget_run`."""
        with self._lock:
            self._cancelled_runs.add(run_id)
            calls = list(self._calls.get(run_id, ()))
        for call in calls:
            call.cancel()

    def forget_run(self, run_id: str) -> None:
        """Drops what this scheduler keeps about a run that has ended, and tells the nodes that ran its llm
        steps to close its session (their KV caches would otherwise wait for the nodes' idle timeout)."""
        with self._lock:
            self._cancelled_runs.discard(run_id)
            llm_nodes = self._llm_nodes.pop(run_id, {})
        for node_id, address in llm_nodes.items():
            try:
                pb_grpc.TaskServiceStub(self._channel(address)).EndRun(pb.RunQuery(run_id=run_id), timeout=self.connect_timeout)
            except grpc.RpcError as error:  # a node that is gone has nothing left to free
                logger.info("could not end run %s on node %s: %s", run_id, node_id, error.code().name)

    def _channel(self, address: str) -> grpc.Channel:
        with self._lock:
            channel = self._channels.get(address)
            if channel is None:
                channel = open_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)])
                self._channels[address] = channel
            return channel

    def channel(self, address: str) -> grpc.Channel:
        """A shared channel to a node (for the run RPCs of sub-agents)."""
        return self._channel(address)

    def close(self) -> None:
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close()


def _outcome(result: pb.StepResult) -> StepOutcome:
    value = json.loads(result.value_json) if result.ok and result.value_json else None
    return StepOutcome(
        ok=result.ok, value=value, error=result.error or None, node_id=result.node_id, seconds=result.seconds
    )


def _by_replica_rank(nodes: list[TaskCapabilities], namespace: str) -> list[TaskCapabilities]:
    """Memory nodes in the namespace's rendezvous order, those already holding it first."""
    if not nodes:
        return []
    rank = {node_id: index for index, node_id in enumerate(replica_nodes(namespace, [n.node_id for n in nodes], len(nodes)))}
    return sorted(nodes, key=lambda node: (namespace not in node.namespaces, rank[node.node_id]))
