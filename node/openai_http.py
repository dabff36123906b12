"""An OpenAI-compatible HTTP API over the swarm: `GET /v1/models` and `POST /v1/chat/completions`.

Standard library only (`http.server.ThreadingHTTPServer`), so any OpenAI client works against a node:

    server = OpenAIServer(client, "127.0.0.1", 8000, api_token="s3cret")
    server.start()
    # openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="s3cret").chat.completions.create(...)

Chat completions support `messages` (system/developer, user, assistant with `tool_calls`, tool results),
`max_tokens`/`max_completion_tokens`, `temperature` (0: greedy), `top_p`, `seed`, `stop`, `stream`
(Server-Sent Events; `stream_options.include_usage`), `tools` with `tool_choice` and
`parallel_tool_calls`. Tool decisions use schema-constrained decoding (agent.constrained) through a swarm
inference session: arguments always parse and match their schema; they are greedy and not cut by
`max_tokens`. Tool results reach the model as a user message "Tool results: ...". A streamed tool call
arrives as one delta chunk. Unsupported parameters (`n` > 1, `logprobs`, penalties, `logit_bias`,
non-text `response_format`, image content) are refused with 400 rather than ignored; unknown fields are
ignored.

Errors have OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: 400 bad JSON, field or
model (OpenAI itself answers 404 for an unknown model; this server uses 400, code "model_not_found"),
401 bad token, 404 path, 405 method, 411/413 body length, 429 rate limited (Retry-After), 503 swarm
unreachable or server saturated, 500 anything else. Errors after a stream began arrive as a final
`data: {"error": ...}` event.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import math
import re
import ssl
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent.constrained import SMOLLM2_CALL_BIAS, UnsupportedSchemaError, decode_tool_calls, tool_prompt
from agent.steppers import SessionStepper
from node.rate_limit import RateLimiter
from swarm.errors import NoRouteError, SwarmConnectionError, SwarmError

logger = logging.getLogger(__name__)

OWNED_BY = "edgeswarm"
CALL_TOKENS = 96  # session room kept for each tool call (as node.llm_worker)
MAX_CALLS = 4
MAX_STOP_SEQUENCES = 4
TOOL_RESULTS = "Tool results:\n"  # how tool messages start when the model reads them (as agent.runtime writes them)
_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class APIError(Exception):
    """An error answered in OpenAI's JSON shape with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# --- the request -------------------------------------------------------------------------------------


@dataclass
class ChatRequest:
    """A validated chat completion request; `messages` are already rendered for the chat template."""

    model: str
    messages: list[dict]
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    tools: list[dict] = field(default_factory=list)  # empty: plain generation
    allow_answer: bool = True  # False: at least one tool call ("required" or a named function)
    max_calls: int = MAX_CALLS


