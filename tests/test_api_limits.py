"""Limits of the node's APIs, without a swarm: the HTTP server's connection cap and request deadline
(node.openai_http), API clients with their own tokens and budgets (node.api_access), and garbage bytes
to every gRPC method answered INVALID_ARGUMENT (protocol.request_parsing).

The HTTP server here has no swarm behind it (its client factory fails: chat completions get 503), which
is all these limits need: they act before any generation. Budgets over real generation are tested in
tests/test_openai_http.py and tests/test_api.py.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from edgeswarm.node.api_access import (
    ApiAccess,
    ApiClient,
    ClientLimits,
    RateLimited,
    Unauthenticated,
    api_access,
    load_api_clients,
    token_digest,
)
from edgeswarm.node.api_service import (
    RETRY_AFTER_METADATA,
    SwarmApiServicer,
    start_api_server,
)
from edgeswarm.node.openai_http import LIGHT_WORKERS, HttpLimits, OpenAIServer
from edgeswarm.proto import (
    api_pb2,
    dataplane_pb2,
    dataplane_pb2_grpc,
    tasks_pb2,
    tasks_pb2_grpc,
)
from edgeswarm.proto import api_pb2_grpc as api_grpc
from edgeswarm.protocol.principals import Principal
from edgeswarm.protocol.request_parsing import add_servicer
from edgeswarm.swarm.client import TokenEvent
from tests.support import wait_until

DEADLINE_SECONDS = 60.0  # the bound of every wait below: generous, never reached when things work
TRICKLE_SECONDS = 0.05  # a slowloris sends one byte this often: far more often than any per-read timeout
GARBAGE = b"\xff\x00garbage"
MODEL = "m"


def _no_swarm():
    raise ConnectionError("no swarm in these tests")


def get_models(port: int, token: str | None = None) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_SECONDS)
    try:
        connection.request("GET", "/v1/models", headers={"Authorization": f"Bearer {token}"} if token else {})
        response = connection.getresponse()
        return response.status, {**dict(response.getheaders()), "body": json.loads(response.read())}
    finally:
        connection.close()


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed `sock` (waits up to DEADLINE_SECONDS for it)."""
    sock.settimeout(DEADLINE_SECONDS)
    try:
        return sock.recv(1 << 16) == b"" or closed_by_server(sock)
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


# --- the HTTP server's limits ------------------------------------------------------------------------------


def test_a_slowloris_is_cut_at_the_request_deadline_while_a_normal_client_is_served():
    limits = HttpLimits(request_deadline=2.0, keepalive=600.0)  # only the request deadline may cut it
    with OpenAIServer(_no_swarm, model_name=MODEL, limits=limits) as server:
        slowloris = socket.create_connection(("127.0.0.1", server.port))
        opened = time.monotonic()
        slowloris.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        cut = threading.Event()

        def refused_a_byte() -> bool:
            try:
                slowloris.sendall(b"a")
            except OSError:
                return True
            return False

        def trickle() -> None:  # a header that never ends, one byte at a time, until the server cuts it
            try:
                wait_until(refused_a_byte, "the server cuts the slowloris", DEADLINE_SECONDS, interval=TRICKLE_SECONDS)
            finally:
                cut.set()

        trickler = threading.Thread(target=trickle, daemon=True)
        trickler.start()
        status, answer = get_models(server.port)  # served meanwhile
        assert status == 200 and answer["body"]["data"][0]["id"] == MODEL
        assert closed_by_server(slowloris)
        assert time.monotonic() - opened >= limits.request_deadline  # cut at the deadline, not before
        trickler.join(DEADLINE_SECONDS)
        assert cut.is_set()
        slowloris.close()
        wait_until(lambda: server.open_connections == 0, "the cut connection is forgotten", DEADLINE_SECONDS, interval=0.02)


def test_a_body_that_trickles_past_the_deadline_gets_408():
    with OpenAIServer(_no_swarm, model_name=MODEL, limits=HttpLimits(request_deadline=2.0, keepalive=600.0)) as server:
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
        sock.settimeout(DEADLINE_SECONDS)
        reply = b""
        while chunk := sock.recv(1 << 16):
            reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 ")
        assert json.loads(body)["error"]["code"] == "request_timeout"
        sock.close()


