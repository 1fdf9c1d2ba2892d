from __future__ import annotations

import sqlite3
from pathlib import Path

from intertie_gateway import journal as jr
from intertie_gateway.journal import Journal
from intertie_gateway.lifecycle import State
from intertie_gateway.model import Failure, Finished, Requeued, Started


def make(tmp_path: Path, fsync: bool = False) -> Journal:
    return Journal(tmp_path / "j.sqlite", fsync=fsync)


def test_accept_is_idempotent_and_reports_known_ids(tmp_path: Path) -> None:
    j = make(tmp_path)
    assert j.accept([("d" * 64, "f", b"fn")], [("a", b"spec-a", b""), ("b", b"spec-b", b"")], now=1.0) == set()
    assert j.accept([("d" * 64, "f", b"other")], [("a", b"changed", b""), ("c", b"spec-c", b"")], now=2.0) == {"a"}
    assert j.get("a").spec == b"spec-a"  # type: ignore[union-attr]
    assert j.function_payload("d" * 64) == b"fn"
    assert j.function_digests() == {"d" * 64}
    assert [r.task_id for r in j.unfinished()] == ["a", "b", "c"]


def test_completion_is_recorded_once(tmp_path: Path) -> None:
    j = make(tmp_path)
    j.accept([], [("a", b"s", b"")], now=1.0)
    j.write([Started("a", 1, "site", 2.0)])
    j.write([Finished("a", State.SUCCEEDED, 1, "site", 3.0, b"first", None)])
    # A late duplicate (another attempt finishing) changes nothing.
    j.write([Finished("a", State.FAILED, 2, "other", 4.0, None, Failure(9, "err"))])
    row = j.get("a")
    assert row is not None
    assert (row.state, row.result, row.site, row.attempts) == (State.SUCCEEDED, b"first", "site", 1)
    assert list(j.unfinished()) == []


def test_state_survives_reopen_and_running_is_visible(tmp_path: Path) -> None:
    j = make(tmp_path)
    j.accept([], [("a", b"s", b""), ("b", b"s", b"")], now=1.0)
    j.write([Started("a", 1, "site", 2.0)])
    j.write([Requeued("b", 1, [{"attempt": 1, "outcome": "worker died"}])])
    j.close()
    j2 = make(tmp_path)
    rows = {r.task_id: r for r in j2.unfinished()}
    assert rows["a"].state == State.RUNNING and rows["a"].attempts == 1
    assert rows["b"].state == State.QUEUED and rows["b"].history == [{"attempt": 1, "outcome": "worker died"}]


def test_expire_removes_only_old_finished_tasks(tmp_path: Path) -> None:
    j = make(tmp_path)
    j.accept([], [("old", b"s", b""), ("new", b"s", b""), ("open", b"s", b"")], now=1.0)
    j.write([Finished("old", State.SUCCEEDED, 1, "s", 10.0, b"r", None),
             Finished("new", State.SUCCEEDED, 1, "s", 100.0, b"r", None)])
    assert j.expire(older_than=50.0) == 1
    assert j.get("old") is None and j.get("new") is not None and j.get("open") is not None
    assert set(j.get_many(["old", "new", "open", "zzz"])) == {"new", "open"}


def test_fsync_setting_selects_synchronous_mode(tmp_path: Path) -> None:
    for fsync, expected in ((False, 1), (True, 2)):  # NORMAL, FULL
        j = Journal(tmp_path / f"{fsync}.sqlite", fsync=fsync)
        assert j._db.execute("PRAGMA synchronous").fetchone()[0] == expected
        assert j._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        j.close()


def test_committed_rows_are_readable_by_another_connection(tmp_path: Path) -> None:
    # What a restarted gateway sees: the commit is in the WAL before accept() returns.
    j = make(tmp_path)
    j.accept([], [("a", b"s", b"")], now=1.0)
    other = sqlite3.connect(tmp_path / "j.sqlite")
    assert other.execute("SELECT task_id FROM tasks").fetchall() == [("a",)]
    other.close()


