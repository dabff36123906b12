"""Starting a DHT peer when hivemind's result pipe is blocked: the hung start says where it hangs, is
killed, and the next attempt works. Real hivemind DHT processes; the lock of hivemind's result pipe is
taken by this test, as a DHT process killed while writing to the pipe leaves it."""

import pytest
from hivemind.utils import MPFuture

from edgeswarm.swarm import dht as swarm_dht

pytestmark = pytest.mark.slow


@pytest.fixture
def short_start(monkeypatch):
    """DHT starts that give up after a few seconds, so that a hang is found quickly."""
    monkeypatch.setattr(swarm_dht, "DHT_START_TIMEOUT", 10.0)
    monkeypatch.setattr(swarm_dht, "RESULT_LOCK_WAIT", 1.0)


def test_a_start_hung_on_a_taken_result_lock_reports_and_succeeds_on_retry(short_start, caplog, capfd):
    lost_lock = MPFuture._update_lock
    assert lost_lock.acquire(timeout=5)  # held for good, as by a process killed while holding it
    try:
        dht = swarm_dht.start_dht([], client_mode=False)
    finally:
        lost_lock.release()
    try:
        assert dht.is_alive()
        assert swarm_dht.visible_maddrs(dht)  # it answers: its results reach this process
    finally:
        dht.shutdown()
    warnings = [record.getMessage() for record in caplog.records]
    assert any("not ready in 10 s (attempt 1 of 3)" in message for message in warnings)
    assert any("resetting its backend" in message for message in warnings)
    assert "_send_update" in capfd.readouterr().err  # the hung process showed where it waits
    assert MPFuture._update_lock is not lost_lock
