"""Fuzzing every decoder of untrusted input: bad input may only ever raise the decoder's documented error.

Each decoder gets random and mutated-valid inputs from hypothesis and must either return something that
satisfies its contract or raise its documented error type -- never another exception, never hang (every
gRPC call has a deadline and the module a time limit; no call is timed against a speed target, those
belong in scripts/ benchmarks), never allocate much (the peak RSS of the process is checked around
every test).

- protocol.tensors.deserialize_tensor -> TensorDecodeError
- protocol.codecs.decode_tensor (every codec) -> CodecError
- protobuf parsing of every data-plane and task message -> google.protobuf.message.DecodeError
- node.validation.decode_step_inputs -> InvalidRequest
- ServerRecord.from_dict, TaskCapabilities.from_dict, RunSpec.from_dict, parse_plan -> ValueError
- protocol.signing.verify_record -> ForgedRecordError
- a real gRPC BlockService on a tiny model: random bytes and random well-formed requests get a proper
  status (INVALID_ARGUMENT / RESOURCE_EXHAUSTED from our code; INVALID_ARGUMENT "the request does not
  parse" from protocol.request_parsing for bytes that do not parse -- checked here), and the node serves on;
  the same for InferenceSession streams, after which the server still stops.

Every test is derandomized, so CI runs the same examples every time.
"""

from __future__ import annotations

import math

import grpc
import pytest
import torch
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeswarm.agent.capabilities import TaskCapabilities
from edgeswarm.agent.dag import PlannedCall, parse_plan
from edgeswarm.agent.runtime import RunSpec
from edgeswarm.model.semantic_basis import fit_semantic_basis
from edgeswarm.model.sources import open_model
from edgeswarm.model.span import TransformerSpan
from edgeswarm.node.service import BlockServicer, ServiceLimits, start_grpc_server
from edgeswarm.node.validation import InvalidRequest, decode_step_inputs
from edgeswarm.proto import dataplane_pb2 as pb
from edgeswarm.proto import tasks_pb2
from edgeswarm.protocol.call_auth import CallAuthenticator
from edgeswarm.protocol.channels import open_channel
from edgeswarm.protocol.codecs import (
    CODECS,
    MAX_TENSOR_BYTES,
    CodecError,
    decode_tensor,
    encode_tensor,
)
from edgeswarm.protocol.identity import NodeIdentity, fingerprint_of_key
from edgeswarm.protocol.records import ServerRecord
from edgeswarm.protocol.signing import (
    ForgedRecordError,
    ReplayGuard,
    record_message,
    sign_record,
    verify_record,
)
from edgeswarm.protocol.tensors import (
    TensorDecodeError,
    deserialize_tensor,
    serialize_tensor,
)
from tests.support import wait_until

pytestmark = pytest.mark.timeout(300)

_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much, HealthCheck.large_base_example]


def fuzz(examples: int):
    """Settings of one fuzz test: reproducible (derandomized), no per-example deadline (nothing is timed)."""
    return settings(max_examples=examples, deadline=None, derandomize=True, suppress_health_check=_HEALTH, database=None)


MAX_RSS_GROWTH = 512 * 1024 * 1024  # peak RSS growth allowed over one whole fuzz test


