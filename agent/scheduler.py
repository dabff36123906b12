"""Placing agent steps on capable nodes and running them there over gRPC, retrying elsewhere on failure.

Placement: a tool step goes to a node hosting the tool; an llm step to the node that ran the run's
previous llm step (it holds the run's KV prefix) unless that node is much busier; memory steps follow
the namespace's rendezvous order (agent.memory_placement); otherwise the least loaded capable node wins.
Runs are placed by `place_run`: a client's run, a sub-agent (on another coordinator if one can take it)
and a run's backup copy (never on its coordinator).

Memory: a write succeeds only once `MEMORY_REPLICAS` nodes hold it; a node that fails is replaced by the
next one in rendezvous order, and a write still short of replicas is reported as failed, naming what is
missing. A search asks every live replica (the first `MEMORY_REPLICAS` that answer in rendezvous order,
and every node that announces holding the namespace) and merges their hits.

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
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace

import grpc

from edgeswarm.agent.capabilities import TaskCapabilities
from edgeswarm.agent.memory_placement import MEMORY_REPLICAS, replica_nodes, storage_id
from edgeswarm.agent.steps import Step, StepOutcome
from edgeswarm.proto import tasks_pb2 as pb
from edgeswarm.proto import tasks_pb2_grpc as pb_grpc
from edgeswarm.protocol.busy import busy_retry_after
from edgeswarm.protocol.channels import open_channel
from edgeswarm.protocol.constants import CONNECT_TIMEOUT, MAX_ATTEMPTS
from edgeswarm.protocol.identity import NodeIdentity
from edgeswarm.swarm.errors import SwarmError
from edgeswarm.swarm.routes import Banlist

logger = logging.getLogger(__name__)

AFFINITY_SLACK = 2.0  # an llm step stays on its run's node unless that node is this much busier than the idlest
MAX_SEARCH_NODES = 2 * MEMORY_REPLICAS  # a memory search asks at most this many nodes at once
ACCESS_DENIED = "permission denied"  # how an outcome's error starts when a node refused the caller (PERMISSION_DENIED)

TextCallback = Callable[[str], None]
DispatchCallback = Callable[[str, int], None]  # (node id, attempt number) just before a node is sent the step
FailureCallback = Callable[[str, int, str], None]  # (node id, attempt number, why) when a node failed the step


class NoCapableNodeError(SwarmError):
    """No node in the swarm can take this step (or all that could have failed)."""


class StepScheduler:
    """Runs steps on the swarm's nodes. Thread-safe: a run's parallel branches share one scheduler."""

    def __init__(
        self,
        capabilities: Callable[[], list[TaskCapabilities]],
        connect_timeout: float = CONNECT_TIMEOUT,
        step_timeout: float = 600.0,
        ban_seconds: float = 30.0,
        max_attempts: int = MAX_ATTEMPTS,
        swarm_key: bytes | None = None,
        identity: NodeIdentity | None = None,
        banlist: Banlist | None = None,
    ):
        """`swarm_key`: the private swarm's key, which memory storage ids are keyed with (None: open swarm).
        `identity` signs this scheduler's calls (default: this process's). `banlist`: the bans this
        scheduler adds to and skips, shared with the inference client of the same program (swarm.routes)."""
        self._capabilities = capabilities
        self._swarm_key = swarm_key
        self._identity = identity
        self.connect_timeout = connect_timeout
        self.step_timeout = step_timeout
        self.ban_seconds = ban_seconds
        self.max_attempts = max_attempts
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}  # node id -> steps this scheduler has running there
        self.banlist = banlist or Banlist()
        self._channels: dict[str, grpc.Channel] = {}
        self._calls: dict[str, set] = {}  # run id -> RunStep calls in flight, for cancellation
        self._cancelled_runs: set[str] = set()
        self._llm_nodes: dict[str, dict[str, str]] = {}  # run id -> node id -> address of nodes that ran its llm steps

    # --- placement -------------------------------------------------------------------------------

    def nodes(self) -> list[TaskCapabilities]:
        """The announced nodes minus those that failed recently."""
        banned = self.banlist.banned()
        return [node for node in self._capabilities() if node.node_id not in banned]

    def load(self, node: TaskCapabilities) -> float:
        """Lower is better: steps running there (as announced and as sent from here) plus busy CPU."""
        with self._lock:
            local = self._in_flight.get(node.node_id, 0)
        return max(node.running_steps, local) + (1.0 - node.free_cpu)

    def storage_id(self, owner: str, namespace: str) -> str:
        """The storage id of `owner`'s namespace in this swarm (agent.memory_placement); ValueError if malformed."""
        return storage_id(owner, namespace, self._swarm_key)

    def candidates(self, step: Step, exclude: set[str] = frozenset()) -> list[TaskCapabilities]:
        """The nodes that can run the node step `step`, best first (for memory steps: in the namespace's
        rendezvous order). Runs and sub-agents are placed by `place_run`."""
        capable = [n for n in self.nodes() if n.can_run(step.kind, step.tool) and n.node_id not in exclude]
        if step.kind.startswith("memory."):
            return _by_replica_rank(capable, self.storage_id(step.args.get("owner"), step.args.get("namespace")))
        ranked = self._least_loaded(capable)
        if step.prefer_node is not None and ranked:
            preferred = next((n for n in ranked if n.node_id == step.prefer_node), None)
            if preferred is not None and self.load(preferred) <= self.load(ranked[0]) + AFFINITY_SLACK:
                ranked.remove(preferred)
                ranked.insert(0, preferred)
        return ranked

    def place_run(self, exclude: set[str] = frozenset(), asking: str | None = None) -> list[TaskCapabilities]:
        """The nodes that may coordinate a run, best first: least loaded first, and the node `asking` (a
        coordinator placing a sub-agent, which would rather hand it on) after every other one. A
        coordinator places its run's backup with itself in `exclude`: the copy must live elsewhere."""
        capable = [n for n in self.nodes() if n.can_run("run") and n.node_id not in exclude]
        return sorted(self._least_loaded(capable), key=lambda node: node.node_id == asking)

    def _least_loaded(self, nodes: list[TaskCapabilities]) -> list[TaskCapabilities]:
        return sorted(nodes, key=lambda node: (self.load(node), node.node_id))

    def ban(self, node_id: str, seconds: float | None = None) -> None:
        """Skips a node for `seconds` (default `ban_seconds`)."""
        self.banlist.ban(node_id, self.ban_seconds if seconds is None else seconds)

    def _ban_failed(self, node_id: str) -> None:
        """Bans a node that failed a step, unless it is banned already: a busy node has just been skipped
        for as long as it asked, and a node caught lying for longer."""
        if not self.banlist.is_banned(node_id):
            self.ban(node_id)

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
        if step.kind.startswith("memory."):
            try:
                self.storage_id(step.args.get("owner"), step.args.get("namespace"))
            except ValueError as error:
                return StepOutcome(ok=False, error=f"{step.describe()}: {error}")
        if step.kind == "memory.write":
            return self._write_replicated(run_id, step, first_attempt, on_dispatch, on_failure)
        if step.kind == "memory.search":
            return self._search_replicas(run_id, step, first_attempt, on_dispatch, on_failure)
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
            self._ban_failed(node.node_id)
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
        """Writes a memory record on the namespace's first `MEMORY_REPLICAS` nodes, in rendezvous order,
        that take it; fails, naming what is missing, if fewer do. Every replica gets the same record id,
        so writing again (a retry, a replayed run) stores nothing twice."""
        if "record_id" not in step.args:
            step = replace(step, args={**step.args, "record_id": uuid.uuid4().hex})
        began = time.perf_counter()
        written, tried, errors = [], [], []
        for node in self.candidates(step):
            if len(written) == MEMORY_REPLICAS or len(tried) == MEMORY_REPLICAS + self.max_attempts:
                break
            tried.append(node.node_id)
            if on_dispatch is not None:
                on_dispatch(node.node_id, attempt)
            outcome, _ = self._send(run_id, step, attempt, node, None)
            attempt += 1
            if outcome.ok:
                written.append(node.node_id)
                continue
            if _denied(outcome):  # every replica decides access alike: asking the next one is pointless
                outcome.tried, outcome.seconds = tried, time.perf_counter() - began
                return outcome
            errors.append(f"{node.node_id}: {outcome.error or 'failed'}")
            if on_failure is not None:
                on_failure(node.node_id, attempt - 1, outcome.error or "failed")
            if not outcome.node_id:
                self._ban_failed(node.node_id)
        seconds = time.perf_counter() - began
        if len(written) < MEMORY_REPLICAS:
            error = (
                f"memory write reached {len(written)} of the {MEMORY_REPLICAS} replicas it needs "
                f"(held by: {', '.join(written) or 'none'}; failed: {'; '.join(errors) or 'no other memory node is up'})"
            )
            return StepOutcome(ok=False, error=error, node_id=written[0] if written else "", seconds=seconds, tried=tried)
        value = {"record_id": step.args["record_id"], "replicas": written}
        return StepOutcome(ok=True, value=value, node_id=written[0], seconds=seconds, tried=tried)

    def _search_replicas(self, run_id, step, attempt, on_dispatch, on_failure) -> StepOutcome:
        """Asks every live replica of the namespace and merges their hits (see the module doc)."""
        began = time.perf_counter()
        store = self.storage_id(step.args["owner"], step.args["namespace"])
        ranked = self.candidates(step)
        holders = [node for node in ranked if store in node.namespaces]
        ask = list({node.node_id: node for node in [*ranked[:MEMORY_REPLICAS], *holders]}.values())[:MAX_SEARCH_NODES]
        answered: dict[str, StepOutcome] = {}
        tried: list[str] = []
        errors: list[str] = []
        while ask:
            for node in ask:
                tried.append(node.node_id)
                if on_dispatch is not None:
                    on_dispatch(node.node_id, attempt)
            with ThreadPoolExecutor(len(ask), thread_name_prefix="memory-search") as pool:
                sent = [pool.submit(self._send, run_id, step, attempt, node, None) for node in ask]
                outcomes = [future.result()[0] for future in sent]
            attempt += 1
            for node, outcome in zip(ask, outcomes, strict=True):
                if outcome.ok:
                    answered[node.node_id] = outcome
                elif _denied(outcome):
                    outcome.tried, outcome.seconds = tried, time.perf_counter() - began
                    return outcome
                else:
                    errors.append(f"{node.node_id}: {outcome.error or 'failed'}")
                    if on_failure is not None:
                        on_failure(node.node_id, attempt - 1, outcome.error or "failed")
                    if not outcome.node_id:
                        self._ban_failed(node.node_id)
            missing = min(MEMORY_REPLICAS - len(answered), MAX_SEARCH_NODES + self.max_attempts - len(tried))
            ask = [node for node in ranked if node.node_id not in tried][:missing] if missing > 0 else []  # the next in order
        seconds = time.perf_counter() - began
        if not answered:
            why = "; ".join(errors) or "no memory node is up"
            return StepOutcome(ok=False, error=f"memory.search could not run: {why}", seconds=seconds, tried=tried)
        value = {"hits": merge_hits([outcome.value.get("hits", []) for outcome in answered.values()], step.args.get("k", 5)),
                 "replicas": list(answered)}
        return StepOutcome(ok=True, value=value, node_id=next(iter(answered)), seconds=seconds, tried=tried)

    def _send(self, run_id: str, step: Step, attempt: int, node: TaskCapabilities, on_text) -> tuple[StepOutcome, bool]:
        """Sends one attempt; returns its outcome (node_id empty if the node never answered) and whether
        the node accepted the step before anything went wrong."""
        channel = self.channel(node.address, node.node_id)
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
                if (retry_after := busy_retry_after(error)) is not None:  # no room there now: go elsewhere
                    self.ban(node.node_id, retry_after)
                    return StepOutcome(ok=False, error=f"node {node.node_id} is busy: {error.details()}"), accepted
                if error.code() == grpc.StatusCode.CANCELLED:
                    return StepOutcome(ok=False, error="cancelled", node_id=node.node_id), accepted
                if error.code() == grpc.StatusCode.PERMISSION_DENIED:
                    return StepOutcome(ok=False, error=f"{ACCESS_DENIED} by node {node.node_id}: {error.details()}", node_id=node.node_id), accepted
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
                pb_grpc.TaskServiceStub(self.channel(address, node_id)).EndRun(pb.RunQuery(run_id=run_id), timeout=self.connect_timeout)
            except grpc.RpcError as error:  # a node that is gone has nothing left to free
                logger.info("could not end run %s on node %s: %s", run_id, node_id, error.code().name)

    def channel(self, address: str, node_id: str) -> grpc.Channel:
        """A shared channel to the node `node_id` at `address` (calls signed for that node)."""
        with self._lock:
            channel = self._channels.get((address, node_id))
            if channel is None:
                channel = open_channel(address, node_id, options=[("grpc.max_receive_message_length", 64 << 20)], identity=self._identity)
                self._channels[(address, node_id)] = channel
            return channel

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


def _denied(outcome: StepOutcome) -> bool:
    return (outcome.error or "").startswith(ACCESS_DENIED)


def _by_replica_rank(nodes: list[TaskCapabilities], store: str) -> list[TaskCapabilities]:
    """Memory nodes in the rendezvous order of the storage id `store`."""
    if not nodes:
        return []
    rank = {node_id: index for index, node_id in enumerate(replica_nodes(store, [n.node_id for n in nodes], len(nodes)))}
    return sorted(nodes, key=lambda node: rank[node.node_id])


def merge_hits(answers: list[list[dict]], k: int) -> list[dict]:
    """The `k` best hits of several replicas' answers, each record once (with its best score), best first."""
    best: dict[str, dict] = {}
    for hits in answers:
        for hit in hits:
            kept = best.get(hit["id"])
            if kept is None or hit["score"] > kept["score"]:
                best[hit["id"]] = hit
    return sorted(best.values(), key=lambda hit: (-hit["score"], hit["id"]))[:k]
