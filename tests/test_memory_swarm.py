"""Memory namespaces on real node processes (a tiny random Llama, so that nodes start fast): who may read
and write them, what the DHT shows of them, and that they keep every fact while replicas die and nodes
join. Tests run in file order on one swarm; the later ones kill and start nodes.

The tiny model has no tokenizer, so an agent run here fails at its first llm step; its memory read comes
before that, and that is what the run tests look at.
"""

from __future__ import annotations

import json
import signal
import time

import grpc
import pytest

from edgeswarm import SwarmClient
from edgeswarm.agent.capabilities import tasks_key
from edgeswarm.agent.client import AgentRunError, MemoryAccessDenied
from edgeswarm.agent.memory_placement import MEMORY_REPLICAS, replica_nodes
from devtools.launcher import NodeProcess, start_node
from edgeswarm.proto import tasks_pb2 as pb
from edgeswarm.proto import tasks_pb2_grpc as pb_grpc
from edgeswarm.protocol.call_auth import SignedCalls
from edgeswarm.protocol.identity import NodeIdentity
from edgeswarm.protocol.memory_access import (
    READ,
    WRITE,
    MemoryAccessError,
    issue_access,
    read_access,
)
from tests.support import wait_until

pytestmark = pytest.mark.slow
NAMESPACE = "secret-project-aurora"
WAIT = 180  # seconds any awaited condition gets: replication takes one period (10 s) plus a node's start
RUN_TIMEOUT = 120
LAUNCH_CODE = "The aurora launch code is lynx-17."


class MemorySwarm:
    """Tiny-model nodes, each with its own identity file and data dir, so one can come back as itself."""

    def __init__(self, model_dir, root):
        self.model_dir, self.root = model_dir, root
        self.nodes: dict[str, NodeProcess] = {}  # live nodes by node id
        self.count = 0

    def start(self, name: str | None = None) -> NodeProcess:
        name = name or f"node{self.count}"
        self.count += 1
        args = ["--model", str(self.model_dir), "--blocks", "0:6", "--identity", str(self.root / f"{name}.key"),
                "--data-dir", str(self.root / name)]
        peers = next(iter(self.nodes.values())).initial_peers if self.nodes else ()
        node = start_node(args, peers, log_file=self.root / f"{name}.log")
        node.name = name
        self.nodes[node.info["node_id"]] = node
        return node

    def kill(self, node_id: str) -> NodeProcess:
        node = self.nodes.pop(node_id)
        node.stop(signal.SIGKILL)
        return node

    def close(self) -> None:
        for node in self.nodes.values():
            node.stop()


@pytest.fixture(scope="module")
def swarm(tiny_llama_dir, tmp_path_factory):
    memory_swarm = MemorySwarm(tiny_llama_dir, tmp_path_factory.mktemp("memory-swarm"))
    try:
        for _ in range(3):
            memory_swarm.start()
        yield memory_swarm
    finally:
        memory_swarm.close()


def connect(swarm: MemorySwarm, identity: NodeIdentity) -> SwarmClient:
    client = SwarmClient(next(iter(swarm.nodes.values())).initial_peers, model=str(swarm.model_dir), identity=identity)
    wait_until(lambda: len(live_memory_nodes(client, swarm)) == len(swarm.nodes), "every node announced its capabilities", 60)
    return client


@pytest.fixture(scope="module")
def alice(swarm):
    with connect(swarm, NodeIdentity.generate()) as client:
        yield client


@pytest.fixture(scope="module")
def bob(swarm, alice):
    with connect(swarm, NodeIdentity.generate()) as client:
        yield client


def live_memory_nodes(client: SwarmClient, swarm: MemorySwarm) -> dict:
    """The capability records of the live nodes, by node id."""
    return {node.node_id: node for node in client.agents.directory() if node.memory and node.node_id in swarm.nodes}


