from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StepRequest(_message.Message):
    __slots__ = ("run_id", "step_id", "attempt", "kind", "args_json")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    step_id: str
    attempt: int
    kind: str
    args_json: str
    def __init__(self, run_id: _Optional[str] = ..., step_id: _Optional[str] = ..., attempt: _Optional[int] = ..., kind: _Optional[str] = ..., args_json: _Optional[str] = ...) -> None: ...

class StepResult(_message.Message):
    __slots__ = ("ok", "value_json", "error", "node_id", "seconds")
    OK_FIELD_NUMBER: _ClassVar[int]
    VALUE_JSON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    value_json: str
    error: str
    node_id: str
    seconds: float
    def __init__(self, ok: _Optional[bool] = ..., value_json: _Optional[str] = ..., error: _Optional[str] = ..., node_id: _Optional[str] = ..., seconds: _Optional[float] = ...) -> None: ...

class StepUpdate(_message.Message):
    __slots__ = ("accepted", "text", "result")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    text: str
    result: StepResult
    def __init__(self, accepted: _Optional[bool] = ..., text: _Optional[str] = ..., result: _Optional[_Union[StepResult, _Mapping]] = ...) -> None: ...

class RunRequest(_message.Message):
    __slots__ = ("run_id", "spec_json")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    spec_json: str
    def __init__(self, run_id: _Optional[str] = ..., spec_json: _Optional[str] = ...) -> None: ...

class RunReply(_message.Message):
    __slots__ = ("run_id", "status", "result_json", "coordinator", "coordinator_address", "backup", "backup_address", "resumed_seq")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    BACKUP_FIELD_NUMBER: _ClassVar[int]
    BACKUP_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    RESUMED_SEQ_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    status: str
    result_json: str
    coordinator: str
    coordinator_address: str
    backup: str
    backup_address: str
    resumed_seq: int
    def __init__(self, run_id: _Optional[str] = ..., status: _Optional[str] = ..., result_json: _Optional[str] = ..., coordinator: _Optional[str] = ..., coordinator_address: _Optional[str] = ..., backup: _Optional[str] = ..., backup_address: _Optional[str] = ..., resumed_seq: _Optional[int] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("run_id", "after_seq")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    after_seq: int
    def __init__(self, run_id: _Optional[str] = ..., after_seq: _Optional[int] = ...) -> None: ...

class RunEvent(_message.Message):
    __slots__ = ("seq", "event_json")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    EVENT_JSON_FIELD_NUMBER: _ClassVar[int]
    seq: int
    event_json: str
    def __init__(self, seq: _Optional[int] = ..., event_json: _Optional[str] = ...) -> None: ...

class RunQuery(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class RunJournal(_message.Message):
    __slots__ = ("run_id", "export_json", "coordinator")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    EXPORT_JSON_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    export_json: str
    coordinator: str
    def __init__(self, run_id: _Optional[str] = ..., export_json: _Optional[str] = ..., coordinator: _Optional[str] = ...) -> None: ...

class MemoryDigest(_message.Message):
    __slots__ = ("store", "digest")
    STORE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    store: str
    digest: bytes
    def __init__(self, store: _Optional[str] = ..., digest: _Optional[bytes] = ...) -> None: ...

class MemoryDigests(_message.Message):
    __slots__ = ("stores",)
    STORES_FIELD_NUMBER: _ClassVar[int]
    stores: _containers.RepeatedCompositeFieldContainer[MemoryDigest]
    def __init__(self, stores: _Optional[_Iterable[_Union[MemoryDigest, _Mapping]]] = ...) -> None: ...

class MemoryInventory(_message.Message):
    __slots__ = ("store", "record_ids", "created")
    STORE_FIELD_NUMBER: _ClassVar[int]
    RECORD_IDS_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    store: str
    record_ids: _containers.RepeatedScalarFieldContainer[str]
    created: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, store: _Optional[str] = ..., record_ids: _Optional[_Iterable[str]] = ..., created: _Optional[_Iterable[float]] = ...) -> None: ...

class MemoryInventories(_message.Message):
    __slots__ = ("stores",)
    STORES_FIELD_NUMBER: _ClassVar[int]
    stores: _containers.RepeatedCompositeFieldContainer[MemoryInventory]
    def __init__(self, stores: _Optional[_Iterable[_Union[MemoryInventory, _Mapping]]] = ...) -> None: ...

class MemoryRecords(_message.Message):
    __slots__ = ("store", "records_json")
    STORE_FIELD_NUMBER: _ClassVar[int]
    RECORDS_JSON_FIELD_NUMBER: _ClassVar[int]
    store: str
    records_json: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, store: _Optional[str] = ..., records_json: _Optional[_Iterable[str]] = ...) -> None: ...

class MemoryPutReply(_message.Message):
    __slots__ = ("stored",)
    STORED_FIELD_NUMBER: _ClassVar[int]
    stored: int
    def __init__(self, stored: _Optional[int] = ...) -> None: ...
