"""Prometheus metrics of one gateway (``--metrics-listen HOST:PORT``; off by default).

Each measurement is taken where it costs least:

- **Counted where it happens**, on the event loop, as the increment of a label child bound once:
  finishes and CPU-seconds per tenant (the driver's book), placements, forwards, migrations and
  steals per site (``federate``, through a plain callback: the pure core imports nothing of
  this), bytes pulled per peer (``transfers``), the group commit's latency (``Scheduler.flush``).
- **Per call**: :class:`RpcMetrics`, the outermost gRPC interceptor (it sees the gatekeeper's
  refusals too): a call with one answer is timed; a streaming one (a client's Connect) is
  gauged while open and counted when it ends, at no cost per message beyond a generator step.
- **At scrape time**: the unfinished tasks by phase and tenant, the queue, the tasks running
  and (once there is one) the ledger, read on the event loop in one callback per scrape: the
  core is seen as the loop sees it, the hot path pays nothing, and the wait is the loop's lag.

Labels are bounded: methods by the registered services, codes by gRPC, sites by the configured
peers, tenants by the site's tokens and its peers' tenants, at most ``MAX_TENANTS`` (then
"_other"). Never a task id or free text. Served over plain HTTP, without auth, by
prometheus_client's server in a daemon thread, from this gateway's own registry.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple
from wsgiref.simple_server import WSGIServer

import grpc
import prometheus_client
from prometheus_client import CollectorRegistry, Gauge, Histogram, ProcessCollector
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from intertie_gateway.auth import answers_of
from intertie_gateway.tenancy import ANONYMOUS_NAME
from intertie_gateway.throttle import log_throttled

logger = logging.getLogger(__name__)

# Tenants with a label of their own; the rest share OTHER (a bound on the series, whatever peers send).
MAX_TENANTS = 500
OTHER = "_other"
# How long a scrape waits for the event loop to read the core; past it those gauges are left out.
SCRAPE_WAIT_S = 2.0
RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
COMMIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class CoreSnapshot(NamedTuple):
    """What a scrape reads of the core: unfinished tasks per (phase, tenant), the queue's
    length, the tasks running here."""

    tasks: Mapping[tuple[str, str], int]
    queued: int
    running: int


class Metrics:
    """The metrics of one gateway. ``loop``: the gateway's event loop, where scrape-time
    readers run (None: they run in the scrape's thread, for tests without a loop)."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        prometheus_client.disable_created_metrics()  # (no *_created series: half the series, never read)
        self.registry = r = CollectorRegistry()
        self._loop = loop

        def counter(name: str, what: str, *labels: str) -> prometheus_client.Counter:
            return prometheus_client.Counter(name, what, labels, registry=r)

        self.rpc_seconds = Histogram("intertie_rpc_duration_seconds", "gRPC calls with one answer: time to answer, "
                                     "by method and status code", ("method", "code"), registry=r, buckets=RPC_BUCKETS)
        self.streams = counter("intertie_rpc_streams", "gRPC calls that stream answers, by method and status code, "
                               "counted when they end", "method", "code")
        self.streams_open = Gauge("intertie_rpc_streams_open", "gRPC calls that stream answers, open now",
                                  ("method",), registry=r)
        self.commit_seconds = Histogram("intertie_journal_commit_seconds", "Group commits of the journal (one per "
                                        "loop turn with changes): time to commit", registry=r, buckets=COMMIT_BUCKETS)
        self.commit_failures = counter("intertie_journal_commit_failures", "Group commits that failed (retried)")
        self.finished = counter("intertie_tasks_finished", "Tasks that finished here, by tenant and state",
                                "tenant", "state")
        self.cpu_seconds = counter("intertie_tenant_cpu_seconds", "CPUs reserved x seconds of the runs in this "
                                   "site's Ray, by tenant", "tenant")
        self.events = {
            "placed": counter("intertie_placements", "Placements by this home, by the site chosen ('local': this "
                              "site; 'none': no site can run it now)", "site"),
            "forwarded": counter("intertie_forwards", "Tasks sent to a peer (placed there, or taken by it)", "peer"),
            "migrated": counter("intertie_migrations", "Tasks taken back from a peer to be placed again (refused, "
                                "lost, the peer down)", "peer"),
            "stolen": counter("intertie_steals", "Queued tasks handed to an idle peer that asked for work", "peer"),
        }
        self.refused = counter("intertie_tasks_refused", "Tasks refused at intake (never journaled), by error kind",
                               "kind")
        self.transfer_bytes = counter("intertie_dataset_transfer_bytes", "Bytes of datasets moved for tasks, by "
                                      "direction and peer", "direction", "peer")
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self._tenants: set[str] = set()
        self._readers: list[tuple[Callable[[], Any], Callable[[Any], Iterable[Metric]]]] = []
        self._server: WSGIServer | None = None
        ProcessCollector(registry=r)  # the standard process_* metrics of the gateway's process
        r.register(_ReadOnLoop(self))

    # ------------------------------------------------------------------ counted where it happens (the loop)
    def _child(self, metric: Any, *labels: str) -> Any:
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def tenant(self, name: str) -> str:
        """The label of a tenant ("" is the anonymous one; past MAX_TENANTS, OTHER)."""
        name = name or ANONYMOUS_NAME
        if name in self._tenants:
            return name
        if len(self._tenants) >= MAX_TENANTS:
            return OTHER
        self._tenants.add(name)
        return name

    def task_finished(self, tenant: str, state: str) -> None:
        self._child(self.finished, self.tenant(tenant), state).inc()

    def task_ran(self, tenant: str, cpu_seconds: float) -> None:
        if cpu_seconds > 0:
            self._child(self.cpu_seconds, self.tenant(tenant)).inc(cpu_seconds)

    def federation_event(self, kind: str, site: str, count: int = 1) -> None:
        """``kind``: "placed", "forwarded", "migrated" or "stolen" (federate.py's events)."""
        self._child(self.events[kind], site).inc(count)

    def refused_at_intake(self, kind: str, count: int) -> None:
        """``kind``: an ``ErrorKind`` name without its prefix ("QUOTA_EXCEEDED": a bounded set)."""
        self._child(self.refused, kind).inc(count)

    def pulled(self, peer: str, num_bytes: int) -> None:
        self._child(self.transfer_bytes, "in", peer).inc(num_bytes)

    def committed(self, seconds: float, ok: bool) -> None:
        if ok:
            self.commit_seconds.observe(seconds)
        else:
            self.commit_failures.inc()

    def rpc_done(self, method: str, code: str, seconds: float) -> None:
        self._child(self.rpc_seconds, method, code).observe(seconds)

    def stream_opened(self, method: str) -> None:
        self._child(self.streams_open, method).inc()

    def stream_closed(self, method: str, code: str) -> None:
        self._child(self.streams_open, method).dec()
        self._child(self.streams, method, code).inc()

    def interceptor(self) -> RpcMetrics:
        return RpcMetrics(self)

    # ------------------------------------------------------------------ read at scrape time (on the loop)
    def read_core(self, read: Callable[[], CoreSnapshot]) -> None:
        """``read``: the driver's snapshot of its tasks (``Scheduler.snapshot``)."""
        self._readers.append((read, self._core_families))

    def ledger(self, size: Callable[[], int], checkpoint_time: Callable[[], float | None]) -> None:
        """The hook for the usage ledger: registers ``intertie_ledger_entries`` (``size()``)
        and ``intertie_ledger_last_checkpoint_timestamp_seconds`` (``checkpoint_time()``, Unix
        time; None: no checkpoint yet), both called on the event loop at each scrape."""
        self._readers.append((lambda: (size(), checkpoint_time()), _ledger_families))

    def _core_families(self, snap: CoreSnapshot) -> Iterable[Metric]:
        tasks = GaugeMetricFamily("intertie_tasks", "Unfinished tasks at this gateway, by phase (lifecycle.py) "
                                  "and tenant", labels=("phase", "tenant"))
        merged: Counter[tuple[str, str]] = Counter()
        for (phase, tenant), count in snap.tasks.items():
            merged[phase, self.tenant(tenant)] += count
        for labels, count in sorted(merged.items()):
            tasks.add_metric(labels, count)
        return (tasks, GaugeMetricFamily("intertie_queue_length", "Entries of the queue of tasks to run here",
                                         value=snap.queued),
                GaugeMetricFamily("intertie_running_tasks", "Tasks running in this site's Ray", value=snap.running))

    def read_on_loop(self, readers: Sequence[Callable[[], Any]]) -> list[Any] | None:
        """Calls ``readers`` on the event loop, waiting at most SCRAPE_WAIT_S (None: no answer)."""
        def read_all() -> list[Any]:
            return [read() for read in readers]

        loop = self._loop
        try:
            here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # (a scrape's thread has none)
            here = None
        if loop is None or here is loop:
            return read_all()
        done: concurrent.futures.Future[list[Any]] = concurrent.futures.Future()

        def on_loop() -> None:
            if done.set_running_or_notify_cancel():
                try:
                    done.set_result(read_all())
                except Exception as exc:
                    done.set_exception(exc)
        try:
            loop.call_soon_threadsafe(on_loop)
            return done.result(SCRAPE_WAIT_S)
        except TimeoutError:
            done.cancel()
            log_throttled(logger, "metrics-loop", "metrics: the event loop did not answer a scrape within %g s",
                          SCRAPE_WAIT_S)
        except RuntimeError:  # the loop is closed: the gateway is stopping
            pass
        except Exception:
            logger.exception("metrics: reading the core failed")
        return None

    # ------------------------------------------------------------------ serving
    def serve(self, listen: str) -> int:
        """Serves the registry at ``listen`` (HOST:PORT; port 0 picks one); returns the port."""
        host, _, port = listen.rpartition(":")
        try:
            self._server, _ = prometheus_client.start_http_server(int(port), host.strip("[]"), registry=self.registry)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {listen} (metrics_listen): {exc.strerror or exc}") from None
        return int(self._server.server_port)

    def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()


class _ReadOnLoop(Collector):
    """The scrape-time readers' families, read in one callback on the loop."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        readers = tuple(self._metrics._readers)
        if not readers:
            return ()
        started = time.perf_counter()
        values = self._metrics.read_on_loop([read for read, _ in readers])
        lag = GaugeMetricFamily("intertie_scrape_loop_wait_seconds", "How long the event loop took to answer this "
                                "scrape (its lag)", value=time.perf_counter() - started)
        if values is None:
            return (lag,)
        return (lag, *(m for (_, build), value in zip(readers, values, strict=True) for m in build(value)))


def _ledger_families(value: tuple[int, float | None]) -> Iterable[Metric]:
    size, checkpoint = value
    yield GaugeMetricFamily("intertie_ledger_entries", "Entries of the usage ledger", value=size)
    if checkpoint is not None:
        yield GaugeMetricFamily("intertie_ledger_last_checkpoint_timestamp_seconds", "When the usage ledger was "
                                "last checkpointed (Unix time)", value=checkpoint)


class RpcMetrics(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Times or counts every call of a known method (see the module doc)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:  # no such method: UNIMPLEMENTED, not measured (its name is the caller's text)
            return None
        method = details.method.lstrip("/")
        metrics = self._metrics
        kwargs = dict(request_deserializer=handler.request_deserializer,
                      response_serializer=handler.response_serializer)
        if handler.unary_unary or handler.stream_unary:
            inner = handler.unary_unary or handler.stream_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started = time.perf_counter()
                try:
                    response = await inner(request, context)
                except BaseException as exc:
                    metrics.rpc_done(method, _failed(context, exc), time.perf_counter() - started)
                    raise
                metrics.rpc_done(method, _code(context, "OK"), time.perf_counter() - started)
                return response

            make = grpc.unary_unary_rpc_method_handler if handler.unary_unary else grpc.stream_unary_rpc_method_handler
            return make(unary, **kwargs)
        streamer = handler.unary_stream or handler.stream_stream

        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            metrics.stream_opened(method)
            code = "UNKNOWN"
            try:
                async for item in answers_of(streamer(request, context)):
                    yield item
                code = _code(context, "OK")
            except BaseException as exc:
                code = _failed(context, exc)
                raise
            finally:
                metrics.stream_closed(method, code)

        make = grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
        return make(streaming, **kwargs)


def _code(context: Any, default: str) -> str:
    """The status the call ends with: the one set (by abort or set_code), else ``default``."""
    code = context.code()
    return str(code.name) if isinstance(code, grpc.StatusCode) else default


def _failed(context: Any, exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):  # the caller went, or its deadline passed
        remaining = context.time_remaining()
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
    code = _code(context, "UNKNOWN")
    return "UNKNOWN" if code == "OK" else code