def _rss(field: str) -> int:
    """A memory figure of this process from /proc/self/status ("VmRSS", or "VmHWM": the peak), in bytes."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


@pytest.fixture(autouse=True)
def _bounded_memory():
    """The peak RSS during the test, measured from the test's start: Linux resets the process's high-water
    mark when 5 is written to /proc/self/clear_refs, so an earlier test's peak cannot hide this one's."""
    before = _rss("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    yield
    grown = _rss("VmHWM") - before
    assert grown < MAX_RSS_GROWTH, f"peak RSS grew by {grown / 2**20:.0f} MiB during a fuzz test"


def call(decoder, *args, expected: type[BaseException], **kwargs):
    """(result, None) or (None, error) of one decoder call; any other exception fails."""
    try:
        result, error = decoder(*args, **kwargs), None
    except expected as caught:
        result, error = None, caught
        assert str(caught), f"{type(caught).__name__} without a message"
    return result, error


# ---------------------------------------------------------------------------------------------
# Strategies: tensors

WIRE_DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "bool": 1}
TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
FLOAT_NAMES = ["float32", "float16", "bfloat16"]
INT64 = st.integers(-(2**63), 2**63 - 1)
HUGE_DIMS = [2**26, 2**28, 2**28 + 1, 2**31, 2**32 + 1, 2**62, 2**63 - 1, -1, -(2**63)]

dtype_names = st.one_of(
    st.sampled_from(list(WIRE_DTYPES)),
    st.sampled_from(["", "float64", "uint8", "int8", "Float32", "float32 ", "bool\x00", "complex64", "qint8"]),
    st.text(max_size=12),
)
dims = st.one_of(st.integers(0, 6), st.integers(-3, -1), st.sampled_from(HUGE_DIMS), INT64)
wild_shapes = st.one_of(
    st.lists(dims, max_size=6),
    st.lists(st.integers(0, 2), min_size=15, max_size=70),  # around and far above MAX_DIMS
    st.lists(st.sampled_from([0, 1, 2**28, 2**62]), max_size=20),
)
codec_names = st.one_of(
    st.sampled_from(list(CODECS) + [""]),
    st.sampled_from(["NONE", "zstd", "int8", "semantic ", "lossless\x00"]),
    st.text(max_size=10),
)


def _byte_values(length: int, *, bits01: bool = False):
    if bits01:
        return st.lists(st.integers(0, 1), min_size=length, max_size=length).map(bytes)
    return st.binary(min_size=length, max_size=length)


@st.composite
def raw_tensors(draw) -> pb.Tensor:
    """A raw (codec "none") Tensor message: often consistent, often a little or wildly off."""
    dtype = draw(dtype_names)
    shape = draw(st.one_of(st.lists(st.integers(0, 4), max_size=4), wild_shapes))
    if all(0 <= dim <= 64 for dim in shape) and len(shape) <= 16 and math.prod(shape) <= 512:
        size = math.prod(shape) * WIRE_DTYPES.get(dtype, 1)
        length = draw(st.sampled_from([size, size, size, max(size - 1, 0), size + 1, 0, size * 2]))
    else:
        length = draw(st.integers(0, 64))
    data = draw(st.one_of(_byte_values(length), _byte_values(length, bits01=True)))
    return pb.Tensor(data=data, dtype=dtype, shape=shape)


@st.composite
def mutated_bytes(draw, original: bytes) -> bytes:
    """`original` cut, extended, with bytes flipped or set, or replaced outright."""
    kind = draw(st.sampled_from(["keep", "truncate", "extend", "flip", "set", "replace", "empty", "double"]))
    value = bytearray(original)
    if kind == "truncate" and value:
        del value[draw(st.integers(0, len(value) - 1)) :]
    elif kind == "extend":
        value += draw(st.binary(min_size=1, max_size=16))
    elif kind in ("flip", "set") and value:
        for _ in range(draw(st.integers(1, 4))):
            index = draw(st.integers(0, len(value) - 1))
            value[index] = value[index] ^ (1 << draw(st.integers(0, 7))) if kind == "flip" else draw(st.integers(0, 255))
    elif kind == "replace":
        value = bytearray(draw(st.binary(max_size=64)))
    elif kind == "empty":
        value = bytearray()
    elif kind == "double":
        value += bytes(value)
    return bytes(value)


@st.composite
def mutated_shape(draw, shape: list[int]) -> list[int]:
    kind = draw(st.sampled_from(["keep", "bump", "append", "drop", "swap", "wild", "zero", "huge"]))
    shape = list(shape)
    if kind == "bump" and shape:
        index = draw(st.integers(0, len(shape) - 1))
        shape[index] += draw(st.sampled_from([-2, -1, 1, 2]))
    elif kind == "append":
        shape.append(draw(st.integers(0, 3)))
    elif kind == "drop" and shape:
        shape.pop(draw(st.integers(0, len(shape) - 1)))
    elif kind == "swap":
        shape.reverse()
    elif kind == "wild":
        shape = draw(wild_shapes)
    elif kind == "zero" and shape:
        shape[draw(st.integers(0, len(shape) - 1))] = 0
    elif kind == "huge" and shape:
        shape[draw(st.integers(0, len(shape) - 1))] = draw(st.sampled_from(HUGE_DIMS))
    return shape


def _basis_fields(digests: list[str]):
    return st.one_of(
        st.just(""),
        st.sampled_from([f"{digest}/{boundary}" for digest in digests or ["0123456789abcdef"] for boundary in (0, 1, 2, 3, 999999999)]),
        st.sampled_from(["0123456789abcdef/0", "x/0", "/", "0123456789ABCDEF/0", "0123456789abcdef/1234567890"]),
        st.text(max_size=24),
    )


@st.composite
def mutated_message(draw, message: pb.Tensor, digests: list[str]) -> pb.Tensor:
    """A copy of a valid encoding with up to four of its fields damaged."""
    message = pb.Tensor.FromString(message.SerializeToString())
    for _ in range(draw(st.integers(0, 4))):
        field = draw(st.sampled_from(["data", "scales", "shape", "dtype", "codec", "basis"]))
        if field == "data":
            message.data = draw(mutated_bytes(message.data))
        elif field == "scales":
            message.scales = draw(st.one_of(mutated_bytes(message.scales), st.sampled_from([b"\xff\x7f" * 8, b"\x00\xfc" * 8, b"\x00\x80" * 8])))
        elif field == "shape":
            new_shape = draw(mutated_shape(list(message.shape)))
            del message.shape[:]
            message.shape.extend(new_shape)
        elif field == "dtype":
            message.dtype = draw(dtype_names)
        elif field == "codec":
            message.codec = draw(codec_names)
        else:
            message.basis = draw(_basis_fields(digests))
    return message


def _values(shape: list[int], seed: int, scale: float, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(tuple(shape), generator=generator) * scale
    if dtype == torch.bool:
        return values > 0
    if not dtype.is_floating_point:
        return values.round().to(dtype)
    return values.to(dtype)


# Two semantic bases over hidden size 8: one sends 8- and 4-bit coefficients (3, 4), one only 4-bit ones (0, 8).
SEMANTIC_HIDDEN = 8


def _fit_bases() -> dict:
    generator = torch.Generator().manual_seed(7)
    states = torch.randn(512, SEMANTIC_HIDDEN, generator=generator) * torch.linspace(8, 0.5, SEMANTIC_HIDDEN)
    bases = [fit_semantic_basis({0: states, 2: states * 2}, max_bytes_per_token=budget) for budget in (9, 6)]
    assert {basis.allocations[0] for basis in bases} == {(3, 4), (0, 8)}
    return {basis.digest: basis for basis in bases}


BASES = _fit_bases()
DIGESTS = sorted(BASES)


@st.composite
def valid_encodings(draw, codec: str, shape: list[int] | None = None, hidden: int | None = None) -> pb.Tensor:
    """A genuine encoding, by `codec`, of a random small tensor (of `shape` if given)."""
    if codec == "none":
        dtype = draw(st.sampled_from(list(TORCH_DTYPES.values())))
    else:
        dtype = TORCH_DTYPES[draw(st.sampled_from(FLOAT_NAMES))]
    if shape is None:
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        if codec == "semantic":
            shape = shape[:2] + [SEMANTIC_HIDDEN]
        elif hidden is not None:
            shape = shape[:2] + [hidden]
    scale = draw(st.sampled_from([0.0, 1e-3, 1.0, 100.0, 1000.0]))
    tensor = _values(shape, draw(st.integers(0, 2**16)), scale, dtype)
    if codec == "semantic":
        digest = draw(st.sampled_from(DIGESTS))
        return encode_tensor(tensor, codec, basis=BASES[digest], boundary=draw(st.sampled_from([0, 2])), max_relative_error=math.inf)
    return encode_tensor(tensor, codec)


def any_encoding(hidden: int | None = None):
    """A valid encoding by any codec, maybe damaged, or a wholly random Tensor message."""
    genuine = st.sampled_from(list(CODECS)).flatmap(lambda codec: valid_encodings(codec, hidden=hidden))
    return st.one_of(
        genuine,
        genuine.flatmap(lambda message: mutated_message(message, DIGESTS)),
        st.builds(
            pb.Tensor,
            data=st.binary(max_size=96),
            dtype=dtype_names,
            shape=wild_shapes,
            codec=codec_names,
            scales=st.binary(max_size=32),
            basis=_basis_fields(DIGESTS),
        ),
        raw_tensors(),
    )


def _decoded_dtype(message: pb.Tensor) -> torch.dtype:
    return TORCH_DTYPES[message.dtype]


# ---------------------------------------------------------------------------------------------
# protocol.tensors


@fuzz(400)
@given(message=st.one_of(raw_tensors(), st.builds(pb.Tensor, data=st.binary(max_size=64), dtype=dtype_names, shape=wild_shapes)))
def test_deserialize_tensor_raises_only_tensor_decode_error(message):
    tensor, error = call(deserialize_tensor, message, expected=TensorDecodeError)
    if error is None:
        assert tuple(tensor.shape) == tuple(message.shape)
        assert tensor.dtype == _decoded_dtype(message)
        assert tensor.numel() * WIRE_DTYPES[message.dtype] == len(message.data)
        assert serialize_tensor(tensor).data == message.data  # exact: the same bytes come back


@fuzz(200)
@given(message=raw_tensors(), max_bytes=st.integers(0, 4096))
def test_deserialize_tensor_respects_any_byte_limit(message, max_bytes):
    tensor, error = call(deserialize_tensor, message, max_bytes=max_bytes, expected=TensorDecodeError)
    if error is None:
        assert tensor.numel() * tensor.element_size() <= max_bytes


# ---------------------------------------------------------------------------------------------
# protocol.codecs


def _check_decoded(message: pb.Tensor, tensor: torch.Tensor) -> None:
    assert tuple(tensor.shape) == tuple(message.shape)
    assert tensor.dtype == _decoded_dtype(message)
    assert tensor.numel() * tensor.element_size() <= MAX_TENSOR_BYTES


@pytest.mark.parametrize("codec", list(CODECS))
def test_decode_tensor_raises_only_codec_error_on_damaged_encodings(codec):
    @fuzz(200)
    @given(message=valid_encodings(codec).flatmap(lambda message: mutated_message(message, DIGESTS)))
    def check(message):
        tensor, error = call(decode_tensor, message, bases=BASES, expected=CodecError)
        if error is None:
            _check_decoded(message, tensor)

    check()


@pytest.mark.parametrize("codec", list(CODECS))
def test_decode_tensor_decodes_every_genuine_encoding(codec):
    @fuzz(40)
    @given(message=valid_encodings(codec))
    def check(message):
        wire = pb.Tensor.FromString(message.SerializeToString())
        tensor, error = call(decode_tensor, wire, bases=BASES, expected=CodecError)
        assert error is None, error
        _check_decoded(wire, tensor)

    check()


@fuzz(300)
@given(
    message=st.builds(
        pb.Tensor,
        data=st.binary(max_size=96),
        dtype=st.one_of(st.sampled_from(FLOAT_NAMES), dtype_names),
        shape=st.one_of(st.lists(st.integers(0, 5), max_size=3), wild_shapes),
        codec=st.one_of(st.sampled_from(list(CODECS)), codec_names),
        scales=st.binary(max_size=32),
        basis=_basis_fields(DIGESTS),
    )
)
def test_decode_tensor_raises_only_codec_error_on_random_messages(message):
    tensor, error = call(decode_tensor, message, bases=BASES, expected=CodecError)
    if error is None:
        _check_decoded(message, tensor)


# ---------------------------------------------------------------------------------------------
# protobuf parsing (what grpcio runs on every request before our code sees it)

PROTO_TYPES = [
    pb.Tensor,
    pb.ForwardRequest,
    pb.ForwardResponse,
    pb.SessionOpen,
    pb.SessionStep,
    pb.SessionRequest,
    pb.SessionResponse,
    pb.NodeInfoRequest,
    pb.NodeInfoResponse,
    pb.EchoRequest,
    pb.EchoResponse,
] + [getattr(tasks_pb2, name) for name in sorted(tasks_pb2.DESCRIPTOR.message_types_by_name)]


def _valid_forward_request() -> pb.ForwardRequest:
    return pb.ForwardRequest(
        model_id="tiny",
        start_block=0,
        end_block=2,
        hidden_states=encode_tensor(torch.randn(1, 2, 64, generator=torch.Generator().manual_seed(0)), "int8_block"),
        position_ids=serialize_tensor(torch.arange(2)[None]),
        attention_mask=serialize_tensor(torch.ones(1, 2, dtype=torch.bool)),
        reply_codec="int8_block",
    )


VALID_FORWARD_BYTES = _valid_forward_request().SerializeToString()
# unbalanced and very deeply nested groups, runs of length prefixes: what trips up hand-written parsers
NESTED_GROUPS = st.tuples(st.sampled_from([b"\x0b", b"\x0c", b"\x0b\x0c", b"\x22\x7f", b"\x13"]), st.sampled_from([1, 100, 101, 5000, 100_000])).map(
    lambda parts: parts[0] * parts[1]
)


def _wire_bytes():
    return st.one_of(
        st.binary(max_size=256),
        mutated_bytes(VALID_FORWARD_BYTES),
        NESTED_GROUPS,
    )


@fuzz(300)
@given(message_type=st.sampled_from(PROTO_TYPES), raw=_wire_bytes())
def test_protobuf_parsing_raises_only_decode_error(message_type, raw):
    message, error = call(message_type.FromString, raw, expected=DecodeError)
    if error is None:
        message_type.FromString(message.SerializeToString())  # what parsed re-encodes and parses again


# ---------------------------------------------------------------------------------------------
# node.validation

STEP_HIDDEN = SEMANTIC_HIDDEN  # so that semantic encodings from BASES fit
MAX_POSITION = 16


@st.composite
def step_tensors(draw):
    batch, length = draw(st.integers(0, 3)), draw(st.integers(0, 4))
    if draw(st.booleans()):
        hidden = draw(st.sampled_from(list(CODECS)).flatmap(lambda codec: valid_encodings(codec, [batch, length, STEP_HIDDEN])))
        if draw(st.booleans()):
            hidden = draw(mutated_message(hidden, DIGESTS))
    else:
        hidden = draw(any_encoding(STEP_HIDDEN))
    positions = serialize_tensor(
        torch.tensor(draw(st.lists(st.integers(-2, MAX_POSITION + 1), min_size=batch * length, max_size=batch * length)), dtype=torch.int64)
        .reshape(batch, length)
        .to(TORCH_DTYPES[draw(st.sampled_from(["int64", "int32", "float32", "bool"]))])
    )
    mask = serialize_tensor(_values([batch, length], draw(st.integers(0, 99)), 1.0, TORCH_DTYPES[draw(st.sampled_from(list(WIRE_DTYPES)))]))
    if draw(st.booleans()):
        positions = draw(st.one_of(mutated_message(positions, DIGESTS), raw_tensors()))
    if draw(st.booleans()):
        mask = draw(st.one_of(mutated_message(mask, DIGESTS), raw_tensors()))
    return hidden, positions, mask


@fuzz(300)
@given(tensors=step_tensors())
def test_decode_step_inputs_raises_only_invalid_request(tensors):
    hidden, positions, mask = tensors
    inputs, error = call(
        decode_step_inputs, hidden, positions, mask, hidden_size=STEP_HIDDEN, max_position=MAX_POSITION, bases=BASES, expected=InvalidRequest
    )
    if error is None:
        batch, length, width = inputs.hidden_states.shape
        assert width == STEP_HIDDEN and batch > 0 and length > 0
        assert inputs.hidden_states.dtype == torch.float32 and bool(torch.isfinite(inputs.hidden_states).all())
        assert inputs.position_ids.dtype == torch.int64 and tuple(inputs.position_ids.shape) == (batch, length)
        assert 0 <= int(inputs.position_ids.min()) and int(inputs.position_ids.max()) < MAX_POSITION
        assert inputs.padding_mask.dtype == torch.bool and tuple(inputs.padding_mask.shape) == (batch, length)
        assert inputs.wire_dtype.is_floating_point


# ---------------------------------------------------------------------------------------------
# JSON-like DHT and API values

TRICKY_SCALARS = [
    float("inf"),
    float("-inf"),
    float("nan"),
    10**400,
    -(10**400),
    2**63,
    2**64,
    -(2**63) - 1,
    "1e400",
    "nan",
    "inf",
    "-1",
    "1" * 5000,
    "\ud800",
    "",
    "0x10",
    " 7 ",
    True,
    False,
    None,
]
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=16),
    st.sampled_from(TRICKY_SCALARS),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)),
    max_leaves=24,
)


@st.composite
def mutated_dict(draw, valid: dict, extra_keys: list[str]) -> dict:
    """`valid` with some fields dropped, replaced by arbitrary values, or added."""
    value = dict(valid)
    keys = list(valid) + extra_keys
    for _ in range(draw(st.integers(1, 4))):
        key = draw(st.sampled_from(keys) if draw(st.integers(0, 5)) else st.text(max_size=8))
        if draw(st.integers(0, 4)) == 0:
            value.pop(key, None)
        else:
            value[key] = draw(st.one_of(st.sampled_from(TRICKY_SCALARS), json_values))
    return value


VALID_RECORD = {
    "node_id": "node-a",
    "address": "127.0.0.1:5000",
    "model_id": "tiny",
    "start_block": 0,
    "end_block": 4,
    "throughput": 12.5,
    "kv_free_bytes": 1 << 20,
    "state": "online",
    "prefill_throughput": 100.0,
    "max_blocks": 6,
    "memory_bytes": 1 << 30,
    "partition": "auto",
    "links": {"node-b": [1e6, 0.01]},
    "codecs": ["none", "int8_block"],
    "semantic_basis": "",
    "weight_quant": "none",
}
NUM_BLOCKS = 6


@fuzz(300)
@given(value=st.one_of(json_values, mutated_dict(VALID_RECORD, [])))
def test_server_record_from_dict_raises_only_value_error(value):
    record, error = call(ServerRecord.from_dict, value, NUM_BLOCKS, expected=ValueError)
    if error is None:
        assert 0 <= record.start_block < record.end_block <= NUM_BLOCKS
        assert record.throughput > 0 and record.state in ("online", "offline")
        assert ServerRecord.from_dict(record.to_dict(), NUM_BLOCKS) == record


@fuzz(200)
@given(peer=st.text(max_size=8), measured=json_values)
def test_server_record_links_raise_only_value_error(peer, measured):
    call(ServerRecord.from_dict, {**VALID_RECORD, "links": {peer: measured}}, NUM_BLOCKS, expected=ValueError)


VALID_CAPABILITIES = {
    "node_id": "node-a",
    "address": "127.0.0.1:5000",
    "tools": {"calculator": {"description": "adds", "parameters": {"type": "object"}, "idempotent": True}},
    "memory": True,
    "namespaces": ["0123456789abcdef0123456789abcdef"],
    "llm": True,
    "coordinator": False,
    "free_cpu": 0.5,
    "running_steps": 2,
}


@st.composite
def mutated_tools(draw) -> dict:
    tools = {}
    for _ in range(draw(st.integers(0, 3))):
        info = draw(st.one_of(json_values, mutated_dict(VALID_CAPABILITIES["tools"]["calculator"], [])))
        tools[draw(st.one_of(st.sampled_from(["calculator", "web.search", "bad name", ""]), st.text(max_size=8)))] = info
    return {**VALID_CAPABILITIES, "tools": tools}


@fuzz(300)
@given(value=st.one_of(json_values, mutated_dict(VALID_CAPABILITIES, []), mutated_tools()))
def test_task_capabilities_from_dict_raises_only_value_error(value):
    capabilities, error = call(TaskCapabilities.from_dict, value, expected=ValueError)
    if error is None:
        assert 0.0 <= capabilities.free_cpu <= 1.0 and capabilities.running_steps >= 0
        assert TaskCapabilities.from_dict(capabilities.to_dict()) == capabilities


VALID_PLAN = [
    {"name": "web.search", "arguments": {"query": "edge swarms"}},
    {"tool": "calculator", "arguments": {"expression": "2 * $1", "items": ["$1", {"x": "$1"}]}},
    {"name": "summarize", "arguments": {"text": "$2 and $1"}},
]


@st.composite
def mutated_plans(draw) -> list:
    plan = [dict(call) for call in VALID_PLAN]
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["call", "field", "reference", "append", "drop"]))
        index = draw(st.integers(0, len(plan) - 1)) if plan else 0
        if kind == "call" and plan:
            plan[index] = draw(json_values)
        elif kind == "field" and plan and isinstance(plan[index], dict):
            plan[index] = draw(mutated_dict(plan[index], ["name", "tool", "arguments"]))
        elif kind == "reference" and plan and isinstance(plan[index], dict):
            number = draw(st.one_of(st.integers(-1, 20), st.sampled_from([10**30, 2**63])))
            text = draw(st.sampled_from(["${}", "x ${} y", "$${}", "$0{}", "$" + "9" * 5000 + "{}"])).format(number)
            plan[index] = {**plan[index], "arguments": {"value": text}}
        elif kind == "append":
            plan.extend(draw(st.lists(json_values, max_size=15)))
        elif kind == "drop" and plan:
            plan.pop(index)
    return plan


@fuzz(250)
@given(calls=st.one_of(json_values, mutated_plans()))
def test_parse_plan_raises_only_value_error(calls):
    plan, error = call(parse_plan, calls, expected=ValueError)
    if error is None:
        assert [step.index for step in plan] == list(range(1, len(plan) + 1))
        assert all(isinstance(step, PlannedCall) and all(1 <= d < step.index for d in step.depends_on) for step in plan)


VALID_RUN_SPEC = {
    "goal": "find the answer",
    "tools": ["calculator"],
    "memory_namespace": "notes",
    "memory_owner": "aaaabbbbccccddddeeeeffffgggghhhh",
    "memory_access": "token",
    "max_steps": 4,
    "strategy": "plan",
    "plan": VALID_PLAN,
    "role": "agent",
    "remember": True,
    "max_answer_tokens": 64,
    "tool_choice": "auto",
    "parent": None,
}


@fuzz(250)
@given(
    value=st.one_of(
        json_values,
        mutated_dict(VALID_RUN_SPEC, []),
        mutated_plans().map(lambda plan: {**VALID_RUN_SPEC, "plan": plan}),
    )
)
def test_run_spec_from_dict_raises_only_value_error(value):
    spec, error = call(RunSpec.from_dict, value, expected=ValueError)
    if error is None:
        assert isinstance(spec.goal, str) and spec.goal.strip()


def _field_cases(valid: dict) -> list[dict]:
    """`valid` with each field in turn removed, or set to each tricky value."""
    cases = []
    for key in valid:
        cases.append({name: value for name, value in valid.items() if name != key})
        cases.extend({**valid, key: tricky} for tricky in TRICKY_SCALARS + [[], {}, [1.0, 2.0], {"a": 1}, [[]]])
    return cases


TOOL_INFO = VALID_CAPABILITIES["tools"]["calculator"]
EXHAUSTIVE = {
    "server_record": (lambda value: ServerRecord.from_dict(value, NUM_BLOCKS), _field_cases(VALID_RECORD)),
    "server_record_links": (
        lambda value: ServerRecord.from_dict({**VALID_RECORD, "links": {"peer": [value["bandwidth"], value["rtt"]]}}, NUM_BLOCKS),
        [case for case in _field_cases({"bandwidth": 1e6, "rtt": 0.01}) if len(case) == 2],
    ),
    "task_capabilities": (TaskCapabilities.from_dict, _field_cases(VALID_CAPABILITIES)),
    "task_capabilities_tool": (lambda value: TaskCapabilities.from_dict({**VALID_CAPABILITIES, "tools": {"calculator": value}}), _field_cases(TOOL_INFO)),
    "run_spec": (RunSpec.from_dict, _field_cases(VALID_RUN_SPEC)),
    "plan_call": (lambda value: parse_plan([VALID_PLAN[0], value]), _field_cases(VALID_PLAN[1])),
}


@pytest.mark.parametrize("name", sorted(EXHAUSTIVE))
def test_every_field_with_every_tricky_value_raises_only_value_error(name):
    """Deterministic complement to the fuzzing above: every field of a valid value, times every tricky value."""
    decoder, cases = EXHAUSTIVE[name]
    for case in cases:
        call(decoder, case, expected=ValueError)


# ---------------------------------------------------------------------------------------------
# protocol.signing

IDENTITY = NodeIdentity.generate()
OTHER = NodeIdentity.generate()
NOW = 1_700_000_000.0
VALID_PAYLOAD = {"node_id": IDENTITY.fingerprint, "address": "127.0.0.1:5000", "blocks": [0, 4], "throughput": 12.5}
ENVELOPE = sign_record(IDENTITY, VALID_PAYLOAD, expires_at=NOW + 60, sequence=42)
SIGNED_MESSAGE = record_message(ENVELOPE["payload"], ENVELOPE["public_key"], ENVELOPE["expires_at"], ENVELOPE["sequence"])

signing_scalars = st.one_of(json_scalars, st.binary(max_size=70), st.sampled_from([b"\x00" * 32, b"\x00" * 64, (1, 2), 2**64, -(2**63) - 1]))
signing_values = st.recursive(
    signing_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers(), st.binary(max_size=4)), children, max_size=4),
    ),
    max_leaves=24,
)


def _nested(depth: int):
    value: object = 1
    for _ in range(depth):
        value = {"a": [value]}
    return value


@st.composite
def mutated_envelopes(draw) -> dict:
    envelope = dict(ENVELOPE)
    for _ in range(draw(st.integers(1, 3))):
        field = draw(st.sampled_from(["payload", "payload_field", "public_key", "expires_at", "sequence", "signature", "extra", "drop"]))
        if field == "payload":
            envelope["payload"] = draw(st.one_of(signing_values, st.sampled_from([_nested(40), _nested(2000), {"x": "\ud800"}, {"x": b"\x00" * 70_000}])))
        elif field == "payload_field" and isinstance(envelope.get("payload"), dict):
            envelope["payload"] = {**envelope["payload"], draw(st.sampled_from(["node_id", "address", "blocks", "new"])): draw(signing_values)}
        elif field == "public_key":
            envelope["public_key"] = draw(st.one_of(st.just(OTHER.public_key_bytes), mutated_bytes(ENVELOPE["public_key"]), signing_values))
        elif field == "expires_at":
            envelope["expires_at"] = draw(st.one_of(st.floats(), st.sampled_from([NOW, NOW + 3600, NOW + 3601, NOW - 1]), signing_values))
        elif field == "sequence":
            envelope["sequence"] = draw(st.one_of(st.integers(), st.sampled_from([2**63 - 1, 2**63, -1, True, 42.0]), signing_values))
        elif field == "signature":
            envelope["signature"] = draw(st.one_of(mutated_bytes(ENVELOPE["signature"]), st.just(OTHER.sign(SIGNED_MESSAGE)), signing_values))
        elif field == "extra":
            envelope[draw(st.one_of(st.text(max_size=8), st.integers()))] = draw(signing_values)
        elif field == "drop":
            envelope.pop(draw(st.sampled_from(sorted(ENVELOPE))), None)
    return envelope


def test_valid_envelope_verifies():
    assert verify_record(ENVELOPE, NOW) == (VALID_PAYLOAD, IDENTITY.fingerprint)


def test_every_envelope_field_with_every_tricky_value_raises_only_forged_record_error():
    payload_cases = [{**ENVELOPE, "payload": payload} for payload in _field_cases(VALID_PAYLOAD)]
    for case in _field_cases(ENVELOPE) + payload_cases:
        call(verify_record, case, NOW, expected=ForgedRecordError)


@fuzz(300)
@given(envelope=st.one_of(signing_values, mutated_envelopes()), owner=st.sampled_from([None, IDENTITY.fingerprint, OTHER.fingerprint]))
def test_verify_record_raises_only_forged_record_error(envelope, owner):
    result, error = call(verify_record, envelope, NOW, owner, expected=ForgedRecordError)
    if error is None:  # only an envelope whose signed content is unchanged may verify
        payload, fingerprint = result
        assert fingerprint == IDENTITY.fingerprint == fingerprint_of_key(envelope["public_key"])
        assert record_message(payload, envelope["public_key"], envelope["expires_at"], envelope["sequence"]) == SIGNED_MESSAGE
    guard = ReplayGuard()
    call(guard.verify, envelope, NOW, owner, expected=ForgedRecordError)


# ---------------------------------------------------------------------------------------------
# End to end: a real gRPC node on a tiny model

MODEL_ID = "tiny"
SERVICE = "/edgeswarm.v1.BlockService/"
UNARY_METHODS = {
    "Forward": (pb.ForwardRequest, pb.ForwardResponse),
    "NodeInfo": (pb.NodeInfoRequest, pb.NodeInfoResponse),
    "Echo": (pb.EchoRequest, pb.EchoResponse),
}
OUR_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
# what grpcio itself answers when a request's bytes do not parse as the method's message
UNPARSEABLE = (grpc.StatusCode.INVALID_ARGUMENT, "the request does not parse")  # (code, start of the details)
SERVER_HIDDEN = 64  # tests.tiny_models
SERVER_MAX_LENGTH = 32


@pytest.fixture(scope="module")
def node(tiny_llama_dir):
    source = open_model(tiny_llama_dir)
    span = TransformerSpan(source.config, 0, 2, [source.block_state(i) for i in range(2)])
    servicer = BlockServicer(span, MODEL_ID, "fuzz-node", 1.0, ServiceLimits(max_session_length=SERVER_MAX_LENGTH))
    states = torch.randn(512, SERVER_HIDDEN, generator=torch.Generator().manual_seed(3)) * torch.linspace(8, 0.5, SERVER_HIDDEN)
    servicer.semantic_basis = fit_semantic_basis({0: states, 1: states, 2: states}, max_bytes_per_token=40)
    server, port = start_grpc_server(servicer, "127.0.0.1", 0, CallAuthenticator("fuzz-node", is_member=lambda caller: True))
    channel = open_channel(f"127.0.0.1:{port}", "fuzz-node")
    grpc.channel_ready_future(channel).result(timeout=30)
    yield servicer, channel
    channel.close()
    # not server.stop(None): grpcio may never finish stopping after some malformed session streams
    # (see test_grpc_server_stops_after_garbage_in_a_session), and a fixture must not hang
    server.stop(0).wait(timeout=0.5)


def _rpc(channel, method: str, request: bytes):
    """(reply bytes, None) or (None, RpcError) of one raw unary call (a hang ends in DEADLINE_EXCEEDED,
    which no caller accepts)."""
    try:
        reply, error = channel.unary_unary(SERVICE + method, request_serializer=None, response_deserializer=None)(request, timeout=30), None
    except grpc.RpcError as caught:
        reply, error = None, caught
    return reply, error


def _parses(message_type, raw: bytes) -> bool:
    try:
        message_type.FromString(raw)
    except DecodeError:
        return False
    return True


def _unparseable(code: grpc.StatusCode, details: str | None) -> bool:
    """Whether a status is protocol.request_parsing's answer to bytes that do not parse."""
    return code == UNPARSEABLE[0] and (details or "").startswith(UNPARSEABLE[1])


