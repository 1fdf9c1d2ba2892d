"""The ``intertie`` command line, run as a user runs it: a subprocess against a real gateway."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import time

import pytest

import intertie


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "intertie", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "INTERTIE_ADDRESS": "", **(env or {})})


def fails(x: int) -> int:
    raise ValueError(f"bad input {x}")


def sleeps(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def _one_line_error(out: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert out.returncode == 2, out
    assert out.stdout == ""
    assert "Traceback" not in out.stderr and "usage:" not in out.stderr
    assert len(out.stderr.splitlines()) <= 2, out.stderr  # the error, and where to find help
    for needle in needles:
        assert needle in out.stderr, out.stderr


def test_version() -> None:
    out = _cli("--version")
    assert out.returncode == 0 and out.stdout.strip().startswith(f"intertie {intertie.__version__} (Python 3.")


def test_address_before_or_after_the_subcommand(gateway) -> None:  # type: ignore[no-untyped-def]
    before = _cli("--address", gateway.address, "sites")
    after = _cli("sites", "--address", gateway.address)
    assert before.returncode == after.returncode == 0, (before.stderr, after.stderr)
    assert before.stdout.splitlines()[2].split()[:3] == after.stdout.splitlines()[2].split()[:3] == \
        ["shared", "up", gateway.address]
    listed = _cli("datasets", "ls", "--address", gateway.address)
    assert listed.returncode == 0 and listed.stdout.startswith("NAME"), listed.stderr
    # The one after the subcommand wins over the environment.
    env = _cli("sites", "--address", gateway.address, env={"INTERTIE_ADDRESS": "127.0.0.1:1"})
    assert env.returncode == 0, env.stderr


def test_argument_mistakes_are_one_line() -> None:
    # No gateway is needed: each is refused before connecting.
    _one_line_error(_cli("quote", "--label", "region"), "--label", "KEY=VALUE", "'region'")
    _one_line_error(_cli("quote", "--bytes", "10 gigs"), "--bytes", "'10 gigs'", "10GiB")
    _one_line_error(_cli("quote", "--cpus", "-1", "--address", "127.0.0.1:1"), "cpus")
    _one_line_error(_cli("cancel"), "TASK_ID")
    _one_line_error(_cli("nosuch"), "nosuch")


@pytest.mark.parametrize("size", ["4096", "1e6", "512KB", "1MiB"])
def test_quote_reads_sizes_with_units_and_says_it_is_a_quote(gateway, size: str) -> None:  # type: ignore[no-untyped-def]
    out = _cli("quote", "--bytes", size, "--label", "region=test", "--address", gateway.address)
    assert out.returncode == 0, out.stderr
    first, *table = out.stdout.splitlines()
    assert first.startswith("would place on shared")
    assert "placed on" not in first.replace("would place on", "")
    assert table[0].split() == ["SITE", "START", "WAIT", "TRANSFER", "RUN", "TOTAL"]  # no price, no carbon here
    assert "0.000000" not in out.stdout and "e-0" not in out.stdout


def test_quote_over_the_home_payload_limit_is_answered_without_building_the_arguments(gateway) -> None:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    out = _cli("quote", "--bytes", "10GiB", "--address", gateway.address)
    assert out.returncode == 1 and time.monotonic() - started < 30, out.stderr
    assert out.stdout.startswith("no site can run it: arguments of 10 GiB are over the payload limit")
    assert "4 MiB" in out.stdout


def test_quote_with_no_site_says_why(gateway) -> None:  # type: ignore[no-untyped-def]
    out = _cli("quote", "--label", "region=mars", "--address", gateway.address)
    assert out.returncode == 1, out.stderr
    assert out.stdout.startswith("no site can run it"), out.stdout
    assert "region" in out.stdout


def test_task_shows_a_failure_with_its_exception_type(fed: intertie.Federation, gateway) -> None:  # type: ignore[no-untyped-def]
    fut = fed.submit(fails, 7)
    with pytest.raises(ValueError):
        fut.result(timeout=60)
    out = _cli("task", fut.task_id, "--address", gateway.address)
    assert out.returncode == 0, out.stderr
    fields = dict(line.split(None, 1) for line in out.stdout.splitlines() if line.strip())
    assert fields["state"] == "FAILED"
    assert fields["error"] == "ValueError: bad input 7"
    assert fields["finished"].endswith(("ago)", "(just now)")) and fields["ran"].endswith(("ms", " s"))
    explained = _cli("explain", fut.task_id, "--address", gateway.address)
    assert explained.returncode == 0 and "error: ValueError: bad input 7" in explained.stdout, explained.stderr


def test_cancel_by_id(fed: intertie.Federation, gateway) -> None:  # type: ignore[no-untyped-def]
    done = fed.submit(sleeps, 0)
    assert done.result(timeout=60) == 0
    running = fed.submit(sleeps, 120)
    fed.task(running.task_id)  # acknowledged by the gateway
    out = _cli("cancel", running.task_id, done.task_id, "no-such-task", running.task_id, "--address", gateway.address)
    assert out.returncode == 1, out.stderr
    assert out.stdout.splitlines() == [f"{running.task_id}  cancelled",
                                       f"{done.task_id}  not cancelled: already SUCCEEDED",
                                       f"no-such-task  not cancelled: no such task at {gateway.address}"]
    assert "cancelled 1 of 3" in out.stderr and "Traceback" not in out.stderr
    with pytest.raises(concurrent.futures.CancelledError):
        running.result(timeout=60)

    queued = fed.submit(sleeps, 120)
    fed.task(queued.task_id)
    out = _cli("cancel", queued.task_id, "--address", gateway.address)
    assert out.returncode == 0 and out.stdout == f"{queued.task_id}  cancelled\n", out.stderr


def test_cancel_all_mine_is_refused_where_tasks_belong_to_no_tenant(gateway) -> None:  # type: ignore[no-untyped-def]
    out = _cli("cancel", "--all-mine", "--address", gateway.address)
    assert out.returncode == 1 and out.stdout == ""
    assert "without token auth" in out.stderr and "cancel by task id" in out.stderr and "Traceback" not in out.stderr
