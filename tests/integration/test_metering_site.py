"""Metering on a real site (issue 13): what each attempt used, as the site's usage ledger
records it. The entries are read from the journal's database (``ledger_entries``, one
canonical JSON object per attempt) once the gateway has stopped."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import intertie

BOUND_S = 120.0  # how long a task may take on a loaded 2-core machine


def nap(seconds: float) -> str:
    time.sleep(seconds)
    return "rested"


def spin(cpu_seconds: float) -> int:
    """Busy for ``cpu_seconds`` of this process's CPU time."""
    end, n = time.process_time() + cpu_seconds, 0
    while time.process_time() < end:
        n += 1
    return n


def _entries(journal: Any) -> dict[str, dict[str, Any]]:
    """The ledger's entries by task id (one attempt each here)."""
    db = sqlite3.connect(journal)
    try:
        rows = db.execute("SELECT entry FROM ledger_entries ORDER BY idx").fetchall()
    finally:
        db.close()
    entries = [json.loads(entry) for (entry,) in rows]
    by_task = {e["task_id"]: e for e in entries}
    assert len(by_task) == len(entries), f"more than one entry for a task: {entries}"
    return by_task


def _wall(entry: dict[str, Any]) -> float:
    return float(entry["ended_at"] - entry["started_at"])


def test_attempts_are_charged_for_the_cpus_they_reserve_and_the_cpu_time_they_used(
        gateway_factory: Callable[..., Any]) -> None:
    site = gateway_factory("--label", "price=0.5", site_id="meter").start()
    try:
        fed = intertie.connect(site.address)
        try:
            two_cpus = intertie.remote(nap).options(cpus=2)
            # A task on 2 CPUs is a plain Ray task: the first one waits for Ray to start a worker
            # process, which its reservation covers too. Warmed up, the next one runs at once.
            warm = fed.submit(two_cpus, 0.0)
            assert warm.result(timeout=BOUND_S) == "rested"
            napped = fed.submit(two_cpus, 1.0)
            assert napped.result(timeout=BOUND_S) == "rested"
            busy, idle = fed.submit(spin, 0.5), fed.submit(nap, 0.5)  # one CPU each: the site's pooled workers
            assert busy.result(timeout=BOUND_S) > 0 and idle.result(timeout=BOUND_S) == "rested"
        finally:
            fed.close()
    finally:
        site.stop()  # (the ledger is read once the gateway is gone)

    entries = _entries(site.state_dir / "journal.sqlite")
    assert set(entries) == {warm.task_id, napped.task_id, busy.task_id, idle.task_id}, entries
    for entry in entries.values():
        assert (entry["site"], entry["tenant"], entry["home"], entry["attempt"], entry["outcome"]) == (
            "meter", "", "", 1, "succeeded"), entry
        assert entry["price_per_cpu_hour"] == 0.5 and entry["args_bytes"] > 0 and entry["result_bytes"] > 0, entry
        assert entry["dataset_bytes_pulled"] == entry["dataset_bytes_read"] == 0, entry

    # A task that sleeps 1 s on 2 CPUs is charged about 2 CPU-seconds, and used next to no CPU.
    slept = entries[napped.task_id]
    assert (slept["cpus"], slept["gpus"]) == (2.0, 0.0), slept
    assert 1.0 <= _wall(slept) < 1.75, slept  # its sleep, and Ray's round trip (on a loaded machine)
    assert 2.0 <= slept["cpus"] * _wall(slept) < 3.5, slept
    assert slept["cpu_time_s"] < 0.2, slept

    # A CPU-bound task's CPU time is what it spun, within its wall time (which also holds Ray's
    # round trip, and on 2 loaded cores the time the spinning worker waited for one); a sleeping
    # one's is nearly none.
    spun, rested = entries[busy.task_id], entries[idle.task_id]
    assert spun["cpus"] == rested["cpus"] == 1.0, (spun, rested)
    assert 0.5 <= spun["cpu_time_s"] <= _wall(spun) + 0.05, spun  # (its share of a core is the machine's)
    assert _wall(rested) >= 0.5 and rested["cpu_time_s"] < 0.1 * _wall(rested), rested