def parse_chat_request(body: Any) -> ChatRequest:
    """Checks a `/v1/chat/completions` body; raises `APIError` (400) naming the offending field."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required and must be a string", "model")
    _refuse_unsupported(body)
    request = ChatRequest(model=model, messages=render_messages(body.get("messages")))
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    request.max_tokens = None if limit is None else _integer(limit, "max_tokens", minimum=1)
    request.temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    request.top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    request.seed = None if body.get("seed") is None else _integer(body["seed"], "seed")
    request.stop = _stop_sequences(body.get("stop"))
    request.stream = _boolean(body, "stream", False)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("'stream_options' must be an object", "stream_options")
    request.include_usage = bool(options.get("include_usage")) and request.stream
    _apply_tools(request, body)
    return request


def _refuse_unsupported(body: dict) -> None:
    """400 for parameters this server cannot honour, unless they carry their default value."""
    defaults = {"n": (None, 1), "logprobs": (None, False), "top_logprobs": (None, 0), "presence_penalty": (None, 0),
                "frequency_penalty": (None, 0), "logit_bias": (None, {})}
    for name, allowed in defaults.items():
        if name in body and body[name] not in allowed:
            raise _bad(f"'{name}' = {body[name]!r} is not supported by this server", name, "unsupported_parameter")
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise _bad("only response_format {'type': 'text'} is supported", "response_format", "unsupported_parameter")


def _integer(value: Any, param: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"'{param}' must be an integer", param)
    if minimum is not None and value < minimum:
        raise _bad(f"'{param}' must be at least {minimum}", param)
    return value


def _number(body: dict, param: str, default: float, low: float, high: float) -> float:
    value = body.get(param)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise _bad(f"'{param}' must be a number from {low} to {high}", param)
    return float(value)


def _boolean(body: dict, param: str, default: bool) -> bool:
    value = body.get(param)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(f"'{param}' must be a boolean", param)
    return value


def _stop_sequences(stop: Any) -> list[str]:
    stops = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOP_SEQUENCES or not all(isinstance(s, str) and s for s in stops):
        raise _bad(f"'stop' must be a non-empty string or a list of at most {MAX_STOP_SEQUENCES} of them", "stop")
    return stops


# --- messages ----------------------------------------------------------------------------------------


def render_messages(messages: Any) -> list[dict]:
    """OpenAI messages -> [{"role": system|user|assistant, "content": str}] for the model's chat template.

    Assistant tool calls are written as the `<tool_call>{...}</tool_call>` lines the model is prompted to
    produce; consecutive tool results become one user message "Tool results: <name> returned: ...".
    """
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty array", "messages")
    rendered: list[dict] = []
    results: list[str] = []  # tool results waiting to be written as one message
    call_names: dict[str, str] = {}  # tool_call_id -> function name
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _bad(f"{param} must be an object", param)
        role = message.get("role")
        if role in ("tool", "function"):
            name = message.get("name") or call_names.get(message.get("tool_call_id"), "tool")
            results.append(f"{name} returned: {_content(message.get('content'), param)}")
            continue
        if results:
            rendered.append(_tool_results(results))
            results = []
        if role in ("system", "developer"):
            rendered.append({"role": "system", "content": _content(message.get("content"), param)})
        elif role == "user":
            rendered.append({"role": "user", "content": _content(message.get("content"), param)})
        elif role == "assistant":
            rendered.append({"role": "assistant", "content": _assistant_text(message, param, call_names)})
        else:
            raise _bad(f"{param}.role {role!r} is not one of system, developer, user, assistant, tool", f"{param}.role")
    if results:
        rendered.append(_tool_results(results))
    return rendered


def _content(content: Any, param: str, optional: bool = False) -> str:
    """A message's text: a string, or the text parts of a list of content parts."""
    if content is None and optional:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"{param}.content: only text parts are supported", f"{param}.content")
            texts.append(part["text"])
        return "\n".join(texts)
    raise _bad(f"{param}.content must be a string or an array of text parts", f"{param}.content")


def _assistant_text(message: dict, param: str, call_names: dict[str, str]) -> str:
    """An assistant message's text followed by its tool calls in the model's own call format."""
    lines = [_content(message.get("content"), param, optional=True)]
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise _bad(f"{param}.tool_calls must be an array", f"{param}.tool_calls")
    for number, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _bad(f"{param}.tool_calls[{number}] must have a function with a name", f"{param}.tool_calls")
        arguments = function.get("arguments") or "{}"
        with contextlib.suppress(TypeError, ValueError):
            arguments = json.loads(arguments)
        call_names[str(call.get("id"))] = function["name"]
        lines.append(f"<tool_call>{json.dumps({'name': function['name'], 'arguments': arguments})}</tool_call>")
    return "\n".join(line for line in lines if line)


def _tool_results(results: list[str]) -> dict:
    return {"role": "user", "content": TOOL_RESULTS + "\n".join(results) + "\nUse them to answer the question."}


# --- tools -------------------------------------------------------------------------------------------


