"""The `swarm-node` command."""

from __future__ import annotations

import os

# A node shares its device with other work (other nodes, a client, agent tools). OpenMP threads that
# spin between requests would steal those cores: on 2 cores with 3 loopback nodes, spinning made each
# hop about 30% slower. It must be set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402

from edgeswarm.model.architectures import UnsupportedModelError  # noqa: E402
from edgeswarm.model.sources import ModelNotFoundError  # noqa: E402
from edgeswarm.node.admission import SESSION_SLOTS, SESSIONS_PER_CLIENT  # noqa: E402
from edgeswarm.node.api_access import (  # noqa: E402
    DEFAULT_REQUESTS_PER_SECOND,
    DEFAULT_TOKENS_PER_MINUTE,
)
from edgeswarm.node.kv_budget import MAX_SESSION_BATCH  # noqa: E402
from edgeswarm.node.session_slots import CROWDED_FRACTION, CROWDED_IDLE_TIMEOUT  # noqa: E402
from edgeswarm.protocol.identity import IdentityError, NodeIdentity  # noqa: E402
from edgeswarm.swarm.errors import SwarmError  # noqa: E402
from edgeswarm.swarm.session import DEFAULT_SPOT_CHECK  # noqa: E402

CLIENT_IDENTITY_FILE = "~/.config/edgeswarm/client.key"  # `swarm-node agent`'s key: its memory stays its own across runs


def parse_span(text: str) -> tuple[int, int]:
    """Parses START:END into a pair of ints."""
    try:
        start, end = (int(part) for part in text.split(":"))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected START:END, got {text!r}") from error
    return start, end


