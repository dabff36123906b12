"""`swarm-node join` refuses bad arguments with a clear message and exit code 2, without hanging."""

import subprocess
import sys

import pytest

DEAD_PEER = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWCNNaFmPVdm3z1HQ5GfUo7QN21nXsHSr9nqna6cdsi1hq"


def join(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "node.cli", "join", "--host", "127.0.0.1", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/nowhere/model.gguf"], "no model at /nowhere/model.gguf"),
        (["--blocks", "25:40"], "blocks 25:40 are outside the model, which has blocks 0:30"),
        (["--num-blocks", "31"], "--num-blocks must be in [1, 30]"),
        (["--blocks", "0:10", "--initial-peers", DEAD_PEER], "cannot join the swarm through"),
    ],
)
def test_bad_join_arguments_exit_with_a_clear_error(args, message):
    finished = join(*args)
    assert finished.returncode == 2, finished.stderr[-2000:]
    assert message in finished.stderr


def test_malformed_span_is_an_argument_error():
    finished = join("--blocks", "ten:twenty")
    assert finished.returncode == 2
    assert "expected START:END" in finished.stderr
