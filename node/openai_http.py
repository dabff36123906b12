"""An OpenAI-compatible HTTP API over the swarm: `GET /v1/models` and `POST /v1/chat/completions`.

Served by aiohttp on its own event loop in a background thread, so any OpenAI client works against a node:

    server = OpenAIServer(client, "127.0.0.1", 8000, access=ApiAccess(node_id, [ApiClient.with_token(...)]))
    server.start()
    # openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=TOKEN).chat.completions.create(...)

Chat completions support `messages` (system/developer, user, assistant with `tool_calls`, tool results),
`max_tokens`/`max_completion_tokens`, `temperature` (0: greedy), `top_p`, `seed`, `stop`, `stream`
(Server-Sent Events; `stream_options.include_usage`), `tools` with `tool_choice` and
`parallel_tool_calls`. Tool decisions use schema-constrained decoding (agent.constrained) through a swarm
inference session: arguments always parse and match their schema; they are greedy and not cut by
`max_tokens`. Tool results reach the model as a user message "Tool results: ...". A streamed tool call
arrives as one delta chunk. Unsupported parameters (`n` > 1, `logprobs`, penalties, `logit_bias`,
non-text `response_format`, image content) are refused with 400 rather than ignored; unknown fields are
ignored.

Requests are admitted through the node's `node.api_access.ApiAccess` (shared with the gRPC SwarmAPI):
the bearer token names the client, whose request rate and generated-token budget apply; tokens are
charged as they are generated.

Errors have OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: 400 bad JSON, field or
model (OpenAI itself answers 404 for an unknown model; this server uses 400, code "model_not_found"),
401 bad token, 404 path, 405 method, 408 body too slow, 411/413 body length, 429 over the request rate
(type "requests") or the token budget (type "tokens"), with Retry-After, 503 swarm unreachable or server
saturated, 500 anything else. Errors after a stream began arrive as a final `data: {"error": ...}` event.
Requests that are not HTTP at all get aiohttp's plain 400.

Limits (`HttpLimits`): at most `max_connections` connections (more are closed as soon as accepted); a
request's head and body must arrive within `request_deadline` seconds of the connection opening or of
the previous response, however slowly they trickle, or the connection is closed (408 when its head had
arrived); a connection without a whole request head for `keepalive` seconds counts as idle and is
closed (aiohttp's keep-alive: so a shorter keep-alive also cuts a slow head); bodies above
`max_body_bytes` get 413; a
client that does not take a response (or a streamed event) within `send_timeout` seconds is dropped.
Completions run on a pool of `max_concurrent` threads; more wait up to `queue_seconds`, then get 503. The
server's threads are its event loop's and that pool's, however many clients connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from edgeswarm.agent.constrained import SMOLLM2_CALL_BIAS
from edgeswarm.node.api_access import ApiAccess, Caller, RateLimited, Unauthenticated
from edgeswarm.node.openai_chat import (
    APIError,
    ChatEngine,
    ChatRequest,
    Chunks,
    Job,
    api_error_for,
    bad_request,
    completion_body,
    parse_chat_request,
)

logger = logging.getLogger(__name__)

OWNED_BY = "edgeswarm"
MAX_CONNECTIONS = 256
REQUEST_DEADLINE_SECONDS = 10.0
KEEPALIVE_SECONDS = 5.0
MAX_BODY_BYTES = 1 << 20
SEND_TIMEOUT_SECONDS = 60.0
MAX_CONCURRENT_COMPLETIONS = 4
QUEUE_SECONDS = 30.0
LIGHT_WORKERS = 2  # pool threads beyond the completions', for model listings and the steps of streams
LINGER_SECONDS = 2.0  # after refusing a body, how long it is still read so that the client sees the answer
LISTEN_BACKLOG = 128
ACCEPT_RETRY_SECONDS = 0.5  # after accept() fails (e.g. no file descriptor left)
STARTUP_SECONDS = 30.0
STOP_SECONDS = 10.0

_T = TypeVar("_T")
_END = object()  # what `next` gives for a finished stream


@dataclass(frozen=True)
class HttpLimits:
    """What one HTTP server lets its clients hold (module docstring)."""

    max_connections: int = MAX_CONNECTIONS
    request_deadline: float = REQUEST_DEADLINE_SECONDS
    keepalive: float = KEEPALIVE_SECONDS
    max_body_bytes: int = MAX_BODY_BYTES
    send_timeout: float = SEND_TIMEOUT_SECONDS
    max_concurrent: int = MAX_CONCURRENT_COMPLETIONS
    queue_seconds: float = QUEUE_SECONDS


class _ClientGone(Exception):
    """The client went away, or stopped taking what it was sent."""


def server_tls_context(certificate: bytes, key: bytes) -> ssl.SSLContext:
    """A server-side TLS context for a certificate and key given as PEM bytes."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as directory:
        cert_file, key_file = Path(directory, "cert.pem"), Path(directory, "key.pem")
        cert_file.write_bytes(certificate)
        key_file.write_bytes(key)
        context.load_cert_chain(cert_file, key_file)
    return context


