"""The journal of agent runs: lifecycle, resume after a coordinator restart, replication, concurrency."""

from __future__ import annotations

import json
import sqlite3
import threading

import pytest

from edgeswarm.agent.journal import Journal, JournalClosedError

SPEC = {"steps": [{"id": "search", "kind": "tool"}, {"id": "summarise", "kind": "llm"}], "budget": 3}


@pytest.fixture
def journal(tmp_path):
    with Journal(str(tmp_path / "journal.sqlite")) as journal:
        yield journal


def half_done_run(journal: Journal, run_id: str = "run-1") -> None:
    """A run whose coordinator died: one step succeeded, one failed then was retried, one in flight."""
    journal.create_run(run_id, "summarise the news", SPEC)
    journal.record_step_started(run_id, "search", "tool", "node-a", 0, {"query": "news"})
    journal.record_step_finished(run_id, "search", 0, ok=True, result={"hits": ["a", "b"]})
    journal.record_step_started(run_id, "fetch", "tool", "node-b", 0, {"url": "http://x"})
    journal.record_step_finished(run_id, "fetch", 0, ok=False, error="timeout")
    journal.record_step_started(run_id, "fetch", "tool", "node-c", 1, {"url": "http://x"})
    journal.record_step_started(run_id, "summarise", "llm", "node-a", 0, {"text": "..."})
    for event in ({"type": "step", "step": "search"}, {"type": "retry", "step": "fetch"}, {"type": "token", "text": "é✓"}):
        journal.append_event(run_id, event)


def test_run_lifecycle(journal):
    created = journal.create_run("run-1", "goal", SPEC)
    assert created.status == "running" and journal.get_run("run-1").spec == SPEC
    assert [run.run_id for run in journal.unfinished_runs()] == ["run-1"]
    journal.record_step_started("run-1", "search", "tool", "node-a", 0, {"q": 1})
    journal.record_step_finished("run-1", "search", 0, ok=True, result=[1, "two", None, 3.5])
    (step,) = journal.step_attempts("run-1", "search")
    assert (step.status, step.node_id, step.inputs, step.result) == ("succeeded", "node-a", {"q": 1}, [1, "two", None, 3.5])
    assert step.finished >= step.started
    journal.finish_run("run-1", "succeeded", {"answer": 42})
    run = journal.get_run("run-1")
    assert (run.status, run.result) == ("succeeded", {"answer": 42}) and run.updated >= run.created
    assert journal.unfinished_runs() == []
    journal.finish_run("run-1", "succeeded", {"answer": 42})  # idempotent
    with pytest.raises(ValueError, match="already finished"):
        journal.finish_run("run-1", "failed", None)


def test_resume_after_restart_sees_succeeded_and_in_flight_steps(tmp_path):
    path = str(tmp_path / "journal.sqlite")
    with Journal(path) as journal:
        half_done_run(journal)
    with Journal(path) as journal:  # the coordinator restarted
        assert [run.run_id for run in journal.unfinished_runs()] == ["run-1"]
        assert journal.succeeded_steps("run-1") == {"search": {"hits": ["a", "b"]}}
        in_flight = {(s.step_id, s.attempt, s.node_id) for s in journal.started_but_unfinished("run-1")}
        assert in_flight == {("fetch", 1, "node-c"), ("summarise", 0, "node-a")}
        assert [(s.attempt, s.status, s.error) for s in journal.step_attempts("run-1", "fetch")] == \
               [(0, "failed", "timeout"), (1, "started", None)]
        assert journal.next_attempt("run-1", "fetch") == 2 and journal.next_attempt("run-1", "new") == 0
        journal.record_step_started("run-1", "fetch", "tool", "node-a", 2, {"url": "http://x"})
        journal.record_step_finished("run-1", "fetch", 2, ok=True, result="page")
        assert journal.succeeded_steps("run-1") == {"search": {"hits": ["a", "b"]}, "fetch": "page"}
        assert [s.step_id for s in journal.started_but_unfinished("run-1")] == ["summarise"]


def test_step_records_are_idempotent_and_consistent(journal):
    journal.create_run("r", "goal", {})
    journal.record_step_started("r", "s", "tool", "n1", 0, None)
    journal.record_step_started("r", "s", "tool", "n1", 0, None)  # re-sent: no-op
    journal.record_step_finished("r", "s", 0, ok=True, result={"x": 1})
    journal.record_step_finished("r", "s", 0, ok=True, result={"x": 1})  # re-sent: no-op
    assert len(journal.step_attempts("r", "s")) == 1
    with pytest.raises(ValueError, match="already succeeded"):
        journal.record_step_finished("r", "s", 0, ok=False, error="late failure")
    with pytest.raises(ValueError, match="already succeeded"):
        journal.record_step_started("r", "s", "tool", "n2", 0, None)
    with pytest.raises(KeyError, match="never started"):
        journal.record_step_finished("r", "other", 0, ok=True)


