"""One tenant floods a site with submissions; how much slower are another tenant's tasks?

    .venv/bin/python bench/tenants.py [--flood 20000] [--probes 200] [--task-ms 1]

A secure site (token auth) with two tenants. "quiet" measures the sequential round trip
of a no-op task with the site idle, then again while "flood" keeps tens of thousands of
short tasks queued and running. Prints p50/p99 of both and their ratio (target: p50
within 2x of idle), and the flood's own throughput.
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
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="intertie-bench-tenants-") as base:
        state = Path(base) / "site"
        tokens = {t: token_for(t, state) for t in ("quiet", "flood")}
        site = EmbeddedGateway(num_cpus=args.cpus, site_id="shared", state_dir=state,
                               extra_args=["--auth", "token", "--object-store-memory", str(256 << 20)])
        try:
            with intertie.connect(site.address, token=tokens["quiet"]) as quiet:
                probe(quiet, 50)  # warm
                idle = probe(quiet, args.probes)
                # The flood comes from another program, as it would: not this one's threads.
                flood_proc = subprocess.Popen(
                    [sys.executable, __file__, "--flood-client", site.address, tokens["flood"], str(args.flood),
                     str(args.task_ms)], stdout=subprocess.PIPE, text=True)
                assert flood_proc.stdout is not None
                assert flood_proc.stdout.readline().strip() == "flooding"  # its first tasks are in
                under = probe(quiet, args.probes)
                rate = float(flood_proc.stdout.readline())
                flood_proc.wait(timeout=600)
        finally:
            site.stop()
    ratio = percentile(under, 0.5) / percentile(idle, 0.5)
    print(f"\nA tenant's no-op round trip while another floods the site ({args.flood} tasks of {args.task_ms:g} ms, "
          f"{args.cpus} CPUs)")
    print(f"{'':22} {'p50':>10} {'p99':>10}")
    print(f"{'idle site':22} {percentile(idle, 0.5) * 1000:8.3f}ms {percentile(idle, 0.99) * 1000:8.3f}ms")
    print(f"{'during the flood':22} {percentile(under, 0.5) * 1000:8.3f}ms {percentile(under, 0.99) * 1000:8.3f}ms")
    print(f"p50 ratio {ratio:.2f}x (target <= 2x); the flood ran at {rate:.0f} tasks/s")


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
