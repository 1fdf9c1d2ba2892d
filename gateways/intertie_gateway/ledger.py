"""The site's usage ledger: what each attempt of a task used here, in an append-only log that
others can check without trusting the site (issue 13).

It lives in the journal's SQLite database, on the journal's connection: ``Journal.write``
appends the usage of a turn's changes in the same transaction as the changes, so a crash
neither loses an entry nor repeats one. An entry is appended when the Finished or Requeued
change that carries its ``model.Usage`` applies (its row was unfinished); a change that changes
no row (a late duplicate) appends nothing. Entries are not keyed on (task, attempt): a task id
may come back once its row has expired.

Tables (``SCHEMA``):

* ``ledger_entries(idx, entry)``: entry ``idx``, canonical JSON (``encode_entry``: sorted keys,
  compact, ASCII) of the Usage fields with ``"v": 1``, ``"kind": "usage"``, ``"site"`` and
  ``"idx"``, its own index, so an entry that is moved, inserted or dropped is caught by its
  position, not only by the checkpoints;
* ``ledger_nodes(level, idx, hash)``: the Merkle tree's complete subtrees (``merkle_tree``);
  level 0 holds ``intertie.merkle.leaf_hash(entry)``;
* ``ledger_checkpoints(size, root, time, signature)``: signed tree heads, Ed25519 over
  ``checkpoint_text`` with the site's key (``<state-dir>/ledger.key``, made at first start; its
  public key is what verifiers pin). One every ``every`` entries, or ``every_s`` seconds after
  the last when entries came meanwhile, and one at a clean stop.

``verify`` checks a ledger as stored, offline (``intertie-gateway ledger verify``).
"""

from __future__ import annotations

import base64
import json
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from operator import attrgetter
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from intertie.merkle import leaf_hash
from intertie_gateway.files import write_private
from intertie_gateway.merkle_tree import MemoryNodes, MerkleTree, Node
from intertie_gateway.model import Usage

logger = logging.getLogger(__name__)

