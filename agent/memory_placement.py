"""Where the swarm keeps a memory namespace: its storage id, and the nodes that hold it.

A namespace is (owner principal id, name). The swarm never sees the name: it sees the storage id, a
keyed hash `HMAC-SHA256(key, owner + "\\0" + name)` (32 hex characters), where the key is the private
swarm's key, or a fixed domain string in an open swarm. Nodes store records under it, capability records
list it, and placement ranks nodes by it. Without the swarm key a storage id reveals nothing of the name;
in an open swarm anyone can still test a guessed (owner, name) against it.

`replica_nodes` places a storage id by rendezvous (highest-random-weight) hashing, so that adding or
removing a node moves only the namespaces that node wins or held.
"""

from __future__ import annotations

import hashlib
import hmac
import re

from edgeswarm.agent.vector_store import check_namespace

MEMORY_REPLICAS = 2  # nodes that hold each namespace; a write succeeds only once this many hold it
OPEN_SWARM_MEMORY_KEY = b"edgeswarm.v1 memory namespace"  # the storage-id key of a swarm without a swarm key
STORAGE_ID_CHARS = 32
STORAGE_ID_RE = re.compile(rf"^[0-9a-f]{{{STORAGE_ID_CHARS}}}$")


def storage_id(owner: str, name: str, swarm_key: bytes | None) -> str:
    """The storage id of the namespace `name` of the principal `owner` (see the module docstring)."""
    if not isinstance(owner, str) or not owner:
        raise ValueError("a memory namespace needs its owner's principal id")
    check_namespace(name)
    key = OPEN_SWARM_MEMORY_KEY if swarm_key is None else swarm_key
    return hmac.new(key, f"{owner}\x00{name}".encode(), hashlib.sha256).hexdigest()[:STORAGE_ID_CHARS]


def is_storage_id(value: object) -> bool:
    return isinstance(value, str) and STORAGE_ID_RE.match(value) is not None


def _hash64(*parts: str) -> int:
    """A stable 64-bit hash of strings (sha256; the parts are NUL-separated so they cannot run together)."""
    digest = hashlib.sha256("\x00".join(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def replica_nodes(store: str, node_ids: list[str], replicas: int = MEMORY_REPLICAS) -> list[str]:
    """The nodes that should hold the storage id `store`, best first, by rendezvous hashing.

    Each node gets the weight hash(node, store) and the `replicas` heaviest win, so adding a node only
    takes the namespaces it now wins and removing one only moves the namespaces it held. Returns fewer
    than `replicas` nodes when there are fewer nodes; `replicas=len(node_ids)` ranks them all.
    """
    if not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"replicas must be a positive int, got {replicas!r}")
    nodes = set(node_ids)
    if not nodes:
        raise ValueError(f"no nodes to place {store!r} on")
    ranked = sorted(nodes, key=lambda node: (_hash64(node, store), node), reverse=True)
    return ranked[:replicas]
