"""`swarm-node join` refuses bad arguments with a clear message and exit code 2, without hanging.

Arguments that are refused before anything starts are checked in this process; a dead initial peer,
which means starting a DHT peer, is checked on a real `swarm-node` process."""

import subprocess
import sys

import pytest

from edgeswarm.node.cli import main

DEAD_PEER = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWCNNaFmPVdm3z1HQ5GfUo7QN21nXsHSr9nqna6cdsi1hq"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/nowhere/model.gguf"], "no model at /nowhere/model.gguf"),
        (["--blocks", "25:40"], "blocks 25:40 are outside the model, which has blocks 0:30"),
        (["--num-blocks", "31"], "--num-blocks must be in [1, 30]"),
        (["--api-tokens", "/nowhere/tokens.json"], "API tokens file /nowhere/tokens.json"),
    ],
)
def test_bad_join_arguments_exit_with_a_clear_error(args, message, capsys):
    assert main(["join", "--host", "127.0.0.1", "--no-mdns", *args]) == 2
    assert message in capsys.readouterr().err


def test_malformed_span_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["join", "--blocks", "ten:twenty"])
    assert exit_.value.code == 2
    assert "expected START:END" in capsys.readouterr().err


def test_a_dead_initial_peer_exits_with_a_clear_error():
    command = [sys.executable, "-m", "edgeswarm.node.cli", "join", "--host", "127.0.0.1", "--blocks", "0:10", "--initial-peers", DEAD_PEER]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 2, finished.stderr[-2000:]
    assert "cannot join the swarm through" in finished.stderr
