"""Admission control: how much of the site's capacity may be inside Ray at once.

Pure bookkeeping, no Ray: the scheduler asks ``fits`` before dispatching and
``acquire``/``release`` around a task's time in Ray.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

# A request for nothing (cpus=0) still occupies a worker; cap how many run at once.
MIN_SLOTS = 4


def _fmt(amount: float) -> str:
    return f"{amount:g}"


class Capacity:
    def __init__(self, total: Mapping[str, float], overcommit: float = 1.0) -> None:
        self.total = dict(total)
        self.overcommit = overcommit
        self.in_use: dict[str, float] = {}
        self.count = 0
        self.max_count = max(MIN_SLOTS, math.ceil(self.total.get("CPU", 0.0) * overcommit))

    def update_total(self, total: Mapping[str, float]) -> None:
        """Ray's view changes when nodes join or leave an attached cluster."""
        self.total = dict(total)
        self.max_count = max(MIN_SLOTS, math.ceil(self.total.get("CPU", 0.0) * self.overcommit))

    def never_fits(self, request: Mapping[str, float], site: str = "this site") -> str | None:
        """Why the request exceeds the site's total capacity, or None if it could run here."""
        for name, amount in request.items():
            have = self.total.get(name, 0.0)
            if amount > have + 1e-9:
                return f"needs {name}={_fmt(amount)} but {site} has {name}={_fmt(have)} in total"
        return None

    def fits(self, request: Mapping[str, float]) -> bool:
        if self.count >= self.max_count:
            return False
        if self.count == 0:
            return True  # anything that can ever fit may run alone
        for name, amount in request.items():
            limit = self.total.get(name, 0.0)
            if name in ("CPU", "memory"):
                limit *= self.overcommit
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
