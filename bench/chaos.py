"""Chaos experiments on a local 3-site federation: what a fault loses, delivers twice or runs twice.

    make chaos            # or: .venv/bin/python bench/chaos.py [--tasks 300] [--task-ms 30] [--only abcdef]

Sites: alpha (home, 2 CPUs), beta (4 CPUs), gamma (2 CPUs + GPU), each a real gateway with its
own Ray on loopback (intertie.embedded.LocalFederation). The client submits --tasks tasks of
--task-ms each at alpha (max_retries=3); each appends "index pid time" to a side file when it runs
to completion, so a task run twice shows, with where (pid -> site from /proc) and when. The fault is injected once a quarter of the results are in
(and, for a peer fault, once the peer has finished some and still holds work):

  a  beta SIGKILLed (gateway and its Ray), not restarted
  b  alpha, the home, SIGKILLed and restarted on its state dir; the client reconnects
  c  beta SIGKILLed, and restarted on its state dir once alpha marked it down and moved its work
  d  the client's connection cut (RST) by a proxy as the tasks are submitted, then every
     --cut-every seconds until the run ends
  e  the client's connection frozen (no byte, FIN or RST passes; a tests/faults.py proxy) until
     the client notices and reconnects, then unfrozen
  f  alpha and beta partitioned (their links frozen both ways; every peer link of this federation
     goes through a proxy) until alpha marks beta down and moves its work, then healed

Per experiment one row: tasks submitted; results delivered (futures that resolved with the right
value), failed (resolved with an error), lost (unresolved after --timeout); delivered twice (terminal
events the client got again for a task it already had: absorbed by the client, never seen by the
user); ran twice (tasks that ran to completion more than once, from the side file, counted once
every site is idle); moved (tasks whose result came after more than one attempt); first result and
all results after the fault; and the longest gap between two consecutive results after the fault.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import intertie
from intertie.embedded import LOCAL_SITES, EmbeddedGateway, LocalFederation, free_ports, stop_all

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from faults import DeliveryTap, FaultProxy, wait_until  # noqa: E402

EXPERIMENTS = {
    "a": "peer killed",
    "b": "home killed+restarted",
    "c": "peer killed, restarted late",
    "d": "client link cut repeatedly",
    "e": "client link frozen",
    "f": "peer partitioned, healed",
}


def work(key: int, path: str, seconds: float) -> int:
    time.sleep(seconds)
    with open(path, "a") as f:  # one short O_APPEND write per completed execution
        f.write(f"{key} {os.getpid()} {time.time():.3f}\n")
    return key * key


@dataclass
class Row:
    name: str
    submitted: int = 0
    delivered: int = 0
    failed: int = 0
    lost: int = 0
    delivered_twice: int = 0
    ran_twice: int = 0
    moved: int = 0
    first_after_s: float | None = None
    all_after_s: float | None = None
    longest_gap_s: float | None = None
    note: str = ""
    details: list[str] = field(default_factory=list)


class Run:
    """One batch of tasks submitted through ``fed``, with completion times and a side file."""

    def __init__(self, fed: intertie.Federation, n: int, task_ms: float, side: Path) -> None:
        self.fed = fed
        self.n = n
        self.side = side
        self.tap = DeliveryTap(fed)
        self.finished_at: dict[int, float] = {}
        f = intertie.remote(max_retries=3)(work)
        self.futures = [f.submit(i, str(side), task_ms / 1000) for i in range(n)]
        for i, fut in enumerate(self.futures):
            fut.add_done_callback(lambda _f, i=i: self.finished_at.setdefault(i, time.monotonic()))
        self.fault_at: float | None = None  # time.monotonic()
        self.fault_wall: float | None = None  # time.time(), for the side file's times
        self.pid_site: dict[int, str] = {}

    def fault(self, local: LocalFederation | ProxiedFederation) -> float:
        """Marks the moment of the fault (call right before injecting it); returns it (monotonic)."""
        self.pid_site.update(worker_sites(local))
        self.fault_at, self.fault_wall = time.monotonic(), time.time()
        return self.fault_at

    def done(self) -> int:
        return len(self.finished_at)

    def done_at(self, site: str) -> int:
        return sum(1 for fut in self.futures if fut.done() and fut.site == site)

    def wait_all(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.done() < self.n and time.monotonic() < deadline:
            time.sleep(0.05)

    def row(self, name: str, local: LocalFederation | ProxiedFederation) -> Row:
        self.pid_site.update(worker_sites(local))
        row = Row(name, submitted=self.n)
        wrong = 0
        for i, fut in enumerate(self.futures):
            if not fut.done():
                row.lost += 1
            elif fut.cancelled() or fut.exception(0) is not None:
                row.failed += 1
            elif fut.result(0) != i * i:
                wrong += 1
            else:
                row.delivered += 1
        row.failed += wrong
        if wrong:
            row.details.append(f"{wrong} results had the wrong value")
        errors = collections.Counter(type(fut.exception(0)).__name__ + ": " + str(fut.exception(0))[:100]
                                     for fut in self.futures
                                     if fut.done() and not fut.cancelled() and fut.exception(0) is not None)
        row.details += [f"failed x{c}: {e}" for e, c in errors.most_common(3)]
        row.delivered_twice = self.tap.duplicates(fut.task_id for fut in self.futures)
        row.moved = sum(1 for fut in self.futures if fut.done() and fut.attempts > 1)
        by_site = collections.Counter(fut.site for fut in self.futures if fut.done() and fut.site)
        row.details.append("results from " + ", ".join(f"{k} {v}" for k, v in sorted(by_site.items())))
        runs: dict[str, list[tuple[float, int]]] = collections.defaultdict(list)
        for line in self.side.read_text().splitlines() if self.side.exists() else ():
            key, pid, at = line.split()
            runs[key].append((float(at), int(pid)))
        twice = {k: sorted(v) for k, v in runs.items() if len(v) > 1}
        row.ran_twice = len(twice)
        if twice and self.fault_wall is not None:
            # A run that ended after the fault at the site that was killed: a worker that outlived
            # its gateway finished the run the crash cut (README: "Delivery, precisely").
            orphaned = sum(1 for v in twice.values() if v[0][0] >= self.fault_wall)
            row.details.append(f"{orphaned} of the {len(twice)} first runs of tasks run twice ended after the fault")
        for key in list(twice)[:3]:
            fut = self.futures[int(key)]
            where = ", ".join(f"{self.pid_site.get(pid, '?')} (pid {pid}) at "
                              f"{at - self.fault_wall:+.2f} s" if self.fault_wall else f"pid {pid}"
                              for at, pid in twice[key])
            row.details.append(f"task {key} ran {len(twice[key])}x: {where} from the fault; "
                               f"result from {fut.site} after {fut.attempts} attempts")
        if self.fault_at is not None:
            after = sorted(t for t in self.finished_at.values() if t >= self.fault_at)
            if after:
                row.first_after_s = after[0] - self.fault_at
                if row.lost == 0:
                    row.all_after_s = after[-1] - self.fault_at
                points = [self.fault_at, *after]
                row.longest_gap_s = max(b - a for a, b in zip(points, points[1:], strict=False))
        return row


def sites_state(fed: intertie.Federation) -> dict[str, intertie.SiteStatus]:
    try:
        return {s.site_id: s for s in fed.sites()}
    except intertie.IntertieError:
        return {}


def state_of(fed: intertie.Federation, site: str) -> str:
    """A site's state as the client's home sees it ("?" when it cannot say)."""
    status = sites_state(fed).get(site)
    return status.state if status is not None else "?"


def wait_quiet(fed: intertie.Federation, hold_s: float, timeout: float, sites: int | None = None) -> bool:
    """Until no site has anything queued or running for ``hold_s`` in a row (and, with ``sites``,
    that many are up): then no rerun is still to come and the side file can be counted."""
    deadline = time.monotonic() + timeout
    since: float | None = None
    while time.monotonic() < deadline:
        state = {k: s for k, s in sites_state(fed).items() if s.state == "up"}  # a down site's figures are stale
        if state and (sites is None or len(state) >= sites) and not any(s.queued or s.running for s in state.values()):
            since = since or time.monotonic()
            if time.monotonic() - since >= hold_s:
                return True
        else:
            since = None
        time.sleep(0.2)
    return False


def worker_sites(local: LocalFederation | ProxiedFederation) -> dict[int, str]:
    """pid -> site of every live process descending from a gateway (its Ray and workers), from
    /proc (Linux; empty elsewhere). Taken before a kill, it names the killed site's workers."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
            except (OSError, ValueError):
                continue
    roots = {g.process.pid: g.site_id for g in local.gateways if g.process is not None and g.process.poll() is None}
    sites: dict[int, str] = {}
    for pid in parents:
        p, seen = pid, 0
        while p > 1 and seen < 64 and p not in roots:
            p, seen = parents.get(p, 0), seen + 1
        if p in roots:
            sites[pid] = roots[p]
    return sites


