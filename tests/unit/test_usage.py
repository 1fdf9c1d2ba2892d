"""Your usage, verified (issue 13): the SDK's check of a site's usage ledger against a real
Journal and Ledger built here, served by the real LedgerService in this process (no gateway):
signatures, inclusion and consistency proofs, the pinned key and checkpoint, and every way a
site could lie that the client must catch; the service's checks of hostile requests; who
sees which entries; the usage tables."""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import functools
import json
import math
import shutil
import sqlite3
import stat
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest

import intertie
from intertie import usage
from intertie.usage import GrpcLedger, Head, LedgerReader, Page, UsageVerification, load_pin, pin_path
from intertie.v1 import ledger_pb2
from intertie_gateway import auth, ledger_service
from intertie_gateway.journal import Journal
from intertie_gateway.ledger import LedgerSettings
from intertie_gateway.ledger_service import LedgerService, visibility
from intertie_gateway.lifecycle import State
from intertie_gateway.model import Finished, Started, Usage
from intertie_gateway.tenancy import Caller

SITE = "alpha"
ACME = Caller(tenant="acme", token_id="t1")
START = 1_764_000_000.0


# ---------------------------------------------------------------------------- a site in this process
class Aborted(grpc.RpcError):
    """What the servicer's ``context.abort`` ends a call with here (as gRPC would, for the stub)."""

    def __init__(self, code: grpc.StatusCode, details: str, kind: str) -> None:
        super().__init__(details)
        self._code, self._details, self.kind = code, details, kind

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class Context:
    async def abort(self, code: grpc.StatusCode, details: str, trailing_metadata: Any = ()) -> None:
        raise Aborted(code, details, dict(trailing_metadata).get("intertie-error-kind", ""))


class Stub:
    """The LedgerService's methods as a client stub sees them, called in this process as ``who``."""

    def __init__(self, service: LedgerService, who: Caller) -> None:
        self._service, self._context = service, contextvars.copy_context()
        self._context.run(auth._caller.set, who)

    def _call(self, name: str, request: Any) -> Any:
        return self._context.run(asyncio.run, getattr(self._service, name)(request, Context()))

    def GetCheckpoint(self, request: Any, timeout: float) -> Any:  # noqa: N802 (gRPC's names)
        return self._call("GetCheckpoint", request)

    def ListEntries(self, request: Any, timeout: float) -> Any:  # noqa: N802
        return self._call("ListEntries", request)

    def GetConsistencyProof(self, request: Any, timeout: float) -> Any:  # noqa: N802
        return self._call("GetConsistencyProof", request)


def reader(journal: Journal, who: Caller = ACME, isolated: bool = True) -> GrpcLedger:
    return GrpcLedger(stub=Stub(LedgerService(journal.ledger, isolated=isolated), who))


def attempt(task: str, tenant: str = "acme", home: str = "", cpus: float = 1.0, wall: float = 2.0,
            ended: float = START, function: str = "score") -> Usage:
    scoped = f"{tenant.partition('@')[0]}~{task}"
    return Usage(tenant, scoped, 1, home, "succeeded", ended - wall, ended, cpus, 0.0, 0.25, 100, 20,
                 dataset_bytes_pulled=5, price_per_cpu_hour=0.36, function=function)


def open_site(state: Path, site: str = SITE) -> Journal:
    return Journal(state / "journal.sqlite", ledger=LedgerSettings(site, state / "ledger.key", every=1 << 40,
                                                                   every_s=math.inf))


def run(journal: Journal, *usages: Usage) -> None:
    """Each usage as an attempt that ran and ended here; then a checkpoint."""
    ids = [f"{u.task_id}#{journal.ledger.size + i}" for i, u in enumerate(usages)]
    journal.accept([], [(t, b"spec", b"") for t in ids], now=1.0)
    journal.write([Started(t, 1, SITE, 1.0) for t in ids])
    journal.write([Finished(t, State.SUCCEEDED, 1, SITE, 2.0, b"r", None, usage=u)
                   for t, u in zip(ids, usages, strict=True)])
    journal.ledger.checkpoint_now()


@pytest.fixture
def site(tmp_path: Path) -> Any:
    journal = open_site(tmp_path / "site")
    run(journal, attempt("a1"), attempt("g1", tenant="globex"), attempt("a2", cpus=2.0, wall=1.0),
        attempt("p1", tenant="acme@beta", home="beta"), attempt("a3", function="train"))
    yield journal
    journal.close()


@pytest.fixture
def pins(tmp_path: Path) -> Path:
    return tmp_path / "pins"