def test_connections_beyond_the_cap_are_closed_and_the_server_takes_no_thread_per_connection():
    limits = HttpLimits(max_connections=8, request_deadline=600.0)  # only the cap ends connections here
    with OpenAIServer(_no_swarm, model_name=MODEL, limits=limits) as server:
        threads_before = threading.active_count()
        held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(limits.max_connections)]
        wait_until(lambda: server.open_connections == limits.max_connections, "the server holds the first connections", DEADLINE_SECONDS, interval=0.02)
        extra = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(100)]
        assert all(closed_by_server(sock) for sock in extra)
        assert server.open_connections == limits.max_connections
        assert threading.active_count() <= threads_before + limits.max_concurrent + LIGHT_WORKERS
        for sock in extra + held:
            sock.close()
        wait_until(lambda: server.open_connections == 0, "the held connections are closed", DEADLINE_SECONDS, interval=0.02)
        assert get_models(server.port)[0] == 200


def test_unauthenticated_and_rate_limited_http_requests_get_401_and_429():
    limits = ClientLimits(requests_per_second=0.01, burst=2, tokens_per_minute=None)
    access = ApiAccess("node", [ApiClient.with_token("alice", "alice-token", limits)], ClientLimits(0.01, 3, None))
    with OpenAIServer(_no_swarm, model_name=MODEL, access=access) as server:
        assert [get_models(server.port, "alice-token")[0] for _ in range(3)] == [200, 200, 429]
        status, answer = get_models(server.port, "alice-token")
        assert status == 429 and int(answer["Retry-After"]) >= 1
        assert answer["body"]["error"]["type"] == "requests" and "alice" in answer["body"]["error"]["message"]
        # others are counted per address, wrong token or not: 401 until the address is over its rate
        assert [get_models(server.port, token)[0] for token in (None, "guess-1", "guess-2", "guess-3")] == [401, 401, 401, 429]


# --- principals and their budgets --------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_two_clients_have_separate_token_budgets_charged_per_generated_token():
    clock = FakeClock()
    limits = ClientLimits(requests_per_second=100, burst=100, tokens_per_minute=60)  # one token a second
    access = ApiAccess("node", [ApiClient.with_token("alice", "a", limits), ApiClient.with_token("bob", "b", limits)], clock=clock)
    alice, bob = access.admit("a", "10.0.0.1"), access.admit("b", "10.0.0.1")
    assert alice.principal == Principal.api_client("node", "alice") and bob.principal.id == "node/api:bob"
    alice.check_tokens(50)
    for _ in range(50):  # charged as the tokens are generated
        alice.charge(1)
    with pytest.raises(RateLimited, match=r"'alice' has used its budget of 60 generated tokens per minute.*retry in 40 s") as refused:
        alice.check_tokens(50)  # 10 left: 40 more seconds to hold 50
    assert refused.value.retry_after == 40
    bob.check_tokens(50)  # bob's budget is his own
    clock.now = 40.0
    alice.check_tokens(50)
    alice.charge(100)  # a request may go past the budget: the debt delays the next one
    with pytest.raises(RateLimited) as refused:
        alice.check_tokens(1)
    assert refused.value.retry_after == 51  # from -50 tokens to 1
    clock.now = 40.0 + 51
    alice.check_tokens(1)
    with pytest.raises(RateLimited) as refused:
        alice.check_tokens(1000)  # more than the whole budget: it must be full
    assert refused.value.retry_after == 59


