"""The usage ledger in the journal's SQLite database: appends, proofs, bytes, checks.

    .venv/bin/python bench/ledger.py [--tasks 20000] [--batch 100] [--entries 1000000] [--proofs 2000]

1. Appends/s through ``Journal.write``: ``--tasks`` Finished changes carrying a Usage,
   ``--batch`` per commit (one loop turn's group commit), on a journal opened as the gateway
   opens it; the same writes on a journal without a ledger show what the ledger adds.
   Target: >= 3,000 entries/s.
2. A ledger of ``--entries`` entries, bulk-appended (the ledger's own append, 10,000 per
   transaction, without task rows); then the median time to generate (from the database) and
   to verify (``intertie.merkle``) an inclusion and a consistency proof for random entries and
   earlier sizes. Target: < 1 ms each.
3. Bytes per entry of the ledger's tables (SQLite's dbstat), reopening the ledger, signing a
   checkpoint, and ``intertie-gateway ledger verify``'s check of the whole ledger.
"""

from __future__ import annotations

import argparse
import math
import random
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from merkle import median_ms  # (bench/merkle.py, beside this script)

from intertie.merkle import leaf_hash, verify_consistency, verify_inclusion
from intertie_gateway.journal import Journal
from intertie_gateway.ledger import LedgerSettings, recorded_keys
from intertie_gateway.ledger_check import open_readonly, verify
from intertie_gateway.lifecycle import State
from intertie_gateway.model import Finished, Started, Usage

SITE = "bench-site"
BULK = 10_000


def usage(i: int) -> Usage:
    return Usage(tenant="acme", task_id=f"acme~{i:032x}", attempt=1, home="", outcome="succeeded",
                 started_at=1_764_000_000.0 + i * 0.01, ended_at=1_764_000_000.5 + i * 0.01, cpus=1.0, gpus=0.0,
                 cpu_time_s=0.4213 + (i % 97) / 1000, args_bytes=180 + i % 50, result_bytes=90 + i % 30,
                 price_per_cpu_hour=0.02)


def open_journal(state: Path, ledger: bool, checkpoints: bool = True) -> Journal:
    """``checkpoints`` False: none made on the way (the bulk ledger gets one, timed, at the end)."""
    settings = LedgerSettings(SITE, state / "ledger.key", every=1 << 62, every_s=math.inf) if not checkpoints \
        else LedgerSettings(SITE, state / "ledger.key") if ledger else None
    return Journal(state / "journal.sqlite", checkpoints_apart=True, ledger=settings)  # as the gateway does


def appends_per_s(state: Path, tasks: int, batch: int, ledger: bool) -> float:
    journal = open_journal(state, ledger)
    try:
        ids = [f"acme~{i:032x}" for i in range(tasks)]
        for start in range(0, tasks, 5000):
            chunk = ids[start:start + 5000]
            journal.accept([], [(t, b"s" * 200, b"a" * 200) for t in chunk], now=1.0)
            journal.write([Started(t, 1, SITE, 2.0) for t in chunk])
        changes = [Finished(t, State.SUCCEEDED, 1, SITE, 3.0, b"r" * 100, None, usage=usage(i))
                   for i, t in enumerate(ids)]
        started = time.perf_counter()
        for start in range(0, tasks, batch):
            journal.write(changes[start:start + batch])
        elapsed = time.perf_counter() - started
        if ledger:
            assert journal.ledger.size == tasks
        return tasks / elapsed
    finally:
        journal.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--proofs", type=int, default=2000)
    args = parser.parse_args()
    rng = random.Random(1)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with_ledger = appends_per_s(root / "with", args.tasks, args.batch, ledger=True)
        without = appends_per_s(root / "without", args.tasks, args.batch, ledger=False)
        print(f"Journal.write, {args.tasks:,} Finished changes with Usage, {args.batch} per commit:")
        print(f"  with the ledger              {with_ledger:,.0f} entries/s (target >= 3,000)")
        print(f"  journal alone                {without:,.0f} changes/s "
              f"(the ledger adds {1e6 / with_ledger - 1e6 / without:.1f} us per entry)")

        state = root / "big"
        journal = open_journal(state, ledger=True, checkpoints=False)
        ledger = journal.ledger
        n = args.entries
        started = time.perf_counter()
        for start in range(0, n, BULK):
            usages = [usage(i) for i in range(start, min(n, start + BULK))]
            with journal._lock:  # as Journal.write calls it, without the task rows
                journal._db.execute("BEGIN")
                ledger.append(usages)
                journal._db.execute("COMMIT")
                ledger.committed()
        bulk = n / (time.perf_counter() - started)
        started = time.perf_counter()
        checkpoint = ledger.checkpoint_now()
        sign_ms = (time.perf_counter() - started) * 1e3
        assert checkpoint is not None and checkpoint.size == n

        indexes = [rng.randrange(n) for _ in range(args.proofs)]
        olds = [rng.randrange(1, n) for _ in range(args.proofs)]
        leaves = {i: leaf_hash(ledger.entries(i, i + 1)[0]) for i in indexes}
        inclusions = [ledger.inclusion_proof(i, n) for i in indexes]
        consistencies = [ledger.consistency_proof(m, n) for m in olds]
        old_roots = [ledger.root(m) for m in olds]
        timings: dict[str, list[Callable[[], object]]] = {
            "inclusion proof, generate": [partial(ledger.inclusion_proof, i, n) for i in indexes],
            "inclusion proof, verify": [partial(verify_inclusion, leaves[i], i, n, p, checkpoint.root)
                                        for i, p in zip(indexes, inclusions, strict=True)],
            "consistency proof, generate": [partial(ledger.consistency_proof, m, n) for m in olds],
            "consistency proof, verify": [partial(verify_consistency, m, n, r, checkpoint.root, p)
                                          for m, p, r in zip(olds, consistencies, old_roots, strict=True)],
        }
        print(f"ledger of {n:,} entries (bulk-appended {BULK:,} per transaction at {bulk:,.0f} entries/s):")
        for label, calls in timings.items():
            print(f"  {label:<28} {median_ms(calls):.3f} ms (median of {len(calls)}; target < 1 ms)")
        print(f"  checkpoint, signed+committed {sign_ms:.2f} ms")

        db = journal._db
        pages = dict(db.execute("SELECT name, sum(pgsize) FROM dbstat WHERE name LIKE 'ledger_%' GROUP BY name"))
        entry_bytes = db.execute("SELECT avg(length(entry)) FROM ledger_entries").fetchone()[0]
        total = sum(pages.values())
        print(f"  bytes per entry (dbstat)     {total / n:.0f}: entries {pages.get('ledger_entries', 0) / n:.0f} "
              f"(the JSON averages {entry_bytes:.0f}), tree nodes {pages.get('ledger_nodes', 0) / n:.0f}")
        journal.close()

        started = time.perf_counter()
        reopened = open_journal(state, ledger=True)
        reopen_ms = (time.perf_counter() - started) * 1e3
        assert reopened.ledger.root(n) == checkpoint.root
        reopened.close()
        print(f"  reopening the journal        {reopen_ms:.1f} ms (the tree's right edge read back)")

        started = time.perf_counter()
        db = open_readonly(state / "journal.sqlite")
        verified = verify(db, [recorded_keys(db)[0]])  # type: ignore[list-item]
        db.close()
        print(f"  ledger verify, whole ledger  {time.perf_counter() - started:.1f} s "
              f"({verified.entries:,} entries)")


if __name__ == "__main__":
    main()
