"""Wire formats shared by nodes and clients: tensors, DHT records and their validation, identity and signing.

Importing any edgeswarm package imports this one first, before grpc loads, to switch off gRPC's fork
handlers. hivemind starts every DHT peer with fork(), from processes that already run gRPC servers and
channels, and the DHT peer forks again to start its p2pd. With the handlers on (grpcio's default), each
fork restarts gRPC's threads inside the child, where they can crash it (grpc/grpc#13998). No forked child
of ours uses gRPC, so the handlers have nothing to protect.
"""

import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