def parse_allowed_tools(text: str) -> tuple[str, ...]:
    """Parses --allow-tools python[,...] into tool names (only tools that run code are named there)."""
    from edgeswarm.agent.tools import (
        parse_allowed_tools as parse,  # the tool registry, without the node's heavy imports
    )

    try:
        return parse(text)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarm-node", description="A node of an edgeswarm swarm.")
    commands = parser.add_subparsers(dest="command", required=True)
    join = commands.add_parser("join", help="serve a span of the model's blocks and join the swarm")
    join.add_argument("--model", default="default", help="`default` (SmolLM2-135M-Instruct), a .gguf file or a model directory")
    join.add_argument("--host", default="127.0.0.1", help="address the gRPC data plane and the DHT listen on")
    join.add_argument("--port", type=int, default=0, help="gRPC port (0 picks a free one)")
    join.add_argument("--dht-port", type=int, default=0, help="DHT port (0 picks a free one)")
    join.add_argument("--announce-host", default=None, help="address announced to peers, if not --host")
    join.add_argument("--initial-peers", nargs="*", default=[], metavar="MADDR", help="DHT multiaddrs of nodes already in the swarm")
    span = join.add_mutually_exclusive_group()
    span.add_argument("--blocks", type=parse_span, default=None, metavar="START:END", help="serve exactly these blocks")
    span.add_argument("--num-blocks", type=int, default=None, metavar="N", help="serve N blocks where coverage is thinnest")
    join.add_argument("--announce-ttl", type=float, default=15.0, help="seconds an announcement lives; refreshed every third of it")
    join.add_argument("--max-session-length", type=int, default=8192, help="longest session (tokens) this node accepts")
    join.add_argument("--max-batch", type=int, default=32, help="decode steps of at most this many concurrent sessions run as one forward")
    join.add_argument("--prefill-chunk", type=int, default=256, help="longer steps run in chunks of this many tokens, with other sessions' decodes in between")
    join.add_argument("--kv-memory", type=int, default=1024, metavar="MIB", help="KV-cache memory all sessions may reserve together (a session reserves its max_length for the batch it runs); beyond it new sessions and steps get RESOURCE_EXHAUSTED and go elsewhere")
    join.add_argument("--session-idle-timeout", type=float, default=300.0, help="seconds without a step after which a session is closed and its KV cache freed")
    join.add_argument("--max-session-batch", type=int, default=MAX_SESSION_BATCH, metavar="N", help="most sequences one session may carry (more is INVALID_ARGUMENT)")
    join.add_argument("--session-slots", type=int, default=SESSION_SLOTS, metavar="N", help="most sessions open at once; NodeInfo, Forward and agent tasks have slots of their own")
    join.add_argument("--sessions-per-client", type=int, default=SESSIONS_PER_CLIENT, metavar="N", help="most sessions one caller (its principal, or its address when anonymous) may hold open")
    join.add_argument("--crowded-idle-timeout", type=float, default=CROWDED_IDLE_TIMEOUT, metavar="S", help=f"when over {CROWDED_FRACTION * 100:.0f}%% of session slots are taken, a new session closes the one idle longest if it has been idle S seconds")
    join.add_argument("--redundancy", type=int, default=2, help="how many nodes should serve every block (rebalancing aims for it)")
    join.add_argument("--rebalance-period", type=float, default=60.0, help="seconds between checks whether moving helps the swarm (0: never; nodes with --blocks never move)")
    join.add_argument("--partition", choices=["auto", "pipeline", "ring"], default="auto", help="auto: take the least-covered blocks; pipeline/ring: follow a swarm-wide plan made from every such node's profile")
    join.add_argument("--plan-objective", choices=["throughput", "latency"], default="throughput", help="what the pipeline planner optimises")
    join.add_argument("--no-mdns", dest="mdns", action="store_false", help="neither look for peers on the LAN by mDNS nor advertise this node there")
    join.add_argument("--swarm-id", default="edgeswarm", help="the swarm to find and advertise on the LAN; swarms with other ids are ignored")
    join.add_argument("--announce-maddrs", nargs="*", default=[], metavar="MADDR", help="public DHT multiaddrs to announce (a node behind NAT with a forwarded port)")
    join.add_argument("--no-relay", dest="use_relay", action="store_false", help="do not accept connections through libp2p relays")
    join.add_argument("--use-auto-relay", action="store_true", help="find relays by itself when peers cannot reach it directly (behind NAT)")
    join.add_argument("--quant", choices=["none", "bf16", "int8"], default="none", help="how to hold weights: none (float32), bf16, or int8 (weight-only, per-channel scales)")
    join.add_argument("--semantic-basis", default="auto", metavar="auto|off|FILE", help="the semantic activation codec's basis: auto (cached, else fitted from the model in the background), off, or a basis file")
    join.add_argument("--tools", dest="tools_file", metavar="FILE.py", help="host the @tool functions of this Python file for agents, beside the built-in calculator and swarm_status")
    join.add_argument("--allow-tools", type=parse_allowed_tools, default=(), metavar="python[,...]", help="also host these built-in tools that run code (off by default); python runs in a bubblewrap sandbox as an unprivileged user")
    join.add_argument("--data-dir", default=None, help="where this node keeps agent memory and run journals (default ~/.cache/edgeswarm/nodes/NODE_ID)")
    join.add_argument("--api-port", type=int, default=None, help="serve the SwarmAPI (gRPC, proto/api.proto; with health checks and reflection) on this port (0 picks one)")
    join.add_argument("--http-port", type=int, default=None, help="serve the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/models) on this port (0 picks one)")
    join.add_argument("--api-token", default=os.environ.get("EDGESWARM_API_TOKEN"), help="clients of the APIs must send it as a Bearer token, as the API client 'default' (default: $EDGESWARM_API_TOKEN; none and no --api-tokens: open)")
    join.add_argument("--api-tokens", default=None, metavar="FILE.json", help="named API clients: a JSON file of names, SHA-256 digests of their tokens and per-client limits (README: APIs for apps)")
    join.add_argument("--api-rate", type=float, default=DEFAULT_REQUESTS_PER_SECOND, help="requests per second each API client (or anonymous IP) may make by default (bursts of twice that)")
    join.add_argument("--api-tokens-per-minute", type=float, default=DEFAULT_TOKENS_PER_MINUTE, help="generated tokens per minute each API client (or anonymous IP) may use by default")
    join.add_argument("--identity", default=None, metavar="FILE", help="this node's Ed25519 key (created if missing, mode 0600); its id is the key's fingerprint (default: a new key each run)")
    join.add_argument("--swarm-key", default=None, metavar="FILE", help="join a private swarm: only holders of this key (see `swarm-node new-swarm-key`) can join, serve or be routed to")
    join.add_argument("--tls", action="store_true", help="serve gRPC (and the HTTP API as HTTPS) over TLS, with a certificate bound to this node's identity and announced in its signed record")
    join.add_argument("--no-agents", dest="agents", action="store_false", help="take no agent steps and coordinate no agent runs")
    join.add_argument("--spot-check", type=parse_fraction, default=DEFAULT_SPOT_CHECK, metavar="F", help=f"fraction of steps (besides each session's first) that this node's own clients (OpenAI endpoint, SwarmAPI, agent llm steps) verify on another node; 0: off (default {DEFAULT_SPOT_CHECK})")
    join.add_argument("--drain-timeout", type=float, default=30.0, help="on SIGTERM, seconds to let open sessions finish before leaving")
    join.add_argument("--log-level", default="INFO")

    generate = commands.add_parser("generate", help="answer a prompt with the swarm (a chat turn) and print the reply")
    generate.add_argument("prompt")
    generate.add_argument("--model", default="default", help="the swarm's model (as given to join)")
    generate.add_argument("--initial-peers", nargs="*", default=[], metavar="MADDR", help="any node of the swarm (default: find one on the LAN by mDNS)")
    generate.add_argument("--swarm-id", default="edgeswarm", help="the swarm to look for on the LAN")
    generate.add_argument("--swarm-key", default=None, metavar="FILE", help="the key of a private swarm")
    generate.add_argument("--max-new-tokens", type=int, default=128)
    generate.add_argument("--link-quality", default="lossless", metavar="BUDGET", help="activation compression on the links: lossless, high, balanced, max (or prefill=...,decode=..., or a codec name)")
    generate.add_argument("--spot-check", type=parse_fraction, default=DEFAULT_SPOT_CHECK, metavar="F", help=f"fraction of steps (besides the first) verified on another node; 0: off (default {DEFAULT_SPOT_CHECK})")
    generate.add_argument("--log-level", default="WARNING")

    agent = commands.add_parser("agent", help="run an agent task on the swarm and print its steps and answer")
    agent.add_argument("goal")
    agent.add_argument("--model", default="default", help="the swarm's model (as given to join)")
    agent.add_argument("--initial-peers", nargs="*", default=[], metavar="MADDR", help="any node of the swarm (default: find one on the LAN by mDNS)")
    agent.add_argument("--swarm-id", default="edgeswarm", help="the swarm to look for on the LAN")
    agent.add_argument("--swarm-key", default=None, metavar="FILE", help="the key of a private swarm")
    agent.add_argument("--tools", nargs="*", default=None, metavar="NAME", help="tools the agent may call (default: every tool a node hosts)")
    agent.add_argument("--memory", default=None, metavar="NAMESPACE", help="long-term memory namespace to read facts from and remember the answer in")
    agent.add_argument("--identity", default=CLIENT_IDENTITY_FILE, metavar="FILE", help=f"this client's Ed25519 key, which owns its memory namespaces (created if missing, mode 0600; default {CLIENT_IDENTITY_FILE})")
    agent.add_argument("--strategy", choices=["react", "plan", "team"], default="react")
    agent.add_argument("--max-steps", type=int, default=8)
    agent.add_argument("--tool-choice", choices=["auto", "required", "none"], default="auto", help="required: the first decision must call a tool")
    agent.add_argument("--json", action="store_true", help="print every event as a JSON line")
    agent.add_argument("--log-level", default="WARNING")

    new_key = commands.add_parser("new-swarm-key", help="write a new random key for a private swarm to FILE")
    new_key.add_argument("file")
    new_key.add_argument("--log-level", default="WARNING")

    status = commands.add_parser("status", help="show the swarm's nodes and block coverage")
    status.add_argument("--model", default="default", help="the model whose swarm to show (as given to join)")
    status.add_argument("--initial-peers", nargs="*", default=[], metavar="MADDR", help="any node of the swarm (default: find one on the LAN by mDNS)")
    status.add_argument("--swarm-id", default="edgeswarm", help="the swarm to look for on the LAN")
    status.add_argument("--swarm-key", default=None, metavar="FILE", help="the key of a private swarm")
    status.add_argument("--announce-ttl", type=float, default=15.0, help="the nodes' --announce-ttl, to tell how long ago each was seen")
    status.add_argument("--json", action="store_true", help="print JSON instead of tables")
    status.add_argument("--plot", metavar="FILE.png", help="also draw the swarm: spans over the block axis, one row per node")
    status.add_argument("--log-level", default="WARNING")
    return parser