def run_step(identity: NodeIdentity, node, kind: str, args: dict) -> tuple[grpc.StatusCode, object]:
    """RunStep on `node`, signed by `identity`: (OK, value) or (OK, error) from the node, or (code, details)."""
    channel = grpc.intercept_channel(grpc.insecure_channel(node.address), SignedCalls(identity, node.node_id))
    request = pb.StepRequest(run_id="direct", step_id="direct", kind=kind, args_json=json.dumps(args))
    try:
        with channel:
            for update in pb_grpc.TaskServiceStub(channel).RunStep(request, timeout=60):
                if update.WhichOneof("update") == "result":
                    result = update.result
                    return grpc.StatusCode.OK, json.loads(result.value_json) if result.ok else result.error
    except grpc.RpcError as error:
        return error.code(), error.details()
    raise AssertionError("RunStep ended without a result")


def ids_held(client: SwarmClient, node, namespace: str = NAMESPACE) -> set[str]:
    """The record ids `node` itself holds of `client`'s namespace (asked directly, as the owner)."""
    owner = client.identity.fingerprint
    token = issue_access(client.identity, owner, client.agents.scheduler.storage_id(owner, namespace), (READ,), 60)
    args = {"owner": owner, "namespace": namespace, "access": token, "query": "facts", "k": 20}
    status, value = run_step(client.identity, node, "memory.search", args)
    return {hit["id"] for hit in value["hits"]} if status == grpc.StatusCode.OK and isinstance(value, dict) else set()


def placement(client: SwarmClient, swarm: MemorySwarm, namespace: str = NAMESPACE) -> list[str]:
    """The live nodes in the rendezvous order of `client`'s namespace."""
    store = client.agents.scheduler.storage_id(client.identity.fingerprint, namespace)
    return replica_nodes(store, list(swarm.nodes), len(swarm.nodes))


def run_memory_read(task) -> dict:
    """The run's memory.read step, once the run has ended (it fails at its llm step: see the docstring)."""
    with pytest.raises(AgentRunError):
        task.result(timeout=RUN_TIMEOUT)
    events = list(task.events())
    reads = [event for event in events if event["type"] == "step.finished" and event["step_id"] == "memory.read"]
    assert len(reads) == 1, [event for event in events if event["type"] != "token"]
    return reads[0]


def test_the_dht_shows_storage_ids_and_never_namespace_names(swarm, alice):
    holders = alice.remember(NAMESPACE, LAUNCH_CODE, record_id="launch")
    assert len(holders) == MEMORY_REPLICAS == len(set(holders))
    store = alice.agents.scheduler.storage_id(alice.identity.fingerprint, NAMESPACE)

    def announced() -> list:
        return [node.node_id for node in alice.agents.directory() if store in node.namespaces]

    assert sorted(wait_until(lambda: len(announced()) >= MEMORY_REPLICAS and announced(), "the holders announce the namespace", WAIT)) == sorted(holders)
    raw = alice.dht.get(tasks_key(alice.model.model_id), latest=True)
    published = repr(raw.value)
    assert store in published and NAMESPACE not in published and "aurora" not in published


def test_a_client_cannot_read_or_write_another_clients_namespace(swarm, alice, bob):
    alice.remember(NAMESPACE, LAUNCH_CODE, record_id="launch")  # the same record as above: stored once
    owner = alice.identity.fingerprint
    first = live_memory_nodes(alice, swarm)[placement(alice, swarm)[0]]
    search = {"owner": owner, "namespace": NAMESPACE, "query": "launch code", "k": 3}
    write = {"owner": owner, "namespace": NAMESPACE, "text": "The launch code is now 0000.", "record_id": "launch"}
    # the owner itself, calling directly, needs no token
    status, value = run_step(alice.identity, first, "memory.search", search)
    assert status == grpc.StatusCode.OK and "lynx-17" in value["hits"][0]["text"]
    # Bob, calling directly: without a token, with a token he signed himself, with an expired one of Alice's
    store = alice.agents.scheduler.storage_id(owner, NAMESPACE)
    forged = issue_access(bob.identity, owner, store, (READ, WRITE), 600)
    expired = issue_access(alice.identity, owner, store, (READ, WRITE), 1, now=time.time() - 60)
    for args in (search, write):
        for access, reason in ((None, "needs an access token"), (forged, "not by the owner"), (expired, "expired")):
            attempt = args if access is None else {**args, "access": access}
            status, details = run_step(bob.identity, first, "memory.search" if "query" in args else "memory.write", attempt)
            assert status == grpc.StatusCode.PERMISSION_DENIED and reason in details, details
    # through the client API, the same name is Bob's own, empty namespace
    assert bob.recall(NAMESPACE, "launch code") == []
    with pytest.raises(MemoryAccessError, match="not by the owner"):
        bob.recall(NAMESPACE, "launch code", access=forged)
    # an agent run of Bob's cannot be pointed at Alice's namespace with a forged token
    stub = pb_grpc.TaskServiceStub(bob.agents.scheduler.channel(first.address, first.node_id))
    spec = {"goal": "What is the launch code?", "tools": [], "memory_namespace": NAMESPACE, "memory_owner": owner, "memory_access": forged}
    with pytest.raises(grpc.RpcError) as refused:
        stub.StartRun(pb.RunRequest(run_id="bobs-run", spec_json=json.dumps(spec)), timeout=30)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED and "not by the owner" in refused.value.details()
    task = bob.submit_agent_task("What is the launch code?", tools=[], memory_namespace=NAMESPACE)  # his own: nothing in it
    assert run_memory_read(task)["value"]["hits"] == []
    assert [hit["text"] for hit in alice.recall(NAMESPACE, "launch code", k=5)] == [LAUNCH_CODE]