def _apply_tools(request: ChatRequest, body: dict) -> None:
    """Sets `tools`, `allow_answer` and `max_calls` from `tools`, `tool_choice` and `parallel_tool_calls`."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if not tools:
        if choice not in (None, "none", "auto"):
            raise _bad("'tool_choice' needs 'tools'", "tool_choice")
        return
    tools = _function_tools(tools)
    request.max_calls = MAX_CALLS if _boolean(body, "parallel_tool_calls", True) else 1
    if choice in (None, "auto"):
        request.tools = tools
    elif choice == "required":
        request.tools, request.allow_answer = tools, False
    elif choice == "none":
        pass  # plain generation
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        chosen = [tool for tool in tools if tool["function"]["name"] == name]
        if not chosen:
            raise _bad(f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
        request.tools, request.allow_answer = chosen, False
    else:
        expected = "'auto', 'none', 'required' or {'type': 'function', 'function': {'name': ...}}"
        raise _bad(f"'tool_choice' must be {expected}", "tool_choice")


def _function_tools(tools: Any) -> list[dict]:
    """Checks OpenAI function tools; returns them as {"type": "function", "function": {...}}."""
    if not isinstance(tools, list):
        raise _bad("'tools' must be an array", "tools")
    checked, names = [], set()
    for index, tool in enumerate(tools):
        param = f"tools[{index}]"
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
        if not isinstance(function, dict):
            raise _bad(f"{param} must be {{'type': 'function', 'function': {{...}}}}", param)
        name = function.get("name")
        if not isinstance(name, str) or not _FUNCTION_NAME.match(name) or name in names:
            message = f"{param}.function.name must be a unique name of letters, digits, '_' or '-'"
            raise _bad(message, f"{param}.function.name")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise _bad(f"{param}.function.parameters must be a JSON schema object", f"{param}.function.parameters")
        names.add(name)
        checked.append({"type": "function", "function": {**function, "parameters": parameters}})
    return checked


# --- generation --------------------------------------------------------------------------------------


@dataclass
class Completion:
    """What a chat completion produced."""

    content: str | None
    tool_calls: list[dict]
    finish_reason: str  # "stop", "length" or "tool_calls"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class _Job:
    request: ChatRequest
    prompt_ids: list[int]
    max_tokens: int
    session_length: int


class _StopText:
    """Generated token ids -> text deltas that never need taking back.

    A trailing incomplete character, and a tail that could be the start of a stop string, are held
    back until the next token settles them; a stop string ends the text where it starts (as
    `SwarmClient.generate` cuts it).
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str]):
        self.decode, self.stop = decode, list(stop)
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Adds a token; returns the text that is now certain (maybe "")."""
        self.ids.append(token_id)
        self.text, self.stopped = _cut_at_stop(self.decode(self.ids), self.stop)
        if self.stopped:
            return self.finish()
        settled = self.text.rstrip("\ufffd")  # U+FFFD: a character whose bytes are not all here yet
        return self._emit(len(settled) - _stop_prefix_length(settled, self.stop))

    def finish(self) -> str:
        """The text held back so far (the generation has ended)."""
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        piece = self.text[self.emitted : upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return piece


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """`text` up to its first stop string, and whether it had one."""
    cut = min((text.find(marker) for marker in stop if marker in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _stop_prefix_length(text: str, stop: Sequence[str]) -> int:
    """The length of the longest end of `text` that a stop string starts with."""
    return max((size for marker in stop for size in range(1, len(marker)) if text.endswith(marker[:size])), default=0)


class ChatEngine:
    """Runs validated chat requests on a `SwarmClient`: plain generation, streaming, or tool decisions."""

    def __init__(self, client, default_max_tokens: int = 512, call_bias: float = SMOLLM2_CALL_BIAS):
        self.client = client
        self.default_max_tokens = default_max_tokens
        self.call_bias = call_bias
        self._tokenizer_lock = threading.Lock()  # fast tokenizers may fail when encoding in two threads at once

    def prepare(self, request: ChatRequest) -> _Job:
        """Tokenises the prompt and sizes the output; 400 when it does not fit the model's context."""
        tokenizer = self.client.tokenizer
        if tokenizer is None:
            raise APIError(500, "this model has no tokenizer, so it cannot chat", "server_error")
        try:
            with self._tokenizer_lock:
                if request.tools:
                    prompt_ids = tool_prompt(tokenizer, request.messages, request.tools)
                else:
                    prompt_ids = list(tokenizer(self.client.apply_chat_template(request.messages))["input_ids"])
        except Exception as error:  # e.g. a chat template that refuses the order of roles
            raise _bad(f"the messages do not fit the model's chat template: {error}", "messages") from error
        context = int(getattr(self.client.model.config, "max_position_embeddings", 2048))
        reserved = CALL_TOKENS * request.max_calls if request.tools else 0
        room = context - len(prompt_ids) - reserved
        max_tokens = request.max_tokens if request.max_tokens is not None else min(self.default_max_tokens, room)
        if max_tokens > room or max_tokens < 1:
            raise _bad(
                f"the prompt has {len(prompt_ids)} tokens; with {max_tokens} more tokens (and {reserved} kept for tool "
                f"calls) it exceeds the model's context of {context} tokens", "messages", "context_length_exceeded"
            )
        return _Job(request, prompt_ids, max_tokens, len(prompt_ids) + max_tokens + reserved)

    def complete(self, job: _Job) -> Completion:
        """The whole completion at once."""
        if job.request.tools:
            return self._decide(job)
        request = job.request
        result = self.client.generate(job.prompt_ids, job.max_tokens, **self._sampling(request))
        finish = "length" if result.finish_reason == "length" else "stop"
        return Completion(result.text or "", [], finish, len(job.prompt_ids), len(result.token_ids))

    def stream(self, job: _Job) -> Iterator[str | Completion]:
        """Content deltas as the swarm produces them, then the finished `Completion`."""
        if job.request.tools:
            completion = self._decide(job)
            if completion.content:
                yield completion.content
            yield completion
            return
        request = job.request
        tokenizer = self.client.tokenizer
        text = _StopText(lambda ids: tokenizer.decode(ids, skip_special_tokens=True), request.stop)
        events = self.client.stream(job.prompt_ids, job.max_tokens, **self._sampling(request))
        count = 0
        with contextlib.closing(events):
            for event in events:
                count += 1
                delta = text.push(event.token_id)
                if delta:
                    yield delta
                if text.stopped:
                    break
        rest = text.finish()
        if rest:
            yield rest
        finish = "stop" if text.stopped or count < job.max_tokens else "length"
        yield Completion(text.text, [], finish, len(job.prompt_ids), count)

    @staticmethod
    def _sampling(request: ChatRequest) -> dict:
        greedy = request.temperature == 0 or request.top_p == 0
        return {
            "do_sample": not greedy,
            "temperature": request.temperature if not greedy else 1.0,
            "top_p": request.top_p if not greedy else 1.0,
            "stop": request.stop,
            "seed": request.seed,
        }

    def _decide(self, job: _Job) -> Completion:
        """Tool calls or an answer, by constrained decoding through one swarm inference session."""
        request = job.request
        after_results = request.messages[-1]["content"].startswith(TOOL_RESULTS)
        with self.client.inference_session(max_length=job.session_length) as session:
            decision = decode_tool_calls(
                SessionStepper(session),
                self.client.tokenizer,
                job.prompt_ids,
                request.tools,
                allow_answer=request.allow_answer,
                max_calls=request.max_calls,
                max_answer_tokens=job.max_tokens,
                call_bias=0.0 if after_results else self.call_bias,  # as the agent runtime's later turns
            )
        prompt_tokens = len(job.prompt_ids)
        if decision.calls:
            calls = [_tool_call(call.name, call.arguments) for call in decision.calls]
            return Completion(None, calls, "tool_calls", prompt_tokens, decision.tokens)
        answer, stopped = _cut_at_stop(decision.answer or "", request.stop)
        finish = "stop" if stopped or decision.tokens < job.max_tokens else "length"
        return Completion(answer, [], finish, prompt_tokens, decision.tokens)


