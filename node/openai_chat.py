"""OpenAI chat completions over the swarm, apart from HTTP: parsing a request, rendering its messages for
the model, generating (text, or tool calls through a swarm inference session by agent.tool_decoding, the
decoding path agent runs use too), and the response bodies. `node.openai_http` serves it; see there for what is supported.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgeswarm.agent.constrained import UnsupportedSchemaError
from edgeswarm.agent.steppers import SessionStepper
from edgeswarm.agent.tool_decoding import (
    MAX_CALLS,
    SMOLLM2_CALL_BIAS,
    ToolTurn,
    call_bias_for,
    call_room,
    call_text,
    decide,
    prompt_ids,
    results_text,
)
from edgeswarm.swarm.errors import NoRouteError, SwarmConnectionError, SwarmError
from edgeswarm.swarm.sampling import cut_at_stop

logger = logging.getLogger(__name__)

MAX_STOP_SEQUENCES = 4
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


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
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
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required and must be a string", "model")
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
        raise bad_request("'stream_options' must be an object", "stream_options")
    request.include_usage = bool(options.get("include_usage")) and request.stream
    _apply_tools(request, body)
    return request


def _refuse_unsupported(body: dict) -> None:
    """400 for parameters this server cannot honour, unless they carry their default value."""
    defaults = {"n": (None, 1), "logprobs": (None, False), "top_logprobs": (None, 0), "presence_penalty": (None, 0),
                "frequency_penalty": (None, 0), "logit_bias": (None, {})}
    for name, allowed in defaults.items():
        if name in body and body[name] not in allowed:
            raise bad_request(f"'{name}' = {body[name]!r} is not supported by this server", name, "unsupported_parameter")
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise bad_request("only response_format {'type': 'text'} is supported", "response_format", "unsupported_parameter")


def _integer(value: Any, param: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"'{param}' must be an integer", param)
    if minimum is not None and value < minimum:
        raise bad_request(f"'{param}' must be at least {minimum}", param)
    return value


def _number(body: dict, param: str, default: float, low: float, high: float) -> float:
    value = body.get(param)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise bad_request(f"'{param}' must be a number from {low} to {high}", param)
    return float(value)


def _boolean(body: dict, param: str, default: bool) -> bool:
    value = body.get(param)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"'{param}' must be a boolean", param)
    return value


def _stop_sequences(stop: Any) -> list[str]:
    stops = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOP_SEQUENCES or not all(isinstance(s, str) and s for s in stops):
        raise bad_request(f"'stop' must be a non-empty string or a list of at most {MAX_STOP_SEQUENCES} of them", "stop")
    return stops


# --- messages ----------------------------------------------------------------------------------------


def render_messages(messages: Any) -> list[dict]:
    """OpenAI messages -> [{"role": system|user|assistant, "content": str}] for the model's chat template.

    Assistant tool calls are written as the `<tool_call>{...}</tool_call>` lines the model is prompted to
    produce; consecutive tool results become one user message "Tool results: <name> returned: ...".
    """
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array", "messages")
    rendered: list[dict] = []
    results: list[str] = []  # tool results waiting to be written as one message
    call_names: dict[str, str] = {}  # tool_call_id -> function name
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if not isinstance(message, dict):
            raise bad_request(f"{param} must be an object", param)
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
            raise bad_request(f"{param}.role {role!r} is not one of system, developer, user, assistant, tool", f"{param}.role")
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
                raise bad_request(f"{param}.content: only text parts are supported", f"{param}.content")
            texts.append(part["text"])
        return "\n".join(texts)
    raise bad_request(f"{param}.content must be a string or an array of text parts", f"{param}.content")


def _assistant_text(message: dict, param: str, call_names: dict[str, str]) -> str:
    """An assistant message's text followed by its tool calls in the model's own call format."""
    lines = [_content(message.get("content"), param, optional=True)]
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise bad_request(f"{param}.tool_calls must be an array", f"{param}.tool_calls")
    for number, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise bad_request(f"{param}.tool_calls[{number}] must have a function with a name", f"{param}.tool_calls")
        arguments = function.get("arguments") or "{}"
        with contextlib.suppress(TypeError, ValueError):
            arguments = json.loads(arguments)
        call_names[str(call.get("id"))] = function["name"]
        lines.append(call_text(function["name"], arguments))
    return "\n".join(line for line in lines if line)


def _tool_results(results: list[str]) -> dict:
    return {"role": "user", "content": results_text(results)}


# --- tools -------------------------------------------------------------------------------------------


def _apply_tools(request: ChatRequest, body: dict) -> None:
    """Sets `tools`, `allow_answer` and `max_calls` from `tools`, `tool_choice` and `parallel_tool_calls`."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if not tools:
        if choice not in (None, "none", "auto"):
            raise bad_request("'tool_choice' needs 'tools'", "tool_choice")
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
            raise bad_request(f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
        request.tools, request.allow_answer = chosen, False
    else:
        expected = "'auto', 'none', 'required' or {'type': 'function', 'function': {'name': ...}}"
        raise bad_request(f"'tool_choice' must be {expected}", "tool_choice")


def _function_tools(tools: Any) -> list[dict]:
    """Checks OpenAI function tools; returns them as {"type": "function", "function": {...}}."""
    if not isinstance(tools, list):
        raise bad_request("'tools' must be an array", "tools")
    checked, names = [], set()
    for index, tool in enumerate(tools):
        param = f"tools[{index}]"
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
        if not isinstance(function, dict):
            raise bad_request(f"{param} must be {{'type': 'function', 'function': {{...}}}}", param)
        name = function.get("name")
        if not isinstance(name, str) or not _FUNCTION_NAME.match(name) or name in names:
            message = f"{param}.function.name must be a unique name of letters, digits, '_' or '-'"
            raise bad_request(message, f"{param}.function.name")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise bad_request(f"{param}.function.parameters must be a JSON schema object", f"{param}.function.parameters")
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


def _uncounted(tokens: int) -> None:
    """The default `Job.on_tokens`: generated tokens are counted nowhere."""


@dataclass
class Job:
    request: ChatRequest
    prompt_ids: list[int]
    max_tokens: int
    session_length: int
    on_tokens: Callable[[int], None] = _uncounted  # told of tokens as they are generated (e.g. to charge a budget)


class StopText:
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
        self.text, self.stopped = cut_at_stop(self.decode(self.ids), self.stop)
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

    def prepare(self, request: ChatRequest) -> Job:
        """Tokenises the prompt and sizes the output; 400 when it does not fit the model's context."""
        tokenizer = self.client.tokenizer
        if tokenizer is None:
            raise APIError(500, "this model has no tokenizer, so it cannot chat", "server_error")
        try:
            with self._tokenizer_lock:
                if request.tools:
                    ids = prompt_ids(tokenizer, request.messages, request.tools)
                else:
                    ids = list(tokenizer(self.client.apply_chat_template(request.messages))["input_ids"])
        except Exception as error:  # e.g. a chat template that refuses the order of roles
            raise bad_request(f"the messages do not fit the model's chat template: {error}", "messages") from error
        context = int(getattr(self.client.model.config, "max_position_embeddings", 2048))
        reserved = call_room(request.max_calls) if request.tools else 0
        room = context - len(ids) - reserved
        max_tokens = request.max_tokens if request.max_tokens is not None else min(self.default_max_tokens, room)
        if max_tokens > room or max_tokens < 1:
            raise bad_request(
                f"the prompt has {len(ids)} tokens; with {max_tokens} more tokens (and {reserved} kept for tool "
                f"calls) it exceeds the model's context of {context} tokens", "messages", "context_length_exceeded"
            )
        return Job(request, ids, max_tokens, len(ids) + max_tokens + reserved)

    def complete(self, job: Job) -> Completion:
        """The whole completion at once."""
        if job.request.tools:
            return self._decide(job)
        request = job.request
        result = self.client.generate(job.prompt_ids, job.max_tokens, **self._sampling(request))
        job.on_tokens(len(result.token_ids))
        finish = "length" if result.finish_reason == "length" else "stop"
        return Completion(result.text or "", [], finish, len(job.prompt_ids), len(result.token_ids))

    def stream(self, job: Job) -> Iterator[str | Completion]:
        """Content deltas as the swarm produces them, then the finished `Completion`."""
        if job.request.tools:
            completion = self._decide(job)
            if completion.content:
                yield completion.content
            yield completion
            return
        request = job.request
        tokenizer = self.client.tokenizer
        text = StopText(lambda ids: tokenizer.decode(ids, skip_special_tokens=True), request.stop)
        events = self.client.stream(job.prompt_ids, job.max_tokens, **self._sampling(request))
        count = 0
        with contextlib.closing(events):
            for event in events:
                count += 1
                job.on_tokens(1)
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

    def _decide(self, job: Job) -> Completion:
        """Tool calls or an answer, by constrained decoding through one swarm inference session."""
        request = job.request
        turn = ToolTurn(
            request.tools,
            allow_answer=request.allow_answer,
            max_calls=request.max_calls,
            max_answer_tokens=job.max_tokens,
            call_bias=call_bias_for(request.messages, self.call_bias),
            stop=tuple(request.stop),
        )
        with self.client.inference_session(max_length=job.session_length) as session:
            outcome = decide(SessionStepper(session), self.client.tokenizer, job.prompt_ids, turn)
        tokens = outcome.decision.tokens
        job.on_tokens(tokens)
        prompt_tokens = len(job.prompt_ids)
        if outcome.calls:
            calls = [_tool_call(call.name, call.arguments) for call in outcome.calls]
            return Completion(None, calls, "tool_calls", prompt_tokens, tokens)
        finish = "stop" if outcome.stopped or tokens < job.max_tokens else "length"
        return Completion(outcome.answer, [], finish, prompt_tokens, tokens)


def _tool_call(name: str, arguments: dict) -> dict:
    function = {"name": name, "arguments": json.dumps(arguments)}
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": function}


def api_error_for(error: BaseException) -> APIError:
    """The HTTP answer to an exception raised while serving a request."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, UnsupportedSchemaError):
        return bad_request(f"a tool's parameters cannot be followed: {error}", "tools", "unsupported_schema")
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


class Chunks:
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