def run_join(args: argparse.Namespace) -> int:
    from edgeswarm.node.daemon import (  # heavy imports (torch, hivemind) only for this command
        NodeSettings,
        SwarmNode,
    )

    settings = NodeSettings(
        model=args.model,
        host=args.host,
        port=args.port,
        dht_port=args.dht_port,
        announce_host=args.announce_host,
        initial_peers=args.initial_peers,
        blocks=args.blocks,
        num_blocks=args.num_blocks,
        announce_ttl=args.announce_ttl,
        max_session_length=args.max_session_length,
        max_batch=args.max_batch,
        prefill_chunk=args.prefill_chunk,
        kv_memory_mib=args.kv_memory,
        session_idle_timeout=args.session_idle_timeout,
        max_session_batch=args.max_session_batch,
        session_slots=args.session_slots,
        sessions_per_client=args.sessions_per_client,
        crowded_idle_timeout=args.crowded_idle_timeout,
        redundancy=args.redundancy,
        rebalance_period=args.rebalance_period,
        drain_timeout=args.drain_timeout,
        partition=args.partition,
        plan_objective=args.plan_objective,
        mdns=args.mdns,
        swarm_id=args.swarm_id,
        announce_maddrs=args.announce_maddrs,
        use_relay=args.use_relay,
        use_auto_relay=args.use_auto_relay,
        quant=args.quant,
        semantic_basis=args.semantic_basis,
        agents=args.agents,
        tools_file=args.tools_file,
        allow_tools=args.allow_tools,
        data_dir=args.data_dir,
        api_port=args.api_port,
        http_port=args.http_port,
        api_token=args.api_token,
        api_tokens=args.api_tokens,
        api_rate=args.api_rate,
        api_tokens_per_minute=args.api_tokens_per_minute,
        identity=args.identity,
        swarm_key=args.swarm_key,
        tls=args.tls,
        spot_check=args.spot_check,
    )
    node = SwarmNode(settings)
    node.start()
    # Handlers go in only now: the DHT runs in a child process forked during start(), and a child that
    # inherited them would ignore the SIGTERM its parent sends when shutting it down.
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        record = node.record
        print(f"serving blocks {record.start_block}:{record.end_block} of {record.model_id} at {record.address}")
        print("to join this swarm, run:  swarm-node join --initial-peers " + node.initial_peers[0])
        if node.api_address:
            print(f"SwarmAPI (gRPC) at {node.api_address}")
        if node.http_address:
            print(f"OpenAI-compatible API at {'https' if node.tls else 'http'}://{node.http_address}/v1")
        print(node.ready_line(), flush=True)
        stop.wait()
        print(f"stopping: withdrawing the announcement, draining {node.servicer.active_sessions} sessions", flush=True)
    finally:
        node.stop()
    return 0


