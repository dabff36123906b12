""""Busy": a node refusing work it has no room for right now, told apart from every other refusal.

A busy refusal is a RESOURCE_EXHAUSTED status whose details (gRPC's rich status, `grpc-status-details-bin`)
carry a `google.rpc.RetryInfo`: how long the caller should leave the node alone. Clients go elsewhere
for that long instead of treating the node as failed. Other RESOURCE_EXHAUSTED refusals (a message too
large, a request over its budget) carry no RetryInfo and are the caller's own fault.
"""

from __future__ import annotations

from typing import NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

BUSY_RETRY_SECONDS = 5.0  # how long a busy node asks callers to stay away: slots and KV room free up within seconds


class Busy(Exception):
    """Work refused for want of room (a slot, KV-cache memory); `retry_after` seconds may bring room."""

    retry_after: float = BUSY_RETRY_SECONDS


def busy_status(reason: str, retry_after: float = BUSY_RETRY_SECONDS) -> grpc.Status:
    """The RESOURCE_EXHAUSTED status of a busy refusal, with its RetryInfo detail."""
    retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=int(retry_after), nanos=int(retry_after % 1 * 1e9)))
    detail = any_pb2.Any()
    detail.Pack(retry)
    return rpc_status.to_status(status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=reason, details=[detail]))


def abort_busy(context: grpc.ServicerContext, refusal: Busy) -> NoReturn:
    """Ends the call as busy (see `busy_status`)."""
    context.abort_with_status(busy_status(str(refusal), refusal.retry_after))
    raise AssertionError("abort_with_status returned")  # gRPC raises; this keeps the NoReturn promise


def busy_retry_after(error: grpc.RpcError) -> float | None:
    """Seconds a busy node asked to be left alone, or None if `error` is not a busy refusal."""
    if not hasattr(error, "trailing_metadata") or error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    try:
        status = rpc_status.from_call(error)
    except ValueError:  # details that do not match the call's status: not a well-formed busy refusal
        return None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            return retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
    return None