def test_a_grant_opens_the_namespace_to_its_grantee_only(swarm, alice, bob):
    alice.remember(NAMESPACE, LAUNCH_CODE, record_id="launch")
    read_only = alice.grant(NAMESPACE, bob.identity.fingerprint, rights=(READ,), ttl=600)
    [hit] = bob.recall(NAMESPACE, "launch code", k=1, access=read_only)
    assert "lynx-17" in hit["text"]
    with pytest.raises(MemoryAccessError, match="right to write"):
        bob.remember(NAMESPACE, "planted", access=read_only)
    task = bob.submit_agent_task("What is the launch code?", tools=[], memory_namespace=NAMESPACE, memory_access=read_only)
    read = run_memory_read(task)
    assert read["ok"] and "lynx-17" in read["value"]["hits"][0]["text"]
    assert not any(event["step_id"] == "memory.write" for event in task.events() if event["type"] == "step.started")
    writer = alice.grant(NAMESPACE, bob.identity.fingerprint, rights=(READ, WRITE), ttl=600)
    assert len(bob.remember(NAMESPACE, "Bob was here.", record_id="bob", access=writer)) == MEMORY_REPLICAS
    assert any(hit["id"] == "bob" for hit in alice.recall(NAMESPACE, "Bob was here", k=3))
    # a grant to someone else is of no use to Bob, nor one that has expired
    with pytest.raises(MemoryAccessError, match="not for"):
        bob.recall(NAMESPACE, "launch code", access=alice.grant(NAMESPACE, NodeIdentity.generate().fingerprint))
    expired = alice.grant(NAMESPACE, bob.identity.fingerprint, ttl=1)
    wait_until(lambda: time.time() > read_access(expired).expires_at, "the grant expired", 10)
    with pytest.raises(MemoryAccessError, match="expired"):
        bob.recall(NAMESPACE, "launch code", access=expired)


