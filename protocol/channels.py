"""Opening gRPC channels to nodes: over TLS when the node announced a certificate bound to its identity,
with every call signed by this process's identity (protocol.call_auth) and carrying the private swarm's
token when there is a swarm key.

Certificates are pinned by node id: a record can only pin the certificate of the node that signed it,
so no record can make another node unreachable by naming its address.
"""

from __future__ import annotations

import logging
import threading

import grpc

from edgeswarm.protocol.call_auth import SignedCalls
from edgeswarm.protocol.identity import (
    IdentityError,
    NodeIdentity,
    fingerprint_of_certificate,
)

logger = logging.getLogger(__name__)

MAX_CERTIFICATES = 4096

_lock = threading.Lock()
_certificates: dict[str, bytes] = {}  # node id -> its certificate PEM
_swarm_key: bytes | None = None
_identity: NodeIdentity | None = None


def use_swarm_key(key: bytes | None) -> None:
    """Makes every channel this process opens carry the private swarm's token (None: an open swarm)."""
    global _swarm_key
    _swarm_key = key


def use_identity(identity: NodeIdentity) -> None:
    """Makes this process sign its calls to nodes with `identity` (a node's own, or a client's)."""
    global _identity
    with _lock:
        _identity = identity


def process_identity() -> NodeIdentity:
    """The identity this process signs its calls with; a new ephemeral one unless `use_identity` set one."""
    global _identity
    with _lock:
        if _identity is None:
            _identity = NodeIdentity.generate()
        return _identity


def register_certificate(node_id: str, certificate: str) -> bool:
    """Pins the TLS certificate the node `node_id` announced, if it is bound to that node's identity
    (protocol.identity); returns whether it was. Channels to that node then use TLS and accept only it."""
    try:
        bound_to = fingerprint_of_certificate(certificate.encode())
    except IdentityError as error:
        logger.warning("ignoring the certificate of %s: %s", node_id, error)
        return False
    if bound_to != node_id:
        logger.warning("ignoring a certificate for %s: it is bound to %s", node_id, bound_to)
        return False
    with _lock:
        if len(_certificates) >= MAX_CERTIFICATES and node_id not in _certificates:
            _certificates.pop(next(iter(_certificates)))
        _certificates[node_id] = certificate.encode()
    return True


def open_channel(address: str, node_id: str, options: list | None = None, identity: NodeIdentity | None = None) -> grpc.Channel:
    """A channel to the node `node_id` at `address`, whose calls `identity` (by default this process's)
    signs for that node: TLS pinned to its announced certificate if it has one."""
    options = list(options or [])
    with _lock:
        certificate = _certificates.get(node_id)
    if certificate is None:
        channel = grpc.insecure_channel(address, options=options)
    else:
        credentials = grpc.ssl_channel_credentials(root_certificates=certificate)
        channel = grpc.secure_channel(address, credentials, options=options + [("grpc.ssl_target_name_override", node_id)])
    return grpc.intercept_channel(channel, SignedCalls(identity or process_identity(), node_id, _swarm_key))
