"""Gateway overhead against plain Ray, measured in one run on the same machine.

    make bench            # or: .venv/bin/python bench/overhead.py [--tasks 5000] [--map-items 50000]

Prints sequential round-trip p50/p99, throughput for a burst of tasks, and chunked
``executor().map`` throughput, each with its ratio to plain Ray. Plain Ray runs
first and is shut down before the gateway starts, so the two never share the CPUs.
"""

from __future__ import annotations

import argparse
import time


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


def through_gateway(n: int, map_items: int, cpus: int, chunksize: int) -> dict[str, float]:
    import concurrent.futures

    import intertie

    with intertie.connect(num_cpus=cpus) as fed:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--map-items", type=int, default=50_000)
    parser.add_argument("--chunksize", type=int, default=500)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()

    ray_r = plain_ray(args.tasks, args.map_items, args.cpus)
    gw_r = through_gateway(args.tasks, args.map_items, args.cpus, args.chunksize)

    def ms(x: float) -> str:
        return f"{x * 1000:8.3f} ms"

    print(f"\nIntertie gateway vs plain Ray, {args.cpus} CPUs, {args.tasks} tasks")
    print(f"{'metric':34} {'plain Ray':>14} {'gateway':>14} {'ratio':>8}  target")
    print(f"{'sequential round trip p50':34} {ms(ray_r['p50']):>14} {ms(gw_r['p50']):>14} "
          f"{gw_r['p50'] / ray_r['p50']:7.2f}x  <= 1.5x")
    print(f"{'sequential round trip p99':34} {ms(ray_r['p99']):>14} {ms(gw_r['p99']):>14} "
          f"{gw_r['p99'] / ray_r['p99']:7.2f}x")
    print(f"{'burst throughput (tasks/s)':34} {ray_r['throughput']:14.0f} {gw_r['throughput']:14.0f} "
          f"{gw_r['throughput'] / ray_r['throughput']:7.2f}x  >= 0.8x")
    print(f"{f'map {args.map_items} items (items/s)':34} {ray_r['map']:14.0f} {gw_r['map']:14.0f} "
          f"{gw_r['map'] / ray_r['map']:7.2f}x  > 1x (gateway chunksize={args.chunksize}, "
          f"Ray one task per item)")


if __name__ == "__main__":
    main()
