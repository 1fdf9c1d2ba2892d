"""Checks a site's usage ledger as stored, offline and read-only (``intertie-gateway ledger
verify``; a running gateway's too: WAL readers see one snapshot): every entry's position,
recorded index and leaf hash, the stored tree, and every checkpoint's root and signature.
The first thing wrong is named (``Tampered``).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from intertie.checkpoint import Checkpoint, checkpoint_text
from intertie.merkle import leaf_hash
from intertie_gateway.ledger import ENTRY_VERSION, LedgerError, Tampered
from intertie_gateway.merkle_tree import MemoryNodes, MerkleTree


@dataclass(frozen=True)
class Verified:
    site: str
    entries: int
    checkpoints: int
    last: Checkpoint | None


def open_readonly(path: Path) -> sqlite3.Connection:
    """The journal's database, read-only (a running gateway goes on writing: WAL readers are fine)."""
    if not path.is_file():
        raise LedgerError(f"no journal at {path}")
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)


def verify(db: sqlite3.Connection, public_keys: Sequence[bytes]) -> Verified:
    """Checks a stored ledger: each entry's position, recorded index and leaf; the tree rebuilt
    from the entries against every checkpoint's root, and each checkpoint's signature by one of
    ``public_keys``; then the stored inner nodes (what proofs are served from). Raises
    :class:`Tampered` naming the first problem. One read transaction: one snapshot."""
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    site_row = db.execute("SELECT value FROM meta WHERE key = 'ledger_site'").fetchone() if "meta" in tables else None
    if not {"ledger_entries", "ledger_nodes", "ledger_checkpoints"} <= tables or site_row is None:
        raise LedgerError("this journal holds no usage ledger (no gateway that keeps one has run on it)")
    site = site_row[0]
    keys = [Ed25519PublicKey.from_public_bytes(k) for k in public_keys]
    db.execute("BEGIN")
    try:
        store = MemoryNodes()
        rebuilt = MerkleTree(store)
        n = _verify_entries(db, site, rebuilt)
        count, last = _verify_checkpoints(db, site, keys, rebuilt)
        _verify_nodes(db, store, n)
    finally:
        db.execute("ROLLBACK")
    return Verified(site, n, count, last)


def _verify_entries(db: sqlite3.Connection, site: str, rebuilt: MerkleTree) -> int:
    leaves = db.execute("SELECT idx, hash FROM ledger_nodes WHERE level = 0 ORDER BY idx")
    batch: list[bytes] = []
    n = 0
    for col, value in db.execute("SELECT idx, entry FROM ledger_entries ORDER BY idx"):
        stored, entry = leaves.fetchone(), _blob(value)
        h = leaf_hash(entry)
        if col != n or stored is None or stored[0] != n or _blob(stored[1]) != h or _read(entry, site) != (n, ""):
            raise Tampered(_diagnose(db, n, col, entry, site))
        batch.append(h)
        n += 1
        if len(batch) == 4096:
            rebuilt.append_leaf_hashes(batch)
            batch = []
    rebuilt.append_leaf_hashes(batch)
    extra = leaves.fetchone()
    if extra is not None:
        raise Tampered(f"entries from {n} on are missing (the stored tree has a leaf for entry {extra[0]})")
    return n


def _blob(value: object) -> bytes:
    """A stored entry or hash as bytes, whatever a forger stored it as (then it matches nothing)."""
    return value if isinstance(value, bytes) else repr(value).encode()


def _read(entry: bytes, site: str) -> tuple[int, str]:
    """The index ``entry`` records, and what makes it no usage entry of ``site`` ("" if nothing)."""
    try:
        value = json.loads(entry)
    except ValueError:
        return -1, "it is not JSON"
    if not isinstance(value, dict) or value.get("v") != ENTRY_VERSION or value.get("kind") != "usage" \
            or type(value.get("idx")) is not int:
        return -1, "it is not a usage entry"
    if value.get("site") != site:
        return value["idx"], f"it names site {value.get('site')!r}"
    return value["idx"], ""


