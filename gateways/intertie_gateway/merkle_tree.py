"""The site's side of a verifiable, append-only log: an incremental Merkle tree (RFC 9162).

The tree over ``n`` leaf hashes (see :mod:`intertie.merkle` for the hashing and for how the
tree is shaped) is kept as the hashes of its *complete* subtrees: node ``(level, index)``
is the root of the perfect subtree over leaves ``[index * 2**level, (index + 1) * 2**level)``
and exists once all those leaves do. Level 0 holds the leaf hashes themselves. A node never
changes once written, so the store only grows: ``2n - popcount(n)`` nodes for ``n`` leaves,
just under two per entry.

Any other subtree the RFC's definitions name (the incomplete right edge of a tree, for this
size or for any earlier one) is the fold of at most ``log2 n`` complete subtrees, so every
root and proof costs O(log n) node lookups plus, for the one incomplete sibling on a path,
at most O(log n) hashes.

Storage is a :class:`NodeStore`: ``get`` one node, ``put_many`` a batch. :class:`MemoryNodes`
keeps them in memory; the journal's store keeps them in its database. The tree keeps in
memory only its size and the roots of the complete subtrees its leaves split into (its right
frontier, at most ``log2 n`` hashes), which is all that appending needs.

    tree = MerkleTree(store, size=committed_size)   # after a restart: O(log n) gets
    tree.append_leaf_hashes(hashes)                 # one store.put_many for the whole batch
    tree.root(), tree.root(earlier_size)
    tree.inclusion_proof(index, size), tree.consistency_proof(size1, size2)

``append_leaf_hashes`` writes all the nodes a batch completes with a single ``put_many``
(and returns them): a caller that appends all of a turn's entries in one call writes the
tree once per turn, in the same transaction as the entries if the store's ``put_many``
writes through the journal's connection without committing. The tree's state advances
only once ``put_many`` has returned. After a failed commit, rebuild the tree at the
committed size. Not thread-safe: it belongs to the event loop that owns the journal.

Pure: no I/O of its own, imports nothing but the standard library and :mod:`intertie.merkle`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from intertie.merkle import EMPTY_ROOT, HASH_SIZE, node_hash, split_point

Node = tuple[int, int, bytes]
"""``(level, index, hash)``: the root of the complete subtree over leaves
``[index * 2**level, (index + 1) * 2**level)``."""


class NodeStore(Protocol):
    def get(self, level: int, index: int) -> bytes:
        """The hash of node ``(level, index)``; KeyError when the store does not hold it."""
        ...

    def put_many(self, nodes: Iterable[Node]) -> None:
        """Stores new nodes. A log never rewrites a node: storing one twice is an error."""
        ...


class MemoryNodes:
    """A :class:`NodeStore` in memory: per level, the level's hashes end to end (32 bytes a node).

    Nodes of a level must arrive in index order, as :class:`MerkleTree` writes them.
    """

    def __init__(self) -> None:
        self._levels: list[bytearray] = []

    def get(self, level: int, index: int) -> bytes:
        start = index * HASH_SIZE
        if not (0 <= level < len(self._levels) and 0 <= start < len(self._levels[level])):
            raise KeyError((level, index))
        return bytes(self._levels[level][start : start + HASH_SIZE])

    def put_many(self, nodes: Iterable[Node]) -> None:
        for level, index, h in nodes:
            while len(self._levels) <= level:
                self._levels.append(bytearray())
            row = self._levels[level]
            if index * HASH_SIZE != len(row) or len(h) != HASH_SIZE:
                raise ValueError(
                    f"node ({level}, {index}) is not the next of its level ({len(row) // HASH_SIZE})"
                )
            row += h

    def __len__(self) -> int:
        return sum(len(row) for row in self._levels) // HASH_SIZE


def complete_subtrees(start: int, end: int) -> list[tuple[int, int]]:
    """The complete subtrees, as ``(level, index)`` from left to right, that leaves
    ``[start, end)`` split into; ``start`` must be a multiple of a power of two at least
    ``end - start`` (true of every subtree the RFC's recursion names)."""
    width = end - start
    nodes = []
    for level in range(width.bit_length() - 1, -1, -1):
        if width >> level & 1:
            nodes.append((level, start >> level))
            start += 1 << level
    return nodes


def fold(hashes: list[bytes]) -> bytes:
    """The root over complete subtrees given left to right, largest first (RFC 9162 MTH)."""
    root = hashes[-1]
    for left in reversed(hashes[:-1]):
        root = node_hash(left, root)
    return root


class MerkleTree:
    """The Merkle tree over a log's leaf hashes; its complete subtrees live in ``store``."""

    def __init__(self, store: NodeStore, size: int = 0) -> None:
        if size < 0:
            raise ValueError(f"a tree cannot have {size} leaves")
        self._store = store
        self._size = size
        self._frontier = [store.get(level, index) for level, index in complete_subtrees(0, size)]

    @property
    def size(self) -> int:
        return self._size

    def append_leaf_hashes(self, hashes: Iterable[bytes]) -> list[Node]:
        """Appends leaves; stores every node they complete with one ``put_many`` and returns them."""
        batch = list(hashes)
        for h in batch:
            if len(h) != HASH_SIZE:
                raise ValueError(f"a leaf hash is {HASH_SIZE} bytes, not {len(h)}")
        frontier, size, new = list(self._frontier), self._size, []
        for h in batch:
            new.append((0, size, h))
            level = 0
            while size >> level & 1:  # leaf `size` closes one complete subtree per trailing 1 bit
                h = node_hash(frontier.pop(), h)
                level += 1
                new.append((level, size >> level, h))
            frontier.append(h)
            size += 1
        self._store.put_many(new)
        self._frontier, self._size = frontier, size
        return new

    def root(self, size: int | None = None) -> bytes:
        """The root of the tree of the first ``size`` leaves (default: all)."""
        size = self._checked(size)
        if size == 0:
            return EMPTY_ROOT
        if size == self._size:
            return fold(self._frontier)
        return self._subtree(0, size)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """The audit path of leaf ``index`` in the tree of ``size`` leaves (RFC 9162 PATH), leaf first."""
        size = self._checked(size)
        if not 0 <= index < size:
            raise ValueError(f"no leaf {index} in a tree of {size} leaves")
        proof = []
        lo, hi = 0, size
        while hi - lo > 1:
            k = split_point(hi - lo)
            if index < lo + k:
                proof.append(self._subtree(lo + k, hi))
                hi = lo + k
            else:
                proof.append(self._subtree(lo, lo + k))
                lo += k
        proof.reverse()
        return proof

    def consistency_proof(self, size1: int, size2: int | None = None) -> list[bytes]:
        """The proof that the tree of ``size2`` leaves (default: all) extends that of ``size1``
        (RFC 9162 PROOF), deepest node first; empty when the sizes are equal."""
        size2 = self._checked(size2)
        if not 0 < size1 <= size2:
            raise ValueError(f"no consistency proof from size {size1} to size {size2}")
        proof = []
        lo, hi, whole = 0, size2, True  # whole: [lo, hi) still starts at leaf 0
        while hi != size1:
            k = split_point(hi - lo)
            if size1 <= lo + k:
                proof.append(self._subtree(lo + k, hi))
                hi = lo + k
            else:
                proof.append(self._subtree(lo, lo + k))
                lo, whole = lo + k, False
        if not whole:
            proof.append(self._subtree(lo, hi))
        proof.reverse()
        return proof

    def _checked(self, size: int | None) -> int:
        if size is None:
            return self._size
        if not 0 <= size <= self._size:
            raise ValueError(f"the tree has {self._size} leaves, not {size}")
        return size

    def _subtree(self, start: int, end: int) -> bytes:
        width = end - start
        if width & (width - 1) == 0:  # complete: one stored node
            level = width.bit_length() - 1
            return self._store.get(level, start >> level)
        return fold([self._store.get(level, index) for level, index in complete_subtrees(start, end)])
