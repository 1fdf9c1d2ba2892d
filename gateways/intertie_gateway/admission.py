"""Admission control: how much of the site's capacity may be inside Ray at once.

Pure bookkeeping, no Ray: the scheduler asks ``fits`` before dispatching and
``acquire``/``release`` around a task's time in Ray.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

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


def _fmt(amount: float) -> str:
    return f"{amount:g}"


class Capacity:
    """CPU and memory are admitted up to ``factor`` times the site's total, where the factor
    adapts to observed run times (at most ``overcommit``): tiny tasks get a deep pipeline,
    long ones about one per CPU. GPUs and custom resources are never overcommitted.

    ``node_max``: the most of each resource one node has (a task runs on one node, so a
    request over it never runs however large the total); the total when not given (one node)."""

    def __init__(self, total: Mapping[str, float], overcommit: float = 1.0,
                 node_max: Mapping[str, float] | None = None) -> None:
        self.total = dict(total)
        self.node_max = dict(total if node_max is None else node_max)
        self.overcommit = overcommit
        self.factor = min(INITIAL_FACTOR, overcommit)
        self.mean_run_s: float | None = None
        self.in_use: dict[str, float] = {}
        self.count = 0
        self._resize()

    def _resize(self) -> None:
        self.max_count = max(MIN_SLOTS, math.ceil(self.total.get("CPU", 0.0) * self.factor))

    def update_total(self, total: Mapping[str, float], node_max: Mapping[str, float] | None = None) -> None:
        """Ray's view changes when nodes join or leave an attached cluster."""
        self.total = dict(total)
        self.node_max = dict(total if node_max is None else node_max)
        self._resize()

    def observe(self, run_s: float) -> None:
        """Feeds one task's time inside Ray into the admission factor."""
        mean = run_s if self.mean_run_s is None else (1 - EWMA_ALPHA) * self.mean_run_s + EWMA_ALPHA * run_s
        self.mean_run_s = mean
        self.factor = min(self.overcommit, 1.0 + BACKLOG_TARGET_S / max(mean, 1e-6))
        self._resize()

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
