"""Metering (issue 13): every attempt that ran at this site and ended carries its ``Usage`` on
the journal change that records the end (Finished or Requeued); attempts that ran elsewhere or
never started carry none. Against the pure core, with a controlled clock and a stand-in Ray,
no event loop (but for the last test: the transfers of dataset arguments are the shell's)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from core_fakes import FakeRunner, InlineLoop, book_world, failed, ok, spec

from intertie_gateway.admission import Capacity
from intertie_gateway.book import Task, site_price
from intertie_gateway.datasets import DatasetMeta
from intertie_gateway.dispatch import Dispatch, Slots
from intertie_gateway.lifecycle import Phase, State
from intertie_gateway.model import (
    PREEMPTED,
    RETRY,
    DatasetInput,
    ErrorKind,
    Failure,
    Finished,
    Forgotten,
    Requeued,
    Resources,
    Usage,
)
from intertie_gateway.placement import PRICE_LABEL, PlacementRecord
from intertie_gateway.transfers import Transfers


class World:
    """A site's dispatch on a stand-in Ray, its book on a clock the test sets."""

    def __init__(self, *, price: float = 0.0, cpus: float = 8.0, pool_size: int = 0) -> None:
        self.runner = FakeRunner(pool_size)
        self.loop = InlineLoop()
        self.slots = Slots(Capacity({"CPU": cpus, "GPU": 1.0}))
        self.books = book_world(release=self.slots.release, price_per_cpu_hour=price)
        self.book = self.books.book
        self.clock = self.books.clock
        self.dispatch = Dispatch(self.book, self.slots, self.runner, site_id="here",  # type: ignore[arg-type]
                                 max_payload_bytes=1 << 20, inputs_for=lambda task: {},
                                 functions=lambda digest: b"fn", wake=self.dispatch_queue,
                                 loop=self.loop)  # type: ignore[arg-type]

    def dispatch_queue(self) -> None:
        self.dispatch.run_queue()

    def add(self, task_id: str, **fields: Any) -> Task:
        task = Task(spec(task_id, **fields), 0.0)
        self.book.admit(task)
        return task

    def finish(self, index: int, outcome: Any) -> None:
        self.runner.started[index][1].ref.result.set_result(outcome)
        self.loop.run()

    def usages(self) -> list[Usage | None]:
        """The usage of every change that ends an attempt, in order."""
        return [c.usage for c in self.book.changes if isinstance(c, (Finished, Requeued))]


def _resources(cpus: float, gpus: float = 0.0) -> Resources:
    return Resources(cpus=cpus, gpus=gpus)


def test_a_succeeded_task_s_finish_carries_what_its_attempt_used() -> None:
    w = World(price=0.5)
    inputs = (DatasetInput("d1", "here", 1_000), DatasetInput("d2", "here", 234))
    task = w.add("acme~t", tenant="acme", args=b"a" * 37, resources=_resources(2.0, 1.0), inputs=inputs)
    w.clock.now = 1_000.0
    w.dispatch.run_queue()
    assert task.phase is Phase.RUNNING
    w.clock.now = 1_003.5
    w.finish(0, ok(b"r" * 11, run_s=3.4, cpu_s=6.25))
    (finished,) = [c for c in w.book.changes if isinstance(c, Finished)]
    assert finished.state == State.SUCCEEDED
    assert finished.usage == Usage(
        tenant="acme", task_id="acme~t", attempt=1, home="", outcome="succeeded", started_at=1_000.0,
        ended_at=1_003.5, cpus=2.0, gpus=1.0, cpu_time_s=6.25, args_bytes=37, result_bytes=11,
        dataset_bytes_pulled=0, dataset_bytes_read=1_234, price_per_cpu_hour=0.5)
    assert finished.usage.cpu_s_reserved == pytest.approx(7.0)  # 2 CPUs x 3.5 s of wall time
    assert finished.usage.gpu_s_reserved == pytest.approx(3.5)


def test_a_result_kept_at_the_site_is_metered_by_its_table_s_bytes() -> None:
    w = World()
    w.add("t", returns_dataset=True)
    w.dispatch.run_queue()
    w.finish(0, ok(b"a pickled DatasetRef", cpu_s=0.01, kept=5_000_000))
    (usage,) = w.usages()
    assert usage is not None and usage.result_bytes == 5_000_000


