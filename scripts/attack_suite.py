"""Runs the attacks of the security review against real nodes on loopback and prints what each one met.

A swarm of SmolLM2 nodes (TLS on, the HTTP and gRPC APIs on, `python` allowed on one node) is started;
each attack is tried as a stranger or a hostile member would, and the table says what was expected (a
refusal, or harm that did not happen) and what was observed. Exits 1 if any attack got through, so CI
fails. Every attack is bounded in time, and so is the whole run (`--timeout`).

    python -m scripts.attack_suite [--timeout 600] [--json results.json]   (from the repository's root)
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import hivemind
import torch

from devtools.launcher import LocalSwarm, NodeProcess, start_node
from devtools.waiting import poll
from edgeswarm import SwarmClient
from edgeswarm.agent.capabilities import tasks_key
from edgeswarm.node.admission import SESSIONS_PER_CLIENT
from edgeswarm.node.forwarding import MAX_WAITING_PUSHES
from edgeswarm.node.openai_http import MAX_CONNECTIONS
from edgeswarm.partition.coordination import participants, plan_from_record
from edgeswarm.proto import (
    api_pb2,
    tasks_pb2,
    tasks_pb2_grpc,
)
from edgeswarm.proto import dataplane_pb2 as pb
from edgeswarm.proto import dataplane_pb2_grpc as pb_grpc
from edgeswarm.protocol.call_auth import SignedCalls, call_credentials
from edgeswarm.protocol.channels import open_channel, process_identity
from edgeswarm.protocol.identity import NodeIdentity
from edgeswarm.protocol.memory_access import READ, WRITE, issue_access
from edgeswarm.protocol.records import ONLINE, servers_key
from edgeswarm.protocol.tensors import serialize_tensor, tensor_digest
from edgeswarm.swarm import dht as swarm_dht
from edgeswarm.swarm.dht import RecordAuth
from edgeswarm.swarm.membership import MemberAnnouncer
from edgeswarm.swarm.policy import SessionPolicy

CALL_TIMEOUT = 20.0  # seconds one attacking call may take
WAIT_TIMEOUT = 60.0  # seconds an attack may wait for the swarm to show its effect
IDLE_FLOOD_SESSIONS = SESSIONS_PER_CLIENT + 8  # more than one client may hold open on a node
SLOWLORIS_CONNECTIONS = MAX_CONNECTIONS + 64  # more than the HTTP server admits at once
SLOWLORIS_THREAD_SLACK = 8  # threads the node may add while they trickle (the server itself adds none)
FLOOD_REQUESTS = 80  # more than an API client's burst (node.api_access defaults)
API_TOKEN = "attack-suite-secret"
RESTART_GRACE = 5.0  # seconds a restarted node's record may take to read as online (its offline one lives protocol.constants.ANNOUNCE_TTL)


@dataclass
class Outcome:
    observed: str
    held: bool  # True: the attack was refused or did no harm


@dataclass
class Attack:
    name: str
    expected: str
    run: Callable[[Arena], Outcome]


class Arena:
    """The swarm under attack, a member client for attacks that need one, and a second DHT peer that
    attacks sign as their strangers and intruders (started with the client, before the attacks fill this process with threads: hivemind forks
    its DHT process, and a fork taken amid busy gRPC and torch threads can hang in the child)."""

    def __init__(self, swarm: LocalSwarm, client: SwarmClient, intruder_dht: hivemind.DHT, work_dir: Path):
        self.swarm, self.client, self.intruder_dht, self.work_dir = swarm, client, intruder_dht, work_dir

    @property
    def node(self) -> NodeProcess:
        return self.swarm.nodes[0]

    def node_id(self, node: NodeProcess | None = None) -> str:
        return (node or self.node).info["node_id"]


def _code(call: Callable[[], object]) -> str:
    """The gRPC status a call ended with ("OK" if it succeeded)."""
    try:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, (bytes, str)):
            list(result)
        return "OK"
    except grpc.RpcError as error:
        return f"{error.code().name}: {(error.details() or '')[:70]}"


def _node_info(channel: grpc.Channel, metadata=None):
    return pb_grpc.BlockServiceStub(channel).NodeInfo(pb.NodeInfoRequest(), timeout=CALL_TIMEOUT, metadata=metadata)


def _python_step(channel: grpc.Channel, code: str):
    request = tasks_pb2.StepRequest(run_id="attack", step_id="s", kind="tool", args_json=json.dumps({"name": "python", "arguments": {"code": code}}))
    return tasks_pb2_grpc.TaskServiceStub(channel).RunStep(request, timeout=CALL_TIMEOUT)


# --- the attacks ------------------------------------------------------------------------------------


def _unsigned_channel(node: NodeProcess) -> grpc.Channel:
    """A TLS channel to `node` that adds no credential of its own: the attacker chooses the metadata."""
    credentials = grpc.ssl_channel_credentials(root_certificates=node.info["tls_cert"].encode())
    return grpc.secure_channel(node.address, credentials, options=[("grpc.ssl_target_name_override", node.info["node_id"])])


def unsigned_calls(arena: Arena) -> Outcome:
    """No credential at all, on the data-plane port that the DHT makes public."""
    with _unsigned_channel(arena.node) as channel:
        codes = {
            "NodeInfo": _code(lambda: _node_info(channel)),
            "RunStep(python)": _code(lambda: _python_step(channel, "print(1)")),
            "StartRun": _code(lambda: tasks_pb2_grpc.TaskServiceStub(channel).StartRun(
                tasks_pb2.RunRequest(run_id="attack", spec_json=json.dumps({"goal": "hi"})), timeout=CALL_TIMEOUT)),
        }
    held = all(code.startswith("UNAUTHENTICATED") for code in codes.values())
    return Outcome("; ".join(f"{name} {code.split(':')[0]}" for name, code in codes.items()), held)


def non_member_key(arena: Arena) -> Outcome:
    """A well-signed call from a key that never announced itself in the swarm."""
    stranger = NodeIdentity.generate()
    method = "/edgeswarm.v1.BlockService/NodeInfo"
    with _unsigned_channel(arena.node) as channel:
        raw = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        code = _code(lambda: raw(b"", timeout=CALL_TIMEOUT, metadata=call_credentials(stranger, method, arena.node_id())))
    return Outcome(code, code.startswith("PERMISSION_DENIED"))


def replayed_credential(arena: Arena) -> Outcome:
    """A member's credential captured and sent again."""
    method = "/edgeswarm.v1.BlockService/NodeInfo"
    credentials = call_credentials(process_identity(), method, arena.node_id())
    with _unsigned_channel(arena.node) as channel:
        raw = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        first = _code(lambda: raw(b"", timeout=CALL_TIMEOUT, metadata=credentials))
        again = _code(lambda: raw(b"", timeout=CALL_TIMEOUT, metadata=credentials))
    return Outcome(f"first {first.split(':')[0]}, again {again}", first == "OK" and again.startswith("UNAUTHENTICATED"))


