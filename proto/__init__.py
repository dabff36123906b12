"""The .proto files of the data plane, the task service and the apps' API, and the code grpc_tools generates."""
