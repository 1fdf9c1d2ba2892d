"""Admission control: how much of the site's capacity may be inside Ray at once.

Pure bookkeeping, no Ray: the scheduler asks ``fits`` before dispatching and
``acquire``/``release`` around a task's time in Ray. It also measures what a task costs
the site beyond its own run time (``overhead_s``), which placement reads.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

# A request for nothing (cpus=0) still occupies a worker; cap how many run at once.
MIN_SLOTS = 4
# Work queued inside Ray beyond its CPUs, in seconds per CPU: enough that a worker never
# idles between one result and the gateway's next dispatch, small enough that tasks stay
# in the gateway's queue (cancellable, movable) rather than in Ray's.
BACKLOG_TARGET_S = 0.05
# Until run times are known, admit this multiple of capacity.
INITIAL_FACTOR = 2.0
# Weight of the newest run time in the moving average.
EWMA_ALPHA = 0.05
# The per-task overhead is measured over windows of this many tasks finished while every
# CPU was busy (or this many seconds, for long tasks), and averaged with this weight per
# window: a window averages out a fused call's results arriving together and single stalls.
OVERHEAD_WINDOW_TASKS = 64
OVERHEAD_WINDOW_S = 2.0
OVERHEAD_ALPHA = 0.3


def _fmt(amount: float) -> str:
    return f"{amount:g}"


class Capacity:
    """CPU and memory are admitted up to ``factor`` times the site's total, where the factor
    adapts to observed run times (at most ``overcommit``): tiny tasks get a deep pipeline,
    long ones about one per CPU. GPUs and custom resources are never overcommitted.

    ``node_max``: the most of each resource one node has (a task runs on one node, so a
    request over it never runs however large the total); the total when not given (one node).
    ``clock``: seconds, for the overhead measurement."""

    def __init__(self, total: Mapping[str, float], overcommit: float = 1.0,
                 node_max: Mapping[str, float] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.total = dict(total)
        self.node_max = dict(total if node_max is None else node_max)
        self.overcommit = overcommit
        self.factor = min(INITIAL_FACTOR, overcommit)
        self.mean_run_s: float | None = None
        self.overhead_s: float | None = None
        self.in_use: dict[str, float] = {}
        self.count = 0
        self._clock = clock
        # The current overhead window: since when, how many finished, their run times.
        self._busy_since: float | None = None
        self._window_n = 0
        self._window_run = 0.0
        self._resize()

    def _resize(self) -> None:
        self.max_count = max(MIN_SLOTS, math.ceil(self.total.get("CPU", 0.0) * self.factor))

    @property
    def spans_nodes(self) -> bool:
        """Whether the site's Ray has more than one node (its total is more than its largest node's)."""
        return any(amount > self.node_max.get(name, 0.0) + 1e-9 for name, amount in self.total.items())

    def update_total(self, total: Mapping[str, float], node_max: Mapping[str, float] | None = None) -> None:
        """Ray's view changes when nodes join or leave an attached cluster."""
        self.total = dict(total)
        self.node_max = dict(total if node_max is None else node_max)
        self._resize()

    def observe(self, run_s: float) -> None:
        """Feeds one task's run time (measured in its worker) into the admission factor and
        the overhead measurement. Called when the task's result is back, before it releases
        its admission."""
        mean = run_s if self.mean_run_s is None else (1 - EWMA_ALPHA) * self.mean_run_s + EWMA_ALPHA * run_s
        self.mean_run_s = mean
        self.factor = min(self.overcommit, 1.0 + BACKLOG_TARGET_S / max(mean, 1e-6))
        self._resize()
        self._measure_overhead(run_s)

    def _measure_overhead(self, run_s: float) -> None:
        """While every CPU holds a task (this one included), the site finishes tasks at the
        rate its CPUs and its per-task costs allow: over a window of such finishes, each CPU
        spent ``cpus * elapsed / n`` per task, of which the tasks' mean run time was their
        own work and the rest overhead. Finishes while CPUs were idle say nothing of it."""
        cpus = self.total.get("CPU", 0.0)
        now = self._clock()
        if cpus < 1 or self.count < cpus:  # a CPU was idle: the window ends here
            self._busy_since = None
            return
        if self._busy_since is None:  # the first finish of a busy spell opens a window
            self._busy_since, self._window_n, self._window_run = now, 0, 0.0
            return
        self._window_n += 1
        self._window_run += run_s
        elapsed = now - self._busy_since
        if self._window_n < OVERHEAD_WINDOW_TASKS and elapsed < OVERHEAD_WINDOW_S:
            return
        sample = max(0.0, cpus * elapsed / self._window_n - self._window_run / self._window_n)
        old = self.overhead_s
        self.overhead_s = sample if old is None else old + OVERHEAD_ALPHA * (sample - old)
        self._busy_since, self._window_n, self._window_run = now, 0, 0.0

    def never_fits(self, request: Mapping[str, float], site: str = "this site") -> str | None:
        """Why the request exceeds what the site can ever give one task (its total, or what
        its largest node has), or None if it could run here."""
        for name, amount in request.items():
            have = self.total.get(name, 0.0)
            if amount > have + 1e-9:
                return f"needs {name}={_fmt(amount)} but {site} has {name}={_fmt(have)} in total"
            largest = self.node_max.get(name, have)
            if amount > largest + 1e-9:
                return (f"needs {name}={_fmt(amount)} but the largest node of {site} has {name}={_fmt(largest)} "
                        f"({_fmt(have)} in total over its nodes; a task runs on one node)")
        return None

    def fits(self, request: Mapping[str, float]) -> bool:
        if self.count >= self.max_count:
            return False
        if self.count == 0:
            return True  # anything that can ever fit may run alone
        for name, amount in request.items():
            limit = self.total.get(name, 0.0)
            if name in ("CPU", "memory"):
                limit *= self.factor
            if self.in_use.get(name, 0.0) + amount > limit + 1e-9:
                return False
        return True

    def acquire(self, request: Mapping[str, float]) -> None:
        self.count += 1
        for name, amount in request.items():
            self.in_use[name] = self.in_use.get(name, 0.0) + amount

    def release(self, request: Mapping[str, float]) -> None:
        self.count -= 1
        for name, amount in request.items():
            left = self.in_use.get(name, 0.0) - amount
            self.in_use[name] = left if left > 1e-9 else 0.0

    def free(self) -> dict[str, float]:
        return {name: max(0.0, amount - self.in_use.get(name, 0.0)) for name, amount in self.total.items()}