def _check_status(error: grpc.RpcError, request_type, raw: bytes) -> None:
    code, details = error.code(), error.details()
    if _unparseable(code, details):
        assert not _parses(request_type, raw), "'does not parse' for a request that parses"
    else:
        assert code in OUR_CODES, f"{code}: {details}"
        assert _parses(request_type, raw)


def _check_serves_on(servicer: BlockServicer, channel) -> None:
    """A valid Forward still succeeds and gives what the span computes."""
    request = _valid_forward_request()
    request.reply_codec = ""
    reply, error = _rpc(channel, "Forward", request.SerializeToString())
    assert error is None, error
    hidden = deserialize_tensor(pb.ForwardResponse.FromString(reply).hidden_states)
    inputs = decode_tensor(request.hidden_states)
    with torch.inference_mode():
        expected = servicer.span(inputs, torch.arange(2)[None], torch.ones(1, 2, dtype=torch.bool))
    torch.testing.assert_close(hidden, expected, atol=1e-4, rtol=1e-4)
    info, error = _rpc(channel, "NodeInfo", b"")
    assert error is None and pb.NodeInfoResponse.FromString(info).model_id == MODEL_ID


def test_grpc_node_answers_random_bytes_with_proper_statuses(node):
    servicer, channel = node
    _check_serves_on(servicer, channel)
    outcomes = {"ok": 0, "unparseable": 0, "refused": 0}

    @fuzz(300)
    @given(method=st.sampled_from(sorted(UNARY_METHODS)), raw=_wire_bytes())
    def check(method, raw):
        request_type, reply_type = UNARY_METHODS[method]
        reply, error = _rpc(channel, method, raw)
        if error is None:
            reply_type.FromString(reply)
            outcomes["ok"] += 1
        else:
            _check_status(error, request_type, raw)
            outcomes["unparseable" if _unparseable(error.code(), error.details()) else "refused"] += 1

    check()
    assert min(outcomes.values()) >= 10, outcomes  # every path really exercised
    _check_serves_on(servicer, channel)