def test_expire_also_removes_specs(tmp_path: Path) -> None:
    j = make(tmp_path)
    j.accept([], [("old", b"big spec", b"")], now=1.0)
    j.write([Finished("old", State.SUCCEEDED, 1, "s", 10.0, b"r", None)])
    assert j.expire(older_than=50.0) == 1
    assert j._db.execute("SELECT count(*) FROM specs").fetchone()[0] == 0


def older_journal(tmp_path: Path, schema: int, rows_sql: str) -> Journal:
    """A journal file as an older gateway left it (its tasks table, then ``rows_sql``), opened now."""
    path = tmp_path / "j.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        f"INSERT INTO meta VALUES ('schema', '{schema}');"
        "CREATE TABLE tasks (task_id TEXT PRIMARY KEY, spec BLOB NOT NULL, state INTEGER NOT NULL,"
        " attempts INTEGER NOT NULL DEFAULT 0, site TEXT NOT NULL DEFAULT '', submitted_at REAL NOT NULL,"
        " started_at REAL NOT NULL DEFAULT 0, finished_at REAL NOT NULL DEFAULT 0, result BLOB, error BLOB,"
        " history TEXT NOT NULL DEFAULT '[]', placements BLOB);"
        + rows_sql)
    db.commit()
    db.close()
    return Journal(path)


def test_a_schema_2_journal_is_read_and_upgraded(tmp_path: Path) -> None:
    # Schema 2 kept each spec inline in the tasks row; such rows stay readable.
    j = older_journal(tmp_path, 2, "INSERT INTO tasks (task_id, spec, state, submitted_at) VALUES ('old', x'0102', 1, 1.0);")
    j.accept([], [("new", b"\x03", b"")], now=2.0)
    assert {r.task_id: r.spec for r in j.unfinished()} == {"old": b"\x01\x02", "new": b"\x03"}
    assert j._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0] == str(jr.SCHEMA_VERSION)


def test_args_are_kept_beside_the_spec_and_a_schema_3_journal_keeps_its_inline_ones(tmp_path: Path) -> None:
    j = older_journal(tmp_path, 3,  # schema 3: specs in their own table, args inside them
                      "CREATE TABLE specs (task_id TEXT PRIMARY KEY, spec BLOB NOT NULL);"
                      "INSERT INTO tasks (task_id, spec, state, submitted_at) VALUES ('old', x'', 1, 1.0);"
                      "INSERT INTO specs VALUES ('old', x'0102');")
    j.accept([], [("new", b"\x03", b"pickled args")], now=2.0)
    rows = {r.task_id: (r.spec, r.args) for r in j.unfinished()}
    assert rows == {"old": (b"\x01\x02", None), "new": (b"\x03", b"pickled args")}
    assert j._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0] == str(jr.SCHEMA_VERSION)


def test_checkpoints_apart_copy_the_wal_into_the_database_off_the_committing_thread(tmp_path: Path,
                                                                                   monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import threading
    import time

    monkeypatch.setattr(jr, "CHECKPOINT_EVERY_S", 0.05)
    path = tmp_path / "j.sqlite"
    j = Journal(path, checkpoints_apart=True)
    try:
        assert j._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0  # no checkpoint inside a commit
        before = path.stat().st_size
        j.accept([], [(f"t{i}", b"s" * 1000, b"a" * 1000) for i in range(2000)], now=1.0)  # ~4 MB into the WAL
        deadline = time.monotonic() + 10  # the thread copies it within a few of its periods
        while path.stat().st_size < before + (2 << 20):
            assert time.monotonic() < deadline, "the WAL was never checkpointed into the database file"
            time.sleep(0.02)
    finally:
        j.close()
    assert not [t for t in threading.enumerate() if t.name == "intertie-journal-checkpoints"]
    assert Journal(path).get("t1999") is not None  # the database reads back whole
