"""Federation figures on a local 3-site federation (alpha 2 CPUs, beta 4, gamma 2 + GPU).

    .venv/bin/python bench/federation.py [--tasks 500] [--burst 2000] [--task-ms 10]

1. Forwarding overhead: sequential round trips of a no-op submitted at alpha and run at
   alpha (pinned) against run at beta (pinned, so forwarded): p50/p99 and the ratio
   (target p50 <= 2x).
2. Spreading a burst: --burst tasks of --task-ms each submitted at alpha, placed over all
   three sites, against the same burst pinned to alpha: makespans and their ratio.
All sites share this machine's CPUs, so the burst ratio shows placement and forwarding
at work, not what three machines would give.
"""

from __future__ import annotations

import argparse
import collections
import time

import intertie
from intertie.embedded import LocalFederation


def noop() -> None:
    return None


def nap(ms: float) -> None:
    time.sleep(ms / 1000)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def round_trips(fed: intertie.Federation, site: str, n: int) -> list[float]:
    f = intertie.remote(site=site)(noop)
    for _ in range(50):
        f.submit().result()
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        f.submit().result()
        lat.append(time.perf_counter() - t)
    return lat


def makespan(fed: intertie.Federation, n: int, task_ms: float, site: str | None) -> tuple[float, dict[str, int]]:
    f = intertie.remote(site=site)(nap) if site else intertie.remote(nap)
    t = time.perf_counter()
    futures = [f.submit(task_ms) for _ in range(n)]
    for fut in futures:
        fut.result()
    return time.perf_counter() - t, dict(collections.Counter(fut.site for fut in futures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=500)
    parser.add_argument("--burst", type=int, default=2000)
    parser.add_argument("--task-ms", type=float, default=10.0)
    args = parser.parse_args()
    with LocalFederation(3) as local:
        time.sleep(2)
        with intertie.connect(local.site("alpha")) as fed:
            here = round_trips(fed, "alpha", args.tasks)
            there = round_trips(fed, "beta", args.tasks)
            one_site, _ = makespan(fed, args.burst, args.task_ms, "alpha")
            time.sleep(2)  # fresh status everywhere before the spread burst
            spread, where = makespan(fed, args.burst, args.task_ms, None)

    def ms(x: float) -> str:
        return f"{x * 1000:8.3f} ms"

    print(f"\nforwarding: submit at alpha, {args.tasks} sequential no-ops")
    print(f"{'':24} {'run at alpha':>14} {'run at beta':>14} {'ratio':>8}  target")
    print(f"{'round trip p50':24} {ms(percentile(here, 0.5)):>14} {ms(percentile(there, 0.5)):>14} "
          f"{percentile(there, 0.5) / percentile(here, 0.5):7.2f}x  <= 2x")
    print(f"{'round trip p99':24} {ms(percentile(here, 0.99)):>14} {ms(percentile(there, 0.99)):>14} "
          f"{percentile(there, 0.99) / percentile(here, 0.99):7.2f}x")
    print(f"\nburst: {args.burst} tasks of {args.task_ms:g} ms submitted at alpha")
    print(f"{'all pinned to alpha':24} {one_site:8.2f} s")
    print(f"{'placed over 3 sites':24} {spread:8.2f} s   ran on {where}")
    print(f"{'makespan ratio':24} {one_site / spread:8.2f}x faster spread")


if __name__ == "__main__":
    main()
