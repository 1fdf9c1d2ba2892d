"""LedgerService (``ledger.proto``): the site's usage ledger over gRPC, for callers that check
it without trusting the site (the SDK's ``fed.verify_usage()``, ``intertie usage verify``,
and peers holding the site to what it ran for their tenants).

What is served is what the ledger stores: signed checkpoints, the caller's entries as their
bytes were hashed, and proofs from the stored tree. Who sees which entries is
:func:`visibility`; checkpoints and consistency proofs cover the whole log and are the same
for everyone (they tell the log's size, nothing of its entries). Every request field is
checked before the ledger is touched: a bad one is INVALID_ARGUMENT (or NOT_FOUND for a
checkpoint the site never signed) with a one-line reason, never a traceback.
"""

from __future__ import annotations

import asyncio
import math

import grpc

from intertie._rpc import ERROR_KIND_KEY
from intertie.checkpoint import Checkpoint
from intertie.v1 import ledger_pb2, ledger_pb2_grpc
from intertie_gateway.auth import caller
from intertie_gateway.ledger import MAX_PAGE, Ledger
from intertie_gateway.tenancy import Caller

INVALID = (grpc.StatusCode.INVALID_ARGUMENT, "ERROR_KIND_INVALID_ARGUMENT")
NOT_FOUND = (grpc.StatusCode.NOT_FOUND, "ERROR_KIND_NOT_FOUND")


def visibility(who: Caller, *, isolated: bool) -> tuple[str | None, str | None]:
    """Whose entries ``who`` sees, as ``Ledger.visible_entries`` filters them: ``(tenant,
    home)``. A peer sees the entries of the tasks it forwarded here (their home is the peer,
    their tenant ``tenant@peer``); a tenant its own; without token auth (not ``isolated``)
    everyone sees every entry, as every task. The rule of ``tenancy.may_see``, for entries."""
    if who.peer:
        return None, who.peer
    if not isolated:
        return None, None
    return who.tenant, None


class Refused(Exception):
    """A request the service answers with a typed error: (status code, error kind), message."""

    def __init__(self, status: tuple[grpc.StatusCode, str], message: str) -> None:
        super().__init__(message)
        self.status = status


def checkpoint_to_proto(checkpoint: Checkpoint, public_key: bytes) -> ledger_pb2.Checkpoint:
    return ledger_pb2.Checkpoint(site_id=checkpoint.site, size=checkpoint.size, root=checkpoint.root,
                                 time=checkpoint.time, signature=checkpoint.signature, public_key=public_key)


class LedgerService(ledger_pb2_grpc.LedgerServiceServicer):
    """``isolated``: the site has token auth (tenants see only their own entries)."""

    def __init__(self, ledger: Ledger, *, isolated: bool) -> None:
        self._ledger = ledger
        self._isolated = isolated

    async def GetCheckpoint(self, request: ledger_pb2.GetCheckpointRequest,
                            context: grpc.aio.ServicerContext) -> ledger_pb2.Checkpoint:
        try:
            return self._proto(self._checkpoint(request.size))
        except Refused as refused:
            await _abort(context, refused)
            raise  # (abort raises)

    async def ListEntries(self, request: ledger_pb2.ListEntriesRequest,
                          context: grpc.aio.ServicerContext) -> ledger_pb2.EntryList:
        try:
            checkpoint = self._checkpoint(request.size)
            if request.start > checkpoint.size:
                raise Refused(INVALID, f"start {request.start} is beyond the checkpoint's {checkpoint.size} entries")
            if request.max_entries > MAX_PAGE:
                raise Refused(INVALID, f"max_entries {request.max_entries} is over this site's page of {MAX_PAGE}")
            if not math.isfinite(request.since):
                raise Refused(INVALID, f"since must be a finite time, not {request.since}")
        except Refused as refused:
            await _abort(context, refused)
            raise
        tenant, home = visibility(caller(), isolated=self._isolated)
        # A page's proofs (~0.1 ms each) are made off the event loop; each takes the journal's
        # lock on its own, so the loop's commits wait for one proof at most.
        return await asyncio.to_thread(self._page, checkpoint, tenant, home, request.start,
                                       request.max_entries or MAX_PAGE, request.since)

    async def GetConsistencyProof(self, request: ledger_pb2.ConsistencyProofRequest,
                                  context: grpc.aio.ServicerContext) -> ledger_pb2.Proof:
        try:
            checkpoint = self._checkpoint(request.size2)
            if not 0 < request.size1 <= checkpoint.size:
                raise Refused(INVALID, f"no consistency proof from size {request.size1} to the checkpoint at size "
                                       f"{checkpoint.size} (size1 must be 1 to size2)")
        except Refused as refused:
            await _abort(context, refused)
            raise
        hashes = self._ledger.consistency_proof(request.size1, checkpoint.size)
        return ledger_pb2.Proof(hashes=hashes, checkpoint=self._proto(checkpoint))

    # ------------------------------------------------------------------ inside
    def _checkpoint(self, size: int) -> Checkpoint:
        """The checkpoint a request names: 0 the latest, else the one at exactly ``size``."""
        ledger = self._ledger
        if size == 0:
            latest = ledger.latest_checkpoint()
            if latest is None:
                raise Refused(NOT_FOUND, f"site {ledger.site!r} has signed no checkpoint of its usage ledger yet")
            return latest
        entries = ledger.size
        if size > entries:  # (also keeps a uint64 beyond SQLite's integers out of a query)
            raise Refused(INVALID, f"size {size} is beyond the usage ledger of site {ledger.site!r} ({entries} "
                                   "entries)")
        found = ledger.checkpoint(size)
        if found is None:
            raise Refused(NOT_FOUND, f"site {ledger.site!r} signed no checkpoint at size {size}")
        return found

    def _proto(self, checkpoint: Checkpoint) -> ledger_pb2.Checkpoint:
        return checkpoint_to_proto(checkpoint, self._ledger.public_key())

    def _page(self, checkpoint: Checkpoint, tenant: str | None, home: str | None, start: int, limit: int,
              since: float) -> ledger_pb2.EntryList:
        ledger = self._ledger
        rows = ledger.visible_entries(tenant=tenant, home=home, start=start, end=checkpoint.size, since=since,
                                      limit=limit)
        page = ledger_pb2.EntryList(checkpoint=self._proto(checkpoint))
        for index, entry in rows:
            page.entries.add(index=index, entry=entry, inclusion_proof=ledger.inclusion_proof(index, checkpoint.size))
        if len(rows) == limit and rows[-1][0] + 1 < checkpoint.size:
            page.next_start = rows[-1][0] + 1
        return page


async def _abort(context: grpc.aio.ServicerContext, refused: Refused) -> None:
    code, kind = refused.status
    await context.abort(code, str(refused), trailing_metadata=((ERROR_KIND_KEY, kind),))
