"""Futures for tasks: standard ``concurrent.futures.Future`` objects with task metadata.

A :class:`TaskFuture` keeps the ``concurrent.futures`` contract where a task differs from a
call in a thread: a cancelled future wakes ``wait()`` and ``as_completed()`` at once, it is
``running()`` once its site reports the task started, and its done callbacks never run on
the client's I/O thread (they run on a few callback threads of their own, so a callback
that waits on another future cannot hold up results). Ctrl-C while waiting on tasks this
client submitted cancels them (see ``intertie.connect(cancel_on_interrupt=...)``).
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import weakref
from collections.abc import Iterable
from concurrent.futures import _base
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from intertie._submitter import Submitter
    from intertie.spec import PlacementInfo

logger = logging.getLogger("intertie.client")

# At most this many threads run done callbacks (started as callbacks wait, never stopped).
MAX_CALLBACK_THREADS = 8


class TaskFuture(concurrent.futures.Future):  # type: ignore[type-arg]
    """The result of one task. ``wait``/``as_completed`` work as for any future.

    ``task_id`` identifies the task at its home gateway (``fed.future(task_id)``
    gets a new future for it later, also from another client); ``site`` and
    ``attempts`` are filled in when the task finishes.
    """

    def __init__(self, task_id: str, federation: Submitter | None = None) -> None:
        super().__init__()
        self.task_id = task_id
        self.site: str | None = None
        self.attempts = 0
        self._federation = federation
        self._submitted = False  # submitted by this client (not only followed with fed.future)
        self._final_placement: PlacementInfo | None = None  # once done, where it ran no longer changes
        # Set once the gateway has answered the Submit that carried this task; a cancel
        # must not overtake it, or the gateway would not yet know the task.
        self._acked = threading.Event()
        # wait() and as_completed() install their waiters here: see _Waiters.
        self._waiters = _Waiters(weakref.ref(self))

    @property
    def placement(self) -> PlacementInfo | None:
        """Where the task was placed and why: the chosen site, the candidates with their
        estimated wait, transfer, run time, price and carbon, and the sites rejected.
        Asked of the home gateway while the task is unfinished; kept once it is done."""
        if self._final_placement is not None:
            return self._final_placement
        if self._federation is None:
            return None
        done = self.done()  # asked before the call: a placement read after it finished is final
        placement: PlacementInfo | None = self._federation.task(self.task_id).placement
        if done:
            self._final_placement = placement
        return placement

    def cancel(self) -> bool:
        """Cancels the task at its gateway, whether it is queued or running.

        Unlike a call in a thread, a running task can be stopped: this returns True for
        it too (``Executor.shutdown(cancel_futures=True)`` still spares running tasks, as
        the ``concurrent.futures`` documentation says). False once the task has finished.
        """
        if self.done():
            return self.cancelled()
        if self._federation is None:
            return self._set_cancelled()
        if not self._federation._cancel_task(self):
            return self.cancelled()
        return self._set_cancelled()

    def result(self, timeout: float | None = None) -> Any:
        try:
            return super().result(timeout)
        except KeyboardInterrupt:
            interrupted([self])
            raise

    def exception(self, timeout: float | None = None) -> BaseException | None:
        try:
            return super().exception(timeout)
        except KeyboardInterrupt:
            interrupted([self])
            raise

    # ------------------------------------------------------------------ state changes
    # The standard Future leaves a cancelled future CANCELLED until an executor calls
    # set_running_or_notify_cancel(), and only then wakes wait() and as_completed(); a
    # task's future is its own executor, so it notifies at once.
    def _set_cancelled(self) -> bool:
        """Moves the future to the standard cancelled state (result() raises CancelledError)
        and wakes everything waiting on it. False if it had finished."""
        with self._condition:
            if self._state == _base.FINISHED:
                return False
            if self._state in (_base.CANCELLED, _base.CANCELLED_AND_NOTIFIED):
                return True
            self._state = _base.CANCELLED_AND_NOTIFIED
            for waiter in self._waiters:
                waiter.add_cancelled(self)
            self._condition.notify_all()
        self._invoke_callbacks()
        return True

    def _set_running(self) -> None:
        """The site reports the task started: running() is True from now on."""
        with self._condition:
            if self._state == _base.PENDING:
                self._state = _base.RUNNING

    # Resolution from the event stream; a future the user cancelled stays cancelled.
    def _resolve(self, value: Any = None, exc: BaseException | None = None) -> None:
        if self.done():
            return
        try:
            if exc is not None:
                self.set_exception(exc)
            else:
                self.set_result(value)
        except concurrent.futures.InvalidStateError:
            pass

    def _invoke_callbacks(self) -> None:
        if not self._done_callbacks:  # type: ignore[attr-defined]
            return
        if on_io_thread():
            _callbacks.run(self)  # never on the I/O thread: a slow callback would hold up results
        else:
            super()._invoke_callbacks()  # type: ignore[misc]

    def __repr__(self) -> str:
        with self._condition:
            state, exc = self._state, self._exception
        if state == _base.FINISHED:
            described = "finished" if exc is None else f"failed: {_describe(exc)}"
        elif state in (_base.CANCELLED, _base.CANCELLED_AND_NOTIFIED):
            described = "cancelled"
        else:
            described = state.lower()
        return f"<TaskFuture {self.task_id} {described}{' at ' + self.site if self.site else ''}>"


def _describe(exc: BaseException, limit: int = 80) -> str:
    """``ValueError: bad value`` (the type it was raised as, the message's first line)."""
    name = type(exc).__name__
    remote_type = getattr(exc, "remote_type", "")  # a RemoteTaskError: the class it was raised as
    if isinstance(remote_type, str) and remote_type:
        name = remote_type.rpartition(".")[2]
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    return f"{name}: {text}" if text else name


# ---------------------------------------------------------------------- Ctrl-C while waiting
class _InterruptibleEvent(threading.Event):
    """The event a ``wait()``/``as_completed()`` waiter blocks on: Ctrl-C (KeyboardInterrupt)
    during its wait hands the task futures it waits for to :func:`interrupted`."""

    def __init__(self) -> None:
        super().__init__()
        self.futures: list[TaskFuture] = []

    def wait(self, timeout: float | None = None) -> bool:
        try:
            return super().wait(timeout)
        except KeyboardInterrupt:
            interrupted(self.futures)
            raise


class _Waiters(list):  # type: ignore[type-arg]
    """A TaskFuture's ``_waiters``. ``concurrent.futures.wait()`` and ``as_completed()``
    install a fresh waiter in each future they wait for (holding every future's lock)
    before blocking on ``waiter.event``: that event is swapped for an
    :class:`_InterruptibleEvent` that knows this client's futures among them."""

    def __init__(self, owner: weakref.ref[TaskFuture]) -> None:
        super().__init__()
        self._owner = owner

    def append(self, waiter: Any) -> None:
        event = getattr(waiter, "event", None)
        if isinstance(event, threading.Event) and not isinstance(event, _InterruptibleEvent) and not event.is_set():
            event = waiter.event = _InterruptibleEvent()
        owner = self._owner()
        if isinstance(event, _InterruptibleEvent) and owner is not None:
            event.futures.append(owner)
        super().append(waiter)


def interrupted(futures: Iterable[concurrent.futures.Future[Any]]) -> None:
    """Ctrl-C while waiting on ``futures``: each connection decides for the unfinished
    tasks it submitted (cancel them, or say how)."""
    by_connection: dict[int, tuple[Submitter, list[TaskFuture]]] = {}
    for future in futures:
        if isinstance(future, TaskFuture) and future._submitted and not future.done() \
                and future._federation is not None:
            fed = future._federation
            by_connection.setdefault(id(fed), (fed, []))[1].append(future)
    for fed, owned in by_connection.values():
        try:
            fed._on_interrupt(owned)
        except Exception as exc:  # the KeyboardInterrupt goes on regardless
            logger.warning("intertie: could not cancel %d tasks after the interrupt: %s", len(owned), exc)


# ---------------------------------------------------------------------- callbacks
_thread_role = threading.local()


def mark_io_thread() -> None:
    """Called by a session's I/O thread as it starts: callbacks are handed off from it."""
    _thread_role.io = True


def on_io_thread() -> bool:
    return getattr(_thread_role, "io", False)


class _CallbackThreads:
    """Runs futures' done callbacks on up to MAX_CALLBACK_THREADS daemon threads, each
    future's in the order they were added. A thread is started whenever every running one
    is busy (e.g. a callback waiting on another future), up to the limit."""

    def __init__(self, max_threads: int) -> None:
        self._max = max_threads
        self._queue: queue.SimpleQueue[TaskFuture] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        self._backlog = 0

    def run(self, future: TaskFuture) -> None:
        with self._lock:
            self._backlog += 1
            start = self._backlog > self._idle and self._threads < self._max
            if start:
                self._threads += 1
        self._queue.put(future)
        if start:
            threading.Thread(target=self._work, name=f"intertie-callbacks-{self._threads}", daemon=True).start()

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            future = self._queue.get()
            with self._lock:
                self._idle -= 1
                self._backlog -= 1
            # The standard loop: each callback in order; an exception is logged and ignored.
            concurrent.futures.Future._invoke_callbacks(future)  # type: ignore[attr-defined]
            del future


_callbacks = _CallbackThreads(MAX_CALLBACK_THREADS)