def _swarm_key(args: argparse.Namespace) -> bytes | None:
    from edgeswarm.protocol.channels import use_swarm_key
    from edgeswarm.protocol.swarm_key import read_swarm_key

    key = read_swarm_key(args.swarm_key) if args.swarm_key else None
    use_swarm_key(key)
    return key


def run_new_swarm_key(args: argparse.Namespace) -> int:
    from edgeswarm.protocol.swarm_key import generate_swarm_key

    generate_swarm_key(args.file)
    print(f"wrote a new swarm key to {args.file}: give it to every node (--swarm-key) and client of the swarm")
    return 0


def run_status(args: argparse.Namespace) -> int:
    from edgeswarm.model.sources import open_model
    from edgeswarm.swarm import dht as swarm_dht
    from edgeswarm.swarm.mdns import discover_peers
    from edgeswarm.swarm.membership import join_as_client
    from edgeswarm.swarm.status import collect_status, plot_status, render_table

    model = open_model(args.model)
    peers = args.initial_peers or discover_peers(args.swarm_id)
    if not peers:
        raise SwarmError(f"no --initial-peers given and no node of swarm {args.swarm_id!r} found on the LAN")
    swarm_key = _swarm_key(args)
    dht = swarm_dht.start_dht(peers, client_mode=True, swarm_key=swarm_key)
    member = join_as_client(dht, swarm_key)
    try:
        status = collect_status(dht, model.model_id, model.num_blocks, ttl=args.announce_ttl)
    finally:
        member.close()
        dht.shutdown()
    print(json.dumps(status.to_json(), indent=2) if args.json else render_table(status))
    if args.plot:
        plot_status(status, args.plot)
        if not args.json:
            print(f"wrote {args.plot}")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from edgeswarm.agent.client import SwarmClient
    from edgeswarm.swarm.session import SessionPolicy

    with SwarmClient(
        args.initial_peers or None, model=args.model, swarm_id=args.swarm_id, link_quality=args.link_quality, swarm_key=_swarm_key(args),
        policy=SessionPolicy(spot_check=args.spot_check),
    ) as client:
        prompt = client.apply_chat_template([{"role": "user", "content": args.prompt}])
        for event in client.stream(prompt, max_new_tokens=args.max_new_tokens):
            print(event.text, end="", flush=True)
    print()
    return 0


