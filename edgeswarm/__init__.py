"""edgeswarm: a federated peer-to-peer runtime that serves a language model and its agents from a swarm
of edge devices.

The public API::

    from edgeswarm import SwarmClient, SessionPolicy, tool

The subpackages, lowest layer first (the import contracts in pyproject.toml keep each one from importing
a higher one): `proto` (generated gRPC code), `protocol` (wire formats, codecs, identity, signing),
`model` (reading models, spans of blocks, the client head), `partition` (placement), `swarm` (discovery,
routing, the model client), `agent` (the agent runtime and the client of agent tasks), `node` (the
daemon, its services and APIs).
"""

import os

# Before grpc loads: gRPC's fork handlers stay off. hivemind starts every DHT peer with fork(), from
# processes that already run gRPC servers and channels, and the DHT peer forks again to start its p2pd.
# With the handlers on (grpcio's default), each fork restarts gRPC's threads inside the child, where they
# can crash it (grpc/grpc#13998). No forked child of ours uses gRPC, so they have nothing to protect.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from edgeswarm.agent.client import SwarmClient  # noqa: E402
from edgeswarm.agent.tools import tool  # noqa: E402
from edgeswarm.swarm.errors import (  # noqa: E402
    NodeBusyError,
    NodeUnavailableError,
    NoRouteError,
    RemoteError,
    SwarmConnectionError,
    SwarmError,
)
from edgeswarm.swarm.policy import SessionPolicy  # noqa: E402

__all__ = [
    "NoRouteError",
    "NodeBusyError",
    "NodeUnavailableError",
    "RemoteError",
    "SessionPolicy",
    "SwarmClient",
    "SwarmConnectionError",
    "SwarmError",
    "tool",
]
