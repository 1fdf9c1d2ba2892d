"""The gateway's Prometheus metrics without a gateway: the RPC interceptor on an in-process gRPC
server, scrape-time readers on an event loop, the core's counters with a stand-in Ray, the
federation's events, the bytes pulled, and the flag's checks."""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import urllib.request
from collections.abc import AsyncIterator

import grpc
import pytest
from core_fakes import FakeRunner, book_world, ok
from core_fakes import spec as spec_of
from prometheus_client.parser import text_string_to_metric_families
from test_federate import StubPeer, World, peer_view
from test_scheduler import FUNCTION, spec, until

from intertie.spec import python_version
from intertie.v1 import tasks_pb2
from intertie_gateway import cli, metrics
from intertie_gateway.admission import Capacity
from intertie_gateway.book import Task
from intertie_gateway.config import ConfigError, GatewayConfig
from intertie_gateway.datasets import DatasetMeta
from intertie_gateway.dispatch import Slots
from intertie_gateway.federate import Federate
from intertie_gateway.journal import Journal
from intertie_gateway.lifecycle import Phase
from intertie_gateway.metrics import CoreSnapshot, Metrics
from intertie_gateway.model import DatasetInput, ErrorKind, Failure, Resources
from intertie_gateway.scheduler import Scheduler
from intertie_gateway.sessions import SessionHub
from intertie_gateway.transfers import Transfers


