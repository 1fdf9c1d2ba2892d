"""The usage ledger on a real journal (real SQLite): appended in the journal's transaction,
never twice, signed checkpoints, proofs, restarts, and the offline check that finds tampering."""

from __future__ import annotations

import json
import sqlite3
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from intertie.checkpoint import checkpoint_text
from intertie.merkle import leaf_hash, verify_consistency, verify_inclusion
from intertie_gateway.config import ConfigError, GatewayConfig
from intertie_gateway.journal import Journal
from intertie_gateway.ledger import (
    LedgerError,
    LedgerSettings,
    Tampered,
    read_public_key,
    recorded_keys,
    replace_key,
)
from intertie_gateway.ledger_check import Verified, open_readonly, verify
from intertie_gateway.lifecycle import State
from intertie_gateway.merkle_tree import MemoryNodes, MerkleTree
from intertie_gateway.model import Finished, Forgotten, Requeued, Started, Usage

SITE = "alpha"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0  # no checkpoint is due by time until a test moves it

    def __call__(self) -> float:
        return self.now


def usage(task_id: str, attempt: int = 1, outcome: str = "succeeded", cpu_time_s: float = 0.5) -> Usage:
    return Usage(tenant="acme", task_id=task_id, attempt=attempt, home="", outcome=outcome, started_at=100.0,
                 ended_at=102.5, cpus=1.0, gpus=0.0, cpu_time_s=cpu_time_s, args_bytes=10, result_bytes=20)


def open_journal(state: Path, clock: Clock | None = None, every: int = 10, site: str = SITE) -> Journal:
    return Journal(state / "journal.sqlite",
                   ledger=LedgerSettings(site, state / "ledger.key", every=every, every_s=60.0, clock=clock or Clock()))


def finish(task_id: str, attempt: int = 1, with_usage: bool = True) -> Finished:
    return Finished(task_id, State.SUCCEEDED, attempt, SITE, 103.0, b"result", None,
                    usage=usage(task_id, attempt) if with_usage else None)


def run_tasks(j: Journal, ids: list[str]) -> None:
    j.accept([], [(t, b"spec", b"") for t in ids], now=1.0)
    j.write([Started(t, 1, SITE, 100.0) for t in ids])


def rows(state: Path, sql: str) -> list[tuple]:  # type: ignore[type-arg]
    db = sqlite3.connect(state / "journal.sqlite")
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def check(state: Path, keys: list[bytes] | None = None) -> Verified:
    db = open_readonly(state / "journal.sqlite")
    try:
        return verify(db, keys if keys is not None else [recorded_keys(db)[0]])  # type: ignore[list-item]
    finally:
        db.close()


# ---------------------------------------------------------------------------- appending
def test_usage_is_appended_in_the_journal_transaction_as_canonical_json(tmp_path: Path) -> None:
    j = open_journal(tmp_path)
    run_tasks(j, ["a", "b", "c"])
    j.write([Requeued("a", 1, [{"attempt": 1}], usage=usage("a", 1, "retried")),
             finish("b"), finish("c", with_usage=False)])
    assert j.ledger.size == 2
    first, second = j.ledger.entries(0, 2)
    assert first == json.dumps(json.loads(first), sort_keys=True, separators=(",", ":")).encode()
    fields = json.loads(first)
    assert fields == {"v": 1, "kind": "usage", "site": SITE, "idx": 0, "tenant": "acme", "task_id": "a",
                      "attempt": 1, "home": "", "outcome": "retried", "started_at": 100.0, "ended_at": 102.5,
                      "cpus": 1.0, "gpus": 0.0, "cpu_time_s": 0.5, "args_bytes": 10, "result_bytes": 20,
                      "dataset_bytes_pulled": 0, "dataset_bytes_read": 0, "price_per_cpu_hour": 0.0, "function": ""}
    assert json.loads(second)["task_id"] == "b" and json.loads(second)["idx"] == 1
    # Committed with the rows: another connection sees both.
    assert rows(tmp_path, "SELECT count(*) FROM ledger_entries") == [(2,)]
    assert rows(tmp_path, "SELECT state FROM tasks WHERE task_id='b'") == [(State.SUCCEEDED,)]
    assert rows(tmp_path, "SELECT hash FROM ledger_nodes WHERE level=0 ORDER BY idx") == [
        (leaf_hash(first),), (leaf_hash(second),)]