def credential_for_another_node(arena: Arena) -> Outcome:
    """A credential a member made for node B, relayed by B to node A."""
    method = "/edgeswarm.v1.BlockService/NodeInfo"
    other = arena.swarm.nodes[1]
    credentials = call_credentials(process_identity(), method, arena.node_id(other))
    with _unsigned_channel(arena.node) as channel:
        raw = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        code = _code(lambda: raw(b"", timeout=CALL_TIMEOUT, metadata=credentials))
    return Outcome(code, code.startswith("UNAUTHENTICATED"))


def pin_displacement(arena: Arena) -> Outcome:
    """A stranger's signed record that names the victim's address with the stranger's certificate."""
    client, victim = arena.client, arena.node
    record = next(record for record in client.servers() if record.node_id == arena.node_id())
    stranger = NodeIdentity.generate()
    forged_record = replace(record, node_id=stranger.fingerprint, tls_cert=stranger.tls_certificate(["127.0.0.1"])[0].decode())
    swarm_dht.use_auth(arena.intruder_dht, RecordAuth(stranger))
    swarm_dht.announce(arena.intruder_dht, forged_record, ttl=30)
    seen = poll(lambda: stranger.fingerprint in {r.node_id for r in client.servers()}, WAIT_TIMEOUT)
    with open_channel(victim.address, arena.node_id()) as channel:
        code = _code(lambda: _node_info(channel))
    return Outcome(f"forged record {'read' if seen else 'not read'}; victim answers {code}", code == "OK")


