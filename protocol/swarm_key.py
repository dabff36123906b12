"""The shared key of a private swarm: only nodes and clients holding it take part.

With a key, every DHT record must carry an HMAC under it (swarm.dht.RecordAuth), and every gRPC call
between members carries a token derived from it (`SWARM_AUTH_METADATA`), which nodes check.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

import grpc

SWARM_AUTH_METADATA = "edgeswarm-swarm-auth"
MIN_KEY_BYTES = 16


class SwarmKeyError(ValueError):
    """The swarm key file is missing, unreadable or too short."""


def generate_swarm_key(path: str) -> bytes:
    """Writes a new random 32-byte key (hex) to `path`, readable by its owner only, and returns it."""
    key = secrets.token_bytes(32)
    file = Path(path)
    file.write_text(key.hex() + "\n")
    file.chmod(0o600)
    return key


def read_swarm_key(path: str) -> bytes:
    """The key in `path`: hex text of at least 16 bytes."""
    try:
        key = bytes.fromhex(Path(path).read_text().strip())
    except (OSError, ValueError) as error:
        raise SwarmKeyError(f"cannot read a swarm key (hex) from {path}: {error}") from error
    if len(key) < MIN_KEY_BYTES:
        raise SwarmKeyError(f"the swarm key in {path} has {len(key)} bytes; at least {MIN_KEY_BYTES}")
    return key


def call_token(key: bytes) -> str:
    """What members send as `SWARM_AUTH_METADATA` on their gRPC calls."""
    return hmac.new(key, b"edgeswarm.v1 grpc", hashlib.sha256).hexdigest()


class SwarmKeyInterceptor(grpc.ServerInterceptor):
    """Refuses (UNAUTHENTICATED) every call that does not carry the swarm's token."""

    def __init__(self, key: bytes):
        self._token = call_token(key)

    def intercept_service(self, continuation, handler_call_details):
        metadata = dict(handler_call_details.invocation_metadata or ())
        if hmac.compare_digest(str(metadata.get(SWARM_AUTH_METADATA, "")), self._token):
            return continuation(handler_call_details)
        return _refusal(continuation(handler_call_details))


def _refusal(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
    """A handler of the same shape that aborts with UNAUTHENTICATED."""
    if handler is None:
        return None

    def abort(request_or_iterator, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "this node belongs to a private swarm: the swarm key is required")

    kind = ("stream" if handler.request_streaming else "unary") + "_" + ("stream" if handler.response_streaming else "unary")
    return handler._replace(**{kind: abort})


class SwarmKeyCalls(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the swarm's token to every call made on a channel (a client interceptor)."""

    def __init__(self, key: bytes):
        self._metadata = (SWARM_AUTH_METADATA, call_token(key))

    def _details(self, details):
        metadata = list(details.metadata or []) + [self._metadata]
        return details._replace(metadata=metadata) if hasattr(details, "_replace") else _Details(details, metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


class _Details(grpc.ClientCallDetails):
    def __init__(self, details, metadata):
        self.method, self.timeout, self.credentials = details.method, details.timeout, details.credentials
        self.wait_for_ready, self.compression = details.wait_for_ready, details.compression
        self.metadata = metadata