def _rarely(draw) -> bool:
    """True one time in eight: how often a forward_requests field is damaged."""
    return draw(st.integers(0, 7)) == 0


@st.composite
def forward_requests(draw) -> pb.ForwardRequest:
    """Well-formed ForwardRequests, mostly valid: each field is damaged or off-range one time in eight."""
    batch, length = draw(st.integers(1, 2)), draw(st.integers(1, 4))
    if _rarely(draw):
        batch, length = draw(st.integers(0, 2)), draw(st.integers(0, 4))
    codec = draw(st.sampled_from(list(CODECS)))
    if codec == "semantic":
        tensor = _values([batch, length, SERVER_HIDDEN], draw(st.integers(0, 999)), 1.0, torch.float32)
        hidden = encode_tensor(tensor, codec, basis=node_basis[0], boundary=draw(st.integers(0, 2)), max_relative_error=math.inf)
    else:
        hidden = draw(valid_encodings(codec, [batch, length, SERVER_HIDDEN]))
    if _rarely(draw):
        hidden = draw(st.one_of(mutated_message(hidden, [node_basis[0].digest]), any_encoding(SERVER_HIDDEN)))
    start, end = draw(st.sampled_from([(0, 2), (0, 1), (1, 2)]))
    if _rarely(draw):
        start, end = draw(st.tuples(st.integers(-(2**31), 2**31 - 1), st.integers(-(2**31), 2**31 - 1)))
    positions = torch.tensor(draw(st.lists(st.integers(0, SERVER_MAX_LENGTH - 1), min_size=length, max_size=length)), dtype=torch.int64)
    positions = serialize_tensor(positions.expand(batch, length).to(TORCH_DTYPES[draw(st.sampled_from(["int64", "int32"]))]))
    mask = serialize_tensor(_values([batch, length], draw(st.integers(0, 99)), 1.0, torch.bool) | draw(st.booleans()))
    if _rarely(draw):
        positions = draw(st.one_of(mutated_message(positions, []), raw_tensors()))
    if _rarely(draw):
        mask = draw(st.one_of(mutated_message(mask, []), raw_tensors()))
    return pb.ForwardRequest(
        model_id=draw(st.text(max_size=6)) if _rarely(draw) else MODEL_ID,
        start_block=start,
        end_block=end,
        hidden_states=hidden,
        position_ids=positions,
        attention_mask=mask,
        reply_codec=draw(codec_names) if _rarely(draw) else draw(st.sampled_from(list(CODECS) + [""])),
    )


