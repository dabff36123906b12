"""What `swarm-node join` can be told: one frozen dataclass per concern, gathered in `NodeSettings`.

Every field is also a command-line option: `option()` keeps its flag and help in the field's metadata,
`add_options` adds the options of a config (and of the configs it holds) to an argparse parser, and
`from_args` builds the config back from the parsed arguments. An option's destination is its field's
name, so field names are unique across the configs of `NodeSettings`. Beyond the flag and help, the
option follows the field: a bool default makes a switch (`--tls` for False, `--no-mdns` for True), a
Literal type gives the choices and int or float the conversion; anything else (nargs, a parser, a
metavar) goes to `option()` as argparse keywords.
"""

from __future__ import annotations

import argparse
import os
import types
import typing
from collections.abc import Iterator
from dataclasses import Field, dataclass, field, fields, is_dataclass
from typing import Any, Literal, TypeVar

from edgeswarm.agent.tools import parse_allowed_tools as parse_tool_names
from edgeswarm.node.api_access import (
    DEFAULT_REQUESTS_PER_SECOND,
    DEFAULT_TOKENS_PER_MINUTE,
)
from edgeswarm.node.service import ServiceLimits
from edgeswarm.node.session_slots import CROWDED_FRACTION
from edgeswarm.protocol.constants import ANNOUNCE_TTL
from edgeswarm.swarm.mdns import DEFAULT_SWARM_ID, LOOPBACK_HOST, WILDCARD_HOST
from edgeswarm.swarm.policy import DEFAULT_SPOT_CHECK

MIB = 2**20
API_TOKEN_VARIABLE = "EDGESWARM_API_TOKEN"  # the environment variable --api-token defaults to

Config = TypeVar("Config")


def parse_span(text: str) -> tuple[int, int]:
    """Parses START:END into a pair of ints."""
    try:
        start, end = (int(part) for part in text.split(":"))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected START:END, got {text!r}") from error
    return start, end


