"""Running tasks on a real site: results, errors, executor, cancellation, timeouts."""

from __future__ import annotations

import concurrent.futures
import time

import pytest

import intertie


def square(x: int) -> int:
    return x * x


def add(a: int, b: int = 0) -> int:
    return a + b


class NeedsTwoArgs(Exception):
    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"code {code}: {detail}")
        self.code = code
        self.detail = detail


def raise_value_error(x: int) -> None:
    raise ValueError(f"bad value {x}")


def raise_custom() -> None:
    raise NeedsTwoArgs(7, "seven")


def raise_key_error() -> None:
    {}["missing"]


def test_thousand_tasks_return_correct_results(fed: intertie.Federation) -> None:
    remote_square = intertie.remote(square)
    futures = [remote_square.submit(i) for i in range(1000)]
    results = {f.task_id: f.result(timeout=120) for f in futures}
    assert [results[f.task_id] for f in futures] == [i * i for i in range(1000)]
    assert len({f.task_id for f in futures}) == 1000
    assert all(f.site == "shared" and f.attempts == 1 for f in futures)


def test_kwargs_and_undecorated_functions(fed: intertie.Federation) -> None:
    assert fed.submit(add, 2, b=40).result(timeout=60) == 42
    assert intertie.remote(add).submit(1, b=2).result(timeout=60) == 3


def test_decorated_function_still_runs_locally() -> None:
    remote_add = intertie.remote(cpus=1)(add)
    assert remote_add(2, 3) == 5  # no federation involved


def test_as_completed_and_wait(fed: intertie.Federation) -> None:
    futures = [fed.submit(time.sleep, 0.05 * (i % 3)) for i in range(12)]
    done = list(concurrent.futures.as_completed(futures, timeout=60))
    assert set(done) == set(futures)
    finished, not_done = concurrent.futures.wait(futures, timeout=1)
    assert not not_done and len(finished) == 12


def test_executor_map_with_chunks_keeps_order(fed: intertie.Federation) -> None:
    with fed.executor() as ex:
        assert list(ex.map(add, range(5000), range(5000), chunksize=250)) == [2 * i for i in range(5000)]
        assert list(ex.map(square, range(20))) == [i * i for i in range(20)]
        assert ex.submit(add, 1, 1).result(timeout=60) == 2


def test_executor_map_raises_first_error_in_order(fed: intertie.Federation) -> None:
    def maybe_fail(x: int) -> int:
        if x == 13:
            raise ArithmeticError("thirteen")
        return x

    with fed.executor() as ex:
        results = ex.map(maybe_fail, range(30), chunksize=5)
        got = []
        with pytest.raises(ArithmeticError, match="thirteen"):
            for r in results:
                got.append(r)
        assert got == list(range(10))  # chunks before the failing one are delivered


def test_remote_exception_is_original_type_with_traceback(fed: intertie.Federation) -> None:
    fut = fed.submit(raise_value_error, 5)
    with pytest.raises(ValueError) as info:
        fut.result(timeout=60)
    err = info.value
    assert isinstance(err, intertie.RemoteTaskError)
    assert isinstance(err, intertie.IntertieError)
    assert err.args == ("bad value 5",)
    assert "raise_value_error" in err.remote_traceback
    assert err.remote_type.endswith("ValueError")
    assert "Remote traceback" in str(err)


def test_exception_with_unusual_init_is_still_rebuilt(fed: intertie.Federation) -> None:
    with pytest.raises(NeedsTwoArgs) as info:
        fed.submit(raise_custom).result(timeout=60)
    assert isinstance(info.value, intertie.RemoteTaskError)
    assert info.value.code == 7 and info.value.detail == "seven"


def test_key_error_keeps_args(fed: intertie.Federation) -> None:
    with pytest.raises(KeyError) as info:
        fed.submit(raise_key_error).result(timeout=60)
    assert info.value.args == ("missing",)


def test_user_exceptions_are_not_retried(fed: intertie.Federation) -> None:
    fut = intertie.remote(max_retries=3)(raise_value_error).submit(1)
    with pytest.raises(ValueError):
        fut.result(timeout=60)
    assert fed.task(fut.task_id).attempts == 1


def test_cancel_running_and_queued_tasks(fed: intertie.Federation) -> None:
    # The site has bigmem=1 and custom resources are never overcommitted: the first
    # sleeper runs in Ray, the others wait in the gateway's queue.
    sleep_big = intertie.remote(resources={"bigmem": 1}, cpus=0.1)(time.sleep)
    sleepers = [sleep_big.submit(60) for _ in range(4)]
    plain = fed.submit(time.sleep, 60)
    deadline = time.monotonic() + 30
    while fed.task(sleepers[0].task_id).state != "RUNNING" or fed.task(plain.task_id).state != "RUNNING":
        assert time.monotonic() < deadline, "sleepers never started"
        time.sleep(0.05)
    assert [fed.task(f.task_id).state for f in sleepers[1:]] == ["QUEUED"] * 3
    assert sleepers[-1].cancel()  # queued
    assert sleepers[0].cancel()  # running
    assert plain.cancel()  # running
    # Capacity freed by the cancelled runner goes to the next queued task.
    deadline = time.monotonic() + 30
    while fed.task(sleepers[1].task_id).state != "RUNNING":
        assert time.monotonic() < deadline, "queued sleeper did not start after a cancel"
        time.sleep(0.05)
    for fut in sleepers[1:3]:
        assert fut.cancel()
    for fut in sleepers + [plain]:
        assert fut.cancelled()
        with pytest.raises(concurrent.futures.CancelledError):
            fut.result(timeout=1)
        assert fed.task(fut.task_id).state == "CANCELLED"
    assert fed.submit(square, 9).result(timeout=60) == 81


