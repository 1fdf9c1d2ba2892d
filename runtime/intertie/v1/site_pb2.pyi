from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListSitesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SiteList(_message.Message):
    __slots__ = ("sites",)
    SITES_FIELD_NUMBER: _ClassVar[int]
    sites: _containers.RepeatedCompositeFieldContainer[SiteStatus]
    def __init__(self, sites: _Optional[_Iterable[_Union[SiteStatus, _Mapping]]] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SiteStatus(_message.Message):
    __slots__ = ("site_id", "compute_id", "address", "state", "arch", "python_version", "resources_total", "resources_free", "queued", "running", "throughput", "labels", "max_payload_bytes", "version", "movable", "mean_run_s", "accelerators", "last_seen", "rtt_s", "flight_address", "resources_node_max", "overhead_s", "peer_flight_address", "accepts", "dataset_owners")
    class ResourcesTotalEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class ResourcesFreeEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class ResourcesNodeMaxEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class DatasetOwnersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    PYTHON_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FREE_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    MAX_PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MOVABLE_FIELD_NUMBER: _ClassVar[int]
    MEAN_RUN_S_FIELD_NUMBER: _ClassVar[int]
    ACCELERATORS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    RTT_S_FIELD_NUMBER: _ClassVar[int]
    FLIGHT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_NODE_MAX_FIELD_NUMBER: _ClassVar[int]
    OVERHEAD_S_FIELD_NUMBER: _ClassVar[int]
    PEER_FLIGHT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTS_FIELD_NUMBER: _ClassVar[int]
    DATASET_OWNERS_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    compute_id: str
    address: str
    state: str
    arch: str
    python_version: str
    resources_total: _containers.ScalarMap[str, float]
    resources_free: _containers.ScalarMap[str, float]
    queued: int
    running: int
    throughput: float
    labels: _containers.ScalarMap[str, str]
    max_payload_bytes: int
    version: str
    movable: int
    mean_run_s: float
    accelerators: _containers.RepeatedScalarFieldContainer[str]
    last_seen: float
    rtt_s: float
    flight_address: str
    resources_node_max: _containers.ScalarMap[str, float]
    overhead_s: float
    peer_flight_address: str
    accepts: _containers.RepeatedScalarFieldContainer[str]
    dataset_owners: _containers.ScalarMap[str, str]
    def __init__(self, site_id: _Optional[str] = ..., compute_id: _Optional[str] = ..., address: _Optional[str] = ..., state: _Optional[str] = ..., arch: _Optional[str] = ..., python_version: _Optional[str] = ..., resources_total: _Optional[_Mapping[str, float]] = ..., resources_free: _Optional[_Mapping[str, float]] = ..., queued: _Optional[int] = ..., running: _Optional[int] = ..., throughput: _Optional[float] = ..., labels: _Optional[_Mapping[str, str]] = ..., max_payload_bytes: _Optional[int] = ..., version: _Optional[str] = ..., movable: _Optional[int] = ..., mean_run_s: _Optional[float] = ..., accelerators: _Optional[_Iterable[str]] = ..., last_seen: _Optional[float] = ..., rtt_s: _Optional[float] = ..., flight_address: _Optional[str] = ..., resources_node_max: _Optional[_Mapping[str, float]] = ..., overhead_s: _Optional[float] = ..., peer_flight_address: _Optional[str] = ..., accepts: _Optional[_Iterable[str]] = ..., dataset_owners: _Optional[_Mapping[str, str]] = ...) -> None: ...
