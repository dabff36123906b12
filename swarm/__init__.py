"""Finding the swarm, choosing routes through it, and the client that generates with it."""

import protocol  # noqa: F401  (first, so that gRPC's fork handlers stay off: see protocol/__init__.py)