def test_a_change_that_changes_nothing_appends_nothing(tmp_path: Path) -> None:
    j = open_journal(tmp_path)
    run_tasks(j, ["a"])
    j.write([finish("a")])
    j.write([finish("a")])  # the same change again (a late duplicate)
    j.write([finish("a", attempt=2)])  # another attempt's finish, once the task is finished
    j.write([finish("unknown")])
    assert j.ledger.size == 1


def test_a_running_task_its_home_took_back_is_counted_once_when_its_rows_go(tmp_path: Path) -> None:
    j = open_journal(tmp_path)
    run_tasks(j, ["a"])
    j.write([Forgotten("a", usage("a", outcome="dropped"))])
    j.write([Forgotten("a", usage("a", outcome="dropped"))])  # gone already: nothing
    assert j.ledger.size == 1 and json.loads(j.ledger.entries(0, 1)[0])["outcome"] == "dropped"


def test_a_task_id_that_comes_back_after_its_row_expired_is_counted_again(tmp_path: Path) -> None:
    j = open_journal(tmp_path)
    run_tasks(j, ["a"])
    j.write([finish("a")])
    assert j.expire(older_than=1e9) == 1
    run_tasks(j, ["a"])
    j.write([finish("a")])
    assert j.ledger.size == 2


def test_a_value_json_cannot_hold_is_recorded_as_unknown_rather_than_failing_the_commit(tmp_path: Path) -> None:
    j = open_journal(tmp_path)
    run_tasks(j, ["a"])
    j.write([Finished("a", State.SUCCEEDED, 1, SITE, 1.0, b"", None, usage=usage("a", cpu_time_s=float("nan")))])
    assert json.loads(j.ledger.entries(0, 1)[0])["cpu_time_s"] is None


