from intertie.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_STATE_UNSPECIFIED: _ClassVar[TaskState]
    TASK_STATE_QUEUED: _ClassVar[TaskState]
    TASK_STATE_RUNNING: _ClassVar[TaskState]
    TASK_STATE_SUCCEEDED: _ClassVar[TaskState]
    TASK_STATE_FAILED: _ClassVar[TaskState]
    TASK_STATE_CANCELLED: _ClassVar[TaskState]
TASK_STATE_UNSPECIFIED: TaskState
TASK_STATE_QUEUED: TaskState
TASK_STATE_RUNNING: TaskState
TASK_STATE_SUCCEEDED: TaskState
TASK_STATE_FAILED: TaskState
TASK_STATE_CANCELLED: TaskState

class Function(_message.Message):
    __slots__ = ("digest", "payload", "name")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    digest: str
    payload: bytes
    name: str
    def __init__(self, digest: _Optional[str] = ..., payload: _Optional[bytes] = ..., name: _Optional[str] = ...) -> None: ...

class TaskSpec(_message.Message):
    __slots__ = ("task_id", "function_digest", "args", "resources", "max_retries", "timeout_s", "batch", "python_version", "name", "constraints", "home", "inputs", "returns_dataset", "tenant")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_DIGEST_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    MAX_RETRIES_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    PYTHON_VERSION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONSTRAINTS_FIELD_NUMBER: _ClassVar[int]
    HOME_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    RETURNS_DATASET_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    function_digest: str
    args: bytes
    resources: _common_pb2.ResourceRequest
    max_retries: int
    timeout_s: float
    batch: bool
    python_version: str
    name: str
    constraints: _common_pb2.Constraints
    home: str
    inputs: _containers.RepeatedCompositeFieldContainer[DatasetInput]
    returns_dataset: bool
    tenant: str
    def __init__(self, task_id: _Optional[str] = ..., function_digest: _Optional[str] = ..., args: _Optional[bytes] = ..., resources: _Optional[_Union[_common_pb2.ResourceRequest, _Mapping]] = ..., max_retries: _Optional[int] = ..., timeout_s: _Optional[float] = ..., batch: _Optional[bool] = ..., python_version: _Optional[str] = ..., name: _Optional[str] = ..., constraints: _Optional[_Union[_common_pb2.Constraints, _Mapping]] = ..., home: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[DatasetInput, _Mapping]]] = ..., returns_dataset: _Optional[bool] = ..., tenant: _Optional[str] = ...) -> None: ...

class DatasetInput(_message.Message):
    __slots__ = ("id", "site", "num_bytes")
    ID_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    id: str
    site: str
    num_bytes: int
    def __init__(self, id: _Optional[str] = ..., site: _Optional[str] = ..., num_bytes: _Optional[int] = ...) -> None: ...

class SubmitRequest(_message.Message):
    __slots__ = ("functions", "tasks", "session_id")
    FUNCTIONS_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    functions: _containers.RepeatedCompositeFieldContainer[Function]
    tasks: _containers.RepeatedCompositeFieldContainer[TaskSpec]
    session_id: str
    def __init__(self, functions: _Optional[_Iterable[_Union[Function, _Mapping]]] = ..., tasks: _Optional[_Iterable[_Union[TaskSpec, _Mapping]]] = ..., session_id: _Optional[str] = ...) -> None: ...

class ClientMessage(_message.Message):
    __slots__ = ("open", "submit", "reconcile")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    SUBMIT_FIELD_NUMBER: _ClassVar[int]
    RECONCILE_FIELD_NUMBER: _ClassVar[int]
    open: WatchRequest
    submit: SubmitBatch
    reconcile: Reconcile
    def __init__(self, open: _Optional[_Union[WatchRequest, _Mapping]] = ..., submit: _Optional[_Union[SubmitBatch, _Mapping]] = ..., reconcile: _Optional[_Union[Reconcile, _Mapping]] = ...) -> None: ...

class Reconcile(_message.Message):
    __slots__ = ("task_ids", "more")
    TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    task_ids: _containers.RepeatedScalarFieldContainer[str]
    more: bool
    def __init__(self, task_ids: _Optional[_Iterable[str]] = ..., more: _Optional[bool] = ...) -> None: ...

