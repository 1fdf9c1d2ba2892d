"""The usage ledger's Merkle tree at scale (pure Python, in memory).

    .venv/bin/python bench/merkle.py [--entries 1000000] [--batch 1000] [--proofs 2000]

Builds the tree over ``--entries`` leaf hashes, appended ``--batch`` at a time (the journal
appends a loop turn's entries in one call), and prints appends/s (leaf hashes precomputed),
the nodes stored per entry, and the median time to generate and to verify an inclusion
proof and a consistency proof at full size for random leaves and earlier sizes
(target: generating one well under 1 ms).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from functools import partial

from intertie.merkle import leaf_hash, verify_consistency, verify_inclusion
from intertie_gateway.merkle_tree import MemoryNodes, MerkleTree


def median_ms(calls: list[Callable[[], object]]) -> float:
    times = []
    for call in calls:
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--proofs", type=int, default=2000)
    args = parser.parse_args()
    n, rng = args.entries, random.Random(1)

    hashes = [leaf_hash(i.to_bytes(8, "big")) for i in range(n)]
    store = MemoryNodes()
    tree = MerkleTree(store)
    start = time.perf_counter()
    for i in range(0, n, args.batch):
        tree.append_leaf_hashes(hashes[i : i + args.batch])
    elapsed = time.perf_counter() - start
    root = tree.root()

    indexes = [rng.randrange(n) for _ in range(args.proofs)]
    olds = [rng.randrange(1, n) for _ in range(args.proofs)]
    inclusions = [tree.inclusion_proof(i) for i in indexes]
    consistencies = [tree.consistency_proof(m) for m in olds]
    old_roots = [tree.root(m) for m in olds]

    timings: dict[str, list[Callable[[], object]]] = {
        "inclusion proof, generate": [partial(tree.inclusion_proof, i) for i in indexes],
        "inclusion proof, verify": [
            partial(verify_inclusion, hashes[i], i, n, p, root)
            for i, p in zip(indexes, inclusions, strict=True)
        ],
        "consistency proof, generate": [partial(tree.consistency_proof, m) for m in olds],
        "consistency proof, verify": [
            partial(verify_consistency, m, n, r, root, p)
            for m, p, r in zip(olds, consistencies, old_roots, strict=True)
        ],
        "root of an earlier size": [partial(tree.root, m) for m in olds],
    }
    print(f"entries                      {n:,} (batches of {args.batch})")
    print(f"appends/s                    {n / elapsed:,.0f}")
    print(f"nodes stored per entry       {len(store) / n:.3f}")
    for label, calls in timings.items():
        print(f"{label:<28} {median_ms(calls):.4f} ms (median of {len(calls)})")
    print(
        f"proof lengths (median)       inclusion {statistics.median(map(len, inclusions)):.0f}, "
        f"consistency {statistics.median(map(len, consistencies)):.0f} hashes"
    )


if __name__ == "__main__":
    main()
