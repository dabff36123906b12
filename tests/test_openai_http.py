"""The OpenAI-compatible HTTP API (node.openai_http) on a real 2-node swarm, driven by the official
`openai` package and by raw HTTP, with API clients and their token budgets (node.api_access); and the
token-bucket rate limiter (node.rate_limit). The server's own limits (connections, deadlines) are in
tests/test_api_limits.py.

An unknown model is answered with 400 (`openai.BadRequestError`, code "model_not_found"); OpenAI itself
answers 404. Tests that need no swarm (the limiter, a swarm that fails) are not marked slow.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import openai
import pytest

from edgeswarm import SwarmClient
from edgeswarm.node.api_access import (
    ApiAccess,
    ApiClient,
    ClientLimits,
    load_api_clients,
    token_digest,
)
from devtools.launcher import LocalSwarm
from edgeswarm.node.openai_chat import StopText
from edgeswarm.node.openai_http import OpenAIServer
from edgeswarm.node.rate_limit import RateLimiter
from edgeswarm.swarm.client import TokenEvent
from edgeswarm.swarm.errors import NoRouteError, SwarmConnectionError
from tests.support import wait_until

slow = pytest.mark.slow
TOKEN = "sk-edgeswarm-test"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression and return the number.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "The expression, e.g. 2 * (3 + 4)"}},
            "required": ["expression"],
        },
    },
}


# --- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swarm():
    with LocalSwarm([["--num-blocks", "15"]] * 2) as local_swarm:
        yield local_swarm


@pytest.fixture(scope="module")
def client(swarm):
    with SwarmClient(swarm.initial_peers) as swarm_client:

        def routable() -> bool:
            try:
                return bool(swarm_client.route())
            except NoRouteError:
                return False

        wait_until(routable, "both spans are announced", interval=0.5)
        yield swarm_client


@pytest.fixture(scope="module")
def server(client):
    with OpenAIServer(client, "127.0.0.1", 0, access=token_access()) as openai_server:
        yield openai_server


@pytest.fixture(scope="module")
def api(server):
    with openai.OpenAI(base_url=server.url, api_key=TOKEN, max_retries=0, timeout=300) as api_client:
        yield api_client


@pytest.fixture(scope="module")
def greedy(api, server):
    """One non-streaming greedy answer to CHAT, shared by the tests that compare against it."""
    return api.chat.completions.create(model=server.model_name, messages=CHAT, max_tokens=24, temperature=0)


def token_access() -> ApiAccess:
    """Access for one API client with the token TOKEN and the default limits."""
    return ApiAccess("test-node", [ApiClient.with_token("tester", TOKEN, ClientLimits())])


def raw(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, headers, parsed JSON body) of one request over a fresh connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request(method, path, body=body, headers={"Authorization": f"Bearer {TOKEN}", **(headers or {})})
        response = connection.getresponse()
        data = response.read()
        return response.status, dict(response.getheaders()), json.loads(data) if data else None
    finally:
        connection.close()


def assert_error_shape(body: dict, code: str | None = None) -> None:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code


# --- the swarm through the official client ---------------------------------------------------------------


@slow
def test_models_lists_the_swarms_model(api, server, client):
    models = api.models.list().data
    assert [(model.id, model.owned_by) for model in models] == [(client.model.model_id, "edgeswarm")]
    assert api.models.retrieve(client.model.model_id).id == client.model.model_id


@slow
def test_greedy_chat_equals_the_clients_own_chat(greedy, client):
    expected = client.chat(CHAT, max_new_tokens=24)
    choice = greedy.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert "Paris" in choice.message.content
    assert choice.finish_reason == ("length" if expected.finish_reason == "length" else "stop")
    assert greedy.id.startswith("chatcmpl-") and greedy.object == "chat.completion"
    assert greedy.usage.completion_tokens == len(expected.token_ids)
    assert greedy.usage.total_tokens == greedy.usage.prompt_tokens + greedy.usage.completion_tokens > 24


@slow
def test_streamed_deltas_add_up_to_the_same_text(api, server, greedy):
    chunks = list(
        api.chat.completions.create(
            model=server.model_name, messages=CHAT, max_tokens=24, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == greedy.choices[0].message.content
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert finishes == [greedy.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == greedy.usage.completion_tokens
    assert len({chunk.id for chunk in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


@slow
def test_a_stop_sequence_ends_both_kinds_of_answer_at_the_same_place(api, server, greedy):
    answer = greedy.choices[0].message.content
    stop = answer[answer.index("Paris") :][:3]  # "Par": ends inside a token
    kwargs = dict(model=server.model_name, messages=CHAT, max_tokens=24, temperature=0, stop=[stop])
    whole = api.chat.completions.create(**kwargs).choices[0]
    streamed = "".join(c.choices[0].delta.content or "" for c in api.chat.completions.create(stream=True, **kwargs) if c.choices)
    assert whole.message.content == streamed == answer[: answer.index(stop)]
    assert whole.finish_reason == "stop"


@slow
def test_required_tool_choice_returns_a_valid_call(api, server):
    response = api.chat.completions.create(
        model=server.model_name,
        messages=[{"role": "user", "content": "What is 1234 * 5678?"}],
        tools=[CALCULATOR],
        tool_choice="required",
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "calculator"
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"expression"} and isinstance(arguments["expression"], str)
    assert response.usage.completion_tokens > 0


@slow
def test_a_named_tool_streams_its_call_and_tool_results_reach_the_model(api, server):
    question = {"role": "user", "content": "What is 12 * 11?"}
    stream = api.chat.completions.create(
        model=server.model_name, messages=[question], tools=[CALCULATOR], stream=True,
        tool_choice={"type": "function", "function": {"name": "calculator"}},
    )
    chunks = [chunk for chunk in stream if chunk.choices]
    [call] = [call for chunk in chunks for call in chunk.choices[0].delta.tool_calls or []]
    assert call.index == 0 and call.function.name == "calculator" and json.loads(call.function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    followup = api.chat.completions.create(
        model=server.model_name,
        messages=[
            question,
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude={"index"})]},
            {"role": "tool", "tool_call_id": call.id, "content": "132"},
        ],
        tools=[CALCULATOR],
        tool_choice="none",
        max_tokens=24,
        temperature=0,
    )
    assert followup.choices[0].finish_reason in ("stop", "length")
    assert "132" in followup.choices[0].message.content


@slow
def test_two_requests_at_once_both_get_their_answer(api, server, greedy):
    answers = [None, None]

    def ask(index: int) -> None:
        answers[index] = api.chat.completions.create(model=server.model_name, messages=CHAT, max_tokens=24, temperature=0)

    threads = [threading.Thread(target=ask, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert [answer.choices[0].message.content for answer in answers] == [greedy.choices[0].message.content] * 2


@slow
def test_a_wrong_token_or_model_is_refused(server):
    with openai.OpenAI(base_url=server.url, api_key="sk-wrong", max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError) as error:
            wrong.models.list()
    assert error.value.status_code == 401 and error.value.code == "invalid_api_key"
    status, _, body = raw(server.port, "GET", "/v1/models", headers={"Authorization": ""})
    assert status == 401
    assert_error_shape(body, "invalid_api_key")

    with openai.OpenAI(base_url=server.url, api_key=TOKEN, max_retries=0) as api_client:
        with pytest.raises(openai.BadRequestError) as error:
            api_client.chat.completions.create(model="gpt-4o", messages=CHAT)
    assert error.value.code == "model_not_found" and error.value.param == "model"


# --- raw HTTP ---------------------------------------------------------------------------------------------


@slow
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, api):
    port = server.port
    chat = "/v1/chat/completions"
    cases = [
        ("POST", chat, b"{not json", 400, None),
        ("POST", chat, json.dumps([1, 2]).encode(), 400, None),
        ("POST", chat, json.dumps({"model": server.model_name}).encode(), 400, None),  # no messages
        ("POST", chat, json.dumps({"model": server.model_name, "messages": CHAT, "max_tokens": 0}).encode(), 400, None),
        ("POST", chat, json.dumps({"model": server.model_name, "messages": CHAT, "max_tokens": 10**6}).encode(), 400,
         "context_length_exceeded"),
        ("POST", chat, json.dumps({"model": server.model_name, "messages": [{"role": "robot", "content": "hi"}]}).encode(), 400, None),
        ("POST", chat, json.dumps({"model": server.model_name, "messages": CHAT, "n": 3}).encode(), 400, "unsupported_parameter"),
        ("POST", chat, json.dumps({"model": server.model_name, "messages": CHAT, "tool_choice": "required"}).encode(), 400, None),
        ("GET", "/v1/nothing-here", None, 404, None),
        ("GET", chat, None, 405, None),
        ("POST", chat, b"x" * ((1 << 20) + 1), 413, "request_too_large"),
    ]
    for method, path, body, status, code in cases:
        got, headers, answer = raw(port, method, path, body, {"Content-Type": "application/json"})
        assert got == status, (method, path, body[:80] if body else None, answer)
        assert_error_shape(answer, code)
        if status == 405:
            assert headers["Allow"] == "POST"
    assert [model.id for model in api.models.list().data] == [server.model_name]


@slow
def test_a_silent_or_vanishing_client_does_not_block_others(server, api):
    silent = socket.create_connection(("127.0.0.1", server.port))
    silent.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
    vanishing = socket.create_connection(("127.0.0.1", server.port))
    vanishing.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                      "Content-Length: 100\r\n\r\n{\"model\"".encode())
    vanishing.close()
    try:
        assert [model.id for model in api.models.list().data] == [server.model_name]
    finally:
        silent.close()


@slow
def test_a_rate_limited_client_gets_429_with_retry_after(client):
    access = ApiAccess("test-node", default_limits=ClientLimits(requests_per_second=0.05, burst=2))
    with OpenAIServer(client, "127.0.0.1", 0, access=access) as limited:
        assert [raw(limited.port, "GET", "/v1/models")[0] for _ in range(2)] == [200, 200]
        status, headers, body = raw(limited.port, "GET", "/v1/models")
        assert status == 429 and int(headers["Retry-After"]) >= 1
        assert_error_shape(body, "rate_limit_exceeded")
        with openai.OpenAI(base_url=limited.url, api_key="anything", max_retries=0) as api_client:
            with pytest.raises(openai.RateLimitError):
                api_client.models.list()


@slow
def test_each_api_client_has_its_own_token_budget_charged_per_generated_token(client, tmp_path):
    tokens_file = tmp_path / "tokens.json"
    tokens_file.write_text(json.dumps({"clients": [
        {"name": "alice", "token_sha256": token_digest("alice-token"), "tokens_per_minute": 1},
        {"name": "bob", "token_sha256": token_digest("bob-token")},
    ]}))
    access = ApiAccess("test-node", load_api_clients(tokens_file, ClientLimits()))
    with (OpenAIServer(client, "127.0.0.1", 0, access=access) as budgeted,
          openai.OpenAI(base_url=budgeted.url, api_key="alice-token", max_retries=0, timeout=300) as alice,
          openai.OpenAI(base_url=budgeted.url, api_key="bob-token", max_retries=0, timeout=300) as bob):
        started = time.monotonic()
        kwargs = {"model": budgeted.model_name, "messages": CHAT, "max_tokens": 8, "temperature": 0}
        chunks = list(alice.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
        generated = chunks[-1].usage.completion_tokens  # charged as they streamed; a full budget admitted it
        with pytest.raises(openai.RateLimitError) as refused:
            alice.chat.completions.create(**kwargs)
        elapsed = time.monotonic() - started
        retry_after = int(refused.value.response.headers["Retry-After"])
        assert 60 * generated - elapsed - 1 <= retry_after <= 60 * generated  # one token a minute, `generated` in debt
        error = refused.value.response.json()["error"]
        assert error["type"] == "tokens" and "'alice' has used its budget" in error["message"]
        assert bob.chat.completions.create(**kwargs).choices[0].message.content  # bob's budget is his own


# --- swarm failures, without a swarm ----------------------------------------------------------------------


class _BrokenSwarmClient:
    """A client with the real model and tokenizer whose swarm has no route (after `tokens_before` tokens)."""

    def __init__(self, model, tokenizer, tokens_before: int = 0):
        self.model, self.tokenizer, self.tokens_before = model, tokenizer, tokens_before

    def apply_chat_template(self, messages):
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def generate(self, *args, **kwargs):
        raise NoRouteError("no online node serves blocks 15:30")

    def stream(self, *args, **kwargs):
        for _ in range(self.tokens_before):
            yield TokenEvent(token_id=self.tokenizer.encode("Hi")[0], text="Hi")
        raise NoRouteError("no online node serves blocks 15:30")

    def inference_session(self, *args, **kwargs):
        raise NoRouteError("no online node serves blocks 15:30")


@pytest.fixture(scope="module")
def tokenizer(smollm):
    return smollm.tokenizer()


def test_swarm_failures_are_503_and_the_server_survives(smollm, tokenizer):
    body = json.dumps({"model": smollm.model_id, "messages": CHAT}).encode()
    with OpenAIServer(_BrokenSwarmClient(smollm, tokenizer), access=token_access()) as broken:
        for stream in (False, True):
            status, headers, answer = raw(broken.port, "POST", "/v1/chat/completions",
                                          json.dumps({**json.loads(body), "stream": stream}).encode())
            assert status == 503 and headers["Retry-After"]
            assert_error_shape(answer, "swarm_unavailable")
        tools = json.dumps({"model": smollm.model_id, "messages": CHAT, "tools": [CALCULATOR]}).encode()
        assert raw(broken.port, "POST", "/v1/chat/completions", tools)[0] == 503
        assert raw(broken.port, "GET", "/v1/models")[0] == 200

    with OpenAIServer(_BrokenSwarmClient(smollm, tokenizer, tokens_before=2)) as midway:  # fails after the stream began
        with openai.OpenAI(base_url=midway.url, api_key="x", max_retries=0) as api_client:
            stream = api_client.chat.completions.create(model=smollm.model_id, messages=CHAT, stream=True)
            with pytest.raises(openai.APIError, match="swarm"):
                list(stream)
        assert raw(midway.port, "GET", "/v1/models")[0] == 200


def test_a_client_that_cannot_be_made_is_503_until_it_can(smollm, tokenizer):
    attempts = []

    def factory():
        attempts.append(1)
        if len(attempts) == 1:
            raise SwarmConnectionError("mDNS found no node of swarm 'edgeswarm' on the LAN")
        return _BrokenSwarmClient(smollm, tokenizer)

    with OpenAIServer(factory, model_name="smollm2") as lazy:
        status, _, body = raw(lazy.port, "POST", "/v1/chat/completions",
                              json.dumps({"model": "smollm2", "messages": CHAT}).encode())
        assert status == 503 and "mDNS" in body["error"]["message"]
        assert raw(lazy.port, "GET", "/v1/models")[2]["data"][0]["id"] == "smollm2"  # needs no client
        assert raw(lazy.port, "POST", "/v1/chat/completions",
                   json.dumps({"model": smollm.model_id, "messages": CHAT}).encode())[0] == 503  # made now
        assert len(attempts) == 2


def stream_text(pieces: list[str], stop: list[str]) -> tuple[list[str], StopText]:
    """The deltas of `StopText` over tokens spelling `pieces` (U+FFFD + a character: one character in two tokens)."""
    text, out = StopText(lambda ids: "".join(pieces[i] for i in ids).replace("\ufffd\u00e9", "\u00e9"), stop), []
    for index in range(len(pieces)):
        out.append(text.push(index))
        if text.stopped:
            break
    return out + [text.finish()], text


def test_streamed_text_holds_back_what_a_stop_string_may_still_cut():
    out, text = stream_text(["Hel", "lo", " wo", "rld", "!"], ["world", "xyz"])
    assert out == ["Hel", "lo", " ", "", ""] and text.stopped and text.text == "Hello "
    out, text = stream_text(["Hel", "lo", " wo", "rk", "!"], ["world"])  # a false alarm is let through
    assert out == ["Hel", "lo", " ", "work", "!", ""] and not text.stopped
    out, text = stream_text(["caf", "\ufffd", "\u00e9", "!"], [])  # half a character waits for its other half
    assert out == ["caf", "", "\u00e9", "!", ""]


# --- the rate limiter -------------------------------------------------------------------------------------


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_buckets_allow_a_burst_then_refill_at_the_rate():
    clock = _Clock()
    limiter = RateLimiter(rate_per_second=2, burst=3, clock=clock)
    assert [limiter.allow("a") for _ in range(4)] == [True, True, True, False]
    assert limiter.acquire("a") == pytest.approx(0.5)
    assert limiter.allow("b")  # keys are independent
    clock.now = 0.5
    assert limiter.allow("a") and not limiter.allow("a")
    clock.now = 100.0  # refills up to the burst only
    assert [limiter.allow("a") for _ in range(4)] == [True, True, True, False]
    assert limiter.acquire("a", cost=5) == float("inf")


def test_the_limiter_keeps_at_most_max_keys_dropping_the_least_recently_used():
    clock = _Clock()
    limiter = RateLimiter(rate_per_second=1, burst=1, max_keys=2, clock=clock)
    assert limiter.allow("a") and limiter.allow("b")
    assert not limiter.allow("a")  # "a" is now the most recently used
    assert limiter.allow("c") and len(limiter) == 2  # "b" is dropped
    assert not limiter.allow("a") and limiter.allow("b")  # "b" starts again with a full bucket


def test_the_limiter_counts_exactly_under_threads():
    limiter = RateLimiter(rate_per_second=1e-6, burst=100)
    allowed = []

    def take() -> None:
        allowed.append(sum(limiter.allow("shared") for _ in range(50)))

    threads = [threading.Thread(target=take) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(allowed) == 100