@pytest.mark.parametrize("table", ["ledger_entries", "ledger_nodes", "ledger_checkpoints", "tasks"])
def test_a_failed_write_appends_nothing_and_its_retry_appends_once(tmp_path: Path, table: str) -> None:
    clock = Clock()
    j = open_journal(tmp_path, clock)
    ids = [f"t{i}" for i in range(12)]
    run_tasks(j, ids)
    changes = [finish(t) for t in ids]  # 12 >= every: a checkpoint is due in the same transaction
    # A real SQLite failure from another connection's trigger, after (for the checkpoint) the
    # in-memory tree has taken the entries.
    other = sqlite3.connect(tmp_path / "journal.sqlite")
    event = "UPDATE" if table == "tasks" else "INSERT"
    other.execute(f"CREATE TRIGGER fail BEFORE {event} ON {table} BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    other.commit()
    with pytest.raises(sqlite3.DatabaseError, match="disk full"):
        j.write(changes)
    assert j.ledger.size == 0 and j.ledger.latest_checkpoint() is None
    assert rows(tmp_path, "SELECT (SELECT count(*) FROM ledger_entries) + (SELECT count(*) FROM ledger_nodes)") \
        == [(0,)]
    assert rows(tmp_path, "SELECT count(*) FROM tasks WHERE state=2") == [(12,)]
    other.execute("DROP TRIGGER fail")
    other.commit()
    other.close()
    j.write(changes)  # the retry: the same changes
    j.write(changes)  # and once more, as a duplicate
    assert j.ledger.size == 12
    assert [json.loads(e)["task_id"] for e in j.ledger.entries(0, 12)] == ids
    assert j.ledger.latest_checkpoint().size == 12  # type: ignore[union-attr]
    j.close()
    assert check(tmp_path).entries == 12


# ---------------------------------------------------------------------------- checkpoints
def test_checkpoints_every_n_entries_and_after_t_seconds_with_entries(tmp_path: Path) -> None:
    clock = Clock()
    j = open_journal(tmp_path, clock, every=10)
    ids = [f"t{i}" for i in range(30)]
    run_tasks(j, ids)
    for start in range(0, 24, 4):  # turns of 4 finishes: 4, 8, 12 (>= 10 since 0), 16, 20, 24 (>= 10 since 12)
        j.write([finish(t) for t in ids[start:start + 4]])
    assert [r[0] for r in rows(tmp_path, "SELECT size FROM ledger_checkpoints ORDER BY size")] == [12, 24]
    assert j.ledger.checkpoint_if_due() is None  # nothing new
    j.write([finish("t24")])
    assert j.ledger.checkpoint_if_due() is None  # entries, but not 60 s yet
    clock.now = 59.999
    assert j.ledger.checkpoint_if_due() is None
    clock.now = 60.0
    made = j.ledger.checkpoint_if_due()
    assert made is not None and made.size == 25 and made.time == 60.0
    assert j.ledger.checkpoint_if_due() is None
    assert j.ledger.checkpoint_now() == made  # covered already: no new one
    j.write([finish("t25")])
    clock.now = 200.0
    j.write([finish("t26")])  # 60 s after the last checkpoint, with entries: signed in this turn
    assert j.ledger.latest_checkpoint().size == 27  # type: ignore[union-attr]
    j.write([finish("t27")])
    now = j.ledger.checkpoint_now()
    assert now is not None and now.size == 28
    public = Ed25519PublicKey.from_public_bytes(j.ledger.public_key())
    for size, root, at, signature in rows(tmp_path, "SELECT * FROM ledger_checkpoints"):
        public.verify(signature, checkpoint_text(SITE, size, root, at))
        assert root == j.ledger.root(size)


def test_an_empty_ledger_has_no_checkpoint(tmp_path: Path) -> None:
    j = open_journal(tmp_path)
    assert j.ledger.checkpoint_now() is None and j.ledger.latest_checkpoint() is None
    assert j.ledger.size == 0 and j.ledger.entries(0, 0) == []
    j.close()
    assert check(tmp_path) == Verified(SITE, 0, 0, None)


def test_the_ledger_reads_the_same_after_a_restart_and_goes_on_from_there(tmp_path: Path) -> None:
    j = open_journal(tmp_path, every=7)
    ids = [f"t{i}" for i in range(40)]
    run_tasks(j, ids)
    for start in range(0, 23, 3):
        j.write([finish(t) for t in ids[start:start + 3]])
    roots = [j.ledger.root(n) for n in range(j.ledger.size + 1)]
    last, public = j.ledger.latest_checkpoint(), j.ledger.public_key()
    j.close()
    key = tmp_path / "ledger.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY")
    assert read_public_key(key) == public

    j = open_journal(tmp_path, every=7)
    assert j.ledger.size == 24 and j.ledger.public_key() == public
    assert [j.ledger.root(n) for n in range(25)] == roots
    assert j.ledger.latest_checkpoint() == last
    j.write([finish(t) for t in ids[24:30]])
    assert [json.loads(e)["idx"] for e in j.ledger.entries(20, 30)] == list(range(20, 30))
    assert [j.ledger.root(n) for n in range(25)] == roots
    j.ledger.checkpoint_now()
    j.close()
    assert check(tmp_path).entries == 30


def test_proofs_from_the_ledger_verify(tmp_path: Path) -> None:
    j = open_journal(tmp_path, every=5)
    ids = [f"t{i}" for i in range(37)]
    run_tasks(j, ids)
    for start in range(0, 37, 6):
        j.write([finish(t) for t in ids[start:start + 6]])
    j.ledger.checkpoint_now()
    checkpoints = [j.ledger.checkpoint(r[0]) for r in rows(tmp_path, "SELECT size FROM ledger_checkpoints")]
    assert len(checkpoints) >= 4
    entries = j.ledger.entries(0, 37)
    for cp in checkpoints:
        assert cp is not None
        for index in range(cp.size):
            verify_inclusion(leaf_hash(entries[index]), index, cp.size, j.ledger.inclusion_proof(index, cp.size),
                             cp.root)
        for older in checkpoints:
            assert older is not None
            if older.size <= cp.size:
                verify_consistency(older.size, cp.size, older.root, cp.root,
                                   j.ledger.consistency_proof(older.size, cp.size))
    with pytest.raises(ValueError):
        j.ledger.inclusion_proof(37, 37)
    with pytest.raises(ValueError):
        j.ledger.entries(30, 38)