def forged_plan_coordinator(arena: Arena) -> Outcome:
    """A plan signed by a stranger that names itself first among the plan's members."""
    records = arena.client.servers()
    members = participants([replace(record, partition="pipeline") for record in records], "pipeline")
    stranger = "0" * 8 + "-stranger"
    value = {"partition": "pipeline", "plan": {"stages": [], "objective": "throughput"}, "members": [stranger, *[m.node_id for m in members]]}
    accepted = plan_from_record(value, stranger, "pipeline", members)
    return Outcome("accepted" if accepted else "ignored: not the coordinator the members elect", accepted is None)


def restart_with_same_identity(arena: Arena) -> Outcome:
    """A node restarted with its identity must be routable at once, not after its offline record expires."""
    identity_file = arena.work_dir / "restarting.key"
    node = start_node(["--blocks", "0:15", "--identity", str(identity_file), "--tls"], arena.swarm.initial_peers)
    node_id = node.info["node_id"]
    node.stop(signal.SIGTERM)  # it announces itself offline as it leaves
    node = start_node(["--blocks", "0:15", "--identity", str(identity_file), "--tls"], arena.swarm.initial_peers)
    began = time.monotonic()
    try:
        online = poll(lambda: _state_of(arena, node_id) == ONLINE, RESTART_GRACE)
    finally:
        node.stop(signal.SIGKILL)
    seconds = time.monotonic() - began
    return Outcome(f"{'online' if online else 'still offline'} {seconds:.1f} s after it reported ready", bool(online))


def _state_of(arena: Arena, node_id: str) -> str | None:
    """The state in the node's newest authentic record in the DHT (online or offline), None if absent."""
    record = swarm_dht.fetch_subkeys(arena.client.dht, servers_key(arena.client.model.model_id)).get(node_id)
    return record.get("state") if isinstance(record, dict) else None


class _HeldOpen:
    """A request iterator that sends its requests, then keeps the stream open (idle) until released."""

    def __init__(self, requests: list, released: threading.Event):
        self._requests, self._released = iter(requests), released

    def __iter__(self):
        return self

    def __next__(self):
        for request in self._requests:
            return request
        self._released.wait(timeout=WAIT_TIMEOUT)
        raise StopIteration


def _opening(arena: Arena, session_id: str, max_length: int) -> pb.SessionRequest:
    start, end = arena.node.blocks
    return pb.SessionRequest(open=pb.SessionOpen(session_id=session_id, model_id=arena.client.model.model_id,
                                                 start_block=start, end_block=end, max_length=max_length))


def _step(batch: int, tokens: int, hidden_size: int) -> pb.SessionRequest:
    return pb.SessionRequest(step=pb.SessionStep(
        hidden_states=serialize_tensor(torch.zeros(batch, tokens, hidden_size)),
        position_ids=serialize_tensor(torch.arange(tokens).repeat(batch, 1)),
        attention_mask=serialize_tensor(torch.ones(batch, tokens, dtype=torch.bool))))


def huge_first_batch(arena: Arena) -> Outcome:
    """A session opened for one sequence whose first step carries 48: KV far beyond the node's budget."""
    hidden_size = arena.client.model.config.hidden_size
    before = _info(arena).kv_reserved_bytes
    with open_channel(arena.node.address, arena.node_id()) as channel:
        requests = [_opening(arena, "huge-batch", 8192), _step(48, 4, hidden_size)]
        code = _code(lambda: pb_grpc.BlockServiceStub(channel).InferenceSession(iter(requests), timeout=CALL_TIMEOUT))
    after = _info(arena).kv_reserved_bytes
    return Outcome(f"{code}; KV reserved {before} -> {after} bytes", code.startswith("RESOURCE_EXHAUSTED") and after == before)