def test_a_failed_call_is_metered_with_what_its_worker_measured() -> None:
    w = World()
    w.add("t", resources=_resources(1.0))
    w.clock.now = 200.0
    w.dispatch.run_queue()
    w.clock.now = 201.0
    w.finish(0, failed("bad input", cpu_s=0.75))
    (usage,) = w.usages()
    assert usage is not None and (usage.outcome, usage.cpu_time_s, usage.result_bytes, usage.wall_s) == (
        "failed", 0.75, 0, 1.0)


def test_a_retried_attempt_is_metered_on_its_requeue_and_the_next_one_on_the_finish() -> None:
    w = World()
    task = w.add("t", resources=_resources(1.0), max_retries=1)
    w.clock.now = 100.0
    w.dispatch.run_queue()
    real_outcome = w.runner.outcome
    w.runner.outcome = lambda running, fut: (RETRY, RuntimeError("node lost"))  # type: ignore[method-assign]
    w.clock.now = 102.0
    w.finish(0, None)  # the worker died: the attempt is spent, the task runs again at once
    assert task.phase is Phase.RUNNING and task.attempts == 2
    requeued, = [c for c in w.book.changes if isinstance(c, Requeued)]
    assert requeued.usage is not None
    assert (requeued.usage.attempt, requeued.usage.outcome, requeued.usage.started_at, requeued.usage.ended_at,
            requeued.usage.cpu_time_s) == (1, "retried", 100.0, 102.0, 0.0)  # no worker answered: not measured
    w.runner.outcome = real_outcome  # type: ignore[method-assign]
    w.clock.now = 105.0
    w.finish(1, ok(b"done", cpu_s=2.5))
    finished, = [c for c in w.book.changes if isinstance(c, Finished)]
    assert finished.usage is not None
    assert (finished.usage.attempt, finished.usage.outcome, finished.usage.started_at, finished.usage.ended_at,
            finished.usage.cpu_time_s) == (2, "succeeded", 102.0, 105.0, 2.5)
    assert [u.attempt for u in w.usages() if u is not None] == [1, 2]


def test_a_preempted_attempt_is_metered_under_the_number_its_rerun_takes_again() -> None:
    w = World()
    task = w.add("t", resources=_resources(1.0))
    w.dispatch.run_queue()
    w.runner.outcome = lambda running, fut: (PREEMPTED, RuntimeError("stopped"))  # type: ignore[method-assign]
    w.finish(0, None)
    assert task.phase is Phase.RUNNING and task.attempts == 1  # free: the rerun is attempt 1 again
    (usage,) = w.usages()
    assert usage is not None and (usage.attempt, usage.outcome) == (1, "preempted")


def test_a_retry_with_none_left_fails_the_task_and_meters_the_attempt() -> None:
    w = World()
    w.add("t", resources=_resources(1.0))
    w.dispatch.run_queue()
    w.runner.outcome = lambda running, fut: (RETRY, RuntimeError("node lost"))  # type: ignore[method-assign]
    w.finish(0, None)
    (finished,) = [c for c in w.book.changes if isinstance(c, Finished)]
    assert finished.state == State.FAILED and finished.usage is not None and finished.usage.outcome == "failed"


def test_a_cancelled_running_task_is_metered_up_to_its_cancel() -> None:
    w = World()
    task = w.add("t", resources=_resources(4.0))
    w.clock.now = 50.0
    w.dispatch.run_queue()
    w.clock.now = 60.0
    w.dispatch.stop_run(task)  # as the driver cancels one
    w.book.move(task, Phase.CANCELLED, error=Failure(ErrorKind.CANCELLED, "task t was cancelled"))
    w.loop.run()  # Ray's late answer is ignored
    (usage,) = w.usages()
    assert usage is not None
    assert (usage.outcome, usage.wall_s, usage.cpu_s_reserved, usage.cpu_time_s) == ("cancelled", 10.0, 40.0, 0.0)