def test_anonymous_clients_are_limited_per_address_and_refused_when_tokens_are_configured():
    clock = FakeClock()
    open_access = ApiAccess("node", default_limits=ClientLimits(1, 2, None), clock=clock)
    assert open_access.admit(None, "10.0.0.1").principal is None
    open_access.admit(None, "10.0.0.1")
    with pytest.raises(RateLimited, match="anonymous client 10.0.0.1"):
        open_access.admit(None, "10.0.0.1")
    open_access.admit(None, "10.0.0.2")  # another address has its own bucket
    open_access.admit(None, "2001:db8::1")
    open_access.admit(None, "2001:db8::2")
    with pytest.raises(RateLimited, match="2001:db8::/64"):  # one IPv6 /64 is one client
        open_access.admit(None, "2001:db8::3")

    closed = api_access("node", None, "s3cret", ClientLimits(1, 2, None))
    assert closed.admit("s3cret", "10.0.0.1").principal == Principal.api_client("node", "default")
    with pytest.raises(Unauthenticated, match="not valid"):
        closed.admit("guess", "10.0.0.1")
    with pytest.raises(Unauthenticated, match="needed"):
        closed.admit(None, "10.0.0.1")
    with pytest.raises(RateLimited):  # guesses count against the address
        closed.admit("guess", "10.0.0.1")


def test_the_tokens_file_names_clients_by_the_digest_of_their_token(tmp_path):
    defaults = ClientLimits.per_second(5, tokens_per_minute=1000)
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"clients": [
        {"name": "alice", "token_sha256": token_digest("alice-token"), "requests_per_second": 2, "tokens_per_minute": 300},
        {"name": "bob", "token_sha256": token_digest("bob-token").upper(), "tokens_per_minute": None},
    ]}))
    alice, bob = load_api_clients(path, defaults)
    assert alice.limits == ClientLimits(2, 4, 300) and bob.limits == ClientLimits(5, 10, None)
    assert "alice-token" not in path.read_text()
    access = api_access("node", str(path), "admin-token", defaults)
    assert [access.admit(token, "10.0.0.1").principal.id for token in ("alice-token", "bob-token", "admin-token")] == [
        "node/api:alice", "node/api:bob", "node/api:default"]

    bad_files = {
        "not json": "[broken",
        "no clients": json.dumps({"users": []}),
        "unknown field": json.dumps({"clients": [{"name": "a", "token_sha256": "0" * 64, "token": "x"}]}),
        "bad digest": json.dumps({"clients": [{"name": "a", "token_sha256": "abc"}]}),
        "bad name": json.dumps({"clients": [{"name": "a/b", "token_sha256": "0" * 64}]}),
        "bad limit": json.dumps({"clients": [{"name": "a", "token_sha256": "0" * 64, "burst": -1}]}),
    }
    for text in bad_files.values():
        path.write_text(text)
        with pytest.raises(ValueError, match="tokens.json"):
            load_api_clients(path, defaults)
    path.write_text(json.dumps({"clients": [{"name": "a", "token_sha256": "0" * 64}, {"name": "a", "token_sha256": "1" * 64}]}))
    with pytest.raises(ValueError, match="unique"):
        api_access("node", str(path), None, defaults)


# --- gRPC: garbage bytes and refusals ------------------------------------------------------------------------


def _methods(file_descriptor, service: str) -> list[tuple[str, bool, bool]]:
    """(full method name, client streaming, server streaming) of each method of a service."""
    descriptor = file_descriptor.services_by_name[service]
    return [(f"/{descriptor.full_name}/{method.name}", method.client_streaming, method.server_streaming) for method in descriptor.methods]


def _call_raw(channel: grpc.Channel, method: str, client_streaming: bool, server_streaming: bool, payload: bytes,
              metadata=()) -> grpc.RpcError:
    kind = ("stream" if client_streaming else "unary") + "_" + ("stream" if server_streaming else "unary")
    call = getattr(channel, kind)(method, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as caught:
        result = call(iter([payload]) if client_streaming else payload, timeout=DEADLINE_SECONDS, metadata=metadata)
        if server_streaming:
            list(result)
    return caught.value


class _ScriptedSwarm:
    """Stands in for the swarm behind the in-process SwarmAPI: streams `max_new_tokens` tokens. (The
    real swarm behind the real node's API: tests/test_api.py.)"""

    def stream(self, prompt: str, max_new_tokens: int, **options) -> Iterator[TokenEvent]:
        for index in range(max_new_tokens):
            yield TokenEvent(token_id=index, text="x")


ALICE, BOB = [("authorization", "Bearer alice-token")], [("authorization", "Bearer bob-token")]


@pytest.fixture(scope="module")
def api_server():
    budget = ClientLimits(100, 100, tokens_per_minute=60)
    access = ApiAccess("node", [ApiClient.with_token("alice", "alice-token", budget), ApiClient.with_token("bob", "bob-token", budget)])
    servicer = SwarmApiServicer(_ScriptedSwarm, model=None, dht=None, capabilities=list)
    server, port = start_api_server(servicer, "127.0.0.1", 0, access)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel
    server.stop(None)


def test_garbage_to_every_swarm_api_method_is_invalid_argument(api_server):
    methods = _methods(api_pb2.DESCRIPTOR, "SwarmAPI")
    assert len(methods) == 7
    for method, client_streaming, server_streaming in methods:
        error = _call_raw(api_server, method, client_streaming, server_streaming, GARBAGE, ALICE)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, error)
        assert "does not parse" in error.details()
        error = _call_raw(api_server, method, client_streaming, server_streaming, GARBAGE)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, method  # the token is checked first


