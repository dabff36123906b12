"""Who is calling: the principal a gRPC call or an API request was authenticated as.

A principal is a key holder (a node or a client of the swarm, by its Ed25519 fingerprint) or an API
client of one node (`<node id>/api:<token name>`), which that node vouches for. Servers learn the caller
of a gRPC call from `principal_of(context)`; the server interceptor of protocol.call_auth sets it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

API_SEPARATOR = "/api:"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. `id` is a key fingerprint, or `<node id>/api:<name>` for an API client."""

    id: str

    @property
    def key_id(self) -> str:
        """The fingerprint of the key that vouches for this principal (its own, or its API node's)."""
        return self.id.split(API_SEPARATOR, 1)[0]

    @property
    def is_api_client(self) -> bool:
        return API_SEPARATOR in self.id

    @classmethod
    def api_client(cls, node_id: str, name: str) -> Principal:
        """The API client `name` of the node `node_id`."""
        return cls(f"{node_id}{API_SEPARATOR}{name}")


def principal_of(context: Any) -> Principal | None:
    """The authenticated caller of the RPC whose servicer context this is; None when the servicer runs
    without the call-auth interceptor (then nothing that needs an owner may be allowed)."""
    return getattr(context, "principal", None)
