from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class VerifyLinkRequest(_message.Message):
    __slots__ = ("site_id", "session_id")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    session_id: str
    def __init__(self, site_id: _Optional[str] = ..., session_id: _Optional[str] = ...) -> None: ...

class VerifyLinkResponse(_message.Message):
    __slots__ = ("ok", "site_id")
    OK_FIELD_NUMBER: _ClassVar[int]
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    site_id: str
    def __init__(self, ok: _Optional[bool] = ..., site_id: _Optional[str] = ...) -> None: ...

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
