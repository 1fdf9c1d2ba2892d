"""Dataset figures on local 3-site federations (alpha 2 CPUs, beta 4, gamma 2 + GPU).

    .venv/bin/python bench/datasets.py [--mb 256] [--repeat 3] [--tasks 36] [--set-mb 48]
                                       [--task-s 0.3] [--link-rate 100e6]

1. Migration: a --mb dataset held by beta is pulled to gamma by a task pinned there
   (gateway to gateway over Arrow Flight, written into gamma's store; the time is the one
   gamma logs for the transfer). Compared in the same run with a raw ``pyarrow.flight``
   DoGet of the same data from beta's endpoint into memory (target >= 0.8x), and with
   shipping the same table as a pickled task argument (client -> alpha -> gamma over
   gRPC; the time of a no-op task subtracted).
2. Locality: --tasks tasks of --task-s each over 6 datasets of --set-mb, two held by each
   site. Every site serves transfers at --link-rate bytes/s (an emulated wide-area link).
   Placement by locality (its link estimate is the link rate) against placement by load
   only (link estimate infinite, so moving data looks free): makespan and bytes moved.
All sites share this machine's CPUs and disk; the figures compare, they do not promise.
"""

from __future__ import annotations

import argparse
import collections
import re
import statistics
import time

import pyarrow as pa
import pyarrow.flight as flight

import intertie
from intertie.embedded import LocalFederation

# Replicas, transfer times and payloads of the sizes used here must fit.
SITE_ARGS = ["--max-payload-bytes", str(1 << 30), "--replica-cache", str(16 << 30)]


def table_of(mb: float, seed: int = 0) -> pa.Table:
    rows = int(mb * 1e6 / 16)
    return pa.table({"key": pa.array(range(seed, seed + rows), pa.int64()),
                     "value": pa.array(range(rows), pa.float64())})


def num_rows(table: pa.Table) -> int:
    return table.num_rows


def noop() -> None:
    return None


def work(table: pa.Table, seconds: float) -> float:
    import pyarrow.compute as pc

    total = pc.sum(table.column("value")).as_py()
    time.sleep(seconds)  # the rest of the task's computation
    return total


def logged_pull_s(local: LocalFederation, site: str, dataset_id: str) -> float:
    pattern = re.compile(rf"pulled dataset {dataset_id} \(\d+ bytes\) from \S+ in ([0-9.]+) s")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = pattern.findall(local.site(site).log_path.read_text(errors="replace"))
        if found:
            return float(found[-1])
        time.sleep(0.1)
    raise RuntimeError(f"{site} logged no transfer of {dataset_id}")


def migration(args: argparse.Namespace) -> None:
    with LocalFederation(3, extra_args=SITE_ARGS) as local, \
            intertie.connect(local.site("alpha")) as fed:
        time.sleep(2)
        table = table_of(args.mb)
        ref = fed.put_dataset(table, site="beta")
        size = ref.num_bytes
        beta_flight = {s.site_id: s.flight_address for s in fed.sites()}["beta"]
        at_gamma = intertie.remote(site="gamma")(num_rows)

        raw, ours, pickled = [], [], []
        client = flight.FlightClient(f"grpc://{beta_flight}")
        noop_at_gamma = intertie.remote(site="gamma")(noop)
        for _ in range(5):
            noop_at_gamma.submit().result()
        for _ in range(args.repeat):
            started = time.perf_counter()
            got = client.do_get(flight.Ticket(ref.id.encode())).read_all()
            raw.append(time.perf_counter() - started)
            assert got.num_rows == ref.num_rows
            del got

            assert at_gamma.submit(ref).result() == ref.num_rows  # gamma pulls the dataset
            ours.append(logged_pull_s(local, "gamma", ref.id))
            fed.delete_dataset(ref.id, site="gamma")  # drop the replica: the next round pulls again
            local.site("gamma").log_path.write_text("")

            started = time.perf_counter()
            noop_at_gamma.submit().result()
            overhead = time.perf_counter() - started
            started = time.perf_counter()
            assert at_gamma.submit(table).result() == ref.num_rows
            pickled.append(time.perf_counter() - started - overhead)
        client.close()

    def rate(seconds: list[float]) -> float:
        return size / statistics.median(seconds) / 1e6

    print(f"\nmigration of {size / 1e6:.0f} MB from beta to gamma (median of {args.repeat})")
    print(f"{'':44} {'MB/s':>8} {'vs raw':>8}  target")
    print(f"{'raw pyarrow.flight DoGet into memory':44} {rate(raw):8.0f} {1.0:7.2f}x")
    print(f"{'Intertie pull (Flight, into the store)':44} {rate(ours):8.0f} {rate(ours) / rate(raw):7.2f}x  >= 0.8x")
    print(f"{'pickled as a task argument (gRPC)':44} {rate(pickled):8.0f} {rate(pickled) / rate(raw):7.2f}x")


def locality(args: argparse.Namespace, aware: bool) -> tuple[float, int, dict[str, int], int]:
    estimate = args.link_rate if aware else 1e15
    extra = [*SITE_ARGS, "--flight-max-rate", str(args.link_rate), "--default-bandwidth", str(estimate)]
    with LocalFederation(3, extra_args=extra) as local, intertie.connect(local.site("alpha")) as fed:
        time.sleep(2)
        refs = [fed.put_dataset(table_of(args.set_mb, seed=i), name=f"set-{i}", site=site)
                for i, site in enumerate(["alpha", "alpha", "beta", "beta", "gamma", "gamma"])]
        time.sleep(1)  # every site's status lists the new datasets
        f = intertie.remote(work)
        started = time.perf_counter()
        futures = [f.submit(refs[i % len(refs)], args.task_s) for i in range(args.tasks)]
        for fut in futures:
            fut.result()
        span = time.perf_counter() - started
        local_runs = sum(fut.site == refs[i % len(refs)].site for i, fut in enumerate(futures))
        moved = sum(r.num_bytes for s in ("alpha", "beta", "gamma") for r in fed.datasets(site=s) if r.origin)
        return span, moved, dict(collections.Counter(fut.site for fut in futures)), local_runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=36)
    parser.add_argument("--set-mb", type=float, default=48)
    parser.add_argument("--task-s", type=float, default=0.3)
    parser.add_argument("--link-rate", type=float, default=100e6)
    args = parser.parse_args()
    migration(args)
    results = {name: locality(args, aware) for name, aware in (("locality-aware", True), ("load only", False))}
    print(f"\nlocality: {args.tasks} tasks of {args.task_s:g} s over 6 datasets of {args.set_mb:g} MB "
          f"(2 per site), links at {args.link_rate / 1e6:g} MB/s")
    print(f"{'placement':16} {'makespan':>10} {'moved':>10} {'ran by data':>12}  sites")
    for name, (span, moved, where, local_runs) in results.items():
        print(f"{name:16} {span:9.2f}s {moved / 1e6:8.0f}MB {local_runs:>6}/{args.tasks:<5}  {where}")
    (aware_span, aware_moved, _, _), (load_span, load_moved, _, _) = results.values()
    print(f"locality-aware: {load_span / aware_span:.2f}x the speed, "
          f"{aware_moved / max(load_moved, 1):.2f}x the bytes moved of load-only placement")


if __name__ == "__main__":
    main()
