"""Memory access tokens (protocol.memory_access) and who a node lets run memory steps (node.task_worker).

The servicer-level tests pass a context with a `principal`, as the call-auth interceptor sets it; the
tests against real node processes are in test_memory_swarm.
"""

from __future__ import annotations

import base64
import json

import grpc
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeswarm.agent.memory_placement import storage_id
from edgeswarm.agent.memory_replication import MemoryReplicator
from edgeswarm.agent.tools import ToolRegistry
from edgeswarm.agent.vector_store import VectorStore
from edgeswarm.node.task_service import TaskServicer
from edgeswarm.node.task_worker import StepError, TaskWorker
from edgeswarm.proto import tasks_pb2 as pb
from edgeswarm.protocol.identity import NodeIdentity
from edgeswarm.protocol.memory_access import (
    ACCESS_DOMAIN,
    READ,
    WRITE,
    MemoryAccessError,
    check_access,
    issue_access,
    read_access,
)
from edgeswarm.protocol.principals import Principal
from tests.test_agent_memory import TinyEmbedder

ALICE, BOB, CAROL, NODE = (NodeIdentity.generate() for _ in range(4))
NOW = 1_700_000_000.0
NAME = "diary"
STORE = storage_id(ALICE.fingerprint, NAME, None)


def token(identity=ALICE, owner=None, store=STORE, rights=(READ, WRITE), ttl=60.0, grantee="", parent=None, now=NOW) -> str:
    return issue_access(identity, owner or identity.fingerprint, store, rights, ttl, grantee=grantee, parent=parent, now=now)


def check(value: str, right=READ, caller=None, owner=None, store=STORE, now=NOW + 1):
    return check_access(value, owner or ALICE.fingerprint, store, right, caller, now=now)


# --------------------------------------------------------------------------- tokens


def test_an_owners_token_opens_its_namespace_for_its_rights_until_it_expires():
    access = check(token(rights=(READ,)))
    assert access.owner == ALICE.fingerprint and access.rights == {READ} and access.signer == ALICE.fingerprint
    with pytest.raises(MemoryAccessError, match="right to write"):
        check(token(rights=(READ,)), right=WRITE)
    with pytest.raises(MemoryAccessError, match="expired"):
        check(token(ttl=60), now=NOW + 61)
    with pytest.raises(MemoryAccessError, match="another namespace"):
        check(token(store=storage_id(ALICE.fingerprint, "other", None)))


def test_a_token_for_someone_elses_namespace_is_refused():
    forged = token(identity=BOB, owner=ALICE.fingerprint)  # Bob signs a token claiming Alice's namespace
    with pytest.raises(MemoryAccessError, match="not by the owner"):
        check(forged)
    with pytest.raises(MemoryAccessError, match="another namespace"):
        check(token(identity=BOB), owner=ALICE.fingerprint)  # Bob's own token, presented for Alice's namespace


def test_tampered_and_garbage_tokens_are_refused_with_a_reason():
    genuine = token()
    raw = base64.urlsafe_b64decode(genuine + "=" * (-len(genuine) % 4))
    body, signature = msgpack.unpackb(raw)
    fields = msgpack.unpackb(body)
    fields[4] += 10**6  # a later expiry
    tampered = msgpack.packb([msgpack.packb(fields), signature])
    with pytest.raises(MemoryAccessError, match="signature does not hold"):
        read_access(base64.urlsafe_b64encode(tampered).decode())
    fields[6] = BOB.public_key_bytes  # re-signed by Bob, with Bob's key in the body, still claiming Alice's namespace
    resigned_body = msgpack.packb(fields)
    resigned = msgpack.packb([resigned_body, BOB.sign(ACCESS_DOMAIN + resigned_body)])
    with pytest.raises(MemoryAccessError, match="not by the owner"):
        check(base64.urlsafe_b64encode(resigned).decode())
    for garbage in ["", "!!!", "a" * 5000, base64.urlsafe_b64encode(b"\x93\x01\x02\x03").decode(),
                    base64.urlsafe_b64encode(msgpack.packb([b"x", b"y" * 64])).decode(), 7, None]:
        with pytest.raises(MemoryAccessError):
            check(garbage)


GENUINE = base64.urlsafe_b64decode(token() + "==")


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.text(max_size=300),
        st.binary(max_size=400).map(lambda raw: base64.urlsafe_b64encode(raw).decode()),
        st.tuples(st.integers(0, len(GENUINE) - 1), st.integers(1, 255)).map(
            lambda flip: base64.urlsafe_b64encode(GENUINE[: flip[0]] + bytes([GENUINE[flip[0]] ^ flip[1]]) + GENUINE[flip[0] + 1 :]).decode()
        ),
    )
)
def test_garbage_and_bit_flipped_tokens_raise_only_memory_access_error(value):
    with pytest.raises(MemoryAccessError):
        check(value)


