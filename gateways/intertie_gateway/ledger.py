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
  position, not only by the checkpoints. Two more columns (``OWNER_COLUMNS``, added in place
  by ``Ledger`` to a table made without them) are generated from the entry's JSON when it is
  appended, and indexed: ``tenant`` and ``home`` (""), so that a tenant's or a peer's entries
  are paged (``visible_entries``) without reading the whole log, and can never disagree with
  the entry;
* ``ledger_nodes(level, idx, hash)``: the Merkle tree's complete subtrees (``merkle_tree``);
  level 0 holds ``intertie.merkle.leaf_hash(entry)``;
* ``ledger_checkpoints(size, root, time, signature)``: signed tree heads, Ed25519 over
  ``checkpoint_text`` with the site's key (``<state-dir>/ledger.key``, made at first start; its
  public key is what verifiers pin). One every ``every`` entries, or ``every_s`` seconds after
  the last when entries came meanwhile, and one at a clean stop.

``ledger_check.verify`` checks a ledger as stored, offline (``intertie-gateway ledger verify``).
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

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from intertie.checkpoint import Checkpoint, checkpoint_text
from intertie.merkle import leaf_hash
from intertie_gateway.files import write_private
from intertie_gateway.merkle_tree import MerkleTree, Node
from intertie_gateway.model import Usage

logger = logging.getLogger(__name__)