def verify(source: LedgerReader, pins: Path) -> UsageVerification:
    return usage.verify(source, SITE, pins=pins)


# ---------------------------------------------------------------------------- verification
def test_your_entries_verify_and_the_next_check_extends_the_first(site: Journal, pins: Path) -> None:
    first = verify(reader(site), pins)
    assert (first.site, first.entries, first.size, first.previous_size) == (SITE, 3, 5, None)
    assert "3 of your entries verified against checkpoint of size 5" in str(first) and "first check" in str(first)
    assert repr(first).startswith("<UsageVerification site alpha: 3 of your entries")
    run(site, attempt("a4"), attempt("g2", tenant="globex"))
    second = verify(reader(site), pins)
    assert (second.entries, second.size, second.previous_size) == (4, 7, 5)
    assert "; extends the one verified " in str(second) and "(size 5)" in str(second)
    again = verify(reader(site), pins)  # no new checkpoint: the same one, which extends itself
    assert (again.size, again.previous_size) == (7, 7)
    assert verify(reader(site, Caller(tenant="globex")), pins).entries == 2


def test_the_pin_is_written_0600_and_a_site_that_changed_its_key_is_refused(site: Journal, pins: Path,
                                                                           tmp_path: Path) -> None:
    verify(reader(site), pins)
    path = pin_path(pins, SITE)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and not list(pins.glob(".*.tmp"))
    kept = load_pin(path, SITE)
    assert kept is not None and kept.size == 5 and kept.public_key == site.ledger.public_key()
    other = open_site(tmp_path / "impostor")  # the same site id, its own key
    run(other, attempt("a1"))
    with pytest.raises(intertie.LedgerVerificationError, match=r"now signs with key .* not the key .* pinned .*"
                                                               r"remove .*alpha\.json to trust it"):
        verify(reader(other), pins)
    assert load_pin(path, SITE) == kept  # untouched by a failed check
    other.close()
    path.write_text("{not json")
    with pytest.raises(intertie.LedgerVerificationError, match="cannot read what was verified of site 'alpha'"):
        verify(reader(site), pins)


class Lying:
    """A reader that passes the site's answers through ``change`` (a site that lies)."""

    def __init__(self, inner: LedgerReader, head: Callable[[Head], Head] = lambda h: h,
                 page: Callable[[Page], Page] = lambda p: p, proof: Callable[[list[bytes]], list[bytes]] = lambda p: p):
        self.inner, self.change_head, self.change_page, self.change_proof = inner, head, page, proof

    def head(self, size: int = 0) -> Head | None:
        found = self.inner.head(size)
        return None if found is None else self.change_head(found)

    def page(self, size: int, start: int, since: float = 0.0) -> Page:
        page = self.inner.page(size, start, since)
        return self.change_page(dataclasses.replace(page, head=self.change_head(page.head)))

    def consistency(self, size1: int, size2: int) -> tuple[Head, list[bytes]]:
        head, proof = self.inner.consistency(size1, size2)
        return self.change_head(head), self.change_proof(proof)


def _entries(change: Callable[[list[tuple[int, bytes, list[bytes]]]], list[Any]]) -> Callable[[Page], Page]:
    return lambda page: dataclasses.replace(page, entries=change(list(page.entries)))


def _flipped(data: bytes) -> bytes:
    return bytes([data[0] ^ 1]) + data[1:]


@pytest.mark.parametrize("lie, named", [
    (dict(head=lambda h: dataclasses.replace(h, checkpoint=dataclasses.replace(
        h.checkpoint, signature=_flipped(h.checkpoint.signature)))), "checkpoint at size 5 is forged"),
    (dict(head=lambda h: dataclasses.replace(h, checkpoint=dataclasses.replace(h.checkpoint, size=4))),
     "checkpoint at size 4 is forged"),
    (dict(page=_entries(lambda es: [(i, e.replace(b'"cpu_time_s":0.25', b'"cpu_time_s":0.01'), p) for i, e, p in es])),
     r"entry 0 is not the one the checkpoint at size 5 holds \(inclusion proof does not lead to the root\)"),
    (dict(page=_entries(lambda es: [(i, e, es[-1][2] if i == 0 else p) for i, e, p in es])),
     "entry 0 is not the one the checkpoint at size 5 holds"),
    (dict(page=_entries(lambda es: [(es[-1][0], es[0][1], es[-1][2]), *es[1:-1]])),
     "entry 4 records index 0 of site 'alpha': it was moved"),
    (dict(page=_entries(lambda es: [*es, es[-1]])), "sent entry 4 out of order, twice"),
    (dict(page=_entries(lambda es: [(i, b"\x00", p) for i, e, p in es])), "entry 0 is not a usage entry"),
    (dict(page=lambda page: dataclasses.replace(page, next_start=1)), "next page starts at 1, not after 4"),
], ids=["forged signature", "another size under the signature", "altered entry", "proof of another index",
        "entry moved", "entry twice", "garbage entry", "paging backwards"])