def value(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """name -> (labels, value) of every sample at /metrics, as a Prometheus server parses them."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


# ---------------------------------------------------------------------------- the RPC interceptor
async def _ok(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return b"ok"


async def _missing(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    return b""


async def _broken(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise ValueError("a bug")


async def _events(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    for _ in range(3):
        yield b"event"


async def _stuck(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    await asyncio.Event().wait()
    return b""


async def _forever(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    yield b"event"
    await asyncio.Event().wait()


def test_unary_calls_are_timed_by_method_and_code_and_streams_counted() -> None:
    m = Metrics()

    async def main() -> None:
        same = dict(request_deserializer=None, response_serializer=None)
        handlers = grpc.method_handlers_generic_handler("t.S", {
            "Ok": grpc.unary_unary_rpc_method_handler(_ok, **same),
            "Missing": grpc.unary_unary_rpc_method_handler(_missing, **same),
            "Broken": grpc.unary_unary_rpc_method_handler(_broken, **same),
            "Stuck": grpc.unary_unary_rpc_method_handler(_stuck, **same),
            "Events": grpc.unary_stream_rpc_method_handler(_events, **same),
            "Forever": grpc.unary_stream_rpc_method_handler(_forever, **same)})
        server = grpc.aio.server(interceptors=[m.interceptor()])
        server.add_generic_rpc_handlers((handlers,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                for _ in range(3):
                    assert await channel.unary_unary("/t.S/Ok")(b"") == b"ok"
                for method, code in (("Missing", grpc.StatusCode.NOT_FOUND), ("Broken", grpc.StatusCode.UNKNOWN),
                                     ("Nope", grpc.StatusCode.UNIMPLEMENTED)):
                    with pytest.raises(grpc.aio.AioRpcError) as failed:
                        await channel.unary_unary(f"/t.S/{method}")(b"")
                    assert failed.value.code() == code
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await channel.unary_unary("/t.S/Stuck")(b"", timeout=0.2)
                assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                await until(lambda: value(m, "intertie_rpc_duration_seconds_count", method="t.S/Stuck",
                                          code="DEADLINE_EXCEEDED"))
                assert [e async for e in channel.unary_stream("/t.S/Events")(b"")] == [b"event"] * 3
                call = channel.unary_stream("/t.S/Forever")(b"")
                await call.read()
                assert value(m, "intertie_rpc_streams_open", method="t.S/Forever") == 1
                call.cancel()
                await until(lambda: value(m, "intertie_rpc_streams_total", method="t.S/Forever", code="CANCELLED"))
        finally:
            await server.stop(None)

    asyncio.run(main())
    assert value(m, "intertie_rpc_duration_seconds_count", method="t.S/Ok", code="OK") == 3
    assert value(m, "intertie_rpc_duration_seconds_count", method="t.S/Missing", code="NOT_FOUND") == 1
    assert value(m, "intertie_rpc_duration_seconds_count", method="t.S/Broken", code="UNKNOWN") == 1
    assert value(m, "intertie_rpc_streams_total", method="t.S/Events", code="OK") == 1
    assert value(m, "intertie_rpc_streams_open", method="t.S/Events") == 0
    assert value(m, "intertie_rpc_streams_open", method="t.S/Forever") == 0
    assert not any(s.labels.get("method", "").endswith("Nope")  # an unknown name is the caller's text
                   for f in m.registry.collect() for s in f.samples)


# ---------------------------------------------------------------------------- read at scrape time
def test_a_scrape_reads_the_core_and_the_ledger_on_the_loop_and_serves_them_over_http() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        m = Metrics(loop)
        threads: list[bool] = []

        def read() -> CoreSnapshot:
            threads.append(asyncio.get_running_loop() is loop)  # (raises off the loop)
            return CoreSnapshot({("queued", "acme"): 2, ("running", "acme"): 1, ("queued", ""): 4}, 6, 1)

        m.read_core(read)
        m.ledger(lambda: 12, lambda: 1700000000.5)
        port = m.serve("127.0.0.1:0")
        try:
            samples = await asyncio.to_thread(scrape, port)
        finally:
            m.close()
        assert threads == [True]
        assert sorted((s["phase"], s["tenant"], v) for s, v in samples["intertie_tasks"]) == [
            ("queued", "acme", 2), ("queued", "anonymous", 4), ("running", "acme", 1)]
        assert samples["intertie_queue_length"] == [({}, 6)] and samples["intertie_running_tasks"] == [({}, 1)]
        assert samples["intertie_ledger_entries"] == [({}, 12)]
        assert samples["intertie_ledger_last_checkpoint_timestamp_seconds"] == [({}, 1700000000.5)]
        assert 0 <= samples["intertie_scrape_loop_wait_seconds"][0][1] < metrics.SCRAPE_WAIT_S
        assert "process_cpu_seconds_total" in samples

    asyncio.run(main())


def test_a_busy_loop_leaves_the_core_out_of_the_scrape_rather_than_hang_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "SCRAPE_WAIT_S", 0.05)

    async def main() -> None:
        m = Metrics(asyncio.get_running_loop())
        m.read_core(lambda: CoreSnapshot({}, 0, 0))
        port = m.serve("127.0.0.1:0")
        try:
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                samples = pool.submit(scrape, port).result(timeout=30)  # the loop is stuck in this wait
        finally:
            m.close()
        assert "intertie_tasks" not in samples and "intertie_queue_length" not in samples
        assert samples["intertie_scrape_loop_wait_seconds"][0][1] >= 0.05

    asyncio.run(main())


def test_tenant_labels_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "MAX_TENANTS", 2)
    m = Metrics()
    for tenant in ("a", "b", "c", "d", "a"):
        m.task_finished(tenant, "succeeded")
    assert [value(m, "intertie_tasks_finished_total", tenant=t, state="succeeded") for t in ("a", "b", "_other")] \
        == [2, 1, 2]


def test_a_taken_port_is_a_one_line_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=rf"cannot serve metrics on 127.0.0.1:{port} \(metrics_listen\): "):
            Metrics().serve(f"127.0.0.1:{port}")


# ---------------------------------------------------------------------------- the core's counters
def test_finishes_cpu_seconds_and_commits_are_counted_by_the_driver(tmp_path) -> None:  # type: ignore[no-untyped-def]
    journal = Journal(tmp_path / "journal.sqlite")
    m = Metrics()

    async def main() -> None:
        runner = FakeRunner()
        s = Scheduler(GatewayConfig(site_id="here"), journal, runner, SessionHub(), metrics=m)  # type: ignore[arg-type]
        tasks = [spec(f"t{i}") for i in range(3)]
        for task in tasks:
            task.resources.cpus = 1
        await s.intake.submit(tasks_pb2.SubmitRequest(functions=[FUNCTION], tasks=tasks, session_id="c"))
        assert s.snapshot() == CoreSnapshot({("running", ""): 3}, 0, 3)
        forged, bad = spec("forged"), spec("bad")
        forged.home, bad.max_retries = "elsewhere", -1  # a client may not set home; retries must be >= 0
        acks = await s.intake.submit(tasks_pb2.SubmitRequest(functions=[FUNCTION], tasks=[forged, bad],
                                                             session_id="c"))
        assert [a.accepted for a in acks] == [False, False]
        for _, running in runner.started[:2]:
            running.ref.result.set_result(ok(b"r"))
        s.cancel(["t2"])
        await until(lambda: not s.book.tasks and not s.book.changes)
        assert s.snapshot() == CoreSnapshot({}, 0, 0)

    try:
        asyncio.run(main())
    finally:
        journal.close()
    assert value(m, "intertie_tasks_finished_total", tenant="anonymous", state="succeeded") == 2
    assert value(m, "intertie_tasks_finished_total", tenant="anonymous", state="cancelled") == 1
    assert 0 < (value(m, "intertie_tenant_cpu_seconds_total", tenant="anonymous") or 0) < 3 * 5.0
    assert (value(m, "intertie_journal_commit_seconds_count") or 0) >= 1
    assert value(m, "intertie_journal_commit_failures_total") == 0
    assert value(m, "intertie_tasks_refused_total", kind="INVALID_ARGUMENT") == 2


def test_the_federation_s_events_are_told_once_per_batch() -> None:
    events: list[tuple[str, str, int]] = []
    b = StubPeer("b", peer_view("b", GPU=1))
    w = World(b)
    w.federate = Federate(w.book, w.dispatch, w.book.estimates, config=GatewayConfig(site_id="here"),
                          python=python_version(), resident=dict, functions=lambda digest: b"fn",
                          draining=lambda: False, wake=lambda: None,
                          make_federation=lambda listener: w.federation,  # type: ignore[arg-type,return-value]
                          on_event=lambda *event: events.append(event))
    gpu = w.add("g1", "g2", "g3", resources=Resources(gpus=1), max_retries=1)
    w.add("here1", "here2")
    w.add("never", resources=Resources(gpus=64))
    w.federate.place()
    assert sorted(events) == [("forwarded", "b", 3), ("placed", "b", 3), ("placed", "local", 2),
                              ("placed", "none", 1)]
    events.clear()
    w.federate.on_forward_acks(b, gpu, {"g1": Failure(ErrorKind.PLACEMENT, "no")})  # type: ignore[arg-type]
    assert events == [("migrated", "b", 1)]
    events.clear()
    b.unacked = []
    w.federate.on_peer_down(b)  # type: ignore[arg-type]
    assert events == [("migrated", "b", 2)]


class PullingStore:
    """A data plane that holds nothing until it pulls (a 1 MB dataset from "beta")."""

    worker_endpoint = "{}"

    def __init__(self) -> None:
        self.here: set[str] = set()

    def location(self, dataset_id: str, owner: str | None = None) -> str | None:
        return f"/d/{dataset_id}.arrow" if dataset_id in self.here else None

    def pull(self, dataset_id: str, sources: object, *, timeout_s: float, owner: str | None = None) -> DatasetMeta:
        self.here.add(dataset_id)
        return DatasetMeta(dataset_id, "", "here", 10, 1_000_000, 0.0, "", origin="beta")

    def evict(self, keep: object) -> list[str]:
        return []


def test_bytes_pulled_for_tasks_are_counted_per_peer() -> None:
    m = Metrics()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        slots = Slots(Capacity({"CPU": 2.0}))
        book = book_world(release=slots.release).book
        transfers = Transfers(book, slots, PullingStore(), lambda: [], site_id="here",  # type: ignore[arg-type]
                              pull_timeout_s=1.0, spawn=loop.create_task, done=lambda: None,
                              draining=lambda: False, on_pulled=m.pulled)
        tasks = [Task(spec_of(f"t{i}", inputs=(DatasetInput("d1", "beta", 1_000_000),)), 0.0) for i in range(2)]
        for task in tasks:
            book.admit(task)
            assert transfers.inputs_for(task) is None  # fetching: one pull for both
        await until(lambda: all(t.phase is Phase.QUEUED for t in tasks))
        transfers.close()

    asyncio.run(main())
    assert value(m, "intertie_dataset_transfer_bytes_total", direction="in", peer="beta") == 1_000_000


# ---------------------------------------------------------------------------- the flag
@pytest.mark.parametrize("bad", ["9100", "localhost", ":9100", "host:port", "host:70000"])
def test_a_bad_metrics_listen_is_refused_naming_the_flag(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="metrics_listen"):
        GatewayConfig(metrics_listen=bad)
    assert cli.main(["run", "--metrics-listen", bad, "--state-dir", "/nonexistent/never-made"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--metrics-listen" in err and repr(bad) in err, err


def test_metrics_are_off_by_default() -> None:
    assert GatewayConfig().metrics_listen == ""
