"""Fuzzing at scale: thousands of hostile inputs per RPC and per Flight method of one site.

    make chaos            # or: .venv/bin/python bench/fuzz.py [--inputs 10000] [--seed 0] [--method Flight/DoPut]
    .venv/bin/python bench/fuzz.py --replay FILE...      # send saved failing cases again

Starts its own gateway (one CPU, a 128 MiB object store, a temp state dir) and sends, for every
gRPC method of every service it serves (intertie.v1 TaskService, SiteService, PeerService; the
stock grpc.health.v1.Health and grpc.reflection.v1alpha.ServerReflection) and every Arrow Flight
method of its dataset endpoint (DoPut with hostile descriptors, DoPut of valid Arrow IPC streams
with corrupted offsets/validity/indices/lengths, DoGet, DoAction per action type, ListFlights,
ListActions, GetFlightInfo, PollFlightInfo, GetSchema, DoExchange, Handshake), --inputs inputs
drawn by the strategies of tests/fuzzing.py (random bytes, valid messages with hostile values,
mutated serializations, wire-level oddities), raw, each with a deadline.

One row per method: inputs; ok / typed / arrow (answered by Arrow Flight's C++ transport
before any gateway code, as a bare pyarrow server answers: counted, not failed); dp restarts
(UNAVAILABLE from the data-plane process, which died on the input, an Arrow C++ crash, or was
being restarted by the gateway when it came: counted and shown, not failed); crashes (the
gateway died: it is restarted on its state dir and the run goes on; after --max-crashes in one
method the rest of its inputs are skipped); hangs (no answer by the deadline); untyped (UNKNOWN,
INTERNAL, a traceback or raw Python exception in the details, details over 2 KB, a per-task
error repeating a huge id); bad data (an accepted upload that is not stored valid, or with
another row count, or at a bogus size); p50 and max answer times. Then the encoder check (each
uncorrupted base stream is stored and served back equal), the journal's PRAGMA integrity_check
and the traceback lines in the gateway's log. Every failing input is saved whole under the state
dir (kept when anything failed). Exits 1 on any crash, hang, untyped answer, bad data, encoder
problem, a journal that is not "ok", or more than --max-tracebacks tracebacks.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import fuzzing  # noqa: E402

COLUMNS = ("ok", "typed", "transport", "restart", "crash", "hang", "untyped", "bad-data")


@dataclass
class Row:
    method: str
    counts: dict[str, int] = field(default_factory=lambda: {k: 0 for k in COLUMNS})
    times: list[float] = field(default_factory=list)
    samples: dict[str, fuzzing.Outcome] = field(default_factory=dict)  # first outcome per kind of failure
    skipped: int = 0
    seconds: float = 0.0

    @property
    def inputs(self) -> int:
        return sum(self.counts.values())

    @property
    def failures(self) -> int:
        return sum(self.counts[k] for k in fuzzing.FAILURES)

    def add(self, outcome: fuzzing.Outcome) -> None:
        self.counts[outcome.kind] = self.counts.get(outcome.kind, 0) + 1
        self.times.append(outcome.elapsed)
        if outcome.failed:
            key = f"{outcome.kind}: {outcome.why[:60]}"
            self.samples.setdefault(key, outcome)


def fuzz_method(site: fuzzing.Site, method: str, inputs: int, seed: int, *, max_crashes: int, status_every: int,
                log: bool = True) -> Row:
    row = Row(method)
    started = time.monotonic()
    if method.startswith("Flight/"):
        fuzzing.ensure_base_dataset(site)

    def each(case: fuzzing.Case) -> None:
        if row.counts["crash"] >= max_crashes:
            row.skipped += 1
            return
        outcome = site.send(case)
        if outcome.kind == "crash":
            restart(site, method, outcome.why)
        elif outcome.kind == "hang" or row.inputs % status_every == 0:
            why = site.dead()  # after a hang: is it unresponsive? every so often: a crash the call did not show?
            if why is not None:
                if outcome.kind != "hang":
                    outcome = fuzzing.Outcome(case, "crash", outcome.code, outcome.details, f"the gateway {why}",
                                              outcome.elapsed)
                    outcome.saved = case.save(site.failures_dir) if site.failures_dir else None
                restart(site, method, why)
        row.add(outcome)

    for case in fuzzing.known_cases(method):
        each(case)
    fuzzing.drive(fuzzing.cases(method), inputs, each, seed=seed)
    row.seconds = time.monotonic() - started
    if log:
        extra = f", {row.skipped} skipped after {max_crashes} crashes" if row.skipped else ""
        print(f"  {method:40} {row.inputs:7} inputs in {row.seconds:6.1f} s, {row.failures} failures{extra}",
              file=sys.stderr, flush=True)
    return row


def restart(site: fuzzing.Site, method: str, why: str) -> None:
    print(f"    {method}: {why}; restarting the gateway", file=sys.stderr, flush=True)
    site.restart()
    if method.startswith("Flight/"):
        fuzzing.ensure_base_dataset(site)


def print_table(rows: list[Row]) -> None:
    head = (f"{'method':40} {'inputs':>7} {'ok':>6} {'typed':>6} {'arrow':>6} {'dp restarts':>11} {'crashes':>7} "
            f"{'hangs':>6} {'untyped':>7} {'bad data':>8} {'p50 ms':>7} {'max ms':>7}")
    print(head)
    print("-" * len(head))
    total = Row("total")
    for r in rows:
        c = r.counts
        p50 = statistics.median(r.times) * 1000 if r.times else 0.0
        top = max(r.times) * 1000 if r.times else 0.0
        print(f"{r.method:40} {r.inputs:7} {c['ok']:6} {c['typed']:6} {c['transport']:6} {c['restart']:11} {c['crash']:7} "
              f"{c['hang']:6} {c['untyped']:7} {c['bad-data']:8} {p50:7.1f} {top:7.0f}")
        for k in COLUMNS:
            total.counts[k] += c[k]
    c = total.counts
    print("-" * len(head))
    print(f"{'total':40} {total.inputs:7} {c['ok']:6} {c['typed']:6} {c['transport']:6} {c['restart']:11} {c['crash']:7} "
          f"{c['hang']:6} {c['untyped']:7} {c['bad-data']:8}")


def print_failures(rows: list[Row]) -> None:
    shown = [(r, o) for r in rows for o in r.samples.values()]
    if not shown:
        return
    print("\nFirst input of each kind of failure:")
    for _, outcome in shown:
        print(outcome.report())


def replay(paths: list[str], args: argparse.Namespace, state: Path) -> int:
    site = fuzzing.Site.start(state, num_cpus=1, deadline_s=args.deadline)
    failed = 0
    try:
        for path in paths:
            case = fuzzing.Case.load(Path(path))
            if case.method.startswith("Flight/"):
                fuzzing.ensure_base_dataset(site)
            outcome = site.send(case)
            print(outcome.report())
            failed += outcome.failed
            if outcome.kind in ("crash", "hang") or site.dead():
                site.restart()
    finally:
        site.close()
    return 1 if failed else 0


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=10_000, help="inputs per RPC and per Flight method (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed (default 0: the same inputs every run)")
    parser.add_argument("--deadline", type=float, default=fuzzing.DEADLINE_S, help="seconds per call (default 10)")
    parser.add_argument("--method", action="append", default=[],
                        help="only the methods whose name contains this (repeatable), e.g. Flight/DoPut")
    parser.add_argument("--max-crashes", type=int, default=20,
                        help="crashes after which a method's remaining inputs are skipped (a restart takes seconds)")
    parser.add_argument("--status-every", type=int, default=50, help="inputs between two GetStatus liveness checks")
    parser.add_argument("--max-tracebacks", type=int, default=None,
                        help="tracebacks allowed in the gateway's log (default: 10 + 1 per 1000 inputs)")
    parser.add_argument("--state-dir", help="the gateway's state dir (default: a temp dir, removed if all went well)")
    parser.add_argument("--replay", nargs="+", metavar="FILE", help="send saved cases (*.case) again and report")
    args = parser.parse_args(argv)

    state = Path(args.state_dir) if args.state_dir else Path(tempfile.mkdtemp(prefix="intertie-fuzz-"))
    signal.signal(signal.SIGTERM, _interrupted)  # the finally blocks stop the gateway
    if args.replay:
        return replay(args.replay, args, state)

    methods = list(fuzzing.iter_methods(args.method))
    if not methods:
        parser.error(f"no method matches {args.method}")
    print(f"fuzzing {len(methods)} methods, {args.inputs} inputs each (seed {args.seed}); state in {state}",
          file=sys.stderr, flush=True)
    started = time.monotonic()
    site = fuzzing.Site.start(state, num_cpus=1, deadline_s=args.deadline)
    rows: list[Row] = []
    try:
        encoder = fuzzing.check_encoder(site)
        for method in methods:
            rows.append(fuzz_method(site, method, args.inputs, args.seed, max_crashes=args.max_crashes,
                                    status_every=args.status_every))
        end = site.dead()
        if end is not None:
            rows[-1].counts["crash"] += 1
            print(f"  the gateway is down at the end: {end}", file=sys.stderr)
            site.restart()
        integrity = fuzzing.journal_integrity(site.state_dir)
    finally:
        site.close()
    tracebacks = fuzzing.traceback_lines(site.log_path)
    total_inputs = sum(r.inputs for r in rows)
    max_tracebacks = args.max_tracebacks if args.max_tracebacks is not None else 10 + total_inputs // 1000

    print()
    print_table(rows)
    skipped = sum(r.skipped for r in rows)
    print()
    print(f"inputs sent: {total_inputs} in {time.monotonic() - started:.0f} s"
          + (f" ({skipped} skipped after {args.max_crashes} crashes in a method)" if skipped else ""))
    print(f"gateway restarts after a crash or an unresponsive hang: {site.restarts}")
    print("raw DoPut encoder (uncorrupted streams stored and served back equal): "
          + ("ok" if not encoder else f"{len(encoder)} problems"))
    for problem in encoder:
        print(f"  {problem}")
    print(f"journal integrity_check: {integrity}")
    print(f"traceback lines in the gateway log: {tracebacks} (at most {max_tracebacks}) -- {site.log_path}")
    print_failures(rows)

    failed = any(r.failures for r in rows) or bool(encoder) or integrity != "ok" or tracebacks > max_tracebacks
    if not failed and not args.state_dir:
        shutil.rmtree(state, ignore_errors=True)
    else:
        print(f"\nstate dir kept: {state}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
