"""Datasets at a site: Arrow IPC files under an fsspec URL, served over Arrow Flight.

Each dataset is two objects under the store's root: ``<id>.arrow`` (an Arrow IPC file,
written as ``<id>.arrow.part`` and renamed when complete) and ``<id>.json`` (its
metadata, written last). A dataset exists once its metadata does, so a crash in the
middle of an upload leaves at most a ``.part`` file, removed at the next start.

Flight surface (the gateway never unpickles anything here; it is all Arrow):
- ``do_put`` with descriptor command ``{"name": ...}``: stores a stream of record
  batches; answers with the dataset's metadata as JSON in the put result.
- ``do_get`` with ticket = dataset id or name: streams the batches back.
- ``list_flights``: one FlightInfo per dataset (its metadata JSON in the descriptor).
- actions ``get`` (metadata of an id or name) and ``delete``.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.flight as flight
from fsspec.implementations.local import LocalFileSystem

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass
class DatasetMeta:
    id: str
    name: str
    site: str
    num_rows: int
    num_bytes: int
    created_at: float
    schema: str  # the Arrow schema, IPC-serialized, hex

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()


class DatasetError(Exception):
    """A dataset request that cannot be served; ``kind`` is an intertie.v1 ErrorKind name."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class DatasetStore:
    """Arrow IPC datasets under an fsspec URL (a local folder, ``memory://``, object stores)."""

    def __init__(self, url: str, site_id: str, *, quota_bytes: int = 0) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.url = url
        self.site_id = site_id
        self.quota_bytes = quota_bytes
        self._lock = threading.Lock()
        self.fs.makedirs(self.root, exist_ok=True)
        self._meta: dict[str, DatasetMeta] = {}
        for path in self.fs.glob(f"{self.root}/*.arrow.part"):
            logger.info("removing an unfinished upload: %s", path)
            self.fs.rm(path)
        for path in self.fs.glob(f"{self.root}/*.json"):
            try:
                with self.fs.open(path, "rb") as fh:
                    meta = DatasetMeta(**json.loads(fh.read()))
            except Exception as exc:
                logger.error("ignoring unreadable dataset metadata %s: %s", path, exc)
                continue
            self._meta[meta.id] = meta

    def _path(self, dataset_id: str, suffix: str) -> str:
        return f"{self.root}/{dataset_id}.{suffix}"

    def used_bytes(self) -> int:
        return sum(m.num_bytes for m in self._meta.values())

    def listing(self) -> list[DatasetMeta]:
        with self._lock:
            return sorted(self._meta.values(), key=lambda m: m.created_at)

    def resolve(self, key: str) -> DatasetMeta:
        """A dataset by id, or by name (the newest of that name)."""
        with self._lock:
            meta = self._meta.get(key)
            if meta is None:
                named = [m for m in self._meta.values() if m.name == key]
                meta = max(named, key=lambda m: m.created_at) if named else None
        if meta is None:
            raise DatasetError("ERROR_KIND_NOT_FOUND", f"site {self.site_id!r} has no dataset {key!r}")
        return meta

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._meta)

    def location(self, dataset_id: str) -> str | None:
        """Where a worker on this machine reads the dataset: a local path, or an fsspec URL."""
        with self._lock:
            if dataset_id not in self._meta:
                return None
        path = self._path(dataset_id, "arrow")
        if isinstance(self.fs, LocalFileSystem):
            return path
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return f"{protocol}://{path}"

    def pull(self, dataset_id: str, address: str) -> DatasetMeta:
        """Copies a dataset from another site's Flight endpoint, keeping its id (a replica)."""
        client = flight.FlightClient(f"grpc://{address}")
        try:
            info = next(iter(client.do_action(flight.Action("get", dataset_id.encode()))))
            name = json.loads(info.body.to_pybytes())["name"]
            return self.write(name, client.do_get(flight.Ticket(dataset_id.encode())), dataset_id=dataset_id)
        finally:
            client.close()

    def write(self, name: str, reader: Any, dataset_id: str | None = None) -> DatasetMeta:
        """Stores a stream of record batches (``reader.read_chunk()`` or iteration)."""
        if name and not _NAME.match(name):
            raise DatasetError("ERROR_KIND_INVALID_ARGUMENT",
                               f"dataset name {name!r}: use 1-128 letters, digits, '.', '_' or '-'")
        dataset_id = dataset_id or uuid.uuid4().hex
        part = self._path(dataset_id, "arrow.part")
        rows = nbytes = 0
        schema = reader.schema
        try:
            with self.fs.open(part, "wb") as fh, pa.ipc.new_file(fh, schema) as writer:
                for batch in _batches(reader):
                    rows += batch.num_rows
                    nbytes += batch.nbytes
                    if self.quota_bytes and self.used_bytes() + nbytes > self.quota_bytes:
                        raise DatasetError("ERROR_KIND_PAYLOAD_TOO_LARGE",
                                           f"site {self.site_id!r}: the dataset would exceed the site's quota of "
                                           f"{self.quota_bytes} bytes ({self.used_bytes()} in use)")
                    writer.write_batch(batch)
            self.fs.mv(part, self._path(dataset_id, "arrow"))
        except BaseException:
            if self.fs.exists(part):
                self.fs.rm(part)
            raise
        meta = DatasetMeta(id=dataset_id, name=name or dataset_id, site=self.site_id, num_rows=rows,
                           num_bytes=nbytes, created_at=time.time(), schema=schema.serialize().to_pybytes().hex())
        with self.fs.open(self._path(dataset_id, "json"), "wb") as fh:
            fh.write(meta.to_json())  # the dataset exists from here on
        with self._lock:
            self._meta[dataset_id] = meta
        return meta

    def open(self, key: str) -> tuple[DatasetMeta, pa.ipc.RecordBatchFileReader]:
        meta = self.resolve(key)
        path = self._path(meta.id, "arrow")
        if isinstance(self.fs, LocalFileSystem):
            source: Any = pa.memory_map(path)  # zero copy for local files
        else:
            source = pa.BufferReader(self.fs.cat_file(path))
        return meta, pa.ipc.open_file(source)

    def delete(self, key: str) -> DatasetMeta:
        meta = self.resolve(key)
        with self._lock:
            self._meta.pop(meta.id, None)
        self.fs.rm(self._path(meta.id, "json"))  # gone from here on
        if self.fs.exists(self._path(meta.id, "arrow")):
            self.fs.rm(self._path(meta.id, "arrow"))
        return meta