def rollback_out_of_range(arena: Arena) -> Outcome:
    """Speculative rollbacks (SessionStep.truncate_to) past the end of the cache, and negative ones."""
    hidden_size = arena.client.model.config.hidden_size
    codes = []
    with open_channel(arena.node.address, arena.node_id()) as channel:
        for index, position in enumerate((-5, 1 << 30)):
            rollback = _step(1, 1, hidden_size)
            rollback.step.step_id, rollback.step.truncate_to = 1, position
            requests = [_opening(arena, f"rollback-{index}", 16), _step(1, 3, hidden_size), rollback]
            codes.append(_code(lambda: pb_grpc.BlockServiceStub(channel).InferenceSession(iter(requests), timeout=CALL_TIMEOUT)))
    served = _code(lambda: _info(arena))
    refused = all(code.startswith("INVALID_ARGUMENT") for code in codes)
    return Outcome(f"{'; '.join(code.split(':')[0] for code in codes)}; NodeInfo then {served}", refused and served == "OK")


def idle_session_flood(arena: Arena) -> Outcome:
    """One member opens far more idle sessions than its share; health and stateless calls must still answer."""
    hidden_size = arena.client.model.config.hidden_size
    released, refused, opened = threading.Event(), [], []
    with open_channel(arena.node.address, arena.node_id()) as channel:
        stub = pb_grpc.BlockServiceStub(channel)
        calls = []
        for index in range(IDLE_FLOOD_SESSIONS):
            replies = stub.InferenceSession(_HeldOpen([_opening(arena, f"idle-{index}", 16), _step(1, 1, hidden_size)], released), WAIT_TIMEOUT)
            calls.append(replies)
            try:
                next(replies)
                opened.append(index)
            except grpc.RpcError as error:
                refused.append(error.code().name)
        info_code = _code(lambda: _node_info(channel))
        forward_code = _code(lambda: stub.Forward(_forward_request(arena, hidden_size), timeout=CALL_TIMEOUT))
        released.set()
        for call in calls:
            call.cancel()
    held = bool(refused) and set(refused) == {"RESOURCE_EXHAUSTED"} and info_code == forward_code == "OK"
    return Outcome(f"{len(opened)} opened, {len(refused)} refused busy; NodeInfo {info_code}, Forward {forward_code}", held)


def pushes_into_a_forwarded_session(arena: Arena) -> Outcome:
    """Another member pushes a wrong input into a forwarded session whose step waits for its upstream
    node, floods the session with inputs for later steps, and pushes into a session that does not exist;
    the session must compute on its own client's input."""
    hidden_size = arena.client.model.config.hidden_size
    genuine, wrong = torch.zeros(1, 2, hidden_size), torch.full((1, 2, hidden_size), 1000.0)
    requests, replies_done = [_opening(arena, "forwarded", 16)], threading.Event()
    waiting = _step(1, 2, hidden_size)
    waiting.step.ClearField("hidden_states")
    waiting.step.upstream = arena.node_id(arena.swarm.nodes[1])
    requests.append(waiting)
    intruder, member = _intruder(arena)
    try:
        with open_channel(arena.node.address, arena.node_id()) as channel:
            replies = pb_grpc.BlockServiceStub(channel).InferenceSession(_HeldOpen(requests, replies_done), timeout=WAIT_TIMEOUT)
            start, end = arena.node.blocks

            def push(step: int, hidden: torch.Tensor, session_id: str = "forwarded") -> pb.PushRequest:
                return pb.PushRequest(session_id=session_id, start_block=start, end_block=end, step_id=step, hidden_states=serialize_tensor(hidden))

            poll(lambda: _push(intruder, arena.node, push(0, wrong)) == "OK", CALL_TIMEOUT)  # once the session is open
            flood = [_push(intruder, arena.node, push(step, wrong)) for step in range(1, 3 * MAX_WAITING_PUSHES)]
            missing = _push(intruder, arena.node, push(0, wrong, "no-such-session"))
            own = push(0, genuine)
            own_code = _code(lambda: pb_grpc.BlockServiceStub(channel).PushStep(own, timeout=CALL_TIMEOUT))
            reply = next(replies)
            replies_done.set()
            replies.cancel()
    finally:
        member.close()
    took_own = reply.input_digest == tensor_digest(serialize_tensor(genuine))
    busy = sum(code.startswith("RESOURCE_EXHAUSTED") for code in flood)
    held = took_own and own_code == "OK" and missing.startswith("NOT_FOUND") and busy == len(flood) - (MAX_WAITING_PUSHES - 1)
    return Outcome(f"computed on the client's input: {took_own}; flood {busy}/{len(flood)} busy; unknown session {missing.split(':')[0]}", held)


