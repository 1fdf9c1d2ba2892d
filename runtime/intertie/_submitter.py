"""What futures, remote functions and executors need of a connection, and which one is current.

``client.Federation`` implements :class:`Submitter`; ``futures``, ``remote`` and ``executor``
depend on this module only, so the SDK's imports go one way (client -> them -> here).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from intertie import errors


class Submitter(Protocol):
    """A connection tasks can be submitted through (``intertie.connect()``'s Federation)."""

    site_id: str

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any: ...

    def _submit(self, function: Any, options: Any, args: bytes, *, batch: bool, resources: Any = None,
                constraints: Any = None, inputs: Sequence[Any] = ()) -> Any: ...

    def _cancel_task(self, future: Any) -> bool: ...

    def _cancel_futures(self, futures: Sequence[Any], timeout: float) -> list[str]: ...

    def _on_interrupt(self, futures: Sequence[Any]) -> None: ...

    def task(self, task_id: str) -> Any: ...


# Open connections, newest last: ``f.submit()`` uses the newest; closing it falls back to
# the one opened before, as nested ``with intertie.connect(...)`` blocks expect.
_open: list[Submitter] = []
_lock = threading.Lock()


def opened(connection: Submitter) -> None:
    with _lock:
        _open.append(connection)


def closed(connection: Submitter) -> None:
    with _lock:
        if connection in _open:
            _open.remove(connection)


def current() -> Submitter:
    """The connection that ``f.submit()`` uses: the most recently opened one still open."""
    with _lock:
        if _open:
            return _open[-1]
    raise errors.IntertieError("not connected: call intertie.connect() first")