class ReconcileAck(_message.Message):
    __slots__ = ("unknown_task_ids", "dropped")
    UNKNOWN_TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    unknown_task_ids: _containers.RepeatedScalarFieldContainer[str]
    dropped: int
    def __init__(self, unknown_task_ids: _Optional[_Iterable[str]] = ..., dropped: _Optional[int] = ...) -> None: ...

class SubmitBatch(_message.Message):
    __slots__ = ("seq", "request")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    seq: int
    request: SubmitRequest
    def __init__(self, seq: _Optional[int] = ..., request: _Optional[_Union[SubmitRequest, _Mapping]] = ...) -> None: ...

class SubmitAck(_message.Message):
    __slots__ = ("seq", "acks")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    ACKS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    acks: _containers.RepeatedCompositeFieldContainer[TaskAck]
    def __init__(self, seq: _Optional[int] = ..., acks: _Optional[_Iterable[_Union[TaskAck, _Mapping]]] = ...) -> None: ...

class ServerMessage(_message.Message):
    __slots__ = ("events", "ack", "reconciled")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    RECONCILED_FIELD_NUMBER: _ClassVar[int]
    events: TaskEvents
    ack: SubmitAck
    reconciled: ReconcileAck
    def __init__(self, events: _Optional[_Union[TaskEvents, _Mapping]] = ..., ack: _Optional[_Union[SubmitAck, _Mapping]] = ..., reconciled: _Optional[_Union[ReconcileAck, _Mapping]] = ...) -> None: ...

class TaskAck(_message.Message):
    __slots__ = ("task_id", "accepted", "error")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    accepted: bool
    error: _common_pb2.Error
    def __init__(self, task_id: _Optional[str] = ..., accepted: _Optional[bool] = ..., error: _Optional[_Union[_common_pb2.Error, _Mapping]] = ...) -> None: ...

class SubmitResponse(_message.Message):
    __slots__ = ("acks",)
    ACKS_FIELD_NUMBER: _ClassVar[int]
    acks: _containers.RepeatedCompositeFieldContainer[TaskAck]
    def __init__(self, acks: _Optional[_Iterable[_Union[TaskAck, _Mapping]]] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("session_id", "progress", "peer_site")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    PEER_SITE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    progress: bool
    peer_site: str
    def __init__(self, session_id: _Optional[str] = ..., progress: _Optional[bool] = ..., peer_site: _Optional[str] = ...) -> None: ...

class TaskEvent(_message.Message):
    __slots__ = ("task_id", "state", "site", "attempt", "result", "error", "run_s")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RUN_S_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    state: TaskState
    site: str
    attempt: int
    result: bytes
    error: _common_pb2.Error
    run_s: float
    def __init__(self, task_id: _Optional[str] = ..., state: _Optional[_Union[TaskState, str]] = ..., site: _Optional[str] = ..., attempt: _Optional[int] = ..., result: _Optional[bytes] = ..., error: _Optional[_Union[_common_pb2.Error, _Mapping]] = ..., run_s: _Optional[float] = ...) -> None: ...

class TaskEvents(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[TaskEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[TaskEvent, _Mapping]]] = ...) -> None: ...

class SubscribeRequest(_message.Message):
    __slots__ = ("session_id", "task_ids")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    task_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session_id: _Optional[str] = ..., task_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class SubscribeResponse(_message.Message):
    __slots__ = ("unknown_task_ids",)
    UNKNOWN_TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    unknown_task_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, unknown_task_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class GetTaskRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class Attempt(_message.Message):
    __slots__ = ("attempt", "site", "started_at", "ended_at", "outcome")
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    attempt: int
    site: str
    started_at: float
    ended_at: float
    outcome: str
    def __init__(self, attempt: _Optional[int] = ..., site: _Optional[str] = ..., started_at: _Optional[float] = ..., ended_at: _Optional[float] = ..., outcome: _Optional[str] = ...) -> None: ...

