"""A peer killed mid-run and restarted on its journal: its home moved the work meanwhile.

Nothing runs twice: the restarted peer holds the tasks its journal says it had until the
home's link lists them again, and cancels (journaled) the ones the home moved elsewhere.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import intertie
from intertie.embedded import LocalFederation

HEARTBEAT_S = 0.3
TASKS = 200


def record(i: int, path: str, seconds: float) -> int:
    """Sleeps, then appends its index and the time to ``path``: one line per run that completed."""
    time.sleep(seconds)
    with open(path, "a") as fh:
        fh.write(f"{i} {time.time()}\n")
    return i


def wait_for(condition, message: str, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.1)


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[LocalFederation]:
    with LocalFederation(3, base_dir=tmp_path / "fed", heartbeat_s=HEARTBEAT_S,
                         extra_args=["--no-steal"]) as local:
        yield local


def test_a_restarted_peer_never_reruns_what_its_home_moved_away(federation: LocalFederation, tmp_path: Path) -> None:
    runs = tmp_path / "runs.txt"
    beta = federation.site("beta")
    with intertie.connect(federation.site("alpha")) as home:
        wait_for(lambda: [s.state for s in home.sites()] == ["up"] * 3, "the peers never came up")
        f = intertie.remote(max_retries=3)(record)
        futures = [f.submit(i, str(runs), 0.3) for i in range(TASKS)]

        def running_at_beta() -> int:  # RUNNING: delivered and started there, not on its way
            infos = [home.task(fut.task_id) for fut in futures[::2]]
            return sum(i.site == "beta" and i.state == "RUNNING" for i in infos)

        # Killed while it has work queued and running.
        wait_for(lambda: running_at_beta() >= 2, "beta never had work in hand: "
                 f"{collections.Counter((i.site, i.state) for i in (home.task(f.task_id) for f in futures))}")
        beta.kill()
        assert sorted(fut.result(timeout=300) for fut in futures) == list(range(TASKS))
        moved = [fut for fut in futures if fut.attempts > 1]
        assert moved, f"no task was at beta when it died: {collections.Counter((f.site, f.attempts) for f in futures)}"
        assert all(fut.site != "beta" for fut in moved)

        restarted_at = time.time()
        beta.launch()
        beta.wait_ready()
        wait_for(lambda: {s.site_id: s.state for s in home.sites()}["beta"] == "up", "beta never came back up")
        with intertie.connect(beta) as at_beta:
            # Its link from alpha reopens and lists what alpha still has there (nothing): beta
            # drops every task it held since its restart, from its journal too.
            def known_at_beta(task_id: str) -> str:
                try:
                    return at_beta.task(task_id).state
                except intertie.TaskNotFoundError:
                    return "dropped"

            wait_for(lambda: all(known_at_beta(fut.task_id) == "dropped" for fut in moved),
                     "beta kept tasks that alpha had moved elsewhere: "
                     f"{collections.Counter(known_at_beta(fut.task_id) for fut in moved)}")
        runs_done = [(int(i), float(t)) for i, t in (line.split() for line in runs.read_text().splitlines())]
        assert sorted({i for i, _ in runs_done}) == list(range(TASKS))
        # Every result had arrived before beta came back: nothing may complete after that. (Runs
        # completed twice before it came back are runs beta's Ray workers finished after its
        # gateway was killed: a run cut by a crash may be repeated; see the README.)
        rerun = sorted(i for i, t in runs_done if t > restarted_at)
        assert not rerun, f"finished tasks ran again after beta restarted: {rerun}"
        # The link works as before: beta takes new work from alpha.
        assert f.options(site="beta").submit(7, str(tmp_path / "after.txt"), 0).result(timeout=60) == 7
