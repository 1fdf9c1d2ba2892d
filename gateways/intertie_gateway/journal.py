"""The durable journal: SQLite in WAL mode.

A task is acknowledged only after its row is committed here. With ``fsync`` off a
commit is written to the WAL file before the call returns (``synchronous=NORMAL``),
so it survives a killed process; with ``fsync`` on every commit is also flushed to
disk, so it survives a power loss.

Small writes run inline on the event loop (a commit costs ~20 us without fsync,
less than a hop to another thread); callers move large batches to a thread. The
connection is shared behind a lock either way. With ``checkpoints_apart`` (the gateway),
the WAL is copied into the database file (a checkpoint, which syncs the file) by a
thread of its own on a connection of its own, not inside a commit on the event loop:
SQLite's automatic checkpoint held a commit up for tens of milliseconds now and then.

With ``ledger`` settings (the gateway) the journal keeps the site's usage ledger
(``ledger.py``) in the same database: the usage of the changes a write records is appended
in that write's transaction.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from intertie_gateway import convert
from intertie_gateway.ledger import SCHEMA as LEDGER_SCHEMA
from intertie_gateway.ledger import Ledger, LedgerSettings
from intertie_gateway.lifecycle import TERMINAL_STATES, State
from intertie_gateway.model import Change, Finished, Forgotten, Placed, Requeued, Started, Usage

logger = logging.getLogger(__name__)

# How often the checkpoint thread copies the WAL into the database file.
CHECKPOINT_EVERY_S = 0.5

# Task states as stored: the public states (the wire enum's values, 1..5).
QUEUED = State.QUEUED
RUNNING = State.RUNNING
TERMINAL = TERMINAL_STATES

SCHEMA_VERSION = 5
# The usage ledger's tables (ledger.SCHEMA) end the script: created on every open, so a journal
# of any version gets them in place.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS functions (
    digest TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    payload BLOB NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY,
    spec BLOB NOT NULL,          -- schema 2 kept the spec here; since 3 it is in specs (this is empty)
    state INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    site TEXT NOT NULL DEFAULT '',
    submitted_at REAL NOT NULL,
    started_at REAL NOT NULL DEFAULT 0,
    finished_at REAL NOT NULL DEFAULT 0,
    result BLOB,                 -- cloudpickled by the worker; never unpickled here
    error BLOB,                  -- intertie.v1.Error, serialized
    history TEXT NOT NULL DEFAULT '[]',
    placements BLOB              -- intertie.v1.TaskInfo holding only its placements, serialized
);
-- The spec and its arguments (up to the payload limit) apart from the task's state: SQLite
-- rewrites a whole row on UPDATE, and a task's state changes several times.
CREATE TABLE IF NOT EXISTS specs (
    task_id TEXT PRIMARY KEY,
    spec BLOB NOT NULL,          -- intertie.v1.TaskSpec, serialized; since schema 4 without its args
    args BLOB                    -- the args as the client sent them, stored as they are (opaque bytes)
);
CREATE INDEX IF NOT EXISTS tasks_unfinished ON tasks (state) WHERE state IN (1, 2);
CREATE INDEX IF NOT EXISTS tasks_finished_at ON tasks (finished_at) WHERE state IN (3, 4, 5);
""" + LEDGER_SCHEMA


@dataclass
class TaskRow:
    task_id: str
    spec: bytes
    state: int
    attempts: int
    site: str
    submitted_at: float
    started_at: float
    finished_at: float
    result: bytes | None
    error: bytes | None
    history: list[dict[str, object]]
    placements: bytes | None = None
    args: bytes | None = None  # None: in ``spec`` (journaled before schema 4)


_ROW_COLUMNS = ("t.task_id, coalesce(s.spec, t.spec), state, attempts, site, submitted_at, started_at, "
                "finished_at, result, error, history, placements, s.args")
_ROWS = "tasks t LEFT JOIN specs s ON s.task_id = t.task_id"


def _row(values: tuple) -> TaskRow:  # type: ignore[type-arg]
    return TaskRow(values[0], values[1], values[2], values[3], values[4], values[5], values[6], values[7],
                   values[8], values[9], json.loads(values[10]), values[11], values[12])