def test_a_timed_out_task_is_metered_as_failed() -> None:
    w = World()
    w.add("t", resources=_resources(1.0), timeout_s=5.0)
    w.clock.now = 10.0
    w.dispatch.run_queue()
    w.clock.now = 15.0
    (timer,) = w.loop.timers
    timer.fire()
    (usage,) = w.usages()
    assert usage is not None and (usage.outcome, usage.wall_s) == ("failed", 5.0)


def test_a_fused_call_meters_each_of_its_tasks_with_its_own_measure() -> None:
    w = World(pool_size=1, cpus=64)
    w.dispatch.capacity.observe(0.001)  # short tasks: the site fuses them
    tasks = [w.add(f"t{i}", resources=_resources(1.0)) for i in range(8)]
    w.dispatch.run_queue()
    ids, _ = w.runner.started[0]
    assert len(ids) > 1
    w.finish(0, [ok(b"x" * (i + 1), cpu_s=0.001 * (i + 1)) for i in range(len(ids))])
    finished = {c.task_id: c.usage for c in w.book.changes if isinstance(c, Finished)}
    for i, task_id in enumerate(ids):
        usage = finished[task_id]
        assert usage is not None and (usage.cpu_time_s, usage.result_bytes) == (0.001 * (i + 1), i + 1)
    assert all(t.phase in (Phase.RUNNING, Phase.SUCCEEDED) for t in tasks)


def test_a_forwarded_task_or_one_that_never_started_carries_no_usage() -> None:
    world = book_world(federated=True, site_id="home")
    book = world.book
    forwarded = Task(spec("f", tenant="acme"), 0.0)
    book.admit(forwarded)
    book.move(forwarded, Phase.FORWARDING, site="peer", placement=PlacementRecord("peer", "best", 1.0))
    book.move(forwarded, Phase.AT_PEER)
    book.move(forwarded, Phase.RUNNING_AT_PEER)
    book.move(forwarded, Phase.SUCCEEDED, result=b"r", run_s=1.0)  # the peer's event: its ledger has it
    never = Task(spec("n", tenant="acme"), 0.0)
    book.admit(never)
    book.move(never, Phase.CANCELLED, error=Failure(ErrorKind.CANCELLED, "cancelled while unplaced"))
    ends = [c for c in book.changes if isinstance(c, (Finished, Requeued))]
    assert [(c.task_id, c.usage) for c in ends] == [("f", None), ("n", None)]


def test_a_task_a_peer_forwarded_here_is_metered_for_its_tenant_and_home() -> None:
    w = World()
    w.add("acme@alpha~t", tenant="acme@alpha", home="alpha", resources=_resources(1.0))
    w.dispatch.run_queue()
    w.finish(0, ok(b"r"))
    (usage,) = w.usages()
    assert usage is not None and (usage.tenant, usage.home, usage.task_id) == ("acme@alpha", "alpha", "acme@alpha~t")


def test_a_running_task_its_home_takes_back_is_metered_as_dropped_with_its_function() -> None:
    w = World()
    task = w.add("acme@alpha~t", tenant="acme@alpha", home="alpha", name="train", resources=_resources(2.0))
    w.clock.now = 10.0
    w.dispatch.run_queue()
    w.clock.now = 14.0
    w.book.move(task, Phase.DROPPED)  # (federate.confirm: the home moved it elsewhere)
    (forgotten,) = [c for c in w.book.changes if isinstance(c, Forgotten)]
    assert forgotten.usage is not None
    assert (forgotten.usage.outcome, forgotten.usage.function, forgotten.usage.cpu_s_reserved) == ("dropped", "train",
                                                                                                  8.0)


def test_a_run_restored_at_a_restart_carries_no_usage() -> None:
    """Its start and its measure were lost with the process that ran it."""
    world = book_world()
    task = Task(spec("t"), 0.0)
    task.attempts = 1
    world.book.move(task, Phase.RUNNING)  # where the journal says it was
    world.book.retry(task, "the gateway stopped while the task was running")
    (finished,) = world.book.changes
    assert isinstance(finished, Finished) and finished.usage is None


