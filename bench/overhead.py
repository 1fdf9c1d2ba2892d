"""Gateway overhead against plain Ray, measured in one run on the same machine.

    make bench            # or: .venv/bin/python bench/overhead.py [--tasks 5000] [--map-items 50000]

Prints sequential round-trip p50/p99, throughput for a burst of tasks, and chunked
``executor().map`` throughput, each with its ratio to plain Ray, for a site without
security ("open": plaintext, --auth none, no usage ledger), a secure one (TLS and token
auth) and the secure one as sites run by default (with the usage ledger: every attempt
metered and appended to the signed Merkle log in the turn's commit), and the ratios
between them. Plain Ray runs first and is shut down before the sites start, one after the
other (the three alternately, --rounds times each; medians), so they never share the CPUs.

The ledger costs less than a round's noise on 2 shared cores, so it is also measured by
alternating short blocks on two sites (token auth) running side by side, with and without it
(``--ab-blocks``): sequential p50 and burst throughput per block, medians over the blocks.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def noop() -> None:
    return None


def inc(x: int) -> int:
    return x + 1


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def plain_ray(n: int, map_items: int, cpus: int) -> dict[str, float]:
    import ray

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, object_store_memory=256 << 20,
             logging_level="WARNING", log_to_driver=False)
    try:
        f = ray.remote(noop)
        g = ray.remote(inc)
        ray.get([f.remote() for _ in range(200)])  # warm the worker pool
        lat = []
        for _ in range(n):
            t = time.perf_counter()
            ray.get(f.remote())
            lat.append(time.perf_counter() - t)
        t = time.perf_counter()
        ray.get([f.remote() for _ in range(n)])
        burst = n / (time.perf_counter() - t)
        t = time.perf_counter()
        out = ray.get([g.remote(i) for i in range(map_items)])
        assert out[-1] == map_items
        mapped = map_items / (time.perf_counter() - t)
    finally:
        ray.shutdown()
    return {"p50": percentile(lat, 0.5), "p99": percentile(lat, 0.99), "throughput": burst, "map": mapped}


def start_site(mode: str, cpus: int, base: Path) -> Any:
    """One embedded site: "open" (plaintext, --auth none, no ledger), "secure" (TLS with a
    certificate of a fresh CA, and token auth: the site writes the client's token; no ledger)
    or "ledger" (secure, with its usage ledger: a site's default)."""
    from intertie.embedded import EmbeddedGateway

    args = ["--object-store-memory", str(256 << 20)]
    ca = None
    if mode != "ledger":
        args += ["--no-ledger"]
    if mode == "open":
        args += ["--auth", "none"]
    else:
        certs = base / "certs"
        subprocess.run([sys.executable, "-m", "intertie_gateway", "certs", "create", "--dir", str(certs), "--site",
                        "bench", "--host", "127.0.0.1"], check=True, capture_output=True, timeout=120)
        args += ["--tls-cert", str(certs / "bench.pem"), "--tls-key", str(certs / "bench.key")]
        ca = certs / "ca.pem"
    return EmbeddedGateway(num_cpus=cpus, site_id="bench", state_dir=base / mode, extra_args=args, tls_ca=ca)


def through_gateway(site: Any, n: int, map_items: int, chunksize: int) -> dict[str, float]:
    import concurrent.futures

    import intertie

    with intertie.connect(site) as fed:
        concurrent.futures.wait([fed.submit(noop) for _ in range(200)])
        lat = []
        for _ in range(n):
            t = time.perf_counter()
            fed.submit(noop).result()
            lat.append(time.perf_counter() - t)
        t = time.perf_counter()
        futures = [fed.submit(noop) for _ in range(n)]
        for fut in futures:
            fut.result()
        burst = n / (time.perf_counter() - t)
        t = time.perf_counter()
        with fed.executor() as ex:
            out = list(ex.map(inc, range(map_items), chunksize=chunksize))
        assert out[-1] == map_items
        mapped = map_items / (time.perf_counter() - t)
    return {"p50": percentile(lat, 0.5), "p99": percentile(lat, 0.99), "throughput": burst, "map": mapped}


def gateway_run(mode: str, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix=f"intertie-bench-{mode}-") as base:
        site = start_site(mode, args.cpus, Path(base))
        try:
            return through_gateway(site, args.tasks, args.map_items, args.chunksize)
        finally:
            site.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--map-items", type=int, default=50_000)
    parser.add_argument("--chunksize", type=int, default=500)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="the three sites, alternately, this many each")
    parser.add_argument("--ab-blocks", type=int, default=12, help="ledger on/off: alternating blocks on two sites")
    args = parser.parse_args()

    ray_r = plain_ray(args.tasks, args.map_items, args.cpus)
    # Open and secure alternate, each round a fresh site, and each figure is the median over
    # the rounds: on a small shared machine the load drifts, and whichever ran second alone
    # would carry the drift.
    runs: dict[str, list[dict[str, float]]] = {"open": [], "secure": [], "ledger": []}
    for _ in range(args.rounds):
        for mode in runs:
            runs[mode].append(gateway_run(mode, args))
    open_r, secure_r, ledger_r = ({key: statistics.median(r[key] for r in runs[mode]) for key in runs[mode][0]}
                                  for mode in ("open", "secure", "ledger"))

    def ms(x: float) -> str:
        return f"{x * 1000:.3f} ms"

    print(f"\nIntertie gateway vs plain Ray, {args.cpus} CPUs, {args.tasks} tasks; \"open\": plaintext, no auth; "
          f"\"secure\": TLS and token auth; \"+ledger\": secure with the usage ledger, as sites run by default "
          f"(medians of {args.rounds} alternating rounds)")
    print(f"{'metric':30} {'plain Ray':>11} {'open':>11} {'secure':>11} {'+ledger':>11} {'open/Ray':>9} "
          f"{'+ledger/Ray':>12} {'secure/open':>12} {'ledger on/off':>14}  targets")
    rows = (("sequential round trip p50", "p50", ms, "<= 1.5x Ray; secure within 5% of open; ledger within 5%"),
            ("sequential round trip p99", "p99", ms, ""),
            ("burst throughput (tasks/s)", "throughput", lambda x: f"{x:.0f}", ">= 0.8x Ray"),
            (f"map {args.map_items} items (items/s)", "map", lambda x: f"{x:.0f}",
             f"> 1x (chunksize={args.chunksize}; Ray one task per item)"))
    for name, key, shown, target in rows:
        r, o, sec, led = ray_r[key], open_r[key], secure_r[key], ledger_r[key]
        print(f"{name:30} {shown(r):>11} {shown(o):>11} {shown(sec):>11} {shown(led):>11} {o / r:8.2f}x "
              f"{led / r:11.2f}x {sec / o:11.3f}x {led / sec:13.3f}x  {target}")

    ledger_ab(args)


def ledger_ab(args: argparse.Namespace) -> None:
    """Ledger on vs off: two sites (token auth) side by side, blocks of sequential round trips and
    of bursts alternating between them (the order flips every block), medians over blocks."""
    from intertie.embedded import EmbeddedGateway

    with tempfile.TemporaryDirectory(prefix="intertie-bench-ab-") as base:
        sites = {mode: EmbeddedGateway(num_cpus=args.cpus, site_id=f"ab-{mode}", state_dir=Path(base) / mode,
                                       extra_args=["--object-store-memory", str(256 << 20)]
                                       + (["--no-ledger"] if mode == "off" else []))
                 for mode in ("off", "on")}
        try:
            import intertie

            feds = {mode: intertie.connect(site) for mode, site in sites.items()}
            try:
                for fed in feds.values():  # warm: workers started, functions shipped
                    for _ in range(300):
                        fed.submit(noop).result()
                p50: dict[str, list[float]] = {"off": [], "on": []}
                burst: dict[str, list[float]] = {"off": [], "on": []}
                for block in range(args.ab_blocks):
                    for mode in ("off", "on") if block % 2 == 0 else ("on", "off"):
                        fed = feds[mode]
                        lat = []
                        for _ in range(400):
                            t = time.perf_counter()
                            fed.submit(noop).result()
                            lat.append(time.perf_counter() - t)
                        p50[mode].append(percentile(lat, 0.5))
                        t = time.perf_counter()
                        for fut in [fed.submit(noop) for _ in range(2000)]:
                            fut.result()
                        burst[mode].append(2000 / (time.perf_counter() - t))
            finally:
                for fed in feds.values():
                    fed.close()
        finally:
            for site in sites.values():
                site.stop()
    on_p50, off_p50 = statistics.median(p50["on"]), statistics.median(p50["off"])
    on_b, off_b = statistics.median(burst["on"]), statistics.median(burst["off"])
    print(f"\nUsage ledger on vs off (two sites with token auth side by side, {args.ab_blocks} alternating blocks; medians)")
    print(f"{'sequential round trip p50':30} off {off_p50 * 1000:.3f} ms, on {on_p50 * 1000:.3f} ms: "
          f"{on_p50 / off_p50:.3f}x (target <= 1.05x)")
    print(f"{'burst throughput (tasks/s)':30} off {off_b:.0f}, on {on_b:.0f}: {on_b / off_b:.3f}x (target >= 0.95x)")


if __name__ == "__main__":
    main()
