"""The .proto files of the data plane, the task service and the apps' API, and the code grpc_tools generates."""

import protocol  # noqa: F401  (first, so that gRPC's fork handlers stay off: see protocol/__init__.py)