def test_events_can_be_reread_from_any_sequence_number(journal):
    journal.create_run("r", "goal", {})
    seqs = [journal.append_event("r", {"i": i}) for i in range(5)]
    assert seqs == [0, 1, 2, 3, 4]
    assert journal.events("r") == [(i, {"i": i}) for i in range(5)]
    assert journal.events("r", after_seq=2) == [(3, {"i": 3}), (4, {"i": 4})]
    assert journal.events("r", after_seq=0, limit=2) == [(1, {"i": 1}), (2, {"i": 2})]
    assert journal.events("r", after_seq=4) == []


def test_a_replicated_journal_can_resume_the_run(tmp_path, journal):
    half_done_run(journal)
    data = json.loads(json.dumps(journal.export_run("run-1")))  # what goes over the wire
    with Journal(str(tmp_path / "replica.sqlite")) as replica:
        replica.import_run(data)
        replica.import_run(data)  # idempotent
        assert replica.get_run("run-1") == journal.get_run("run-1")
        assert replica.succeeded_steps("run-1") == journal.succeeded_steps("run-1")
        assert replica.started_but_unfinished("run-1") == journal.started_but_unfinished("run-1")
        assert replica.events("run-1") == journal.events("run-1")
        assert replica.export_run("run-1") == data
        # The replica takes over: retries the in-flight step and carries on the event stream.
        attempt = replica.next_attempt("run-1", "summarise")
        replica.record_step_started("run-1", "summarise", "llm", "node-b", attempt, {"text": "..."})
        replica.record_step_finished("run-1", "summarise", attempt, ok=True, result="summary")
        assert replica.append_event("run-1", {"type": "done"}) == 3


def test_an_older_copy_never_overwrites_newer_results(tmp_path, journal):
    half_done_run(journal)
    old = journal.export_run("run-1")
    journal.record_step_finished("run-1", "summarise", 0, ok=True, result="summary")
    journal.append_event("run-1", {"type": "done"})
    journal.finish_run("run-1", "succeeded", "summary")
    new = journal.export_run("run-1")
    for order in ([new, old], [old, new]):
        with Journal(str(tmp_path / f"replica-{len(order)}-{order[0] is old}.sqlite")) as replica:
            for data in order:
                replica.import_run(data)
            assert replica.succeeded_steps("run-1")["summarise"] == "summary"
            assert replica.get_run("run-1").status == "succeeded"
            assert replica.unfinished_runs() == []
            assert len(replica.events("run-1")) == 4
            assert replica.export_run("run-1") == new


def test_threads_appending_events_get_unique_increasing_seqs(journal):
    journal.create_run("r", "goal", {})
    per_thread: dict[int, list[int]] = {}

    def append(worker: int) -> None:
        per_thread[worker] = [journal.append_event("r", {"worker": worker, "i": i}) for i in range(50)]

    threads = [threading.Thread(target=append, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    all_seqs = sorted(seq for seqs in per_thread.values() for seq in seqs)
    assert all_seqs == list(range(400))
    assert all(seqs == sorted(seqs) for seqs in per_thread.values())
    events = journal.events("r")
    assert [seq for seq, _ in events] == list(range(400))
    for worker, seqs in per_thread.items():
        assert [events[seq][1] for seq in seqs] == [{"worker": worker, "i": i} for i in range(50)]


def test_journal_uses_wal_mode(tmp_path):
    path = str(tmp_path / "wal.sqlite")
    Journal(path).close()
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_json_values_must_round_trip(journal):
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        journal.create_run("r", "goal", {"x": float("nan")})
    journal.create_run("r", "goal", {"nested": {"list": [1, 2.5, "three", None, True]}, "unicode": "naïve ✓"})
    assert journal.get_run("r").spec == {"nested": {"list": [1, 2.5, "three", None, True]}, "unicode": "naïve ✓"}
    with pytest.raises(ValueError, match="event is not JSON-serialisable"):
        journal.append_event("r", {"a set": {1}})
    journal.record_step_started("r", "s", "tool", "n", 0, None)
    with pytest.raises(ValueError, match="result of step 's'"):
        journal.record_step_finished("r", "s", 0, ok=True, result=object())


def test_errors_are_clear(journal):
    with pytest.raises(KeyError, match="unknown run id 'nope'"):
        journal.get_run("nope")
    with pytest.raises(KeyError, match="unknown run id"):
        journal.append_event("nope", {})
    with pytest.raises(KeyError, match="unknown run id"):
        journal.record_step_started("nope", "s", "tool", "n", 0, None)
    with pytest.raises(KeyError, match="unknown run id"):
        journal.succeeded_steps("nope")
    journal.create_run("r", "goal", {})
    with pytest.raises(ValueError, match="already exists"):
        journal.create_run("r", "goal", {})
    with pytest.raises(ValueError, match="finishes as one of"):
        journal.finish_run("r", "running")
    with pytest.raises(ValueError, match="malformed"):
        journal.import_run({"version": 1, "run": {"run_id": "x"}, "steps": [], "events": []})
    journal.close()
    with pytest.raises(JournalClosedError, match="closed"):
        journal.get_run("r")
    journal.close()  # closing twice is fine