def wait_mid_run(run: Run, n: int, peer: str | None = None, fed: intertie.Federation | None = None) -> None:
    """Until a quarter of the results are in (and the peer has finished some and holds work)."""
    def ready() -> bool:
        if run.done() < n // 4:
            return False
        if peer is None:
            return True
        if run.done_at(peer) < 3:
            return False
        status = sites_state(fed).get(peer) if fed is not None else None
        return status is not None and status.queued + status.running > 0

    wait_until(ready, f"the run never reached the point of the fault ({run.done()} of {n} done)", timeout=180)


@contextmanager
def federation(args: argparse.Namespace) -> Iterator[LocalFederation]:
    with tempfile.TemporaryDirectory(prefix="intertie-chaos-") as base, \
            LocalFederation(3, base_dir=base, heartbeat_s=args.heartbeat) as local:
        yield local


class ProxiedFederation:
    """The sites of LocalFederation, but each gateway reaches each peer through a FaultProxy of
    its own: ``links["alpha", "beta"]`` carries everything alpha sends to beta (heartbeats,
    forwarded tasks, the session stream), ``links["beta", "alpha"]`` the other way."""

    def __init__(self, base_dir: Path, heartbeat_s: float) -> None:
        names = [str(p["site_id"]) for p in LOCAL_SITES]
        addresses = dict(zip(names, (f"127.0.0.1:{port}" for port in free_ports(len(names))), strict=True))
        self.links: dict[tuple[str, str], FaultProxy] = {}
        self.gateways: list[EmbeddedGateway] = []
        try:
            for a in names:
                for b in names:
                    if a != b:
                        self.links[a, b] = FaultProxy(addresses[b], name=f"{a}->{b}")
            for profile in LOCAL_SITES:
                name = str(profile["site_id"])
                labels: dict[str, str] = dict(profile.get("labels", {}))  # type: ignore[call-overload]
                extra = ["--heartbeat", str(heartbeat_s), "--object-store-memory", str(128 << 20),
                         "--region", labels.get("region", "local"), "--auth", "none"]  # plaintext links via proxies
                for key, value in labels.items():
                    extra += ["--label", f"{key}={value}"]
                if profile.get("resources"):
                    extra += ["--resources", json.dumps(profile["resources"])]
                for peer in names:
                    if peer != name:
                        extra += ["--peer", self.links[name, peer].address]
                gpus = profile.get("num_gpus")
                self.gateways.append(EmbeddedGateway(
                    num_cpus=int(profile["num_cpus"]),  # type: ignore[call-overload]
                    num_gpus=int(gpus) if gpus is not None else None,  # type: ignore[call-overload]
                    state_dir=base_dir / name, site_id=name, listen=addresses[name], extra_args=extra, wait=False))
            for gateway in self.gateways:
                gateway.wait_ready()
        except BaseException:
            self.stop()
            raise

    def site(self, site_id: str) -> EmbeddedGateway:
        return next(g for g in self.gateways if g.site_id == site_id)

    def stop(self) -> None:
        stop_all(self.gateways)
        for proxy in self.links.values():
            proxy.close()


