"""Per-call credentials (protocol.call_auth) and swarm membership (swarm.membership): every call to a node
is signed by a member's identity; unsigned, forged, stale, replayed, misdirected and non-member calls
are refused, on real nodes and a real DHT."""

import grpc
import pytest
import torch

from devtools.launcher import start_node
from edgeswarm import SwarmClient
from edgeswarm.proto import dataplane_pb2 as pb
from edgeswarm.proto import dataplane_pb2_grpc as pb_grpc
from edgeswarm.proto import tasks_pb2, tasks_pb2_grpc
from edgeswarm.protocol.call_auth import (
    CALL_FRESHNESS_SECONDS,
    CALL_METADATA,
    CALL_SIGNATURE_METADATA,
    CALLER_KEY_METADATA,
    CallAuthenticator,
    CallRefused,
    call_credentials,
)
from edgeswarm.protocol.identity import NodeIdentity
from edgeswarm.protocol.principals import Principal
from edgeswarm.protocol.swarm_key import SWARM_AUTH_METADATA, call_token
from edgeswarm.swarm.errors import NodeBusyError
from edgeswarm.swarm.routing import Hop
from edgeswarm.swarm.transport import SpanStream
from tests.support import node_channel, one_step, swarm_member, wait_until

METHOD = "/edgeswarm.v1.BlockService/NodeInfo"
NOW = 1_800_000_000.0


def _authenticator(members=(), swarm_key=None, node="node-1"):
    return CallAuthenticator(node, is_member=lambda caller: caller in members, swarm_key=swarm_key, clock=lambda: NOW)


def _credentials(identity, method=METHOD, target="node-1", at=NOW):
    return dict(call_credentials(identity, method, target, now=at))


def _refusal(authenticator, metadata, method=METHOD) -> CallRefused:
    with pytest.raises(CallRefused) as refused:
        authenticator.authenticate(method, metadata)
    return refused.value


def test_a_members_signed_call_names_its_principal():
    caller = NodeIdentity.generate()
    principal = _authenticator({caller.fingerprint}).authenticate(METHOD, _credentials(caller))
    assert principal == Principal(caller.fingerprint) and not principal.is_api_client


@pytest.mark.parametrize(
    "change, code, reason",
    [
        (lambda m: {}, grpc.StatusCode.UNAUTHENTICATED, "must be signed"),
        (lambda m: {**m, CALL_SIGNATURE_METADATA: _credentials(NodeIdentity.generate())[CALL_SIGNATURE_METADATA]}, grpc.StatusCode.UNAUTHENTICATED, "does not hold"),
        (lambda m: {**m, CALLER_KEY_METADATA: "not base64!"}, grpc.StatusCode.UNAUTHENTICATED, "malformed"),
        (lambda m: {**m, CALL_METADATA: "nan:" + "0" * 32}, grpc.StatusCode.UNAUTHENTICATED, "malformed"),
        (lambda m: {**m, CALL_METADATA: "x" * 10_000}, grpc.StatusCode.UNAUTHENTICATED, "oversized"),
    ],
)
def test_unsigned_forged_and_malformed_credentials_are_refused(change, code, reason):
    caller = NodeIdentity.generate()
    refusal = _refusal(_authenticator({caller.fingerprint}), change(_credentials(caller)))
    assert refusal.code == code and reason in str(refusal)


def test_a_credential_only_works_for_its_method_node_and_moment_and_only_once():
    caller = NodeIdentity.generate()
    authenticator = _authenticator({caller.fingerprint})
    assert "does not hold" in str(_refusal(authenticator, _credentials(caller, target="node-2")))
    assert "does not hold" in str(_refusal(authenticator, _credentials(caller), method="/edgeswarm.v1.BlockService/Forward"))
    assert "stale" in str(_refusal(authenticator, _credentials(caller, at=NOW - 2 * CALL_FRESHNESS_SECONDS)))
    assert "stale" in str(_refusal(authenticator, _credentials(caller, at=NOW + 2 * CALL_FRESHNESS_SECONDS)))
    credentials = _credentials(caller)
    authenticator.authenticate(METHOD, credentials)
    assert "replay" in str(_refusal(authenticator, credentials))


