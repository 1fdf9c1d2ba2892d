"""Nothing acknowledged is lost: SIGKILL and SIGTERM of a site, then a restart on the same state."""

from __future__ import annotations

import time

import pytest

import intertie


def slow_square(x: int) -> int:
    time.sleep(0.2)
    return x * x


def square(x: int) -> int:
    return x * x


def _wait_running(fed: intertie.Federation, task_id: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while fed.task(task_id).state != "RUNNING":
        assert time.monotonic() < deadline, f"task {task_id} never started"
        time.sleep(0.05)


def test_sigkill_and_restart_keeps_every_acknowledged_task(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    site = gateway_factory(num_cpus=1, site_id="crashy").start()
    port = site.address.rpartition(":")[2]
    client = intertie.connect(site.address)
    try:
        finished = [client.submit(square, i) for i in range(20)]
        assert [f.result(timeout=60) for f in finished] == [i * i for i in range(20)]
        doomed = intertie.remote(max_retries=0)(time.sleep).submit(120)  # running at the kill
        _wait_running(client, doomed.task_id)
        retried = intertie.remote(max_retries=1)(slow_square).submit(7)  # in Ray at the kill, may retry
        queued = [client.submit(slow_square, i) for i in range(30)]  # mostly still in the gateway queue
        time.sleep(0.3)
        site.kill()  # SIGKILL: gateway and its Ray, nothing flushed on purpose

        site.args[site.args.index("--listen") + 1] = f"127.0.0.1:{port}"
        site.start()
        assert site.address.endswith(f":{port}")

        # The client that was connected before the crash gets its results after the restart.
        assert [f.result(timeout=120) for f in queued] == [i * i for i in range(30)]
        assert retried.result(timeout=60) == 49
        with pytest.raises(intertie.SiteFailureError, match="gateway stopped while the task was running"):
            doomed.result(timeout=60)

        # A new client finds every task by id; finished results were kept.
        with intertie.connect(site.address) as fresh:
            assert [fresh.future(f.task_id).result(timeout=60) for f in finished] == [i * i for i in range(20)]
            info = fresh.task(doomed.task_id)
            assert info.state == "FAILED" and info.attempts == 1
            assert info.history and "gateway stopped" in info.history[0].outcome
            assert fresh.task(retried.task_id).attempts in (1, 2)
    finally:
        client.close()


def test_sigterm_requeues_running_tasks_without_spending_retries(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    site = gateway_factory(num_cpus=1, site_id="polite").start()
    state_dir = site.state_dir
    with intertie.connect(site.address) as fed:
        running = intertie.remote(max_retries=0)(slow_square).options(name="long").submit(5)
        _wait_running(fed, running.task_id)
        task_id = running.task_id
        fed.close(cancel=False)  # the task stays at the site (closing would cancel it)
    assert site.stop() == 0  # clean exit on SIGTERM
    assert not (state_dir / "address").exists()

    site.start()
    with intertie.connect(site.address) as fed:
        assert fed.future(task_id).result(timeout=60) == 25  # max_retries=0, yet not failed
        assert fed.task(task_id).attempts == 1