@contextmanager
def proxied_federation(args: argparse.Namespace) -> Iterator[ProxiedFederation]:
    with tempfile.TemporaryDirectory(prefix="intertie-chaos-") as base:
        local = ProxiedFederation(Path(base), args.heartbeat)
        try:
            yield local
        finally:
            local.stop()


def connect_home(local: LocalFederation | ProxiedFederation, address: str | None = None) -> intertie.Federation:
    alpha = local.site("alpha")
    fed = intertie.connect(address or alpha.address, token=alpha.token, tls_ca=alpha.tls_ca)
    try:
        wait_until(lambda: state_of(fed, "beta") == state_of(fed, "gamma") == "up", "the three sites never came up",
                   timeout=120)
    except BaseException:
        fed.close()
        raise
    return fed


def peer_killed(args: argparse.Namespace, side: Path, restart: bool) -> Row:
    name = "c " + EXPERIMENTS["c"] if restart else "a " + EXPERIMENTS["a"]
    with federation(args) as local, connect_home(local) as fed:
        run = Run(fed, args.tasks, args.task_ms, side)
        wait_mid_run(run, args.tasks, "beta", fed)
        beta = local.site("beta")
        busy = sites_state(fed)["beta"]
        fault_at = run.fault(local)
        beta.kill()
        note = f"beta held {busy.queued}q+{busy.running}r"
        if restart:
            waited = wait_until(lambda: state_of(fed, "beta") == "down", "alpha never marked beta down", timeout=60)
            beta.launch()
            beta.wait_ready()
            ready = time.monotonic()
            note += f"; down at alpha after {waited:.1f} s; restarted, ready after {ready - fault_at:.1f} s"
            try:
                wait_until(lambda: state_of(fed, "beta") == "up", "beta never came back up at alpha", timeout=180)
                note += f", up at alpha {time.monotonic() - ready:.1f} s later"
            except AssertionError as exc:
                note += f"; {exc}"
        run.wait_all(args.timeout)
        quiet = wait_quiet(fed, hold_s=4 * args.heartbeat, timeout=120, sites=3 if restart else 2)
        if not quiet:
            note += "; sites never idle"
        return _finish(run, name, note, local)