def test_a_site_that_lies_about_an_entry_or_a_checkpoint_is_caught(site: Journal, pins: Path, lie: dict[str, Any],
                                                                   named: str) -> None:
    with pytest.raises(intertie.LedgerVerificationError, match=named):
        verify(Lying(reader(site), **lie), pins)
    assert not pin_path(pins, SITE).exists()  # nothing pinned from a failed check


def test_a_rewritten_history_signed_with_the_same_key_does_not_extend_the_checkpoint_verified(
        tmp_path: Path, pins: Path) -> None:
    honest = open_site(tmp_path / "honest")
    run(honest, *(attempt(f"t{i}") for i in range(8)))
    assert verify(reader(honest), pins).size == 8
    honest.close()
    # The operator rebuilds the ledger with entry 3 changed, re-signed with the same key, and more
    # entries after it: every entry and signature checks out alone.
    (tmp_path / "rewritten").mkdir()
    shutil.copy(tmp_path / "honest" / "ledger.key", tmp_path / "rewritten" / "ledger.key")
    forged = open_site(tmp_path / "rewritten")
    run(forged, *(attempt(f"t{i}", wall=0.5 if i == 3 else 2.0) for i in range(10)))
    with pytest.raises(intertie.LedgerVerificationError,
                       match=r"checkpoint at size 10 does not extend the one verified .* \(size 8\): the site's "
                             r"history was rewritten"):
        verify(reader(forged), pins)
    # A proof the site makes up does not help it; nor does showing the old size with another root.
    with pytest.raises(intertie.LedgerVerificationError, match="history was rewritten"):
        verify(Lying(reader(forged), proof=lambda p: [_flipped(h) for h in p]), pins)
    forged.close()


def test_a_shorter_or_same_size_but_different_ledger_is_refused(tmp_path: Path, pins: Path) -> None:
    honest = open_site(tmp_path / "honest")
    run(honest, *(attempt(f"t{i}") for i in range(6)))
    verify(reader(honest), pins)
    honest.close()
    for name, sizes in (("shorter", 4), ("same size", 6)):
        (tmp_path / name).mkdir()
        shutil.copy(tmp_path / "honest" / "ledger.key", tmp_path / name / "ledger.key")
        other = open_site(tmp_path / name)
        run(other, *(attempt(f"x{i}") for i in range(sizes)))
        with pytest.raises(intertie.LedgerVerificationError,
                           match="older than the one verified" if sizes < 6 else "same size, another root"):
            verify(reader(other), pins)
        other.close()


def test_nothing_to_verify_before_the_first_checkpoint_unless_one_was_verified(tmp_path: Path, pins: Path,
                                                                              site: Journal) -> None:
    journal = open_site(tmp_path / "empty")
    result = verify(reader(journal), pins)
    assert (result.entries, result.size) == (0, 0) and "nothing to verify yet" in str(result)
    assert usage.table(reader(journal)).num_rows == 0
    verify(reader(site), pins)
    with pytest.raises(intertie.LedgerVerificationError, match="shows no checkpoint, and one of size 5 was verified"):
        verify(reader(journal), pins)
    journal.close()


