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
from edgeswarm.node.config import (  # noqa: E402
    NetworkConfig,
    NodeSettings,
    add_options,
    from_args,
    parse_fraction,
)
from edgeswarm.protocol.identity import IdentityError, NodeIdentity  # noqa: E402
from edgeswarm.swarm.errors import SwarmError  # noqa: E402
from edgeswarm.swarm.mdns import DEFAULT_SWARM_ID  # noqa: E402
from edgeswarm.swarm.policy import DEFAULT_SPOT_CHECK  # noqa: E402

CLIENT_IDENTITY_FILE = "~/.config/edgeswarm/client.key"  # `swarm-node agent`'s key: its memory stays its own across runs


def build_parser() -> argparse.ArgumentParser:
    """The `swarm-node` command line; `join`'s options are the fields of node.config's NodeSettings."""
    parser = argparse.ArgumentParser(prog="swarm-node", description="A node of an edgeswarm swarm.")
    commands = parser.add_subparsers(dest="command", required=True)
    join = commands.add_parser("join", help="serve a span of the model's blocks and join the swarm")
    add_options(join, NodeSettings)
    join.add_argument("--log-level", default="INFO")

    generate = commands.add_parser("generate", help="answer a prompt with the swarm (a chat turn) and print the reply")
    generate.add_argument("prompt")
    generate.add_argument("--model", default="default", help="the swarm's model (as given to join)")
    generate.add_argument("--initial-peers", nargs="*", default=[], metavar="MADDR", help="any node of the swarm (default: find one on the LAN by mDNS)")
    generate.add_argument("--swarm-id", default=DEFAULT_SWARM_ID, help="the swarm to look for on the LAN")
    generate.add_argument("--swarm-key", default=None, metavar="FILE", help="the key of a private swarm")
    generate.add_argument("--max-new-tokens", type=int, default=128)
    generate.add_argument("--link-quality", default="lossless", metavar="BUDGET", help="activation compression on the links: lossless, high, balanced, max (or prefill=...,decode=..., or a codec name)")
    generate.add_argument("--spot-check", type=parse_fraction, default=DEFAULT_SPOT_CHECK, metavar="F", help=f"fraction of steps (besides the first) verified on another node; 0: off (default {DEFAULT_SPOT_CHECK})")
    generate.add_argument("--log-level", default="WARNING")

    agent = commands.add_parser("agent", help="run an agent task on the swarm and print its steps and answer")
    agent.add_argument("goal")
    agent.add_argument("--model", default="default", help="the swarm's model (as given to join)")
    agent.add_argument("--initial-peers", nargs="*", default=[], metavar="MADDR", help="any node of the swarm (default: find one on the LAN by mDNS)")
    agent.add_argument("--swarm-id", default=DEFAULT_SWARM_ID, help="the swarm to look for on the LAN")
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
    status.add_argument("--swarm-id", default=DEFAULT_SWARM_ID, help="the swarm to look for on the LAN")
    status.add_argument("--swarm-key", default=None, metavar="FILE", help="the key of a private swarm")
    status.add_argument("--announce-ttl", type=float, default=NetworkConfig.announce_ttl, help="the nodes' --announce-ttl, to tell how long ago each was seen")
    status.add_argument("--json", action="store_true", help="print JSON instead of tables")
    status.add_argument("--plot", metavar="FILE.png", help="also draw the swarm: spans over the block axis, one row per node")
    status.add_argument("--log-level", default="WARNING")
    return parser


def run_join(args: argparse.Namespace) -> int:
    # heavy imports (torch, hivemind) only for this command
    from edgeswarm.node.daemon import SwarmNode

    settings = from_args(NodeSettings, args)
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
    from edgeswarm.swarm.policy import SessionPolicy

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
        task.result()  # a run lost on the way (its coordinator and backups gone) raises AgentRunError here
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
