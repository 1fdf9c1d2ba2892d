"""Datasets: Arrow tables that live at a site, uploaded and fetched over Arrow Flight.

``fed.put_dataset(table)`` streams record batches to a site's Flight endpoint and returns
a :class:`DatasetRef`; ``fed.get_dataset(ref)`` streams them back. Nothing here pickles:
the wire is Arrow IPC.

A tenant's token is good only at its home, so with a token every call goes to the home's
endpoint and names the site it is about; the home makes it there (over the peers' mutual
TLS) on the tenant's behalf. Without one (a federation without authentication) each site's
endpoint is called directly.
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from intertie import errors
from intertie.display import Cell, clip, fmt_bytes, fmt_number, html_table, short_id

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.flight as flight

    from intertie._rpc import Credentials

logger = logging.getLogger(__name__)

# Batches of this many rows when a table is uploaded (bounded memory per message).
UPLOAD_BATCH_ROWS = 64 * 1024


@dataclass(frozen=True)
class DatasetRef:
    """A dataset at a site. Picklable; pass it around instead of the data."""

    id: str
    name: str
    site: str
    num_rows: int
    num_bytes: int
    schema_ipc: bytes  # the Arrow schema, IPC-serialized
    origin: str = ""  # in a site's listing: where a replica was pulled from ("" for the original)

    @property
    def schema(self) -> pa.Schema:
        import pyarrow as pa

        return pa.ipc.read_schema(pa.py_buffer(self.schema_ipc))

    @classmethod
    def from_json(cls, data: bytes) -> DatasetRef:
        meta = json.loads(data)
        return cls(id=meta["id"], name=meta["name"], site=meta["site"], num_rows=int(meta["num_rows"]),
                   num_bytes=int(meta["num_bytes"]), schema_ipc=bytes.fromhex(meta["schema"]),
                   origin=str(meta.get("origin") or ""))

    def __repr__(self) -> str:
        copy = f", replica of {self.origin}" if self.origin else ""
        return (f"<DatasetRef {clip(self.name, 60)!r} at {self.site}: {fmt_number(self.num_rows)} rows, "
                f"{fmt_bytes(self.num_bytes)}, id {short_id(self.id)}{copy}>")

    # One row of a table in Jupyter; a list of refs (``fed.datasets()``) is one table.
    _table_headers: ClassVar[tuple[str, ...]] = ("name", "site", "rows", "size", "id", "replica of")

    def _table_row(self) -> tuple[Cell, ...]:
        return (self.name, self.site, fmt_number(self.num_rows), fmt_bytes(self.num_bytes),
                (short_id(self.id), self.id), self.origin)

    def _repr_html_(self) -> str:
        return html_table(self._table_headers, [self._table_row()])


def _translate(exc: Exception, what: str) -> errors.IntertieError:
    import pyarrow.flight as flight

    text = str(exc)
    for kind, cls in (("ERROR_KIND_UNAUTHENTICATED", errors.AuthenticationError),
                      ("ERROR_KIND_NOT_FOUND", errors.DatasetNotFoundError),
                      ("ERROR_KIND_INVALID_ARGUMENT", errors.InvalidRequestError),
                      ("ERROR_KIND_PAYLOAD_TOO_LARGE", errors.PayloadTooLargeError),
                      ("ERROR_KIND_QUOTA_EXCEEDED", errors.QuotaExceededError),
                      ("ERROR_KIND_PERMISSION_DENIED", errors.PermissionDeniedError)):
        if kind in text:
            message = text.split(kind + ": ", 1)[-1].split(". Detail:", 1)[0].strip()
            return cls(message)
    if isinstance(exc, (flight.FlightUnavailableError, flight.FlightTimedOutError, ConnectionError)):
        return errors.SiteUnavailableError(f"{what}: {text.removeprefix('ERROR_KIND_SITE_FAILURE: ')}")
    return errors.IntertieError(f"{what}: {text}")


def as_reader(data: Any) -> pa.RecordBatchReader:
    """A RecordBatchReader over a Table, a RecordBatchReader, or a path/fsspec URL of
    Parquet, Arrow IPC (.arrow/.feather/.ipc) or CSV."""
    import pyarrow as pa

    if isinstance(data, pa.Table):
        return pa.RecordBatchReader.from_batches(data.schema, data.to_batches(max_chunksize=UPLOAD_BATCH_ROWS))
    if isinstance(data, pa.RecordBatchReader):
        return data
    if isinstance(data, (str, bytes)) or hasattr(data, "__fspath__"):
        import os

        import pyarrow.dataset as ds

        path = os.fspath(data) if not isinstance(data, str) else data
        lowered = str(path).lower()
        fmt = ("parquet" if lowered.endswith((".parquet", ".pq")) else
               "csv" if lowered.endswith((".csv", ".csv.gz")) else
               "ipc" if lowered.endswith((".arrow", ".feather", ".ipc")) else None)
        if fmt is None:
            raise errors.InvalidRequestError(f"{path}: expected a .parquet, .arrow/.feather/.ipc or .csv file")
        import fsspec

        fs, root = fsspec.core.url_to_fs(str(path))
        try:
            dataset = ds.dataset(root, format=fmt, filesystem=fs)
            return dataset.scanner(batch_size=UPLOAD_BATCH_ROWS).to_reader()
        except (OSError, pa.ArrowInvalid) as exc:
            raise errors.InvalidRequestError(f"cannot read {path} as {fmt}: {exc}") from None
    raise errors.InvalidRequestError(
        f"put_dataset takes a pyarrow.Table, a RecordBatchReader or a file path/URL, not {type(data).__name__}")


_SUFFIXES = (".csv.gz", ".parquet", ".pq", ".csv", ".arrow", ".feather", ".ipc")
_NOT_IN_NAMES = re.compile(r"[^A-Za-z0-9._-]+")


def name_for(data: Any) -> str | None:
    """The name a file or folder put without one gets: its base name without the format's
    suffix, in the characters dataset names allow ("sales 2024.parquet" -> "sales_2024");
    None for data that is not a path."""
    if not (isinstance(data, str) or hasattr(data, "__fspath__")):
        return None
    base = os.fspath(data).rstrip("/").rsplit("/", 1)[-1]
    lowered = base.lower()
    for suffix in _SUFFIXES:
        if lowered.endswith(suffix):
            base = base[:-len(suffix)]
            break
    name = _NOT_IN_NAMES.sub("_", base).lstrip("._-")[:128]
    return name or None


class DatasetClient:
    """Flight clients per site address, opened lazily, with the connection's credentials:
    TLS verified with its CA, and its token in every call (then only the home's is called;
    see the module doc)."""

    def __init__(self, resolve: Callable[[str | None], tuple[str, str]],
                 credentials: Credentials | None = None) -> None:
        import pyarrow.flight as flight

        from intertie._rpc import Credentials  # not at the top: workers import this module, without grpc

        self._resolve = resolve  # site id (None: home) -> (site id, flight address)
        self._credentials = credentials or Credentials()
        self._clients: dict[str, flight.FlightClient] = {}
        self._options = flight.FlightCallOptions(headers=[
            (k.encode(), v.encode()) for k, v in self._credentials.metadata()])

    def _open(self, address: str) -> flight.FlightClient:
        import pyarrow.flight as flight

        client = self._clients.get(address)
        if client is None:
            ca = self._credentials.tls_ca
            client = self._clients[address] = (flight.FlightClient(f"grpc+tls://{address}", tls_root_certs=ca)
                                               if ca is not None else flight.FlightClient(f"grpc://{address}"))
        return client

    def _client(self, site: str | None) -> tuple[str, flight.FlightClient, str]:
        """(the site the call is about, a client of the endpoint to call, the site to name in
        the request: "" when that endpoint is the site's own)."""
        site_id, address = self._resolve(site)
        away = ""
        if self._credentials.token and site is not None:
            home, address = self._resolve(None)
            away = "" if site_id == home else site_id
        if not address:
            raise errors.SiteUnavailableError(f"site {site_id!r} serves no datasets")
        return site_id, self._open(address), away

    def put(self, data: Any, name: str | None, site: str | None,
            progress: Callable[[int, int], None] | None = None, *, replace: bool = False) -> DatasetRef:
        import pyarrow.flight as flight

        reader = as_reader(data)
        site_id, client, away = self._client(site)
        name = name or name_for(data)
        descriptor = flight.FlightDescriptor.for_command(
            json.dumps({"name": name or "", "replace": replace, **({"site": away} if away else {})}).encode())
        try:
            writer, metadata = client.do_put(descriptor, reader.schema, self._options)
            rows = sent = 0
            with writer:
                for batch in reader:
                    writer.write_batch(batch)
                    rows += batch.num_rows
                    sent += batch.nbytes
                    if progress is not None:
                        progress(rows, sent)
                writer.done_writing()
                answer = metadata.read()
        except flight.FlightError as exc:
            raise _translate(exc, f"upload to site {site_id}") from None
        if answer is None:
            raise errors.IntertieError(f"site {site_id} did not confirm the upload")
        return DatasetRef.from_json(answer.to_pybytes())

    def get(self, ref: DatasetRef | str, site: str | None = None,
            progress: Callable[[int, int], None] | None = None) -> pa.Table:
        import pyarrow as pa
        import pyarrow.flight as flight

        key, where = (ref.id, ref.site) if isinstance(ref, DatasetRef) else (ref, site)
        site_id, client, away = self._client(where)
        ticket = json.dumps({"id": key, "site": away}).encode() if away else key.encode()
        try:
            reader = client.do_get(flight.Ticket(ticket), self._options)
            batches = []
            rows = got = 0
            for chunk in reader:
                batches.append(chunk.data)
                rows += chunk.data.num_rows
                got += chunk.data.nbytes
                if progress is not None:
                    progress(rows, got)
            return pa.Table.from_batches(batches, schema=reader.schema)
        except flight.FlightError as exc:
            raise _translate(exc, f"download from site {site_id}") from None

    def list(self, site: str | None = None) -> list[DatasetRef]:
        import pyarrow.flight as flight

        site_id, client, away = self._client(site)
        try:
            return [DatasetRef.from_json(info.descriptor.command)
                    for info in client.list_flights(_criteria(away), options=self._options)]
        except flight.FlightError as exc:
            raise _translate(exc, f"listing datasets at site {site_id}") from None

    def list_all(self, sites: Iterable[tuple[str, str]]) -> builtins.list[DatasetRef]:
        """The datasets of every (site id, Flight address) given, site by site (replicas
        included: their ``origin`` says where they came from). A site that does not answer
        is skipped with a warning: the listing shows what can be reached."""
        import pyarrow.flight as flight

        home, home_address = self._resolve(None) if self._credentials.token else ("", "")
        out: builtins.list[DatasetRef] = []
        for site_id, address in sites:
            away = site_id if home and site_id != home else ""
            try:
                out.extend(DatasetRef.from_json(info.descriptor.command)
                           for info in self._open(home_address or address).list_flights(
                               _criteria(away), options=self._options))
            except flight.FlightError as exc:
                error = _translate(exc, f"listing datasets at site {site_id}")
                if not isinstance(error, errors.SiteUnavailableError):
                    raise error from None
                logger.warning("%s; its datasets are not listed", error)
        return out

    def action(self, kind: str, ref: DatasetRef | str, site: str | None = None) -> DatasetRef:
        import pyarrow.flight as flight

        key, where = (ref.id, ref.site) if isinstance(ref, DatasetRef) else (ref, site)
        site_id, client, away = self._client(where)
        body = json.dumps({"key": key, "site": away}).encode() if away else key.encode()
        try:
            results: Iterator[Any] = client.do_action(flight.Action(kind, body), self._options)
            return DatasetRef.from_json(next(iter(results)).body.to_pybytes())
        except flight.FlightError as exc:
            raise _translate(exc, f"{kind} of dataset {key!r} at site {site_id}") from None

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()


def _criteria(away: str) -> bytes:
    """``list_flights`` criteria: the site whose datasets the home lists for the tenant."""
    return json.dumps({"site": away}).encode() if away else b""


def map_refs(args: tuple[Any, ...], kwargs: dict[str, Any],
             fn: Callable[[DatasetRef], Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A call's ``(args, kwargs)`` with each DatasetRef replaced by ``fn(ref)``, in order:
    at the top level, and one level inside lists, tuples and dict values (where a task
    finds them as tables). Those containers are rebuilt as plain lists, tuples and dicts."""
    def one(value: Any) -> Any:
        return fn(value) if isinstance(value, DatasetRef) else value

    def swap(value: Any) -> Any:
        if isinstance(value, DatasetRef):
            return fn(value)
        if isinstance(value, list):
            return [one(v) for v in value]
        if isinstance(value, tuple):
            return tuple(one(v) for v in value)
        if isinstance(value, dict):
            return {k: one(v) for k, v in value.items()}
        return value

    return tuple(swap(a) for a in args), {k: swap(v) for k, v in kwargs.items()}


def refs_in(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[DatasetRef]:
    """The DatasetRefs among a call's arguments (as :func:`map_refs` finds them), once each."""
    found: dict[str, DatasetRef] = {}
    map_refs(args, kwargs, lambda ref: found.setdefault(ref.id, ref))
    return list(found.values())
