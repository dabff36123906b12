"""Helpers for tests that run real node processes."""

from __future__ import annotations

import grpc

from proto import dataplane_pb2 as pb
from proto import dataplane_pb2_grpc as pb_grpc


def node_info(address: str) -> pb.NodeInfoResponse:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.BlockServiceStub(channel).NodeInfo(pb.NodeInfoRequest(), timeout=10)


def until_eos(token_ids, eos_ids) -> list[int]:
    """Token ids up to (not including) the first end-of-sequence token, as the client reports them."""
    result = []
    for token in [int(token) for token in token_ids]:
        if token in eos_ids:
            break
        result.append(token)
    return result

