"""Placement decision time over many simulated sites (pure logic, no processes).

    .venv/bin/python bench/placement.py [--sites 10000] [--tasks 10000]

A gateway keeps one placer per catalogue epoch (rebuilt at most once a second, or when
a peer goes up or down). Prints the time per decision with that placer warm (the
per-task cost; target < 1 ms over 10,000 sites), the cost of the first task of a shape
after a rebuild (filter and score every site, paid once per shape per epoch), and a
quote (rank every feasible site).
"""

from __future__ import annotations

import argparse
import random
import time

from intertie_gateway.placement import Demand, Placer, SiteView, Weights


def simulated_sites(n: int, seed: int = 1) -> list[SiteView]:
    rng = random.Random(seed)
    sites = []
    for i in range(n):
        cpus = rng.choice([2, 4, 8, 16, 32, 64])
        gpus = rng.choice([0, 0, 0, 1, 4, 8])
        total = {"CPU": float(cpus), "memory": float(cpus * 4 << 30)}
        if gpus:
            total["GPU"] = float(gpus)
            total[f"accelerator_type:{rng.choice(['T4', 'A100', 'H100'])}"] = float(gpus)
        sites.append(SiteView(
            site_id=f"site{i}", state=rng.choice(["up"] * 19 + ["down"]),
            arch=rng.choice(["x86_64", "x86_64", "aarch64"]), python_version=rng.choice(["3.11", "3.11", "3.12"]),
            total=total, free=dict(total), queued=rng.randrange(0, 500), running=rng.randrange(0, cpus + 1),
            mean_run_s=rng.uniform(0.01, 5.0), labels={"region": rng.choice(["eu", "us", "ap"]),
                                                        "price": f"{rng.uniform(0.01, 0.2):.3f}",
                                                        "carbon": str(rng.randrange(20, 800))},
            max_payload_bytes=100 << 20, rtt_s=rng.uniform(0.001, 0.2), bandwidth=rng.choice([1e8, 1e9, 1e7])))
    return sites


SHAPES = [
    Demand({"CPU": 1.0}, python_version="3.11"),
    Demand({"CPU": 4.0, "memory": float(8 << 30)}, python_version="3.11", arch="x86_64"),
    Demand({"CPU": 1.0, "GPU": 1.0, "accelerator_type:A100": 0.001}, python_version="3.11"),
    Demand({"CPU": 2.0}, python_version="3.11", labels={"region": "eu"}, input_bytes=50 << 20),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=10_000)
    parser.add_argument("--tasks", type=int, default=10_000)
    args = parser.parse_args()
    weights = Weights(price=100.0, carbon=0.001)
    rng = random.Random(2)
    demands = [rng.choice(SHAPES) for _ in range(args.tasks)]

    sites = simulated_sites(args.sites)
    placer = Placer(sites, weights)
    started = time.perf_counter()
    placed = sum(placer.place(d).site_id is not None for d in demands)
    burst = (time.perf_counter() - started) / args.tasks

    singles = []
    for d in demands[:20]:
        fresh = simulated_sites(args.sites)
        t = time.perf_counter()
        Placer(fresh, weights).place(d)
        singles.append(time.perf_counter() - t)
    fresh = simulated_sites(args.sites)
    t = time.perf_counter()
    ranked = Placer(fresh, weights).rank(SHAPES[0])
    quote = time.perf_counter() - t

    print(f"\nplacement over {args.sites} simulated sites, {args.tasks} tasks of {len(SHAPES)} shapes")
    print(f"{'per task, placer warm':40} {burst * 1e3:9.4f} ms   target < 1 ms   ({placed} placed)")
    print(f"{'first task of a shape after a rebuild':40} {sorted(singles)[len(singles) // 2] * 1e3:9.4f} ms"
          f"   (once per shape per epoch)")
    print(f"{'quote: rank every feasible site':40} {quote * 1e3:9.4f} ms   ({ranked.feasible_count} feasible)")


if __name__ == "__main__":
    main()
