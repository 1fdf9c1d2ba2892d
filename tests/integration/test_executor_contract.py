"""``fed.executor()`` against the ``concurrent.futures`` documentation, rule by rule.

https://docs.python.org/3/library/concurrent.futures.html: each test quotes the rule it
checks. The executor runs on a real site (the session's shared gateway: 2 CPUs and one
``bigmem`` unit, which is never overcommitted, so a second ``bigmem`` task waits in the
gateway's queue: queued, not running). Tasks that must stay unfinished wait for a release
file the test creates; tests wait on conditions with bounds, never on sleeps.

Where a federation differs, the test says so and checks the documented difference:
``Future.cancel()`` also stops a running task (a thread cannot be stopped; a task can), and
``map()`` reads its input lazily, a bounded window ahead (as ``buffersize`` does in 3.14).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import itertools
import logging
import os
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

import intertie
from intertie.executor import MAP_WINDOW_PER_WORKER, MIN_MAP_WINDOW, FederationExecutor
from intertie.v1 import site_pb2, site_pb2_grpc, tasks_pb2, tasks_pb2_grpc

BOUND_S = 60.0  # how long a condition may take on a loaded 2-core machine


def square(x: int) -> int:
    return x * x


def add(a: int, b: int = 0) -> int:
    return a + b


def fail(x: int) -> int:
    raise ValueError(f"bad {x}")


def nap(seconds: float, value: object) -> object:
    time.sleep(seconds)
    return value


def hold(path: str, value: object = None) -> object:
    """Runs until ``path`` exists (the test's release), then returns ``value``."""
    while not os.path.exists(path):
        time.sleep(0.01)
    return value


class Box:
    """A result that can be watched with a weak reference."""

    def __init__(self, value: int) -> None:
        self.value = value


def boxed(x: int) -> Box:
    return Box(x)


# Not one CPU: the site runs one-CPU tasks on a pool of workers, several queued per worker,
# where a held task would hold up the tasks queued behind it.
hold_task = intertie.remote(cpus=0.5)(hold)
# One bigmem unit at the site: one of these runs, the others wait in the gateway's queue.
hold_bigmem = intertie.remote(resources={"bigmem": 1}, cpus=0.1)(hold)


def wait_for(condition: Callable[[], object], what: str, timeout: float = BOUND_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


class Release:
    """A release file for :func:`hold` tasks; released at the end of the test in any case."""

    def __init__(self, directory: Path, name: str = "go") -> None:
        self.path = directory / name

    def __str__(self) -> str:
        return str(self.path)

    def __call__(self) -> None:
        self.path.touch()


@pytest.fixture
def release(tmp_path: Path) -> Iterator[Callable[[str], Release]]:
    made: list[Release] = []

    def make(name: str = "go") -> Release:
        made.append(Release(tmp_path, name))
        return made[-1]

    yield make
    for r in made:
        r()


@pytest.fixture
def ex(fed: intertie.Federation) -> Iterator[FederationExecutor]:
    executor = fed.executor()
    yield executor
    executor.shutdown(wait=False, cancel_futures=True)
    for future in list(executor._futures):
        future.cancel()


# ---------------------------------------------------------------------- Executor.submit
def test_submit_schedules_the_callable_and_returns_a_future(ex: FederationExecutor) -> None:
    """"Schedules the callable, fn, to be executed as fn(*args, **kwargs) and returns a
    Future object representing the execution of the callable." """
    future = ex.submit(add, 40, b=2)
    assert isinstance(future, concurrent.futures.Future)
    assert future.result(timeout=BOUND_S) == 42


# ---------------------------------------------------------------------- Executor.map
def test_map_returns_results_in_the_order_of_the_input(ex: FederationExecutor) -> None:
    """"Similar to map(fn, *iterables)": results in input order, whatever order the calls
    finish in."""
    delays = [0.3, 0.0, 0.2, 0.0, 0.1]
    assert list(ex.map(nap, delays, range(5))) == list(range(5))
    assert list(ex.map(nap, delays, range(5), chunksize=2)) == list(range(5))


def test_map_stops_at_the_shortest_iterable(ex: FederationExecutor) -> None:
    assert list(ex.map(add, [1, 2, 3], [10, 20])) == [11, 22]
    assert list(ex.map(add, [1, 2, 3], [10, 20], chunksize=2)) == [11, 22]
    assert list(ex.map(square, [])) == []


def test_map_raises_a_call_exception_when_its_value_is_retrieved(ex: FederationExecutor) -> None:
    """"If a fn call raises an exception, then that exception will be raised when its
    value is retrieved from the iterator." """
    def fail_on_three(x: int) -> int:
        if x == 3:
            raise ArithmeticError("three")
        return x

    # In chunks (as ProcessPoolExecutor's), the failing call's chunk fails as a whole.
    for chunksize, before in ((1, [0, 1, 2]), (2, [0, 1])):
        results = ex.map(fail_on_three, range(6), chunksize=chunksize)
        assert [next(results) for _ in before] == before
        with pytest.raises(ArithmeticError, match="three"):
            next(results)


def test_map_timeout_raises_TimeoutError_from_next(ex: FederationExecutor, release) -> None:  # type: ignore[no-untyped-def]
    """"The returned iterator raises a TimeoutError if __next__() is called and the result
    isn't available after timeout seconds from the original call to Executor.map()." """
    go = release()
    started = time.monotonic()
    results = ex.map(hold_task, [str(go)], timeout=0.5)
    with pytest.raises(TimeoutError):
        next(results)
    assert 0.5 <= time.monotonic() - started < 10


def test_map_chunksize_and_buffersize_must_be_positive(ex: FederationExecutor) -> None:
    with pytest.raises(ValueError):
        ex.map(square, [1], chunksize=0)
    with pytest.raises(ValueError):
        ex.map(square, [1], buffersize=0)


def test_map_keeps_at_most_buffersize_calls_unyielded(ex: FederationExecutor) -> None:
    """3.14: "If buffersize is set, ... the number of submitted tasks whose results have not
    yet been yielded" never exceeds it; the input is read as results are yielded."""
    pulled = 0

    def numbers() -> Iterator[int]:
        nonlocal pulled
        for i in range(40):
            pulled += 1
            yield i

    results = ex.map(square, numbers(), buffersize=3)
    assert pulled == 3  # the first window is submitted at once, as map() is called
    got = []
    for value in results:
        got.append(value)
        assert pulled - len(got) <= 3
    assert got == [i * i for i in range(40)]

    pulled = 0
    assert list(ex.map(square, numbers(), chunksize=5, buffersize=2)) == [i * i for i in range(40)]


def test_map_reads_an_endless_iterator_lazily(ex: FederationExecutor) -> None:
    """(Intertie) without buffersize, map() still reads its input a bounded window ahead:
    an endless iterator works with islice."""
    pulled = itertools.count()
    endless = (next(pulled) for _ in itertools.repeat(None))
    assert list(itertools.islice(ex.map(square, endless), 30)) == [i * i for i in range(30)]
    window = max(MAP_WINDOW_PER_WORKER * ex._max_workers, MIN_MAP_WINDOW)
    assert next(pulled) <= 30 + window + 1
    assert list(itertools.islice(ex.map(square, itertools.count(), chunksize=10), 25)) == [i * i for i in range(25)]


def test_map_drops_each_result_once_yielded(ex: FederationExecutor) -> None:
    """(Intertie) the iterator map() returns does not keep the results it yielded."""
    for chunksize in (1, 3):
        results = ex.map(boxed, range(6), chunksize=chunksize)
        first = next(results)
        assert first.value == 0
        ref = weakref.ref(first)
        del first
        assert next(results).value == 1

        def dropped(ref: weakref.ref[Box] = ref) -> bool:
            gc.collect()
            return ref() is None

        wait_for(dropped, "the first result to be freed")
        assert [b.value for b in results] == [2, 3, 4, 5]


def test_map_called_before_shutdown_runs_to_its_end(fed: intertie.Federation) -> None:
    """The stdlib's map() submits everything at once, so ``with executor: it = map(...)``
    then iterating after the block works; a lazy map must keep that working."""
    with fed.executor() as ex:
        results = ex.map(square, range(50), buffersize=4)
    assert list(results) == [i * i for i in range(50)]


# ---------------------------------------------------------------------- Executor.shutdown
def test_submit_and_map_after_shutdown_raise_RuntimeError(fed: intertie.Federation) -> None:
    """"Calls to Executor.submit() and Executor.map() made after shutdown will raise
    RuntimeError." """
    ex = fed.executor()
    ex.shutdown()
    with pytest.raises(RuntimeError):
        ex.submit(square, 1)
    with pytest.raises(RuntimeError):
        ex.map(square, [1])


def test_shutdown_wait_returns_once_every_pending_future_is_done(fed: intertie.Federation) -> None:
    """"If wait is True then this method will not return until all the pending futures are
    done executing"; the context manager shuts down with wait=True."""
    ex = fed.executor()
    futures = [ex.submit(nap, 0.05 * (i % 3), i) for i in range(8)]
    ex.shutdown(wait=True)
    assert all(f.done() for f in futures)
    with fed.executor() as ex2:
        futures = [ex2.submit(nap, 0.1, i) for i in range(4)]
    assert [f.result(timeout=0) for f in futures] == list(range(4))


def test_shutdown_without_wait_returns_at_once(fed: intertie.Federation, release) -> None:  # type: ignore[no-untyped-def]
    """"If wait is False then this method will return immediately." """
    go = release()
    ex = fed.executor()
    future = ex.submit(hold_task, str(go), "held")
    started = time.monotonic()
    ex.shutdown(wait=False)
    assert time.monotonic() - started < 2 and not future.done()
    go()
    assert future.result(timeout=BOUND_S) == "held"


def test_shutdown_cancel_futures_cancels_only_what_has_not_started(fed: intertie.Federation, release) -> None:  # type: ignore[no-untyped-def]
    """"If cancel_futures is True, this method will cancel all pending futures that the
    executor has not started running. Any futures that are completed or running won't be
    cancelled, regardless of the value of cancel_futures." """
    go = release()
    ex = fed.executor()
    done = ex.submit(square, 5)
    assert done.result(timeout=BOUND_S) == 25
    futures = [ex.submit(hold_bigmem, str(go), i) for i in range(4)]
    wait_for(futures[0].running, "the first bigmem task to run")
    assert not any(f.running() for f in futures[1:])  # bigmem is taken: they wait in the queue
    ex.shutdown(wait=False, cancel_futures=True)
    assert [f.cancelled() for f in futures] == [False, True, True, True]
    assert not done.cancelled()
    go()
    assert futures[0].result(timeout=BOUND_S) == 0


# ---------------------------------------------------------------------- Future
def test_cancel_a_pending_call(ex: FederationExecutor, release) -> None:  # type: ignore[no-untyped-def]
    """cancel(): "Attempt to cancel the call... Otherwise the call will be cancelled and the
    method will return True"; cancelled() and done() are True; result() and exception()
    raise CancelledError."""
    go = release()
    running = ex.submit(hold_bigmem, str(go))
    wait_for(running.running, "the bigmem task to run")
    queued = ex.submit(hold_bigmem, str(go))
    assert queued.cancel() is True
    assert queued.cancelled() and queued.done() and not queued.running()
    with pytest.raises(concurrent.futures.CancelledError):
        queued.result(timeout=0)
    with pytest.raises(concurrent.futures.CancelledError):
        queued.exception(timeout=0)
    assert queued.cancel() is True  # cancelling again: still cancelled
    go()
    assert running.result(timeout=BOUND_S) is None


def test_cancel_a_finished_call_returns_false(ex: FederationExecutor) -> None:
    """"If the call is currently being executed or finished running and cannot be cancelled
    then the method will return False." """
    future = ex.submit(square, 3)
    assert future.result(timeout=BOUND_S) == 9
    assert future.cancel() is False
    assert not future.cancelled() and future.done()


def test_cancel_a_running_call_stops_the_task(ex: FederationExecutor, release) -> None:  # type: ignore[no-untyped-def]
    """(Intertie) unlike a thread, a running task can be stopped: cancel() returns True."""
    go = release()
    future = ex.submit(hold_bigmem, str(go))
    wait_for(future.running, "the task to run")
    assert future.cancel() is True
    assert future.cancelled() and not future.running()


def test_running_is_true_once_the_site_runs_the_task(ex: FederationExecutor, release) -> None:  # type: ignore[no-untyped-def]
    """running(): "Return True if the call is currently being executed" (as its site
    reports); done(): "Return True if the call was successfully cancelled or finished
    running." """
    go = release()
    first = ex.submit(hold_bigmem, str(go), 1)
    wait_for(first.running, "the task to run")
    second = ex.submit(hold_bigmem, str(go), 2)
    assert not first.done() and not second.running() and not second.done()
    go()
    assert first.result(timeout=BOUND_S) == 1 and second.result(timeout=BOUND_S) == 2
    assert first.done() and not first.running()


def test_result_and_exception_wait_and_time_out(ex: FederationExecutor, release) -> None:  # type: ignore[no-untyped-def]
    """result()/exception(): "If the call hasn't yet completed then this method will wait up
    to timeout seconds. If the call hasn't completed in timeout seconds, then a TimeoutError
    will be raised"; result() raises the call's exception; exception() returns it, or None."""
    go = release()
    held = ex.submit(hold_task, str(go), 7)
    with pytest.raises(TimeoutError):
        held.result(timeout=0.2)
    with pytest.raises(TimeoutError):
        held.exception(timeout=0.2)
    go()
    assert held.result() == 7 and held.exception() is None  # timeout=None: no limit
    failed = ex.submit(fail, 4)
    with pytest.raises(ValueError, match="bad 4"):
        failed.result(timeout=BOUND_S)
    assert isinstance(failed.exception(timeout=0), ValueError)


def test_done_callbacks_get_the_future_in_the_order_added(ex: FederationExecutor, release) -> None:  # type: ignore[no-untyped-def]
    """add_done_callback(): "fn will be called, with the future as its only argument, when
    the future is cancelled or finishes running. Added callables are called in the order
    that they were added and are always called in a thread belonging to the process that
    added them"; (Intertie) never on the client's I/O thread."""
    go = release()
    calls: list[tuple[str, concurrent.futures.Future[object], str]] = []
    finished = threading.Event()
    future = ex.submit(hold_task, str(go), 1)
    for name in ("a", "b", "c"):
        future.add_done_callback(lambda f, name=name: calls.append((name, f, threading.current_thread().name)))
    future.add_done_callback(lambda f: finished.set())
    go()
    assert finished.wait(BOUND_S)
    assert [(n, f) for n, f, _ in calls] == [("a", future), ("b", future), ("c", future)]
    assert all(t.startswith("intertie-callbacks") for _, _, t in calls), calls


def test_a_done_callback_runs_for_a_cancelled_future(ex: FederationExecutor, release) -> None:  # type: ignore[no-untyped-def]
    go = release()
    running = ex.submit(hold_bigmem, str(go))
    wait_for(running.running, "the bigmem task to run")
    queued = ex.submit(hold_bigmem, str(go))
    seen: list[bool] = []
    queued.add_done_callback(lambda f: seen.append(f.cancelled()))
    assert queued.cancel()
    wait_for(lambda: seen, "the callback")
    assert seen == [True]


def test_a_callback_on_a_done_future_is_called_immediately(ex: FederationExecutor) -> None:
    """"If the future has already completed or been cancelled, fn will be called
    immediately." """
    future = ex.submit(square, 2)
    future.result(timeout=BOUND_S)
    seen: list[str] = []
    future.add_done_callback(lambda f: seen.append(threading.current_thread().name))
    assert seen == [threading.current_thread().name]


def test_a_failing_callback_is_logged_and_ignored(ex: FederationExecutor, caplog: pytest.LogCaptureFixture) -> None:
    """"If the callable raises an Exception subclass, it will be logged and ignored." """
    after: list[int] = []
    done = threading.Event()
    future = ex.submit(square, 6)
    with caplog.at_level(logging.ERROR, logger="concurrent.futures"):
        future.add_done_callback(lambda f: 1 / 0)
        future.add_done_callback(lambda f: (after.append(f.result()), done.set()))
        assert done.wait(BOUND_S)
    assert after == [36]
    assert any("exception calling callback" in r.getMessage() for r in caplog.records)


def test_a_callback_waiting_on_another_future_does_not_stall_results(ex: FederationExecutor, release) -> None:  # type: ignore[no-untyped-def]
    """(Intertie) callbacks never run on the I/O thread: one that waits for another
    future's result cannot hold up the results of the connection."""
    go_first, go_second = release("first"), release("second")
    first = ex.submit(hold_task, str(go_first), "first")
    second = ex.submit(hold_task, str(go_second), "second")
    got: list[object] = []
    first.add_done_callback(lambda f: got.append(second.result(timeout=BOUND_S)))
    go_first()
    wait_for(first.done, "the first task")
    # The callback is now blocked on the second task: results still flow meanwhile.
    assert ex.submit(square, 11).result(timeout=BOUND_S) == 121
    go_second()
    wait_for(lambda: got, "the callback to get the second result")
    assert got == ["second"]


# ---------------------------------------------------------------------- module functions
def test_wait_all_completed_returns_a_named_tuple(ex: FederationExecutor) -> None:
    """wait(): "Returns a named 2-tuple of sets. The first set, named done, contains the
    futures that completed ... The second set, named not_done"; ALL_COMPLETED by default;
    futures "created by different Executor instances" may be mixed; duplicates are fine."""
    futures = [ex.submit(nap, 0.05 * (i % 3), i) for i in range(6)]
    with concurrent.futures.ThreadPoolExecutor(1) as threads:
        local = threads.submit(square, 3)
        result = concurrent.futures.wait(futures + futures[:2] + [local], timeout=BOUND_S)
    assert result.done == set(futures) | {local} and result.not_done == set()
    assert [f.result() for f in futures] == list(range(6))


def returns_when_the_other_ends(ex: FederationExecutor, go: Release, fn: Callable[[int], int],
                                return_when: str) -> concurrent.futures.Future[object]:
    """wait([held, fn(2)], return_when) returns with fn's future done, the held one not;
    returns the held one."""
    held = ex.submit(hold_task, str(go))
    other = ex.submit(fn, 2)
    done, not_done = concurrent.futures.wait([held, other], timeout=BOUND_S, return_when=return_when)
    assert other in done and held in not_done
    return held


def test_wait_first_completed_and_timeout(ex: FederationExecutor, release) -> None:  # type: ignore[no-untyped-def]
    """FIRST_COMPLETED: "The function will return when any future finishes or is
    cancelled"; timeout: "the maximum number of seconds to wait before returning"."""
    held = returns_when_the_other_ends(ex, release(), square, concurrent.futures.FIRST_COMPLETED)
    started = time.monotonic()
    done, not_done = concurrent.futures.wait([held], timeout=0.3)
    assert not done and not_done == {held} and time.monotonic() - started >= 0.3


def test_wait_first_exception(ex: FederationExecutor, release) -> None:  # type: ignore[no-untyped-def]
    """FIRST_EXCEPTION: "The function will return when any future finishes by raising an
    exception. If no future raises an exception then it is equivalent to ALL_COMPLETED." """
    returns_when_the_other_ends(ex, release(), fail, concurrent.futures.FIRST_EXCEPTION)
    fine = [ex.submit(square, i) for i in range(3)]
    done, not_done = concurrent.futures.wait(fine, timeout=BOUND_S, return_when=concurrent.futures.FIRST_EXCEPTION)
    assert done == set(fine) and not not_done


def test_wait_and_as_completed_wake_for_a_cancelled_future(ex: FederationExecutor, release) -> None:  # type: ignore[no-untyped-def]
    """A cancelled future counts as completed for wait() ("finishes or is cancelled") and
    as_completed() ("Returns an iterator over the Future instances ... that yields futures
    as they complete (finished or cancelled futures)"), including waits already blocked."""
    go = release()
    running = ex.submit(hold_bigmem, str(go))
    wait_for(running.running, "the bigmem task to run")
    queued = [ex.submit(hold_bigmem, str(go)) for _ in range(3)]
    yielded: list[concurrent.futures.Future[object]] = []
    waited: list[object] = []
    blocked = [threading.Thread(target=lambda: yielded.extend(concurrent.futures.as_completed(queued[:2],
                                                                                                timeout=BOUND_S))),
               threading.Thread(target=lambda: waited.append(concurrent.futures.wait(queued[:2], timeout=BOUND_S)))]
    for t in blocked:
        t.start()
    wait_for(lambda: all(len(f._waiters) == 2 for f in queued[:2]), "both waits to block")
    started = time.monotonic()
    assert queued[0].cancel() and queued[1].cancel()
    for t in blocked:
        t.join(BOUND_S)
    assert time.monotonic() - started < 10
    assert set(yielded) == set(queued[:2])
    assert waited[0].done == set(queued[:2])  # type: ignore[attr-defined]
    assert queued[2].cancel()
    done, _ = concurrent.futures.wait([queued[2]], timeout=5)  # cancelled before the wait
    assert done == {queued[2]}
    go()
    running.result(timeout=BOUND_S)


def test_as_completed_yields_finished_first_and_times_out(ex: FederationExecutor, release) -> None:  # type: ignore[no-untyped-def]
    """as_completed(): "Any futures given by fs that are duplicated will be returned once.
    Any futures that completed before as_completed() is called will be yielded first. The
    returned iterator raises a TimeoutError if __next__() is called and the result isn't
    available after timeout seconds from the original call to as_completed()." """
    go = release()
    finished = ex.submit(square, 4)
    finished.result(timeout=BOUND_S)
    held = ex.submit(hold_task, str(go))
    iterator = concurrent.futures.as_completed([held, finished, finished], timeout=0.5)
    assert next(iterator) is finished
    with pytest.raises(TimeoutError):
        next(iterator)
    go()
    assert list(concurrent.futures.as_completed([held, held], timeout=BOUND_S)) == [held]


def test_asyncio_run_in_executor(ex: FederationExecutor) -> None:
    """An Executor works with asyncio's loop.run_in_executor()."""
    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        return list(await asyncio.gather(*(loop.run_in_executor(ex, square, i) for i in range(5))))

    assert asyncio.run(main()) == [0, 1, 4, 9, 16]


# ---------------------------------------------------------------------- what Dask needs
def test_max_workers_is_the_federation_cpus_unless_given(fed: intertie.Federation) -> None:
    """Dask's threaded scheduler reads ``pool._max_workers``."""
    assert fed.executor()._max_workers == 2  # the shared site: 2 CPUs
    assert fed.executor(max_workers=5)._max_workers == 5
    with pytest.raises(ValueError):
        fed.executor(max_workers=0)


def test_dask_runs_a_graph_through_the_executor_both_ways(fed: intertie.Federation) -> None:
    dask = pytest.importorskip("dask")
    from dask import delayed

    parts = [delayed(square)(i) for i in range(8)]
    total = delayed(sum)(parts)
    with fed.executor() as ex:
        assert dask.compute(total, scheduler=ex) == (sum(i * i for i in range(8)),)
        with dask.config.set(pool=ex):
            assert dask.compute(total, scheduler="threads") == (sum(i * i for i in range(8)),)
        assert dask.compute(*parts, scheduler=ex) == tuple(i * i for i in range(8))


# ---------------------------------------------------------------------- exit
EXIT_SCRIPT = """
import sys, intertie
fed = intertie.connect(sys.argv[1])
futures = [fed.submit(pow, 2, i) for i in range(5)]
print(" ".join(f.task_id for f in futures), flush=True)
# The program ends here: the submissions may still be in the client.
"""


def test_tasks_submitted_just_before_exit_are_sent(fed: intertie.Federation, gateway) -> None:  # type: ignore[no-untyped-def]
    """A task whose submit() returned is not lost when the program ends at once."""
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, gateway.address], capture_output=True,
                             text=True, timeout=BOUND_S)
        assert out.returncode == 0, out.stderr
        ids = out.stdout.split()
        assert len(ids) == 5
        for i, task_id in enumerate(ids):
            assert fed.future(task_id).result(timeout=BOUND_S) == 2 ** i  # TaskNotFoundError if lost
        assert "not sent" not in out.stderr