def test_cancel_after_finish_returns_false(fed: intertie.Federation) -> None:
    fut = fed.submit(square, 3)
    assert fut.result(timeout=60) == 9
    assert fut.cancel() is False
    assert fed.cancel([fut.task_id]) == []


def test_timeout_fails_future_and_frees_site(fed: intertie.Federation) -> None:
    slow = intertie.remote(timeout=1.0)(time.sleep)
    started = time.monotonic()
    fut = slow.submit(60)
    with pytest.raises(intertie.TaskTimeoutError, match="timeout of 1 s"):
        fut.result(timeout=60)
    assert time.monotonic() - started < 30
    info = fed.task(fut.task_id)
    assert info.state == "FAILED" and info.error_kind == "timeout"
    assert fed.submit(square, 4).result(timeout=60) == 16


def test_options_override_and_resources(fed: intertie.Federation) -> None:
    f = intertie.remote(cpus=1)(square)
    g = f.options(cpus=0.5, resources={"bigmem": 1}, max_retries=0)
    fut = g.submit(6)
    assert fut.result(timeout=60) == 36
    info = fed.task(fut.task_id)
    assert info.resources.custom == {"bigmem": 1.0} and info.resources.cpus == 0.5
    assert info.max_retries == 0


def test_future_for_earlier_task_from_new_client(fed: intertie.Federation, gateway) -> None:  # type: ignore[no-untyped-def]
    fut = fed.submit(square, 12)
    assert fut.result(timeout=60) == 144
    with intertie.connect(gateway.address) as other:
        again = other.future(fut.task_id)
        assert again.result(timeout=60) == 144
        assert again.site == "shared"
        pending = other.submit(time.sleep, 0.5)
        other.close(cancel=False)  # leaves it to run (close() would cancel it): a later client follows it
    # A task still running when looked up resolves when it finishes.
    with intertie.connect(gateway.address) as third:
        assert third.future(pending.task_id).result(timeout=60) is None


def test_cancel_right_after_submit_never_loses_the_race(fed: intertie.Federation) -> None:
    for _ in range(20):
        fut = fed.submit(time.sleep, 30)
        assert fut.cancel()
        assert fut.cancelled()
        try:
            assert fed.task(fut.task_id).state == "CANCELLED"
        except intertie.TaskNotFoundError:
            pass  # cancelled before its Submit left the client: the gateway never saw it


def crash_once(marker: str, value: int) -> int:
    """Kills its worker process the first time it runs, then returns value."""
    import os

    if not os.path.exists(marker):
        with open(marker, "w"):
            pass
        os._exit(1)
    return value


def test_worker_crash_is_retried_and_tasks_behind_it_are_not_charged(
        fed: intertie.Federation, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # One-CPU tasks run on the site's pool of long-lived workers, several queued per
    # worker; the crash takes the worker and everything queued on it down.
    crasher = intertie.remote(max_retries=1)(crash_once).submit(str(tmp_path / "crashed"), 42)
    bystanders = [intertie.remote(max_retries=0)(square).submit(i) for i in range(40)]
    assert crasher.result(timeout=120) == 42
    assert fed.task(crasher.task_id).attempts == 2
    assert "worker failed" in fed.task(crasher.task_id).history[0].outcome
    assert [f.result(timeout=120) for f in bystanders] == [i * i for i in range(40)]
    # max_retries=0: had a bystander been charged for the crash, it would have failed.
    assert all(fed.task(f.task_id).attempts == 1 for f in bystanders)


def test_crash_without_retries_left_fails_with_site_failure(fed: intertie.Federation, tmp_path) -> None:  # type: ignore[no-untyped-def]
    fut = intertie.remote(max_retries=0)(crash_once).submit(str(tmp_path / "crashed"), 1)
    with pytest.raises(intertie.SiteFailureError, match="no retries left"):
        fut.result(timeout=120)


def test_cancelling_a_running_pooled_task_spares_the_tasks_queued_behind_it(fed: intertie.Federation) -> None:
    sleepers = [fed.submit(time.sleep, 60) for _ in range(2)]  # one per CPU of the site
    deadline = time.monotonic() + 30
    while any(fed.task(f.task_id).state != "RUNNING" for f in sleepers):
        assert time.monotonic() < deadline, "sleepers never started"
        time.sleep(0.05)
    behind = [intertie.remote(max_retries=0)(square).submit(i) for i in range(10)]
    time.sleep(0.5)  # let them reach the workers' queues
    for fut in sleepers:
        assert fut.cancel()
    assert [f.result(timeout=120) for f in behind] == [i * i for i in range(10)]
    assert all(fed.task(f.task_id).attempts == 1 for f in behind)