def test_a_search_merges_every_live_replica(swarm, alice):
    """A fact on only one replica is found whichever replica comes first; and a fact written while a
    replica was down is found, then copied to that replica when it is back."""
    first_id, second_id = placement(alice, swarm)[:2]
    nodes = live_memory_nodes(alice, swarm)
    owner = alice.identity.fingerprint
    token = issue_access(alice.identity, owner, alice.agents.scheduler.storage_id(owner, NAMESPACE), (WRITE,), 60)
    only_second = {"owner": owner, "namespace": NAMESPACE, "access": token, "text": "The backup site is in Tromso.", "record_id": "site"}
    assert run_step(alice.identity, nodes[second_id], "memory.write", only_second) == (grpc.StatusCode.OK, {"record_id": "site"})
    found = alice.agents.memory_step("memory.search", {**search_args(alice, "backup site"), "k": 1})
    assert found["hits"][0]["id"] == "site" and {first_id, second_id} <= set(found["replicas"])
    # the first replica goes down; a fact written meanwhile goes to the next node in rendezvous order
    down = swarm.kill(first_id)
    holders = alice.remember(NAMESPACE, "The rendezvous point is the old mill.", record_id="mill")
    assert first_id not in holders and len(holders) == MEMORY_REPLICAS
    back = swarm.start(down.name)  # the same identity and data: first in the namespace's order again
    assert back.info["node_id"] == first_id and placement(alice, swarm)[0] == first_id
    fresh = SwarmClient(back.initial_peers, model=str(swarm.model_dir), identity=alice.identity)  # no ban of the node that died
    with fresh:
        wait_until(lambda: first_id in live_memory_nodes(fresh, swarm), "the node that came back is announced", 60)
        hits = fresh.recall(NAMESPACE, "Where is the rendezvous point?", k=1)
        assert hits[0]["id"] == "mill"
    wait_until(lambda: "mill" in ids_held(alice, back_capabilities(alice, swarm, first_id)), "the fact is copied back to the first replica", WAIT)


def back_capabilities(client: SwarmClient, swarm: MemorySwarm, node_id: str):
    return wait_until(lambda: live_memory_nodes(client, swarm).get(node_id), f"node {node_id} is announced", 60)


def search_args(client: SwarmClient, query: str) -> dict:
    owner = client.identity.fingerprint
    token = issue_access(client.identity, owner, client.agents.scheduler.storage_id(owner, NAMESPACE), (READ,), 60)
    return {"owner": owner, "namespace": NAMESPACE, "access": token, "query": query}


def full_holders(client: SwarmClient, swarm: MemorySwarm, record_ids: set[str]) -> list[str]:
    """The live nodes that hold every one of `record_ids`, in the namespace's rendezvous order."""
    nodes = live_memory_nodes(client, swarm)
    return [node_id for node_id in placement(client, swarm) if node_id in nodes and record_ids <= ids_held(client, nodes[node_id])]


def test_facts_survive_replicas_dying_one_after_another(swarm, alice):
    facts = {f"fact{index}": f"Fact number {index}: the {word} is in drawer {index}." for index, word in
             enumerate(["stapler", "compass", "lantern", "harmonica", "telescope"])}
    for record_id, text in facts.items():
        assert len(alice.remember(NAMESPACE, text, record_id=record_id)) == MEMORY_REPLICAS
    def replicated() -> list[str]:
        holders = full_holders(alice, swarm, set(facts))
        return holders if len(holders) >= MEMORY_REPLICAS else []

    for round_ in range(3):
        holders = wait_until(replicated, f"round {round_}: {MEMORY_REPLICAS} live nodes hold every fact", WAIT)
        swarm.kill(holders[0])  # a node that holds every fact: the first in the namespace's rendezvous order that does
        swarm.start()  # a new node joins; it may take the namespace's first place
        wait_until(lambda: len(live_memory_nodes(alice, swarm)) == len(swarm.nodes), "the new node is announced", 60)
    wait_until(replicated, "every fact is on two live nodes again", WAIT)
    for record_id, text in facts.items():
        assert alice.recall(NAMESPACE, text, k=1)[0]["id"] == record_id


def test_a_write_fails_when_only_one_replica_can_take_it(swarm, alice):
    survivor = next(iter(swarm.nodes))
    for node_id in [node_id for node_id in swarm.nodes if node_id != survivor]:
        swarm.kill(node_id)
    with pytest.raises(AgentRunError, match=f"reached 1 of the {MEMORY_REPLICAS} replicas") as failed:
        alice.remember(NAMESPACE, "The spare key is under the mat.", record_id="key")
    assert not isinstance(failed.value, MemoryAccessDenied) and survivor in str(failed.value)
    swarm.start()  # a second memory node: the same write now succeeds, and stores nothing twice
    wait_until(lambda: len(live_memory_nodes(alice, swarm)) == 2, "the new node is announced", 60)
    assert sorted(alice.remember(NAMESPACE, "The spare key is under the mat.", record_id="key")) == sorted(swarm.nodes)
    assert [hit["id"] for hit in alice.recall(NAMESPACE, "Where is the spare key?", k=5)].count("key") == 1