def test_garbage_to_health_and_reflection_is_invalid_argument(api_server):
    for file_descriptor, service in ((health_pb2.DESCRIPTOR, "Health"), (reflection_pb2.DESCRIPTOR, "ServerReflection")):
        for method, client_streaming, server_streaming in _methods(file_descriptor, service):
            error = _call_raw(api_server, method, client_streaming, server_streaming, GARBAGE)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, error)


def test_generated_tokens_are_charged_and_a_generation_over_the_budget_is_resource_exhausted(api_server):
    generate = api_grpc.SwarmAPIStub(api_server).Generate
    request = api_pb2.GenerateRequest(prompt="hi", max_new_tokens=50)  # each budget: 60 tokens a minute
    chunks = list(generate(request, metadata=ALICE, timeout=DEADLINE_SECONDS))
    assert len(chunks) == 51 and chunks[-1].finish_reason == "length"  # 50 tokens, charged to alice
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        list(generate(request, metadata=ALICE, timeout=DEADLINE_SECONDS))
    error = caught.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "'alice' has used its budget of 60 generated tokens per minute" in error.details()
    retry_after = int(dict(error.trailing_metadata())[RETRY_AFTER_METADATA])
    assert 40 - (time.monotonic() - started) - 1 <= retry_after <= 40  # 10 of 60 tokens left, 50 needed, 1 a second
    assert f"retry in {retry_after} s" in error.details()
    assert len(list(generate(request, metadata=BOB, timeout=DEADLINE_SECONDS))) == 51  # bob's budget is his own


class _ReadingServicer:
    """A servicer of any service whose every method reads its request(s), then answers UNIMPLEMENTED."""

    def __getattr__(self, name: str):
        def method(request_or_iterator, context):
            if isinstance(request_or_iterator, Iterator):
                list(request_or_iterator)
            context.abort(grpc.StatusCode.UNIMPLEMENTED, name)

        return method


@pytest.mark.parametrize("add_to_server, file_descriptor, service", [
    (dataplane_pb2_grpc.add_BlockServiceServicer_to_server, dataplane_pb2.DESCRIPTOR, "BlockService"),
    (tasks_pb2_grpc.add_TaskServiceServicer_to_server, tasks_pb2.DESCRIPTOR, "TaskService"),
])
def test_add_servicer_answers_garbage_with_invalid_argument_and_passes_valid_requests(add_to_server, file_descriptor, service):
    """The data plane and task services are registered through `add_servicer` too (node.service,
    node.task_service); here with a servicer that answers UNIMPLEMENTED to whatever parses, and without
    the call-auth interceptor those servers also have."""
    server = grpc.server(futures.ThreadPoolExecutor(4))
    add_servicer(add_to_server, _ReadingServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            for method, client_streaming, server_streaming in _methods(file_descriptor, service):
                error = _call_raw(channel, method, client_streaming, server_streaming, GARBAGE)
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, error)
                error = _call_raw(channel, method, client_streaming, server_streaming, b"")  # a valid empty message
                assert error.code() == grpc.StatusCode.UNIMPLEMENTED, (method, error)
    finally:
        server.stop(None)
