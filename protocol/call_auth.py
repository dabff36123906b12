"""Per-call credentials: every gRPC call between swarm participants is signed by the caller's identity.

A call carries the caller's Ed25519 public key, a timestamp and a random nonce, and a signature over
them, the method and the id of the node it is meant for. The server accepts it only when the signature
holds, the timestamp is fresh, the nonce is new, the call was meant for this node (so a credential
cannot be replayed to another node) and the caller is a member: announced in the DHT (`is_member`),
or proven by the private swarm's key. Handlers learn the caller from `protocol.principals.principal_of`.
"""

from __future__ import annotations

import base64
import hmac
import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import grpc

from edgeswarm.protocol.busy import Busy, abort_busy
from edgeswarm.protocol.identity import (
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    NodeIdentity,
    fingerprint_of_key,
    verify,
)
from edgeswarm.protocol.principals import Principal
from edgeswarm.protocol.swarm_key import SWARM_AUTH_METADATA, call_token

CALLER_KEY_METADATA = "edgeswarm-caller-key"
CALL_METADATA = "edgeswarm-call"  # "<unix seconds>:<nonce hex>"
CALL_SIGNATURE_METADATA = "edgeswarm-call-signature"
CREDENTIAL_METADATA = frozenset({CALLER_KEY_METADATA, CALL_METADATA, CALL_SIGNATURE_METADATA, SWARM_AUTH_METADATA})
CALL_DOMAIN = b"edgeswarm.v1.call\x00"
CALL_FRESHNESS_SECONDS = 60.0  # a credential is accepted this long either side of the server's clock
NONCE_BYTES = 16
MAX_REMEMBERED_CALLS = 200_000  # nonces kept to refuse replays; each is forgotten once it is no longer fresh
MAX_CALL_METADATA_CHARS = 128


class CallRefused(Exception):
    """A call whose credential does not admit it; `code` is the gRPC status to answer with."""

    def __init__(self, code: grpc.StatusCode, reason: str):
        super().__init__(reason)
        self.code = code


def call_message(method: str, target_node_id: str, call: str) -> bytes:
    """What the caller signs for one call of `method` on the node `target_node_id`."""
    return CALL_DOMAIN + method.encode() + b"\x00" + target_node_id.encode() + b"\x00" + call.encode()


def call_credentials(identity: NodeIdentity, method: str, target_node_id: str, now: float | None = None) -> list[tuple[str, str]]:
    """The metadata that proves `identity` makes this call of `method` on `target_node_id`."""
    call = f"{time.time() if now is None else now:.3f}:{secrets.token_hex(NONCE_BYTES)}"
    signature = identity.sign(call_message(method, target_node_id, call))
    return [
        (CALLER_KEY_METADATA, base64.b64encode(identity.public_key_bytes).decode()),
        (CALL_METADATA, call),
        (CALL_SIGNATURE_METADATA, base64.b64encode(signature).decode()),
    ]