def test_a_key_nobody_announced_is_not_a_member():
    stranger = NodeIdentity.generate()
    refusal = _refusal(_authenticator(), _credentials(stranger))
    assert refusal.code == grpc.StatusCode.PERMISSION_DENIED and stranger.fingerprint in str(refusal)


def test_a_private_swarm_needs_its_key_and_still_a_signature():
    key = b"k" * 32
    caller = NodeIdentity.generate()
    authenticator = _authenticator(swarm_key=key)  # the key proves membership: no DHT record needed
    assert "swarm key is required" in str(_refusal(authenticator, _credentials(caller)))
    assert "swarm key is required" in str(_refusal(authenticator, {**_credentials(caller), SWARM_AUTH_METADATA: call_token(b"x" * 32)}))
    assert authenticator.authenticate(METHOD, {**_credentials(caller), SWARM_AUTH_METADATA: call_token(key)}).id == caller.fingerprint
    assert "must be signed" in str(_refusal(authenticator, {SWARM_AUTH_METADATA: call_token(key)}))


@pytest.fixture(scope="module")
def node(tiny_node):
    """The one node of the module's tiny swarm (tests/conftest.py)."""
    return tiny_node.nodes[0]


def _node_info(channel):
    return pb_grpc.BlockServiceStub(channel).NodeInfo(pb.NodeInfoRequest(), timeout=10)


def _answers(call):
    """The call's reply, or None if it was refused."""
    try:
        return call()
    except grpc.RpcError:
        return None


def _run_step(channel):
    request = tasks_pb2.StepRequest(run_id="r", step_id="s", kind="tool", args_json='{"name": "calculator", "arguments": {"expression": "1 + 1"}}')
    return list(tasks_pb2_grpc.TaskServiceStub(channel).RunStep(request, timeout=10))


def test_a_real_node_refuses_calls_from_strangers_and_serves_members(node):
    with grpc.insecure_channel(node.address) as plain:  # no credential at all: data plane and tasks
        for call in (_node_info, _run_step):
            with pytest.raises(grpc.RpcError) as refused:
                call(plain)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with node_channel(node) as signed:  # a valid signature, but this process has not announced itself yet
        with pytest.raises(grpc.RpcError) as refused:
            _node_info(signed)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with swarm_member(node.initial_peers):
            # once announced, it is a member (the node may remember the refusal for a moment)
            assert wait_until(lambda: _answers(lambda: _node_info(signed)), timeout=30).model_id
            # a second credential beside the member's own: the node does not pick one of them
            stranger = call_credentials(NodeIdentity.generate(), "/edgeswarm.v1.BlockService/NodeInfo", node.info["node_id"])
            with pytest.raises(grpc.RpcError) as refused:
                pb_grpc.BlockServiceStub(signed).NodeInfo(pb.NodeInfoRequest(), timeout=10, metadata=stranger)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED and "ambiguous" in refused.value.details()
            results = [update.result for update in _run_step(signed) if update.WhichOneof("update") == "result"]
            assert results[0].ok and results[0].value_json == "2"


def test_clients_in_one_process_are_each_their_own_principal(tiny_llama_dir):
    """Each client signs with its own key: with one session allowed per principal, two clients of one
    process hold one each, and a second session of either is refused."""
    node = start_node(["--model", str(tiny_llama_dir), "--blocks", "0:6", "--sessions-per-client", "1"])
    try:
        clients = [SwarmClient(node.initial_peers, model=str(tiny_llama_dir), mdns=False, identity=NodeIdentity.generate()) for _ in range(2)]
        try:
            wait_until(lambda: all(client.servers() for client in clients), "both clients see the node")
            sessions = [client.inference_session(max_length=16) for client in clients]
            for session in sessions:
                session.step(torch.tensor([[1, 2, 3]]))
            [record] = clients[0].servers()
            third = SpanStream(Hop(record, 0, 6), "third", record.model_id, 16, connect_timeout=10, identity=clients[0].identity)
            with pytest.raises(NodeBusyError, match="too many open sessions"):
                one_step(third, torch.zeros(1, 1, 64), torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool), 10)
            third.close()
            for session in sessions:
                session.close()
        finally:
            for client in clients:
                client.close()
    finally:
        node.stop()
