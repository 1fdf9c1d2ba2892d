"""A ``concurrent.futures.Executor`` over the federation.

It keeps the ``concurrent.futures`` contract (tests/integration/test_executor_contract.py
checks it rule by rule), with two differences a federation makes: ``map`` reads its input
lazily, a bounded window ahead of the results (so an endless iterator works), and a
future's ``cancel()`` also stops a task that is already running.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from intertie import serialization
from intertie.errors import IntertieError
from intertie.remote import RemoteFunction
from intertie.spec import TaskOptions

if TYPE_CHECKING:
    from intertie._submitter import Submitter
    from intertie.futures import TaskFuture

logger = logging.getLogger("intertie.client")

# map()'s default window: this many tasks in flight per worker (_max_workers), at least MIN.
# The window is topped up once half of it is yielded, so that new tasks travel in batches.
MAP_WINDOW_PER_WORKER = 8
MIN_MAP_WINDOW = 64
# Cancelling what an abandoned map() left in flight waits this long for the gateway at most.
CANCEL_TIMEOUT_S = 10.0


class FederationExecutor(concurrent.futures.Executor):
    """Runs callables as Intertie tasks.

    ``map(fn, *iterables, chunksize=n)`` sends ``n`` calls per task, so a million
    tiny calls cost a thousand tasks; results come back in input order. ``map`` reads
    its input as it goes: at most ``buffersize`` tasks (default 8 per ``_max_workers``,
    at least 64) are submitted and not yet yielded, and a result is dropped once yielded.
    ``_max_workers`` is the federation's CPU count unless given (Dask reads it).
    """

    def __init__(self, federation: Submitter, max_workers: int | None = None) -> None:
        if max_workers is None:
            max_workers = os.cpu_count() or 1
        if max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        self._fed = federation
        self._max_workers = max_workers
        self._futures: set[TaskFuture] = set()
        self._lock = threading.Lock()
        self._shutdown = False
        self._stop_maps = False  # shutdown(cancel_futures=True): maps submit nothing more

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
            raise RuntimeError("cannot schedule new futures after shutdown")
        return self._track(self._fed.submit(fn, *args, **kwargs))

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1, buffersize: int | None = None) -> Iterator[Any]:
        if buffersize is not None and (not isinstance(buffersize, int) or buffersize < 1):
            raise ValueError("buffersize must be None or > 0")
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        deadline = None if timeout is None else time.monotonic() + timeout
        window = buffersize or max(MAP_WINDOW_PER_WORKER * self._max_workers, MIN_MAP_WINDOW)
        calls = zip(*iterables)  # noqa: B905 - map() stops at the shortest, as the stdlib does
        submit_next: Callable[[], TaskFuture | None]
        if chunksize == 1:
            def submit_next() -> TaskFuture | None:
                for args in calls:
                    return self._track(self._fed.submit(fn, *args))
                return None
        else:
            remote = fn if isinstance(fn, RemoteFunction) else None
            options = remote.task_options if remote is not None else TaskOptions()
            pickled = serialization.pickle_function(remote.function if remote is not None else fn)

            def submit_next() -> TaskFuture | None:
                chunk = list(itertools.islice(calls, chunksize))
                if not chunk:
                    return None
                payload = serialization.dumps_calls([(args, {}) for args in chunk])
                return self._track(self._fed._submit(pickled, options, payload, batch=True))

        window_ = _Window(submit_next, window, self)
        window_.top_up(window)  # the first window is submitted now, as map() is called
        return window_.results(chunksize > 1, deadline)

    def _cancel(self, futures: list[TaskFuture]) -> None:
        """Cancels what a map() submitted and no longer needs, in one call."""
        try:
            self._fed._cancel_futures([f for f in futures if not f.done()], CANCEL_TIMEOUT_S)
        except IntertieError as exc:
            logger.warning("intertie: could not cancel the %d tasks map() left unfinished: %s", len(futures), exc)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new work after this. ``cancel_futures``: tasks not yet running are cancelled
        (those running, as reported by their site, are left to finish), and ``map``
        iterators submit nothing more. ``wait``: returns once every future is done."""
        self._shutdown = True
        with self._lock:
            futures = list(self._futures)
        if cancel_futures:
            self._stop_maps = True
            for f in futures:
                if not f.running():
                    f.cancel()
        if wait:
            concurrent.futures.wait(futures)


class _Window:
    """One ``map()`` call: its submitted, not yet yielded futures, in input order."""

    def __init__(self, submit_next: Callable[[], TaskFuture | None], size: int,
                 executor: FederationExecutor) -> None:
        self._submit_next = submit_next
        self._size = size
        self._executor = executor
        self._pending: deque[TaskFuture] = deque()
        self._exhausted = False

    def top_up(self, limit: int) -> None:
        # After shutdown(wait=...) a map() called before it still runs to its end (as the
        # stdlib's, which submitted everything at once); shutdown(cancel_futures=True) stops it.
        while not self._exhausted and len(self._pending) < limit and not self._executor._stop_maps:
            future = self._submit_next()
            if future is None:
                self._exhausted = True
            else:
                self._pending.append(future)

    def _take(self, deadline: float | None) -> Any:
        """The head's result; the window is topped up while it is awaited. No reference to
        the future stays here (the result goes with it once the caller drops it)."""
        future = self._pending.popleft()
        if len(self._pending) < self._size // 2:
            self.top_up(self._size - 1)  # the head counts until its result is yielded
        try:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            return future.result(left)
        finally:
            future.cancel()  # a timeout cancels it (no-op once done), as the stdlib does
            del future

    def results(self, chunked: bool, deadline: float | None) -> Iterator[Any]:
        try:
            while True:
                if len(self._pending) <= self._size // 2:  # in batches, not one by one
                    self.top_up(self._size)
                if not self._pending:
                    if self._executor._stop_maps and not self._exhausted:
                        raise concurrent.futures.CancelledError("the executor was shut down with cancel_futures=True")
                    return
                if chunked:
                    chunk = self._take(deadline)
                    chunk.reverse()
                    while chunk:
                        yield chunk.pop()
                else:
                    yield self._take(deadline)
        finally:
            pending, self._pending = list(self._pending), deque()
            if pending:
                self._executor._cancel(pending)