class TaskInfo(_message.Message):
    __slots__ = ("task_id", "name", "state", "site", "attempts", "max_retries", "error", "submitted_at", "started_at", "finished_at", "resources", "history", "placements", "home", "tenant")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    MAX_RETRIES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    PLACEMENTS_FIELD_NUMBER: _ClassVar[int]
    HOME_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    name: str
    state: TaskState
    site: str
    attempts: int
    max_retries: int
    error: _common_pb2.Error
    submitted_at: float
    started_at: float
    finished_at: float
    resources: _common_pb2.ResourceRequest
    history: _containers.RepeatedCompositeFieldContainer[Attempt]
    placements: _containers.RepeatedCompositeFieldContainer[Placement]
    home: str
    tenant: str
    def __init__(self, task_id: _Optional[str] = ..., name: _Optional[str] = ..., state: _Optional[_Union[TaskState, str]] = ..., site: _Optional[str] = ..., attempts: _Optional[int] = ..., max_retries: _Optional[int] = ..., error: _Optional[_Union[_common_pb2.Error, _Mapping]] = ..., submitted_at: _Optional[float] = ..., started_at: _Optional[float] = ..., finished_at: _Optional[float] = ..., resources: _Optional[_Union[_common_pb2.ResourceRequest, _Mapping]] = ..., history: _Optional[_Iterable[_Union[Attempt, _Mapping]]] = ..., placements: _Optional[_Iterable[_Union[Placement, _Mapping]]] = ..., home: _Optional[str] = ..., tenant: _Optional[str] = ...) -> None: ...

class PlacementScore(_message.Message):
    __slots__ = ("site", "wait_s", "transfer_s", "run_s", "price", "carbon_g", "total")
    SITE_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_S_FIELD_NUMBER: _ClassVar[int]
    RUN_S_FIELD_NUMBER: _ClassVar[int]
    PRICE_FIELD_NUMBER: _ClassVar[int]
    CARBON_G_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    site: str
    wait_s: float
    transfer_s: float
    run_s: float
    price: float
    carbon_g: float
    total: float
    def __init__(self, site: _Optional[str] = ..., wait_s: _Optional[float] = ..., transfer_s: _Optional[float] = ..., run_s: _Optional[float] = ..., price: _Optional[float] = ..., carbon_g: _Optional[float] = ..., total: _Optional[float] = ...) -> None: ...

class Rejection(_message.Message):
    __slots__ = ("site", "reason")
    SITE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    site: str
    reason: str
    def __init__(self, site: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class Placement(_message.Message):
    __slots__ = ("site", "reason", "candidates", "rejected", "rejected_count", "feasible_count", "decided_at")
    SITE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_COUNT_FIELD_NUMBER: _ClassVar[int]
    FEASIBLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_FIELD_NUMBER: _ClassVar[int]
    site: str
    reason: str
    candidates: _containers.RepeatedCompositeFieldContainer[PlacementScore]
    rejected: _containers.RepeatedCompositeFieldContainer[Rejection]
    rejected_count: int
    feasible_count: int
    decided_at: float
    def __init__(self, site: _Optional[str] = ..., reason: _Optional[str] = ..., candidates: _Optional[_Iterable[_Union[PlacementScore, _Mapping]]] = ..., rejected: _Optional[_Iterable[_Union[Rejection, _Mapping]]] = ..., rejected_count: _Optional[int] = ..., feasible_count: _Optional[int] = ..., decided_at: _Optional[float] = ...) -> None: ...

class QuoteRequest(_message.Message):
    __slots__ = ("task", "args_bytes")
    TASK_FIELD_NUMBER: _ClassVar[int]
    ARGS_BYTES_FIELD_NUMBER: _ClassVar[int]
    task: TaskSpec
    args_bytes: int
    def __init__(self, task: _Optional[_Union[TaskSpec, _Mapping]] = ..., args_bytes: _Optional[int] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("task_ids", "all_mine")
    TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    ALL_MINE_FIELD_NUMBER: _ClassVar[int]
    task_ids: _containers.RepeatedScalarFieldContainer[str]
    all_mine: bool
    def __init__(self, task_ids: _Optional[_Iterable[str]] = ..., all_mine: _Optional[bool] = ...) -> None: ...

class CancelResponse(_message.Message):
    __slots__ = ("cancelled",)
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    cancelled: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, cancelled: _Optional[_Iterable[str]] = ...) -> None: ...
