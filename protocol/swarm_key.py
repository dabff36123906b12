"""The shared key of a private swarm: only nodes and clients holding it take part.

With a key, every DHT record must carry an HMAC under it (swarm.dht.RecordAuth), and every gRPC call
between members carries a token derived from it (`SWARM_AUTH_METADATA`), which nodes check
(protocol.call_auth).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

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