def test_a_grant_is_for_its_grantee_only():
    grant = token(rights=(READ,), grantee=BOB.fingerprint, ttl=3600)
    assert check(grant, caller=BOB.fingerprint).grantee == BOB.fingerprint
    for caller in (CAROL.fingerprint, None):
        with pytest.raises(MemoryAccessError, match="granted to"):
            check(grant, caller=caller)


def test_a_grantee_delegates_its_grant_to_the_nodes_that_run_its_agent():
    grant = token(rights=(READ,), grantee=BOB.fingerprint, ttl=3600)
    delegated = token(identity=BOB, owner=ALICE.fingerprint, rights=(READ,), parent=grant)
    access = check(delegated, caller=NODE.fingerprint)  # a bearer token: the coordinator presents it
    assert access.signer == BOB.fingerprint and access.parent.signer == ALICE.fingerprint
    with pytest.raises(MemoryAccessError, match="grantee"):
        check(token(identity=CAROL, owner=ALICE.fingerprint, rights=(READ,), parent=grant))  # Carol stole Bob's grant
    with pytest.raises(MemoryAccessError, match="right to write"):
        check(token(identity=BOB, owner=ALICE.fingerprint, rights=(READ, WRITE), parent=grant), right=WRITE)
    with pytest.raises(MemoryAccessError, match="grant expired"):
        check(token(identity=BOB, owner=ALICE.fingerprint, rights=(READ,), ttl=10**6, parent=grant), now=NOW + 3601)
    twice = token(identity=CAROL, owner=ALICE.fingerprint, rights=(READ,), parent=delegated)
    with pytest.raises(MemoryAccessError, match="delegated once"):
        check(twice)


def test_a_node_signs_for_its_api_clients():
    owner = Principal.api_client(NODE.fingerprint, "alice").id
    store = storage_id(owner, NAME, None)
    assert check(token(identity=NODE, owner=owner, store=store), owner=owner, store=store).owner == owner
    with pytest.raises(MemoryAccessError, match="not by the owner"):
        check(token(identity=BOB, owner=owner, store=store), owner=owner, store=store)


# --------------------------------------------------------------------------- a node's memory steps


class Context:
    """A servicer context as the call-auth interceptor leaves it: the caller is `principal`."""

    def __init__(self, principal: Principal | None):
        self.principal = principal
        self.code = self.details = None

    def abort(self, code, details):
        self.code, self.details = code, details
        raise grpc.RpcError(details)

    def is_active(self) -> bool:
        return True


@pytest.fixture
def worker():
    with VectorStore(None, TinyEmbedder()) as store:
        yield TaskWorker(NODE.fingerprint, ToolRegistry([]), store, None)


def step(kind: str, **args) -> pb.StepRequest:
    return pb.StepRequest(run_id="r", step_id="s", kind=kind, args_json=json.dumps(args))


def run_step(servicer: TaskServicer, request: pb.StepRequest, caller: Principal | None):
    context = Context(caller)
    try:
        updates = list(servicer.RunStep(request, context))
    except grpc.RpcError:
        return context.code, context.details
    return grpc.StatusCode.OK, json.loads(updates[-1].result.value_json) if updates[-1].result.ok else updates[-1].result.error


def test_the_owner_reads_and_writes_its_namespace_and_others_are_denied(worker):
    servicer = TaskServicer(worker, coordinator=None)
    alice, bob = Principal(ALICE.fingerprint), Principal(BOB.fingerprint)
    write = step("memory.write", owner=ALICE.fingerprint, namespace=NAME, text="the safe code is 4711", record_id="safe")
    search = step("memory.search", owner=ALICE.fingerprint, namespace=NAME, query="safe code", k=3)
    assert run_step(servicer, write, alice) == (grpc.StatusCode.OK, {"record_id": "safe"})
    status, value = run_step(servicer, search, alice)
    assert status == grpc.StatusCode.OK and value["hits"][0]["text"] == "the safe code is 4711"
    assert worker.memory.namespaces() == [STORE]  # kept under the storage id, not the name
    for caller in (bob, None, Principal.api_client(ALICE.fingerprint, "x")):
        for request in (write, search):
            status, details = run_step(servicer, request, caller)
            assert status == grpc.StatusCode.PERMISSION_DENIED and "needs an access token from its owner" in details


