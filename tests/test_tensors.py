import pytest
import torch

from edgeswarm.proto import dataplane_pb2 as pb
from edgeswarm.protocol.tensors import (
    TensorDecodeError,
    deserialize_tensor,
    serialize_tensor,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool])
def test_round_trip_keeps_values_dtype_and_shape(dtype):
    source = (torch.randn(2, 3, 5) * 10).to(dtype)
    restored = deserialize_tensor(pb.Tensor.FromString(serialize_tensor(source).SerializeToString()))
    assert restored.dtype == dtype and restored.shape == source.shape
    assert torch.equal(restored, source)


def test_non_contiguous_tensor_travels_as_its_values():
    source = torch.arange(12, dtype=torch.float32).reshape(3, 4).T
    assert torch.equal(deserialize_tensor(serialize_tensor(source)), source)


def test_byte_count_must_match_shape():
    message = serialize_tensor(torch.zeros(2, 3))
    message.shape[:] = [2, 4]
    with pytest.raises(TensorDecodeError, match="needs 32 bytes, got 24"):
        deserialize_tensor(message)


def test_unknown_dtype_is_named():
    message = serialize_tensor(torch.zeros(2))
    message.dtype = "complex256"
    with pytest.raises(TensorDecodeError, match="unknown dtype 'complex256'"):
        deserialize_tensor(message)


def test_negative_dimension_is_refused():
    with pytest.raises(TensorDecodeError, match="negative dimension"):
        deserialize_tensor(pb.Tensor(data=b"", dtype="float32", shape=[-1, 4]))


def test_huge_declared_shape_is_refused_before_allocation():
    message = pb.Tensor(data=b"\x00" * 16, dtype="float32", shape=[1 << 20, 1 << 20])
    with pytest.raises(TensorDecodeError, match="above the limit"):
        deserialize_tensor(message)


def test_bool_tensor_with_other_bytes_is_refused():
    with pytest.raises(TensorDecodeError, match="bool tensor"):
        deserialize_tensor(pb.Tensor(data=b"\x00\x07", dtype="bool", shape=[2]))


@pytest.mark.parametrize("shape", [[0, 2**62], [2**62, 2**62, 0], [1] * 65])
def test_absurd_shapes_are_refused_as_decode_errors(shape):
    with pytest.raises(TensorDecodeError):
        deserialize_tensor(pb.Tensor(data=b"", dtype="float32", shape=shape))
