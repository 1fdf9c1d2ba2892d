"""What this site has measured: per-function run times and its recent throughput. Pure: the
clock is passed in."""

from __future__ import annotations

# Run-time estimates per function: weight of the newest run, and how many functions are kept.
RUN_EWMA_ALPHA = 0.2
MAX_RUN_ESTIMATES = 10_000
# Throughput is reported over this window.
THROUGHPUT_WINDOW_S = 60


class Estimates:
    def __init__(self) -> None:
        self._run: dict[str, float] = {}
        self._buckets = [0] * THROUGHPUT_WINDOW_S
        self._second = 0

    def run_s(self, digest: str) -> float | None:
        """The function's moving-average run time (placement's run and wait terms), if known."""
        return self._run.get(digest)

    def observe_run(self, digest: str, run_s: float) -> None:
        old = self._run.get(digest)
        self._run[digest] = run_s if old is None else old + RUN_EWMA_ALPHA * (run_s - old)
        if len(self._run) > MAX_RUN_ESTIMATES:
            self._run.pop(next(iter(self._run)))

    def count_finished(self, now: float) -> None:
        self._buckets[self._roll(now) % THROUGHPUT_WINDOW_S] += 1

    def throughput(self, now: float) -> float:
        """Tasks finished per second over the last minute."""
        self._roll(now)
        return sum(self._buckets) / THROUGHPUT_WINDOW_S

    def _roll(self, now: float) -> int:
        """Zeroes the buckets of the seconds passed since the last call."""
        second = int(now)
        if second != self._second:
            for i in range(1, min(second - self._second, THROUGHPUT_WINDOW_S) + 1):
                self._buckets[(self._second + i) % THROUGHPUT_WINDOW_S] = 0
            self._second = second
        return second