ENTRY_VERSION = 1
CHECKPOINT_FORMAT = "intertie-ledger-checkpoint/v1"
# A checkpoint every 1000 entries bounds what a proof waits for under load; 10 s bounds it when
# the site is quiet. Each costs one signature (~30 us) and a row (~150 bytes).
CHECKPOINT_EVERY = 1000
CHECKPOINT_EVERY_S = 10.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger_entries (idx INTEGER PRIMARY KEY, entry BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS ledger_nodes (
    level INTEGER NOT NULL, idx INTEGER NOT NULL, hash BLOB NOT NULL, PRIMARY KEY (level, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ledger_checkpoints (
    size INTEGER PRIMARY KEY, root BLOB NOT NULL, time REAL NOT NULL, signature BLOB NOT NULL
);
"""

_USAGE_FIELDS = tuple(f.name for f in fields(Usage))
_usage_values = attrgetter(*_USAGE_FIELDS)
# Made once: json.dumps with options builds an encoder per call (a fifth of an entry's cost).
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


class LedgerError(Exception):
    """The ledger cannot be opened or checked as it is (a missing or wrong key, another site's ledger)."""


class Tampered(Exception):
    """What is wrong with a stored ledger: the first bad entry or checkpoint."""


@dataclass(frozen=True)
class LedgerSettings:
    site_id: str
    key_path: Path
    every: int = CHECKPOINT_EVERY
    every_s: float = CHECKPOINT_EVERY_S
    clock: Callable[[], float] = time.time


@dataclass(frozen=True)
class Checkpoint:
    """The site's signature over the tree of the first ``size`` entries, made at ``time``."""

    site: str
    size: int
    root: bytes
    time: float
    signature: bytes

    def signed_text(self) -> bytes:
        return checkpoint_text(self.site, self.size, self.root, self.time)


def checkpoint_text(site: str, size: int, root: bytes, at: float) -> bytes:
    """What a checkpoint's signature covers. ``at`` is stored to the millisecond, so ``%.3f``
    prints it the same from any language's double."""
    return f"{CHECKPOINT_FORMAT}\n{site}\n{size}\n{base64.b64encode(root).decode()}\n{at:.3f}\n".encode()


def encode_entry(usage: Usage, site: str, idx: int) -> bytes:
    values = dict(zip(_USAGE_FIELDS, _usage_values(usage), strict=True))
    values.update(v=ENTRY_VERSION, kind="usage", site=site, idx=idx)
    text = _CANONICAL.encode(values)
    if "NaN" in text or "Infinity" in text:  # (or a name holding those letters: then nothing changes)
        for name, value in values.items():
            if isinstance(value, float) and not math.isfinite(value):
                values[name] = None  # JSON has no NaN: "not known" (and a commit must not fail on it)
        text = _CANONICAL.encode(values)
    return text.encode()


def raw_public_key(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def read_public_key(path: Path) -> bytes:
    """The raw Ed25519 public key in a PEM file (a public key, or the site's ledger.key)."""
    data = path.read_bytes()
    key: object
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        key = _read_key(path)
    if not isinstance(key, Ed25519PrivateKey | Ed25519PublicKey):
        raise LedgerError(f"{path} is not an Ed25519 key")
    return raw_public_key(key)


def _read_key(path: Path) -> Ed25519PrivateKey | None:
    """The site's private key (None: no such file)."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        return None
    except (ValueError, TypeError):
        raise LedgerError(f"{path} holds no PEM key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise LedgerError(f"{path} is not an Ed25519 key")
    return key


def _new_key(path: Path) -> Ed25519PrivateKey:
    key = Ed25519PrivateKey.generate()
    write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return key


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class _SqlNodes:
    """The tree's nodes in ``ledger_nodes``, written in the caller's transaction (a NodeStore)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def get(self, level: int, index: int) -> bytes:
        row = self._db.execute("SELECT hash FROM ledger_nodes WHERE level=? AND idx=?", (level, index)).fetchone()
        if row is None:
            raise KeyError((level, index))
        return bytes(row[0])

    def put_many(self, nodes: Iterable[Node]) -> None:
        self._db.executemany("INSERT INTO ledger_nodes VALUES (?, ?, ?)", nodes)


class Ledger:
    """The site's usage ledger on the journal's connection (built by ``Journal``).

    ``Journal.write`` calls ``append`` inside its transaction, then ``committed`` or
    ``rolled_back``; every other method takes the journal's lock, and sees committed entries
    only. The in-memory tree never runs ahead of the database: after a rollback it is
    reloaded from what was committed before it is used again.
    """

    def __init__(self, db: sqlite3.Connection, lock: threading.Lock, settings: LedgerSettings) -> None:
        self._db, self._lock, self._settings = db, lock, settings
        self.site = settings.site_id
        meta = dict(db.execute("SELECT key, value FROM meta WHERE key IN ('ledger_site', 'ledger_public_key')"))
        site, recorded = meta.get("ledger_site"), meta.get("ledger_public_key")
        state_dir = settings.key_path.parent
        if site is not None and site != self.site:
            raise LedgerError(f"the usage ledger in {state_dir} is site {site!r}'s and this gateway is site "
                              f"{self.site!r}: its entries and checkpoints name the site, so the id cannot change "
                              f"(run as {site!r}, or start {self.site!r} on a state dir of its own)")
        key = _read_key(settings.key_path)
        if key is None and recorded is not None:
            raise LedgerError(f"the usage ledger's signing key {settings.key_path} is missing: restore it from a "
                              "backup (the ledger's checkpoints were signed with it); if it is lost for good, "
                              f"`intertie-gateway ledger new-key --state-dir {state_dir}` makes a new one (README: "
                              "The usage ledger)")
        if key is None:
            key = _new_key(settings.key_path)
            logger.info("made the usage ledger's signing key %s (back it up: checkpoints are signed with it)",
                        settings.key_path)
        self._key, self._public = key, raw_public_key(key)
        if recorded is not None and recorded != _b64(self._public):
            raise LedgerError(f"{settings.key_path} is not the key this ledger's checkpoints were signed with: "
                              "restore the right one (or, if it is lost, see `intertie-gateway ledger new-key`)")
        if site is None or recorded is None:
            with db:
                db.execute("BEGIN")
                db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                               [("ledger_site", self.site), ("ledger_public_key", _b64(self._public))])
        self._nodes = _SqlNodes(db)
        self._tree: MerkleTree | None = self._load()
        last = self._latest()
        # With no checkpoint yet the first entries are signed at once.
        self._last_size, self._last_time = (last.size, last.time) if last is not None else (0, 0.0)
        self._pending: Checkpoint | None = None

    # ------------------------------------------------------------------ in the journal's transaction
    def append(self, usages: Sequence[Usage]) -> None:
        """Appends entries, and a checkpoint if one is due, in the caller's open transaction on
        the journal's connection (with its lock held). Then ``committed`` or ``rolled_back``."""
        tree = self._committed_tree()
        start = tree.size
        entries = [encode_entry(u, self.site, start + i) for i, u in enumerate(usages)]
        self._db.executemany("INSERT INTO ledger_entries VALUES (?, ?)", enumerate(entries, start))
        tree.append_leaf_hashes([leaf_hash(e) for e in entries])
        if self._due(tree.size, self._settings.clock()):
            self._pending = self._checkpoint(tree)

    def committed(self) -> None:
        if self._pending is not None:
            self._last_size, self._last_time = self._pending.size, self._pending.time
            self._pending = None

    def rolled_back(self) -> None:
        """The transaction did not commit: forget what it appended (reloaded when next used)."""
        self._tree, self._pending = None, None

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_now(self) -> Checkpoint | None:
        """Signs the tree as it is, unless the last checkpoint covers it already. Returns the
        latest checkpoint (None while the ledger is empty)."""
        made = self._checkpoint_tx(due_only=False)
        if made is not None:
            return made
        with self._lock:
            return self._latest()

    def checkpoint_if_due(self) -> Checkpoint | None:
        """A checkpoint if entries came since the last and ``every_s`` has passed (the gateway
        asks every second); the new checkpoint or None."""
        return self._checkpoint_tx(due_only=True)

    def _checkpoint_tx(self, *, due_only: bool) -> Checkpoint | None:
        with self._lock:
            tree = self._committed_tree()
            if tree.size == self._last_size or (due_only and not self._due(tree.size, self._settings.clock())):
                return None
            with self._db:
                self._db.execute("BEGIN")
                made = self._checkpoint(tree)
            self._last_size, self._last_time = made.size, made.time
            return made

    def _due(self, size: int, now: float) -> bool:
        return size > self._last_size and (size - self._last_size >= self._settings.every
                                           or now - self._last_time >= self._settings.every_s)

    def _checkpoint(self, tree: MerkleTree) -> Checkpoint:
        at = round(self._settings.clock(), 3)
        root = tree.root()
        # Signed inline on the event loop: an Ed25519 signature takes ~30 us here (bench/ledger.py),
        # less than the commit it rides in.
        signature = self._key.sign(checkpoint_text(self.site, tree.size, root, at))
        self._db.execute("INSERT INTO ledger_checkpoints VALUES (?, ?, ?, ?)", (tree.size, root, at, signature))
        return Checkpoint(self.site, tree.size, root, at, signature)

    # ------------------------------------------------------------------ what is read
    @property
    def size(self) -> int:
        """Entries committed."""
        with self._lock:
            return self._committed_tree().size

    def public_key(self) -> bytes:
        """The site's Ed25519 public key, raw (32 bytes): what verifiers pin."""
        return self._public

    def latest_checkpoint(self) -> Checkpoint | None:
        with self._lock:
            return self._latest()

    def checkpoint(self, size: int) -> Checkpoint | None:
        """The checkpoint at exactly ``size`` entries, if one was made."""
        with self._lock:
            row = self._db.execute("SELECT size, root, time, signature FROM ledger_checkpoints WHERE size=?",
                                   (size,)).fetchone()
        return None if row is None else self._row(row)

    def entries(self, start: int, end: int) -> list[bytes]:
        """Entries ``[start, end)`` as stored (the bytes their leaves hash)."""
        with self._lock:
            size = self._committed_tree().size
            if not 0 <= start <= end <= size:
                raise ValueError(f"no entries [{start}, {end}) in a ledger of {size}")
            rows = self._db.execute("SELECT entry FROM ledger_entries WHERE idx >= ? AND idx < ? ORDER BY idx",
                                    (start, end)).fetchall()
        return [bytes(r[0]) for r in rows]

    def root(self, size: int | None = None) -> bytes:
        with self._lock:
            return self._committed_tree().root(size)

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """Entry ``index``'s audit path in the tree of ``size`` entries (RFC 9162), leaf first;
        ValueError for an index or size the ledger does not have."""
        with self._lock:
            return self._committed_tree().inclusion_proof(index, size)

    def consistency_proof(self, size1: int, size2: int) -> list[bytes]:
        """That the tree of ``size2`` entries extends that of ``size1`` (RFC 9162), deepest node first."""
        with self._lock:
            return self._committed_tree().consistency_proof(size1, size2)

    # ------------------------------------------------------------------ inside
    def _committed_tree(self) -> MerkleTree:
        if self._tree is None:
            self._tree = self._load()
        return self._tree

    def _load(self) -> MerkleTree:
        size = self._db.execute("SELECT coalesce(max(idx) + 1, 0) FROM ledger_entries").fetchone()[0]
        try:
            return MerkleTree(self._nodes, size)
        except KeyError as exc:
            raise LedgerError(f"the usage ledger's stored tree lacks node {exc.args[0]} for its {size} entries "
                              "(`intertie-gateway ledger verify` says more)") from None

    def _latest(self) -> Checkpoint | None:
        row = self._db.execute("SELECT size, root, time, signature FROM ledger_checkpoints "
                               "ORDER BY size DESC LIMIT 1").fetchone()
        return None if row is None else self._row(row)

    def _row(self, row: tuple[int, bytes, float, bytes]) -> Checkpoint:
        return Checkpoint(self.site, row[0], bytes(row[1]), row[2], bytes(row[3]))


# ---------------------------------------------------------------------------- offline
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


def recorded_keys(db: sqlite3.Connection) -> tuple[bytes | None, list[bytes]]:
    """The public key the ledger records as its own, and those retired by ``replace_key``."""
    meta = dict(db.execute("SELECT key, value FROM meta WHERE key IN ('ledger_public_key', 'ledger_retired_keys')"))
    current = base64.b64decode(meta["ledger_public_key"]) if "ledger_public_key" in meta else None
    return current, [base64.b64decode(k) for k in json.loads(meta.get("ledger_retired_keys", "[]"))]


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


def replace_key(state_dir: Path) -> bytes:
    """For a lost ``ledger.key``, with the gateway stopped: a new key, and the old public key
    kept as retired (``verify`` accepts checkpoints signed by either). Returns the new public key."""
    path, journal = state_dir / "ledger.key", state_dir / "journal.sqlite"
    if not journal.is_file():
        raise LedgerError(f"no journal at {journal}")
    if (state_dir / "address").exists():
        raise LedgerError(f"a gateway is running on {state_dir}: stop it first")
    if path.exists():
        raise LedgerError(f"{path} exists: a new key replaces a lost one only (move it away if you mean to)")
    db = sqlite3.connect(journal, isolation_level=None)
    try:
        current, retired = recorded_keys(db)
        with db:
            db.execute("BEGIN")
            if current is not None:
                db.execute("INSERT OR REPLACE INTO meta VALUES ('ledger_retired_keys', ?)",
                           (json.dumps([_b64(k) for k in [*retired, current]]),))
            db.execute("DELETE FROM meta WHERE key = 'ledger_public_key'")
    finally:
        db.close()
    return raw_public_key(_new_key(path))  # the gateway records it at its next start
