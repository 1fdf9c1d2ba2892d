"""Merkle-tree hashing and proof verification for append-only logs (RFC 9162, section 2.1).

A log of ``n`` entries has one binary hash tree. Its leaves are ``leaf_hash(entry)`` =
SHA-256(0x00 || entry) and each inner node is ``node_hash(left, right)`` = SHA-256(0x01 ||
left || right); the prefixes keep a leaf from passing for a node. The tree is not padded:
the root of ``n > 1`` leaves hashes the root of the first ``k`` leaves, ``k`` the largest
power of two below ``n`` (a complete subtree), with the root of the remaining ``n - k``.
The empty tree's root is SHA-256 of nothing.

A site signs checkpoints (a tree size with its root). A client that trusts no site checks:

* inclusion (:func:`verify_inclusion`): entry ``index`` is in the tree of ``tree_size``
  leaves with ``root``, given its audit path (the sibling hashes from the leaf up);
* consistency (:func:`verify_consistency`): the tree of ``size2`` leaves extends the tree of
  ``size1`` leaves, so the site rewrote nothing it had already signed.

Both implement the RFC's verification algorithms (2.1.3.2 and 2.1.4.2) and raise
:class:`ProofError` when the proof proves nothing, whatever the input (wrong sizes, a proof
too long or too short, hashes of the wrong length). A size and its root must come from the
same signed checkpoint: a proof shows a root is that of a tree holding the entry, not that
the tree has the size claimed beside it.

Sizes outside the RFC's algorithms follow transparency-dev/merkle and its test vectors:
a consistency proof from size 0 is always rejected (everything extends the empty tree, so
such a check is a caller's mistake); for ``size1 == size2`` the proof must be empty and the
two roots equal, byte for byte, which is all that is checked of them (as the vectors demand,
equal roots of any length pass: nothing is hashed).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()


class ProofError(ValueError):
    """A proof does not prove what it was checked for."""


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def split_point(n: int) -> int:
    """The largest power of two below ``n`` (``n >= 2``): where the tree of ``n`` leaves splits."""
    return 1 << ((n - 1).bit_length() - 1)


def root_from_leaf_hashes(hashes: Sequence[bytes]) -> bytes:
    """The root of the tree over ``hashes`` (RFC 9162 MTH), hashing all of them: O(n)."""
    if not hashes:
        return EMPTY_ROOT
    if len(hashes) == 1:
        return hashes[0]
    k = split_point(len(hashes))
    return node_hash(root_from_leaf_hashes(hashes[:k]), root_from_leaf_hashes(hashes[k:]))


def _check_length(what: str, value: bytes) -> None:
    if len(value) != HASH_SIZE:
        raise ProofError(f"{what} is {len(value)} bytes, not {HASH_SIZE}")


def _check_path(path: Sequence[bytes]) -> None:
    for i, h in enumerate(path):
        _check_length(f"proof[{i}]", h)


def verify_inclusion(
    leaf_hash: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Checks that ``leaf_hash`` is leaf ``index`` of the tree of ``tree_size`` leaves with ``root``."""
    if not 0 <= index < tree_size:
        raise ProofError(f"index {index} is outside a tree of {tree_size} leaves")
    _check_length("leaf hash", leaf_hash)
    _check_length("root", root)
    _check_path(proof)
    # fn walks up from the leaf, sn from the last leaf; where they meet, the path turns.
    fn, sn, r = index, tree_size - 1, leaf_hash
    for p in proof:
        if sn == 0:
            raise ProofError("inclusion proof too long")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    if sn:
        raise ProofError("inclusion proof too short")
    if r != root:
        raise ProofError("inclusion proof does not lead to the root")


def verify_consistency(size1: int, size2: int, root1: bytes, root2: bytes, proof: Sequence[bytes]) -> None:
    """Checks that the tree of ``size2`` leaves with ``root2`` extends that of ``size1`` with ``root1``."""
    if not 0 <= size1 <= size2:
        raise ProofError(f"no consistency proof from size {size1} to size {size2}")
    if size1 == 0:
        raise ProofError("a consistency proof from the empty tree proves nothing")
    if size1 == size2:
        if proof:
            raise ProofError("equal sizes take an empty consistency proof")
        if root1 != root2:
            raise ProofError("equal sizes but different roots")
        return
    if not proof:
        raise ProofError("empty consistency proof")
    _check_length("first root", root1)
    _check_length("second root", root2)
    _check_path(proof)
    # A first tree that is complete is a node of the second: its root starts the path.
    path = [root1, *proof] if size1 & (size1 - 1) == 0 else list(proof)
    fn, sn = size1 - 1, size2 - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("consistency proof too long")
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            while not fn & 1 and fn:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    if sn:
        raise ProofError("consistency proof too short")
    if fr != root1:
        raise ProofError("consistency proof does not lead to the first root")
    if sr != root2:
        raise ProofError("consistency proof does not lead to the second root")
