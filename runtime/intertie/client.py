"""The client's connection to its home gateway: submit, watch, cancel, inspect.

:class:`Federation` is the user's facade; the session stream that carries submissions
and results is :mod:`intertie._session`.
"""

from __future__ import annotations

import atexit
import logging
import os
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import grpc

from intertie import _rpc, _submitter, errors, serialization
from intertie import usage as _usage
from intertie._session import MAX_MESSAGE_BYTES, Session
from intertie.datasets import DatasetClient, DatasetRef, refs_in
from intertie.display import Listing
from intertie.futures import TaskFuture
from intertie.spec import PlacementInfo, Quote, SiteStatus, TaskInfo, TaskOptions, python_version
from intertie.v1 import common_pb2, site_pb2, site_pb2_grpc, tasks_pb2, tasks_pb2_grpc

logger = logging.getLogger("intertie.client")

# Time a new connection waits for a gateway that accepts the connection to answer (a refused
# connection or an unknown host fails within _rpc.REFUSED_RETRY_S, with the cause).
CONNECT_TIMEOUT_S = 30.0
# At exit, submissions not yet acknowledged are sent for at most this long.
EXIT_FLUSH_TIMEOUT_S = 10.0
# Cancelling after Ctrl-C, or on close(), waits this long for the gateway at most.
CANCEL_TIMEOUT_S = 10.0
# Task ids per Cancel call (the gateway takes up to 100,000).
CANCEL_CHUNK = 10_000


def connect(address: str | Any | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None,
            state_dir: str | None = None, **kwargs: Any) -> Federation:
    """What :func:`intertie.connect` does: ``address``, else ``INTERTIE_ADDRESS``, else an
    embedded local site (reused while an earlier connection to it is open). An empty
    address, or an ``INTERTIE_ADDRESS`` set to nothing, is an error, never the embedded site."""
    if address is None:
        env = os.environ.get("INTERTIE_ADDRESS")
        if env is not None:
            if not env.strip():
                raise errors.InvalidRequestError(
                    "INTERTIE_ADDRESS is set but empty: set it to the gateway's \"host:port\", or unset "
                    "it for an embedded local site")
            address = env
    if address is not None and not isinstance(address, str) and hasattr(address, "address"):
        # A local site or federation this program started (intertie.embedded): its address,
        # token and CA, unless given.
        kwargs.setdefault("token", address.token or "")  # ("": none, whatever the environment says)
        kwargs.setdefault("tls_ca", address.tls_ca or "")
        address = address.address
    if address is not None:
        return Federation(address, **kwargs)
    from intertie import embedded

    gateway = embedded.acquire(num_cpus=num_cpus, num_gpus=num_gpus, state_dir=state_dir)
    try:
        kwargs.setdefault("token", gateway.token)  # the embedded site's own tenant, "local"
        kwargs.setdefault("tls_ca", "")  # it serves plaintext on loopback
        return Federation(gateway.address, on_close=gateway.release, **kwargs)
    except BaseException:
        gateway.release()
        raise


def current() -> Federation:
    """The federation that ``f.submit()`` uses: the most recently connected one still open."""
    return _submitter.current()  # type: ignore[return-value]


