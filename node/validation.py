"""Checks on what a client sends before any of it reaches the model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from edgeswarm.proto import dataplane_pb2 as pb
from edgeswarm.protocol.codecs import CODECS, SemanticBasis, decode_tensor
from edgeswarm.protocol.tensors import TensorDecodeError, deserialize_tensor


class InvalidRequest(ValueError):
    """A request that is well-formed protobuf but cannot be served as it is: its text says why."""


@dataclass
class StepInputs:
    """Validated inputs of one forward step over a span."""

    hidden_states: torch.Tensor  # [batch, length, hidden] float32
    position_ids: torch.Tensor  # [batch, length] int64
    padding_mask: torch.Tensor  # [batch, length] bool
    wire_dtype: torch.dtype  # the dtype the client sent, used for the reply


def decode_step_inputs(
    hidden_states: pb.Tensor,
    position_ids: pb.Tensor,
    attention_mask: pb.Tensor,
    *,
    hidden_size: int,
    max_position: int,
    bases: Mapping[str, SemanticBasis] | None = None,
) -> StepInputs:
    """Decodes and validates the three tensors of a step, raising InvalidRequest with a precise reason.

    hidden_states may come in any codec of protocol.codecs (semantic ones need their basis in `bases`).
    """
    try:
        hidden = decode_tensor(hidden_states, bases=bases)
        positions = deserialize_tensor(position_ids)
        mask = deserialize_tensor(attention_mask)
    except TensorDecodeError as error:
        raise InvalidRequest(str(error)) from error
    if hidden.dim() != 3 or hidden.shape[2] != hidden_size:
        raise InvalidRequest(f"hidden_states must be [batch, length, {hidden_size}], got {list(hidden.shape)}")
    if not hidden.is_floating_point():
        raise InvalidRequest(f"hidden_states must be floating point, got {hidden.dtype}")
    if hidden.shape[0] == 0 or hidden.shape[1] == 0:
        raise InvalidRequest(f"hidden_states is empty: {list(hidden.shape)}")
    if not torch.isfinite(hidden).all():
        raise InvalidRequest("hidden_states contains NaN or Inf")
    batch_and_length = list(hidden.shape[:2])
    if list(positions.shape) != batch_and_length or positions.dtype not in (torch.int64, torch.int32):
        raise InvalidRequest(
            f"position_ids must be integer {batch_and_length}, got {positions.dtype} {list(positions.shape)}"
        )
    if positions.numel() and (positions.min() < 0 or positions.max() >= max_position):
        raise InvalidRequest(f"position_ids must lie in [0, {max_position})")
    if list(mask.shape) != batch_and_length:
        raise InvalidRequest(f"attention_mask must be {batch_and_length}, got {list(mask.shape)}")
    return StepInputs(
        hidden_states=hidden.to(torch.float32),
        position_ids=positions.to(torch.int64),
        padding_mask=mask.to(torch.bool),
        wire_dtype=hidden.dtype,
    )


def check_reply_codec(name: str, bases: Mapping[str, SemanticBasis]) -> None:
    """Refuses a reply codec this node cannot produce."""
    if name and name not in CODECS:
        raise InvalidRequest(f"unknown reply codec {name!r}; this node speaks {', '.join(sorted(CODECS))}")
    if name == "semantic" and not bases:
        raise InvalidRequest("reply codec 'semantic' asked for, but this node holds no semantic basis")