# --- connections ---------------------------------------------------------------------------------------


class _Connection:
    """An open connection, and the deadline by which its next request's head and body must arrive."""

    def __init__(self, transport: asyncio.Transport, deadline_seconds: float):
        self.transport = transport
        self._seconds = deadline_seconds
        self._timer: asyncio.TimerHandle | None = None
        self.deadline = 0.0
        self.await_request()

    def await_request(self) -> None:
        """Starts the deadline of the next request: unless its head has arrived by then, the connection closes."""
        self.stop_timer()
        loop = asyncio.get_running_loop()
        self.deadline = loop.time() + self._seconds
        self._timer = loop.call_at(self.deadline, self.transport.abort)

    def stop_timer(self) -> None:
        """The head has arrived (its handler times the body against `deadline`), or the connection closed."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _ConnectionServer(web.Server):
    """aiohttp's low-level HTTP server, telling `on_open` and `on_close` of each connection."""

    def __init__(self, handler: Callable, on_open: Callable, on_close: Callable, **kwargs: Any):
        super().__init__(handler, **kwargs)
        self._on_open, self._on_close = on_open, on_close

    def connection_made(self, handler: web.RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self._on_open(handler, transport)

    def connection_lost(self, handler: web.RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        self._on_close(handler)


# --- the server ----------------------------------------------------------------------------------------


class OpenAIServer:
    """The OpenAI-compatible HTTP API of a swarm client, served from a background thread.

    `client`: a `SwarmClient`, or a callable making one on first use (then closed by `stop`; if it
    fails, requests get 503 and the next one tries again). `access`: who may call and how much (default:
    anyone, limited per IP address with the default limits). `model_name`: the model's name in the API
    (default: the client's `model.model_id`). `limits`: connections, deadlines, body size and completions
    at once (`HttpLimits`). `tls`: (certificate PEM, key PEM) to serve HTTPS instead of HTTP.
    """

    def __init__(
        self,
        client: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        access: ApiAccess | None = None,
        model_name: str | None = None,
        *,
        limits: HttpLimits = HttpLimits(),
        default_max_tokens: int = 512,
        call_bias: float = SMOLLM2_CALL_BIAS,
        tls: tuple[bytes, bytes] | None = None,
    ):
        self._tls = server_tls_context(*tls) if tls is not None else None
        is_factory = callable(client) and not hasattr(client, "generate")
        self._factory: Callable[[], Any] | None = client if is_factory else None
        self._client = None if is_factory else client
        self.host, self.port = host, port
        self.access = access if access is not None else ApiAccess("local")
        self.limits = limits
        self._model_name = model_name
        self.default_max_tokens, self.call_bias = default_max_tokens, call_bias
        self._lock = threading.Lock()
        self._engine: ChatEngine | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._http: _ConnectionServer | None = None
        self._connections: dict[web.RequestHandler, _Connection] = {}
        self._open = 0  # accepted connections not closed yet (handshaking ones too)
        self._handshakes: set[asyncio.Task] = set()
        self.created = int(time.time())

    # --- lifecycle ---

    def start(self) -> int:
        """Binds and serves in a background thread; returns the bound port (port 0 picks a free one)."""
        if self._thread is not None:
            return self.port
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.create_server((self.host, self.port), family=family, backlog=LISTEN_BACKLOG)
        listener.setblocking(False)
        self.port = listener.getsockname()[1]
        self._executor = ThreadPoolExecutor(self.limits.max_concurrent + LIGHT_WORKERS, thread_name_prefix=f"openai-http-{self.port}")
        started = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(listener, started), name=f"openai-http-{self.port}", daemon=True)
        self._thread.start()
        if not started.wait(STARTUP_SECONDS):
            raise RuntimeError("the HTTP server's event loop did not start")
        logger.info("OpenAI-compatible API on %s", self.url)
        return self.port

    def stop(self) -> None:
        """Stops serving (requests in flight are abandoned) and closes a client this server made."""
        if self._thread is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(timeout=STOP_SECONDS)
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._thread = self._loop = self._executor = None
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
    def open_connections(self) -> int:
        """Connections accepted and not closed yet."""
        return self._open

    @property
    def engine(self) -> ChatEngine:
        """The chat engine over the client (made on first use; 503 if the client cannot be made). Blocks."""
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
        """The model's name in the API (may make the client: blocks)."""
        return self._model_name or self.engine.client.model.model_id

    # --- the event loop (its own thread) ---

    def _serve(self, listener: socket.socket, started: threading.Event) -> None:
        try:
            asyncio.run(self._main(listener, started))  # its own loop; what is left of it is cancelled at the end
        finally:
            listener.close()

    async def _main(self, listener: socket.socket, started: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._slots = asyncio.Semaphore(self.limits.max_concurrent)
        self._http = _ConnectionServer(
            self._handle, self._opened, self._closed,
            keepalive_timeout=self.limits.keepalive, lingering_time=LINGER_SECONDS, access_log=None,
        )
        accepting = asyncio.get_running_loop().create_task(self._accept(listener))
        started.set()
        await self._stopping.wait()
        accepting.cancel()
        for connection in list(self._connections.values()):
            connection.transport.abort()
        await asyncio.sleep(0)  # lets the aborted connections' callbacks run

    async def _accept(self, listener: socket.socket) -> None:
        """Accepts connections; beyond `max_connections` open ones, closes each new one at once."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as error:
                logger.warning("cannot accept an HTTP connection: %s", error)
                await asyncio.sleep(ACCEPT_RETRY_SECONDS)
                continue
            if self._open >= self.limits.max_connections:
                sock.close()
                continue
            self._open += 1
            task = loop.create_task(self._connect(sock))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _connect(self, sock: socket.socket) -> None:
        """Hands an accepted socket to aiohttp (after the TLS handshake, which has `request_deadline`)."""
        tls = {"ssl": self._tls, "ssl_handshake_timeout": self.limits.request_deadline} if self._tls else {}
        try:
            await asyncio.get_running_loop().connect_accepted_socket(self._http, sock, **tls)
        except Exception as error:  # a failed or too slow TLS handshake: aiohttp never saw the connection
            logger.debug("HTTP connection dropped before serving: %r", error)
            sock.close()
            self._open -= 1

    def _opened(self, handler: web.RequestHandler, transport: asyncio.Transport) -> None:
        self._connections[handler] = _Connection(transport, self.limits.request_deadline)

    def _closed(self, handler: web.RequestHandler) -> None:
        connection = self._connections.pop(handler, None)
        if connection is not None:
            connection.stop_timer()
            self._open -= 1

    async def _run(self, function: Callable[..., _T], *args: Any) -> _T:
        """`function(*args)` on the server's thread pool (swarm work blocks)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(function, *args))

    async def _send(self, sending: Awaitable[Any]) -> None:
        try:
            await asyncio.wait_for(sending, self.limits.send_timeout)
        except (asyncio.TimeoutError, ConnectionError) as error:
            raise _ClientGone() from error

    # --- requests ---

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Answers one request; every error answer is an `APIError` in OpenAI's shape."""
        connection = self._connections[request.protocol]
        connection.stop_timer()
        try:
            return await self._respond(request, connection.deadline)
        except _ClientGone:
            connection.transport.abort()
            return web.Response(status=499)  # never delivered: the connection is gone
        except Exception as exception:
            error = api_error_for(exception)
            response = web.json_response(error.body(), status=error.status, headers=error.headers)
            if not request.content.is_eof():  # what is left of the body cannot be told from the next request
                response.force_close()
            return response
        finally:
            if not connection.transport.is_closing():
                connection.await_request()

    async def _respond(self, request: web.BaseRequest, deadline: float) -> web.StreamResponse:
        caller = self._admit(request)
        route, method = request.path.rstrip("/"), request.method
        if route == "/v1/models":
            methods = {"GET": lambda: self._models()}
        elif route.startswith("/v1/models/"):
            methods = {"GET": lambda: self._model(route[len("/v1/models/") :])}
        elif route == "/v1/chat/completions":
            methods = {"POST": lambda: self._chat(request, caller, deadline)}
        else:
            raise APIError(404, f"Invalid URL ({method} {request.path})", code="unknown_url")
        if method not in methods:
            raise APIError(405, f"{method} is not allowed on {route}", code="method_not_allowed",
                           headers={"Allow": ", ".join(methods)})
        return await methods[method]()

    def _admit(self, request: web.BaseRequest) -> Caller:
        """The request's caller: 429 past its request rate, 401 without a valid token where one is needed."""
        given = request.headers.get("Authorization", "")
        token = given[7:].strip() if given[:7].lower() == "bearer " else ""
        try:
            return self.access.admit(token, request.remote or "")
        except Unauthenticated as refusal:
            raise APIError(401, str(refusal), code="invalid_api_key") from None
        except RateLimited as refusal:
            raise _rate_limited(refusal, "requests") from None

    async def _models(self) -> web.Response:
        return web.json_response({"object": "list", "data": [await self._run(self._model_object)]})

    async def _model(self, name: str) -> web.Response:
        model = await self._run(self._model_object)
        if name != model["id"]:
            raise APIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
        return web.json_response(model)

    def _model_object(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": OWNED_BY}

    async def _read_json(self, request: web.BaseRequest, deadline: float) -> Any:
        """The request body parsed as JSON (411, 413, 408 or 400 when it cannot be)."""
        if "Transfer-Encoding" in request.headers:
            raise APIError(411, "chunked request bodies are not supported: send a Content-Length")
        length = request.content_length
        if length is None:
            raise APIError(411, "a request body with a valid Content-Length is required")
        if length > self.limits.max_body_bytes:
            message = f"the request body has {length} bytes, above the limit of {self.limits.max_body_bytes}"
            raise APIError(413, message, code="request_too_large")
        left = deadline - asyncio.get_running_loop().time()
        try:
            if request.headers.get("Expect", "").lower() == "100-continue":  # e.g. curl, before a large body
                await asyncio.wait_for(request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n"), self.limits.send_timeout)
            data = await asyncio.wait_for(request.content.readexactly(length), max(0.0, left))
        except asyncio.TimeoutError:
            raise APIError(408, f"the request did not arrive within {self.limits.request_deadline:g} s",
                           code="request_timeout") from None
        except (asyncio.IncompleteReadError, ConnectionError) as error:
            raise _ClientGone() from error
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise bad_request(f"the request body is not valid JSON: {error}") from None

    async def _chat(self, request: web.BaseRequest, caller: Caller, deadline: float) -> web.StreamResponse:
        chat = parse_chat_request(await self._read_json(request, deadline))
        try:
            await asyncio.wait_for(self._slots.acquire(), self.limits.queue_seconds)
        except asyncio.TimeoutError:
            raise APIError(503, "the server is busy with other completions", "server_error", code="server_overloaded",
                           headers={"Retry-After": "1"}) from None
        try:
            engine, job, model = await self._run(self._prepare, chat)
            try:
                caller.check_tokens(job.max_tokens)
            except RateLimited as refusal:
                raise _rate_limited(refusal, "tokens") from None
            job.on_tokens = caller.charge
            if chat.stream:
                return await self._stream(request, engine, job, model)
            return web.json_response(completion_body(await self._run(engine.complete, job), model))
        finally:
            self._slots.release()

    def _prepare(self, chat: ChatRequest) -> tuple[ChatEngine, Job, str]:
        """Checks the model and sizes the job (blocks: may make the client and tokenises)."""
        engine = self.engine
        if chat.model not in {self.model_name, engine.client.model.model_id}:
            message = f"The model '{chat.model}' does not exist; this server serves '{self.model_name}'"
            raise bad_request(message, "model", "model_not_found")
        return engine, engine.prepare(chat), self.model_name

    async def _stream(self, request: web.BaseRequest, engine: ChatEngine, job: Job, model: str) -> web.StreamResponse:
        """Role chunk, content (or tool call) deltas, the finish chunk, maybe usage, then [DONE].

        The first item is produced before the headers go out, so that a swarm failure at the start
        (no route, unreachable nodes) is still answered with a proper HTTP status.
        """
        chunks = Chunks(model, job.request.include_usage)
        items = engine.stream(job)
        try:
            item = await self._run(next, items, _END)
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"})
            response.enable_chunked_encoding()
            await self._send(response.prepare(request))
            try:
                await self._event(response, chunks.choice({"role": "assistant", "content": "", "refusal": None}))
                while item is not _END:
                    if isinstance(item, str):
                        await self._event(response, chunks.choice({"content": item}))
                    else:
                        if item.tool_calls:
                            await self._event(response, chunks.tool_calls(item.tool_calls))
                        await self._event(response, chunks.choice({}, item.finish_reason))
                        if chunks.include_usage:
                            await self._event(response, chunks.usage(item))
                    item = await self._run(next, items, _END)
                await self._event(response, "[DONE]")
            except _ClientGone:
                raise
            except Exception as error:  # the stream began: the error is its last event
                await self._event(response, api_error_for(error).body())
            await self._send(response.write_eof())
            return response
        finally:
            await self._run(items.close)

    async def _event(self, response: web.StreamResponse, data: dict | str) -> None:
        await self._send(response.write(f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()))


def _rate_limited(refusal: RateLimited, kind: str) -> APIError:
    """429 for a refusal of the request rate (`kind` "requests") or of the token budget ("tokens")."""
    return APIError(429, str(refusal), kind, code="rate_limit_exceeded", headers={"Retry-After": str(refusal.retry_after)})
