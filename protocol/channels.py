"""Opening gRPC channels to nodes: over TLS when the node announced a certificate bound to its identity,
and carrying this process's private-swarm token when it has a swarm key."""

from __future__ import annotations

import logging
import threading

import grpc

from protocol.identity import IdentityError, fingerprint_of_certificate
from protocol.swarm_key import SwarmKeyCalls

logger = logging.getLogger(__name__)

MAX_CERTIFICATES = 4096

_lock = threading.Lock()
_certificates: dict[str, tuple[str, bytes]] = {}  # address -> (node id, certificate PEM)
_swarm_key: bytes | None = None


def use_swarm_key(key: bytes | None) -> None:
    """Makes every channel this process opens carry the private swarm's token (None: an open swarm)."""
    global _swarm_key
    _swarm_key = key


def register_certificate(address: str, node_id: str, certificate: str) -> bool:
    """Remembers the TLS certificate a node announced for `address`, if it is bound to `node_id`'s
    identity (protocol.identity); returns whether it was. Channels to that address then use TLS and
    accept only that certificate."""
    try:
        bound_to = fingerprint_of_certificate(certificate.encode())
    except IdentityError as error:
        logger.warning("ignoring the certificate of %s at %s: %s", node_id, address, error)
        return False
    if bound_to != node_id:
        logger.warning("ignoring a certificate for %s at %s: it is bound to %s", node_id, address, bound_to)
        return False
    with _lock:
        if len(_certificates) >= MAX_CERTIFICATES and address not in _certificates:
            _certificates.pop(next(iter(_certificates)))
        _certificates[address] = (node_id, certificate.encode())
    return True


def open_channel(address: str, options: list | None = None) -> grpc.Channel:
    """A channel to the node at `address`: TLS pinned to its announced certificate if it has one."""
    options = list(options or [])
    with _lock:
        known = _certificates.get(address)
    if known is None:
        channel = grpc.insecure_channel(address, options=options)
    else:
        node_id, certificate = known
        credentials = grpc.ssl_channel_credentials(root_certificates=certificate)
        channel = grpc.secure_channel(address, credentials, options=options + [("grpc.ssl_target_name_override", node_id)])
    if _swarm_key is None:
        return channel
    return grpc.intercept_channel(channel, SwarmKeyCalls(_swarm_key))