# ---------------------------------------------------------------------------- the site's key and id
def test_a_missing_or_wrong_key_or_another_site_id_stops_the_start(tmp_path: Path) -> None:
    j = open_journal(tmp_path)
    run_tasks(j, ["a"])
    j.write([finish("a")])
    j.close()
    key = tmp_path / "ledger.key"
    saved = key.read_bytes()
    with pytest.raises(LedgerError, match="site 'alpha'"):
        open_journal(tmp_path, site="beta")
    key.unlink()
    with pytest.raises(LedgerError, match="ledger.key is missing: restore it from a backup"):
        open_journal(tmp_path)
    assert not key.exists()  # no new key was made in its place
    other = tmp_path / "other"
    open_journal(other).close()
    key.write_bytes((other / "ledger.key").read_bytes())
    with pytest.raises(LedgerError, match="is not the key this ledger's checkpoints were signed with"):
        open_journal(tmp_path)
    key.write_bytes(saved)
    open_journal(tmp_path).close()


def test_a_lost_key_is_replaced_and_both_keys_verify_their_checkpoints(tmp_path: Path) -> None:
    j = open_journal(tmp_path, every=1)
    run_tasks(j, ["a", "b"])
    j.write([finish("a")])
    old = j.ledger.public_key()
    j.close()
    (tmp_path / "ledger.key").unlink()
    new = replace_key(tmp_path)
    with pytest.raises(LedgerError, match="exists"):
        replace_key(tmp_path)
    j = open_journal(tmp_path, every=1)
    assert j.ledger.public_key() == new != old
    j.write([finish("b")])
    j.close()
    assert check(tmp_path, [new, old]).checkpoints == 2
    with pytest.raises(Tampered, match="checkpoint at size 1 is forged"):
        check(tmp_path, [new])  # a verifier that pins only the new key


