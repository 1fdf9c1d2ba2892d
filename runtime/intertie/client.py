"""The client's connection to its home gateway: submit, watch, cancel, inspect.

:class:`Federation` is the user's facade; the session stream that carries submissions
and results is :mod:`intertie._session`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from intertie import _rpc, _submitter, errors, serialization
from intertie._session import MAX_MESSAGE_BYTES, Session
from intertie.datasets import DatasetClient, DatasetRef, refs_in
from intertie.futures import TaskFuture
from intertie.spec import PlacementInfo, Quote, SiteStatus, TaskInfo, TaskOptions, python_version
from intertie.v1 import common_pb2, site_pb2, site_pb2_grpc, tasks_pb2, tasks_pb2_grpc

# Time a new connection waits for the gateway to answer at all.
CONNECT_TIMEOUT_S = 30.0


def current() -> Federation:
    """The federation that ``f.submit()`` uses: the most recently connected one still open."""
    return _submitter.current()  # type: ignore[return-value]


class Federation:
    """A connection to the federation through one home gateway.

    Use :func:`intertie.connect` rather than building this directly. Submissions and
    results travel on its :class:`~intertie._session.Session`; the other calls are unary.
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
        self._py = python_version()
        self._session = Session(address, self.session_id)
        if not self._session.wait_ready(connect_timeout):
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
        self._session.send(future, spec, function)
        return future

    # ------------------------------------------------------------------ other calls
    @_rpc.translated
    def future(self, task_id: str) -> TaskFuture:
        """A future for a task submitted earlier, possibly by another client or before a restart."""
        if not isinstance(task_id, str) or not task_id:
            raise errors.InvalidRequestError("task_id must be a non-empty string")
        future = TaskFuture(task_id, self)
        future._acked.set()  # the gateway knows it already
        existing = self._session.track(future)
        if existing is not future:
            return existing
        try:
            resp = self._tasks.Subscribe(tasks_pb2.SubscribeRequest(
                session_id=self.session_id, task_ids=[task_id]), timeout=30)
        except BaseException:
            self._session.forget(task_id)
            raise
        if task_id in resp.unknown_task_ids:
            self._session.forget(task_id)
            raise errors.TaskNotFoundError(f"gateway {self.address} knows no task {task_id!r}")
        return future

    def _cancel_task(self, future: TaskFuture) -> bool:
        task_id = future.task_id
        if self._session.unqueue(future):  # not sent yet: never reaches the gateway
            return True
        self._session.wait_acked([task_id])
        try:
            resp = self._tasks.Cancel(tasks_pb2.CancelRequest(task_ids=[task_id]), timeout=30)
        except grpc.RpcError as exc:
            raise _rpc.translate(exc, self.address) from None
        return task_id in resp.cancelled

    @_rpc.translated
    def cancel(self, task_ids: Sequence[str]) -> list[str]:
        """Cancels tasks by id; returns the ids that were still queued or running."""
        self._session.wait_acked(task_ids)
        resp = self._tasks.Cancel(tasks_pb2.CancelRequest(task_ids=list(task_ids)), timeout=30)
        return list(resp.cancelled)

    @_rpc.translated
    def task(self, task_id: str) -> TaskInfo:
        """What the gateway knows of one task: state, site, attempts, error."""
        self._session.wait_acked([task_id])
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
        self._session.drain()
        self.closed = True
        _submitter.closed(self)
        self._session.close()
        self._data.close()
        self._channel.close()
        self._session.fail_all(errors.IntertieError("the connection was closed before the task finished"))
        if self._on_close is not None:
            self._on_close()

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Federation {self.site_id}@{self.address}{' closed' if self.closed else ''}>"