def push_to_a_stranger(arena: Arena) -> Outcome:
    """A step asking the node to push its output to a node id that is not announced in the swarm."""
    hidden_size = arena.client.model.config.hidden_size
    step = _step(1, 2, hidden_size)
    step.step.push_to.CopyFrom(pb.PushTarget(node_id="attacker-chosen", session_id="x", start_block=0, end_block=1, step_id=0))
    with open_channel(arena.node.address, arena.node_id()) as channel:
        replies = list(pb_grpc.BlockServiceStub(channel).InferenceSession(iter([_opening(arena, "push-to-stranger", 16), step]), timeout=CALL_TIMEOUT))
    served = _code(lambda: _info(arena))
    error = replies[0].push_error if replies else "no reply"
    return Outcome(f"push_error: {error[:60]!r}; NodeInfo then {served}", "not announced" in error and served == "OK")


def _step_result(replies) -> tasks_pb2.StepResult:
    return next(update.result for update in replies if update.WhichOneof("update") == "result")


def python_where_not_allowed(arena: Arena) -> Outcome:
    """A member asks a node whose operator did not allow code-running tools to run Python."""
    with open_channel(arena.node.address, arena.node_id()) as channel:
        result = _step_result(_python_step(channel, "print(open('/etc/hostname').read())"))
    return Outcome(f"ok={result.ok}: {result.error[:80]}", not result.ok and "off on node" in result.error)


ESCAPE_PROGRAM = """
import json, os, subprocess, sys
targets, reached = json.loads(TARGETS), []
for path in targets["files"]:
    try:
        with open(path, "rb") as file:
            reached.append(f"read {path}: {len(file.read())} bytes")
    except OSError:
        pass
try:
    os.kill(targets["pid"], 0)
    reached.append("may signal the node")
except OSError:
    pass
if os.fork() == 0:  # a daemon that means to outlive the tool
    os.setsid()
    if os.fork() == 0:
        os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(300)", targets["marker"]])
    os._exit(0)
print(json.dumps(reached))
"""


def python_sandbox_escapes(arena: Arena) -> Outcome:
    """On a node that allows `python`: read its environment, identity key, memory and /etc/shadow, signal
    it, and leave a setsid daemon behind."""
    node = arena.swarm.nodes[1]
    marker = f"edgeswarm-attack-daemon-{time.time_ns()}"
    files = [f"/proc/{node.process.pid}/environ", f"/proc/{node.process.pid}/cmdline", "/etc/shadow",
             *(str(path) for path in arena.work_dir.rglob("*") if path.is_file())]
    targets = json.dumps({"files": files, "pid": node.process.pid, "marker": marker})
    with open_channel(node.address, arena.node_id(node)) as channel:
        result = _step_result(_python_step(channel, f"TARGETS = {targets!r}\n" + ESCAPE_PROGRAM))
    reached = json.loads(json.loads(result.value_json)["stdout"] or "[]") if result.ok else [f"tool failed: {result.error}"]
    survivors = poll(lambda: not _processes_with(marker), WAIT_TIMEOUT) and _processes_with(marker)
    alive = node.process.poll() is None
    observed = f"reached {reached or 'nothing'} of {len(files)} files and the node; daemons left: {len(survivors)}; node alive: {alive}"
    return Outcome(observed, result.ok and not reached and not survivors and alive)