def test_entries_are_paged_and_all_verified(site: Journal, pins: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run(site, *(attempt(f"b{i}") for i in range(20)))
    monkeypatch.setattr(ledger_service, "MAX_PAGE", 3)
    calls: list[int] = []
    source = reader(site)
    page = source.page

    def counted(size: int, start: int, since: float = 0.0) -> Page:
        calls.append(start)
        return page(size, start, since)

    source.page = counted  # type: ignore[method-assign]
    assert verify(source, pins).entries == 23
    assert len(calls) == 8 and calls == sorted(calls)


# ---------------------------------------------------------------------------- the service
def _refused(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(Aborted) as err:
        call()
    return err.value.code(), err.value.kind, err.value.details()


def test_hostile_requests_get_typed_errors(site: Journal) -> None:
    stub = Stub(LedgerService(site.ledger, isolated=True), ACME)
    invalid = (grpc.StatusCode.INVALID_ARGUMENT, "ERROR_KIND_INVALID_ARGUMENT")
    for request in (ledger_pb2.GetCheckpointRequest(size=6), ledger_pb2.GetCheckpointRequest(size=2**64 - 1)):
        code, kind, details = _refused(functools.partial(stub.GetCheckpoint, request, 1))
        assert (code, kind) == invalid and "is beyond the usage ledger of site 'alpha' (5 entries)" in details
    assert _refused(lambda: stub.GetCheckpoint(ledger_pb2.GetCheckpointRequest(size=3), 1))[:2] == (
        grpc.StatusCode.NOT_FOUND, "ERROR_KIND_NOT_FOUND")
    for request, why in ((ledger_pb2.ListEntriesRequest(max_entries=2**32 - 1), "over this site's page of 1000"),
                         (ledger_pb2.ListEntriesRequest(since=math.nan), "since must be a finite time"),
                         (ledger_pb2.ListEntriesRequest(since=-math.inf), "since must be a finite time"),
                         (ledger_pb2.ListEntriesRequest(start=6), "beyond the checkpoint's 5 entries"),
                         (ledger_pb2.ListEntriesRequest(size=2**63), "beyond the usage ledger")):
        code, kind, details = _refused(functools.partial(stub.ListEntries, request, 1))
        assert (code, kind) == invalid and why in details, details
    for request in (ledger_pb2.ConsistencyProofRequest(size1=0), ledger_pb2.ConsistencyProofRequest(size1=6),
                    ledger_pb2.ConsistencyProofRequest(size1=2**64 - 1, size2=5)):
        assert _refused(functools.partial(stub.GetConsistencyProof, request, 1))[:2] == invalid
    assert stub.GetCheckpoint(ledger_pb2.GetCheckpointRequest(size=5), 1).size == 5  # and it still answers
    proof = stub.GetConsistencyProof(ledger_pb2.ConsistencyProofRequest(size1=5), 1)
    assert (list(proof.hashes), proof.checkpoint.size) == ([], 5)


def test_entries_are_sent_as_stored(site: Journal) -> None:
    stub = Stub(LedgerService(site.ledger, isolated=True), ACME)
    listed = stub.ListEntries(ledger_pb2.ListEntriesRequest(), 1)
    stored = dict(sqlite3.connect(site.path).execute("SELECT idx, entry FROM ledger_entries").fetchall())
    assert [(e.index, e.entry) for e in listed.entries] == [(i, stored[i]) for i in (0, 2, 4)]
    assert listed.next_start == 0 and listed.checkpoint.public_key == site.ledger.public_key()
    since = stub.ListEntries(ledger_pb2.ListEntriesRequest(since=START + 1), 1)
    assert list(since.entries) == []


def test_who_sees_which_entries(site: Journal) -> None:
    assert visibility(ACME, isolated=True) == ("acme", None)
    assert visibility(Caller(peer="beta"), isolated=True) == (None, "beta")
    assert visibility(Caller(peer="beta"), isolated=False) == (None, "beta")
    assert visibility(Caller(), isolated=False) == (None, None)
    assert visibility(Caller(), isolated=True) == ("", None)  # (a token-less caller is refused before this)

    def tenants(who: Caller, isolated: bool = True) -> list[str]:
        return usage.table(reader(site, who, isolated)).column("tenant").to_pylist()  # type: ignore[no-any-return]

    assert tenants(ACME) == ["acme"] * 3
    assert tenants(Caller(tenant="globex")) == ["globex"]
    assert tenants(Caller(tenant="nobody")) == []
    assert tenants(Caller(peer="beta")) == ["acme@beta"]
    assert tenants(Caller(peer="gamma")) == []
    assert tenants(Caller(), isolated=False) == ["acme", "globex", "acme", "acme@beta", "acme"]


# ---------------------------------------------------------------------------- the tables
def test_the_attempts_table_and_its_summaries(site: Journal) -> None:
    table = usage.table(reader(site))
    assert table.schema == usage._schema()
    rows = table.to_pylist()
    assert [r["task_id"] for r in rows] == ["a1", "a2", "a3"]  # without the tenant's scope "acme~"
    two = rows[1]
    assert (two["site"], two["tenant"], two["function"], two["attempt"], two["outcome"]) == (
        SITE, "acme", "score", 1, "succeeded")
    assert (two["cpus"], two["wall_s"], two["cpu_s_reserved"], two["cpu_time_s"]) == (2.0, 1.0, 2.0, 0.25)
    assert two["ended_at"] == datetime.fromtimestamp(START, UTC) and two["cost"] == pytest.approx(2.0 / 3600 * 0.36)
    assert (two["args_bytes"], two["result_bytes"], two["dataset_bytes_pulled"], two["index"]) == (100, 20, 5, 2)
    peer = usage.table(reader(site, Caller(peer="beta"))).to_pylist()
    assert peer[0]["task_id"] == "p1"  # the home's scope "acme~" taken off too

    by_function = usage.table(reader(site), by="function").to_pylist()
    assert [(r["function"], r["attempts"], r["cpu_s_reserved"], r["bytes"]) for r in by_function] == [
        ("score", 2, 4.0, 250), ("train", 1, 2.0, 125)]
    assert by_function[0]["cost"] == pytest.approx(4.0 / 3600 * 0.36)
    (day,) = usage.table(reader(site), by="day").to_pylist()
    assert (day["day"], day["attempts"], day["wall_s"]) == (datetime.fromtimestamp(START, UTC).date(), 3, 5.0)
    assert usage.table(reader(site), by="site").column_names == [
        "site", "attempts", "cpu_s_reserved", "gpu_s_reserved", "cpu_time_s", "wall_s", "bytes", "cost"]

    run(site, attempt("late", ended=START + 3600))
    assert usage.table(reader(site), since=START + 1).column("task_id").to_pylist() == ["late"]
    assert usage.table(reader(site), since=datetime.fromtimestamp(START + 1, UTC)).num_rows == 1
    with pytest.raises(intertie.InvalidRequestError, match="by: one of"):
        usage.table(reader(site), by="tenant")
    with pytest.raises(intertie.InvalidRequestError, match="since: a finite time"):
        usage.table(reader(site), since=math.nan)
    with pytest.raises(intertie.InvalidRequestError, match="since: a datetime or Unix time"):
        usage.table(reader(site), since="yesterday")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- the tenant index
def test_a_ledger_table_from_before_the_owner_columns_gets_them_in_place(tmp_path: Path) -> None:
    journal = open_site(tmp_path)
    run(journal, attempt("a1"), attempt("g1", tenant="globex"), attempt("p1", tenant="acme@beta", home="beta"))
    journal.close()
    db = sqlite3.connect(tmp_path / "journal.sqlite")  # the table as the first ledger made it
    db.executescript("DROP INDEX ledger_entries_tenant; DROP INDEX ledger_entries_home; "
                     "ALTER TABLE ledger_entries DROP COLUMN tenant; ALTER TABLE ledger_entries DROP COLUMN home;")
    assert [r[1] for r in db.execute("PRAGMA table_xinfo(ledger_entries)")] == ["idx", "entry"]
    db.close()
    journal = open_site(tmp_path)
    run(journal, attempt("a2"))
    ledger = journal.ledger
    columns = sqlite3.connect(tmp_path / "journal.sqlite").execute("PRAGMA table_xinfo(ledger_entries)").fetchall()
    assert [c[1] for c in columns] == ["idx", "entry", "tenant", "home"]
    assert [i for i, _ in ledger.visible_entries(tenant="acme", end=4)] == [0, 3]
    assert [i for i, _ in ledger.visible_entries(home="beta", end=4)] == [2]
    assert [i for i, _ in ledger.visible_entries(end=4, start=1, limit=2)] == [1, 2]
    plan = sqlite3.connect(tmp_path / "journal.sqlite").execute(
        "EXPLAIN QUERY PLAN SELECT idx FROM ledger_entries WHERE idx >= 0 AND idx < 9 AND tenant = 'acme' "
        "ORDER BY idx").fetchall()
    assert "USING INDEX ledger_entries_tenant" in str(plan) or "USING COVERING INDEX ledger_entries_tenant" in str(plan)
    journal.close()
    # An entry a forger made into no JSON has no owner, and breaks neither the column nor the open.
    db = sqlite3.connect(tmp_path / "journal.sqlite")
    db.execute("UPDATE ledger_entries SET entry = x'00' WHERE idx = 1")
    db.commit()
    db.close()
    journal = open_site(tmp_path)
    assert [i for i, _ in journal.ledger.visible_entries(tenant="globex", end=4)] == []
    journal.close()


def test_the_pin_file_holds_what_was_verified(site: Journal, pins: Path) -> None:
    result = verify(reader(site), pins)
    data = json.loads(pin_path(pins, SITE).read_text())
    assert set(data) == {"site", "public_key", "size", "root", "signed_at", "verified_at"}
    assert (data["site"], data["size"], data["public_key"]) == (SITE, 5, result.public_key)
    assert pin_path(pins, "../../etc/x").parent == pins  # a site id is never a path