class SignedCalls(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                  grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """A client interceptor: signs every call made on a channel to the node `target_node_id`, and adds
    the private swarm's token when there is a key."""

    def __init__(self, identity: NodeIdentity, target_node_id: str, swarm_key: bytes | None = None):
        self._identity = identity
        self._target = target_node_id
        self._swarm_token = call_token(swarm_key) if swarm_key is not None else None

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = list(details.metadata or []) + call_credentials(self._identity, details.method, self._target)
        if self._swarm_token is not None:
            metadata.append((SWARM_AUTH_METADATA, self._swarm_token))
        return _CallDetails(details, metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, details: grpc.ClientCallDetails, metadata: list[tuple[str, str]]):
        self.method, self.timeout, self.credentials = details.method, details.timeout, details.credentials
        self.wait_for_ready, self.compression = details.wait_for_ready, details.compression
        self.metadata = metadata


class _NonceLedger:
    """The nonces of calls accepted within the freshness window, so that none is accepted twice."""

    def __init__(self, capacity: int):
        self._capacity = capacity
        self._seen: OrderedDict[str, float] = OrderedDict()  # nonce -> when it stops being fresh
        self._lock = threading.Lock()

    def admit(self, nonce: str, fresh_until: float, now: float) -> None:
        with self._lock:
            while self._seen and next(iter(self._seen.values())) < now:
                self._seen.popitem(last=False)
            if nonce in self._seen:
                raise CallRefused(grpc.StatusCode.UNAUTHENTICATED, "this call's credential was already used (a replay)")
            if len(self._seen) >= self._capacity:
                raise Busy("too many calls within the freshness window")
            self._seen[nonce] = fresh_until


class CallAuthenticator:
    """Checks the credential of each call made to the node `node_id`.

    `is_member(fingerprint)` says whether a key is announced in the swarm (it may look it up in the DHT,
    so it runs in the handler's thread, never in gRPC's serving loop). With a `swarm_key`, the call must
    also carry the private swarm's token. `open_methods` (full method names) need no credential.
    """

    def __init__(
        self,
        node_id: str,
        is_member: Callable[[str], bool],
        swarm_key: bytes | None = None,
        open_methods: frozenset[str] = frozenset(),
        clock: Callable[[], float] = time.time,
    ):
        self.node_id = node_id
        self.is_member = is_member
        self.open_methods = open_methods
        self._swarm_token = call_token(swarm_key) if swarm_key is not None else None
        self._clock = clock
        self._nonces = _NonceLedger(MAX_REMEMBERED_CALLS)

    def authenticate(self, method: str, metadata: dict[str, str]) -> Principal:
        """The caller of this call; CallRefused when its credential does not admit it."""
        if self._swarm_token is not None and not hmac.compare_digest(str(metadata.get(SWARM_AUTH_METADATA, "")), self._swarm_token):
            raise CallRefused(grpc.StatusCode.UNAUTHENTICATED, "this node belongs to a private swarm: the swarm key is required")
        key, call, signature = (metadata.get(name) for name in (CALLER_KEY_METADATA, CALL_METADATA, CALL_SIGNATURE_METADATA))
        if not (isinstance(key, str) and isinstance(call, str) and isinstance(signature, str)):
            raise CallRefused(grpc.StatusCode.UNAUTHENTICATED, "calls to swarm nodes must be signed by a member's identity (edgeswarm-caller-key, edgeswarm-call, edgeswarm-call-signature)")
        if max(len(key), len(call), len(signature)) > MAX_CALL_METADATA_CHARS:
            raise CallRefused(grpc.StatusCode.UNAUTHENTICATED, "malformed call credential: oversized field")
        public_key, signature_bytes = _b64(key, PUBLIC_KEY_BYTES), _b64(signature, SIGNATURE_BYTES)
        issued_at, nonce = _parse_call(call)
        now = self._clock()
        if abs(now - issued_at) > CALL_FRESHNESS_SECONDS:
            raise CallRefused(grpc.StatusCode.UNAUTHENTICATED, f"the call credential is stale or from the future ({now - issued_at:+.0f} s; the limit is ±{CALL_FRESHNESS_SECONDS:.0f} s)")
        if not verify(public_key, call_message(method, self.node_id, call), signature_bytes):
            raise CallRefused(grpc.StatusCode.UNAUTHENTICATED, "the call's signature does not hold (for this method and this node)")
        caller = fingerprint_of_key(public_key)
        if caller != self.node_id and self._swarm_token is None and not self.is_member(caller):
            raise CallRefused(grpc.StatusCode.PERMISSION_DENIED, f"{caller} is not a member of this swarm: announce a member record in the DHT first")
        self._nonces.admit(nonce, issued_at + CALL_FRESHNESS_SECONDS, now)
        return Principal(caller)


def _b64(text: str, size: int) -> bytes:
    try:
        value = base64.b64decode(text, validate=True)
    except ValueError as error:
        raise CallRefused(grpc.StatusCode.UNAUTHENTICATED, f"malformed call credential: {error}") from error
    if len(value) != size:
        raise CallRefused(grpc.StatusCode.UNAUTHENTICATED, f"malformed call credential: {len(value)} bytes where {size} belong")
    return value


def _parse_call(call: str) -> tuple[float, str]:
    issued, _, nonce = call.partition(":")
    try:
        issued_at = float(issued)
        bytes.fromhex(nonce)
    except ValueError as error:
        raise CallRefused(grpc.StatusCode.UNAUTHENTICATED, "malformed call credential: expected <seconds>:<nonce hex>") from error
    if len(nonce) != 2 * NONCE_BYTES or math.isnan(issued_at):
        raise CallRefused(grpc.StatusCode.UNAUTHENTICATED, "malformed call credential: bad nonce or time")
    return issued_at, nonce


class CallAuthInterceptor(grpc.ServerInterceptor):
    """A server interceptor: each call is authenticated (CallAuthenticator) when its handler starts, in
    the handler's own thread, and the handler's context then carries `principal`."""

    def __init__(self, authenticator: CallAuthenticator):
        self.authenticator = authenticator

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method in self.authenticator.open_methods:
            return handler
        pairs = [(key, value) for key, value in (handler_call_details.invocation_metadata or ()) if isinstance(value, str)]
        metadata = dict(pairs)
        credential_keys = [key for key, _ in pairs if key in CREDENTIAL_METADATA]
        repeated = sorted({key for key in credential_keys if credential_keys.count(key) > 1})  # which one to believe?
        kind = ("stream" if handler.request_streaming else "unary") + "_" + ("stream" if handler.response_streaming else "unary")
        behaviour = getattr(handler, kind)
        authenticate = self.authenticator.authenticate

        def authenticated(request_or_iterator, context):
            try:
                if repeated:
                    raise CallRefused(grpc.StatusCode.UNAUTHENTICATED, f"ambiguous call credential: {repeated} sent more than once")
                principal = authenticate(method, metadata)
            except CallRefused as refusal:
                context.abort(refusal.code, str(refusal))
            except Busy as refusal:
                abort_busy(context, refusal)
            return behaviour(request_or_iterator, AuthenticatedContext(context, principal))

        return handler._replace(**{kind: authenticated})


class AuthenticatedContext:
    """A servicer context that also names the authenticated caller (`principal`)."""

    def __init__(self, context: grpc.ServicerContext, principal: Principal):
        self._context = context
        self.principal = principal

    def __getattr__(self, name: str):
        return getattr(self._context, name)
