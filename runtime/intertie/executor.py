"""A ``concurrent.futures.Executor`` over the federation."""

from __future__ import annotations

import concurrent.futures
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from intertie import serialization
from intertie.remote import RemoteFunction
from intertie.spec import TaskOptions

if TYPE_CHECKING:
    from intertie._submitter import Submitter
    from intertie.futures import TaskFuture


class FederationExecutor(concurrent.futures.Executor):
    """Runs callables as Intertie tasks.

    ``map(fn, *iterables, chunksize=n)`` sends ``n`` calls per task, so a million
    tiny calls cost a thousand tasks; results come back in input order.
    """

    def __init__(self, federation: Submitter) -> None:
        self._fed = federation
        self._futures: set[TaskFuture] = set()
        self._lock = threading.Lock()
        self._shutdown = False

    def _track(self, future: TaskFuture) -> TaskFuture:
        with self._lock:
            self._futures.add(future)
        future.add_done_callback(self._untrack)
        return future

    def _untrack(self, future: Any) -> None:
        with self._lock:
            self._futures.discard(future)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskFuture:  # type: ignore[override]
        if self._shutdown:
            raise RuntimeError("cannot submit after shutdown")
        return self._track(self._fed.submit(fn, *args, **kwargs))

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1, buffersize: int | None = None) -> Iterator[Any]:
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1")
        if self._shutdown:
            raise RuntimeError("cannot submit after shutdown")
        deadline = None if timeout is None else time.monotonic() + timeout
        calls = zip(*iterables)  # noqa: B905 - map() stops at the shortest, as the stdlib does
        if chunksize == 1:
            futures = [self.submit(fn, *args) for args in calls]
            return _results((f, False) for f in futures)(deadline)
        remote = fn if isinstance(fn, RemoteFunction) else None
        options = remote.task_options if remote is not None else TaskOptions()
        pickled = serialization.pickle_function(remote.function if remote is not None else fn)
        chunk_futures = []
        while True:
            chunk = list(itertools.islice(calls, chunksize))
            if not chunk:
                break
            payload = serialization.dumps_calls([(args, {}) for args in chunk])
            chunk_futures.append(self._track(self._fed._submit(pickled, options, payload, batch=True)))
        return _results((f, True) for f in chunk_futures)(deadline)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._shutdown = True
        with self._lock:
            futures = list(self._futures)
        if cancel_futures:
            for f in futures:
                f.cancel()
        if wait:
            concurrent.futures.wait(futures)


def _results(pairs: Iterable[tuple[TaskFuture, bool]]) -> Callable[[float | None], Iterator[Any]]:
    items = list(pairs)

    def generate(deadline: float | None) -> Iterator[Any]:
        try:
            for future, is_chunk in items:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                value = future.result(left)
                if is_chunk:
                    yield from value
                else:
                    yield value
        finally:
            for future, _ in items:
                if not future.done():
                    future.cancel()

    return generate
