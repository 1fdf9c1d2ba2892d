"""Datasets pull work to them: a table stored at one site attracts the tasks that read it.

    make demo                                   # starts a local 3-site federation for this run
    INTERTIE_ADDRESS=HOST:PORT python examples/datasets.py      # or use a running one

The dataset is stored at a site other than the home. A task on it is placed where it
is (its placement shows the transfer the others would need); a task pinned elsewhere
makes that site fetch the data over Arrow Flight and keep a replica. A function declared
``returns="dataset"`` leaves its result table where it ran, so the next step of a chain
runs there too, and no table crosses the client.
"""

from __future__ import annotations

import os
import time

import pyarrow as pa

import intertie
from intertie.embedded import LocalFederation


@intertie.remote
def mean_fare(trips: pa.Table) -> float:
    """Runs where the data is; ``trips`` arrives as a pyarrow.Table."""
    import pyarrow.compute as pc

    return pc.mean(trips.column("fare")).as_py()


@intertie.remote(returns="dataset")
def long_trips(trips: pa.Table) -> pa.Table:
    """Its result stays at the site where it ran; the caller gets a DatasetRef."""
    import pyarrow.compute as pc

    return trips.filter(pc.greater(trips.column("fare"), 20.0))


def make_trips(rows: int) -> pa.Table:
    return pa.table({"trip": pa.array(range(rows), pa.int64()),
                     "fare": pa.array([5.0 + (i % 40) * 0.5 for i in range(rows)], pa.float64())})


def main(fed: intertie.Federation) -> None:
    others = [s.site_id for s in fed.sites() if s.site_id != fed.site_id and s.state == "up"]
    if len(others) < 2:
        print("this example needs a home and two other sites")
        return
    holder, elsewhere = others[0], others[1]
    trips = make_trips(2_000_000)
    started = time.monotonic()
    ref = fed.put_dataset(trips, name="trips", site=holder, replace=True)  # a rerun replaces it
    print(f"stored {ref.num_rows:,} rows ({ref.num_bytes / 2**20:.0f} MiB) at {ref.site} "
          f"in {time.monotonic() - started:.2f} s: {ref!r}")

    fut = mean_fare.submit(ref)
    print(f"\nmean fare {fut.result():.3f}, computed at {fut.site} (submitted to {fed.site_id})")
    if fut.placement is not None:
        for c in fut.placement.candidates:
            print(f"   {c.site:8} transfer {c.transfer_s:.3f}s + wait {c.wait_s:.3f}s + run {c.run_s:.3f}s"
                  f" = {c.total:.3f}s")

    started = time.monotonic()
    pinned = mean_fare.options(site=elsewhere).submit(ref)
    print(f"\npinned to {elsewhere}: mean fare {pinned.result():.3f} in {time.monotonic() - started:.2f} s "
          f"(fetched the data from {holder} first)")
    print(f"   {elsewhere} now holds: {[r.name for r in fed.datasets(site=elsewhere)]}")

    step = long_trips.submit(ref)
    long_ref = step.result()
    mean = mean_fare.submit(long_ref)
    print(f"\nchain: long_trips ran at {step.site} and left {long_ref!r} there;")
    print(f"   mean fare of long trips {mean.result():.3f}, computed at {mean.site}")
    fed.delete_dataset(long_ref)
    fed.delete_dataset(ref)  # its replicas elsewhere go with it
    print(f"   after deleting: {elsewhere} holds {[r.name for r in fed.datasets(site=elsewhere)]}")


if __name__ == "__main__":
    address = os.environ.get("INTERTIE_ADDRESS")
    if address:
        with intertie.connect(address) as fed:
            main(fed)
    else:
        print("starting a local federation of 3 sites (each with its own Ray; TLS, mutual TLS between the sites, "
              "token auth)...")
        with LocalFederation(3) as local:
            time.sleep(1.5)
            with intertie.connect(local) as fed:
                main(fed)