def _processes_with(marker: str) -> list[int]:
    """Host processes whose command line holds `marker`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker.encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _api_node(arena: Arena) -> NodeProcess:
    return arena.swarm.nodes[1]


def _https(arena: Arena, path: str, token: str | None = API_TOKEN) -> int:
    """The HTTP status of a GET on the API node's HTTPS endpoint."""
    node = _api_node(arena)
    context = ssl.create_default_context(cadata=node.info["tls_cert"])
    context.check_hostname = False
    request = urllib.request.Request(f"https://{node.info['http_address']}{path}", headers={"authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, context=context, timeout=CALL_TIMEOUT) as reply:
            return reply.status
    except urllib.error.HTTPError as error:
        return error.code


def slowloris(arena: Arena) -> Outcome:
    """More connections than the HTTP server admits, each trickling its request head a byte at a time."""
    node = _api_node(arena)
    host, port = node.info["http_address"].rsplit(":", 1)
    threads_before = _threads_of(node)
    context = ssl.create_default_context(cadata=node.info["tls_cert"])
    context.check_hostname = False
    began, sockets = time.monotonic(), []
    for _ in range(SLOWLORIS_CONNECTIONS):
        try:
            sockets.append(context.wrap_socket(socket.create_connection((host, int(port)), timeout=CALL_TIMEOUT)))
        except OSError:  # refused at once: the server is full
            continue
    alive = list(sockets)
    while alive and time.monotonic() - began < WAIT_TIMEOUT:
        for sock in list(alive):
            try:
                sock.send(b"G")
            except OSError:
                alive.remove(sock)
        time.sleep(1.0)
    threads_during = _threads_of(node)
    for sock in sockets:
        sock.close()
    status = _https(arena, "/v1/models")
    cut = time.monotonic() - began
    held = not alive and status == 200 and threads_during <= threads_before + SLOWLORIS_THREAD_SLACK
    return Outcome(f"{SLOWLORIS_CONNECTIONS - len(sockets)} refused at once, {len(sockets)} cut within {cut:.0f} s; node threads {threads_before} -> {threads_during}; then a client got {status}", held)


def request_flood(arena: Arena) -> Outcome:
    """One API client sends requests far faster than its rate."""
    statuses = [_https(arena, "/v1/models") for _ in range(FLOOD_REQUESTS)]
    refused = statuses.count(429)
    return Outcome(f"{statuses.count(200)} served, {refused} refused with 429", refused > 0 and set(statuses) <= {200, 429})


def wrong_api_token(arena: Arena) -> Outcome:
    status = _https(arena, "/v1/models", token="guess")
    return Outcome(f"HTTP {status}", status in (401, 429))


def garbage_to_swarm_api(arena: Arena) -> Outcome:
    """Bytes that do not parse as the request message, to every SwarmAPI method."""
    node = _api_node(arena)
    credentials = grpc.ssl_channel_credentials(root_certificates=node.info["tls_cert"].encode())
    codes = {}
    with grpc.secure_channel(node.info["api_address"], credentials, options=[("grpc.ssl_target_name_override", node.info["node_id"])]) as channel:
        for method in api_pb2.DESCRIPTOR.services_by_name["SwarmAPI"].methods:
            call = (channel.unary_stream if method.server_streaming else channel.unary_unary)(
                f"/{method.containing_service.full_name}/{method.name}", request_serializer=None, response_deserializer=None)
            codes[method.name] = _code(lambda: call(b"\xff\x00garbage", timeout=CALL_TIMEOUT, metadata=[("authorization", f"Bearer {API_TOKEN}")])).split(":")[0]
    held = set(codes.values()) == {"INVALID_ARGUMENT"}
    return Outcome(", ".join(sorted(f"{name} {code}" for name, code in codes.items())) if not held else f"all {len(codes)} methods INVALID_ARGUMENT", held)


def _threads_of(node: NodeProcess) -> int:
    status = Path(f"/proc/{node.process.pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("Threads:")).split()[1])


MEMORY_NAMESPACE = "attack-suite-diary"
MEMORY_FACT = "The vault combination is 31-41-59."


def _memory_step(identity: NodeIdentity, node: NodeProcess, kind: str, args: dict) -> str:
    """A memory step sent to `node`, signed by `identity`: "OK", or the refusal."""
    channel = grpc.intercept_channel(_unsigned_channel(node), SignedCalls(identity, node.info["node_id"]))
    request = tasks_pb2.StepRequest(run_id="attack", step_id="memory", kind=kind, args_json=json.dumps(args))
    with channel:
        code = _code(lambda: [update for update in tasks_pb2_grpc.TaskServiceStub(channel).RunStep(request, timeout=CALL_TIMEOUT)])
    return code


def _intruder(arena: Arena) -> tuple[NodeIdentity, MemberAnnouncer]:
    """A second member of the swarm, with a key of its own (close the announcer when done)."""
    intruder = NodeIdentity.generate()
    swarm_dht.use_auth(arena.intruder_dht, RecordAuth(intruder))
    return intruder, MemberAnnouncer(arena.intruder_dht, intruder.fingerprint, "client")


def _push(identity: NodeIdentity, node: NodeProcess, request: pb.PushRequest) -> str:
    channel = grpc.intercept_channel(_unsigned_channel(node), SignedCalls(identity, node.info["node_id"]))
    with channel:
        return _code(lambda: pb_grpc.BlockServiceStub(channel).PushStep(request, timeout=CALL_TIMEOUT))


def another_clients_memory(arena: Arena) -> Outcome:
    """A second member reads and overwrites the first one's namespace: with no token, and with a token it
    signed itself claiming the owner's rights."""
    owner, client = arena.client.identity.fingerprint, arena.client
    holders = client.remember(MEMORY_NAMESPACE, MEMORY_FACT, record_id="vault")
    intruder, member = _intruder(arena)
    try:
        store = client.agents.scheduler.storage_id(owner, MEMORY_NAMESPACE)
        forged = issue_access(intruder, owner, store, (READ, WRITE), 600)
        outcomes = []
        for holder in (node for node in arena.swarm.nodes if node.info["node_id"] in holders):
            for access in (None, forged):
                base = {"owner": owner, "namespace": MEMORY_NAMESPACE, **({"access": access} if access else {})}
                outcomes.append(_memory_step(intruder, holder, "memory.search", {**base, "query": "vault", "k": 3}))
                outcomes.append(_memory_step(intruder, holder, "memory.write", {**base, "text": "The vault is open.", "record_id": "vault"}))
    finally:
        member.close()
    intact = [hit["text"] for hit in client.recall(MEMORY_NAMESPACE, "vault combination", k=1)] == [MEMORY_FACT]
    codes = sorted({outcome.split(":")[0] for outcome in outcomes})
    return Outcome(f"{len(outcomes)} reads and writes: {', '.join(codes)}; owner's fact intact: {intact}", codes == ["PERMISSION_DENIED"] and intact)


def namespace_names_in_the_dht(arena: Arena) -> Outcome:
    """Anyone can read the capability records: do they give away what namespaces are called?"""
    client = arena.client
    client.remember(MEMORY_NAMESPACE, MEMORY_FACT, record_id="vault")
    store = client.agents.scheduler.storage_id(client.identity.fingerprint, MEMORY_NAMESPACE)
    published = lambda: repr(client.dht.get(tasks_key(client.model.model_id), latest=True).value)  # noqa: E731
    announced = poll(lambda: store in published(), WAIT_TIMEOUT)
    leaked = MEMORY_NAMESPACE in published()
    return Outcome(f"storage id {'announced' if announced else 'not seen'}; name {'LEAKED' if leaked else 'absent'}", bool(announced) and not leaked)


def _forward_request(arena: Arena, hidden_size: int, tokens: int = 3) -> pb.ForwardRequest:
    start, end = arena.node.blocks
    return pb.ForwardRequest(
        model_id=arena.client.model.model_id, start_block=start, end_block=end,
        hidden_states=serialize_tensor(torch.zeros(1, tokens, hidden_size)),
        position_ids=serialize_tensor(torch.arange(tokens)[None]),
        attention_mask=serialize_tensor(torch.ones(1, tokens, dtype=torch.bool)))


def _info(arena: Arena) -> pb.NodeInfoResponse:
    with open_channel(arena.node.address, arena.node_id()) as channel:
        return _node_info(channel)


ATTACKS = [
    Attack("unsigned calls to the data plane and TaskService", "UNAUTHENTICATED", unsigned_calls),
    Attack("signed call from a key that is not a member", "PERMISSION_DENIED", non_member_key),
    Attack("replayed call credential", "UNAUTHENTICATED", replayed_credential),
    Attack("credential relayed to another node", "UNAUTHENTICATED", credential_for_another_node),
    Attack("record naming a victim's address, to displace its TLS pin", "victim still reachable", pin_displacement),
    Attack("plan signed by a self-named coordinator", "plan ignored", forged_plan_coordinator),
    Attack("restart with the same identity", "online at once", restart_with_same_identity),
    Attack("python on a node that did not allow it", "refused: off on this node", python_where_not_allowed),
    Attack("python sandbox escapes: node's environ, key, memory, /etc/shadow, signals, daemons", "nothing reached", python_sandbox_escapes),
    Attack(f"slowloris: {SLOWLORIS_CONNECTIONS} connections trickling request heads", "all cut; threads bounded; API still serves", slowloris),
    Attack("API request with a guessed token", "401 (or 429)", wrong_api_token),
    Attack("garbage bytes to every SwarmAPI method", "INVALID_ARGUMENT", garbage_to_swarm_api),
    Attack(f"{FLOOD_REQUESTS} requests at once from one API client", "429 past its rate", request_flood),
    Attack("read and overwrite another client's memory namespace", "PERMISSION_DENIED; fact intact", another_clients_memory),
    Attack("namespace names in the DHT's capability records", "only keyed hashes", namespace_names_in_the_dht),
    Attack("first step with 48x the batch the session reserved", "RESOURCE_EXHAUSTED, nothing reserved", huge_first_batch),
    Attack("speculative rollback before the start or past the end of the cache", "INVALID_ARGUMENT; node serves", rollback_out_of_range),
    Attack(f"{IDLE_FLOOD_SESSIONS} idle sessions from one member", "cap per client; NodeInfo and Forward answer", idle_session_flood),
    Attack("another member pushes a wrong input and a flood into a forwarded session", "client's input used; flood busy; NOT_FOUND", pushes_into_a_forwarded_session),
    Attack("a step asking the node to push to a node id not in the swarm", "push refused; node serves", push_to_a_stranger),
]


def run_attacks(arena: Arena, attacks: list[Attack]) -> list[dict]:
    rows = []
    for attack in attacks:
        began = time.monotonic()
        try:
            outcome = attack.run(arena)
        except Exception as error:  # an attack that breaks the harness counts as not refused
            outcome = Outcome(f"harness error: {error!r}"[:120], False)
        rows.append({"attack": attack.name, "expected": attack.expected, "observed": outcome.observed,
                     "held": outcome.held, "seconds": round(time.monotonic() - began, 1)})
        print(f"  {'held' if outcome.held else 'BROKEN':6} {attack.name}: {outcome.observed}", flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    print("\n| attack | expected | observed | result |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['attack']} | {row['expected']} | {row['observed']} | {'held' if row['held'] else '**BROKEN**'} |")
    broken = sum(not row["held"] for row in rows)
    print(f"\n{len(rows) - broken} of {len(rows)} attacks refused or harmless")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds the whole run may take")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    timer = threading.Timer(args.timeout, lambda: (print(f"attack suite: over {args.timeout:.0f} s, stopping", flush=True), _exit_now()))
    timer.daemon = True
    timer.start()
    work_dir = Path(__import__("tempfile").mkdtemp(prefix="edgeswarm-attacks-"))
    secret_node = ["--identity", str(work_dir / "node.key"), "--data-dir", str(work_dir / "data"), "--api-port", "0", "--http-port", "0", "--api-token", API_TOKEN]
    nodes = [["--blocks", "0:15", "--tls"], ["--blocks", "15:30", "--tls", "--allow-tools", "python", *secret_node]]
    patient = SessionPolicy(connect_timeout=CALL_TIMEOUT)  # the attacks load the machine; the arena's own calls must not time out
    with LocalSwarm(nodes) as swarm, SwarmClient(swarm.initial_peers, mdns=False, policy=patient) as client:
        intruder_dht = swarm_dht.start_dht(swarm.initial_peers, client_mode=True)
        try:
            poll(lambda: len(client.servers()) == len(nodes), WAIT_TIMEOUT)
            rows = run_attacks(Arena(swarm, client, intruder_dht, work_dir), ATTACKS)
        finally:
            intruder_dht.shutdown()
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0 if all(row["held"] for row in rows) else 1


def _exit_now() -> None:
    import os

    os._exit(2)


if __name__ == "__main__":
    sys.exit(main())
