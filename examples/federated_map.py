"""A federation doing its job: a burst spreads over three sites, a GPU task finds the GPU
site, and work moves when a site dies.

    make demo                                  # starts a local 3-site federation for this run
    INTERTIE_ADDRESS=HOST:PORT python examples/federated_map.py   # or use a running one
                                               # (e.g. from `intertie-gateway local --sites 3`)

Everything below talks to one gateway (the home); the home places, forwards and moves
the work. Only the demo's "kill a site" step needs a local federation it started itself.
"""

from __future__ import annotations

import collections
import os
import time

import intertie
from intertie.embedded import LocalFederation


@intertie.remote(max_retries=3)
def simulate(seed: int) -> float:
    """A small CPU-bound job: a random walk."""
    import random

    rng = random.Random(seed)
    x = 0.0
    for _ in range(20_000):
        x += rng.uniform(-1, 1)
    return x


@intertie.remote(gpus=1, accelerator="T4")
def train() -> str:
    import ray

    ids = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
    return f"trained on GPU {ids}"


@intertie.remote(max_retries=3)
def slow_step(i: int) -> int:
    time.sleep(0.5)
    return i


def show_sites(fed: intertie.Federation) -> None:
    print(f"{'site':8} {'state':6} {'CPU':>4} {'GPU':>4}  labels")
    for s in fed.sites():
        labels = ", ".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        print(f"{s.site_id:8} {s.state:6} {s.resources_total.get('CPU', 0):4g} {s.resources_total.get('GPU', 0):4g}"
              f"  {labels}")


def main(fed: intertie.Federation, local: LocalFederation | None) -> None:
    print(f"home gateway: {fed.site_id} at {fed.address}\n")
    show_sites(fed)

    print("\n1. A burst of 600 tasks submitted to the home spreads by estimated completion time:")
    # Estimates rest on measured run times: a few first calls teach the home this function's
    # (a function never run before is assumed to take 50 ms, far from the ~3 ms this one takes).
    [f.result() for f in [simulate.submit(-i) for i in range(1, 31)]]
    started = time.monotonic()
    futures = [simulate.submit(i) for i in range(600)]
    results = [f.result() for f in futures]
    where = collections.Counter(f.site for f in futures)
    print(f"   {len(results)} results in {time.monotonic() - started:.1f} s; ran on {dict(sorted(where.items()))}")
    # The last task placed by estimate (an idle site may have taken the very last ones from a
    # busy one's queue: those say "moved from").
    last = next((f for f in reversed(futures) if f.placement is not None and f.placement.candidates), None)
    p = last.placement if last is not None else None
    if last is not None and p is not None:
        print(f"   why the last one placed by estimate went to {p.site}: {p.reason}")
        for c in p.candidates:
            print(f"     {c.site:8} wait {c.wait_s:.3f}s + transfer {c.transfer_s:.4f}s + run {c.run_s:.3f}s"
                  f" = {c.total:.3f}s")
        chosen = next(c for c in p.candidates if c.site == p.site)
        took = fed.task(last.task_id).finished_at - p.decided_at
        # (The estimate counts the forwarding round trip, not the result's way back to the home.)
        print(f"   estimated {chosen.total:.3f}s from placement to result; it took {took:.3f}s")

    print("\n2. A task that needs a T4 GPU lands on the only site with one:")
    fut = train.submit()
    print(f"   {fut.result()} at {fut.site}")
    p = fut.placement
    if p is not None:
        for site, why in p.rejected:
            print(f"     not {site}: {why}")

    print("\n3. A quote ranks the sites without running anything:")
    for c in fed.quote(simulate, 1):
        print(f"     {c.site:8} starts in ~{c.start_s:.3f}s, runs ~{c.run_s:.3f}s (total {c.total:.3f}s), "
              f"price {c.price:.2e}, carbon {c.carbon_g:.2e} g")

    if local is None:
        print("\n(connected to an existing federation: skipping the site-failure step)")
        return
    print("\n4. A site is killed while it runs our tasks; they move and still finish:")
    futures = [slow_step.submit(i) for i in range(48)]
    victim = None
    deadline = time.monotonic() + 60
    while victim is None and time.monotonic() < deadline:
        for fut in futures:
            info = fed.task(fut.task_id)
            if info.state == "RUNNING" and info.site != fed.site_id:
                victim = local.site(info.site)
                break
        else:
            time.sleep(0.05)
    if victim is None:
        print("   (no task ran away from the home site; nothing to kill)")
        return
    victim.kill()
    print(f"   killed {victim.site_id}")
    assert [f.result() for f in futures] == list(range(48))
    moved = [f for f in futures if f.attempts > 1]
    print(f"   all 48 finished; {len(moved)} were moved off {victim.site_id}")
    if moved:
        info = fed.task(moved[0].task_id)
        for a in info.history:
            print(f"     task {info.task_id[:8]} attempt {a.attempt} at {a.site}: {a.outcome}")
        print(f"     then attempt {info.attempts} at {info.site}: {info.state}")
    print(f"   restarting {victim.site_id}...")
    victim.launch()
    victim.wait_ready()


if __name__ == "__main__":
    address = os.environ.get("INTERTIE_ADDRESS")
    if address:
        with intertie.connect(address) as fed:
            main(fed, None)
    else:
        print("starting a local federation of 3 sites (each with its own Ray; TLS, mutual TLS between the sites, "
              "token auth)...")
        with LocalFederation(3) as local:
            time.sleep(1.5)  # a few heartbeats, so every site has seen its peers
            with intertie.connect(local) as fed:
                main(fed, local)