ENTRY_VERSION = 1
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
CREATE TABLE IF NOT EXISTS ledger_pending (seq INTEGER PRIMARY KEY, usage BLOB NOT NULL);
"""
# Recorded usage appended to the log per ``integrate`` transaction, at most.
INTEGRATE_BATCH = 1000
# Whose an entry is, generated from its JSON when it is appended (NULL for bytes that are no
# JSON, which only a forger stores). A VIRTUAL column is what ALTER TABLE can add to a table
# that has rows; building its index computes it for them (the backfill).
_OWNER = "CASE WHEN json_valid(CAST(entry AS TEXT)) THEN json_extract(CAST(entry AS TEXT), '$.{}') END"
OWNER_COLUMNS = {name: f"{name} TEXT GENERATED ALWAYS AS ({_OWNER.format(name)}) VIRTUAL"
                 for name in ("tenant", "home")}
OWNER_INDEXES = """
CREATE INDEX IF NOT EXISTS ledger_entries_tenant ON ledger_entries (tenant);
CREATE INDEX IF NOT EXISTS ledger_entries_home ON ledger_entries (home) WHERE home != '';
"""
# Entries one ListEntries page holds at most (each with its proof: ~0.1 ms to make).
MAX_PAGE = 1000

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
    # 0: usage is appended to the log in the transaction that records it. > 0 (the gateway):
    # that transaction records it in ``ledger_pending`` (one small row), and ``integrate``,
    # called this often, appends what was recorded to the log in batches: a finished task's
    # commit then writes one row instead of an entry, its tree nodes and two index entries.
    integrate_every_s: float = 0.0


def encode_entry(usage: Usage, site: str, idx: int) -> bytes:
    return _entry(dict(zip(_USAGE_FIELDS, _usage_values(usage), strict=True)), site, idx)


def _entry(values: dict[str, object], site: str, idx: int) -> bytes:
    values.update(v=ENTRY_VERSION, kind="usage", site=site, idx=idx)
    return _canonical(values)


def entry_from_recorded(recorded: bytes, site: str, idx: int) -> bytes:
    """The entry of usage recorded as canonical JSON of its fields (``ledger_pending``): the
    same bytes as ``encode_entry``, by inserting the entry's own keys where sorted order puts
    them (no decoding: a batch appends thousands). A key's quote cannot occur unescaped inside
    a JSON string, so each marker is found once, before its key."""
    outcome, started = recorded.find(b',"outcome":'), recorded.find(b',"started_at":')
    if outcome < 0 or started < outcome or not recorded.endswith(b"}"):
        return _entry(json.loads(recorded), site, idx)
    return b"".join((recorded[:outcome], b',"idx":%d,"kind":"usage"' % idx, recorded[outcome:started],
                     b',"site":', _CANONICAL.encode(site).encode(), recorded[started:-1], b',"v":%d}' % ENTRY_VERSION))


def _canonical(values: dict[str, object]) -> bytes:
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
        _index_owners(db)
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
        self._last_size: int = last.size if last is not None else 0
        self._last_time: float = last.time if last is not None else 0.0
        self._pending: Checkpoint | None = None

    # ------------------------------------------------------------------ in the journal's transaction
    def append(self, usages: Sequence[Usage]) -> None:
        """Appends entries, and a checkpoint if one is due, in the caller's open transaction on
        the journal's connection (with its lock held). Then ``committed`` or ``rolled_back``."""
        if self._settings.integrate_every_s > 0:
            self._db.executemany("INSERT INTO ledger_pending (usage) VALUES (?)",
                                 [(_canonical(dict(zip(_USAGE_FIELDS, _usage_values(u), strict=True))),)
                                  for u in usages])
            return
        self._append([dict(zip(_USAGE_FIELDS, _usage_values(u), strict=True)) for u in usages])

    def _append(self, usages: Sequence[dict[str, object] | bytes]) -> None:
        """Entries of usage given as field values, or as recorded (canonical JSON)."""
        tree = self._committed_tree()
        start = tree.size
        entries = [entry_from_recorded(u, self.site, start + i) if isinstance(u, bytes) else _entry(u, self.site, start + i)
                   for i, u in enumerate(usages)]
        self._db.executemany("INSERT INTO ledger_entries (idx, entry) VALUES (?, ?)", enumerate(entries, start))
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

    def integrate(self, limit: int = INTEGRATE_BATCH) -> int:
        """Appends recorded usage (``ledger_pending``, oldest first) to the log in one
        transaction, with a checkpoint if one is due; returns how many. Recorded usage that
        a crash left is appended by the first call after the restart: each row is appended
        once, in the transaction that deletes it."""
        with self._lock:
            rows = self._db.execute("SELECT seq, usage FROM ledger_pending ORDER BY seq LIMIT ?", (limit,)).fetchall()
            if not rows:
                return 0
            self._db.execute("BEGIN")
            try:
                self._append([bytes(usage) for _, usage in rows])
                self._db.execute("DELETE FROM ledger_pending WHERE seq <= ?", (rows[-1][0],))
                self._db.execute("COMMIT")
            except BaseException:
                self.rolled_back()
                self._db.execute("ROLLBACK")
                raise
            self.committed()
            return len(rows)

    def pending(self) -> int:
        """Usage recorded and not yet appended to the log."""
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM ledger_pending").fetchone()[0])

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_now(self) -> Checkpoint | None:
        """Appends what was recorded, then signs the tree as it is, unless the last checkpoint
        covers it already. Returns the latest checkpoint (None while the ledger is empty)."""
        while self.integrate():
            pass
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

    def visible_entries(self, *, tenant: str | None = None, home: str | None = None, start: int = 0, end: int,
                        since: float = 0.0, limit: int = MAX_PAGE) -> list[tuple[int, bytes]]:
        """Up to ``limit`` ``(index, entry)`` of ``[start, end)`` in index order: those of
        ``tenant`` (as this site names it), or of tasks whose home is ``home`` (a peer's), or
        all (both None); ``since``: only attempts that ended then or later. Each query reads
        the one index that names its owner."""
        where, params = ["idx >= ?", "idx < ?"], list[object]([start, end])
        if tenant is not None:
            where.append("tenant = ?")
            params.append(tenant)
        elif home is not None:
            where += ["home = ?", "home != ''"]  # (the partial index's own term: it is used)
            params.append(home)
        if since:
            where.append("json_extract(CAST(entry AS TEXT), '$.ended_at') >= ?")
            params.append(since)
        sql = f"SELECT idx, entry FROM ledger_entries WHERE {' AND '.join(where)} ORDER BY idx LIMIT ?"
        with self._lock:
            rows = self._db.execute(sql, (*params, limit)).fetchall()
        return [(idx, bytes(entry)) for idx, entry in rows]

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


def _index_owners(db: sqlite3.Connection) -> None:
    """Adds the owner columns and their indexes to ``ledger_entries`` if it lacks them (a
    journal written before they existed, and every new one: ``SCHEMA`` makes the table bare)."""
    have = {row[1] for row in db.execute("PRAGMA table_xinfo(ledger_entries)")}
    with db:
        db.execute("BEGIN")
        for name, ddl in OWNER_COLUMNS.items():
            if name not in have:
                db.execute(f"ALTER TABLE ledger_entries ADD COLUMN {ddl}")
        for statement in OWNER_INDEXES.strip().splitlines():  # (no-ops once they exist)
            db.execute(statement)


def recorded_keys(db: sqlite3.Connection) -> tuple[bytes | None, list[bytes]]:
    """The public key the ledger records as its own, and those retired by ``replace_key``."""
    meta = dict(db.execute("SELECT key, value FROM meta WHERE key IN ('ledger_public_key', 'ledger_retired_keys')"))
    current = base64.b64decode(meta["ledger_public_key"]) if "ledger_public_key" in meta else None
    return current, [base64.b64decode(k) for k in json.loads(meta.get("ledger_retired_keys", "[]"))]


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
