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
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent.constrained import SMOLLM2_CALL_BIAS
from node.openai_chat import APIError, ChatEngine, Chunks, Job, api_error_for, bad_request, completion_body, parse_chat_request
from node.rate_limit import RateLimiter

logger = logging.getLogger(__name__)

OWNED_BY = "edgeswarm"


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
            raise bad_request(f"the request body is not valid JSON: {error}") from None

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
            raise bad_request(message, "model", "model_not_found")

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

    def _stream(self, http: _Handler, job: Job) -> None:
        """Role chunk, content (or tool call) deltas, the finish chunk, maybe usage, then [DONE].

        The first item is produced before the headers go out, so that a swarm failure at the start
        (no route, unreachable nodes) is still answered with a proper HTTP status.
        """
        chunks = Chunks(self.model_name, job.request.include_usage)
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
