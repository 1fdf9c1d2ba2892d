"""One tenant floods a site with submissions; how much slower are another tenant's tasks?

    .venv/bin/python bench/tenants.py [--flood 20000] [--probes 200] [--task-ms 1] [--rounds 3]

A secure site (token auth) with two tenants. "quiet" measures the sequential round trip
of a no-op task with the site idle, then again while "flood" submits tens of thousands of
short tasks from another program and they run. Prints p50/p99 of both and their ratio
(target: p50 within 2x of idle), and the flood's own throughput, for each round (idle and
flood alternate on the same site) and the median ratio: on 2 shared cores one round's
ratio moves by +-0.5x from run to run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def noop() -> None:
    return None


def waits(ms: float) -> None:
    """A flood task: it holds a worker for ``ms`` without using the CPU (on 2 cores, busy
    workers would starve the gateway and both clients alike: that measures the machine)."""
    time.sleep(ms / 1000)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def token_for(tenant: str, state_dir: Path) -> str:
    made = subprocess.run([sys.executable, "-m", "intertie_gateway", "token", "create", "--tenant", tenant,
                           "--state-dir", str(state_dir)], capture_output=True, text=True, timeout=60, check=True)
    return made.stdout.strip().splitlines()[-1]


def probe(fed: object, n: int) -> list[float]:
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        fed.submit(noop).result()  # type: ignore[attr-defined]
        lat.append(time.perf_counter() - t)
    return lat


def main() -> None:
    import intertie
    from intertie.embedded import EmbeddedGateway

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flood", type=int, default=20_000, help="tasks the flooding tenant submits")
    parser.add_argument("--probes", type=int, default=200)
    parser.add_argument("--task-ms", type=float, default=1.0, help="how long each flood task holds a worker")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="intertie-bench-tenants-") as base:
        state = Path(base) / "site"
        tokens = {t: token_for(t, state) for t in ("quiet", "flood")}
        site = EmbeddedGateway(num_cpus=args.cpus, site_id="shared", state_dir=state,
                               extra_args=["--auth", "token", "--object-store-memory", str(256 << 20)])
        try:
            with intertie.connect(site.address, token=tokens["quiet"]) as quiet:
                probe(quiet, 50)  # warm
                rounds = [one_round(quiet, site.address, tokens["flood"], args) for _ in range(args.rounds)]
        finally:
            site.stop()
    print(f"\nA tenant's no-op round trip while another floods the site ({args.flood} tasks of {args.task_ms:g} ms, "
          f"{args.cpus} CPUs)")
    print(f"{'':8} {'idle p50':>10} {'p99':>10} {'flood p50':>10} {'p99':>10} {'ratio':>7} {'flood tasks/s':>14}")
    for i, (idle, under, rate) in enumerate(rounds, 1):
        print(f"round {i:<2} {percentile(idle, 0.5) * 1000:8.3f}ms {percentile(idle, 0.99) * 1000:8.3f}ms "
              f"{percentile(under, 0.5) * 1000:8.3f}ms {percentile(under, 0.99) * 1000:8.3f}ms "
              f"{percentile(under, 0.5) / percentile(idle, 0.5):6.2f}x {rate:14.0f}")
    ratios = sorted(percentile(under, 0.5) / percentile(idle, 0.5) for idle, under, _ in rounds)
    print(f"p50 ratio, median of {len(ratios)} rounds: {ratios[len(ratios) // 2]:.2f}x (target <= 2x)")


def one_round(quiet: object, address: str, token: str, args: argparse.Namespace) -> tuple[list[float], list[float],
                                                                                           float]:
    """The quiet tenant's round trips with the site idle, then while the other floods it."""
    idle = probe(quiet, args.probes)
    # The flood comes from another program, as it would: not this one's threads.
    flood_proc = subprocess.Popen(
        [sys.executable, __file__, "--flood-client", address, token, str(args.flood), str(args.task_ms)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert flood_proc.stdout is not None
        assert flood_proc.stdout.readline().strip() == "flooding"  # its first tasks are in
        under = probe(quiet, args.probes)
        rate = float(flood_proc.stdout.readline())  # all of its tasks finished: the site is idle again
        flood_proc.wait(timeout=600)
    finally:
        if flood_proc.poll() is None:
            flood_proc.kill()
            flood_proc.wait()
    return idle, under, rate


def flood_client(address: str, token: str, n: int, task_ms: float) -> None:
    import intertie

    with intertie.connect(address, token=token) as flood:
        t = time.perf_counter()
        futures = []
        for i in range(n):
            futures.append(flood.submit(waits, task_ms))
            if i == min(n - 1, 2000):
                print("flooding", flush=True)
        for fut in futures:
            fut.result()
        print(n / (time.perf_counter() - t), flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--flood-client":
        flood_client(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
    else:
        main()
