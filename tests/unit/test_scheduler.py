"""The driver of the task core with a real journal and a stand-in Ray: group commit, intake's
idempotency, recovery and draining. The core's decisions are tested without an event loop
in test_lifecycle.py, test_dispatch.py and test_federate.py."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from core_fakes import FakeRunner, ok

from intertie.spec import python_version
from intertie.v1 import common_pb2, tasks_pb2
from intertie_gateway.book import Task
from intertie_gateway.config import GatewayConfig
from intertie_gateway.convert import spec_from_proto
from intertie_gateway.intake import INLINE_JOURNAL_BYTES, SLICE_TASKS
from intertie_gateway.journal import Journal
from intertie_gateway.lifecycle import Phase, State
from intertie_gateway.model import Started
from intertie_gateway.scheduler import Scheduler
from intertie_gateway.sessions import SessionHub
from intertie_gateway.tenancy import Caller

PAYLOAD = b"pickled function"
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()
FUNCTION = tasks_pb2.Function(digest=DIGEST, payload=PAYLOAD, name="f")


def spec(task_id: str, args: bytes = b"args") -> tasks_pb2.TaskSpec:
    return tasks_pb2.TaskSpec(task_id=task_id, function_digest=DIGEST, args=args, python_version=python_version())


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal(tmp_path / "journal.sqlite")
    yield j
    j.close()


def run(journal: Journal, body: Callable[[Scheduler, FakeRunner], Awaitable[None]]) -> None:
    async def main() -> None:
        runner = FakeRunner()
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
        call = asyncio.create_task(s.intake.submit(request))
        await until(entered.is_set)  # journaling on a thread
        call.cancel()  # the client's stream closed
        with pytest.raises(asyncio.CancelledError):
            await call
        release.set()
        await until(lambda: runner.started)
        # The client resends the batch it never saw acknowledged: acknowledged, not run again.
        acks = await s.intake.submit(request)
        assert [a.accepted for a in acks] == [True]
        assert [ids for ids, _ in runner.started] == [["big"]]

    run(journal, body)


def test_a_batch_of_many_tasks_is_taken_a_slice_at_a_time_with_other_calls_served_between(
        journal: Journal) -> None:
    async def body(s: Scheduler, runner: FakeRunner) -> None:
        big = [spec(f"t{i}") for i in range(2 * SLICE_TASKS + 5)] + [spec("t0")]  # t0 again, in a later slice
        journaled_then: list[int] = []

        async def one_task() -> list[tasks_pb2.TaskAck]:
            acks = await s.intake.submit(tasks_pb2.SubmitRequest(
                functions=[FUNCTION], tasks=[spec("quiet")], session_id="quiet"))
            journaled_then.append(len(journal.get_many([t.task_id for t in big])))
            return acks

        flood = asyncio.create_task(s.intake.submit(tasks_pb2.SubmitRequest(
            functions=[FUNCTION], tasks=big, session_id="flood")))
        quiet = asyncio.create_task(one_task())
        assert [a.accepted for a in await quiet] == [True]
        assert 0 < journaled_then[0] < len(big) - 1  # served while the big batch was under way
        acks = await flood
        assert [a.task_id for a in acks] == [t.task_id for t in big] and all(a.accepted for a in acks)
        assert len(journal.get_many([t.task_id for t in big])) == len(big) - 1
        assert sorted(s.book.tasks["t0"].sessions) == ["flood"]  # once, however often the batch names it

    run(journal, body)


def test_a_task_journaled_but_never_queued_is_restored_when_resubmitted(journal: Journal) -> None:
    async def body(s: Scheduler, runner: FakeRunner) -> None:
        lost = spec("lost")
        journal.accept([(DIGEST, "f", PAYLOAD)], [("lost", lost.SerializeToString(), lost.args)], time.time())
        acks = await s.intake.submit(tasks_pb2.SubmitRequest(functions=[FUNCTION], tasks=[lost], session_id="client"))
        assert [a.accepted for a in acks] == [True]
        assert [ids for ids, _ in runner.started] == [["lost"]]
        assert s.book.tasks["lost"].sessions == {"client"}

    run(journal, body)


def test_a_result_is_found_by_subscribe_and_info_in_the_turn_it_finishes(journal: Journal) -> None:
    async def body(s: Scheduler, runner: FakeRunner) -> None:
        await s.intake.submit(tasks_pb2.SubmitRequest(functions=[FUNCTION], tasks=[spec("a"), spec("b")]))
        session = s.hub.open("late", progress=False)
        # Finished (out of memory), its journal write still pending until the loop turns.
        s.book.move(s.book.tasks["a"], Phase.SUCCEEDED, result=b"ra")
        assert s.queries.subscribe("late", ["a"]) == []
        assert [(e.task_id, e.state, e.result) for e in session.take()] == [("a", State.SUCCEEDED, b"ra")]
        s.book.move(s.book.tasks["b"], Phase.SUCCEEDED, result=b"rb")
        info = s.queries.info("b")
        assert info is not None and info.state == State.SUCCEEDED

    run(journal, body)


def test_a_failed_journal_write_is_retried_and_holds_its_events(journal: Journal,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("intertie_gateway.scheduler.FLUSH_RETRY_S", 0.05)

    async def body(s: Scheduler, runner: FakeRunner) -> None:
        await s.intake.submit(tasks_pb2.SubmitRequest(functions=[FUNCTION], tasks=[spec("a")], session_id="client"))
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
        await until(lambda: "a" not in s.book.tasks)
        s.flush()  # fails: the client must not hear of a result the journal does not have
        assert session.take() == []
        row = journal.get("a")
        assert row is not None and row.state == State.RUNNING
        await until(lambda: session.events)
        assert [(e.task_id, e.state) for e in session.take()] == [("a", State.SUCCEEDED)]
        row = journal.get("a")
        assert row is not None and (row.state, row.result) == (State.SUCCEEDED, b"result")

    run(journal, body)


def test_a_clean_stop_requeues_only_what_runs_here(journal: Journal) -> None:
    async def body(s: Scheduler, runner: FakeRunner) -> None:
        await s.intake.submit(tasks_pb2.SubmitRequest(functions=[FUNCTION], tasks=[spec("here")]))
        journal.accept([], [("at-peer", spec("at-peer").SerializeToString(), b"args")], 0)
        at_peer = Task(spec_from_proto(spec("at-peer")), 0.0)  # as recovered: sent to b before a restart, running there
        at_peer.site, at_peer.attempts = "b", 1
        s.book.move(at_peer, Phase.FORWARDING)
        s.book.move(at_peer, Phase.RUNNING_AT_PEER)
        journal.write([Started("at-peer", 1, "b", 1.0)])
        s.drain()
        here = journal.get("here")
        assert here is not None and (here.state, here.attempts) == (State.QUEUED, 0)
        there = journal.get("at-peer")
        assert there is not None and (there.state, there.attempts, there.site) == (State.RUNNING, 1, "b")
        assert (at_peer.phase, at_peer.attempts) == (Phase.RUNNING_AT_PEER, 1)

    run(journal, body)


def forwarded(task_id: str, home: str = "h") -> tasks_pb2.TaskSpec:
    s = spec(task_id)
    s.home, s.max_retries = home, 1
    return s


HOME_H = Caller(peer="h")  # the home "h" asking of the tasks it forwarded here


def test_forwarded_tasks_recovered_after_a_restart_wait_for_their_home_to_confirm_them(journal: Journal) -> None:
    """A peer restarted on its journal must not rerun what its home moved elsewhere meanwhile."""
    specs = [forwarded("kept"), forwarded("moved"), forwarded("was-running"), forwarded("other", home="g"),
             spec("mine")]
    journal.accept([(DIGEST, "f", PAYLOAD)], [(s.task_id, s.SerializeToString(), s.args) for s in specs], 0)
    journal.write([Started("was-running", 1, "here", 1.0)])

    async def body(s: Scheduler, runner: FakeRunner) -> None:
        s.recover()
        assert [ids for ids, _ in runner.started] == [["mine"]]  # the home's own runs; forwarded ones wait
        assert s.queries.info("moved", HOME_H).state == State.QUEUED  # type: ignore[union-attr]
        session = s.hub.open("peer:h:secret", progress=False, peer="h")
        unknown, cancelled = s.reconcile("h", session.session_id, ["kept", "was-running", "never-here"])
        assert (unknown, cancelled) == (["never-here"], 1)
        assert sorted(ids[0] for ids, _ in runner.started[1:]) == ["kept", "was-running"]
        await until(lambda: not s.book.changes)
        # Dropped: no row left (a restart does not find it), no event (the home moved it).
        assert journal.get("moved") is None and s.queries.info("moved", HOME_H) is None and not session.events
        assert journal.get("was-running").attempts == 2  # type: ignore[union-attr]  # its first run was cut
        assert s.queries.info("other", Caller(peer="g")).state == State.QUEUED  # type: ignore[union-attr]  # another home's: still held
        # A task of that home that runs here but is no longer listed was moved away too: stopped.
        running = [r for ids, r in runner.started if ids == ["was-running"]]
        assert s.reconcile("h", session.session_id, ["kept"]) == ([], 1)
        assert runner.cancelled == running and s.queries.info("was-running", HOME_H) is None
        # The home may send it here again later (placed here anew): a new task here, run again.
        acks = await s.intake.submit(tasks_pb2.SubmitRequest(functions=[FUNCTION], tasks=[forwarded("moved")]), peer="h")
        assert acks[0].accepted and [ids for ids, _ in runner.started][-1] == ["moved"]

    run(journal, body)


def test_home_is_honoured_only_on_a_peer_link_and_is_the_link_s_site(journal: Journal) -> None:
    async def body(s: Scheduler, runner: FakeRunner) -> None:
        forged = forwarded("forged", home="elsewhere")
        acks = await s.intake.submit(tasks_pb2.SubmitRequest(functions=[FUNCTION], tasks=[forged]))
        assert not acks[0].accepted and acks[0].error.kind == common_pb2.ERROR_KIND_INVALID_ARGUMENT
        assert "home is set by the gateway" in acks[0].error.message and "forged" not in s.book.tasks
        acks = await s.intake.submit(tasks_pb2.SubmitRequest(functions=[FUNCTION], tasks=[forwarded("sent", home="x")]),
                              peer="linked")
        assert acks[0].accepted and s.book.tasks["sent"].spec.home == "linked"

    run(journal, body)


def test_a_huge_task_id_is_not_repeated_back(journal: Journal) -> None:
    async def body(s: Scheduler, runner: FakeRunner) -> None:
        huge = spec("x" * (10 << 20))
        huge.name = "n" * (1 << 20)
        acks = await s.intake.submit(tasks_pb2.SubmitRequest(functions=[FUNCTION], tasks=[huge] * 3))
        assert all(not a.accepted and a.ByteSize() < 1000 for a in acks)
        assert "10485760 chars" in acks[0].error.message

    run(journal, body)
