"""The client's session with its home gateway: one bidirectional Connect stream.

Submissions and results travel on that stream, driven by an asyncio loop on a thread of
its own (a message on an open stream costs far less than a call). :class:`Session` batches
what is submitted, resends what the gateway has not acknowledged after a reconnect,
resubscribes to unfinished tasks and resolves their futures from the events it receives
(``running()`` from the RUNNING events it asks for). A gateway unreachable for longer than
``unavailable_timeout`` is *known down*: the unfinished futures fail, and new submissions
are refused at once until the stream opens again. ``client.Federation``, the user's facade,
owns one and makes the unary calls itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

import grpc

from intertie import _rpc, errors, serialization
from intertie._wire import error_from_wire
from intertie.futures import TaskFuture, mark_io_thread
from intertie.v1 import tasks_pb2, tasks_pb2_grpc

# The client's log, as users know it: the stream is the client's connection.
logger = logging.getLogger("intertie.client")

# At most this many batches are on their way unacknowledged; what is submitted meanwhile
# waits for an ack and goes as one batch. A lone task goes at once, and a burst is cut into
# batches as large as the gateway's pace allows: the busier it is, the fewer (and larger)
# batches it has to take, each costing it a transaction and an ack. These bound one batch,
# so that one message never grows past a few MiB.
MAX_INFLIGHT_BATCHES = 2
MAX_BATCH_TASKS = 2000
MAX_BATCH_BYTES = 8 * 1024 * 1024
# How long the client keeps trying to reach a gateway that went away before its unfinished
# futures fail and new submissions are refused (a restart takes Ray's ~6 s start plus
# journal recovery); ``intertie.connect(unavailable_timeout=...)`` sets it per connection.
RECONNECT_TIMEOUT_S = 30.0
# close() waits this long for submissions still on their way to be acknowledged.
CLOSE_FLUSH_TIMEOUT_S = 30.0
# The largest message the client accepts; the gateway's own payload limit is lower.
MAX_MESSAGE_BYTES = 1 << 30

_SUCCEEDED = tasks_pb2.TASK_STATE_SUCCEEDED
_RUNNING = tasks_pb2.TASK_STATE_RUNNING
_CANCELLED = tasks_pb2.TASK_STATE_CANCELLED
_TERMINAL = (tasks_pb2.TASK_STATE_SUCCEEDED, tasks_pb2.TASK_STATE_FAILED, tasks_pb2.TASK_STATE_CANCELLED)


class _Pending:
    __slots__ = ("future", "spec", "function")

    def __init__(self, future: TaskFuture, spec: tasks_pb2.TaskSpec,
                 function: serialization.PickledFunction) -> None:
        self.future = future
        self.spec = spec
        self.function = function


class Session:
    """The stream to one gateway and the futures of the tasks sent on it (opening at once)."""

    def __init__(self, address: str, session_id: str, *, unavailable_timeout: float | None = None,
                 credentials: _rpc.Credentials | None = None) -> None:
        self.address = address
        self._credentials = credentials or _rpc.Credentials()
        self._metadata = self._credentials.metadata()  # sent when the stream opens (a tenant's token)
        self.session_id = session_id
        self.closed = False
        self.unavailable_timeout = RECONNECT_TIMEOUT_S if unavailable_timeout is None else unavailable_timeout
        # Set while the gateway is known down (unreachable for unavailable_timeout and not
        # back since): the error new submissions are refused with.
        self.down: errors.SiteUnavailableError | None = None
        # Set when the gateway refused this client's credentials (a revoked token, a tenant
        # its policy does not serve): no reconnect mends that; everything fails with it.
        self.refused: errors.IntertieError | None = None
        self._last_failure = ""  # why the stream last broke, for messages

        self._lock = threading.Lock()
        self._futures: dict[str, TaskFuture] = {}
        self._queue: deque[_Pending] = deque()  # submitted, not yet written to the stream
        self._flush_scheduled = False
        # Owned by the I/O loop: batches written and not yet acknowledged (resent after a
        # reconnect), and what the gateway has or is being sent of our functions.
        self._inflight: dict[int, list[_Pending]] = {}
        self._seq = 0
        self._shipped: set[str] = set()
        self._offered: set[str] = set()
        self._outgoing: asyncio.Queue[tasks_pb2.ClientMessage] | None = None
        self._connected = False
        self._session_task: asyncio.Task[None] | None = None

        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._io = threading.Thread(target=self._run_loop, name="intertie-io", daemon=True)
        self._io.start()
        self._session = asyncio.run_coroutine_threadsafe(self._session_loop(), self._loop)

    def _run_loop(self) -> None:
        mark_io_thread()  # futures hand their done callbacks off from this thread
        self._loop.run_forever()

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)  # whether the stream opened within the timeout

    # ------------------------------------------------------------------ futures
    def send(self, future: TaskFuture, spec: tasks_pb2.TaskSpec,
             function: serialization.PickledFunction) -> None:
        """Queues a task for the stream; ``future`` is resolved by its terminal event.
        Raises SiteUnavailableError at once while the gateway is known down."""
        pending = _Pending(future, spec, function)
        with self._lock:
            if self.refused is not None:
                raise type(self.refused)(str(self.refused))
            if self.down is not None:
                raise errors.SiteUnavailableError(f"{self.down} (new tasks are refused until it is back)")
            future._submitted = True
            self._futures[spec.task_id] = future
            self._queue.append(pending)
            if self._flush_scheduled:
                return  # the flush already scheduled takes this one too
            self._flush_scheduled = True
        self._loop.call_soon_threadsafe(self._flush)

    def track(self, future: TaskFuture) -> TaskFuture:
        """Resolves ``future`` from the events of a task the gateway already knows; the
        future already tracked for that task, if there is one, instead."""
        with self._lock:
            return self._futures.setdefault(future.task_id, future)

    @property
    def connected(self) -> bool:
        return self._connected

    def future_of(self, task_id: str) -> TaskFuture | None:
        with self._lock:
            return self._futures.get(task_id)

    def forget(self, task_id: str) -> None:
        with self._lock:
            self._futures.pop(task_id, None)

    def unqueue(self, future: TaskFuture) -> bool:
        """Takes back a task not yet written to the stream: it never reaches the gateway."""
        return bool(self.unqueue_many([future]))

    def unqueue_many(self, futures: Iterable[TaskFuture]) -> list[TaskFuture]:
        """Takes back those of ``futures`` not yet written to the stream; returns them."""
        wanted = {id(f) for f in futures}
        with self._lock:
            if not wanted or not self._queue:
                return []
            taken = [item.future for item in self._queue if id(item.future) in wanted]
            if taken:
                self._queue = deque(item for item in self._queue if id(item.future) not in wanted)
                for future in taken:
                    self._futures.pop(future.task_id, None)
        return taken

    def owned(self) -> list[TaskFuture]:
        """The unfinished futures of tasks this session submitted (not those it only follows)."""
        with self._lock:
            return [f for f in self._futures.values() if f._submitted and not f.done()]

    def wait_acked(self, task_ids: Sequence[str], timeout: float | None = None) -> None:
        """Read-your-writes: a call about a task this client submitted waits until the
        gateway has acknowledged it (submissions travel asynchronously)."""
        if self.down is not None:
            raise errors.SiteUnavailableError(str(self.down))
        # Within the time the gateway has to come back, and a little more for the ack.
        limit = self.unavailable_timeout + 10.0 if timeout is None else timeout
        deadline = time.monotonic() + limit
        for task_id in task_ids:
            with self._lock:
                future = self._futures.get(task_id)
            if future is not None and not future._acked.wait(max(0.0, deadline - time.monotonic())):
                raise errors.SiteUnavailableError(f"gateway {self.address} did not acknowledge task {task_id} "
                                                  f"within {limit:g} s")

    def fail_all(self, exc: errors.IntertieError) -> None:
        """Fails every unfinished future. What the gateway has not acknowledged is dropped,
        not sent on a later connection: a task whose future failed must not run."""
        with self._lock:
            futures = list(self._futures.values())
            self._futures.clear()
            self._queue.clear()
            self._flush_scheduled = False  # (one that waited for an ack that will not come: the next send flushes)
        self._inflight.clear()  # on the I/O loop, or after it stopped
        for future in futures:
            future._resolve(exc=exc)
            future._acked.set()

    # ------------------------------------------------------------------ the I/O loop
    def _take_batch(self) -> list[_Pending]:
        items: list[_Pending] = []
        size = 0
        digests: set[str] = set()
        while self._queue and len(items) < MAX_BATCH_TASKS:
            nxt = self._queue[0]
            n = nxt.spec.ByteSize()
            digest = nxt.function.digest
            if digest not in digests and digest not in self._shipped:  # it may travel with this batch
                n += len(nxt.function.payload)
            if items and size + n > MAX_BATCH_BYTES:
                break
            items.append(self._queue.popleft())
            digests.add(digest)
            size += n
        return items

    def _flush(self) -> None:
        """Moves what was submitted onto the stream, in batches, while fewer than
        MAX_INFLIGHT_BATCHES are unacknowledged (on the I/O loop); an ack flushes again."""
        while True:
            with self._lock:
                if len(self._inflight) >= MAX_INFLIGHT_BATCHES:
                    return  # (still scheduled: the next ack sends the rest)
                items = self._take_batch()
                if not items:
                    self._flush_scheduled = False
                    return
            self._seq += 1
            self._inflight[self._seq] = items
            if self._connected:
                self._write(self._seq, items)

    def _write(self, seq: int, items: list[_Pending]) -> None:
        functions = []
        for item in items:
            digest = item.function.digest
            if digest not in self._shipped and digest not in self._offered:
                self._offered.add(digest)
                functions.append(tasks_pb2.Function(digest=digest, payload=item.function.payload,
                                                    name=item.function.name))
        request = tasks_pb2.SubmitRequest(functions=functions, tasks=[i.spec for i in items],
                                          session_id=self.session_id)
        assert self._outgoing is not None
        self._outgoing.put_nowait(tasks_pb2.ClientMessage(submit=tasks_pb2.SubmitBatch(seq=seq, request=request)))

    async def _writer(self, call: Any, outgoing: asyncio.Queue[tasks_pb2.ClientMessage]) -> None:
        while True:
            await call.write(await outgoing.get())

    def unsent(self) -> list[tuple[str, str]]:
        """(task id, function name) of each task submitted and not yet acknowledged."""
        with self._lock:
            items = list(self._queue)
        for batch in list(self._inflight.values()):  # (read from another thread: a copy)
            items.extend(batch)
        return [(i.spec.task_id, i.spec.name) for i in items if not i.future.done()]

    def _on_ack(self, ack: tasks_pb2.SubmitAck) -> None:
        items = self._inflight.pop(ack.seq, None)
        if items is None:
            return  # a batch resent after a reconnect, acknowledged twice
        if self._flush_scheduled and len(self._inflight) < MAX_INFLIGHT_BATCHES:
            self._loop.call_soon(self._flush)  # what waited for room goes now
        for item in items:
            self._shipped.add(item.function.digest)
        refused = {a.task_id: a.error for a in ack.acks if not a.accepted}
        for item in items:
            error = refused.get(item.spec.task_id)
            if error is not None:
                self.forget(item.spec.task_id)
                item.future._resolve(exc=error_from_wire(error))
            item.future._acked.set()

    async def _session_loop(self) -> None:
        import grpc.aio

        self._session_task = asyncio.current_task()
        channel = self._credentials.aio_channel(self.address, _rpc.channel_options(MAX_MESSAGE_BYTES))
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        backoff = 0.05
        lost_at: float | None = None
        try:
            while not self.closed:
                call = stub.Connect(metadata=self._metadata or None)
                writer: asyncio.Task[None] | None = None
                try:
                    # progress: RUNNING events too, so that futures know when they are running().
                    await call.write(tasks_pb2.ClientMessage(open=tasks_pb2.WatchRequest(
                        session_id=self.session_id, progress=True)))
                    opened = await call.read()
                    if opened is grpc.aio.EOF:
                        raise ConnectionError("the gateway closed the session stream")
                    if lost_at is not None:  # a reconnect: the gateway may have restarted
                        await self._resubscribe(stub)  # if it fails, reconnect and ask again
                    # Healthy again once the gateway answers with something, or nothing is owed:
                    # a batch it fails on every time must not reconnect at full speed forever.
                    if not self._inflight:
                        lost_at, backoff = None, 0.05
                    if self.down is not None:
                        logger.warning("gateway %s is reachable again", self.address)
                    self.down = None
                    outgoing: asyncio.Queue[tasks_pb2.ClientMessage] = asyncio.Queue()
                    self._outgoing = outgoing
                    self._shipped.clear()
                    self._offered.clear()
                    self._connected = True
                    for seq in sorted(self._inflight):  # unacknowledged: resend (idempotent)
                        self._write(seq, self._inflight[seq])
                    self._flush()  # and what waited for room, if there is room
                    writer = asyncio.create_task(self._writer(call, outgoing))
                    self._ready.set()
                    while True:
                        message = await call.read()
                        if message is grpc.aio.EOF:
                            break
                        lost_at, backoff = None, 0.05
                        if message.HasField("ack"):
                            self._on_ack(message.ack)
                        else:
                            self._on_events(message.events.events)
                except grpc.RpcError as exc:
                    if self.closed:
                        return
                    if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                        self._refuse(_rpc.translate(exc, self.address))
                        return
                    if not _rpc.is_retryable(exc):
                        self._fail_inflight(_rpc.translate(exc, self.address))
                    self._last_failure = _rpc.unreachable_cause(exc, self.address, tls=self._credentials.tls_ca is not None)
                    logger.info("session stream to %s broke (%s); reconnecting", self.address,
                                exc.code() if hasattr(exc, "code") else exc)
                except (ConnectionError, OSError) as exc:
                    self._last_failure = str(exc)
                    logger.info("session stream to %s: %s; reconnecting", self.address, exc)
                finally:
                    self._connected = False
                    if writer is not None:
                        writer.cancel()
                    call.cancel()
                if self.closed:
                    return
                now = time.monotonic()
                if lost_at is None:
                    lost_at = now
                elif now - lost_at > self.unavailable_timeout and self.down is None:
                    # Known down: what waits fails now, and new submissions fail at once
                    # until the stream opens again (it keeps being tried).
                    with self._lock:
                        self.down = errors.SiteUnavailableError(
                            f"gateway {self.address} unreachable for {now - lost_at:.0f} s "
                            f"({self._last_failure or 'no answer'}; unavailable_timeout={self.unavailable_timeout:g} s)")
                    logger.warning("%s", self.down)
                    self.fail_all(self.down)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
        finally:
            await channel.close()

    def _refuse(self, error: errors.IntertieError) -> None:
        """The gateway refused the session for its credentials: what waits fails with that,
        new submissions too, and ``wait_ready`` returns (the client raises it)."""
        logger.warning("gateway %s refused the session: %s", self.address, error)
        with self._lock:
            self.refused = error
        self._fail_inflight(error)
        self.fail_all(error)
        self._ready.set()

    def _fail_inflight(self, error: errors.IntertieError) -> None:
        batches, self._inflight = list(self._inflight.values()), {}
        for items in batches:
            for item in items:
                self.forget(item.spec.task_id)
                item.future._resolve(exc=error)
                item.future._acked.set()

    def _on_events(self, events: Iterable[tasks_pb2.TaskEvent]) -> None:
        for event in events:
            if event.state not in _TERMINAL:
                if event.state == _RUNNING:
                    with self._lock:
                        running = self._futures.get(event.task_id)
                    if running is not None:
                        running._set_running()
                continue
            with self._lock:
                future = self._futures.pop(event.task_id, None)
            if future is None:
                continue
            future.site = event.site or None
            future.attempts = event.attempt
            if event.state == _CANCELLED:
                future._set_cancelled()
            elif event.state == _SUCCEEDED:
                try:
                    value = serialization.loads_result(event.result)
                except errors.SerializationError as exc:
                    future._resolve(exc=exc)
                else:
                    future._resolve(value)
            else:
                future._resolve(exc=error_from_wire(event.error))

    async def _resubscribe(self, stub: Any) -> None:
        with self._lock:
            ids = list(self._futures)
        for start in range(0, len(ids), 10_000):
            chunk = ids[start:start + 10_000]
            try:
                await stub.Subscribe(tasks_pb2.SubscribeRequest(session_id=self.session_id, task_ids=chunk), timeout=30)
            except grpc.RpcError as exc:
                # Their events while the stream was down are lost unless asked for again.
                logger.warning("resubscribing to %d tasks at %s failed: %s", len(chunk), self.address, exc)
                raise
            # Ids unknown there were never journaled: their batch was not acknowledged and
            # is resent from _inflight.

    # ------------------------------------------------------------------ closing
    def drain(self, timeout: float = CLOSE_FLUSH_TIMEOUT_S, *, through_outage: bool = False) -> bool:
        """Waits for what was submitted to be sent and acknowledged; True if it was. Not
        while the gateway is unreachable (that would fail anyway), unless ``through_outage``:
        then until it is known down (or the timeout)."""
        deadline = time.monotonic() + timeout
        while self._queue or self._inflight:
            if time.monotonic() >= deadline or self.down is not None or self.closed:
                return False
            if not self._connected and not through_outage:
                return False
            time.sleep(0.005)
        return True

    def close(self) -> None:
        """Stops the stream and the I/O thread; unfinished futures stay as they are
        (:meth:`fail_all` fails them)."""
        self.closed = True
        try:
            asyncio.run_coroutine_threadsafe(self._stop_session(), self._loop).result(timeout=10)
        except Exception as exc:
            logger.debug("stopping the session stream: %s", exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._io.join(timeout=5)
        if not self._io.is_alive():
            self._loop.close()

    async def _stop_session(self) -> None:
        task = self._session_task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        # gRPC's own tasks for the cancelled call finish within a turn or two.
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if others:
            await asyncio.wait(others, timeout=1.0)
