"""KVBudget: admission within the budget, refusal beyond it, growth to a session's batch, release, thread safety."""

from __future__ import annotations

import threading

import pytest

from edgeswarm.node.kv_budget import BusyError, KVBudget


def make_budget(budget_tokens: int = 100, bytes_per_token: int = 10) -> KVBudget:
    return KVBudget(budget_tokens * bytes_per_token, bytes_per_token)


def test_admits_up_to_the_budget_exactly():
    budget = make_budget()
    first = budget.admit("a", 60)
    second = budget.admit("b", 40)
    assert (first.nbytes, second.nbytes) == (600, 400)
    assert budget.used_bytes == 1000
    assert budget.free_bytes == 0
    assert budget.sessions == 2


def test_refuses_beyond_the_budget_with_a_clear_message():
    budget = make_budget()
    budget.admit("a", 90)
    with pytest.raises(BusyError) as refused:
        budget.admit("b", 20)
    message = str(refused.value)
    assert "'b'" in message
    assert "asks 200 bytes" in message
    assert "900 bytes is used by 1 session" in message
    assert "1000 bytes budget" in message
    assert budget.used_bytes == 900 and budget.sessions == 1  # a refusal reserves nothing


def test_batch_sessions_reserve_per_sequence():
    budget = make_budget()
    assert budget.admit("batch", 25, batch_size=4).nbytes == 1000
    with pytest.raises(BusyError):
        budget.admit("one-more", 1)


def test_release_frees_room_and_is_idempotent():
    budget = make_budget()
    budget.admit("a", 100)
    with pytest.raises(BusyError):
        budget.admit("b", 1)
    assert budget.release("a").nbytes == 1000
    assert budget.release("a") is None
    assert budget.release("never-admitted") is None
    assert budget.used_bytes == 0
    budget.admit("b", 100)
    assert budget.sessions == 1


def test_a_session_id_cannot_be_admitted_twice():
    budget = make_budget()
    budget.admit("a", 10)
    with pytest.raises(ValueError, match="already holds"):
        budget.admit("a", 10)
    assert budget.used_bytes == 100


def test_invalid_arguments_are_refused():
    with pytest.raises(ValueError):
        KVBudget(100, 0)
    with pytest.raises(ValueError):
        make_budget().admit("a", 0)


def test_a_session_grows_to_its_batch_or_is_refused_keeping_what_it_held():
    budget = make_budget()  # 1000 bytes
    assert budget.admit("a", 20, blocks=2).nbytes == 400  # one sequence of 20 tokens through 2 blocks
    assert budget.grow("a", 1).nbytes == 400  # nothing to grow
    assert budget.grow("a", 2).nbytes == 800
    assert budget.used_bytes == 800
    budget.admit("b", 10)
    with pytest.raises(BusyError) as refused:  # 3 sequences need 1200 bytes; 100 are free
        budget.grow("a", 3)
    assert "asks 1200 bytes (3 x 40 token-blocks x 10 bytes) (it holds 800 bytes)" in str(refused.value)
    assert budget.reservation("a").batch_size == 2 and budget.used_bytes == 900  # a refusal changes nothing
    assert budget.grow("a", 2).nbytes == 800  # a later step of the same batch still runs
    assert budget.release("a").nbytes == 800
    assert budget.used_bytes == 100
    with pytest.raises(KeyError):
        budget.grow("a", 1)


def test_a_huge_batch_never_reserves_beyond_the_budget():
    budget = make_budget()
    budget.admit("flood", 100)  # the whole budget, for one sequence
    with pytest.raises(BusyError):
        budget.grow("flood", 48)
    assert budget.used_bytes == budget.budget_bytes == 1000


def test_many_admit_release_cycles_leave_nothing_used():
    budget = make_budget()
    for index in range(200):
        budget.admit(f"s{index}", 1 + index % 100)
        budget.release(f"s{index}")
    assert budget.used_bytes == 0
    assert budget.sessions == 0


def test_concurrent_admits_never_over_commit():
    budget = KVBudget(budget_bytes=50 * 7, bytes_per_token=7)  # room for 50 sessions of 1 token
    start = threading.Barrier(16)
    admitted: list[str] = []
    refused: list[str] = []
    peak = [0]
    record = threading.Lock()

    def worker(thread: int) -> None:
        start.wait(timeout=10)
        for index in range(20):
            session_id = f"t{thread}-{index}"
            try:
                budget.admit(session_id, 1)
            except BusyError:
                with record:
                    refused.append(session_id)
                continue
            with record:
                admitted.append(session_id)
                peak[0] = max(peak[0], budget.used_bytes)
            if index % 3 == 0:
                budget.release(session_id)

    threads = [threading.Thread(target=worker, args=(thread,)) for thread in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    assert len(admitted) + len(refused) == 16 * 20
    assert refused, "the budget should have run out"
    assert peak[0] <= budget.budget_bytes
    held = [sid for sid in admitted if int(sid.rsplit("-", 1)[1]) % 3 != 0]
    assert budget.sessions == len(held) <= 50
    assert budget.used_bytes == 7 * len(held)


def test_a_session_reserves_room_in_every_block_it_runs_through():
    budget = KVBudget(budget_bytes=10_000, bytes_per_token=10)
    assert budget.admit("s", max_length=100, blocks=3).nbytes == 3_000
    with pytest.raises(BusyError, match="token-blocks"):
        budget.admit("t", max_length=100, blocks=8)