def test_a_caller_with_a_valid_token_is_let_in_and_a_bad_token_is_refused(worker):
    servicer = TaskServicer(worker, coordinator=None)
    bob = Principal(BOB.fingerprint)
    grant = issue_access(ALICE, ALICE.fingerprint, STORE, (READ,), 60, grantee=BOB.fingerprint)
    search = {"owner": ALICE.fingerprint, "namespace": NAME, "query": "anything"}
    assert run_step(servicer, step("memory.search", **search, access=grant), bob) == (grpc.StatusCode.OK, {"hits": []})
    write = {"owner": ALICE.fingerprint, "namespace": NAME, "text": "planted"}
    status, details = run_step(servicer, step("memory.write", **write, access=grant), bob)
    assert status == grpc.StatusCode.PERMISSION_DENIED and "right to write" in details
    expired = issue_access(ALICE, ALICE.fingerprint, STORE, (READ,), 60, now=NOW)
    status, details = run_step(servicer, step("memory.search", **search, access=expired), bob)
    assert status == grpc.StatusCode.PERMISSION_DENIED and "expired" in details
    forged = issue_access(BOB, ALICE.fingerprint, STORE, (READ, WRITE), 60)
    status, details = run_step(servicer, step("memory.write", **write, access=forged), bob)
    assert status == grpc.StatusCode.PERMISSION_DENIED and "not by the owner" in details
    assert worker.memory.count(STORE) == 0


def test_malformed_memory_steps_are_invalid_arguments(worker):
    servicer = TaskServicer(worker, coordinator=None)
    alice = Principal(ALICE.fingerprint)
    for args in ({"namespace": NAME, "query": "q"}, {"owner": ALICE.fingerprint, "namespace": "bad name", "query": "q"},
                 {"owner": 5, "namespace": NAME, "query": "q"}):
        status, _ = run_step(servicer, step("memory.search", **args), alice)
        assert status == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(StepError):
        worker.authorize("memory.write", {"owner": ALICE.fingerprint}, alice)


# --------------------------------------------------------------------------- replication handlers


class Directory:
    """The capability records a node sees: node ids that announce memory."""

    def __init__(self, *node_ids: str):
        self.node_ids = node_ids

    def __call__(self):
        from edgeswarm.agent.capabilities import TaskCapabilities

        return [TaskCapabilities(node_id=node_id, address="127.0.0.1:1") for node_id in self.node_ids]


def test_only_other_memory_nodes_may_compare_and_push_replicas(worker):
    peer, stranger = NodeIdentity.generate(), NodeIdentity.generate()
    replicator = MemoryReplicator(NODE.fingerprint, worker.memory, Directory(NODE.fingerprint, peer.fingerprint), channel=None)
    servicer = TaskServicer(worker, coordinator=None, replicator=replicator)
    record = worker.memory.write(STORE, "a replicated fact", record_id="fact")
    pushed = pb.MemoryRecords(store=STORE, records_json=[json.dumps({**record.to_dict(), "id": "copied", "created": 1.0})])
    compare = pb.MemoryDigests(stores=[pb.MemoryDigest(store=STORE, digest=b"theirs")])
    for caller in (None, Principal(stranger.fingerprint), Principal.api_client(peer.fingerprint, "x"), Principal(NODE.fingerprint)):
        for method, request in ((servicer.CompareMemory, compare), (servicer.PutMemoryRecords, pushed)):
            context = Context(caller)
            with pytest.raises(grpc.RpcError):
                method(request, context)
            assert context.code == grpc.StatusCode.PERMISSION_DENIED
    assert worker.memory.count(STORE) == 1
    context = Context(Principal(peer.fingerprint))
    [inventory] = servicer.CompareMemory(compare, context).stores
    assert (inventory.store, list(inventory.record_ids), list(inventory.created)) == (STORE, ["fact"], [record.created])
    assert servicer.PutMemoryRecords(pushed, context).stored == 1
    assert servicer.PutMemoryRecords(pushed, context).stored == 0  # idempotent
    assert worker.memory.get(STORE, "copied").text == "a replicated fact"
    agreed = pb.MemoryDigests(stores=[pb.MemoryDigest(store=STORE, digest=worker.memory.digest(STORE))])
    assert list(servicer.CompareMemory(agreed, context).stores) == []
    for bad in (pb.MemoryRecords(store="not-a-storage-id", records_json=[]), pb.MemoryRecords(store=STORE, records_json=["{"]),
                pb.MemoryRecords(store=STORE, records_json=[json.dumps({"id": "x"})])):
        context = Context(Principal(peer.fingerprint))
        with pytest.raises(grpc.RpcError):
            servicer.PutMemoryRecords(bad, context)
        assert context.code == grpc.StatusCode.INVALID_ARGUMENT