def _batches(reader: Any) -> Any:
    if hasattr(reader, "read_chunk"):  # a Flight reader
        while True:
            try:
                chunk = reader.read_chunk()
            except StopIteration:
                return
            if chunk.data is not None:
                yield chunk.data
    else:
        yield from reader


class FlightService(flight.FlightServerBase):  # type: ignore[misc]
    """The site's dataset endpoint (its own port, in the site's status as flight_address)."""

    def __init__(self, location: str, store: DatasetStore) -> None:
        super().__init__(location)
        self.store = store

    def _fail(self, exc: DatasetError) -> Exception:
        # The client maps the kind prefix onto the Intertie error hierarchy.
        return flight.FlightServerError(f"{exc.kind}: {exc}")

    def do_put(self, context: Any, descriptor: flight.FlightDescriptor, reader: Any, writer: Any) -> None:
        try:
            request = json.loads(descriptor.command or b"{}")
            if not isinstance(request, dict):
                raise ValueError("expected a JSON object")
        except ValueError as exc:
            raise flight.FlightServerError(f"ERROR_KIND_INVALID_ARGUMENT: bad put descriptor: {exc}") from None
        try:
            meta = self.store.write(str(request.get("name") or ""), reader)
        except DatasetError as exc:
            raise self._fail(exc) from None
        writer.write(pa.py_buffer(meta.to_json()))
        logger.info("stored dataset %s (%s): %d rows, %d bytes", meta.id, meta.name, meta.num_rows, meta.num_bytes)

    def do_get(self, context: Any, ticket: flight.Ticket) -> flight.RecordBatchStream:
        try:
            _, file_reader = self.store.open(ticket.ticket.decode())
        except DatasetError as exc:
            raise self._fail(exc) from None
        batches = (file_reader.get_batch(i) for i in range(file_reader.num_record_batches))
        return flight.GeneratorStream(file_reader.schema, batches)

    def list_flights(self, context: Any, criteria: bytes) -> Any:
        for meta in self.store.listing():
            schema = pa.ipc.read_schema(pa.py_buffer(bytes.fromhex(meta.schema)))
            yield flight.FlightInfo(schema, flight.FlightDescriptor.for_command(meta.to_json()),
                                    [flight.FlightEndpoint(meta.id, [])], meta.num_rows, meta.num_bytes)

    def do_action(self, context: Any, action: flight.Action) -> Any:
        key = action.body.to_pybytes().decode()
        try:
            if action.type == "get":
                meta = self.store.resolve(key)
            elif action.type == "delete":
                meta = self.store.delete(key)
            else:
                raise DatasetError("ERROR_KIND_INVALID_ARGUMENT", f"unknown action {action.type!r}")
        except DatasetError as exc:
            raise self._fail(exc) from None
        yield flight.Result(pa.py_buffer(meta.to_json()))

    def list_actions(self, context: Any) -> list[tuple[str, str]]:
        return [("get", "metadata of a dataset (id or name)"), ("delete", "delete a dataset (id or name)")]