def parse_allowed_tools(text: str) -> tuple[str, ...]:
    """Parses --allow-tools python[,...] into tool names (only tools that run code are named there)."""
    try:
        return parse_tool_names(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def parse_fraction(text: str) -> float:
    """Parses a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}") from error
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}")
    return value


def option(default: Any, flag: str, help: str, *, exclusive: str = "", env: str = "", **argparse_options: Any) -> Any:
    """A config field that is also the command-line option `flag`.

    `exclusive` names a group of options of which one at most may be given; `env` names an environment
    variable the command line's default comes from (the dataclass's own default stays `default`).
    """
    metadata = {"flag": flag, "help": help, "exclusive": exclusive, "env": env, "argparse": argparse_options}
    return field(default=default, metadata=metadata)


def option_fields(config: type) -> Iterator[tuple[Field, Any]]:
    """The option fields of the dataclass `config` and of the dataclasses it holds, with their resolved types."""
    hints = typing.get_type_hints(config)
    for item in fields(config):
        if is_dataclass(hints[item.name]):
            yield from option_fields(hints[item.name])
        else:
            yield item, hints[item.name]


def _without_none(hint: Any) -> Any:
    """`X` for `X | None`, else `hint`."""
    if typing.get_origin(hint) not in (typing.Union, types.UnionType):
        return hint
    kinds = [kind for kind in typing.get_args(hint) if kind is not type(None)]
    return kinds[0] if len(kinds) == 1 else hint


def add_options(parser: argparse.ArgumentParser, config: type) -> None:
    """Adds an option to `parser` for every field of the dataclass `config`; the fields of each dataclass
    it holds go in an argument group of their own (a section of --help)."""
    names = [item.name for item, _ in option_fields(config)]
    if len(set(names)) != len(names):
        raise ValueError(f"the fields of {config.__name__}'s configs must have distinct names: {names}")
    _add_options(parser, config)


def _add_options(container: argparse._ActionsContainer, config: type) -> None:
    hints = typing.get_type_hints(config)
    exclusive: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for item in fields(config):
        hint = hints[item.name]
        if is_dataclass(hint):
            _add_options(container.add_argument_group(item.name, hint.__doc__), hint)
            continue
        meta = item.metadata
        default = os.environ.get(meta["env"], item.default) if meta["env"] else item.default
        arguments: dict[str, Any] = {"dest": item.name, "default": default, "help": meta["help"].replace("%", "%%")}
        kind = _without_none(hint)
        if kind is bool:
            arguments["action"] = "store_false" if item.default else "store_true"
        elif typing.get_origin(kind) is Literal:
            arguments["choices"] = typing.get_args(kind)
        elif kind in (int, float):
            arguments["type"] = kind
        arguments.update(meta["argparse"])
        target = container
        if meta["exclusive"]:
            if meta["exclusive"] not in exclusive:
                exclusive[meta["exclusive"]] = container.add_mutually_exclusive_group()
            target = exclusive[meta["exclusive"]]
        target.add_argument(meta["flag"], **arguments)


def from_args(config: type[Config], args: argparse.Namespace) -> Config:
    """The dataclass `config` (and the dataclasses it holds) from arguments parsed with `add_options`'s options.
    Lists (from nargs) become tuples, as frozen configs hold them."""
    hints = typing.get_type_hints(config)
    values: dict[str, Any] = {}
    for item in fields(config):
        if is_dataclass(hints[item.name]):
            values[item.name] = from_args(hints[item.name], args)
        else:
            value = getattr(args, item.name)
            values[item.name] = tuple(value) if isinstance(value, list) else value
    return config(**values)


@dataclass(frozen=True)
class PlacementConfig:
    """Which model this node serves, which of its blocks, how it holds them, and how it moves."""

    model: str = option("default", "--model", "`default` (SmolLM2-135M-Instruct), a .gguf file or a model directory")
    blocks: tuple[int, int] | None = option(
        None, "--blocks", "serve exactly these blocks", exclusive="span", type=parse_span, metavar="START:END"
    )
    num_blocks: int | None = option(
        None, "--num-blocks", "serve N blocks where coverage is thinnest", exclusive="span", metavar="N"
    )
    quant: Literal["none", "bf16", "int8"] = option(
        "none", "--quant", "how to hold weights: none (float32), bf16, or int8 (weight-only, per-channel scales)"
    )
    redundancy: int = option(2, "--redundancy", "how many nodes should serve every block (rebalancing aims for it)")
    rebalance_period: float = option(
        60.0, "--rebalance-period", "seconds between checks whether moving helps the swarm (0: never; nodes with --blocks never move)"
    )
    partition: Literal["auto", "pipeline", "ring"] = option(
        "auto", "--partition",
        "auto: take the least-covered blocks; pipeline/ring: follow a swarm-wide plan made from every such node's profile",
    )
    plan_objective: Literal["throughput", "latency"] = option(
        "throughput", "--plan-objective", "what the pipeline planner optimises"
    )


@dataclass(frozen=True)
class NetworkConfig:
    """Where this node listens, how it finds and is found by its peers, and who it is to them."""

    host: str | None = option(
        None, "--host",
        "address the gRPC data plane, the DHT and the APIs listen on (default: every interface, 0.0.0.0, announcing"
        " this device's LAN address; 127.0.0.1 with --no-mdns)",
    )
    port: int = option(0, "--port", "gRPC port (0 picks a free one)")
    dht_port: int = option(0, "--dht-port", "DHT port (0 picks a free one)")
    announce_host: str | None = option(None, "--announce-host", "address announced to peers, if not --host")
    initial_peers: tuple[str, ...] = option(
        (), "--initial-peers", "DHT multiaddrs of nodes already in the swarm", nargs="*", metavar="MADDR"
    )
    announce_ttl: float = option(ANNOUNCE_TTL, "--announce-ttl", "seconds an announcement lives; refreshed every third of it")
    mdns: bool = option(True, "--no-mdns", "neither look for peers on the LAN by mDNS nor advertise this node there")
    swarm_id: str = option(
        DEFAULT_SWARM_ID, "--swarm-id", "the swarm to find and advertise on the LAN; swarms with other ids are ignored"
    )
    announce_maddrs: tuple[str, ...] = option(
        (), "--announce-maddrs", "public DHT multiaddrs to announce (a node behind NAT with a forwarded port)",
        nargs="*", metavar="MADDR",
    )
    use_relay: bool = option(True, "--no-relay", "do not accept connections through libp2p relays")
    use_auto_relay: bool = option(
        False, "--use-auto-relay", "find relays by itself when peers cannot reach it directly (behind NAT)"
    )
    semantic_basis: str = option(
        "auto", "--semantic-basis",
        "the semantic activation codec's basis: auto (cached, else fitted from the model in the background), off, or a basis file",
        metavar="auto|off|FILE",
    )
    identity: str | None = option(
        None, "--identity",
        "this node's Ed25519 key (created if missing, mode 0600); its id is the key's fingerprint (default: a new key each run)",
        metavar="FILE",
    )
    swarm_key: str | None = option(
        None, "--swarm-key",
        "join a private swarm: only holders of this key (see `swarm-node new-swarm-key`) can join, serve or be routed to",
        metavar="FILE",
    )
    tls: bool = option(
        False, "--tls",
        "serve gRPC (and the HTTP API as HTTPS) over TLS, with a certificate bound to this node's identity and announced in its signed record",
    )

    @property
    def listen_host(self) -> str:
        """Where the node listens: --host, else every interface when mDNS makes it a LAN node, else loopback."""
        if self.host is not None:
            return self.host
        return WILDCARD_HOST if self.mdns else LOOPBACK_HOST


@dataclass(frozen=True)
class LimitsConfig:
    """What this node takes on: session lengths, batching, the KV-cache budget, session slots, and draining."""

    max_session_length: int = option(
        ServiceLimits.max_session_length, "--max-session-length", "longest session (tokens) this node accepts"
    )
    max_batch: int = option(
        ServiceLimits.max_batch, "--max-batch", "decode steps of at most this many concurrent sessions run as one forward"
    )
    prefill_chunk: int = option(
        ServiceLimits.prefill_chunk, "--prefill-chunk",
        "longer steps run in chunks of this many tokens, with other sessions' decodes in between",
    )
    kv_memory_mib: int = option(
        ServiceLimits.kv_memory_bytes // MIB, "--kv-memory",
        "KV-cache memory all sessions may reserve together (a session reserves its max_length for the batch it runs);"
        " beyond it new sessions and steps get RESOURCE_EXHAUSTED and go elsewhere",
        metavar="MIB",
    )
    session_idle_timeout: float = option(
        ServiceLimits.session_idle_timeout, "--session-idle-timeout",
        "seconds without a step after which a session is closed and its KV cache freed",
    )
    max_session_batch: int = option(
        ServiceLimits.max_session_batch, "--max-session-batch",
        "most sequences one session may carry (more is INVALID_ARGUMENT)", metavar="N",
    )
    session_slots: int = option(
        ServiceLimits.session_slots, "--session-slots",
        "most sessions open at once; NodeInfo, Forward and agent tasks have slots of their own", metavar="N",
    )
    sessions_per_client: int = option(
        ServiceLimits.sessions_per_client, "--sessions-per-client",
        "most sessions one caller (its principal, or its address when anonymous) may hold open", metavar="N",
    )
    crowded_idle_timeout: float = option(
        ServiceLimits.crowded_idle_timeout, "--crowded-idle-timeout",
        f"when over {CROWDED_FRACTION * 100:.0f}% of session slots are taken, a new session closes the one idle longest"
        " if it has been idle S seconds",
        metavar="S",
    )
    drain_timeout: float = option(30.0, "--drain-timeout", "on SIGTERM, seconds to let open sessions finish before leaving")

    def service_limits(self) -> ServiceLimits:
        """The limits the data plane (node.service) enforces."""
        return ServiceLimits(
            max_session_length=self.max_session_length,
            max_batch=self.max_batch,
            prefill_chunk=self.prefill_chunk,
            kv_memory_bytes=self.kv_memory_mib * MIB,
            session_idle_timeout=self.session_idle_timeout,
            max_session_batch=self.max_session_batch,
            session_slots=self.session_slots,
            sessions_per_client=self.sessions_per_client,
            crowded_idle_timeout=self.crowded_idle_timeout,
        )


@dataclass(frozen=True)
class AgentConfig:
    """The agent services: whether they run, the tools this node hosts, where memory lives, and how much
    this node's own clients (APIs, agents' llm steps) verify."""

    enabled: bool = option(True, "--no-agents", "take no agent steps and coordinate no agent runs")
    tools_file: str | None = option(
        None, "--tools",
        "host the @tool functions of this Python file for agents, beside the built-in calculator and swarm_status",
        metavar="FILE.py",
    )
    allow_tools: tuple[str, ...] = option(
        (), "--allow-tools",
        "also host these built-in tools that run code (off by default); python runs in a bubblewrap sandbox as an unprivileged user",
        type=parse_allowed_tools, metavar="python[,...]",
    )
    data_dir: str | None = option(
        None, "--data-dir", "where this node keeps agent memory and run journals (default ~/.cache/edgeswarm/nodes/NODE_ID)"
    )
    spot_check: float = option(
        DEFAULT_SPOT_CHECK, "--spot-check",
        "fraction of steps (besides each session's first) that this node's own clients (OpenAI endpoint, SwarmAPI,"
        f" agent llm steps) verify on another node; 0: off (default {DEFAULT_SPOT_CHECK})",
        type=parse_fraction, metavar="F",
    )


@dataclass(frozen=True)
class ApiConfig:
    """The APIs for apps (SwarmAPI over gRPC, OpenAI-compatible HTTP), their clients and default limits."""

    api_port: int | None = option(
        None, "--api-port",
        "serve the SwarmAPI (gRPC, proto/api.proto; with health checks and reflection) on this port (0 picks one)",
    )
    http_port: int | None = option(
        None, "--http-port",
        "serve the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/models) on this port (0 picks one)",
    )
    api_token: str | None = option(
        None, "--api-token",
        f"clients of the APIs must send it as a Bearer token, as the API client 'default' (default: ${API_TOKEN_VARIABLE};"
        " none and no --api-tokens: open)",
        env=API_TOKEN_VARIABLE,
    )
    api_tokens: str | None = option(
        None, "--api-tokens",
        "named API clients: a JSON file of names, SHA-256 digests of their tokens and per-client limits (README: APIs for apps)",
        metavar="FILE.json",
    )
    api_rate: float = option(
        DEFAULT_REQUESTS_PER_SECOND, "--api-rate",
        "requests per second each API client (or anonymous IP) may make by default (bursts of twice that)",
    )
    api_tokens_per_minute: float | None = option(
        DEFAULT_TOKENS_PER_MINUTE, "--api-tokens-per-minute",
        "generated tokens per minute each API client (or anonymous IP) may use by default",
    )

    @property
    def serving(self) -> bool:
        """Whether any API is served."""
        return self.api_port is not None or self.http_port is not None


@dataclass(frozen=True)
class NodeSettings:
    """Everything `swarm-node join` can be told, one config per concern."""

    placement: PlacementConfig = field(default_factory=PlacementConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    agents: AgentConfig = field(default_factory=AgentConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
