"""Your usage at your home site, read from its usage ledger, and checked without trusting it
(``fed.usage()``, ``fed.verify_usage()``, ``intertie usage [verify]``; README: Your usage,
verified).

A site records every attempt that ran there in an append-only log (an entry of canonical JSON
each), keeps a Merkle tree over the entries (RFC 9162) and signs checkpoints (the tree's size
and root) with its Ed25519 key. :func:`verify` computes everything itself, with
:mod:`intertie.merkle` and :mod:`intertie.checkpoint`, from the bytes the site sent:

1. the latest checkpoint is signed by the site's key, the key pinned the first time this
   client checked the site (trust on first use: ``~/.intertie/ledgers/<site>.json``, 0600);
   a site that signs with another key is refused;
2. each of your entries records its own index and the site, and its leaf hash with its
   inclusion proof leads to the checkpoint's root: the site cannot show you an entry it did
   not log, or one other than it logged;
3. the checkpoint extends the one verified last time (a consistency proof): nothing the site
   had logged then was changed, dropped or reordered since.

What a tenant cannot check alone: that the site listed *all* of its entries (it can leave
some out of your listing; it cannot take them out of the log), or that an entry shown as
yours is a task you submitted (compare the task ids with your own).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import grpc

from intertie import errors
from intertie.checkpoint import Checkpoint, signed_by
from intertie.merkle import HASH_SIZE, ProofError, leaf_hash, verify_consistency, verify_inclusion
from intertie.v1 import ledger_pb2, ledger_pb2_grpc

CALL_TIMEOUT_S = 60.0
BY = ("site", "function", "day")
# Site ids are file names as they are when they look like one (every site id the gateway
# takes does); any other text a site sends is hashed into one.
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,99}$")


# ---------------------------------------------------------------------- what is read from a site
@dataclass(frozen=True)
class Head:
    """A signed checkpoint, and the public key the site says it signs with."""

    checkpoint: Checkpoint
    public_key: bytes


@dataclass(frozen=True)
class Page:
    """Entries ``(index, entry bytes, inclusion proof)`` in the tree of ``head``; ``next_start``
    where the next page starts (0: no more)."""

    head: Head
    entries: list[tuple[int, bytes, list[bytes]]]
    next_start: int


class LedgerReader(Protocol):
    """What :func:`verify` and :func:`table` read from a site (``LedgerService``)."""

    def head(self, size: int = 0) -> Head | None:
        """The checkpoint at ``size`` entries (0: the latest; None: the site signed none yet)."""
        ...

    def page(self, size: int, start: int, since: float = 0.0) -> Page: ...

    def consistency(self, size1: int, size2: int) -> tuple[Head, list[bytes]]: ...


class GrpcLedger:
    """A :class:`LedgerReader` over a gateway's ``LedgerService`` (on ``channel``, or through
    ``stub``, an object with the service's methods)."""

    def __init__(self, channel: grpc.Channel | None = None, *, stub: Any = None) -> None:
        self._stub = stub if stub is not None else ledger_pb2_grpc.LedgerServiceStub(channel)

    def head(self, size: int = 0) -> Head | None:
        try:
            return _head(self._call(self._stub.GetCheckpoint, ledger_pb2.GetCheckpointRequest(size=size)))
        except grpc.RpcError as exc:
            if size == 0 and exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    def page(self, size: int, start: int, since: float = 0.0) -> Page:
        answer = self._call(self._stub.ListEntries, ledger_pb2.ListEntriesRequest(size=size, start=start, since=since))
        return Page(_head(answer.checkpoint),
                    [(e.index, bytes(e.entry), [bytes(h) for h in e.inclusion_proof]) for e in answer.entries],
                    answer.next_start)

    def consistency(self, size1: int, size2: int) -> tuple[Head, list[bytes]]:
        request = ledger_pb2.ConsistencyProofRequest(size1=size1, size2=size2)
        answer = self._call(self._stub.GetConsistencyProof, request)
        return _head(answer.checkpoint), [bytes(h) for h in answer.hashes]

    @staticmethod
    def _call(method: Callable[..., Any], request: Any) -> Any:
        try:
            return method(request, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise errors.IntertieError("this site keeps no usage ledger (it runs with --no-ledger, or its gateway "
                                           "is older than the LedgerService)") from None
            raise


def _head(message: ledger_pb2.Checkpoint) -> Head:
    return Head(Checkpoint(message.site_id, message.size, bytes(message.root), message.time,
                           bytes(message.signature)), bytes(message.public_key))


def _pages(reader: LedgerReader, head: Head, since: float = 0.0) -> Iterator[tuple[int, bytes, list[bytes]]]:
    """Every entry the site lists for the caller up to ``head``, page by page, in index order.
    A site that answers for another checkpoint, repeats or reorders entries or pages
    backwards is refused (the loop ends within ``head``'s size pages, whatever it sends)."""
    size, start, last = head.checkpoint.size, 0, -1
    while True:
        page = reader.page(size, start, since)
        if page.head != head:
            raise errors.LedgerVerificationError(
                f"asked for the entries of the checkpoint at size {size}, the site answered with the one at size "
                f"{page.head.checkpoint.size}, or another one")
        for item in page.entries:
            if not last < item[0] < size:
                raise errors.LedgerVerificationError(
                    f"the site sent entry {item[0]} out of order, twice, or beyond the checkpoint's {size} entries")
            last = item[0]
            yield item
        if not page.next_start:
            return
        if not max(start, last) < page.next_start <= size:
            raise errors.LedgerVerificationError(f"the site's next page starts at {page.next_start}, not after "
                                                 f"{max(start, last)} within {size} entries")
        start = page.next_start


def _decode(index: int, entry: bytes) -> dict[str, Any]:
    try:
        value = json.loads(entry)
    except ValueError:
        value = None
    if not isinstance(value, dict) or value.get("kind") != "usage":
        raise errors.LedgerVerificationError(f"entry {index} is not a usage entry")
    return value


# ---------------------------------------------------------------------- verification
@dataclass(frozen=True)
class Pin:
    """What this client keeps of a site: its key, and the checkpoint it verified last."""

    site: str
    public_key: bytes
    size: int
    root: bytes
    signed_at: float
    verified_at: float


def pins_dir() -> Path:
    return Path.home() / ".intertie" / "ledgers"


def pin_path(directory: Path, site: str) -> Path:
    name = site if _FILE_NAME.match(site) else "site-" + hashlib.sha256(site.encode()).hexdigest()[:32]
    return directory / f"{name}.json"


def load_pin(path: Path, site: str) -> Pin | None:
    try:
        data = json.loads(path.read_text())
        pin = Pin(data["site"], base64.b64decode(data["public_key"], validate=True), data["size"],
                  base64.b64decode(data["root"], validate=True), float(data["signed_at"]), float(data["verified_at"]))
        if pin.site != site or type(pin.size) is not int:
            raise ValueError(f"it is not site {site!r}'s")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise errors.LedgerVerificationError(f"cannot read what was verified of site {site!r} before, {path} ({exc}); "
                                             "remove it to trust the site's key on first use again") from None
    return pin


def save_pin(path: Path, pin: Pin) -> None:
    """Whole or not at all (a temporary file renamed over it), readable by its owner only."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    text = json.dumps({"site": pin.site, "public_key": _b64(pin.public_key), "size": pin.size, "root": _b64(pin.root),
                       "signed_at": pin.signed_at, "verified_at": pin.verified_at}, indent=1) + "\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class UsageVerification:
    """What :func:`verify` checked: ``entries`` of yours in site ``site``'s checkpoint of
    ``size`` entries signed at ``signed_at`` with the key ``public_key`` (base64; pinned in
    ``pin``); ``previous_size`` and ``previous_verified_at``: the checkpoint verified before,
    which this one extends (None: the first check, when the key was pinned). ``size`` 0: the
    site has signed no checkpoint yet, so there was nothing to check."""

    site: str
    entries: int
    size: int
    signed_at: float | None
    public_key: str
    pin: str
    previous_size: int | None = None
    previous_verified_at: float | None = None

    def __str__(self) -> str:
        if not self.size:
            return f"site {self.site}: nothing to verify yet (it has signed no checkpoint of its usage ledger)"
        text = (f"site {self.site}: {self.entries} of your entries verified against checkpoint of size {self.size} "
                f"(signed {_utc(self.signed_at)})")
        if self.previous_verified_at is None:
            return f"{text}; first check: the site's key {self.public_key} is pinned in {self.pin}"
        return f"{text}; extends the one verified {_utc(self.previous_verified_at)} (size {self.previous_size})"

    def __repr__(self) -> str:
        return f"<UsageVerification {self}>"


def verify(reader: LedgerReader, site: str, *, pins: Path | None = None,
           clock: Callable[[], float] = time.time) -> UsageVerification:
    """Checks the caller's entries in site ``site``'s usage ledger and the ledger's history
    against what was verified before (see the module doc); raises
    :class:`~intertie.LedgerVerificationError` naming the first thing that fails. The pin is
    updated only when everything checked out."""
    path = pin_path(pins if pins is not None else pins_dir(), site)
    head = reader.head()
    kept = load_pin(path, site)
    if head is None:
        if kept is not None:
            raise errors.LedgerVerificationError(f"site {site!r} shows no checkpoint, and one of size {kept.size} was "
                                                 f"verified {_utc(kept.verified_at)}: its ledger is gone")
        return UsageVerification(site, 0, 0, None, "", str(path))
    cp, key = head.checkpoint, head.public_key
    if cp.site != site:
        raise errors.LedgerVerificationError(f"the checkpoint is site {cp.site!r}'s, and the gateway is site {site!r}")
    if kept is not None and kept.public_key != key:
        raise errors.LedgerVerificationError(
            f"site {site!r} now signs with key {_b64(key)}, not the key {_b64(kept.public_key)} pinned "
            f"{_utc(kept.verified_at)}: if its operator announced a new key (intertie-gateway ledger new-key), "
            f"remove {path} to trust it")
    if not signed_by(cp, key):
        raise errors.LedgerVerificationError(f"the checkpoint at size {cp.size} is forged: its signature does not "
                                             f"verify with site {site!r}'s key {_b64(key)}")
    if len(cp.root) != HASH_SIZE:
        raise errors.LedgerVerificationError(f"the checkpoint at size {cp.size} has a root of {len(cp.root)} bytes")
    count = 0
    for index, entry, proof in _pages(reader, head):
        value = _decode(index, entry)
        if value.get("idx") != index or value.get("site") != site:
            raise errors.LedgerVerificationError(f"entry {index} records index {value.get('idx')!r} of site "
                                                 f"{value.get('site')!r}: it was moved or is another site's")
        try:
            verify_inclusion(leaf_hash(entry), index, cp.size, proof, cp.root)
        except ProofError as exc:
            raise errors.LedgerVerificationError(f"entry {index} is not the one the checkpoint at size {cp.size} "
                                                 f"holds ({exc}): it was altered, or its proof is wrong") from None
        count += 1
    if kept is not None and kept.size:  # (everything extends the empty tree)
        _check_extends(reader, head, kept, path)
    save_pin(path, Pin(site, key, cp.size, cp.root, cp.time, clock()))
    return UsageVerification(site, count, cp.size, cp.time, _b64(key), str(path),
                             kept.size if kept else None, kept.verified_at if kept else None)


def _check_extends(reader: LedgerReader, head: Head, kept: Pin, path: Path) -> None:
    cp = head.checkpoint
    before = f"the one verified {_utc(kept.verified_at)} (size {kept.size})"
    rewritten = f"the checkpoint at size {cp.size} does not extend {before}: the site's history was rewritten"
    if cp.size < kept.size:
        raise errors.LedgerVerificationError(f"the site's latest checkpoint (size {cp.size}) is older than {before}: "
                                             "its ledger lost entries, or it shows an old checkpoint")
    if cp.size == kept.size:
        if cp.root != kept.root:
            raise errors.LedgerVerificationError(f"{rewritten} (same size, another root)")
        return
    answered, proof = reader.consistency(kept.size, cp.size)
    if answered != head:
        raise errors.LedgerVerificationError(f"asked for a proof up to the checkpoint at size {cp.size}, the site "
                                             f"answered with the one at size {answered.checkpoint.size}")
    try:
        verify_consistency(kept.size, cp.size, kept.root, cp.root, proof)
    except ProofError as exc:
        raise errors.LedgerVerificationError(f"{rewritten} ({exc}; the pin is {path})") from None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _utc(at: float | None) -> str:
    if at is None or not math.isfinite(at):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


# ---------------------------------------------------------------------- the tables
_TEXT = ("site", "tenant", "task_id", "function")
_COUNTS = ("args_bytes", "result_bytes", "dataset_bytes_pulled", "dataset_bytes_read")


def _schema() -> Any:
    import pyarrow as pa

    when = pa.timestamp("ms", tz="UTC")
    fields = [*((n, pa.string()) for n in _TEXT), ("attempt", pa.int64()), ("outcome", pa.string()),
              ("started_at", when), ("ended_at", when),
              *((n, pa.float64()) for n in ("wall_s", "cpus", "gpus", "cpu_s_reserved", "gpu_s_reserved",
                                            "cpu_time_s")),
              *((n, pa.int64()) for n in _COUNTS), ("price_per_cpu_hour", pa.float64()), ("cost", pa.float64()),
              ("index", pa.int64())]
    return pa.schema(fields)


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _row(index: int, entry: bytes) -> dict[str, Any]:
    """One attempt as a row (a value the site recorded as unknown, or of the wrong type, is null)."""
    value = _decode(index, entry)
    tenant, task_id = str(value.get("tenant") or ""), str(value.get("task_id") or "")
    owner = tenant.partition("@")[0]  # the home filed the id under its tenant: "acme~id"
    row: dict[str, Any] = {"site": str(value.get("site") or ""), "tenant": tenant,
                           "task_id": task_id.removeprefix(f"{owner}~") if owner else task_id,
                           "function": str(value.get("function") or ""), "outcome": str(value.get("outcome") or ""),
                           "index": index}
    attempt = value.get("attempt")
    row["attempt"] = attempt if type(attempt) is int else None
    for name in ("cpus", "gpus", "cpu_time_s", "price_per_cpu_hour"):
        row[name] = _number(value.get(name))
    for name in _COUNTS:
        count = value.get(name)
        row[name] = count if type(count) is int else None
    started, ended = _number(value.get("started_at")), _number(value.get("ended_at"))
    row["started_at"] = round(started * 1000) if started is not None and math.isfinite(started) else None
    row["ended_at"] = round(ended * 1000) if ended is not None and math.isfinite(ended) else None
    wall = max(0.0, ended - started) if started is not None and ended is not None else None
    row["wall_s"] = wall
    row["cpu_s_reserved"] = row["cpus"] * wall if row["cpus"] is not None and wall is not None else None
    row["gpu_s_reserved"] = row["gpus"] * wall if row["gpus"] is not None and wall is not None else None
    price = row["price_per_cpu_hour"]
    row["cost"] = row["cpu_s_reserved"] / 3600 * price if row["cpu_s_reserved"] is not None and price is not None \
        else None
    return row


def since_time(since: float | datetime | None) -> float:
    """``since`` as Unix time (a naive datetime is local time); 0 for None."""
    if since is None:
        return 0.0
    if isinstance(since, datetime):
        value = since.timestamp()
    elif isinstance(since, int | float) and not isinstance(since, bool):
        value = float(since)
    else:
        raise errors.InvalidRequestError(f"since: a datetime or Unix time, not {type(since).__name__}")
    if not math.isfinite(value):
        raise errors.InvalidRequestError(f"since: a finite time, not {since!r}")
    return value


def table(reader: LedgerReader, *, since: float | datetime | None = None, by: str | None = None) -> Any:
    """The caller's attempts at the site as a ``pyarrow.Table``: a row per ledger entry up to
    the site's latest checkpoint (entries are signed within seconds of their attempt's end),
    or, ``by`` "site", "function" or "day" (UTC, of the attempt's end), one row per group
    with attempts, cpu_s_reserved, gpu_s_reserved, cpu_time_s, wall_s, bytes (arguments,
    results and datasets pulled) and cost. Not verified: :func:`verify` does that."""
    import pyarrow as pa

    if by is not None and by not in BY:
        raise errors.InvalidRequestError(f"by: one of {', '.join(map(repr, BY))} or None, not {by!r}")
    after = since_time(since)
    head = reader.head()
    schema = _schema()
    rows = [] if head is None else [_row(index, entry) for index, entry, _ in _pages(reader, head, after)]
    columns = {f.name: pa.array([r[f.name] for r in rows], pa.int64() if f.name in ("started_at", "ended_at")
                                else f.type).cast(f.type) for f in schema}
    attempts = pa.table(columns, schema=schema)
    return attempts if by is None else summary(attempts, by)


def summary(attempts: Any, by: str) -> Any:
    """Totals of an attempts table per site, function or day (see :func:`table`)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    key = attempts.column("ended_at").cast(pa.date32()) if by == "day" else attempts.column(by)
    args, results, pulled = (pc.fill_null(attempts.column(n), 0) for n in ("args_bytes", "result_bytes",
                                                                          "dataset_bytes_pulled"))
    moved = pc.add(pc.add(args, results), pulled)
    sums = ("cpu_s_reserved", "gpu_s_reserved", "cpu_time_s", "wall_s", "bytes", "cost")
    grouped = pa.table({by: key, "index": attempts.column("index"), "bytes": moved,
                        **{n: attempts.column(n) for n in sums if n != "bytes"}})
    totals = grouped.group_by(by).aggregate([("index", "count"), *((n, "sum") for n in sums)])
    out = pa.table({by: totals.column(by), "attempts": totals.column("index_count"),
                    **{n: totals.column(f"{n}_sum") for n in sums}})
    return out.sort_by(by)