def test_the_site_s_price_label_is_read() -> None:
    assert site_price({PRICE_LABEL: "0.42", "region": "eu"}) == 0.42
    assert site_price({}) == 0.0
    assert site_price({PRICE_LABEL: "cheap"}) == 0.0 and site_price({PRICE_LABEL: "-1"}) == 0.0
    w = World(price=site_price({PRICE_LABEL: "0.42"}))
    w.add("t")
    w.dispatch.run_queue()
    w.finish(0, ok(b""))
    (usage,) = w.usages()
    assert usage is not None and usage.price_per_cpu_hour == 0.42


# ---------------------------------------------------------------------------- pulls (the shell's)
class PullingStore:
    """A data plane that holds nothing until it pulls (each dataset is 1 MB)."""

    worker_endpoint = "{}"

    def __init__(self) -> None:
        self.here: set[str] = set()
        self.pulls: list[str] = []

    def location(self, dataset_id: str, owner: str | None = None) -> str | None:
        return f"/d/{dataset_id}.arrow" if dataset_id in self.here else None

    def pull(self, dataset_id: str, sources: object, *, timeout_s: float, owner: str | None = None) -> DatasetMeta:
        time.sleep(0.05)  # (on the transfers' thread) long enough for a second task to wait for it too
        self.pulls.append(dataset_id)
        self.here.add(dataset_id)
        return DatasetMeta(dataset_id, "", "here", 10, 1_000_000, 0.0, "", origin="beta")

    def evict(self, keep: object) -> list[str]:
        return []


async def _until(condition: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def test_a_pull_shared_by_tasks_is_metered_once_for_the_task_that_caused_it() -> None:
    store = PullingStore()

    async def main() -> tuple[Task, Task]:
        loop = asyncio.get_running_loop()
        slots = Slots(Capacity({"CPU": 2.0}))
        book = book_world(release=slots.release).book
        transfers = Transfers(book, slots, store, lambda: [], site_id="here",  # type: ignore[arg-type]
                              pull_timeout_s=5.0, spawn=loop.create_task, done=lambda: None,
                              draining=lambda: False)
        first, second = (Task(spec(i, inputs=(DatasetInput("d1", "beta", 1_000_000),)), 0.0) for i in ("a", "b"))
        for task in (first, second):
            book.admit(task)
            assert transfers.inputs_for(task) is None  # fetching: one pull for both
        await _until(lambda: first.phase is Phase.QUEUED and second.phase is Phase.QUEUED)
        transfers.close()
        # Both run here now; their Usage reads what was pulled for them.
        for task in (first, second):
            book.move(task, Phase.RUNNING)
            book.move(task, Phase.SUCCEEDED, result=b"")
        usages = {c.task_id: c.usage for c in book.changes if isinstance(c, Finished)}
        assert {k: (u.dataset_bytes_pulled, u.dataset_bytes_read) for k, u in usages.items() if u} == {
            "a": (1_000_000, 1_000_000), "b": (0, 1_000_000)}
        return first, second

    first, second = asyncio.run(main())
    assert store.pulls == ["d1"]
    assert first.pulled == second.pulled == 0  # consumed by the attempt that ran


# ---------------------------------------------------------------------------- the worker's measure
def _busy(seconds: float) -> int:
    end, n = time.process_time() + seconds, 0
    while time.process_time() < end:
        n += 1
    return n


def test_the_worker_measures_each_call_s_cpu_time_beside_its_wall_time() -> None:
    import cloudpickle

    from intertie_gateway import worker

    worker._functions["busy"], worker._functions["nap"] = _busy, time.sleep
    try:
        busy = worker.execute("busy", cloudpickle.dumps(((0.2,), {})), "busy", False)
        nap = worker.execute("nap", cloudpickle.dumps(((0.2,), {})), "nap", False)
        fails = worker.execute("busy", cloudpickle.dumps((("x",), {})), "busy", False)  # TypeError in the function
    finally:
        del worker._functions["busy"], worker._functions["nap"]
    assert busy[0] and busy[8] >= 0.2 and busy[8] <= busy[7] * 1.5 + 0.05 and busy[9] == 0
    assert nap[0] and nap[7] >= 0.2 and nap[8] < 0.05
    assert not fails[0] and fails[8] >= 0.0 and len(fails) == len(busy)
