"""Cancel what you started: ``fed.cancel_all()``, ``close()`` (unless ``cancel=False``) and
Ctrl-C while waiting, each against the session's shared site. Held tasks wait for a release
file the test creates, so they stay unfinished as long as a test needs them to."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import intertie

BOUND_S = 60.0


def hold(path: str, value: object = None) -> object:
    while not os.path.exists(path):
        time.sleep(0.01)
    return value


def square(x: int) -> int:
    return x * x


hold_task = intertie.remote(cpus=0.1)(hold)  # not pooled (one-CPU tasks queue behind each other)


def wait_for(condition: Callable[[], object], what: str, timeout: float = BOUND_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def states(fed: intertie.Federation, futures: list[intertie.TaskFuture]) -> list[str]:
    return [fed.task(f.task_id).state for f in futures]


def test_cancel_all_cancels_every_unfinished_task_this_client_submitted(
        fed: intertie.Federation, gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    go = tmp_path / "go"
    followed = hold_task.submit(str(go), "someone else's")  # submitted by the fixture's client
    try:
        with intertie.connect(gateway.address) as mine:
            finished = mine.submit(square, 3)
            assert finished.result(timeout=BOUND_S) == 9
            held = [mine.submit(hold_task, str(go), i) for i in range(3)]
            wait_for(lambda: all(f.running() for f in held), "the held tasks to run")
            burst = [mine.submit(hold_task, str(go), i) for i in range(40)]  # some not even sent yet
            follower = mine.future(followed.task_id)
            cancelled = mine.cancel_all()
            assert sorted(cancelled) == sorted(f.task_id for f in held + burst)
            assert all(f.cancelled() for f in held + burst)
            assert not finished.cancelled() and not follower.done()
            assert set(states(fed, held)) == {"CANCELLED"}
            for f in burst:  # cancelled at the site, or taken back before it was sent
                try:
                    assert fed.task(f.task_id).state == "CANCELLED"
                except intertie.TaskNotFoundError:
                    pass
            assert mine.cancel_all() == []
            go.touch()
            assert follower.result(timeout=BOUND_S) == "someone else's"
    finally:
        go.touch()


def test_close_cancels_what_is_unfinished_unless_told_not_to(fed: intertie.Federation, gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    go = tmp_path / "go"
    try:
        with intertie.connect(gateway.address) as owner:
            owned = [owner.submit(hold_task, str(go), i) for i in range(3)]
            wait_for(lambda: all(f.running() for f in owned), "the tasks to run")
        assert all(f.cancelled() for f in owned)  # leaving the block closed it: cancelled
        assert set(states(fed, owned)) == {"CANCELLED"}

        detached_client = intertie.connect(gateway.address)
        detached = [detached_client.submit(hold_task, str(go), i) for i in range(3)]
        detached_client.close(cancel=False)
        assert all(isinstance(f.exception(timeout=0), intertie.IntertieError) for f in detached)
        assert "runs on at the site" in str(detached[0].exception(timeout=0))
        assert set(states(fed, detached)) <= {"QUEUED", "RUNNING"}
        go.touch()
        assert [fed.future(f.task_id).result(timeout=BOUND_S) for f in detached] == [0, 1, 2]
    finally:
        go.touch()


CTRL_C_SCRIPT = r"""
import concurrent.futures, json, os, signal, sys, threading, time
import intertie

address, release = sys.argv[1], sys.argv[2]

def hold(path):
    while not os.path.exists(path):
        time.sleep(0.01)

def waiting_on_futures(frame):
    # Blocked on a lock (threading's wait) under a concurrent.futures call.
    if frame is None or frame.f_code.co_name != "wait" or not frame.f_code.co_filename.endswith("threading.py"):
        return False
    while frame is not None:
        if frame.f_code.co_filename.endswith(os.path.join("concurrent", "futures", "_base.py")):
            return True
        frame = frame.f_back
    return False

def interrupt_once_waiting():
    # Ctrl-C, as a user presses it, once the main thread blocks in a wait.
    main = threading.main_thread().ident
    while not waiting_on_futures(sys._current_frames().get(main)):
        time.sleep(0.005)
    os.kill(os.getpid(), signal.SIGINT)

hold_task = intertie.remote(cpus=0.1)(hold)
report = {}
for mode in ("result", "wait", "as_completed", "keep"):
    fed = intertie.connect(address, cancel_on_interrupt=(mode != "keep"))
    futures = [hold_task.submit(release) for _ in range(3)]
    bystander = hold_task.submit(release)  # not waited for
    waited = futures[:1] if mode == "result" else futures
    threading.Thread(target=interrupt_once_waiting, daemon=True).start()
    try:
        if mode == "result":
            futures[0].result()
        elif mode == "as_completed":
            for _ in concurrent.futures.as_completed(futures):
                pass
        else:
            concurrent.futures.wait(futures)
    except KeyboardInterrupt:
        report[mode] = {"waited": [f.task_id for f in waited], "cancelled": [f.cancelled() for f in waited],
                        "others": [f.task_id for f in futures + [bystander] if f not in waited]}
    print(f"--- {mode}", file=sys.stderr, flush=True)
    fed.close(cancel=False)  # leaves what was not cancelled running
print(json.dumps(report))
"""


def test_ctrl_c_while_waiting_cancels_the_tasks_waited_for(fed: intertie.Federation, gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    go = tmp_path / "go"
    try:
        out = subprocess.run([sys.executable, "-c", CTRL_C_SCRIPT, gateway.address, str(go)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)
        assert sorted(report) == ["as_completed", "keep", "result", "wait"]
        messages = dict(zip(["result", "wait", "as_completed", "keep"],
                            out.stderr.split("--- ")[:4], strict=True))
        for mode in ("result", "wait", "as_completed"):
            waited = report[mode]["waited"]
            assert all(report[mode]["cancelled"]), mode
            assert {fed.task(t).state for t in waited} == {"CANCELLED"}, mode
            assert {fed.task(t).state for t in report[mode]["others"]} <= {"QUEUED", "RUNNING"}, mode
            n = len(waited)
            assert f"interrupted: cancelled {n} unfinished task{'s' if n > 1 else ''} this wait was for" \
                in messages[mode], messages[mode]
        keep = report["keep"]
        assert not any(keep["cancelled"])
        assert {fed.task(t).state for t in keep["waited"]} <= {"QUEUED", "RUNNING"}
        assert "they keep running" in messages["keep"] and "fed.cancel_all()" in messages["keep"]
    finally:
        go.touch()