class Journal:
    def __init__(self, path: Path, *, fsync: bool = False, checkpoints_apart: bool = False,
                 ledger: LedgerSettings | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._checkpoints: _Checkpoints | None = None
        if checkpoints_apart:
            self._db.execute("PRAGMA wal_autocheckpoint=0")
            self._checkpoints = _Checkpoints(path)
        with self._lock:
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) in (1, 2, 3, 4):
                if int(row[0]) == 1:  # version 2 added where a task was placed and why
                    self._db.execute("ALTER TABLE tasks ADD COLUMN placements BLOB")
                # Version 3 keeps new specs in their own table (older rows keep theirs inline),
                # version 4 their args in a column of their own (older rows in the spec), version 5
                # adds the usage ledger's tables (the schema script above made them).
                if int(row[0]) == 3:
                    self._db.execute("ALTER TABLE specs ADD COLUMN args BLOB")
                self._db.execute("UPDATE meta SET value=? WHERE key='schema'", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise RuntimeError(f"journal {path} has schema {row[0]}, this gateway reads {SCHEMA_VERSION}")
        try:
            self._ledger = Ledger(self._db, self._lock, ledger) if ledger is not None else None
        except BaseException:  # (a missing key, another site's ledger): nothing left open
            self.close()
            raise

    @property
    def ledger(self) -> Ledger:
        """The site's usage ledger (a journal opened with ``ledger`` settings: the gateway's)."""
        if self._ledger is None:
            raise RuntimeError(f"the journal {self.path} was opened without its ledger")
        return self._ledger

    def close(self) -> None:
        if self._checkpoints is not None:
            self._checkpoints.stop()
        with self._lock:
            self._db.close()

    # --------------------------------------------------------------- functions
    def function_digests(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT digest FROM functions")}

    def function_payload(self, digest: str) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT payload FROM functions WHERE digest=?", (digest,)).fetchone()
        return None if row is None else bytes(row[0])

    # --------------------------------------------------------------- tasks
    def accept(self, functions: Sequence[tuple[str, str, bytes]], tasks: Sequence[tuple[str, bytes, bytes]],
               now: float) -> set[str]:
        """Journals new functions and tasks (id, spec without args, args) in one transaction
        (the point of acknowledgement).

        Returns the ids of tasks that were journaled before (idempotent resubmission)."""
        existed: set[str] = set()
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany("INSERT OR IGNORE INTO functions VALUES (?, ?, ?, ?)",
                                     [(d, n, p, now) for d, n, p in functions])
                for task_id, spec, args in tasks:
                    cur = self._db.execute(
                        "INSERT OR IGNORE INTO tasks (task_id, spec, state, submitted_at) VALUES (?, x'', ?, ?)",
                        (task_id, QUEUED, now))
                    if cur.rowcount == 0:
                        existed.add(task_id)
                    else:
                        self._db.execute("INSERT INTO specs VALUES (?, ?, ?)", (task_id, spec, args))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return existed

    def write(self, changes: Sequence[Change]) -> None:
        """The changes of one loop turn in one transaction (group commit). Each applies only
        to an unfinished row: completion is idempotent, a late duplicate changes nothing.

        The usage a change carries goes into the ledger in the same transaction, when the
        change applies: a duplicate appends nothing, and a write that fails appends nothing
        (its retry, with the same changes, appends them once)."""
        if not changes:
            return
        ledger = self._ledger
        with self._lock:
            self._db.execute("BEGIN")
            try:
                usages: list[Usage] = []
                for change in changes:
                    first, *rest = _statements(change)
                    applied = self._db.execute(*first).rowcount
                    for sql, params in rest:
                        self._db.execute(sql, params)
                    if applied and isinstance(change, Finished | Requeued | Forgotten) and change.usage is not None:
                        usages.append(change.usage)
                if usages and ledger is not None:
                    ledger.append(usages)
                self._db.execute("COMMIT")
            except BaseException:
                if ledger is not None:
                    ledger.rolled_back()
                self._db.execute("ROLLBACK")
                raise
            if ledger is not None:
                ledger.committed()

    def get(self, task_id: str) -> TaskRow | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_ROW_COLUMNS} FROM {_ROWS} WHERE t.task_id=?", (task_id,)).fetchone()
        return None if row is None else _row(row)

    def get_many(self, task_ids: Sequence[str]) -> dict[str, TaskRow]:
        out: dict[str, TaskRow] = {}
        for start in range(0, len(task_ids), 500):  # SQLite's bound-parameter limit
            chunk = task_ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            with self._lock:
                rows = self._db.execute(f"SELECT {_ROW_COLUMNS} FROM {_ROWS} WHERE t.task_id IN ({marks})",
                                        tuple(chunk)).fetchall()
            for r in rows:
                out[r[0]] = _row(r)
        return out

    def unfinished(self) -> Iterator[TaskRow]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_ROW_COLUMNS} FROM {_ROWS} WHERE state IN (1, 2) "
                                    "ORDER BY submitted_at").fetchall()
        return (_row(r) for r in rows)

    def expire(self, older_than: float) -> int:
        """Deletes finished tasks (and their results) that finished before ``older_than``."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.execute("DELETE FROM specs WHERE task_id IN (SELECT task_id FROM tasks "
                                 "WHERE state IN (3, 4, 5) AND finished_at < ?)", (older_than,))
                cur = self._db.execute("DELETE FROM tasks WHERE state IN (3, 4, 5) AND finished_at < ?",
                                       (older_than,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return cur.rowcount

    def counts(self) -> dict[int, int]:
        with self._lock:
            return dict(self._db.execute("SELECT state, count(*) FROM tasks GROUP BY state").fetchall())


def _statements(c: Change) -> list[tuple[str, Sequence[object]]]:
    """A change's SQL; the first statement is the one that applies it (or, to a finished row, not)."""
    if isinstance(c, Started):
        return [("UPDATE tasks SET state=?, attempts=?, site=?, started_at=? WHERE task_id=? AND state IN (1, 2)",
                 (RUNNING, c.attempts, c.site, c.at, c.task_id))]
    if isinstance(c, Placed):
        return [("UPDATE tasks SET state=?, attempts=?, site=?, placements=? WHERE task_id=? AND state IN (1, 2)",
                 (QUEUED, c.attempts, c.site, convert.placements_blob(c.placements), c.task_id))]
    if isinstance(c, Requeued):
        return [("UPDATE tasks SET state=?, attempts=?, history=? WHERE task_id=? AND state IN (1, 2)",
                 (QUEUED, c.attempts, json.dumps(c.history), c.task_id))]
    if isinstance(c, Finished):
        return [("UPDATE tasks SET state=?, attempts=?, site=?, finished_at=?, result=?, error=?, history=? "
                 "WHERE task_id=? AND state IN (1, 2)",
                 (c.state, c.attempts, c.site, c.at, c.result, convert.failure_bytes(c.error), json.dumps(c.history),
                  c.task_id))]
    if isinstance(c, Forgotten):
        return [("DELETE FROM tasks WHERE task_id=? AND state IN (1, 2)", (c.task_id,)),
                ("DELETE FROM specs WHERE task_id=? AND NOT EXISTS (SELECT 1 FROM tasks WHERE task_id=?)",
                 (c.task_id, c.task_id))]
    raise TypeError(f"not a journal change: {c!r}")  # pragma: no cover - the Change union is closed


class _Checkpoints:
    """A thread that checkpoints the WAL every CHECKPOINT_EVERY_S (PASSIVE: it waits for no
    reader or writer, and commits go on meanwhile)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="intertie-journal-checkpoints", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        db = sqlite3.connect(str(self._path), isolation_level=None, check_same_thread=False)
        try:
            while not self._stopping.wait(CHECKPOINT_EVERY_S):
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as exc:
                    logger.warning("journal checkpoint failed (the next one tries again): %s", exc)
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:
            logger.warning("journal checkpoint failed: %s", exc)
        finally:
            db.close()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=30)
