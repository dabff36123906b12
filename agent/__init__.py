"""The distributed agent runtime: agent runs as graphs of steps placed on swarm nodes."""

import protocol  # noqa: F401  (first, so that gRPC's fork handlers stay off: see protocol/__init__.py)
