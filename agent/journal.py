"""The persistent journal of agent runs, kept by the coordinating node in SQLite.

It records each run (goal, spec, status, result), every attempt of every step (who ran it, its
inputs, its result or error) and the run's event stream, numbered so a client can re-read it
from any sequence number. A coordinator that restarts reads back what already succeeded
(``succeeded_steps``) and what was in flight when it died (``started_but_unfinished``).

``export_run``/``import_run`` copy a run to another journal; the merge is idempotent and an
older copy never overwrites a newer step result, so a replica can take over a run.

One connection (``check_same_thread=False``) guarded by a lock; WAL mode for file journals.
All JSON values must round-trip through ``json`` (no NaN, no non-JSON types).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

RUN_STATUSES = ("running", "succeeded", "failed", "cancelled")
FINAL_RUN_STATUSES = ("succeeded", "failed", "cancelled")
STEP_STATUSES = ("started", "succeeded", "failed")
EXPORT_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    goal TEXT NOT NULL,
    spec TEXT NOT NULL,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    result TEXT
);
CREATE TABLE IF NOT EXISTS steps (
    run_id TEXT NOT NULL REFERENCES runs (run_id),
    step_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    node_id TEXT,
    inputs TEXT,
    result TEXT,
    error TEXT,
    started REAL NOT NULL,
    finished REAL,
    PRIMARY KEY (run_id, step_id, attempt)
);
CREATE TABLE IF NOT EXISTS events (
    run_id TEXT NOT NULL REFERENCES runs (run_id),
    seq INTEGER NOT NULL,
    event TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
);
CREATE INDEX IF NOT EXISTS runs_by_status ON runs (status, created);
"""


class JournalClosedError(RuntimeError):
    """The journal was closed."""


@dataclass(frozen=True)
class RunRecord:
    """A run as journaled."""

    run_id: str
    goal: str
    spec: Any
    status: str
    created: float
    updated: float
    result: Any = None


@dataclass(frozen=True)
class StepRecord:
    """One attempt of one step of a run."""

    run_id: str
    step_id: str
    attempt: int
    kind: str
    status: str
    node_id: str | None
    inputs: Any
    result: Any
    error: str | None
    started: float
    finished: float | None


_RUN_COLUMNS = "run_id, goal, spec, status, created, updated, result"
_STEP_COLUMNS = "run_id, step_id, attempt, kind, status, node_id, inputs, result, error, started, finished"


def _dumps(value: Any, what: str) -> str:
    """JSON text of a value, refusing what would not read back the same (NaN, sets, objects...)."""
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is not JSON-serialisable: {exc}") from exc


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _run_from_row(row: tuple) -> RunRecord:
    run_id, goal, spec, status, created, updated, result = row
    return RunRecord(run_id, goal, _loads(spec), status, created, updated, _loads(result))


def _step_from_row(row: tuple) -> StepRecord:
    run_id, step_id, attempt, kind, status, node_id, inputs, result, error, started, finished = row
    return StepRecord(run_id, step_id, attempt, kind, status, node_id, _loads(inputs), _loads(result), error, started, finished)


