"""The node daemon: loads a span of transformer blocks, serves it over gRPC and announces it in the DHT."""

import protocol  # noqa: F401  (first, so that gRPC's fork handlers stay off: see protocol/__init__.py)