def _diagnose(db: sqlite3.Connection, p: int, col: int, entry: bytes, site: str) -> str:
    """Why position ``p`` (the first bad one) is bad; ``col`` is the index the row is stored under."""
    if col != p:
        return f"entry {p} is missing (the stored entries go from {p - 1} to {col})"

    def stored_leaf(i: int) -> bytes | None:
        row = db.execute("SELECT hash FROM ledger_nodes WHERE level = 0 AND idx = ?", (i,)).fetchone()
        return None if row is None else _blob(row[0])

    def leaf_of_entry(i: int) -> bytes | None:
        row = db.execute("SELECT entry FROM ledger_entries WHERE idx = ?", (i,)).fetchone()
        return None if row is None else leaf_hash(_blob(row[0]))

    stored, h = stored_leaf(p), leaf_hash(entry)
    if stored is None:
        return f"entry {p} was inserted: the ledger's tree has no leaf for it"
    q, why = _read(entry, site)
    if why:
        return f"entry {p} was altered: {why}"
    if h == stored:  # only with the stored leaves rewritten to match
        return f"entry {p} is out of order: it records index {q}"
    if leaf_of_entry(p + 1) == stored:
        return f"entry {p} was inserted (the entries from there on are shifted by one)"
    if q != p and stored_leaf(q) == h:  # entry q, in the wrong place
        if leaf_of_entry(q) == stored:
            return f"entries {p} and {q} are out of order (swapped)"
        if q > p:
            return f"entry {p} is missing (entry {q} stands in its place)"
        return f"entry {p} is out of order: it is entry {q} again"
    return f"entry {p} was altered: its bytes do not hash to the stored leaf"


def _verify_checkpoints(db: sqlite3.Connection, site: str, keys: Sequence[Ed25519PublicKey],
                        rebuilt: MerkleTree) -> tuple[int, Checkpoint | None]:
    count, last, before = 0, None, 0
    for size, root, at, signature in db.execute("SELECT size, root, time, signature FROM ledger_checkpoints "
                                                "ORDER BY size"):
        if not (isinstance(root, bytes) and isinstance(signature, bytes) and isinstance(at, int | float)) \
                or not _signed(keys, signature, checkpoint_text(site, size, root, at)):
            raise Tampered(f"checkpoint at size {size} is forged: its signature does not verify with the site's key")
        if size > rebuilt.size:
            raise Tampered(f"entries from {rebuilt.size} on are missing (the checkpoint at size {size} covers "
                           f"{size})")
        if rebuilt.root(size) != root:
            raise Tampered(f"entries between {before} and {size} were changed (checkpoint at size {size} does not "
                           "match)")
        count, last, before = count + 1, Checkpoint(site, size, root, at, signature), size
    return count, last


def _signed(keys: Sequence[Ed25519PublicKey], signature: bytes, text: bytes) -> bool:
    for key in keys:
        try:
            key.verify(signature, text)
            return True
        except InvalidSignature:
            pass
    return False


def _verify_nodes(db: sqlite3.Connection, store: MemoryNodes, n: int) -> None:
    """The stored inner nodes against those rebuilt from the entries (leaves were checked with them)."""
    seen = 0
    for level, idx, h in db.execute("SELECT level, idx, hash FROM ledger_nodes WHERE level > 0 ORDER BY level, idx"):
        try:
            ok = store.get(level, idx) == _blob(h)
        except KeyError:
            ok = False
        if not ok:
            raise Tampered(f"the stored tree's node (level {level}, index {idx}) does not match the entries "
                           "(proofs served from it would not verify)")
        seen += 1
    missing = len(store) - n - seen
    if missing:
        raise Tampered(f"{missing} inner nodes of the stored tree are missing (proofs would fail)")


