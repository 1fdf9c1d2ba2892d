"""Quickstart: run Python functions on an Intertie site and get futures back.

    make demo                                   # starts an embedded local site
    INTERTIE_ADDRESS=host:port python examples/quickstart.py   # or use a running gateway
"""

from __future__ import annotations

import concurrent.futures
import time

import intertie


@intertie.remote(cpus=1, max_retries=2)
def simulate(seed: int, steps: int = 20_000) -> float:
    """A small Monte Carlo estimate of pi: the kind of work one farms out by the thousand."""
    import random

    rng = random.Random(seed)
    inside = sum(1 for _ in range(steps) if rng.random() ** 2 + rng.random() ** 2 <= 1.0)
    return 4.0 * inside / steps


def fragile(x: int) -> int:
    if x == 3:
        raise ValueError(f"refusing to process {x}")
    return x * 10


def main() -> None:
    started = time.monotonic()
    with intertie.connect() as fed:  # INTERTIE_ADDRESS, or an embedded local site
        site = fed.sites()[0]
        print(f"connected to site {site.site_id} at {site.address} "
              f"({site.arch}, Python {site.python_version}, CPU={site.resources_total.get('CPU', 0):g})"
              f" in {time.monotonic() - started:.1f} s")

        # 1. Futures: submit, then collect as they complete.
        futures = [simulate.submit(seed) for seed in range(200)]
        estimates = [f.result() for f in concurrent.futures.as_completed(futures)]
        print(f"pi ~ {sum(estimates) / len(estimates):.4f} from {len(estimates)} tasks "
              f"(e.g. task {futures[0].task_id} ran at {futures[0].site})")

        # 2. An executor whose map batches tiny calls into few tasks.
        with fed.executor() as ex:
            squares = list(ex.map(pow, range(10_000), [2] * 10_000, chunksize=1_000))
        print(f"sum of 10,000 squares = {sum(squares)} (in {10_000 // 1_000} tasks)")

        # 3. A remote exception is raised as the original type, with the remote traceback.
        try:
            fed.submit(fragile, 3).result()
        except ValueError as exc:
            assert isinstance(exc, intertie.RemoteTaskError)
            print(f"remote error caught as ValueError: {exc.args[0]}")

        # 4. Timeouts and cancellation.
        slow = intertie.remote(time.sleep).options(timeout=0.5)
        try:
            slow.submit(30).result()
        except intertie.TaskTimeoutError as exc:
            print(f"timeout: {exc}")
        queued = fed.submit(time.sleep, 30)
        print(f"cancelled a running task: {queued.cancel()}")

        # 5. A task can be looked up later by id, also from another client.
        info = fed.task(futures[0].task_id)
        print(f"task {info.task_id}: {info.state} at {info.site} after {info.attempts} attempt(s)")
    print(f"done in {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
