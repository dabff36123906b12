from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("data", "dtype", "shape", "codec", "scales", "basis")
    DATA_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    BASIS_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    codec: str
    scales: bytes
    basis: str
    def __init__(self, data: _Optional[bytes] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., codec: _Optional[str] = ..., scales: _Optional[bytes] = ..., basis: _Optional[str] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("model_id", "start_block", "end_block", "hidden_states", "position_ids", "attention_mask", "reply_codec")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    START_BLOCK_FIELD_NUMBER: _ClassVar[int]
    END_BLOCK_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    POSITION_IDS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    REPLY_CODEC_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    start_block: int
    end_block: int
    hidden_states: Tensor
    position_ids: Tensor
    attention_mask: Tensor
    reply_codec: str
    def __init__(self, model_id: _Optional[str] = ..., start_block: _Optional[int] = ..., end_block: _Optional[int] = ..., hidden_states: _Optional[_Union[Tensor, _Mapping]] = ..., position_ids: _Optional[_Union[Tensor, _Mapping]] = ..., attention_mask: _Optional[_Union[Tensor, _Mapping]] = ..., reply_codec: _Optional[str] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("hidden_states",)
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    hidden_states: Tensor
    def __init__(self, hidden_states: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class SessionOpen(_message.Message):
    __slots__ = ("session_id", "model_id", "start_block", "end_block", "max_length")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    START_BLOCK_FIELD_NUMBER: _ClassVar[int]
    END_BLOCK_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model_id: str
    start_block: int
    end_block: int
    max_length: int
    def __init__(self, session_id: _Optional[str] = ..., model_id: _Optional[str] = ..., start_block: _Optional[int] = ..., end_block: _Optional[int] = ..., max_length: _Optional[int] = ...) -> None: ...

class SessionStep(_message.Message):
    __slots__ = ("step_id", "hidden_states", "position_ids", "attention_mask", "reply_codec", "truncate_to", "push_to", "upstream")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    POSITION_IDS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    REPLY_CODEC_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_TO_FIELD_NUMBER: _ClassVar[int]
    PUSH_TO_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    hidden_states: Tensor
    position_ids: Tensor
    attention_mask: Tensor
    reply_codec: str
    truncate_to: int
    push_to: PushTarget
    upstream: str
    def __init__(self, step_id: _Optional[int] = ..., hidden_states: _Optional[_Union[Tensor, _Mapping]] = ..., position_ids: _Optional[_Union[Tensor, _Mapping]] = ..., attention_mask: _Optional[_Union[Tensor, _Mapping]] = ..., reply_codec: _Optional[str] = ..., truncate_to: _Optional[int] = ..., push_to: _Optional[_Union[PushTarget, _Mapping]] = ..., upstream: _Optional[str] = ...) -> None: ...

class PushTarget(_message.Message):
    __slots__ = ("node_id", "session_id", "start_block", "end_block", "step_id")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    START_BLOCK_FIELD_NUMBER: _ClassVar[int]
    END_BLOCK_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    session_id: str
    start_block: int
    end_block: int
    step_id: int
    def __init__(self, node_id: _Optional[str] = ..., session_id: _Optional[str] = ..., start_block: _Optional[int] = ..., end_block: _Optional[int] = ..., step_id: _Optional[int] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("session_id", "start_block", "end_block", "step_id", "hidden_states")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    START_BLOCK_FIELD_NUMBER: _ClassVar[int]
    END_BLOCK_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    start_block: int
    end_block: int
    step_id: int
    hidden_states: Tensor
    def __init__(self, session_id: _Optional[str] = ..., start_block: _Optional[int] = ..., end_block: _Optional[int] = ..., step_id: _Optional[int] = ..., hidden_states: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SessionRequest(_message.Message):
    __slots__ = ("open", "step")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    open: SessionOpen
    step: SessionStep
    def __init__(self, open: _Optional[_Union[SessionOpen, _Mapping]] = ..., step: _Optional[_Union[SessionStep, _Mapping]] = ...) -> None: ...

class SessionResponse(_message.Message):
    __slots__ = ("step_id", "hidden_states", "cache_length", "input_digest", "push_error")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    CACHE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    INPUT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    PUSH_ERROR_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    hidden_states: Tensor
    cache_length: int
    input_digest: bytes
    push_error: str
    def __init__(self, step_id: _Optional[int] = ..., hidden_states: _Optional[_Union[Tensor, _Mapping]] = ..., cache_length: _Optional[int] = ..., input_digest: _Optional[bytes] = ..., push_error: _Optional[str] = ...) -> None: ...

class NodeInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeInfoResponse(_message.Message):
    __slots__ = ("node_id", "model_id", "start_block", "end_block", "num_parameters", "rss_bytes", "active_sessions", "kv_cache_bytes", "throughput", "load_rss_growth_bytes", "codecs", "semantic_basis", "weight_quant", "weight_bytes", "batched_decode_steps", "kv_reserved_bytes", "evicted_sessions")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    START_BLOCK_FIELD_NUMBER: _ClassVar[int]
    END_BLOCK_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_FIELD_NUMBER: _ClassVar[int]
    LOAD_RSS_GROWTH_BYTES_FIELD_NUMBER: _ClassVar[int]
    CODECS_FIELD_NUMBER: _ClassVar[int]
    SEMANTIC_BASIS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_QUANT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    BATCHED_DECODE_STEPS_FIELD_NUMBER: _ClassVar[int]
    KV_RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    EVICTED_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    model_id: str
    start_block: int
    end_block: int
    num_parameters: int
    rss_bytes: int
    active_sessions: int
    kv_cache_bytes: int
    throughput: float
    load_rss_growth_bytes: int
    codecs: _containers.RepeatedScalarFieldContainer[str]
    semantic_basis: str
    weight_quant: str
    weight_bytes: int
    batched_decode_steps: int
    kv_reserved_bytes: int
    evicted_sessions: int
    def __init__(self, node_id: _Optional[str] = ..., model_id: _Optional[str] = ..., start_block: _Optional[int] = ..., end_block: _Optional[int] = ..., num_parameters: _Optional[int] = ..., rss_bytes: _Optional[int] = ..., active_sessions: _Optional[int] = ..., kv_cache_bytes: _Optional[int] = ..., throughput: _Optional[float] = ..., load_rss_growth_bytes: _Optional[int] = ..., codecs: _Optional[_Iterable[str]] = ..., semantic_basis: _Optional[str] = ..., weight_quant: _Optional[str] = ..., weight_bytes: _Optional[int] = ..., batched_decode_steps: _Optional[int] = ..., kv_reserved_bytes: _Optional[int] = ..., evicted_sessions: _Optional[int] = ...) -> None: ...

class EchoRequest(_message.Message):
    __slots__ = ("payload", "reply_bytes")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    REPLY_BYTES_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    reply_bytes: int
    def __init__(self, payload: _Optional[bytes] = ..., reply_bytes: _Optional[int] = ...) -> None: ...

class EchoResponse(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...
