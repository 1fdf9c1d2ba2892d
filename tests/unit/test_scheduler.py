"""The scheduler's bookkeeping against a real journal and a stand-in for Ray."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from intertie.spec import python_version
from intertie.v1 import common_pb2, tasks_pb2
from intertie_gateway import journal as jr
from intertie_gateway.config import GatewayConfig
from intertie_gateway.journal import Journal
from intertie_gateway.placement import Placer, SiteView
from intertie_gateway.runner import Running
from intertie_gateway.scheduler import INLINE_JOURNAL_BYTES, Scheduler, Task
from intertie_gateway.sessions import SessionHub

PAYLOAD = b"pickled function"
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()
FUNCTION = tasks_pb2.Function(digest=DIGEST, payload=PAYLOAD, name="f")


class FakeRef:
    def __init__(self) -> None:
        self.result: Future[Any] = Future()

    def future(self) -> Future[Any]:
        return self.result


class FakeRunner:
    """Ray as the scheduler sees it: every call is recorded and resolved by the test."""

    def __init__(self, pool_size: int = 0) -> None:
        self.pool_size = pool_size
        self.functions: set[str] = set()
        self.started: list[tuple[list[str], Running]] = []
        self.cancelled: list[Running] = []

    def total_resources(self) -> dict[str, float]:
        return {"CPU": 2.0}

    def pooled(self, request: object) -> bool:
        return self.pool_size > 0

    def has_function(self, digest: str) -> bool:
        return digest in self.functions

    def put_function(self, digest: str, payload: bytes) -> None:
        self.functions.add(digest)

    def submit(self, digest: str, name: str, args: bytes, batch: bool, request: object, inputs: object = None,
               **kwargs: object) -> Running:
        running = Running(FakeRef())
        self.started.append(([str(kwargs.get("task_id", ""))], running))
        return running

    def submit_many(self, digest: str, items: list[tuple[str, bytes, bool, str]], request: object) -> Running:
        running = Running(FakeRef())
        self.started.append(([item[3] for item in items], running))
        return running

    def cancel(self, running: Running) -> None:
        # As ray.cancel: the call's ref fails, for every task that shares it.
        self.cancelled.append(running)
        if not running.ref.result.done():
            running.ref.result.set_exception(RuntimeError("TaskCancelledError"))

    def outcome(self, running: Running, fut: Future[Any]) -> tuple[str, Any]:
        try:
            return "ok", fut.result()
        except Exception as exc:
            return "internal", exc


def ok(result: bytes) -> tuple[Any, ...]:
    return (True, result, 0, "", "", "", b"", 0.001)


def spec(task_id: str, args: bytes = b"args") -> tasks_pb2.TaskSpec:
    return tasks_pb2.TaskSpec(task_id=task_id, function_digest=DIGEST, args=args, python_version=python_version())


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal(tmp_path / "journal.sqlite")
    yield j
    j.close()


def run(journal: Journal, body: Callable[[Scheduler, FakeRunner], Awaitable[None]], *,
        pool_size: int = 0) -> None:
    async def main() -> None:
        runner = FakeRunner(pool_size)
        scheduler = Scheduler(GatewayConfig(site_id="here"), journal, runner, SessionHub())  # type: ignore[arg-type]
        await body(scheduler, runner)

    asyncio.run(main())


async def until(condition: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_a_large_batch_whose_submit_is_cancelled_still_runs_once(journal: Journal) -> None:
    async def body(s: Scheduler, runner: FakeRunner) -> None:
        request = tasks_pb2.SubmitRequest(functions=[FUNCTION], tasks=[spec("big", b"x" * INLINE_JOURNAL_BYTES)],
                                          session_id="client")
        entered, release = threading.Event(), threading.Event()
        accept = journal.accept

        def slow_accept(*args: Any) -> set[str]:
            entered.set()
            release.wait(5)
            return accept(*args)

        s.journal.accept = slow_accept  # type: ignore[method-assign]
        call = asyncio.create_task(s.submit(request))
        await until(entered.is_set)  # journaling on a thread
        call.cancel()  # the client's stream closed
        with pytest.raises(asyncio.CancelledError):
            await call
        release.set()
        await until(lambda: runner.started)
        # The client resends the batch it never saw acknowledged: acknowledged, not run again.
        acks = await s.submit(request)
        assert [a.accepted for a in acks] == [True]
        assert [ids for ids, _ in runner.started] == [["big"]]

    run(journal, body)


def test_a_task_journaled_but_never_queued_is_restored_when_resubmitted(journal: Journal) -> None:
    async def body(s: Scheduler, runner: FakeRunner) -> None:
        lost = spec("lost")
        journal.accept([(DIGEST, "f", PAYLOAD)], [("lost", lost.SerializeToString())], time.time())
        acks = await s.submit(tasks_pb2.SubmitRequest(functions=[FUNCTION], tasks=[lost], session_id="client"))
        assert [a.accepted for a in acks] == [True]
        assert [ids for ids, _ in runner.started] == [["lost"]]
        assert s.tasks["lost"].sessions == {"client"}

    run(journal, body)


def test_a_result_is_found_by_subscribe_and_info_in_the_turn_it_finishes(journal: Journal) -> None:
    async def body(s: Scheduler, runner: FakeRunner) -> None:
        await s.submit(tasks_pb2.SubmitRequest(functions=[FUNCTION], tasks=[spec("a"), spec("b")]))
        session = s.hub.open("late", progress=False)
        # Finished (out of memory), its journal write still pending until the loop turns.
        s._finish(s.tasks["a"], jr.SUCCEEDED, result=b"ra")
        assert s.subscribe("late", ["a"]) == []
        assert [(e.task_id, e.state, e.result) for e in session.take()] == [("a", jr.SUCCEEDED, b"ra")]
        s._finish(s.tasks["b"], jr.SUCCEEDED, result=b"rb")
        info = s.info("b")
        assert info is not None and info.state == jr.SUCCEEDED

    run(journal, body)


def test_a_failed_journal_write_is_retried_and_holds_its_events(journal: Journal,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("intertie_gateway.scheduler.FLUSH_RETRY_S", 0.05)

    async def body(s: Scheduler, runner: FakeRunner) -> None:
        await s.submit(tasks_pb2.SubmitRequest(functions=[FUNCTION], tasks=[spec("a")], session_id="client"))
        session = s.hub.open("client", progress=False)
        s.flush()
        write = journal.write
        failures = [OSError("disk full"), OSError("disk full")]

        def flaky_write(statements: list[Any]) -> None:
            if failures:
                raise failures.pop()
            write(statements)

        s.journal.write = flaky_write  # type: ignore[method-assign]
        runner.started[0][1].ref.result.set_result(ok(b"result"))
        await until(lambda: "a" not in s.tasks)
        s.flush()  # fails: the client must not hear of a result the journal does not have
        assert session.take() == []
        row = journal.get("a")
        assert row is not None and row.state == jr.RUNNING
        await until(lambda: session.events)
        assert [(e.task_id, e.state) for e in session.take()] == [("a", jr.SUCCEEDED)]
        row = journal.get("a")
        assert row is not None and (row.state, row.result) == (jr.SUCCEEDED, b"result")

    run(journal, body)


class FakePeer:
    site_id = "b"

    def __init__(self, abandoned: list[Task]) -> None:
        self.abandoned = abandoned

    def abandon(self) -> list[Task]:
        return self.abandoned


class FakeMembership:
    """A federation whose only peer is down."""

    def views(self) -> list[SiteView]:
        return []

    def peer_for(self, site_id: str) -> None:
        return None


def test_a_peer_going_down_charges_only_the_tasks_it_had(journal: Journal) -> None:
    async def body(s: Scheduler, runner: FakeRunner) -> None:
        s.membership = FakeMembership()  # type: ignore[assignment]
        journal.accept([(DIGEST, "f", PAYLOAD)], [(i, spec(i).SerializeToString()) for i in ("sent", "unsent")], 0)
        at_peer = {}
        for task_id in ("sent", "unsent"):  # max_retries=0: forwarded, one attempt spent at the peer
            task = at_peer[task_id] = Task(spec(task_id), 0.0)
            task.site, task.attempts = "b", 1
            s.tasks[task_id] = task
        s.on_peer_down(FakePeer([at_peer["unsent"]]))  # type: ignore[arg-type]
        assert at_peer["sent"].state == jr.FAILED  # no retries left
        # Never acknowledged by the peer: placed again (here) as its first attempt.
        assert [ids for ids, _ in runner.started] == [["unsent"]]
        assert (at_peer["unsent"].state, at_peer["unsent"].attempts) == (jr.RUNNING, 1)

    run(journal, body)


def start_group(s: Scheduler, journal: Journal, task_ids: list[str]) -> list[Task]:
    journal.accept([(DIGEST, "f", PAYLOAD)], [(i, spec(i).SerializeToString()) for i in task_ids], 0)
    tasks = [Task(spec(i), 0.0) for i in task_ids]
    for task in tasks:
        s.tasks[task.task_id] = task
    s._start_group(tasks)
    return tasks


def test_cancelling_one_task_of_a_fused_call_spares_the_others(journal: Journal) -> None:
    async def body(s: Scheduler, runner: FakeRunner) -> None:
        a, b, c = start_group(s, journal, ["a", "b", "c"])
        assert s.cancel(["a"]) == ["a"]
        assert runner.cancelled == []
        runner.started[0][1].ref.result.set_result([ok(b"ra"), ok(b"rb"), ok(b"rc")])
        await until(lambda: not s.tasks)
        assert [(t.state, t.task_id) for t in (a, b, c)] == [
            (jr.CANCELLED, "a"), (jr.SUCCEEDED, "b"), (jr.SUCCEEDED, "c")]

    run(journal, body, pool_size=1)


def test_cancelling_every_task_of_a_fused_call_stops_it(journal: Journal) -> None:
    async def body(s: Scheduler, runner: FakeRunner) -> None:
        start_group(s, journal, ["a", "b"])
        assert s.cancel(["a", "b"]) == ["a", "b"]
        assert runner.cancelled == [runner.started[0][1]]

    run(journal, body, pool_size=1)


def test_a_clean_stop_requeues_only_what_runs_here(journal: Journal) -> None:
    async def body(s: Scheduler, runner: FakeRunner) -> None:
        await s.submit(tasks_pb2.SubmitRequest(functions=[FUNCTION], tasks=[spec("here")]))
        journal.accept([], [("at-peer", spec("at-peer").SerializeToString())], 0)
        at_peer = s.tasks["at-peer"] = Task(spec("at-peer"), 0.0)
        at_peer.site, at_peer.state, at_peer.attempts = "b", jr.RUNNING, 1
        journal.write([Journal.started("at-peer", 1, "b", 1.0)])
        s.drain()
        here = journal.get("here")
        assert here is not None and (here.state, here.attempts) == (jr.QUEUED, 0)
        there = journal.get("at-peer")
        assert there is not None and (there.state, there.attempts, there.site) == (jr.RUNNING, 1, "b")
        assert (at_peer.state, at_peer.attempts) == (jr.RUNNING, 1)

    run(journal, body)


@pytest.fixture
def placers_built(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Each Placer the scheduler builds, as whether it ignores site state (feasibility checks)."""
    built: list[bool] = []

    class CountingPlacer(Placer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            built.append(kwargs.get("ignore_state", False))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr("intertie_gateway.scheduler.Placer", CountingPlacer)
    return built


def test_a_batch_is_checked_against_the_federation_with_one_placer(journal: Journal, placers_built: list[bool]) -> None:
    built = placers_built
    async def body(s: Scheduler, runner: FakeRunner) -> None:
        s.membership = FakeMembership()  # type: ignore[assignment]
        tasks = [spec(f"t{i}") for i in range(50)] + [tasks_pb2.TaskSpec(
            task_id="gpu", function_digest=DIGEST, python_version=python_version(),
            resources=common_pb2.ResourceRequest(gpus=1))]
        acks = await s.submit(tasks_pb2.SubmitRequest(functions=[FUNCTION], tasks=tasks))
        assert sum(a.accepted for a in acks) == 50
        assert "no site" in acks[-1].error.message and "GPU" in acks[-1].error.message
        assert built.count(True) == 1  # the feasibility check's: all sites, whatever their state

    run(journal, body)


class GpuPeerDown(FakeMembership):
    """A federation whose only GPU site, its peer b, is down."""

    def views(self) -> list[SiteView]:
        return [SiteView("b", state="down", python_version=python_version(), total={"CPU": 2, "GPU": 1},
                         free={"CPU": 2, "GPU": 1})]


def test_a_task_waiting_for_a_down_site_is_placed_again_per_heartbeat_not_per_pump(
        journal: Journal, placers_built: list[bool]) -> None:
    built = placers_built
    async def body(s: Scheduler, runner: FakeRunner) -> None:
        s.membership = GpuPeerDown()  # type: ignore[assignment]
        gpu = [tasks_pb2.TaskSpec(task_id=f"gpu{i}", function_digest=DIGEST, python_version=python_version(),
                                  resources=common_pb2.ResourceRequest(gpus=1)) for i in range(20)]
        acks = await s.submit(tasks_pb2.SubmitRequest(functions=[FUNCTION], tasks=gpu))
        assert all(a.accepted for a in acks)  # b could run them once it is back
        assert all(s.tasks[t.task_id].state == jr.QUEUED for t in gpu) and not runner.started
        after_submit = built.count(True)
        for _ in range(50):  # other tasks finishing here pump the scheduler
            s.pump()
        assert built.count(True) == after_submit
        s.retry_unplaced()  # a heartbeat: one more try for all of them, with one placer
        assert built.count(True) == after_submit + 1
        assert len(s._waiting) == 20 and all(s.tasks[t.task_id].state == jr.QUEUED for t in gpu)

    run(journal, body)


def forwarded(task_id: str, home: str = "h") -> tasks_pb2.TaskSpec:
    s = spec(task_id)
    s.home, s.max_retries = home, 1
    return s


def test_forwarded_tasks_recovered_after_a_restart_wait_for_their_home_to_confirm_them(journal: Journal) -> None:
    """A peer restarted on its journal must not rerun what its home moved elsewhere meanwhile."""
    specs = [forwarded("kept"), forwarded("moved"), forwarded("was-running"), forwarded("other", home="g"),
             spec("mine")]
    journal.accept([(DIGEST, "f", PAYLOAD)], [(s.task_id, s.SerializeToString()) for s in specs], 0)
    journal.write([jr.Journal.started("was-running", 1, "here", 1.0)])

    async def body(s: Scheduler, runner: FakeRunner) -> None:
        s.recover()
        assert [ids for ids, _ in runner.started] == [["mine"]]  # the home's own runs; forwarded ones wait
        assert s.info("moved").state == jr.QUEUED  # type: ignore[union-attr]
        session = s.hub.open("peer:h:secret", progress=False, peer="h")
        unknown, cancelled = s.reconcile("h", session.session_id, ["kept", "was-running", "never-here"])
        assert (unknown, cancelled) == (["never-here"], 1)
        assert sorted(ids[0] for ids, _ in runner.started[1:]) == ["kept", "was-running"]
        await until(lambda: not s._writes)
        # Dropped: no row left (a restart does not find it), no event (the home moved it).
        assert journal.get("moved") is None and s.info("moved") is None and not session.events
        assert journal.get("was-running").attempts == 2  # type: ignore[union-attr]  # its first run was cut
        assert s.info("other").state == jr.QUEUED  # type: ignore[union-attr]  # another home's: still held
        # A task of that home that runs here but is no longer listed was moved away too: stopped.
        running = [r for ids, r in runner.started if ids == ["was-running"]]
        assert s.reconcile("h", session.session_id, ["kept"]) == ([], 1)
        assert runner.cancelled == running and s.info("was-running") is None
        # The home may send it here again later (placed here anew): a new task here, run again.
        acks = await s.submit(tasks_pb2.SubmitRequest(functions=[FUNCTION], tasks=[forwarded("moved")]), peer="h")
        assert acks[0].accepted and [ids for ids, _ in runner.started][-1] == ["moved"]

    run(journal, body)


def test_home_is_honoured_only_on_a_peer_link_and_is_the_link_s_site(journal: Journal) -> None:
    async def body(s: Scheduler, runner: FakeRunner) -> None:
        forged = forwarded("forged", home="elsewhere")
        acks = await s.submit(tasks_pb2.SubmitRequest(functions=[FUNCTION], tasks=[forged]))
        assert not acks[0].accepted and acks[0].error.kind == common_pb2.ERROR_KIND_INVALID_ARGUMENT
        assert "home is set by the gateway" in acks[0].error.message and "forged" not in s.tasks
        acks = await s.submit(tasks_pb2.SubmitRequest(functions=[FUNCTION], tasks=[forwarded("sent", home="x")]),
                              peer="linked")
        assert acks[0].accepted and s.tasks["sent"].spec.home == "linked"

    run(journal, body)


def test_a_huge_task_id_is_not_repeated_back(journal: Journal) -> None:
    async def body(s: Scheduler, runner: FakeRunner) -> None:
        huge = spec("x" * (10 << 20))
        huge.name = "n" * (1 << 20)
        acks = await s.submit(tasks_pb2.SubmitRequest(functions=[FUNCTION], tasks=[huge] * 3))
        assert all(not a.accepted and a.ByteSize() < 1000 for a in acks)
        assert "10485760 chars" in acks[0].error.message

    run(journal, body)
