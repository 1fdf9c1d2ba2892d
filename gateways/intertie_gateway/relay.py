"""A home's data plane acting at its peers for its own tenants: their tokens are good only at
their home, so a tenant's request about another site's datasets comes to the home, which makes
it at that peer's endpoint (mutual TLS), vouching for the tenant as "tenant@home"."""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import fields
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from intertie_gateway.arrow_checks import arrow_call, batches_of, check_batch, checked_schema, first_line
from intertie_gateway.datasets import DatasetError, DatasetMeta
from intertie_gateway.tenancy import owner_here
from intertie_gateway.validate import clip

logger = logging.getLogger(__name__)

# A listing or an action relayed to a peer for a tenant fails when the peer has not answered
# in this time (a transfer is not bounded here: the tenant's client has its own deadline).
RELAY_TIMEOUT_S = 30.0
# A peer that has just come up is told to the data plane at the gateway's next sync
# (dataplane.SYNC_S): a relayed request waits this long for it, asking this often.
FIND_PEER_S = 2.0
FIND_PEER_RETRY_S = 0.1

# The header in which a site names the tenant it acts for at a peer ("tenant@home").
TENANT_HEADER = "intertie-tenant"


class Relay:
    """A home's data plane acting at its peers for its own tenants (their tokens are good only
    here): each call goes to the peer's endpoint with mutual TLS and names the tenant as the
    peer does ("tenant@home"). What comes back is network data and is checked like a pull's;
    a replica's owner is named as this site names it (``tenancy.owner_here``).

    ``addresses()``: the up peers' endpoints; ``identify(address)``: the site the certificate
    served there names (checked with the federation CA), asked once per address."""

    def __init__(self, site_id: str, addresses: Callable[[], Sequence[str]],
                 connect: Callable[[str], flight.FlightClient], identify: Callable[[str], str]) -> None:
        self.site_id = site_id
        self._addresses = addresses
        self._connect = connect
        self._identify = identify
        self._sites: dict[str, str] = {}  # address -> the site serving there
        self._lock = threading.Lock()

    def _address(self, site: str) -> str:
        deadline = time.monotonic() + FIND_PEER_S
        while True:
            addresses = list(self._addresses())
            with self._lock:
                known = {a: s for a, s in self._sites.items() if a in addresses}
            for address in addresses:
                if address not in known:
                    try:
                        known[address] = self._identify(address)
                    except OSError as exc:  # not up after all: asked again at the next call
                        logger.info("which site serves datasets at %s? %s", address, exc)
            with self._lock:
                self._sites = known
            for address, serving in known.items():
                if serving == site:
                    return address
            if time.monotonic() > deadline:
                break
            time.sleep(FIND_PEER_RETRY_S)
        raise flight.FlightUnavailableError(f"ERROR_KIND_SITE_FAILURE: site {clip(site)!r} is not reachable from "
                                            f"site {self.site_id!r} (not an up peer)")

    def _call(self, site: str, tenant: str, timeout: float | None = RELAY_TIMEOUT_S
              ) -> tuple[flight.FlightClient, flight.FlightCallOptions]:
        client = self._connect(self._address(site))
        vouched = f"{tenant}@{self.site_id}"
        return client, flight.FlightCallOptions(timeout=timeout, headers=[(TENANT_HEADER.encode(), vouched.encode())])

    def _meta(self, body: bytes, site: str) -> DatasetMeta:
        """A peer's answer about a dataset, checked, with its owner as this site names it."""
        try:
            raw = json.loads(body)
            meta = DatasetMeta(**{f.name: raw[f.name] for f in fields(DatasetMeta) if f.name in raw})
        except (ValueError, TypeError, RecursionError):
            raise DatasetError("ERROR_KIND_SITE_FAILURE", f"site {site!r} answered with metadata that is not valid") \
                from None
        typed = all(isinstance(getattr(meta, f.name), str) for f in fields(DatasetMeta)
                    if f.name in ("id", "name", "site", "schema", "origin", "owner"))
        if not typed or meta.site != site or not isinstance(meta.num_rows, int) or not isinstance(meta.num_bytes, int):
            raise DatasetError("ERROR_KIND_SITE_FAILURE", f"site {site!r} answered with metadata that is not valid")
        meta.owner = owner_here(meta.owner, site, self.site_id)
        return meta

    def listing(self, site: str, tenant: str) -> list[DatasetMeta]:
        client, options = self._call(site, tenant)
        try:
            return [self._meta(info.descriptor.command, site) for info in client.list_flights(options=options)]
        except flight.FlightError as exc:
            raise _relayed(exc, site) from None
        finally:
            client.close()

    def action(self, kind: str, site: str, tenant: str, key: str) -> DatasetMeta:
        client, options = self._call(site, tenant)
        try:
            answer = next(iter(client.do_action(flight.Action(kind, key.encode()), options)), None)
            return self._meta(answer.body.to_pybytes() if answer is not None else b"", site)
        except flight.FlightError as exc:
            raise _relayed(exc, site) from None
        finally:
            client.close()

    def get(self, site: str, tenant: str, key: str, start: int) -> pa.RecordBatchReader:
        """The dataset's batches as the peer streams them, each validated before it is passed on."""
        client, options = self._call(site, tenant, timeout=None)  # a long read: the tenant's client times it
        try:
            reader = client.do_get(flight.Ticket(json.dumps({"id": key, "from_batch": start}).encode()), options)
            schema = checked_schema(arrow_call(functools.partial(getattr, reader, "schema"), f"{site}'s stream"))
        except flight.FlightError as exc:
            client.close()
            raise _relayed(exc, site) from None
        except BaseException:
            client.close()
            raise

        def batches() -> Iterator[pa.RecordBatch]:
            try:
                for index, batch in enumerate(batches_of(reader)):
                    check_batch(batch, schema, f"dataset {clip(key)} from {site}, batch {start + index}")
                    yield batch
            finally:
                client.close()

        return pa.RecordBatchReader.from_batches(schema, batches())

    def put(self, site: str, tenant: str, request: dict[str, Any], reader: Any) -> DatasetMeta:
        """The tenant's upload, passed on batch by batch (the peer validates it in full)."""
        name, replace = request.get("name") or "", request.get("replace", False)
        if not isinstance(name, str) or not isinstance(replace, bool) or set(request) - {"name", "replace"}:
            raise DatasetError("ERROR_KIND_INVALID_ARGUMENT",
                               "bad put descriptor: name must be a string, replace true or false")
        schema = checked_schema(arrow_call(lambda: reader.schema, "the stream's schema"))
        client, options = self._call(site, tenant, timeout=None)
        descriptor = flight.FlightDescriptor.for_command(json.dumps({"name": name, "replace": replace}).encode())
        try:
            writer, answers = client.do_put(descriptor, schema, options)
            with writer:
                for batch in batches_of(reader):
                    writer.write_batch(batch)
                writer.done_writing()
                answer = answers.read()
            return self._meta(answer.to_pybytes() if answer is not None else b"", site)
        except flight.FlightError as exc:
            raise _relayed(exc, site) from None
        finally:
            client.close()


def _relayed(exc: flight.FlightError, site: str) -> Exception:
    """A peer's refusal as this site answers it: the same kind and words (so another
    tenant's dataset is still answered like an unknown one); a peer that cannot be reached
    as unavailable."""
    text = first_line(exc)
    for kind in ("ERROR_KIND_NOT_FOUND", "ERROR_KIND_DATASET_NOT_FOUND", "ERROR_KIND_INVALID_ARGUMENT",
                 "ERROR_KIND_PAYLOAD_TOO_LARGE", "ERROR_KIND_QUOTA_EXCEEDED", "ERROR_KIND_PERMISSION_DENIED"):
        if text.startswith(kind + ": "):
            return DatasetError(kind, text[len(kind) + 2:])
    if isinstance(exc, (flight.FlightUnavailableError, flight.FlightTimedOutError)):
        return flight.FlightUnavailableError(f"ERROR_KIND_SITE_FAILURE: site {site!r} did not answer: {clip(text)}")
    return DatasetError("ERROR_KIND_SITE_FAILURE", f"site {site!r} failed the request: {clip(text)}")
