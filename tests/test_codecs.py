"""Activation codecs: round trips, error bounds, sizes, the semantic basis, and hostile messages."""

from __future__ import annotations

import random
import zlib

import pytest
import torch

from edgeswarm.model.semantic_basis import (
    DEFAULT_SEMANTIC_BYTES,
    fit_semantic_basis,
    load_basis,
    save_basis,
)
from edgeswarm.proto import dataplane_pb2 as pb
from edgeswarm.protocol.codecs import (
    CODECS,
    LOSSLESS_CODECS,
    CodecError,
    SemanticBasis,
    codec_names,
    decode_tensor,
    encode_semantic,
    encode_tensor,
    encoded_size,
    fits_fp16,
    relative_error,
)
from edgeswarm.protocol.tensors import TensorDecodeError, serialize_tensor

HIDDEN = 576
PLAIN_CODECS = [name for name in codec_names() if name != "semantic"]
# Relative error each lossy codec must stay within on the test data.
TOLERANCE = {"fp16": 1e-3, "bf16": 1e-2, "int8_token": 0.1, "int8_block": 0.03, "int8_outlier": 0.03, "int4_block": 0.2}


def random_states(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def activation_like(*shape: int, seed: int = 0) -> torch.Tensor:
    """Like an LLM residual stream: mostly small values, a few channels hundreds of times larger."""
    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(*shape, generator=generator) * 0.5
    outliers = torch.randperm(shape[-1], generator=generator)[:4]
    states[..., outliers] = torch.randn(len(outliers), generator=generator) * 300 + 400
    return states


def wire(message: pb.Tensor) -> pb.Tensor:
    """The message as a peer receives it."""
    return pb.Tensor.FromString(message.SerializeToString())


def low_rank_states(tokens: int, rank: int, *, seed: int, basis: torch.Tensor | None = None, offset=None):
    generator = torch.Generator().manual_seed(seed)
    if basis is None:
        basis = torch.linalg.qr(torch.randn(HIDDEN, rank, generator=generator))[0]
    coefficients = torch.randn(tokens, rank, generator=generator) * torch.linspace(8, 2, rank)
    noise = torch.randn(tokens, HIDDEN, generator=generator) * 0.02
    offset = torch.randn(HIDDEN, generator=generator) if offset is None else offset
    return coefficients @ basis.T + offset + noise, basis, offset


@pytest.fixture(scope="module")
def semantic_setup():
    """A basis fitted at boundaries 0 and 3 on rank-48-plus-noise data (default byte budget), and held-out data."""
    train, directions, offset = low_rank_states(2048, 48, seed=1)
    test, _, _ = low_rank_states(64, 48, seed=2, basis=directions, offset=offset)
    basis = fit_semantic_basis({0: train, 3: train * 2})
    return basis, test


# ---------------------------------------------------------------------------------------------
# Round trips


def test_registry_lists_every_codec():
    assert codec_names() == ["none", "lossless", "fp16", "bf16", "int8_token", "int8_block", "int8_outlier", "int4_block", "semantic"]
    assert LOSSLESS_CODECS == {"none", "lossless"}
    assert all(CODECS[name].name == name for name in CODECS)


@pytest.mark.parametrize("make", [random_states, activation_like], ids=["random", "activation"])
@pytest.mark.parametrize("name", PLAIN_CODECS)
def test_round_trip(name, make):
    source = make(2, 37, HIDDEN)
    message = wire(encode_tensor(source, name))
    restored = decode_tensor(message)
    assert restored.dtype == torch.float32 and restored.shape == source.shape
    if CODECS[name].lossless:
        assert torch.equal(restored, source)
    else:
        assert relative_error(source, restored) < TOLERANCE[name]


@pytest.mark.parametrize("name", PLAIN_CODECS)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (0, HIDDEN), (5,), (2, 3, 100), (1, 1, 1)])
def test_odd_shapes_round_trip(name, shape):
    source = torch.randn(shape)
    restored = decode_tensor(wire(encode_tensor(source, name)))
    assert restored.shape == source.shape
    assert torch.allclose(restored, source, atol=0.3, rtol=0.3)