def describe_event(event: dict) -> str | None:
    """One line for an agent event worth showing a person (None for tokens and bookkeeping)."""
    kind = event.get("type")
    node = str(event.get("node") or "")[-8:]
    what = event.get("tool") or event.get("kind")
    if kind == "step.started":
        return f"  {event['step_id']:<14} {what} on node {node} (attempt {event['attempt']})"
    if kind == "step.finished":
        value = event.get("value")
        if not event["ok"]:
            outcome = f"error: {event.get('error')}"
        elif event["kind"] == "llm" and isinstance(value, dict):
            calls = ", ".join(f"{call['name']}({json.dumps(call['arguments'])})" for call in value.get("calls", []))
            outcome = f"calls {calls}" if calls else f"answers {value.get('answer')!r}"
            outcome += f" ({value.get('reused_tokens', 0)} of {value.get('prompt_tokens', 0)} prompt tokens already cached)"
        else:
            outcome = json.dumps(value)[:100]
        return f"  {event['step_id']:<14} {what} done on {node} in {event['seconds']}s: {outcome}"
    if kind == "step.reused":
        return f"  {event['step_id']:<14} taken from the journal (ran on {node})"
    if kind == "plan":
        return "plan: " + "; ".join(f"{c['id']}. {c['tool']}({json.dumps(c['arguments'])})" for c in event["calls"])
    if kind == "message":
        return f"{event['from']} -> {event['to']}: {event['content']}"
    if kind in ("run.started", "run.resumed"):
        return f"{kind.split('.')[1]} on node {node}"
    if kind == "run.finished":
        return f"run {event['status']}" + (f": {event['error']}" if event.get("error") else "")
    return None


def run_agent(args: argparse.Namespace) -> int:
    from edgeswarm.agent.client import SwarmClient

    identity = NodeIdentity.load_or_create(os.path.expanduser(args.identity))
    with SwarmClient(args.initial_peers or None, model=args.model, swarm_id=args.swarm_id, swarm_key=_swarm_key(args), identity=identity) as client:
        task = client.submit_agent_task(
            args.goal, tools=args.tools, memory_namespace=args.memory, max_steps=args.max_steps, strategy=args.strategy,
            tool_choice=args.tool_choice,
        )
        answer = None
        for event in task.events():
            if args.json:
                print(json.dumps(event), flush=True)
            elif (line := describe_event(event)) is not None:
                print(line, flush=True)
            if event["type"] == "answer":
                answer = event["text"]
            if event["type"] == "run.finished" and event["status"] != "succeeded":
                return 1
        if not args.json:
            print(f"\nanswer: {answer}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("hivemind").setLevel(logging.WARNING)
    try:
        if args.command == "join":
            return run_join(args)
        if args.command == "status":
            return run_status(args)
        if args.command == "generate":
            return run_generate(args)
        if args.command == "agent":
            return run_agent(args)
        if args.command == "new-swarm-key":
            return run_new_swarm_key(args)
    except (ModelNotFoundError, UnsupportedModelError, ValueError, SwarmError, OSError, IdentityError) as error:
        print(f"swarm-node: error: {error}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