class Journal:
    """The journal of agent runs in one SQLite file (``":memory:"`` for a throw-away one); thread-safe."""

    def __init__(self, path: str):
        self.path = str(path)
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = sqlite3.connect(self.path, check_same_thread=False)
        if self.path != ":memory:":
            self._conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a step recorded as succeeded must survive a power cut, or it would run twice.
            self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        with self._conn:
            self._conn.executescript(_SCHEMA)

    # ---- lifecycle

    def close(self) -> None:
        """Close the journal; later calls raise JournalClosedError."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise JournalClosedError(f"journal {self.path} is closed")
        return self._conn

    def _require_run(self, run_id: str) -> RunRecord:
        row = self._db().execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise KeyError(f"unknown run id {run_id!r} in journal {self.path}")
        return _run_from_row(row)

    def _touch(self, run_id: str) -> None:
        self._db().execute("UPDATE runs SET updated = ? WHERE run_id = ?", (time.time(), run_id))

    # ---- runs

    def create_run(self, run_id: str, goal: str, spec: Any) -> RunRecord:
        """Start journaling a new run, status ``running``; ValueError if the id is taken."""
        if not isinstance(run_id, str) or not run_id:
            raise ValueError(f"run id must be a non-empty string, got {run_id!r}")
        spec_json = _dumps(spec, "run spec")
        now = time.time()
        with self._lock, self._db() as conn:
            try:
                conn.execute("INSERT INTO runs (run_id, goal, spec, status, created, updated) VALUES (?, ?, ?, 'running', ?, ?)",
                             (run_id, goal, spec_json, now, now))
            except sqlite3.IntegrityError as exc:
                raise ValueError(f"run {run_id!r} already exists in journal {self.path}") from exc
        return RunRecord(run_id, goal, json.loads(spec_json), "running", now, now)

    def get_run(self, run_id: str) -> RunRecord:
        """The run's record; KeyError if unknown."""
        with self._lock:
            return self._require_run(run_id)

    def finish_run(self, run_id: str, status: str, result: Any = None) -> None:
        """Close a run as succeeded, failed or cancelled, with its result.

        Finishing again with the same status and result is a no-op; with another, ValueError.
        """
        if status not in FINAL_RUN_STATUSES:
            raise ValueError(f"a run finishes as one of {FINAL_RUN_STATUSES}, not {status!r}")
        result_json = _dumps(result, "run result")
        with self._lock, self._db() as conn:
            run = self._require_run(run_id)
            if run.status != "running":
                if run.status == status and run.result == json.loads(result_json):
                    return
                raise ValueError(f"run {run_id!r} already finished as {run.status}")
            conn.execute("UPDATE runs SET status = ?, result = ?, updated = ? WHERE run_id = ?",
                         (status, result_json, time.time(), run_id))

    def unfinished_runs(self) -> list[RunRecord]:
        """Runs still ``running`` (to resume after a coordinator restart), oldest first."""
        with self._lock:
            rows = self._db().execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE status = 'running' ORDER BY created, run_id")
            return [_run_from_row(row) for row in rows]

    def run_ids(self) -> list[str]:
        """Every journaled run id, oldest first."""
        with self._lock:
            return [row[0] for row in self._db().execute("SELECT run_id FROM runs ORDER BY created, run_id")]

    # ---- steps

    def record_step_started(self, run_id: str, step_id: str, kind: str, node_id: str | None, attempt: int,
                            inputs: Any = None) -> None:
        """Record that an attempt of a step was sent to a node.

        Recording the same attempt again while it is in flight is a no-op; once it finished, ValueError.
        """
        if not isinstance(attempt, int) or attempt < 0:
            raise ValueError(f"attempt must be a non-negative int, got {attempt!r}")
        inputs_json = _dumps(inputs, f"inputs of step {step_id!r}")
        with self._lock, self._db() as conn:
            self._require_run(run_id)
            current = self._step(run_id, step_id, attempt)
            if current is not None:
                if current.status != "started":
                    raise ValueError(f"step {step_id!r} attempt {attempt} of run {run_id!r} already {current.status}")
                return
            conn.execute(f"INSERT INTO steps ({_STEP_COLUMNS}) VALUES (?, ?, ?, ?, 'started', ?, ?, NULL, NULL, ?, NULL)",
                         (run_id, step_id, attempt, kind, node_id, inputs_json, time.time()))
            self._touch(run_id)

    def record_step_finished(self, run_id: str, step_id: str, attempt: int, ok: bool, result: Any = None,
                             error: str | None = None) -> None:
        """Record the outcome of a started attempt; KeyError if it was never started.

        Recording the same outcome twice is a no-op; a different outcome for a finished attempt is ValueError.
        """
        status = "succeeded" if ok else "failed"
        result_json = _dumps(result, f"result of step {step_id!r}")
        with self._lock, self._db() as conn:
            self._require_run(run_id)
            current = self._step(run_id, step_id, attempt)
            if current is None:
                raise KeyError(f"step {step_id!r} attempt {attempt} of run {run_id!r} was never started")
            if current.status != "started":
                if (current.status, current.result, current.error) == (status, json.loads(result_json), error):
                    return
                raise ValueError(f"step {step_id!r} attempt {attempt} of run {run_id!r} already {current.status}")
            conn.execute("UPDATE steps SET status = ?, result = ?, error = ?, finished = ? "
                         "WHERE run_id = ? AND step_id = ? AND attempt = ?",
                         (status, result_json, error, time.time(), run_id, step_id, attempt))
            self._touch(run_id)

    def _step(self, run_id: str, step_id: str, attempt: int) -> StepRecord | None:
        row = self._db().execute(f"SELECT {_STEP_COLUMNS} FROM steps WHERE run_id = ? AND step_id = ? AND attempt = ?",
                                 (run_id, step_id, attempt)).fetchone()
        return None if row is None else _step_from_row(row)

    def steps(self, run_id: str) -> list[StepRecord]:
        """Every attempt of every step of a run, in the order they started."""
        with self._lock:
            self._require_run(run_id)
            rows = self._db().execute(f"SELECT {_STEP_COLUMNS} FROM steps WHERE run_id = ? ORDER BY started, step_id, attempt",
                                      (run_id,))
            return [_step_from_row(row) for row in rows]

    def step_attempts(self, run_id: str, step_id: str) -> list[StepRecord]:
        """The attempts of one step, by attempt number."""
        return sorted((s for s in self.steps(run_id) if s.step_id == step_id), key=lambda s: s.attempt)

    def next_attempt(self, run_id: str, step_id: str) -> int:
        """The attempt number to use for the next try of a step (0 for the first)."""
        attempts = self.step_attempts(run_id, step_id)
        return attempts[-1].attempt + 1 if attempts else 0

    def succeeded_steps(self, run_id: str) -> dict[str, Any]:
        """step_id -> result of each step that succeeded: what a resumed run must not run again."""
        return {step.step_id: step.result for step in self._latest_attempts(run_id, status="succeeded")}

    def started_but_unfinished(self, run_id: str) -> list[StepRecord]:
        """Steps whose latest attempt was started and never finished (in flight when the coordinator died).

        Steps that succeeded in any attempt are left out. Whether to re-run the others is the
        runtime's decision, by the step's idempotency.
        """
        done = set(self.succeeded_steps(run_id))
        latest = self._latest_attempts(run_id)
        return [step for step in latest if step.status == "started" and step.step_id not in done]

    def _latest_attempts(self, run_id: str, status: str | None = None) -> list[StepRecord]:
        """The highest-numbered attempt of each step (among those with ``status``, if given)."""
        latest: dict[str, StepRecord] = {}
        for step in self.steps(run_id):
            if status is not None and step.status != status:
                continue
            if step.step_id not in latest or step.attempt > latest[step.step_id].attempt:
                latest[step.step_id] = step
        return list(latest.values())

    # ---- events

    def append_event(self, run_id: str, event: Any) -> int:
        """Append an event to the run's stream and return its sequence number (0, 1, 2...)."""
        event_json = _dumps(event, "event")
        with self._lock, self._db() as conn:
            self._require_run(run_id)
            seq = conn.execute("SELECT COALESCE(MAX(seq) + 1, 0) FROM events WHERE run_id = ?", (run_id,)).fetchone()[0]
            conn.execute("INSERT INTO events (run_id, seq, event) VALUES (?, ?, ?)", (run_id, seq, event_json))
            return seq

    def events(self, run_id: str, after_seq: int = -1, limit: int | None = None) -> list[tuple[int, Any]]:
        """(seq, event) pairs of a run with seq > ``after_seq``, in order."""
        sql = "SELECT seq, event FROM events WHERE run_id = ? AND seq > ? ORDER BY seq"
        params: tuple = (run_id, int(after_seq))
        if limit is not None:
            sql, params = sql + " LIMIT ?", params + (int(limit),)
        with self._lock:
            self._require_run(run_id)
            return [(seq, json.loads(event)) for seq, event in self._db().execute(sql, params)]

    # ---- replication

    def export_run(self, run_id: str) -> dict:
        """Everything journaled about a run, as a JSON-serialisable dict for ``import_run``."""
        with self._lock:
            run = self._require_run(run_id)
            steps = self.steps(run_id)
            events = self.events(run_id)
        return {
            "version": EXPORT_VERSION,
            "run": asdict(run),
            "steps": [asdict(step) for step in steps],
            "events": [{"seq": seq, "event": event} for seq, event in events],
        }

    def import_run(self, data: dict) -> None:
        """Merge a run exported by ``export_run`` (maybe by another journal); idempotent.

        The run row keeps whichever copy was updated last; a step attempt is only replaced when ours is
        still ``started`` and theirs finished, so an older copy never undoes a result; events fill gaps.
        """
        if not isinstance(data, dict) or data.get("version") != EXPORT_VERSION:
            raise ValueError(f"not a journal export of version {EXPORT_VERSION}")
        try:
            run = RunRecord(**data["run"])
            steps = [StepRecord(**step) for step in data["steps"]]
            events = [(int(item["seq"]), _dumps(item["event"], "event")) for item in data["events"]]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed journal export: {exc!r}") from exc
        if any(step.run_id != run.run_id for step in steps):
            raise ValueError(f"journal export of run {run.run_id!r} holds steps of another run")
        with self._lock, self._db() as conn:
            self._merge_run(conn, run)
            for step in steps:
                self._merge_step(conn, step)
            conn.executemany("INSERT OR IGNORE INTO events (run_id, seq, event) VALUES (?, ?, ?)",
                             [(run.run_id, seq, event) for seq, event in events])

    def _merge_run(self, conn: sqlite3.Connection, run: RunRecord) -> None:
        if run.status not in RUN_STATUSES:
            raise ValueError(f"imported run {run.run_id!r} has unknown status {run.status!r}")
        values = (run.goal, _dumps(run.spec, "run spec"), run.status, run.created, run.updated,
                  None if run.result is None else _dumps(run.result, "run result"), run.run_id)
        # A finished run is never reopened by a copy that is still running.
        updated = conn.execute("UPDATE runs SET goal = ?, spec = ?, status = ?, created = ?, updated = ?, result = ? "
                               "WHERE run_id = ? AND updated < ? AND NOT (status != 'running' AND ? = 'running')",
                               values + (run.updated, run.status)).rowcount
        if not updated:
            conn.execute(f"INSERT OR IGNORE INTO runs ({_RUN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (run.run_id,) + values[:-1])

    def _merge_step(self, conn: sqlite3.Connection, step: StepRecord) -> None:
        if step.status not in STEP_STATUSES:
            raise ValueError(f"imported step {step.step_id!r} has unknown status {step.status!r}")
        values = (step.run_id, step.step_id, step.attempt, step.kind, step.status, step.node_id,
                  _dumps(step.inputs, "step inputs"), None if step.result is None else _dumps(step.result, "step result"),
                  step.error, step.started, step.finished)
        current = self._step(step.run_id, step.step_id, step.attempt)
        if current is None:
            conn.execute(f"INSERT INTO steps ({_STEP_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", values)
        elif current.status == "started" and step.status != "started":
            conn.execute("DELETE FROM steps WHERE run_id = ? AND step_id = ? AND attempt = ?",
                         (step.run_id, step.step_id, step.attempt))
            conn.execute(f"INSERT INTO steps ({_STEP_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", values)
