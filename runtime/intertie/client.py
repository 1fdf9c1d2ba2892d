"""The client's connection to its home gateway: submit, watch, cancel, inspect."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grpc

from intertie import _rpc, _submitter, errors, serialization
from intertie._wire import error_from_wire
from intertie.datasets import DatasetClient, DatasetRef, refs_in
from intertie.futures import TaskFuture
from intertie.spec import PlacementInfo, Quote, SiteStatus, TaskInfo, TaskOptions, python_version
from intertie.v1 import common_pb2, site_pb2, site_pb2_grpc, tasks_pb2, tasks_pb2_grpc

logger = logging.getLogger(__name__)

# A batch is sent as soon as the previous Submit returns; these bound one batch so a
# burst of tiny tasks costs few RPCs while one RPC never grows past a few MiB.
MAX_BATCH_TASKS = 2000
MAX_BATCH_BYTES = 8 * 1024 * 1024
# How long the client keeps trying to reach a gateway that went away (a restart
# takes Ray's ~6 s start plus journal recovery) before futures fail.
RECONNECT_TIMEOUT_S = 120.0
# Time a new connection waits for the gateway to answer at all.
CONNECT_TIMEOUT_S = 30.0
# close() waits this long for submissions still on their way to be acknowledged.
CLOSE_FLUSH_TIMEOUT_S = 30.0
# The largest message the client accepts; the gateway's own payload limit is lower.
MAX_MESSAGE_BYTES = 1 << 30

_SUCCEEDED = tasks_pb2.TASK_STATE_SUCCEEDED
_CANCELLED = tasks_pb2.TASK_STATE_CANCELLED
_TERMINAL = (tasks_pb2.TASK_STATE_SUCCEEDED, tasks_pb2.TASK_STATE_FAILED, tasks_pb2.TASK_STATE_CANCELLED)

def current() -> Federation:
    """The federation that ``f.submit()`` uses: the most recently connected one still open."""
    return _submitter.current()  # type: ignore[return-value]


class _Pending:
    __slots__ = ("future", "spec", "function")

    def __init__(self, future: TaskFuture, spec: tasks_pb2.TaskSpec,
                 function: serialization.PickledFunction) -> None:
        self.future = future
        self.spec = spec
        self.function = function


class Federation:
    """A connection to the federation through one home gateway.

    Use :func:`intertie.connect` rather than building this directly.
    """

    def __init__(self, address: str, *, on_close: Callable[[], None] | None = None,
                 connect_timeout: float = CONNECT_TIMEOUT_S) -> None:
        self.address = address
        self.session_id = uuid.uuid4().hex
        self.closed = False
        self._on_close = on_close
        # The payload limit is learnt from the gateway; until then allow the default.
        self._channel = grpc.insecure_channel(address, options=_rpc.channel_options(MAX_MESSAGE_BYTES))
        self._tasks = tasks_pb2_grpc.TaskServiceStub(self._channel)
        self._site = site_pb2_grpc.SiteServiceStub(self._channel)
        try:
            status = self._site.GetStatus(site_pb2.GetStatusRequest(), timeout=connect_timeout,
                                          wait_for_ready=True)
        except grpc.RpcError as exc:
            self._channel.close()
            raise _rpc.translate(exc, address) from None
        self.site_id = status.site_id
        self.max_payload_bytes = status.max_payload_bytes or (100 << 20)
        self._data = DatasetClient(self._flight_for)

        self._lock = threading.Lock()
        self._futures: dict[str, TaskFuture] = {}
        self._queue: deque[_Pending] = deque()  # submitted, not yet written to the stream
        self._flush_scheduled = False
        self._py = python_version()
        # Owned by the I/O loop: batches written and not yet acknowledged (resent after a
        # reconnect), and what the gateway has or is being sent of our functions.
        self._inflight: dict[int, list[_Pending]] = {}
        self._seq = 0
        self._shipped: set[str] = set()
        self._offered: set[str] = set()
        self._outgoing: asyncio.Queue[tasks_pb2.ClientMessage] | None = None
        self._connected = False
        self._session_task: asyncio.Task[None] | None = None

        # Submissions and results travel on one bidirectional stream, driven by an asyncio
        # loop on its own thread: a message on an open stream costs far less than a call.
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._io = threading.Thread(target=self._loop.run_forever, name="intertie-io", daemon=True)
        self._io.start()
        self._session = asyncio.run_coroutine_threadsafe(self._session_loop(), self._loop)
        if not self._ready.wait(connect_timeout):
            self.close()
            raise errors.SiteUnavailableError(f"gateway {address} did not open the session stream")
        _submitter.opened(self)

    # ------------------------------------------------------------------ submit
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskFuture:
        """Runs ``fn(*args, **kwargs)`` somewhere in the federation; returns its future."""
        from intertie.remote import RemoteFunction

        if isinstance(fn, RemoteFunction):
            return fn.submit_to(self, args, kwargs)
        return self._submit(serialization.pickle_function(fn), TaskOptions(),
                            serialization.dumps_call(args, kwargs), batch=False, inputs=refs_in(args, kwargs))

    def _submit(self, function: serialization.PickledFunction, options: TaskOptions, args: bytes,
                *, batch: bool, resources: common_pb2.ResourceRequest | None = None,
                constraints: common_pb2.Constraints | None = None,
                inputs: Sequence[DatasetRef] = ()) -> TaskFuture:
        if self.closed:
            raise errors.IntertieError("this connection is closed")
        task_id = uuid.uuid4().hex
        future = TaskFuture(task_id, self)
        if len(args) > self.max_payload_bytes or len(function.payload) > self.max_payload_bytes:
            what = "arguments" if len(args) > self.max_payload_bytes else "function"
            size = max(len(args), len(function.payload))
            future._resolve(exc=errors.PayloadTooLargeError(
                f"task {task_id}: {what} are {size} bytes, over the gateway's limit of "
                f"{self.max_payload_bytes} bytes"))
            return future
        spec = tasks_pb2.TaskSpec(
            task_id=task_id, function_digest=function.digest, args=args,
            resources=resources if resources is not None else options.resources.to_proto(),
            max_retries=options.max_retries, timeout_s=options.timeout or 0.0, batch=batch,
            python_version=self._py, name=options.name or function.name,
            returns_dataset=options.returns == "dataset")
        if constraints is None and (options.accelerator or options.arch or options.site or options.labels):
            constraints = options.constraints()
        if constraints is not None:
            spec.constraints.CopyFrom(constraints)
        for ref in inputs:
            spec.inputs.add(id=ref.id, site=ref.site, num_bytes=ref.num_bytes)
        pending = _Pending(future, spec, function)
        with self._lock:
            self._futures[task_id] = future
            self._queue.append(pending)
            if self._flush_scheduled:
                return future  # the flush already scheduled takes this one too
            self._flush_scheduled = True
        self._loop.call_soon_threadsafe(self._flush)
        return future

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
        """Moves everything submitted so far onto the stream, in batches (on the I/O loop)."""
        while True:
            with self._lock:
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

    def _on_ack(self, ack: tasks_pb2.SubmitAck) -> None:
        items = self._inflight.pop(ack.seq, None)
        if items is None:
            return  # a batch resent after a reconnect, acknowledged twice
        for item in items:
            self._shipped.add(item.function.digest)
        refused = {a.task_id: a.error for a in ack.acks if not a.accepted}
        for item in items:
            error = refused.get(item.spec.task_id)
            if error is not None:
                self._forget(item.spec.task_id)
                item.future._resolve(exc=error_from_wire(error))
            item.future._acked.set()

    async def _session_loop(self) -> None:
        import grpc.aio

        self._session_task = asyncio.current_task()
        channel = grpc.aio.insecure_channel(self.address, options=_rpc.channel_options(MAX_MESSAGE_BYTES))
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        backoff = 0.05
        lost_at: float | None = None
        try:
            while not self.closed:
                call = stub.Connect()
                writer: asyncio.Task[None] | None = None
                try:
                    await call.write(tasks_pb2.ClientMessage(open=tasks_pb2.WatchRequest(session_id=self.session_id)))
                    opened = await call.read()
                    if opened is grpc.aio.EOF:
                        raise ConnectionError("the gateway closed the session stream")
                    if lost_at is not None:  # a reconnect: the gateway may have restarted
                        await self._resubscribe(stub)  # if it fails, reconnect and ask again
                    # Healthy again once the gateway answers with something, or nothing is owed:
                    # a batch it fails on every time must not reconnect at full speed forever.
                    if not self._inflight:
                        lost_at, backoff = None, 0.05
                    outgoing: asyncio.Queue[tasks_pb2.ClientMessage] = asyncio.Queue()
                    self._outgoing = outgoing
                    self._shipped.clear()
                    self._offered.clear()
                    self._connected = True
                    for seq in sorted(self._inflight):  # unacknowledged: resend (idempotent)
                        self._write(seq, self._inflight[seq])
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
                    if not _rpc.is_retryable(exc):
                        self._fail_inflight(_rpc.translate(exc, self.address))
                    logger.info("session stream to %s broke (%s); reconnecting", self.address,
                                exc.code() if hasattr(exc, "code") else exc)
                except (ConnectionError, OSError) as exc:
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
                elif now - lost_at > RECONNECT_TIMEOUT_S:
                    self._fail_all(errors.SiteUnavailableError(
                        f"gateway {self.address} unreachable for {RECONNECT_TIMEOUT_S:.0f} s"))
                    lost_at = now
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
        finally:
            await channel.close()

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

    def _fail_inflight(self, error: errors.IntertieError) -> None:
        batches, self._inflight = list(self._inflight.values()), {}
        for items in batches:
            for item in items:
                self._forget(item.spec.task_id)
                item.future._resolve(exc=error)
                item.future._acked.set()

    def _forget(self, task_id: str) -> None:
        with self._lock:
            self._futures.pop(task_id, None)

    # ------------------------------------------------------------------ results
    def _on_events(self, events: Iterable[tasks_pb2.TaskEvent]) -> None:
        for event in events:
            if event.state not in _TERMINAL:
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

    def _fail_all(self, exc: errors.IntertieError) -> None:
        """Fails every unfinished future. What the gateway has not acknowledged is dropped,
        not sent on a later connection: a task whose future failed must not run."""
        with self._lock:
            futures = list(self._futures.values())
            self._futures.clear()
            self._queue.clear()
        self._inflight.clear()  # on the I/O loop, or after it stopped
        for future in futures:
            future._resolve(exc=exc)
            future._acked.set()

    # ------------------------------------------------------------------ other calls
    @_rpc.translated
    def future(self, task_id: str) -> TaskFuture:
        """A future for a task submitted earlier, possibly by another client or before a restart."""
        if not isinstance(task_id, str) or not task_id:
            raise errors.InvalidRequestError("task_id must be a non-empty string")
        with self._lock:
            existing = self._futures.get(task_id)
            if existing is not None:
                return existing
            future = TaskFuture(task_id, self)
            future._acked.set()  # the gateway knows it already
            self._futures[task_id] = future
        try:
            resp = self._tasks.Subscribe(tasks_pb2.SubscribeRequest(
                session_id=self.session_id, task_ids=[task_id]), timeout=30)
        except BaseException:
            self._forget(task_id)
            raise
        if task_id in resp.unknown_task_ids:
            self._forget(task_id)
            raise errors.TaskNotFoundError(f"gateway {self.address} knows no task {task_id!r}")
        return future

    def _cancel_task(self, future: TaskFuture) -> bool:
        task_id = future.task_id
        with self._lock:
            for item in self._queue:
                if item.future is future:  # not sent yet: never reaches the gateway
                    self._queue.remove(item)
                    self._futures.pop(task_id, None)
                    return True
        self._wait_acked([task_id])
        try:
            resp = self._tasks.Cancel(tasks_pb2.CancelRequest(task_ids=[task_id]), timeout=30)
        except grpc.RpcError as exc:
            raise _rpc.translate(exc, self.address) from None
        return task_id in resp.cancelled

    def _wait_acked(self, task_ids: Sequence[str]) -> None:
        """Read-your-writes: a call about a task this client submitted waits until the
        gateway has acknowledged it (submissions travel asynchronously)."""
        deadline = time.monotonic() + RECONNECT_TIMEOUT_S
        for task_id in task_ids:
            with self._lock:
                future = self._futures.get(task_id)
            if future is not None and not future._acked.wait(max(0.0, deadline - time.monotonic())):
                raise errors.SiteUnavailableError(f"gateway {self.address} did not acknowledge task {task_id}")

    @_rpc.translated
    def cancel(self, task_ids: Sequence[str]) -> list[str]:
        """Cancels tasks by id; returns the ids that were still queued or running."""
        self._wait_acked(task_ids)
        resp = self._tasks.Cancel(tasks_pb2.CancelRequest(task_ids=list(task_ids)), timeout=30)
        return list(resp.cancelled)

    @_rpc.translated
    def task(self, task_id: str) -> TaskInfo:
        """What the gateway knows of one task: state, site, attempts, error."""
        self._wait_acked([task_id])
        return TaskInfo.from_proto(self._tasks.GetTask(tasks_pb2.GetTaskRequest(task_id=task_id),
                                                       timeout=30))

    @_rpc.translated
    def sites(self) -> list[SiteStatus]:
        """The federation as the home gateway sees it: the home site first, then its peers."""
        catalogue = self._site.ListSites(site_pb2.ListSitesRequest(), timeout=30)
        return [SiteStatus.from_proto(s) for s in catalogue.sites]

    @_rpc.translated
    def quote(self, fn: Callable[..., Any], /, *args: Any, **options: Any) -> Quote:
        """Ranks the sites that could run ``fn(*args)`` with the given task options
        (``cpus=``, ``accelerator=``, ``site=``, ...), best first, without running it.

        Each entry has the estimated start (queue wait + transfer), run time, price and
        carbon. ``f.submit(*args, quote=q)`` or ``f.options(site=q[0].site)`` commits."""
        from intertie.remote import RemoteFunction, make_options

        if isinstance(fn, RemoteFunction):
            opts = fn.task_options.replace(**options) if options else fn.task_options
            fn = fn.function
        else:
            opts = make_options(**options)
        function = serialization.pickle_function(fn)
        args_bytes = len(serialization.dumps_call(args, {}))
        spec = tasks_pb2.TaskSpec(task_id="quote", function_digest=function.digest,
                                  resources=opts.resources.to_proto(), constraints=opts.constraints(),
                                  python_version=self._py, name=opts.name or function.name)
        placement = self._tasks.Quote(tasks_pb2.QuoteRequest(task=spec, args_bytes=args_bytes), timeout=30)
        return Quote(PlacementInfo.from_proto(placement))

    # ------------------------------------------------------------------ datasets
    def _flight_for(self, site: str | None) -> tuple[str, str]:
        if site is None or site == self.site_id:
            # Asked each time (one small call per dataset operation): a restarted gateway
            # may serve its datasets on another port.
            status = self._site.GetStatus(site_pb2.GetStatusRequest(), timeout=30)
            return self.site_id, status.flight_address
        for status in self.sites():
            if status.site_id == site:
                if status.state != "up":
                    raise errors.SiteUnavailableError(f"site {site!r} is {status.state}")
                return site, status.flight_address
        raise errors.PlacementError(f"no site {site!r} in the federation of {self.site_id}")

    @_rpc.translated
    def put_dataset(self, data: Any, name: str | None = None, site: str | None = None, *,
                    progress: Callable[[int, int], None] | None = None) -> DatasetRef:
        """Stores ``data`` at a site (default: the home) and returns its :class:`DatasetRef`.

        ``data`` is a ``pyarrow.Table``, a ``RecordBatchReader``, or a path/fsspec URL of
        Parquet, Arrow IPC or CSV; it is streamed in record batches (``progress(rows, bytes)``
        is called after each)."""
        return self._data.put(data, name, site, progress)

    @_rpc.translated
    def get_dataset(self, ref: DatasetRef | str, *, site: str | None = None,
                    progress: Callable[[int, int], None] | None = None) -> Any:
        """The dataset as a ``pyarrow.Table``; ``ref`` is a DatasetRef, an id or a name."""
        return self._data.get(ref, site, progress)

    @_rpc.translated
    def datasets(self, site: str | None = None) -> list[DatasetRef]:
        """The datasets at a site (default: the home)."""
        return self._data.list(site)

    @_rpc.translated
    def dataset(self, ref: DatasetRef | str, *, site: str | None = None) -> DatasetRef:
        """A dataset's ref by id or name."""
        return self._data.action("get", ref, site)

    @_rpc.translated
    def delete_dataset(self, ref: DatasetRef | str, *, site: str | None = None) -> DatasetRef:
        return self._data.action("delete", ref, site)

    def executor(self, max_workers: int | None = None) -> Any:
        """A ``concurrent.futures.Executor`` whose ``map`` batches fine-grained work."""
        from intertie.executor import FederationExecutor

        return FederationExecutor(self)

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Closes the connection (and stops an embedded gateway). Pending futures fail."""
        if self.closed:
            return
        # Submissions already handed to us are sent and acknowledged before the channel goes
        # (not waited for while the gateway is unreachable: they fail below).
        deadline = time.monotonic() + CLOSE_FLUSH_TIMEOUT_S
        while (self._queue or self._inflight) and self._connected and time.monotonic() < deadline:
            time.sleep(0.005)
        self.closed = True
        _submitter.closed(self)
        try:
            asyncio.run_coroutine_threadsafe(self._stop_session(), self._loop).result(timeout=10)
        except Exception as exc:
            logger.debug("stopping the session stream: %s", exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._io.join(timeout=5)
        self._data.close()
        if not self._io.is_alive():
            self._loop.close()
        self._channel.close()
        self._fail_all(errors.IntertieError("the connection was closed before the task finished"))
        if self._on_close is not None:
            self._on_close()

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Federation {self.site_id}@{self.address}{' closed' if self.closed else ''}>"