def home_killed(args: argparse.Namespace, side: Path) -> Row:
    name = "b " + EXPERIMENTS["b"]
    with federation(args) as local, connect_home(local) as fed:
        run = Run(fed, args.tasks, args.task_ms, side)
        wait_mid_run(run, args.tasks)
        alpha = local.site("alpha")
        fault_at = run.fault(local)
        alpha.kill()
        alpha.launch()
        alpha.wait_ready()
        back = time.monotonic() - fault_at
        run.wait_all(args.timeout)
        quiet = wait_quiet(fed, hold_s=4 * args.heartbeat, timeout=120, sites=3)
        note = f"alpha ready again after {back:.1f} s" + ("" if quiet else "; sites never idle")
        return _finish(run, name, note, local)


def partitioned(args: argparse.Namespace, side: Path) -> Row:
    name = "f " + EXPERIMENTS["f"]
    with proxied_federation(args) as local, connect_home(local) as fed:
        run = Run(fed, args.tasks, args.task_ms, side)
        wait_mid_run(run, args.tasks, "beta", fed)
        busy = sites_state(fed)["beta"]
        links = [local.links["alpha", "beta"], local.links["beta", "alpha"]]
        run.fault(local)
        for link in links:  # frozen both ways, new connections too: a partition, both sites alive
            link.stall(new_connections=True)
        note = f"beta held {busy.queued}q+{busy.running}r"
        try:
            waited = wait_until(lambda: state_of(fed, "beta") == "down", "alpha never marked beta down", timeout=60)
            note += f"; down at alpha after {waited:.1f} s"
        finally:
            for link in links:
                link.resume()
        healed = time.monotonic()
        try:
            wait_until(lambda: state_of(fed, "beta") == "up", "beta never came back up at alpha", timeout=180)
            note += f"; healed, up at alpha {time.monotonic() - healed:.1f} s later"
        except AssertionError as exc:
            note += f"; {exc}"
        run.wait_all(args.timeout)
        quiet = wait_quiet(fed, hold_s=4 * args.heartbeat, timeout=120, sites=3)
        return _finish(run, name, note + ("" if quiet else "; sites never idle"), local)


def link_faults(args: argparse.Namespace, sides: tuple[Path, Path]) -> list[Row]:
    rows = []
    with federation(args) as local:
        if "d" in args.only:
            with FaultProxy(local.site("alpha").address, name="client->alpha") as proxy, \
                    connect_home(local, proxy.address) as fed:
                # Cuts from the start: submissions in flight are resent, results resubscribed.
                run = Run(fed, args.tasks, args.task_ms, sides[0])
                run.fault(local)
                proxy.cut()
                proxy.cut_every(args.cut_every)
                run.wait_all(args.timeout)
                proxy.cut_every(None)
                quiet = wait_quiet(fed, hold_s=4 * args.heartbeat, timeout=120)
                note = f"{proxy.cuts} cuts, {proxy.connections} connections" + ("" if quiet else "; sites never idle")
                rows.append(_finish(run, "d " + EXPERIMENTS["d"], note, local))
        if "e" in args.only:
            with FaultProxy(local.site("alpha").address, name="client->alpha (frozen)") as proxy, \
                    connect_home(local, proxy.address) as fed:
                run = Run(fed, args.tasks, args.task_ms, sides[1])
                wait_mid_run(run, args.tasks)
                connections = proxy.connections
                fault_at = run.fault(local)
                proxy.stall()
                note = ""
                try:
                    wait_until(lambda: proxy.connections > connections, "no reconnect", timeout=120)
                    noticed = proxy.events_of("accept", since=fault_at)[0].at - fault_at
                    note = f"client reconnected after {noticed:.1f} s"
                except AssertionError:
                    note = "client never noticed within 120 s"
                proxy.resume()
                run.wait_all(args.timeout)
                quiet = wait_quiet(fed, hold_s=4 * args.heartbeat, timeout=120)
                rows.append(_finish(run, "e " + EXPERIMENTS["e"], note + ("" if quiet else "; sites never idle"),
                                    local))
    return rows