def test_journal_without_ledger_settings_keeps_none(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite")
    run_tasks(j, ["a"])
    j.write([finish("a")])
    with pytest.raises(RuntimeError, match="without its ledger"):
        j.ledger  # noqa: B018


def test_a_journal_from_before_the_ledger_gets_its_tables_in_place(tmp_path: Path) -> None:
    j = Journal(tmp_path / "journal.sqlite")
    run_tasks(j, ["a"])
    j.close()
    db = sqlite3.connect(tmp_path / "journal.sqlite")
    db.executescript("DROP TABLE ledger_entries; DROP TABLE ledger_nodes; DROP TABLE ledger_checkpoints;")
    db.close()
    j = open_journal(tmp_path)
    j.write([finish("a")])
    assert j.ledger.size == 1 and j.get("a").state == State.SUCCEEDED  # type: ignore[union-attr]
    j.close()
    assert check(tmp_path).entries == 1


def test_checkpoint_settings_are_validated() -> None:
    assert GatewayConfig(ledger_checkpoint_entries=5, ledger_checkpoint_s=0.5).ledger_checkpoint_entries == 5
    with pytest.raises(ConfigError, match="ledger_checkpoint_entries"):
        GatewayConfig(ledger_checkpoint_entries=0)
    with pytest.raises(ConfigError, match="ledger_checkpoint_s"):
        GatewayConfig(ledger_checkpoint_s=float("inf"))


# ---------------------------------------------------------------------------- tampering, found offline
@pytest.fixture
def ledger40(tmp_path: Path) -> Iterator[Path]:
    """A state dir whose ledger has 40 entries and checkpoints at 10, 20, 30 and 40."""
    j = open_journal(tmp_path, every=10)
    ids = [f"t{i}" for i in range(40)]
    run_tasks(j, ids)
    for start in range(0, 40, 5):
        j.write([finish(t) for t in ids[start:start + 5]])
    j.close()
    yield tmp_path


def tamper(state: Path, *statements: tuple[str, tuple[object, ...]]) -> None:
    db = sqlite3.connect(state / "journal.sqlite")
    for sql, params in statements:
        db.execute(sql, params)
    db.commit()
    db.close()


def entry(state: Path, idx: int) -> bytes:
    return rows(state, f"SELECT entry FROM ledger_entries WHERE idx={idx}")[0][0]  # type: ignore[no-any-return]


def altered(data: bytes) -> bytes:
    return data.replace(b'"cpu_time_s":0.5', b'"cpu_time_s":0.1')


def rebuild_nodes(state: Path) -> None:
    """Rewrites every stored node to match the entries as they are now (a consistent forger)."""
    tree = MerkleTree(MemoryNodes())
    nodes = tree.append_leaf_hashes([leaf_hash(r[0]) for r in rows(state, "SELECT entry FROM ledger_entries ORDER BY idx")])
    tamper(state, ("DELETE FROM ledger_nodes", ()))
    db = sqlite3.connect(state / "journal.sqlite")
    db.executemany("INSERT INTO ledger_nodes VALUES (?, ?, ?)", nodes)
    db.commit()
    db.close()


def shift_from(state: Path, idx: int, by: int) -> list[tuple[str, tuple[object, ...]]]:
    """Renumbers the entries from ``idx`` on (through a negative detour: idx is the primary key)."""
    return [("UPDATE ledger_entries SET idx = -idx - 1000 WHERE idx >= ?", (idx,)),
            ("UPDATE ledger_entries SET idx = -idx - 1000 + ? WHERE idx < 0", (by,))]


TAMPERS: dict[str, tuple[Callable[[Path], None], str]] = {
    "altered entry": (lambda s: tamper(s, ("UPDATE ledger_entries SET entry=? WHERE idx=13", (altered(entry(s, 13)),))),
                      "entry 13 was altered: its bytes do not hash to the stored leaf"),
    "entry that is no JSON": (lambda s: tamper(s, ("UPDATE ledger_entries SET entry=x'00' WHERE idx=13", ())),
                              "entry 13 was altered: it is not JSON"),
    "entry stored as text": (lambda s: tamper(s, ("UPDATE ledger_entries SET entry=CAST(entry AS TEXT) WHERE idx=13", ())),
                             "entry 13 was altered"),
    "deleted entry": (lambda s: tamper(s, ("DELETE FROM ledger_entries WHERE idx=13", ())),
                      "entry 13 is missing (the stored entries go from 12 to 14)"),
    "deleted entry, the rest renumbered": (
        lambda s: tamper(s, ("DELETE FROM ledger_entries WHERE idx=13", ()), *shift_from(s, 14, -1)),
        "entry 13 is missing (entry 14 stands in its place)"),
    "deleted last entries": (lambda s: tamper(s, ("DELETE FROM ledger_entries WHERE idx >= 38", ())),
                             "entries from 38 on are missing"),
    "inserted entry": (lambda s: tamper(s, *shift_from(s, 13, 1), ("INSERT INTO ledger_entries VALUES (13, ?)",
                                                                   (altered(entry(s, 12)).replace(b'"idx":12', b'"idx":13'),))),
                       "entry 13 was inserted (the entries from there on are shifted by one)"),
    "entry appended outside the ledger": (
        lambda s: tamper(s, ("INSERT INTO ledger_entries VALUES (40, ?)", (entry(s, 39).replace(b'"idx":39', b'"idx":40'),))),
        "entry 40 was inserted: the ledger's tree has no leaf for it"),
    "swapped entries": (lambda s: tamper(s, ("UPDATE ledger_entries SET entry=? WHERE idx=12", (entry(s, 17),)),
                                         ("UPDATE ledger_entries SET entry=? WHERE idx=17", (entry(s, 12),))),
                        "entries 12 and 17 are out of order (swapped)"),
    "forged checkpoint root": (lambda s: tamper(s, ("UPDATE ledger_checkpoints SET root=? WHERE size=20", (b"\x01" * 32,))),
                               "checkpoint at size 20 is forged: its signature does not verify"),
    "forged checkpoint signature": (
        lambda s: tamper(s, ("UPDATE ledger_checkpoints SET signature=? WHERE size=20", (b"\x02" * 64,))),
        "checkpoint at size 20 is forged"),
    "entry and nodes rewritten consistently": (
        lambda s: (tamper(s, ("UPDATE ledger_entries SET entry=? WHERE idx=13", (altered(entry(s, 13)),))),
                   rebuild_nodes(s)),
        "entries between 10 and 20 were changed (checkpoint at size 20 does not match)"),
    "entries and nodes cut short consistently": (
        lambda s: (tamper(s, ("DELETE FROM ledger_entries WHERE idx >= 35", ())), rebuild_nodes(s)),
        "entries from 35 on are missing (the checkpoint at size 40 covers 40)"),
    "inner node altered": (lambda s: tamper(s, ("UPDATE ledger_nodes SET hash=? WHERE level=2 AND idx=3", (b"\x03" * 32,))),
                           "the stored tree's node (level 2, index 3) does not match the entries"),
}


def test_an_intact_ledger_verifies(ledger40: Path) -> None:
    verified = check(ledger40)
    assert (verified.site, verified.entries, verified.checkpoints) == (SITE, 40, 4)
    assert verified.last is not None and verified.last.size == 40


@pytest.mark.parametrize("name", list(TAMPERS))
def test_tampering_is_found_and_named(ledger40: Path, name: str) -> None:
    change, message = TAMPERS[name]
    change(ledger40)
    with pytest.raises(Tampered) as found:
        check(ledger40)
    assert message in str(found.value)


def test_checkpoints_signed_by_another_key_are_forged(ledger40: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    other = tmp_path_factory.mktemp("other")
    open_journal(other).close()
    with pytest.raises(Tampered, match="checkpoint at size 10 is forged"):
        check(ledger40, [read_public_key(other / "ledger.key")])


def test_a_journal_without_a_ledger_is_not_verified(tmp_path: Path) -> None:
    Journal(tmp_path / "journal.sqlite").close()
    with pytest.raises(LedgerError, match="no usage ledger"):
        check(tmp_path, [])
    with pytest.raises(LedgerError, match="no journal"):
        open_readonly(tmp_path / "nothing.sqlite")


def test_deferred_usage_is_recorded_in_its_commit_and_appended_once_by_integrate(tmp_path: Path) -> None:
    def opened(state: Path) -> Journal:
        return Journal(state / "journal.sqlite", ledger=LedgerSettings(SITE, state / "ledger.key", every=1000,
                                                                        every_s=60.0, clock=Clock(),
                                                                        integrate_every_s=0.1))

    at_once = open_journal(tmp_path / "at-once")
    j = opened(tmp_path / "deferred")
    for journal in (at_once, j):
        run_tasks(journal, ["a", "b", "c"])
        journal.write([finish("a"), finish("b")])
    assert j.ledger.size == 0 and j.ledger.pending() == 2  # recorded with the finishes, not yet in the log
    j.close()  # a crash before the batch: the recorded usage is in the database
    j = opened(tmp_path / "deferred")
    assert j.ledger.pending() == 2 and j.ledger.integrate() == 2 and j.ledger.integrate() == 0
    assert j.ledger.size == 2 and j.ledger.pending() == 0
    assert j.ledger.entries(0, 2) == at_once.ledger.entries(0, 2)  # the same entries, byte for byte
    j.write([finish("c")])
    made = j.ledger.checkpoint_now()  # (a clean stop) appends what is recorded first
    assert made is not None and made.size == 3 and j.ledger.pending() == 0
    db = open_readonly(tmp_path / "deferred" / "journal.sqlite")
    try:
        assert verify(db, [j.ledger.public_key()]).entries == 3
    finally:
        db.close()


@settings(max_examples=300, deadline=None)
@given(tenant=st.text(max_size=20), task=st.text(max_size=30), function=st.text(max_size=20),
       outcome=st.sampled_from(["succeeded", "failed", 'x","outcome":"y', "retried"]), home=st.text(max_size=10),
       site=st.text(min_size=1, max_size=12), idx=st.integers(0, 1 << 62),
       cpu=st.floats(allow_nan=True, allow_infinity=True), count=st.integers(0, 1 << 40))
def test_an_entry_made_from_recorded_usage_is_the_entry_made_from_the_usage(
        tenant: str, task: str, function: str, outcome: str, home: str, site: str, idx: int, cpu: float,
        count: int) -> None:
    from dataclasses import asdict

    from intertie_gateway.ledger import _canonical, encode_entry, entry_from_recorded

    used = Usage(tenant=tenant, task_id=task, attempt=count, home=home, outcome=outcome, started_at=1.5,
                 ended_at=cpu, cpus=2.0, gpus=0.0, cpu_time_s=cpu, args_bytes=count, result_bytes=3,
                 function=function)
    assert entry_from_recorded(_canonical(asdict(used)), site, idx) == encode_entry(used, site, idx)