def test_lossless_is_exact_and_smaller_on_activations():
    source = activation_like(1, 128, HIDDEN).to(torch.bfloat16).float()  # like bf16 weights' outputs
    message = encode_tensor(source, "lossless")
    assert torch.equal(decode_tensor(wire(message)), source)
    assert encoded_size(message) < source.numel() * 4 * 0.75


def test_lossless_keeps_nan_and_inf_bits():
    source = torch.tensor([float("nan"), float("inf"), -0.0, 1e-45])
    restored = decode_tensor(wire(encode_tensor(source, "lossless")))
    assert restored.view(torch.int32).tolist() == source.view(torch.int32).tolist()


@pytest.mark.parametrize("name", PLAIN_CODECS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_come_back_in_their_dtype(name, dtype):
    source = random_states(1, 9, HIDDEN).to(dtype)
    message = wire(encode_tensor(source, name))
    assert message.dtype == {torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    restored = decode_tensor(message)
    assert restored.dtype == dtype
    if name in LOSSLESS_CODECS or (name, dtype) in {("bf16", torch.bfloat16), ("fp16", torch.float16)}:
        assert torch.equal(restored, source)
    else:
        assert relative_error(source, restored) < 0.2


def test_none_codec_is_plain_serialization():
    source = random_states(2, 3)
    message = encode_tensor(source, "none")
    assert message == serialize_tensor(source) and message.codec == ""
    for codec in ("", "none"):
        message.codec = codec
        assert torch.equal(decode_tensor(message), source)
    ids = torch.arange(6).reshape(2, 3)
    assert torch.equal(decode_tensor(encode_tensor(ids, "none")), ids)


def test_integer_tensors_only_travel_raw():
    with pytest.raises(CodecError, match="int8_block.*int64"):
        encode_tensor(torch.arange(4), "int8_block")
    message = encode_tensor(torch.arange(4), "none")
    message.codec = "lossless"
    with pytest.raises(CodecError, match="decoded dtype must be one of"):
        decode_tensor(message)


# ---------------------------------------------------------------------------------------------
# Error bounds and sizes


def block_max_error(source: torch.Tensor, restored: torch.Tensor, block: int) -> torch.Tensor:
    return (source - restored).abs().reshape(-1, HIDDEN // block, block).amax(-1)


@pytest.mark.parametrize("name,block,qmax", [("int8_block", 64, 127), ("int4_block", 32, 7)])
def test_block_error_is_at_most_half_a_scale(name, block, qmax):
    source = activation_like(1, 128, HIDDEN, seed=3)
    message = encode_tensor(source, name)
    scales = torch.frombuffer(bytearray(message.scales), dtype=torch.float16).float().reshape(-1, HIDDEN // block)
    assert scales.shape[0] == 128
    assert torch.all(block_max_error(source, decode_tensor(message), block) <= scales / 2 * (1 + 1e-5) + 1e-7)
    absmax = source.abs().reshape(-1, HIDDEN // block, block).amax(-1)
    assert torch.all(scales * qmax >= absmax) and torch.all(scales * qmax <= absmax * 1.001)


def test_int8_token_error_is_at_most_half_a_scale():
    source = activation_like(3, 20, HIDDEN, seed=4)
    message = encode_tensor(source, "int8_token")
    scales = torch.frombuffer(bytearray(message.scales), dtype=torch.float16).float().reshape(3, 20, 1)
    assert torch.all((source - decode_tensor(message)).abs() <= scales / 2 * (1 + 1e-5))


def test_block_codecs_handle_hidden_sizes_not_divisible_by_the_block():
    source = activation_like(2, 5, 100)  # 100 = 64 + 36 = 3 * 32 + 4
    for name, blocks in (("int8_block", 2), ("int4_block", 4)):
        message = encode_tensor(source, name)
        assert len(message.scales) == 2 * 5 * blocks * 2
        assert relative_error(source, decode_tensor(wire(message))) < TOLERANCE[name]


def test_zero_and_tiny_blocks():
    source = torch.zeros(2, HIDDEN)
    source[1, :64] = 1e-9  # its float16 scale would underflow to zero without rounding up
    for name in ("int8_token", "int8_block", "int4_block"):
        restored = decode_tensor(encode_tensor(source, name))
        assert torch.equal(restored[0], source[0])
        assert torch.all((restored[1] - source[1]).abs() <= 1e-7)


def test_sizes_per_token_at_hidden_576():
    source = activation_like(1, 128, HIDDEN)
    raw = source.numel() * 4
    size = {name: encoded_size(encode_tensor(source, name)) for name in PLAIN_CODECS}
    assert size["none"] == raw
    assert size["fp16"] == size["bf16"] == raw // 2
    assert size["int8_token"] == 128 * (576 + 2)
    assert size["int8_block"] == 128 * (576 + 9 * 2) and raw / size["int8_block"] >= 3.8
    assert size["int4_block"] == 128 * (288 + 18 * 2) and raw / size["int4_block"] >= 6


def test_fp16_refuses_overflow_and_names_bf16():
    source = random_states(2, HIDDEN)
    assert fits_fp16(source)
    source[1, 5] = 70000.0
    assert not fits_fp16(source)
    with pytest.raises(CodecError, match="use 'bf16'"):
        encode_tensor(source, "fp16")
    assert decode_tensor(encode_tensor(source, "bf16"))[1, 5] == 70144.0  # bf16 keeps the range
    assert not fits_fp16(torch.tensor([float("nan")]))


@pytest.mark.parametrize("name", ["fp16", "bf16", "int8_token", "int8_block", "int4_block", "semantic"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_lossy_codecs_refuse_nan_and_inf(name, bad, semantic_setup):
    basis, test = semantic_setup
    source = test.clone()
    source[3, 7] = bad
    with pytest.raises(CodecError, match=f"{name}.*NaN or Inf"):
        encode_tensor(source, name, basis=basis, boundary=0)


def test_scales_beyond_fp16_range_are_refused():
    with pytest.raises(CodecError, match="int8_block.*float16's range"):
        encode_tensor(torch.full((1, 64), 1e7), "int8_block")


# ---------------------------------------------------------------------------------------------
# Semantic codec


def test_semantic_round_trip_is_close_and_small(semantic_setup):
    basis, test = semantic_setup
    source = test.reshape(1, 64, HIDDEN)
    result = encode_semantic(source, basis, 0)
    assert not result.fell_back and result.worst_error < 0.02
    message = wire(result.message)
    assert message.codec == "semantic" and message.basis == f"{basis.digest}/0"
    restored = decode_tensor(message, bases={basis.digest: basis})
    assert restored.shape == source.shape and relative_error(source, restored) < 0.02
    k8, k4 = basis.allocations[0]
    assert k8 >= 1 and k4 >= 1 and basis.rank(0) == k8 + k4
    assert basis.bytes_per_token(0) == k8 + k4 // 2 + 4 <= DEFAULT_SEMANTIC_BYTES
    assert encoded_size(message) == 64 * basis.bytes_per_token(0)
    assert source.numel() * 4 / encoded_size(message) >= 8
    # the encoder's measured error is what the receiver actually gets
    worst = ((source - restored).norm(dim=-1) / source.norm(dim=-1)).max().item()
    assert worst == pytest.approx(result.worst_error, rel=1e-4)


def test_semantic_allocation_follows_the_variances_and_the_budget(semantic_setup):
    basis, _ = semantic_setup
    # the 48 strong directions are worth 8 bits; the noise directions at most 4
    k8, k4 = basis.allocations[0]
    assert 40 <= k8 <= 60 and basis.predicted_errors[0] < 0.02
    stds = basis.stds[0]
    assert bool((stds[:-1] >= stds[1:]).all()) and stds[k8 - 1] > 10 * stds[k8 + k4 - 1]
    train, _, _ = low_rank_states(1024, 48, seed=1)
    for budget in (64, 100, 272, 400):
        small = fit_semantic_basis({0: train}, max_bytes_per_token=budget)
        assert budget - 2 <= small.bytes_per_token(0) <= budget
        assert small.allocations[0][1] % 2 == 0
    capped = fit_semantic_basis({0: train}, max_rank=20)
    assert capped.rank(0) <= 20


def test_semantic_uses_the_boundary_it_was_given(semantic_setup):
    basis, test = semantic_setup
    message = encode_tensor(test * 2, "semantic", basis=basis, boundary=3)
    assert message.basis.endswith("/3")
    assert relative_error(test * 2, decode_tensor(message, bases={basis.digest: basis})) < 0.02


def test_semantic_falls_back_to_lossless_off_basis(semantic_setup):
    basis, _ = semantic_setup
    source = random_states(1, 16, HIDDEN, seed=9)  # isotropic, with huge channels: far off the basis
    result = encode_semantic(source, basis, 0)
    assert result.fell_back and result.worst_error > 0.25
    assert result.message.codec == "lossless" and not result.message.basis
    assert torch.equal(decode_tensor(wire(result.message)), source)  # no basis needed to decode
    message = encode_tensor(source, "semantic", basis=basis, boundary=0, max_relative_error=float("inf"))
    assert message.codec == "semantic"
    far = encode_semantic(torch.full((2, HIDDEN), 1e30), basis, 0)  # scales beyond float16: falls back too
    assert far.fell_back and far.message.codec == "lossless"


def test_semantic_fit_is_deterministic_with_a_full_rotation():
    states = random_states(10, HIDDEN)
    first, second = fit_semantic_basis({1: states}), fit_semantic_basis({1: states.clone()})
    assert first.digest == second.digest and len(first.digest) == 16
    assert 1 <= first.rank(1) <= 9  # 10 centred tokens span at most 9 directions
    comps = first.components[1]
    assert comps.shape == (HIDDEN, HIDDEN) and torch.allclose(comps.T @ comps, torch.eye(HIDDEN), atol=1e-4)
    assert fit_semantic_basis({1: states}, max_bytes_per_token=8).digest != first.digest


def test_semantic_encode_needs_basis_boundary_and_matching_hidden(semantic_setup):
    basis, test = semantic_setup
    with pytest.raises(CodecError, match="needs a basis"):
        encode_tensor(test, "semantic")
    with pytest.raises(CodecError, match="no boundary 7"):
        encode_tensor(test, "semantic", basis=basis, boundary=7)
    with pytest.raises(CodecError, match="hidden size 100"):
        encode_tensor(test[:, :100], "semantic", basis=basis, boundary=0)


def test_semantic_basis_save_load_round_trip(tmp_path, semantic_setup):
    basis, test = semantic_setup
    path = tmp_path / "basis.safetensors"
    save_basis(basis, path)
    loaded = load_basis(path)
    assert loaded.digest == basis.digest and loaded.boundaries == [0, 3]
    assert loaded.allocations == basis.allocations and loaded.bytes_per_token(3) == basis.bytes_per_token(3)
    assert loaded.predicted_errors[3] == pytest.approx(basis.predicted_errors[3], rel=1e-4)
    message = encode_tensor(test, "semantic", basis=basis, boundary=0)
    from_loaded = decode_tensor(message, bases={loaded.digest: loaded})
    assert torch.equal(from_loaded, decode_tensor(message, bases={basis.digest: basis}))


def test_tampered_basis_file_is_refused(tmp_path, semantic_setup):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    basis, _ = semantic_setup
    path = tmp_path / "basis.safetensors"
    save_basis(basis, path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    for name, edit in (("mean.3", lambda t: t.__setitem__(10, t[10] + 0.5)), ("allocation.3", lambda t: t.__setitem__(0, t[0] - 2)),
                       ("std.0", lambda t: t.__setitem__(5, t[5] * 1.01))):
        edited = {key: value.clone() for key, value in tensors.items()}
        edit(edited[name])  # plausible-looking edits: still a valid basis, different digest
        save_file(edited, str(tmp_path / "edited.safetensors"), metadata=metadata)
        with pytest.raises(CodecError, match="altered or corrupted"):
            load_basis(tmp_path / "edited.safetensors")
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 0x40  # a flipped bit inside the last tensor's bytes
    (tmp_path / "flipped.safetensors").write_bytes(bytes(blob))
    with pytest.raises(CodecError):
        load_basis(tmp_path / "flipped.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CodecError, match="not a readable safetensors"):
        load_basis(tmp_path / "garbage.safetensors")
    # a file of the previous (low-rank, format 1) layout is refused cleanly, so callers refit
    old = {"mean.0": torch.zeros(8), "components.0": torch.eye(8)[:, :2].contiguous()}
    save_file(old, str(tmp_path / "v1.safetensors"), metadata={"format": "edgeswarm-semantic-basis/1", "digest": "0" * 16})
    with pytest.raises(CodecError, match="format is 'edgeswarm-semantic-basis/1'"):
        load_basis(tmp_path / "v1.safetensors")


def test_invalid_bases_are_refused():
    eye, ones = torch.eye(8), torch.ones(8)
    with pytest.raises(CodecError, match="not orthonormal"):
        SemanticBasis({0: torch.zeros(8)}, {0: torch.ones(8, 8)}, {0: ones}, {0: (2, 2)})
    with pytest.raises(CodecError, match=r"\[hidden, hidden\]"):
        SemanticBasis({0: torch.zeros(8)}, {0: eye[:, :2]}, {0: ones}, {0: (2, 0)})
    for allocation in ((0, 0), (2, 3), (-1, 2), (6, 4)):
        with pytest.raises(CodecError, match="allocation"):
            SemanticBasis({0: torch.zeros(8)}, {0: eye}, {0: ones}, {0: allocation})
    with pytest.raises(CodecError, match="stds"):
        SemanticBasis({0: torch.zeros(8)}, {0: eye}, {0: torch.zeros(8)}, {0: (2, 2)})
    with pytest.raises(CodecError, match="same, non-empty set"):
        SemanticBasis({0: torch.zeros(8)}, {0: eye}, {0: ones}, {1: (2, 2)})


def test_bad_semantic_messages_are_refused(semantic_setup):
    basis, test = semantic_setup
    bases = {basis.digest: basis}
    valid = encode_tensor(test[:3], "semantic", basis=basis, boundary=0)
    k8, k4 = basis.allocations[0]
    per_row = k8 + k4 // 2
    cases = {
        "data": [valid.data[:-1], valid.data + b"\x00", b""],
        "scales": [valid.scales[:-2], valid.scales + b"\x00\x00", b"\x00\x7e" + valid.scales[2:],
                   b"\x00\x7c" + valid.scales[2:], b"\x00\xbc" + valid.scales[2:]],
    }
    for field, values in cases.items():
        for value in values:
            message = pb.Tensor()
            message.CopyFrom(valid)
            setattr(message, field, value)
            with pytest.raises(CodecError, match="'semantic'"):
                decode_tensor(message, bases=bases)
    message = pb.Tensor()
    message.CopyFrom(valid)
    message.data = b"\x80" + valid.data[1:]  # int8 coefficient -128
    with pytest.raises(CodecError, match="-128"):
        decode_tensor(message, bases=bases)
    message.data = valid.data[:per_row - 1] + b"\x80" + valid.data[per_row:]  # an int4 nibble 0 (-8)
    with pytest.raises(CodecError, match="nibble 0"):
        decode_tensor(message, bases=bases)
    message = pb.Tensor()
    message.CopyFrom(valid)
    message.shape[:] = [3, 575]
    with pytest.raises(CodecError, match="hidden size"):
        decode_tensor(message, bases=bases)


# ---------------------------------------------------------------------------------------------
# Hostile and broken messages


def test_unknown_codec_is_named():
    message = encode_tensor(random_states(2, 4), "fp16")
    message.codec = "zstd"
    with pytest.raises(CodecError, match="unknown codec 'zstd'"):
        decode_tensor(message)
    with pytest.raises(CodecError, match="unknown codec 'zstd'"):
        encode_tensor(random_states(2, 4), "zstd")


@pytest.mark.parametrize("name", PLAIN_CODECS)
def test_truncated_data_is_refused(name):
    message = encode_tensor(activation_like(2, 3, 128), name)
    message.data = message.data[:-1]
    with pytest.raises(CodecError, match=repr(name) if name != "none" else "needs"):
        decode_tensor(message)


@pytest.mark.parametrize("name", ["int8_token", "int8_block", "int4_block"])
def test_wrong_scales_length_is_refused(name):
    message = encode_tensor(random_states(2, 3, 128), name)
    message.scales = message.scales + b"\x00\x00"
    with pytest.raises(CodecError, match=f"'{name}': scales of shape"):
        decode_tensor(message)


def test_scales_on_a_codec_without_scales_are_refused():
    message = encode_tensor(random_states(2, 4), "bf16")
    message.scales = b"\x00\x3c"
    with pytest.raises(CodecError, match="takes no scales"):
        decode_tensor(message)


@pytest.mark.parametrize("bad", [b"\x00\x7e", b"\x00\x7c", b"\x00\xbc"], ids=["nan", "inf", "negative"])
def test_bad_scales_are_refused(bad):
    message = encode_tensor(random_states(2, 128), "int8_block")
    message.scales = bad + message.scales[2:]
    with pytest.raises(CodecError, match="int8_block.*scales hold"):
        decode_tensor(message)


@pytest.mark.parametrize("name", ["none", "lossless", "int8_block", "semantic"])
@pytest.mark.parametrize("shape", [[2**40, 2**40], [0, 2**62], [-1, 4], [1] * 70])
def test_absurd_shapes_are_refused_before_allocation(name, shape):
    message = pb.Tensor(data=b"\x00" * 16, dtype="float32", shape=shape, codec=name)
    with pytest.raises(CodecError):
        decode_tensor(message)


def test_max_bytes_is_honoured():
    message = encode_tensor(random_states(4, 64), "int8_block")
    with pytest.raises(CodecError, match="above the limit of 512"):
        decode_tensor(message, max_bytes=512)


def test_semantic_message_needs_a_known_basis(semantic_setup):
    basis, test = semantic_setup
    message = encode_tensor(test, "semantic", basis=basis, boundary=0)
    with pytest.raises(CodecError, match=f"unknown basis {basis.digest}"):
        decode_tensor(message)
    for bad in ("", "nonsense", f"{basis.digest}/", f"{basis.digest}/99"):
        message.basis = bad
        with pytest.raises(CodecError, match="semantic"):
            decode_tensor(message, bases={basis.digest: basis})
    message = encode_tensor(test, "int8_token")
    message.basis = f"{basis.digest}/0"
    with pytest.raises(CodecError, match="unexpected basis"):
        decode_tensor(message)


def test_lossless_garbage_and_truncated_streams_are_refused():
    message = encode_tensor(random_states(4, 64), "lossless")
    for data, reason in (
        (b"not zlib at all", "not a zlib stream"),
        (message.data[:-8], "truncated"),
        (message.data + b"extra", "follow the zlib stream"),
        (zlib.compress(b"\x00" * 100), "decompresses to 100 bytes"),
    ):
        message.data = data
        with pytest.raises(CodecError, match=f"'lossless'.*{reason}"):
            decode_tensor(message)


def test_zlib_bomb_is_stopped_at_the_declared_size():
    bomb = zlib.compress(b"\x00" * (64 << 20), 9)  # 64 MiB of zeros in ~64 KiB
    assert len(bomb) < 100_000
    message = pb.Tensor(data=bomb, dtype="float32", shape=[4, 64], codec="lossless")
    with pytest.raises(CodecError, match="more than the 1024 bytes"):
        decode_tensor(message)


def test_out_of_range_quantized_values_are_refused():
    message = encode_tensor(random_states(1, 64), "int8_block")
    message.data = b"\x80" + message.data[1:]
    with pytest.raises(CodecError, match="-128"):
        decode_tensor(message)
    message = encode_tensor(random_states(1, 63), "int4_block")
    valid = message.data
    message.data = valid[:-1] + b"\x38"  # high (padding) nibble 3, low nibble 8
    with pytest.raises(CodecError, match="padding nibble"):
        decode_tensor(message)
    message.data = b"\x88" + valid[1:]
    decode_tensor(message)
    message.data = b"\x80" + valid[1:]  # second value's nibble 0
    with pytest.raises(CodecError, match="nibble 0"):
        decode_tensor(message)


def test_random_messages_only_ever_raise_decode_errors(semantic_setup):
    """Fuzz: random codecs, dtypes, shapes and bytes (hypothesis is not installed: a seeded loop)."""
    basis, test = semantic_setup
    bases = {basis.digest: basis}
    rng = random.Random(1234)
    valid = [wire(encode_tensor(test[:4], name, basis=basis, boundary=0)) for name in codec_names()]
    codecs = [*codec_names(), "", "zstd", "INT8_BLOCK"]
    dtypes = ["float32", "float16", "bfloat16", "int64", "int32", "bool", "float64", ""]
    decoded = 0
    for _ in range(3000):
        if rng.random() < 0.5:  # mutate a valid message
            message = pb.Tensor()
            message.CopyFrom(rng.choice(valid))
            field = rng.choice(["data", "scales", "shape", "dtype", "codec", "basis"])
            if field in ("data", "scales"):
                blob = bytearray(getattr(message, field))
                for _ in range(rng.randint(1, 4)):
                    if blob and rng.random() < 0.7:
                        blob[rng.randrange(len(blob))] = rng.randrange(256)
                    else:
                        blob = blob[: rng.randrange(len(blob) + 1)] if blob else bytearray(rng.randbytes(4))
                setattr(message, field, bytes(blob))
            elif field == "shape":
                message.shape[rng.randrange(len(message.shape))] = rng.choice([0, 1, 3, 575, 576, -1, 2**31, 2**62])
            elif field == "dtype":
                message.dtype = rng.choice(dtypes)
            elif field == "codec":
                message.codec = rng.choice(codecs)
            else:
                message.basis = rng.choice(["", f"{basis.digest}/0", f"{basis.digest}/1", "0" * 16 + "/0", "x/y"])
        else:  # build one from scratch
            message = pb.Tensor(
                data=rng.randbytes(rng.choice([0, 1, 7, 64, 256, 1000])),
                scales=rng.randbytes(rng.choice([0, 2, 4, 16, 32])),
                dtype=rng.choice(dtypes),
                shape=[rng.choice([0, 1, 2, 4, 8, 32, 64, 576, 2**33]) for _ in range(rng.randint(0, 4))],
                codec=rng.choice(codecs),
                basis=rng.choice(["", f"{basis.digest}/0", "zz"]),
            )
        try:
            decode_tensor(message, bases=bases, max_bytes=1 << 20)
            decoded += 1
        except TensorDecodeError:
            pass
    assert decoded > 100  # the loop also reached the decoders' happy paths


def test_int8_outlier_keeps_the_largest_channels_exact_and_fits_the_byte_budget():
    states = torch.randn(1, 128, HIDDEN) * 0.5
    states[..., [7, 300, 500]] = 400.0 + torch.randn(1, 128, 3)  # massive channels, as SmolLM2 has
    outlier = decode_tensor(wire(encode_tensor(states, "int8_outlier")))
    block = decode_tensor(wire(encode_tensor(states, "int8_block")))
    torch.testing.assert_close(outlier[..., [7, 300, 500]], states[..., [7, 300, 500]].half().float())
    inliers = [i for i in range(HIDDEN) if i not in (7, 300, 500)]
    assert relative_error(states[..., inliers], outlier[..., inliers]) < relative_error(states[..., inliers], block[..., inliers]) / 10
    one_token = encode_tensor(states[:, :1], "int8_outlier")
    assert HIDDEN * 4 / encoded_size(one_token) >= 3.8


@pytest.mark.parametrize("channels", [b"\x00\x00\x00\x00\x01\x00", b"\x00\x00\x01\x00\xff\x7f"])
def test_int8_outlier_refuses_repeated_or_out_of_range_channels(channels):
    message = encode_tensor(torch.randn(1, 2, HIDDEN), "int8_outlier")
    message.scales = channels + message.scales[6:]
    with pytest.raises(CodecError, match="outlier channels"):
        decode_tensor(message)