node_basis: list = []  # the running node's semantic basis, for forward_requests


def test_grpc_node_answers_random_forward_requests_and_serves_on(node):
    servicer, channel = node
    node_basis[:] = [servicer.semantic_basis]
    outcomes = {"ok": 0, "refused": 0}

    @fuzz(150)
    @given(request=forward_requests())
    def check(request):
        raw = request.SerializeToString()
        reply, error = _rpc(channel, "Forward", raw)
        if error is not None:
            _check_status(error, pb.ForwardRequest, raw)
            outcomes["refused"] += 1
            return
        outcomes["ok"] += 1
        hidden = decode_tensor(pb.ForwardResponse.FromString(reply).hidden_states, bases=servicer.bases)
        assert list(hidden.shape) == list(request.hidden_states.shape)

    check()
    assert outcomes["ok"] >= 20 and outcomes["refused"] >= 20, outcomes  # both paths really exercised
    _check_serves_on(servicer, channel)


@st.composite
def session_streams(draw) -> list[bytes]:
    """An InferenceSession stream: a (usually) valid open, then steps, as raw bytes; some bytes random."""
    opening = pb.SessionRequest(
        open=pb.SessionOpen(
            session_id=draw(st.text(max_size=4)),
            model_id=draw(st.one_of(st.just(MODEL_ID), st.text(max_size=4))),
            start_block=draw(st.sampled_from([0, 1, -1, 5])),
            end_block=draw(st.sampled_from([2, 1, 0, 9])),
            max_length=draw(st.sampled_from([1, 8, SERVER_MAX_LENGTH, 0, -1, 2**31 - 1])),
        )
    )
    messages = [opening.SerializeToString()]
    for _ in range(draw(st.integers(0, 3))):
        request = draw(forward_requests())
        step = pb.SessionRequest(
            step=pb.SessionStep(
                step_id=draw(st.integers(0, 2**64 - 1)),
                hidden_states=request.hidden_states,
                position_ids=request.position_ids,
                attention_mask=request.attention_mask,
                reply_codec=request.reply_codec,
            )
        )
        messages.append(draw(st.one_of(st.just(step.SerializeToString()), st.just(opening.SerializeToString()), _wire_bytes())))
    if draw(st.integers(0, 5)) == 0:
        messages[0] = draw(_wire_bytes())
    return messages