def _tool_call(name: str, arguments: dict) -> dict:
    function = {"name": name, "arguments": json.dumps(arguments)}
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": function}


def api_error_for(error: BaseException) -> APIError:
    """The HTTP answer to an exception raised while serving a request."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, UnsupportedSchemaError):
        return _bad(f"a tool's parameters cannot be followed: {error}", "tools", "unsupported_schema")
    if isinstance(error, (NoRouteError, SwarmConnectionError)):
        return APIError(503, f"the swarm cannot serve the model now: {error}", "server_error", code="swarm_unavailable",
                        headers={"Retry-After": "5"})
    if isinstance(error, SwarmError):  # e.g. RemoteError: a node refused the request
        return APIError(500, f"a swarm node failed: {error}", "server_error")
    logger.exception("chat completion failed", exc_info=error)
    return APIError(500, f"internal error: {type(error).__name__}", "server_error")


# --- responses ---------------------------------------------------------------------------------------


def _usage(completion: Completion) -> dict:
    prompt, generated = completion.prompt_tokens, completion.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def completion_body(completion: Completion, model: str) -> dict:
    """A `chat.completion` object."""
    message: dict[str, Any] = {"role": "assistant", "content": completion.content, "refusal": None}
    if completion.tool_calls:
        message["tool_calls"] = completion.tool_calls
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": completion.finish_reason}
    return {"id": _completion_id(), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [choice], "usage": _usage(completion), "system_fingerprint": None}


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class _Chunks:
    """Builds the `chat.completion.chunk` objects of one streamed completion."""

    def __init__(self, model: str, include_usage: bool):
        self.base = {"id": _completion_id(), "object": "chat.completion.chunk", "created": int(time.time()),
                     "model": model, "system_fingerprint": None}
        self.include_usage = include_usage

    def choice(self, delta: dict, finish_reason: str | None = None) -> dict:
        chunk = {**self.base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def tool_calls(self, calls: list[dict]) -> dict:
        return self.choice({"tool_calls": [{"index": index, **call} for index, call in enumerate(calls)]})

    def usage(self, completion: Completion) -> dict:
        return {**self.base, "choices": [], "usage": _usage(completion)}


# --- HTTP --------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    """One connection's requests; routes to the `OpenAIServer` in `self.server.app`."""

    protocol_version = "HTTP/1.1"
    server_version = "edgeswarm-openai"
    server: _HTTPServer

    def setup(self) -> None:
        self.timeout = self.server.app.socket_timeout  # a silent client cannot hold a thread forever
        super().setup()

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors http.server finds itself (bad request line, headers too long, ...) in OpenAI's shape."""
        self._unread_body = True  # the connection is in an unknown state: close it
        self._send_json(code, APIError(code, message or explain or "bad request").body())

    def _dispatch(self) -> None:
        self._streaming = False
        self._unread_body = self.headers.get("Content-Length", "0") != "0" or "Transfer-Encoding" in self.headers
        try:
            self.server.app.handle(self)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True  # the client went away
        except Exception as exception:
            error = api_error_for(exception)
            try:
                if self._streaming:
                    self.send_event(error.body())
                    self.end_stream()
                else:
                    self._send_json(error.status, error.body(), error.headers)
            except OSError:
                self.close_connection = True

    @property
    def route(self) -> str:
        return urlsplit(self.path).path.rstrip("/")

    def read_json(self, max_bytes: int) -> Any:
        """The request body parsed as JSON (411, 413 or 400 when it cannot be)."""
        if "Transfer-Encoding" in self.headers:
            raise APIError(411, "chunked request bodies are not supported: send a Content-Length")
        try:
            length = int(self.headers.get("Content-Length", ""))
            if length < 0:
                raise ValueError(length)
        except ValueError:
            raise APIError(411, "a request body with a valid Content-Length is required") from None
        if length > max_bytes:
            self._discard(length, limit=4 * max_bytes)
            message = f"the request body has {length} bytes, above the limit of {max_bytes}"
            raise APIError(413, message, code="request_too_large")
        data = self.rfile.read(length)
        self._unread_body = False
        if len(data) < length:
            raise ConnectionResetError("the client sent less than its Content-Length")
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise _bad(f"the request body is not valid JSON: {error}") from None

    def _discard(self, length: int, limit: int) -> None:
        """Reads and drops a refused body of at most `limit` bytes, so that the client can read the answer
        (closing a socket with unread data resets it); larger or slower bodies just close the connection."""
        if length > limit:
            return
        self.connection.settimeout(2.0)
        with contextlib.suppress(OSError):
            while length > 0:
                chunk = self.rfile.read(min(length, 1 << 16))
                if not chunk:
                    return
                length -= len(chunk)
            self._unread_body = False
        self.connection.settimeout(self.timeout)

    def _send_json(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self._unread_body:  # what is left of the request cannot be told from the next request
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_json(self, body: dict, status: int = 200) -> None:
        self._send_json(status, body)

    def start_stream(self) -> None:
        """Sends the headers of a Server-Sent Events response (chunked, so the connection stays usable)."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._streaming = True

    def send_event(self, data: dict | str) -> None:
        payload = f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()
        self.wfile.write(f"{len(payload):X}\r\n".encode() + payload + b"\r\n")

    def end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self._streaming = False


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], app: OpenAIServer, tls: ssl.SSLContext | None = None):
        self.app = app
        super().__init__(address, _Handler)
        if tls is not None:  # the handshake happens in each connection's thread, at its first read
            self.socket = tls.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)


def server_tls_context(certificate: bytes, key: bytes) -> ssl.SSLContext:
    """A server-side TLS context for a certificate and key given as PEM bytes."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as directory:
        cert_file, key_file = Path(directory, "cert.pem"), Path(directory, "key.pem")
        cert_file.write_bytes(certificate)
        key_file.write_bytes(key)
        context.load_cert_chain(cert_file, key_file)
    return context


class OpenAIServer:
    """The OpenAI-compatible HTTP API of a swarm client, served from a background thread.

    `client`: a `SwarmClient`, or a callable making one on first use (then closed by `stop`; if it
    fails, requests get 503 and the next one tries again). `api_token`: when set, every request needs
    `Authorization: Bearer <api_token>`. `rate_limiter`: requests are counted per API token when one is
    configured and given, else per client IP. `model_name`: the model's name in the API (default: the
    client's `model.model_id`). At most `max_concurrent` completions run at once; others wait up to
    `queue_seconds`, then get 503. `tls`: (certificate PEM, key PEM) to serve HTTPS instead of HTTP.
    """

    def __init__(
        self,
        client: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        api_token: str | None = None,
        rate_limiter: RateLimiter | None = None,
        max_body_bytes: int = 1 << 20,
        model_name: str | None = None,
        *,
        default_max_tokens: int = 512,
        max_concurrent: int = 4,
        queue_seconds: float = 30.0,
        socket_timeout: float = 60.0,
        call_bias: float = SMOLLM2_CALL_BIAS,
        tls: tuple[bytes, bytes] | None = None,
    ):
        self._tls = server_tls_context(*tls) if tls is not None else None
        is_factory = callable(client) and not hasattr(client, "generate")
        self._factory: Callable[[], Any] | None = client if is_factory else None
        self._client = None if is_factory else client
        self.host, self.port = host, port
        self.api_token = api_token
        self.rate_limiter = rate_limiter
        self.max_body_bytes = max_body_bytes
        self._model_name = model_name
        self.default_max_tokens, self.call_bias = default_max_tokens, call_bias
        self.queue_seconds, self.socket_timeout = queue_seconds, socket_timeout
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self._lock = threading.Lock()
        self._engine: ChatEngine | None = None
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.created = int(time.time())

    # --- lifecycle ---

    def start(self) -> int:
        """Binds and serves in a background thread; returns the bound port (port 0 picks a free one)."""
        if self._httpd is None:
            self._httpd = _HTTPServer((self.host, self.port), self, self._tls)
            self.port = self._httpd.server_address[1]
            self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                            name=f"openai-http-{self.port}", daemon=True)
            self._thread.start()
            logger.info("OpenAI-compatible API on %s", self.url)
        return self.port

    def stop(self) -> None:
        """Stops serving (requests in flight are abandoned) and closes a client this server made."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=10)
            self._httpd = self._thread = None
        if self._factory is not None and self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = self._engine = None

    def __enter__(self) -> OpenAIServer:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The API's base URL, for `openai.OpenAI(base_url=...)`."""
        return f"{'https' if self._tls else 'http'}://{self.host}:{self.port}/v1"

    @property
    def engine(self) -> ChatEngine:
        """The chat engine over the client (made on first use; 503 if the client cannot be made)."""
        with self._lock:
            if self._engine is None:
                if self._client is None:
                    try:
                        self._client = self._factory()
                    except Exception as error:
                        logger.warning("cannot make a swarm client: %s", error)
                        raise APIError(503, f"the swarm is unreachable: {error}", "server_error",
                                       code="swarm_unavailable", headers={"Retry-After": "5"}) from error
                self._engine = ChatEngine(self._client, self.default_max_tokens, self.call_bias)
            return self._engine

    @property
    def model_name(self) -> str:
        return self._model_name or self.engine.client.model.model_id

    # --- requests ---

    def handle(self, http: _Handler) -> None:
        """Checks access, then routes one request (raising `APIError` for every error answer)."""
        self._check_access(http)
        route, method = http.route, http.command
        if route == "/v1/models":
            methods = {"GET": self._list_models}
        elif route.startswith("/v1/models/"):
            methods = {"GET": lambda handler: self._get_model(handler, route[len("/v1/models/") :])}
        elif route == "/v1/chat/completions":
            methods = {"POST": self._chat}
        else:
            raise APIError(404, f"Invalid URL ({method} {http.path})", code="unknown_url")
        if method not in methods:
            raise APIError(405, f"{method} is not allowed on {route}", code="method_not_allowed",
                           headers={"Allow": ", ".join(methods)})
        methods[method](http)

    def _check_access(self, http: _Handler) -> None:
        """429 past the rate limit (per token, or per IP), 401 without the right bearer token."""
        given = http.headers.get("Authorization", "")
        token = given[7:].strip() if given[:7].lower() == "bearer " else ""
        authorized = self.api_token is None or hmac.compare_digest(token.encode(), self.api_token.encode())
        if self.rate_limiter is not None:
            key = f"token:{token}" if authorized and self.api_token is not None else f"ip:{http.client_address[0]}"
            wait = self.rate_limiter.acquire(key)
            if wait > 0:
                retry = str(max(1, math.ceil(wait))) if math.isfinite(wait) else "3600"
                raise APIError(429, f"Rate limit reached: retry in {retry} s", "requests", code="rate_limit_exceeded",
                               headers={"Retry-After": retry})
        if not authorized:
            message = "Incorrect API key provided" if token else "Missing bearer token in the Authorization header"
            raise APIError(401, message, code="invalid_api_key")

    def _model_object(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": OWNED_BY}

    def _list_models(self, http: _Handler) -> None:
        http.send_json({"object": "list", "data": [self._model_object()]})

    def _get_model(self, http: _Handler, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
        http.send_json(self._model_object())

    def _check_model(self, name: str) -> None:
        known = {self.model_name, self.engine.client.model.model_id}
        if name not in known:
            message = f"The model '{name}' does not exist; this server serves '{self.model_name}'"
            raise _bad(message, "model", "model_not_found")

    def _chat(self, http: _Handler) -> None:
        request = parse_chat_request(http.read_json(self.max_body_bytes))
        self._check_model(request.model)
        if not self._slots.acquire(timeout=self.queue_seconds):
            raise APIError(503, "the server is busy with other completions", "server_error", code="server_overloaded",
                           headers={"Retry-After": "1"})
        try:
            job = self.engine.prepare(request)
            if request.stream:
                self._stream(http, job)
            else:
                http.send_json(completion_body(self.engine.complete(job), self.model_name))
        finally:
            self._slots.release()

    def _stream(self, http: _Handler, job: _Job) -> None:
        """Role chunk, content (or tool call) deltas, the finish chunk, maybe usage, then [DONE].

        The first item is produced before the headers go out, so that a swarm failure at the start
        (no route, unreachable nodes) is still answered with a proper HTTP status.
        """
        chunks = _Chunks(self.model_name, job.request.include_usage)
        items = self.engine.stream(job)
        with contextlib.closing(items):
            first = next(items)
            http.start_stream()
            http.send_event(chunks.choice({"role": "assistant", "content": "", "refusal": None}))
            for item in _chain(first, items):
                if isinstance(item, str):
                    http.send_event(chunks.choice({"content": item}))
                    continue
                if item.tool_calls:
                    http.send_event(chunks.tool_calls(item.tool_calls))
                http.send_event(chunks.choice({}, item.finish_reason))
                if chunks.include_usage:
                    http.send_event(chunks.usage(item))
        http.send_event("[DONE]")
        http.end_stream()


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest
