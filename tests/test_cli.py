"""`swarm-node join`: its options are the fields of the node's configs (node.config), and it refuses bad
arguments with a clear message and exit code 2, without hanging.

Arguments that are refused before anything starts are checked in this process; a dead initial peer,
which means starting a DHT peer, is checked on a real `swarm-node` process."""

import argparse
import dataclasses
import subprocess
import sys
import types
import typing
from typing import Literal

import pytest

from edgeswarm.node.cli import build_parser, main
from edgeswarm.node.config import (
    API_TOKEN_VARIABLE,
    NodeSettings,
    add_options,
    from_args,
    option,
    parse_allowed_tools,
    parse_fraction,
    parse_span,
)

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


# What to write for an option that has a parser of its own, and the value that gives.
PARSER_SAMPLES = {parse_span: ("3:7", (3, 7)), parse_allowed_tools: ("python", ("python",)), parse_fraction: ("0.5", 0.5)}
OPTIONS = [
    (group.name, item, typing.get_type_hints(group.default_factory)[item.name])
    for group in dataclasses.fields(NodeSettings)
    for item in dataclasses.fields(group.default_factory)
]


def _sample(item: dataclasses.Field, hint: object) -> tuple[list[str], object]:
    """The words after a field's flag on a command line, and the value they give (never the field's default)."""
    given = item.metadata["argparse"]
    kind = hint
    if typing.get_origin(hint) is types.UnionType:  # X | None
        (kind,) = (member for member in typing.get_args(hint) if member is not type(None))
    if isinstance(item.default, bool):
        return [], not item.default
    if "type" in given:
        text, value = PARSER_SAMPLES[given["type"]]
        return [text], value
    if given.get("nargs") == "*":
        words = ["/ip4/10.0.0.1/tcp/31337", "/ip4/10.0.0.2/tcp/31337"]
        return words, tuple(words)
    if typing.get_origin(kind) is Literal:
        choice = next(choice for choice in typing.get_args(kind) if choice != item.default)
        return [choice], choice
    if kind is int:
        return [str((item.default or 0) + 1)], (item.default or 0) + 1
    if kind is float:
        return [str((item.default or 0) + 0.5)], (item.default or 0) + 0.5
    assert kind is str, f"no sample for {item.name}: {hint}"
    return [f"sample-{item.name}"], f"sample-{item.name}"


@pytest.mark.parametrize("group, item, hint", OPTIONS, ids=[item.name for _, item, _ in OPTIONS])
def test_every_setting_is_a_join_option_that_sets_it(group, item, hint, monkeypatch):
    monkeypatch.delenv(API_TOKEN_VARIABLE, raising=False)
    words, value = _sample(item, hint)
    settings = from_args(NodeSettings, build_parser().parse_args(["join", item.metadata["flag"], *words]))
    assert getattr(getattr(settings, group), item.name) == value != item.default
    unchanged = dataclasses.replace(getattr(settings, group), **{item.name: item.default})
    assert dataclasses.replace(settings, **{group: unchanged}) == NodeSettings()  # and no other setting moved


def test_join_without_options_gives_the_default_settings(monkeypatch):
    monkeypatch.delenv(API_TOKEN_VARIABLE, raising=False)
    assert from_args(NodeSettings, build_parser().parse_args(["join"])) == NodeSettings()
    monkeypatch.setenv(API_TOKEN_VARIABLE, "s3cret")
    assert from_args(NodeSettings, build_parser().parse_args(["join"])).api.api_token == "s3cret"


def test_blocks_and_num_blocks_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["join", "--blocks", "0:4", "--num-blocks", "4"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_options_of_two_configs_may_not_share_a_name():
    @dataclasses.dataclass(frozen=True)
    class First:
        port: int = option(0, "--port", "one port")

    @dataclasses.dataclass(frozen=True)
    class Second:
        port: int = option(0, "--other-port", "another port")

    @dataclasses.dataclass(frozen=True)
    class Both:
        first: First = dataclasses.field(default_factory=First)
        second: Second = dataclasses.field(default_factory=Second)

    with pytest.raises(ValueError, match="distinct names"):
        add_options(argparse.ArgumentParser(), Both)