class Federation:
    """A connection to the federation through one home gateway.

    Use :func:`intertie.connect` rather than building this directly. Submissions and
    results travel on its :class:`~intertie._session.Session`; the other calls are unary.

    ``connect_timeout``: how long a gateway that accepts the connection has to answer (a
    refused connection or an unknown host fails within seconds, saying which).
    ``unavailable_timeout``: how long the home may stay unreachable before the futures
    waiting on it fail with SiteUnavailableError; from then until it is back, new submissions
    fail at once. ``cancel_on_interrupt``: Ctrl-C while waiting on this client's futures
    (``result()``, ``wait()``, ``as_completed()``) cancels the unfinished tasks waited for;
    False leaves them running and says so.

    The connection owns the tasks it submits: :meth:`close` cancels those unfinished
    unless ``close(cancel=False)``.
    """

    def __init__(self, address: str, *, on_close: Callable[[], None] | None = None,
                 connect_timeout: float = CONNECT_TIMEOUT_S, unavailable_timeout: float | None = None,
                 cancel_on_interrupt: bool = True, token: str | None = None,
                 tls_ca: str | os.PathLike[str] | bytes | None = None) -> None:
        address = _rpc.check_address(address)
        # A tenant's token (else INTERTIE_TOKEN), and the CA of a gateway serving TLS (else
        # INTERTIE_TLS_CA): checked for form here, by the gateway at the first call.
        self.credentials = _rpc.Credentials.resolve(token, tls_ca)
        if self.credentials.token and self.credentials.tls_ca is None and not _rpc.is_loopback(address):
            logger.warning("sending a token to %s without TLS: it crosses the network in the clear (connect with "
                           "tls_ca= or INTERTIE_TLS_CA to a gateway that serves TLS)", address)
        if unavailable_timeout is not None and not unavailable_timeout > 0:
            raise errors.InvalidRequestError(f"unavailable_timeout must be > 0 seconds, got {unavailable_timeout!r}")
        self.address = address
        self.session_id = uuid.uuid4().hex
        self.closed = False
        self._on_close = on_close
        self._cancel_on_interrupt = cancel_on_interrupt
        # The payload limit is learnt from the gateway; until then allow the default.
        self._channel = self.credentials.channel(address, _rpc.channel_options(MAX_MESSAGE_BYTES))
        self._tasks = tasks_pb2_grpc.TaskServiceStub(self._channel)
        self._site = site_pb2_grpc.SiteServiceStub(self._channel)
        try:
            status = _rpc.first_contact(
                lambda timeout: self._site.GetStatus(site_pb2.GetStatusRequest(), timeout=timeout),
                address, connect_timeout, tls=self.credentials.tls_ca is not None)
        except BaseException:
            self._channel.close()
            raise
        self.site_id = status.site_id
        self.max_payload_bytes = status.max_payload_bytes or (100 << 20)
        self._data = DatasetClient(self._flight_for, self.credentials)
        self._py = python_version()
        self._session = Session(address, self.session_id, unavailable_timeout=unavailable_timeout,
                                credentials=self.credentials)
        if not self._session.wait_ready(connect_timeout) or self._session.refused is not None:
            refused = self._session.refused
            self.close()
            if refused is not None:  # e.g. its token revoked between the first call and the stream
                raise refused
            raise errors.SiteUnavailableError(f"gateway {address} did not open the session stream")
        _submitter.opened(self)
        # Registered after an embedded gateway's own stop (atexit runs last-in first-out):
        # what was submitted is sent before the site or the process goes.
        atexit.register(self._at_exit)

    @property
    def unavailable_timeout(self) -> float:
        return self._session.unavailable_timeout

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
            raise errors.IntertieError(f"submit(): the connection to {self.address} is closed "
                                       f"(intertie.connect() opens a new one)")
        if len(args) > self.max_payload_bytes or len(function.payload) > self.max_payload_bytes:
            # Refused here, not at result(): the gateway would refuse it anyway.
            if len(args) > self.max_payload_bytes:
                what = f"the arguments of {function.name} are {_mib(len(args))}"
            else:
                what = f"the function {function.name} is {_mib(len(function.payload))} (with what it refers to)"
            raise errors.PayloadTooLargeError(
                f"{what} pickled, over the gateway's limit of {_mib(self.max_payload_bytes)} "
                f"({self.site_id} at {self.address}): pass a dataset (fed.put_dataset) or a path instead")
        task_id = uuid.uuid4().hex
        future = TaskFuture(task_id, self)
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
        if self.closed:
            return False
        self._session.wait_acked([task_id])
        try:
            resp = self._tasks.Cancel(tasks_pb2.CancelRequest(task_ids=[task_id]), timeout=30)
        except grpc.RpcError as exc:
            raise _rpc.translate(exc, self.address) from None
        return task_id in resp.cancelled

    @_rpc.translated
    def cancel(self, task_ids: Sequence[str]) -> list[str]:
        """Cancels tasks by id, whoever submitted them; returns the ids that were still
        queued or running (their futures here, if any, end cancelled at once)."""
        if isinstance(task_ids, str):
            raise errors.InvalidRequestError("cancel() takes a list of task ids, not one string")
        self._session.wait_acked(task_ids)
        return self._cancel_ids(list(task_ids), timeout=30)

    def _cancel_ids(self, task_ids: list[str], timeout: float) -> list[str]:
        cancelled: list[str] = []
        for start in range(0, len(task_ids), CANCEL_CHUNK):
            try:
                resp = self._tasks.Cancel(tasks_pb2.CancelRequest(task_ids=task_ids[start:start + CANCEL_CHUNK]),
                                          timeout=timeout)
            except grpc.RpcError as exc:
                raise _rpc.translate(exc, self.address) from None
            cancelled.extend(resp.cancelled)
        for task_id in cancelled:
            future = self._session.future_of(task_id)
            if future is not None:
                self._session.forget(task_id)
                future._set_cancelled()
        return cancelled

    @_rpc.translated
    def cancel_all(self, *, tenant: bool = False) -> list[str]:
        """Cancels every unfinished task this client submitted, queued or running (tasks it
        only follows through :meth:`future` are left alone); returns their ids. Their futures
        end cancelled.

        ``tenant=True``: also every other unfinished task of this client's tenant whose home
        is this gateway, whichever client or program submitted it (a gateway with token auth:
        elsewhere tasks belong to no tenant and this raises InvalidRequestError)."""
        cancelled = self._cancel_futures(self._session.owned(), timeout=30)
        if tenant:
            try:
                resp = self._tasks.Cancel(tasks_pb2.CancelRequest(all_mine=True), timeout=30)
            except grpc.RpcError as exc:
                raise _rpc.translate(exc, self.address) from None
            mine = set(cancelled)
            cancelled += [i for i in resp.cancelled if i not in mine]
            for task_id in resp.cancelled:
                future = self._session.future_of(task_id)
                if future is not None:
                    self._session.forget(task_id)
                    future._set_cancelled()
        return cancelled

    def _cancel_futures(self, futures: Sequence[TaskFuture], timeout: float) -> list[str]:
        """Cancels these tasks of this client: those not yet sent are taken back, the rest
        cancelled at the gateway once it has acknowledged them. Returns the ids cancelled."""
        unsent = self._session.unqueue_many(futures)
        for future in unsent:
            future._set_cancelled()
        taken = {id(f) for f in unsent}
        sent = [f.task_id for f in futures if id(f) not in taken and not f.done()]
        cancelled = [f.task_id for f in unsent]
        if sent:
            self._session.wait_acked(sent, timeout)
            cancelled += self._cancel_ids(sent, timeout)
        return cancelled

    def _on_interrupt(self, futures: Sequence[TaskFuture]) -> None:
        """Ctrl-C while waiting on these unfinished tasks of this client (see ``futures``)."""
        if not self._cancel_on_interrupt or self.closed:
            logger.warning("intertie: interrupted while waiting for %s; they keep running at %s "
                           "(fed.cancel_all() cancels what this client submitted)", _tasks(len(futures)), self.address)
            return
        try:
            cancelled = self._cancel_futures(futures, CANCEL_TIMEOUT_S)
        except (errors.IntertieError, grpc.RpcError) as exc:
            logger.warning("intertie: interrupted while waiting for %s; cancelling them at %s failed "
                           "(%s): they may still run", _tasks(len(futures)), self.address, exc)
            return
        logger.warning("intertie: interrupted: cancelled %s this wait was for at %s "
                       "(intertie.connect(cancel_on_interrupt=False) leaves them running)",
                       _tasks(len(cancelled), "unfinished "), self.address)

    @_rpc.translated
    def task(self, task_id: str) -> TaskInfo:
        """What the gateway knows of one task: state, site, attempts, error."""
        self._session.wait_acked([task_id])
        return TaskInfo.from_proto(self._tasks.GetTask(tasks_pb2.GetTaskRequest(task_id=task_id),
                                                       timeout=30))

    @_rpc.translated
    def sites(self) -> Listing[SiteStatus]:
        """The federation as the home gateway sees it: the home site first, then its peers
        (a list; in Jupyter, one table)."""
        catalogue = self._site.ListSites(site_pb2.ListSitesRequest(), timeout=30)
        return Listing(SiteStatus.from_proto(s) for s in catalogue.sites)

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
        for ref in refs_in(args, {}):  # where its datasets lie counts, as for a submitted task
            spec.inputs.add(id=ref.id, site=ref.site, num_bytes=ref.num_bytes)
        placement = self._tasks.Quote(tasks_pb2.QuoteRequest(task=spec, args_bytes=args_bytes), timeout=30)
        return Quote(PlacementInfo.from_proto(placement))

    @_rpc.translated
    def usage(self, *, since: float | datetime | None = None, by: str | None = None) -> Any:
        """Your attempts here from the site's usage ledger, a ``pyarrow.Table`` (:func:`intertie.usage.table`)."""
        return _usage.table(_usage.GrpcLedger(self._channel), since=since, by=by)

    @_rpc.translated
    def verify_usage(self) -> _usage.UsageVerification:
        """Checks your usage entries here without trusting the site (:func:`intertie.usage.verify`)."""
        return _usage.verify(_usage.GrpcLedger(self._channel), self.site_id)

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
                    progress: Callable[[int, int], None] | None = None, replace: bool = False) -> DatasetRef:
        """Stores ``data`` at a site (default: the home) and returns its :class:`DatasetRef`.

        ``data`` is a ``pyarrow.Table``, a ``RecordBatchReader``, or a path/fsspec URL of
        Parquet, Arrow IPC or CSV; it is streamed in record batches (``progress(rows, bytes)``
        is called after each). Names are unique per site: a file put without a name is named
        after the file; a name in use is refused unless ``replace=True``, which swaps the
        dataset the name names for this one."""
        return self._data.put(data, name, site, progress, replace=replace)

    @_rpc.translated
    def get_dataset(self, ref: DatasetRef | str, *, site: str | None = None,
                    progress: Callable[[int, int], None] | None = None) -> Any:
        """The dataset as a ``pyarrow.Table``; ``ref`` is a DatasetRef, an id or a name."""
        return self._data.get(ref, site, progress)

    @_rpc.translated
    def datasets(self, site: str | None = None) -> Listing[DatasetRef]:
        """The datasets of the whole federation, site by site (replicas included, with the
        site they came from), or of one ``site``. Sites that are down are left out."""
        if site is not None:
            return Listing(self._data.list(site))
        return Listing(self._data.list_all(
            (s.site_id, s.flight_address) for s in self.sites() if s.state == "up" and s.flight_address))

    @_rpc.translated
    def dataset(self, ref: DatasetRef | str, *, site: str | None = None) -> DatasetRef:
        """A dataset's ref by id or name."""
        return self._data.action("get", ref, site)

    @_rpc.translated
    def delete_dataset(self, ref: DatasetRef | str, *, site: str | None = None) -> DatasetRef:
        return self._data.action("delete", ref, site)

    def executor(self, max_workers: int | None = None) -> Any:
        """A ``concurrent.futures.Executor`` whose ``map`` batches fine-grained work.

        ``max_workers`` (default: the CPUs of the federation's sites that are up) is what
        the executor reports as ``_max_workers`` (Dask sizes its batches by it) and sets the
        default window of ``map`` (twice that many tasks in flight)."""
        from intertie.executor import FederationExecutor

        if max_workers is None:
            try:
                cpus = sum(s.resources_total.get("CPU", 0.0) for s in self.sites() if s.state == "up")
            except errors.IntertieError:
                cpus = 0.0
            max_workers = int(cpus) or os.cpu_count() or 1
        return FederationExecutor(self, max_workers)

    # ------------------------------------------------------------------ lifecycle
    def close(self, cancel: bool = True) -> None:
        """Closes the connection; an embedded site stops with its last connection.

        The connection owns the tasks it submitted: those still queued or running are
        cancelled, and their futures end cancelled (leaving a ``with`` block does the same).
        ``close(cancel=False)`` leaves them to run: what was submitted is sent first, the
        tasks finish at the site, and their futures here fail (the connection is gone), but
        ``intertie.connect(address).future(task_id)`` gets their results later. A program
        that ends without closing its connection leaves its tasks to run too: submissions
        not yet sent are sent at exit. Tasks only followed through :meth:`future` are never
        cancelled by closing.
        """
        if self.closed:
            return
        atexit.unregister(self._at_exit)
        if cancel:
            owned = self._session.owned()
            try:
                if owned and not self._session.connected:  # not waited for: what was not sent never will be
                    for future in self._session.unqueue_many(owned):
                        future._set_cancelled()
                    if any(not f.done() for f in owned):
                        raise errors.SiteUnavailableError(f"gateway {self.address} is unreachable")
                elif owned:
                    self._cancel_futures(owned, CANCEL_TIMEOUT_S)
            except (errors.IntertieError, grpc.RpcError) as exc:
                left = [f.task_id for f in owned if not f.done()]
                logger.warning("closing the connection to %s: could not cancel %d tasks (%s); they may "
                               "still run, e.g. %s", self.address, len(left), exc, ", ".join(left[:3]))
        else:
            # Submissions already handed to us are sent and acknowledged before the channel
            # goes (not waited for while the gateway is unreachable: they fail below).
            self._session.drain()
        self.closed = True
        _submitter.closed(self)
        self._session.close()
        self._data.close()
        self._channel.close()
        self._session.fail_all(errors.IntertieError(
            f"the connection to {self.address} was closed before the task finished"
            + ("" if cancel else " (it runs on at the site: intertie.connect(address).future(task_id) follows it)")))
        if self._on_close is not None:
            self._on_close()

    def _at_exit(self) -> None:
        """At interpreter exit, with this connection still open: what was submitted is sent
        (within EXIT_FLUSH_TIMEOUT_S) and left to run; a warning names what could not be."""
        if self.closed:
            return
        if self._session.drain(EXIT_FLUSH_TIMEOUT_S, through_outage=True):
            return
        unsent = self._session.unsent()
        if not unsent:
            return
        if self._session.down is not None:
            why = str(self._session.down)
        elif not self._session._connected:
            why = f"gateway {self.address} unreachable ({self._session._last_failure or 'reconnecting'})"
        else:
            why = f"gateway {self.address} did not acknowledge them within {EXIT_FLUSH_TIMEOUT_S:g} s"
        shown = ", ".join(f"{name or '?'} ({task_id})" for task_id, name in unsent[:5])
        more = f" and {len(unsent) - 5} more" if len(unsent) > 5 else ""
        logger.warning("intertie: %s submitted were not sent before the program exited: %s. Not sent: %s%s",
                       _tasks(len(unsent)), why, shown, more)

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # cancels what is unfinished: close(cancel=False) inside the block to keep it

    def __repr__(self) -> str:
        return f"<Federation {self.site_id}@{self.address}{' closed' if self.closed else ''}>"


def _tasks(n: int, kind: str = "") -> str:
    return f"{n} {kind}task{'' if n == 1 else 's'}"


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n:,} bytes"
