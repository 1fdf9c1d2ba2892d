from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class StealRequest(_message.Message):
    __slots__ = ("site_id", "max_tasks")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_TASKS_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    max_tasks: int
    def __init__(self, site_id: _Optional[str] = ..., max_tasks: _Optional[int] = ...) -> None: ...

class StealResponse(_message.Message):
    __slots__ = ("moved",)
    MOVED_FIELD_NUMBER: _ClassVar[int]
    moved: int
    def __init__(self, moved: _Optional[int] = ...) -> None: ...
