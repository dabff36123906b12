"""Coordinating agent runs on a node: each run's thread, its journal, its events, its backup copy.

Every step a run takes is journaled (SQLite) before it is sent to a node and when it ends, and after
each step the whole run is copied to a backup node. When the coordinator dies, the backup resumes the
run (asked by a client following it, or on its own when the coordinator stops answering). A resumed
run replays its strategy from the start: steps whose result is journaled return it without running
again, a non-idempotent step that was in flight is reported as failed rather than run twice, and the
rest runs as new.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc

from edgeswarm.agent.journal import Journal
from edgeswarm.agent.run_client import FINISHED, RunFollower, RunLocation, RunLostError
from edgeswarm.agent.runtime import RunSpec, run_agent
from edgeswarm.agent.scheduler import StepScheduler
from edgeswarm.agent.steps import Step, StepOutcome
from edgeswarm.proto import tasks_pb2 as pb
from edgeswarm.proto import tasks_pb2_grpc as pb_grpc
from edgeswarm.protocol.constants import RUN_CONTROL_TIMEOUT, RUN_START_TIMEOUT
from edgeswarm.protocol.memory_access import READ, WRITE, check_access

logger = logging.getLogger(__name__)

EVENT_VALUE_CHARS = 2000  # step values are cut to this in events (the journal keeps them whole)
MISSES_BEFORE_TAKEOVER = 2


class RunCancelled(Exception):
    """The run was cancelled; raised at its next step."""


class UnknownRunError(KeyError):
    """No run of that id is journaled here."""


@dataclass
class _ActiveRun:
    thread: threading.Thread
    cancelled: threading.Event = field(default_factory=threading.Event)
    backup: str = ""
    backup_address: str = ""
    children: list[RunFollower] = field(default_factory=list)


@dataclass
class _Replica:
    """A run this node holds a copy of, and how often its coordinator failed to answer."""

    coordinator: str
    misses: int = 0


class RunCoordinator:
    """Runs agent runs on this node. `tool_catalog()` maps every tool the swarm hosts to its description,
    parameters and idempotency (from the nodes' capability records)."""

    def __init__(
        self,
        node_id: str,
        address: str,
        journal: Journal,
        scheduler: StepScheduler,
        tool_catalog: Callable[[], dict[str, dict]],
        watch_period: float = 2.0,
    ):
        self.node_id, self.address = node_id, address
        self.journal = journal
        self.scheduler = scheduler
        self.tool_catalog = tool_catalog
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._active: dict[str, _ActiveRun] = {}
        self._replicas: dict[str, _Replica] = {}
        self._resumed_seq: dict[str, int] = {}  # run id -> seq of its "run.resumed" event here
        self._stopped = threading.Event()
        self.watch_period = watch_period
        threading.Thread(target=self._watch_replicas, name="run-watchdog", daemon=True).start()

    # --- runs ------------------------------------------------------------------------------------

    def start(self, run_id: str, spec: RunSpec) -> pb.RunReply:
        """Starts a run here; a run id this node already knows is re-attached, not started again."""
        try:
            self.journal.get_run(run_id)
            return self.info(run_id)
        except KeyError:
            pass
        missing = sorted(set(spec.tools or ()) - set(self.tool_catalog()) - {"memory_search"})
        if missing:
            raise ValueError(f"no node of the swarm hosts the tools {missing}")
        if spec.memory_namespace is not None:
            self._check_memory_access(spec)
        self.journal.create_run(run_id, spec.goal, spec.to_dict())
        self.emit(run_id, {"type": "run.started", "node": self.node_id, "goal": spec.goal, "strategy": spec.strategy})
        self._launch(run_id, spec, exclude_backup=set())
        return self.info(run_id)

    def _check_memory_access(self, spec: RunSpec) -> None:
        """Refuses (MemoryAccessError) a run whose token would not let this node, which sends the run's
        memory steps, read its namespace (and write it, if the run remembers its answer)."""
        store = self.scheduler.storage_id(spec.memory_owner, spec.memory_namespace)
        for right in (READ, WRITE) if spec.remember else (READ,):
            check_access(spec.memory_access, spec.memory_owner, store, right, caller=self.node_id)

    def resume(self, run_id: str) -> pb.RunReply:
        """Takes over a run from its journal copy here (a no-op if it runs here or has finished)."""
        run = self._run(run_id)
        with self._lock:
            replica = self._replicas.pop(run_id, None)
            running_here = run_id in self._active
        if run.status == "running" and not running_here:
            reused = len(self.journal.succeeded_steps(run_id))
            seq = self.emit(run_id, {"type": "run.resumed", "node": self.node_id, "journaled_steps": reused})
            with self._lock:
                self._resumed_seq[run_id] = seq
            logger.info("resuming run %s from its journal (%d steps done)", run_id, reused)
            dead = {replica.coordinator} if replica else set()
            self._launch(run_id, RunSpec.from_dict(run.spec), exclude_backup=dead)
        return self.info(run_id)

    def cancel(self, run_id: str) -> pb.RunReply:
        self._run(run_id)
        with self._lock:
            active = self._active.get(run_id)
        if active is not None:
            active.cancelled.set()
            self.scheduler.cancel_run(run_id)
            for child in list(active.children):
                try:
                    child.cancel()
                except grpc.RpcError:
                    pass  # the child's coordinator is gone; the child ends with it
        return self.info(run_id)

    def is_cancelled(self, run_id: str) -> bool:
        with self._lock:
            active = self._active.get(run_id)
        return active is not None and active.cancelled.is_set()

    def info(self, run_id: str) -> pb.RunReply:
        run = self._run(run_id)
        with self._lock:
            active = self._active.get(run_id)
            replica = self._replicas.get(run_id)
        coordinator, address = self.node_id, self.address
        if active is None and replica is not None:  # a copy: the run is coordinated elsewhere
            coordinator, address = replica.coordinator, self._address_of(replica.coordinator)
        return pb.RunReply(
            run_id=run_id,
            status=run.status,
            result_json=json.dumps(run.result) if run.result is not None else "",
            coordinator=coordinator,
            coordinator_address=address,
            backup=active.backup if active else "",
            backup_address=active.backup_address if active else "",
            resumed_seq=self._resumed_seq.get(run_id, 0),
        )

    def watch(self, run_id: str, after_seq: int, is_active: Callable[[], bool]) -> Iterator[tuple[int, dict]]:
        """The run's events after `after_seq`, then new ones, until "run.finished" or the watcher leaves."""
        self._run(run_id)
        while is_active():
            events = self.journal.events(run_id, after_seq)
            for seq, event in events:
                after_seq = seq
                yield seq, event
                if event.get("type") == FINISHED:
                    return
            with self._changed:
                if not events:
                    self._changed.wait(timeout=1.0)

    def emit(self, run_id: str, event: dict) -> int:
        seq = self.journal.append_event(run_id, event)
        with self._changed:
            self._changed.notify_all()
        return seq

    def _run(self, run_id: str):
        try:
            return self.journal.get_run(run_id)
        except KeyError:
            raise UnknownRunError(f"no run {run_id!r} on node {self.node_id}") from None

    def _launch(self, run_id: str, spec: RunSpec, exclude_backup: set[str]) -> None:
        active = _ActiveRun(thread=threading.Thread(target=self._execute, args=(run_id, spec), name=f"run-{run_id[:8]}", daemon=True))
        with self._lock:
            self._active[run_id] = active
        self._choose_backup(run_id, active, exclude_backup)
        active.thread.start()

    def _execute(self, run_id: str, spec: RunSpec) -> None:
        context = _JournaledRun(self, run_id, spec)
        try:
            result, status = run_agent(context), "succeeded"
        except RunCancelled:
            result, status = {"answer": None, "error": "cancelled"}, "cancelled"
        except Exception as error:  # a failed run ends as "failed" with the reason; the node serves on
            logger.warning("run %s failed: %s", run_id, error, exc_info=not isinstance(error, (ValueError, RuntimeError)))
            result, status = {"answer": None, "error": str(error)}, "failed"
        self.journal.finish_run(run_id, status, result)
        self.emit(run_id, {"type": FINISHED, "status": status, "answer": result.get("answer"), "error": result.get("error")})
        self.replicate(run_id)
        self.scheduler.forget_run(run_id)
        with self._lock:
            self._active.pop(run_id, None)

    # --- the journal copy on a backup node -------------------------------------------------------

    def _choose_backup(self, run_id: str, active: _ActiveRun, exclude: set[str]) -> bool:
        """Picks the best other coordinator (`StepScheduler.place_run`), sends it the journal, announces it."""
        for node in self.scheduler.place_run(exclude={self.node_id, *exclude}):
            if self._push(run_id, node.address, node.node_id):
                active.backup, active.backup_address = node.node_id, node.address
                self.emit(run_id, {"type": "run.backup", "node": node.node_id, "address": node.address})
                return True
            self.scheduler.ban(node.node_id)
        logger.warning("run %s has no backup node: it cannot survive this node", run_id)
        active.backup, active.backup_address = "", ""
        return False

    def replicate(self, run_id: str) -> None:
        """Sends the run's journal to its backup; finds another backup if that one is gone."""
        with self._lock:
            active = self._active.get(run_id)
        if active is None:
            return
        if not (active.backup_address and self._push(run_id, active.backup_address, active.backup)):
            self._choose_backup(run_id, active, exclude={active.backup} if active.backup else set())

    def _push(self, run_id: str, address: str, node_id: str) -> bool:
        export = json.dumps(self.journal.export_run(run_id))
        request = pb.RunJournal(run_id=run_id, export_json=export, coordinator=self.node_id)
        try:
            pb_grpc.TaskServiceStub(self.scheduler.channel(address, node_id)).ReplicateRun(request, timeout=RUN_CONTROL_TIMEOUT)
            return True
        except grpc.RpcError as error:
            logger.info("could not copy run %s to %s: %s", run_id, address, error.details())
            return False

    def accept_replica(self, run_id: str, export: dict, coordinator: str) -> None:
        """Stores a coordinator's copy of a run (newer step and event records win)."""
        if export.get("run", {}).get("run_id") != run_id:
            raise ValueError("the journal copy is of another run")
        with self._lock:
            if run_id in self._active:
                raise ValueError(f"run {run_id} is coordinated by this node")
        self.journal.import_run(export)
        with self._lock:
            replica = self._replicas.setdefault(run_id, _Replica(coordinator))
            replica.coordinator, replica.misses = coordinator, 0
        with self._changed:
            self._changed.notify_all()

    def _watch_replicas(self) -> None:
        """Resumes the runs whose copy is here when their coordinator stops answering."""
        while not self._stopped.wait(self.watch_period):
            with self._lock:
                replicas = list(self._replicas.items())
            for run_id, replica in replicas:
                try:
                    if self.journal.get_run(run_id).status != "running":
                        with self._lock:
                            self._replicas.pop(run_id, None)
                        continue
                    replica.misses = 0 if self._answers(replica.coordinator) else replica.misses + 1
                    if replica.misses >= MISSES_BEFORE_TAKEOVER:
                        self.resume(run_id)
                except Exception:  # one run's trouble must not stop the watch over the others
                    logger.exception("watching run %s failed", run_id)

    def _answers(self, node_id: str) -> bool:
        address = self._address_of(node_id)
        if not address:
            return False
        try:
            grpc.channel_ready_future(self.scheduler.channel(address, node_id)).result(timeout=self.watch_period)
            return True
        except grpc.FutureTimeoutError:
            return False

    def _address_of(self, node_id: str) -> str:
        return next((n.address for n in self.scheduler.nodes() if n.node_id == node_id), "")

    # --- sub-agents ------------------------------------------------------------------------------

    def run_subagent(self, parent: _JournaledRun, step: Step, on_dispatch: Callable[[str, int], None], attempt: int) -> StepOutcome:
        """Runs a child run on another coordinator (this one if no other can) and waits for its answer."""
        child_id = f"{parent.run_id}.{step.step_id}"
        tried: list[str] = []
        while len(tried) < self.scheduler.max_attempts:
            candidates = self.scheduler.place_run(exclude=set(tried), asking=self.node_id)
            if not candidates:
                break
            node = candidates[0]
            tried.append(node.node_id)
            on_dispatch(node.node_id, attempt)
            attempt += 1
            with self.scheduler.occupy(parent.run_id, node.node_id):
                try:
                    stub = pb_grpc.TaskServiceStub(self.scheduler.channel(node.address, node.node_id))
                    reply = stub.StartRun(pb.RunRequest(run_id=child_id, spec_json=json.dumps(step.args)), timeout=RUN_START_TIMEOUT)
                except grpc.RpcError as error:
                    if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                        return StepOutcome(ok=False, error=error.details(), node_id=node.node_id, tried=tried)
                    self.scheduler.ban(node.node_id)
                    continue
                return self._follow_child(parent, step, RunFollower(RunLocation.from_reply(reply), self.scheduler.channel), tried)
        return StepOutcome(ok=False, error=f"no node could coordinate sub-agent {step.step_id} (tried {tried})", tried=tried)

    def _follow_child(self, parent: _JournaledRun, step: Step, follower: RunFollower, tried: list[str]) -> StepOutcome:
        with self._lock:
            active = self._active.get(parent.run_id)
        if active is not None:
            active.children.append(follower)
        final: dict = {}
        try:
            for event in follower.events():
                if event.get("type") in ("step.started", "step.finished", "answer", "run.resumed"):
                    parent.emit({"type": "subagent", "step_id": step.step_id, "run_id": follower.location.run_id, "event": event})
                if event.get("type") == FINISHED:
                    final = event
        except RunLostError as error:
            return StepOutcome(ok=False, error=str(error), node_id=follower.location.coordinator, tried=tried)
        finally:
            if active is not None:
                active.children.remove(follower)
        value = {"answer": final.get("answer"), "run_id": follower.location.run_id, "node": follower.location.coordinator}
        ok = final.get("status") == "succeeded"
        return StepOutcome(ok=ok, value=value, error=None if ok else final.get("error"), node_id=follower.location.coordinator, tried=tried)

    def close(self) -> None:
        """Stops watching replicas. Runs coordinated here are not cancelled: their backups take them over."""
        self._stopped.set()


class _JournaledRun:
    """A run's `RunContext`: every step is journaled, placed by the scheduler, replayed on resume."""

    def __init__(self, coordinator: RunCoordinator, run_id: str, spec: RunSpec):
        self.coordinator, self.run_id, self.spec = coordinator, run_id, spec
        self.journal = coordinator.journal

    def emit(self, event: dict) -> None:
        self.coordinator.emit(self.run_id, event)

    def tool_schemas(self) -> list[dict]:
        catalog = self.coordinator.tool_catalog()
        names = [name for name in (self.spec.tools if self.spec.tools is not None else sorted(catalog)) if name in catalog]
        return [
            {"type": "function", "function": {"name": name, "description": catalog[name]["description"], "parameters": catalog[name]["parameters"]}}
            for name in names
        ]

    def tool_is_idempotent(self, name: str) -> bool:
        return bool(self.coordinator.tool_catalog().get(name, {}).get("idempotent", False))

    def step(self, step: Step) -> StepOutcome:
        if self.coordinator.is_cancelled(self.run_id):
            raise RunCancelled()
        replayed = self._replayed(step)
        if replayed is not None:
            return replayed
        first_attempt = self.journal.next_attempt(self.run_id, step.step_id)
        state: dict = {"attempt": None, "error": None}

        def on_dispatch(node_id: str, attempt: int) -> None:
            if state["attempt"] is not None:  # the previous node failed this step
                self.journal.record_step_finished(self.run_id, step.step_id, state["attempt"], False, error=state["error"])
            self.journal.record_step_started(self.run_id, step.step_id, step.kind, node_id, attempt, inputs=step.args)
            state["attempt"], state["error"] = attempt, None
            self.emit({"type": "step.started", "step_id": step.step_id, "kind": step.kind, "tool": step.tool, "node": node_id, "attempt": attempt})
            self.coordinator.replicate(self.run_id)  # the backup must know the step may be running

        def on_failure(node_id: str, attempt: int, why: str) -> None:
            state["error"] = why
            self.emit({"type": "step.retry", "step_id": step.step_id, "node": node_id, "error": why})

        def on_text(text: str) -> None:
            self.emit({"type": "token", "step_id": step.step_id, "text": text})

        scheduler = self.coordinator.scheduler
        if step.kind == "subagent":
            outcome = self.coordinator.run_subagent(self, step, on_dispatch, first_attempt)
        elif step.kind.startswith("memory."):  # sent to several replicas at once: journaled as one attempt
            on_dispatch("replicas", first_attempt)
            outcome = scheduler.run(self.run_id, step, first_attempt)
        else:
            outcome = scheduler.run(self.run_id, step, first_attempt, on_text, on_dispatch, on_failure)
        if state["attempt"] is None:  # no node could take it
            self.journal.record_step_started(self.run_id, step.step_id, step.kind, None, first_attempt, inputs=step.args)
            state["attempt"] = first_attempt
        self.journal.record_step_finished(self.run_id, step.step_id, state["attempt"], outcome.ok, result=outcome.to_dict(), error=outcome.error)
        self._emit_finished(step, outcome)
        self.coordinator.replicate(self.run_id)
        return outcome

    def _replayed(self, step: Step) -> StepOutcome | None:
        """The journaled outcome of a step this run already took (None if it must run now)."""
        attempts = self.journal.step_attempts(self.run_id, step.step_id)
        if not attempts:
            return None
        last = attempts[-1]
        done = next((a for a in attempts if a.status == "succeeded"), last if last.status == "failed" else None)
        if done is not None and isinstance(done.result, dict):
            outcome = StepOutcome.from_dict(done.result)
            self.emit({"type": "step.reused", "step_id": step.step_id, "kind": step.kind, "node": outcome.node_id, "ok": outcome.ok})
            return outcome
        if last.status == "started" and not step.idempotent:
            error = (
                f"{step.describe()} was running on {last.node_id} when the run's coordinator died; it is not "
                "idempotent, so it is not run again (it may or may not have taken effect)"
            )
            outcome = StepOutcome(ok=False, error=error, node_id=last.node_id or "")
            self.journal.record_step_finished(self.run_id, step.step_id, last.attempt, False, result=outcome.to_dict(), error=error)
            self._emit_finished(step, outcome)
            return outcome
        return None  # in flight when the coordinator died, and safe to run again

    def _emit_finished(self, step: Step, outcome: StepOutcome) -> None:
        value = outcome.value
        if value is not None and len(json.dumps(value)) > EVENT_VALUE_CHARS:
            value = json.dumps(value)[:EVENT_VALUE_CHARS] + "..."
        self.emit(
            {
                "type": "step.finished",
                "step_id": step.step_id,
                "kind": step.kind,
                "tool": step.tool,
                "node": outcome.node_id,
                "ok": outcome.ok,
                "value": value,
                "error": outcome.error,
                "seconds": round(outcome.seconds, 3),
            }
        )