def test_grpc_node_answers_random_sessions_and_serves_on(node):
    servicer, channel = node
    node_basis[:] = [servicer.semantic_basis]
    session = channel.stream_stream(SERVICE + "InferenceSession", request_serializer=None, response_deserializer=None)

    @fuzz(80)
    @given(messages=session_streams())
    def check(messages):
        try:  # a hang ends in DEADLINE_EXCEEDED, which is not accepted below
            replies = list(session(iter(messages), timeout=30))
        except grpc.RpcError as error:
            code, details = error.code(), error.details()
            if _unparseable(code, details):
                assert not all(_parses(pb.SessionRequest, raw) for raw in messages)
            else:  # ALREADY_EXISTS: a random session id still open from an earlier example
                assert code in OUR_CODES | {grpc.StatusCode.ALREADY_EXISTS}, f"{code}: {details}"
        else:
            for reply in replies:
                pb.SessionResponse.FromString(reply)

    check()
    wait_until(
        lambda: servicer.active_sessions == 0 and servicer.kv_budget.used_bytes == 0, "every session is cleaned up", timeout=30, interval=0.05
    )
    _check_serves_on(servicer, channel)


def test_grpc_server_stops_after_garbage_in_a_session(tiny_llama_dir):
    """Found by the session fuzzing: when grpcio itself refused bytes that do not parse, some streams of a
    valid `open` then such bytes left an RPC state that never completed, and server.stop(...).wait()
    hung. Now protocol.request_parsing refuses them from our code, and the server stops."""
    source = open_model(tiny_llama_dir)
    span = TransformerSpan(source.config, 0, 1, [source.block_state(0)])
    servicer = BlockServicer(span, MODEL_ID, "stop-node", 1.0, ServiceLimits(max_session_length=SERVER_MAX_LENGTH))
    server, port = start_grpc_server(servicer, "127.0.0.1", 0, CallAuthenticator("stop-node", is_member=lambda caller: True))
    opening = pb.SessionRequest(open=pb.SessionOpen(session_id="s", model_id=MODEL_ID, start_block=0, end_block=1, max_length=8))
    with open_channel(f"127.0.0.1:{port}", "stop-node") as channel:
        session = channel.stream_stream(SERVICE + "InferenceSession", request_serializer=None, response_deserializer=None)
        for _ in range(40):
            with pytest.raises(grpc.RpcError) as error:
                list(session(iter([opening.SerializeToString(), b"\xff\xff"]), timeout=10))
            assert _unparseable(error.value.code(), error.value.details())
    assert server.stop(0).wait(timeout=1), "server.stop did not complete"