class SilentGateway(tasks_pb2_grpc.TaskServiceServicer, site_pb2_grpc.SiteServiceServicer):
    """Opens sessions and never acknowledges a submission."""

    def GetStatus(self, request: object, context: object) -> site_pb2.SiteStatus:
        return site_pb2.SiteStatus(site_id="silent", max_payload_bytes=1 << 20)

    def Connect(self, requests: Iterator[tasks_pb2.ClientMessage], context: object) -> Iterator[tasks_pb2.ServerMessage]:
        next(requests)
        yield tasks_pb2.ServerMessage(events=tasks_pb2.TaskEvents())
        for _ in requests:
            pass


UNSENT_SCRIPT = """
import sys, intertie
from intertie import client
client.EXIT_FLUSH_TIMEOUT_S = 1.0
fed = intertie.connect(sys.argv[1])
futures = [fed.submit(pow, 2, i) for i in range(3)]
print(" ".join(f.task_id for f in futures), flush=True)
sys.stdin.readline()  # the test says when to exit
"""


@pytest.mark.parametrize("home", ["silent", "down"])
def test_what_cannot_be_sent_at_exit_is_named_with_the_reason(home: str) -> None:
    """At exit, sending is bounded in time, and a warning names what was not sent and why."""
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(4))
    tasks_pb2_grpc.add_TaskServiceServicer_to_server(SilentGateway(), server)
    site_pb2_grpc.add_SiteServiceServicer_to_server(SilentGateway(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        script = subprocess.Popen([sys.executable, "-c", UNSENT_SCRIPT, f"127.0.0.1:{port}"], text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert script.stdout is not None and script.stdin is not None
        ids = script.stdout.readline().split()
        assert len(ids) == 3
        if home == "down":
            server.stop(None).wait()
        started = time.monotonic()
        _, stderr = script.communicate("exit\n", timeout=BOUND_S)
        assert script.returncode == 0, stderr
        assert time.monotonic() - started < 20
    finally:
        server.stop(None)
    assert "3 tasks submitted were not sent before the program exited" in stderr, stderr
    assert all(task_id in stderr for task_id in ids), stderr
    if home == "silent":
        assert "did not acknowledge them within 1 s" in stderr
    else:
        assert "unreachable" in stderr