def _finish(run: Run, name: str, note: str, local: LocalFederation | ProxiedFederation) -> Row:
    row = run.row(name, local)
    row.note = note
    return row


def fmt_s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} s"


def print_table(rows: list[Row], args: argparse.Namespace) -> None:
    print(f"\nchaos: {args.tasks} tasks of {args.task_ms:g} ms per experiment, submitted at alpha "
          f"(alpha 2 CPUs, beta 4, gamma 2; heartbeat {args.heartbeat:g} s)\n")
    head = ["experiment", "submitted", "delivered", "failed", "lost", "delivered twice", "ran twice", "moved",
            "first result", "all results", "longest gap", "note"]
    table = [[r.name, str(r.submitted), str(r.delivered), str(r.failed), str(r.lost), str(r.delivered_twice),
              str(r.ran_twice), str(r.moved), fmt_s(r.first_after_s), fmt_s(r.all_after_s),
              fmt_s(r.longest_gap_s), r.note] for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) if table else len(h) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for t in table:
        print("  ".join(c.ljust(w) if i in (0, len(t) - 1) else c.rjust(w)
                        for i, (c, w) in enumerate(zip(t, widths, strict=True))))
    print("\n(first/all results and longest gap: after the fault; delivered twice: duplicate terminal events "
          "on the wire, absorbed by the client)")
    for r in rows:
        for d in r.details:
            print(f"  {r.name}: {d}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=300, help="tasks per experiment")
    parser.add_argument("--task-ms", type=float, default=30.0, help="run time of each task")
    parser.add_argument("--only", default="".join(EXPERIMENTS), help="experiments to run, e.g. 'ace'")
    parser.add_argument("--cut-every", type=float, default=0.25, help="seconds between cuts in (d)")
    parser.add_argument("--heartbeat", type=float, default=0.3, help="peers' heartbeat (s)")
    parser.add_argument("--timeout", type=float, default=300.0, help="how long results are waited for (s)")
    args = parser.parse_args()
    unknown = set(args.only) - set(EXPERIMENTS)
    if unknown:
        parser.error(f"unknown experiments {sorted(unknown)}; choose from {''.join(EXPERIMENTS)}")

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)  # stop every site on SIGTERM as on Ctrl-C
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="intertie-chaos-runs-") as tmp:
        side = Path(tmp)
        try:
            steps: list[tuple[str, Callable[[], list[Row]]]] = [
                ("a", lambda: [peer_killed(args, side / "a.txt", restart=False)]),
                ("b", lambda: [home_killed(args, side / "b.txt")]),
                ("c", lambda: [peer_killed(args, side / "c.txt", restart=True)]),
                ("".join(k for k in "de" if k in args.only), lambda: link_faults(args, (side / "d.txt", side / "e.txt"))),
                ("f", lambda: [partitioned(args, side / "f.txt")]),
            ]
            for keys, step in steps:
                if not keys or not set(keys) & set(args.only):
                    continue
                started = time.monotonic()
                print(f"[{keys}] {', '.join(EXPERIMENTS[k] for k in keys)} ...", flush=True)
                try:
                    rows += step()
                except Exception as exc:  # one broken experiment does not hide the others' figures
                    rows += [Row(f"{k} {EXPERIMENTS[k]}", note=f"error: {type(exc).__name__}: {exc}"[:300])
                             for k in keys]
                print(f"[{keys}] done in {time.monotonic() - started:.0f} s", flush=True)
        except KeyboardInterrupt:
            print("interrupted; every site was stopped", file=sys.stderr)
            print_table(rows, args)
            return 130
    print_table(rows, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
