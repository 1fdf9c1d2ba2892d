"""Datasets at a site: Arrow IPC files under an fsspec URL, served over Arrow Flight.

Each dataset is two objects under the store's root: ``<id>.arrow`` (an Arrow IPC file,
written as ``<id>.arrow.part`` and renamed when complete) and ``<id>.json`` (its
metadata, written last). A dataset exists once its metadata does, so a crash in the
middle of an upload leaves at most a ``.part`` file, removed at the next start.

A dataset is a *primary* (uploaded here, or a task result stored here) or a *replica*
(pulled from another site for a task that ran here, same id). Replicas are a cache:
bounded by ``replica_cache_bytes``, the least recently used one is evicted first, and
never one a task is reading. The quota bounds primaries only.

Flight surface (the gateway never unpickles anything here; it is all Arrow):
- ``do_put`` with descriptor command ``{"name": ..., "id": ...}`` (the id is optional;
  a task's stored result names its own, so a rerun replaces it): stores a stream of
  record batches; answers with the dataset's metadata as JSON in the put result.
- ``do_get`` with ticket = dataset id or name, or ``{"id": ..., "from_batch": k}`` to
  resume an interrupted transfer at batch k: streams the batches back.
- ``list_flights``: one FlightInfo per dataset (its metadata JSON in the descriptor).
- actions ``get`` (metadata of an id or name), ``delete`` (which also asks the up
  peers to drop their replicas) and ``delete-replica``.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.flight as flight
from fsspec.implementations.local import LocalFileSystem

from intertie_gateway.throttle import log_throttled
from intertie_gateway.validate import clip

logger = logging.getLogger(__name__)

# A peer that does not answer a replica deletion in this time keeps its copy until it
# is evicted from its cache.
REPLICA_DELETE_TIMEOUT_S = 5.0

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
    origin: str = ""  # for a replica: the site it was pulled from; "" for a primary

    @property
    def replica(self) -> bool:
        return bool(self.origin)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()


class DatasetError(Exception):
    """A dataset request that cannot be served; ``kind`` is an intertie.v1 ErrorKind name."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class DatasetStore:
    """Arrow IPC datasets under an fsspec URL (a local folder, ``memory://``, object stores)."""

    def __init__(self, url: str, site_id: str, *, quota_bytes: int = 0, replica_cache_bytes: int = 0) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.url = url
        self.site_id = site_id
        self.quota_bytes = quota_bytes
        self.replica_cache_bytes = replica_cache_bytes  # 0: no bound
        self._lock = threading.Lock()
        self._used_at: dict[str, float] = {}  # last read, for eviction of replicas (not persisted)
        self._closing = threading.Event()  # set at shutdown: transfers under way give up
        self.fs.makedirs(self.root, exist_ok=True)
        self._meta: dict[str, DatasetMeta] = {}
        for path in self.fs.glob(f"{self.root}/*.part"):
            logger.info("removing an unfinished upload: %s", path)
            self.fs.rm(path)
        for path in self.fs.glob(f"{self.root}/*.json"):
            try:
                with self.fs.open(path, "rb") as fh:
                    raw = json.loads(fh.read())
                    meta = DatasetMeta(**{f.name: raw[f.name] for f in fields(DatasetMeta) if f.name in raw})
            except Exception as exc:
                logger.error("ignoring unreadable dataset metadata %s: %s", path, exc)
                continue
            self._meta[meta.id] = meta
            self._used_at[meta.id] = meta.created_at
        for path in self.fs.glob(f"{self.root}/*.arrow"):  # data whose metadata never got written
            if path.rsplit("/", 1)[-1][:-len(".arrow")] not in self._meta:
                logger.info("removing data of an unfinished dataset: %s", path)
                self.fs.rm(path)

    def _path(self, dataset_id: str, suffix: str) -> str:
        return f"{self.root}/{dataset_id}.{suffix}"

    def used_bytes(self, *, replicas: bool = False) -> int:
        """Bytes of primaries (what the quota bounds), or of replicas."""
        return sum(m.num_bytes for m in list(self._meta.values()) if m.replica == replicas)

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
            raise DatasetError("ERROR_KIND_NOT_FOUND", f"site {self.site_id!r} has no dataset {clip(key)!r}")
        return meta

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._meta)

    @property
    def local(self) -> bool:
        """Whether workers on this machine can memory-map the files (else they read over Flight)."""
        return isinstance(self.fs, LocalFileSystem)

    def close(self) -> None:
        """Stops transfers under way (at their next batch or retry) so the gateway can stop."""
        self._closing.set()

    def _sink(self, path: str) -> Any:
        """A file to write Arrow IPC into: a native one for a local folder (no Python in
        the write path), else the filesystem's."""
        return pa.OSFile(path, "wb") if self.local else self.fs.open(path, "wb")

    def location(self, dataset_id: str) -> str | None:
        """The local path a worker memory-maps ("" when the store is not a local folder:
        the worker then reads over Flight); None when the dataset is not here."""
        with self._lock:
            if dataset_id not in self._meta:
                return None
            self._used_at[dataset_id] = time.time()
        return self._path(dataset_id, "arrow") if self.local else ""

    def touch(self, dataset_ids: Collection[str]) -> None:
        """Datasets read meanwhile (told by the gateway, which finds local files itself)."""
        now = time.time()
        with self._lock:
            for dataset_id in dataset_ids:
                if dataset_id in self._meta:
                    self._used_at[dataset_id] = now

    def pull(self, dataset_id: str, sources: Callable[[], Sequence[tuple[str, str]]], *,
             timeout_s: float = 120.0, retry_s: float = 0.5) -> DatasetMeta:
        """Copies a dataset from other sites' Flight endpoints, keeping its id (a replica).

        ``sources()`` gives (site id, Flight address) of the sites that hold it, best first;
        it is asked again after each failure. An interrupted transfer resumes at the next
        batch, from the same or another source (replicas keep their holder's batches), and
        is retried with backoff until no batch has arrived for ``timeout_s``. What a peer
        sends is validated like an upload: a site that sends invalid data is not asked
        again, and when every holder did, the pull fails at once."""
        if not _NAME.match(dataset_id):
            raise DatasetError("ERROR_KIND_INVALID_ARGUMENT", f"dataset id {clip(dataset_id)!r} is not valid")
        part = self._path(dataset_id, "arrow.part")
        deadline = time.monotonic() + timeout_s
        delay = retry_s
        done = 0  # batches received so far
        rows = 0
        expected: tuple[str, int] | None = None  # the holder's name and row count
        fh: Any = None
        writer: Any = None
        schema: pa.Schema | None = None
        failures: list[str] = []
        refused: dict[str, str] = {}  # site -> why: sent data that is not valid
        watch = _Watchdog(timeout_s, self._closing)
        try:
            while True:
                asked = missing = 0
                for site, address in sources():
                    if site in refused:
                        continue
                    asked += 1
                    client = flight.FlightClient(f"grpc://{address}")
                    try:
                        if expected is None:
                            info = next(iter(client.do_action(flight.Action("get", dataset_id.encode()))), None)
                            expected = _peer_meta(info.body.to_pybytes() if info is not None else b"", dataset_id)
                        ticket = json.dumps({"id": dataset_id, "from_batch": done}).encode()
                        reader = client.do_get(flight.Ticket(ticket))
                        watch.reader = reader
                        incoming = _checked_schema(_arrow_call(functools.partial(getattr, reader, "schema"),
                                                                f"{site}'s stream"))
                        if schema is None:
                            schema = incoming
                            fh = self._sink(part)
                            writer = pa.ipc.new_file(fh, schema)
                        elif not incoming.equals(schema):
                            raise DatasetError("ERROR_KIND_INVALID_ARGUMENT",
                                               "its copy has another schema than the batches already here")
                        if done:
                            logger.info("resuming the transfer of dataset %s at batch %d from %s", dataset_id,
                                        done, site)
                        while True:
                            try:
                                chunk = _arrow_call(reader.read_chunk, f"{site}'s stream")
                            except StopIteration:
                                break
                            if self._closing.is_set():
                                raise DatasetError("ERROR_KIND_SITE_FAILURE",
                                                   f"site {self.site_id!r} stopped during the transfer")
                            if chunk.data is None:
                                continue
                            where = f"dataset {dataset_id} from {site}, batch {done}"
                            _check_batch(chunk.data, schema, where)
                            _write_batch(writer, chunk.data, where)
                            deadline = time.monotonic() + timeout_s  # progress: a stall is what times out
                            watch.progress()
                            done += 1
                            rows += chunk.data.num_rows
                        if rows != expected[1]:
                            raise DatasetError("ERROR_KIND_INVALID_ARGUMENT",
                                               f"{rows} rows arrived, {expected[1]} expected")
                        writer.close()
                        fh.close()
                        writer = fh = None
                        nbytes = self.fs.size(part)
                        self.fs.mv(part, self._path(dataset_id, "arrow"))
                        return self._commit(dataset_id, expected[0], rows, nbytes, schema, origin=site)
                    except DatasetError as exc:
                        if exc.kind != "ERROR_KIND_INVALID_ARGUMENT":
                            raise
                        refused[site] = str(exc)
                        logger.error("site %s sent dataset %s as invalid data; not asking it again: %s", site,
                                     dataset_id, exc)
                    except flight.FlightError as exc:
                        if "ERROR_KIND_NOT_FOUND" in str(exc):
                            failures.append(f"{site}: does not hold it")
                            missing += 1
                        else:
                            failures.append(f"{site}: {_first_line(exc)}")
                        logger.warning("pulling dataset %s from %s stopped after %d batches: %s", dataset_id, site,
                                       done, _first_line(exc))
                    finally:
                        watch.reader = None
                        client.close()
                if not asked and refused:  # every holder left sent data that is not valid
                    raise DatasetError("ERROR_KIND_SITE_FAILURE", f"dataset {dataset_id} could not be fetched to site "
                                       f"{self.site_id!r}: " + "; ".join(f"{k} sent invalid data ({v})"
                                                                         for k, v in refused.items()))
                if asked and missing == asked:  # deleted everywhere it was: waiting brings nothing
                    raise DatasetError("ERROR_KIND_DATASET_NOT_FOUND",
                                       f"dataset {dataset_id} is not at site {self.site_id!r}, and no site holds it "
                                       f"any more ({'; '.join(failures[-asked:])})")
                if time.monotonic() + delay > deadline:
                    tried = "; ".join(dict.fromkeys(failures[-6:])) or "no site that holds it is reachable"
                    raise DatasetError("ERROR_KIND_SITE_FAILURE",
                                       f"dataset {dataset_id} could not be fetched to site {self.site_id!r} "
                                       f"(nothing arrived for {timeout_s:.0f} s; {done} batches before): {tried}")
                if self._closing.wait(delay):
                    raise DatasetError("ERROR_KIND_SITE_FAILURE", f"site {self.site_id!r} stopped during the transfer")
                delay = min(delay * 2, 5.0)
        finally:
            watch.stop()
            if writer is not None:
                _quietly(writer.close)
                _quietly(fh.close)
            if self.fs.exists(part):
                self.fs.rm(part)

    def write(self, name: str, reader: Any, dataset_id: str | None = None) -> DatasetMeta:
        """Stores a stream of record batches (``reader.read_chunk()`` or iteration) as a
        primary; a given id replaces the dataset of that id (a rerun task's result).

        Every batch is validated in full before it is written (the stream comes from the
        network: a bad offset would crash Arrow's writer or, stored, every reader); the size
        recorded is what was written, not what the batches claim."""
        if name and not _NAME.match(name):
            raise DatasetError("ERROR_KIND_INVALID_ARGUMENT",
                               f"dataset name {clip(name)!r}: use 1-128 letters, digits, '.', '_' or '-'")
        if dataset_id is not None and not _NAME.match(dataset_id):
            raise DatasetError("ERROR_KIND_INVALID_ARGUMENT",
                               f"dataset id {clip(dataset_id)!r}: use 1-128 letters, digits, '.', '_' or '-'")
        dataset_id = dataset_id or uuid.uuid4().hex
        part = self._path(dataset_id, f"{uuid.uuid4().hex[:8]}.arrow.part")
        rows = 0
        previous = self._meta.get(dataset_id)
        in_use = self.used_bytes() - (previous.num_bytes if previous is not None and not previous.replica else 0)
        try:
            schema = _checked_schema(_arrow_call(lambda: reader.schema, "the stream's schema"))
            with self._sink(part) as fh, pa.ipc.new_file(fh, schema) as writer:
                for batch in _batches(reader):
                    _check_batch(batch, schema, f"dataset {dataset_id}, batch after row {rows}")
                    _write_batch(writer, batch, f"dataset {dataset_id}, batch after row {rows}")
                    rows += batch.num_rows
                    if self.quota_bytes and in_use + fh.tell() > self.quota_bytes:
                        raise DatasetError("ERROR_KIND_PAYLOAD_TOO_LARGE",
                                           f"site {self.site_id!r}: the dataset would exceed the site's quota of "
                                           f"{self.quota_bytes} bytes ({in_use} in use)")
            nbytes = self.fs.size(part)
            self.fs.mv(part, self._path(dataset_id, "arrow"))
        except BaseException:
            if self.fs.exists(part):
                self.fs.rm(part)
            raise
        return self._commit(dataset_id, name or dataset_id, rows, nbytes, schema)

    def _commit(self, dataset_id: str, name: str, rows: int, nbytes: int, schema: pa.Schema,
                origin: str = "") -> DatasetMeta:
        meta = DatasetMeta(id=dataset_id, name=name, site=self.site_id, num_rows=rows, num_bytes=nbytes,
                           created_at=time.time(), schema=schema.serialize().to_pybytes().hex(), origin=origin)
        part = self._path(dataset_id, f"{uuid.uuid4().hex[:8]}.json.part")
        with self.fs.open(part, "wb") as fh:
            fh.write(meta.to_json())
        self.fs.mv(part, self._path(dataset_id, "json"))  # whole: the dataset exists from here on
        with self._lock:
            self._meta[dataset_id] = meta
            self._used_at[dataset_id] = meta.created_at
        return meta

    def evict(self, keep: Collection[str] = ()) -> list[DatasetMeta]:
        """Drops least recently used replicas (none in ``keep``) until the replicas fit
        ``replica_cache_bytes``; returns what it dropped."""
        if not self.replica_cache_bytes:
            return []
        with self._lock:
            replicas = sorted((m for m in self._meta.values() if m.replica and m.id not in keep),
                              key=lambda m: self._used_at.get(m.id, 0.0))
        over = self.used_bytes(replicas=True) - self.replica_cache_bytes
        dropped = []
        for meta in replicas:
            if over <= 0:
                break
            with self._lock:
                current = self._meta.get(meta.id)
            if current is None or not current.replica:  # deleted or replaced meanwhile
                continue
            self.delete(meta.id)
            over -= meta.num_bytes
            dropped.append(meta)
            logger.info("evicted replica %s (%s, %d bytes) from the cache", meta.id, meta.name, meta.num_bytes)
        return dropped

    def open(self, key: str) -> tuple[DatasetMeta, pa.ipc.RecordBatchFileReader]:
        meta = self.resolve(key)
        with self._lock:
            self._used_at[meta.id] = time.time()
        path = self._path(meta.id, "arrow")
        if isinstance(self.fs, LocalFileSystem):
            source: Any = pa.memory_map(path)  # zero copy for local files
        else:
            source = pa.BufferReader(self.fs.cat_file(path))
        return meta, pa.ipc.open_file(source)

    def delete(self, key: str) -> DatasetMeta:
        meta = self.resolve(key)
        with self._lock:
            if self._meta.pop(meta.id, None) is None:  # deleted meanwhile (another thread)
                return meta
            self._used_at.pop(meta.id, None)
        for suffix in ("json", "arrow"):  # the metadata first: gone from here on
            try:
                self.fs.rm(self._path(meta.id, suffix))
            except FileNotFoundError:
                pass
        return meta


class _Watchdog:
    """Cancels a transfer's stream when no batch has arrived for ``stall_s`` or the store is
    closing: a peer that hangs (half-open connection, frozen process) sends no error."""

    def __init__(self, stall_s: float, closing: threading.Event) -> None:
        self.reader: Any = None
        self._stall_s = stall_s
        self._last = time.monotonic()
        self._done = threading.Event()
        self._closing = closing
        threading.Thread(target=self._run, name="intertie-pull-watch", daemon=True).start()

    def progress(self) -> None:
        self._last = time.monotonic()

    def stop(self) -> None:
        self._done.set()

    def _run(self) -> None:
        while not self._done.wait(min(1.0, self._stall_s / 4)):
            reader = self.reader
            if reader is not None and (self._closing.is_set() or time.monotonic() - self._last > self._stall_s):
                logger.warning("a dataset transfer stalled for %.0f s (or the site is stopping): cancelling it",
                               time.monotonic() - self._last)
                _quietly(reader.cancel)
                self._last = time.monotonic()


def _peer_meta(body: bytes, dataset_id: str) -> tuple[str, int]:
    """(name, rows) from a holder's answer to ``get``; anything else is invalid data."""
    try:
        meta = json.loads(body)
    except (ValueError, RecursionError):
        meta = None
    if not isinstance(meta, dict) or meta.get("id") != dataset_id or not isinstance(meta.get("num_rows"), int) \
            or meta["num_rows"] < 0:
        raise DatasetError("ERROR_KIND_INVALID_ARGUMENT", "its metadata of the dataset is not valid")
    name = meta.get("name")
    return (name if isinstance(name, str) and _NAME.match(name) else dataset_id), meta["num_rows"]


def _first_line(exc: BaseException) -> str:
    return str(exc).split("\n", 1)[0].split(". Detail:", 1)[0][:300]


def _quietly(call: Callable[[], object]) -> None:
    """Closes or cancels something that may already be broken."""
    try:
        call()
    except Exception as exc:
        logger.debug("%r: %s", call, exc)


def _batches(reader: Any) -> Any:
    """The record batches of a Flight reader (``read_chunk``) or of an iterable; a stream
    that does not decode is the sender's fault (INVALID_ARGUMENT)."""
    if hasattr(reader, "read_chunk"):  # a Flight reader
        while True:
            try:
                chunk = _arrow_call(reader.read_chunk, "the uploaded stream")
            except StopIteration:
                return
            if chunk.data is not None:
                yield chunk.data
    else:
        yield from reader


# An uploaded schema is refused past this many fields (each costs memory per batch).
MAX_FIELDS = 10_000


def _arrow_call(call: Callable[[], Any], what: str) -> Any:
    """``call()``, with Arrow's complaints about the bytes it decodes made a typed error."""
    try:
        return call()
    except (pa.ArrowException, OSError) as exc:  # pyarrow raises some decoding errors as plain OSError
        if isinstance(exc, flight.FlightError) and not isinstance(exc, flight.FlightServerError):
            raise  # the transport (cancelled, timed out, unavailable): not the data's fault
        raise DatasetError("ERROR_KIND_INVALID_ARGUMENT", f"{what} is not valid Arrow IPC: "
                           f"{clip(_first_line(exc))}") from None


def _checked_schema(schema: pa.Schema) -> pa.Schema:
    if len(schema) > MAX_FIELDS:
        raise DatasetError("ERROR_KIND_INVALID_ARGUMENT",
                           f"the schema has {len(schema)} fields, over the limit of {MAX_FIELDS}")
    # What _commit stores must read back: a schema that does not round-trip is refused now.
    _arrow_call(lambda: pa.ipc.read_schema(schema.serialize()), "the schema")
    return schema


def _write_batch(writer: Any, batch: pa.RecordBatch, where: str) -> None:
    """Appends a validated batch; what the file format cannot hold (a dictionary that
    changes between batches) is refused as the sender's, a failing disk is not."""
    try:
        writer.write_batch(batch)
    except pa.ArrowInvalid as exc:
        raise DatasetError("ERROR_KIND_INVALID_ARGUMENT",
                           f"{where} cannot be stored: {clip(_first_line(exc))}") from None


def _check_batch(batch: pa.RecordBatch, schema: pa.Schema, where: str) -> None:
    """Full validation (offsets, lengths, UTF-8, dictionary indices) of a batch from the
    network, before anything writes, counts or serves it."""
    if not batch.schema.equals(schema):
        raise DatasetError("ERROR_KIND_INVALID_ARGUMENT", f"{where}: its schema differs from the stream's")
    try:
        batch.validate(full=True)
    except pa.ArrowException as exc:
        raise DatasetError("ERROR_KIND_INVALID_ARGUMENT",
                           f"{where} is not valid Arrow data: {clip(_first_line(exc))}") from None


def _paced(batches: Iterator[pa.RecordBatch], rate: float) -> Iterator[pa.RecordBatch]:
    """Yields batches no faster than ``rate`` bytes/s (an operator's cap on what a site's
    uplink gives to one transfer)."""
    started = time.monotonic()
    sent = 0
    for batch in batches:
        ahead = sent / rate - (time.monotonic() - started)
        if ahead > 0:
            time.sleep(ahead)
        yield batch
        sent += batch.nbytes


class FlightService(flight.FlightServerBase):  # type: ignore[misc]
    """The site's dataset endpoint (its own port, in the site's status as flight_address)."""

    def __init__(self, location: str, store: DatasetStore, *, max_rate: float = 0.0,
                 peers: Callable[[], Sequence[str]] = lambda: ()) -> None:
        super().__init__(location)
        self.store = store
        self.max_rate = max_rate  # bytes/s per transfer served; 0: no limit
        self.peers = peers  # Flight addresses of the up peers, told when a primary is deleted

    def _drop_replicas(self, meta: DatasetMeta) -> int:
        """Asks every up peer to delete its replica of a deleted primary; how many did."""
        def drop(address: str) -> int:
            client = flight.FlightClient(f"grpc://{address}")
            try:
                options = flight.FlightCallOptions(timeout=REPLICA_DELETE_TIMEOUT_S)
                list(client.do_action(flight.Action("delete-replica", meta.id.encode()), options))
                return 1
            except flight.FlightError as exc:
                if "ERROR_KIND_NOT_FOUND" not in str(exc):
                    logger.warning("could not delete the replica of %s at %s: %s", meta.id, address,
                                   _first_line(exc))
                return 0
            finally:
                client.close()

        addresses = list(self.peers())
        if not addresses:
            return 0
        with ThreadPoolExecutor(min(16, len(addresses))) as pool:
            return sum(pool.map(drop, addresses))

    # Every handler answers bad input with a FlightServerError "ERROR_KIND_<KIND>: message"
    # (the SDK maps the kind onto its error hierarchy) and anything unexpected with a bounded
    # FlightInternalError. Only Flight's own exceptions reach the client without the
    # server's Python traceback attached, which pyarrow adds to every other exception (and
    # there is no Flight exception for INVALID_ARGUMENT: its gRPC status is UNKNOWN, with
    # the kind in the message).
    def _served(self, what: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except DatasetError as exc:
            raise flight.FlightServerError(f"{exc.kind}: {clip(str(exc), 1000)}") from None
        except flight.FlightError:
            raise
        except Exception as exc:
            log_throttled(logger, f"flight-{what}", "Flight %s failed: %s: %s", what, type(exc).__name__,
                          clip(str(exc)), level=logging.ERROR, exc_info=True)
            raise flight.FlightInternalError(f"ERROR_KIND_INTERNAL: site {self.store.site_id!r} could not serve "
                                             f"this {what} ({type(exc).__name__})") from None

    def do_put(self, context: Any, descriptor: flight.FlightDescriptor, reader: Any, writer: Any) -> None:
        def put() -> DatasetMeta:
            request = _json_request(descriptor.command or b"{}", "put descriptor")
            name, dataset_id = request.get("name") or "", request.get("id") or None
            if not isinstance(name, str) or not (dataset_id is None or isinstance(dataset_id, str)):
                raise DatasetError("ERROR_KIND_INVALID_ARGUMENT", "bad put descriptor: name and id must be strings")
            return self.store.write(name, reader, dataset_id=dataset_id)

        meta = self._served("put", put)
        writer.write(pa.py_buffer(meta.to_json()))
        logger.info("stored dataset %s (%s): %d rows, %d bytes", meta.id, meta.name, meta.num_rows, meta.num_bytes)

    def do_get(self, context: Any, ticket: flight.Ticket) -> flight.RecordBatchStream:
        def get() -> flight.GeneratorStream:
            key, start = ticket.ticket, 0
            if key.startswith(b"{"):
                request = _json_request(key, "ticket")
                key, start = request.get("id"), request.get("from_batch", 0)
                if not isinstance(key, str) or not isinstance(start, int) or isinstance(start, bool) or start < 0:
                    raise DatasetError("ERROR_KIND_INVALID_ARGUMENT", "bad ticket: expected {\"id\": a string, "
                                       "\"from_batch\": a whole number >= 0}")
            else:
                key = _text(key, "ticket")
            _, file_reader = self.store.open(key)
            batches: Iterator[pa.RecordBatch] = (
                file_reader.get_batch(i) for i in range(min(start, file_reader.num_record_batches),
                                                        file_reader.num_record_batches))
            if self.max_rate > 0:
                batches = _paced(batches, self.max_rate)
            # A RecordBatchStream (not a GeneratorStream) sends dictionary batches too.
            return flight.RecordBatchStream(pa.RecordBatchReader.from_batches(file_reader.schema, batches))

        return self._served("get", get)

    def list_flights(self, context: Any, criteria: bytes) -> Any:
        def listing() -> list[flight.FlightInfo]:
            out = []
            for meta in self.store.listing():
                schema = pa.ipc.read_schema(pa.py_buffer(bytes.fromhex(meta.schema)))
                out.append(flight.FlightInfo(schema, flight.FlightDescriptor.for_command(meta.to_json()),
                                             [flight.FlightEndpoint(meta.id, [])], meta.num_rows, meta.num_bytes))
            return out

        return iter(self._served("listing", listing))

    def do_action(self, context: Any, action: flight.Action) -> Any:
        def act() -> DatasetMeta:
            key = _text(action.body.to_pybytes(), "action body")
            if action.type == "get":
                return self.store.resolve(key)
            if action.type == "delete":
                meta = self.store.delete(key)
                if not meta.replica:
                    dropped = self._drop_replicas(meta)
                    if dropped:
                        logger.info("deleted dataset %s and %d replicas of it", meta.id, dropped)
                return meta
            if action.type == "delete-replica":
                if not self.store.resolve(key).replica:
                    raise DatasetError("ERROR_KIND_INVALID_ARGUMENT",
                                       f"{clip(key)!r} is a primary at {self.store.site_id!r}")
                return self.store.delete(key)
            raise DatasetError("ERROR_KIND_INVALID_ARGUMENT", f"unknown action {clip(action.type)!r}")

        return iter([flight.Result(pa.py_buffer(self._served("action", act).to_json()))])

    def list_actions(self, context: Any) -> list[tuple[str, str]]:
        return [("get", "metadata of a dataset (id or name)"),
                ("delete", "delete a dataset (id or name), and the federation's replicas of it"),
                ("delete-replica", "delete this site's replica of a dataset (by id)")]

    def _unsupported(self, *args: Any) -> Any:
        raise flight.FlightServerError("ERROR_KIND_INVALID_ARGUMENT: this Flight method is not served by Intertie "
                                       "(use do_put, do_get, list_flights and the actions)")

    get_flight_info = do_exchange = _unsupported

    def get_schema(self, context: Any, descriptor: flight.FlightDescriptor) -> flight.SchemaResult:
        """The schema of a dataset (descriptor command: its id or name). pyarrow attaches the
        server's traceback to any error raised here (unlike every other method), so a
        request that cannot be answered gets an empty schema whose metadata says why."""
        def schema() -> pa.Schema:
            key = _text(descriptor.command or b"", "descriptor") if descriptor.command is not None else ""
            meta = self.store.resolve(key)
            return pa.ipc.read_schema(pa.py_buffer(bytes.fromhex(meta.schema)))

        try:
            return flight.SchemaResult(self._served("schema", schema))
        except flight.FlightError as exc:
            return flight.SchemaResult(pa.schema([], metadata={"intertie-error": clip(str(exc), 1000)}))


# The largest ticket, descriptor or action body read (ids and names are 128 characters).
MAX_REQUEST_BYTES = 4096


def _text(data: bytes, what: str) -> str:
    if len(data) > MAX_REQUEST_BYTES:
        raise DatasetError("ERROR_KIND_INVALID_ARGUMENT", f"the {what} is {len(data)} bytes, over {MAX_REQUEST_BYTES}")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise DatasetError("ERROR_KIND_INVALID_ARGUMENT", f"the {what} is not UTF-8") from None


def _json_request(data: bytes, what: str) -> dict[str, Any]:
    """A small JSON object from the network (bounded in size, so in nesting too)."""
    text = _text(data, what)
    try:
        request = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise DatasetError("ERROR_KIND_INVALID_ARGUMENT", f"bad {what}: {clip(str(exc))}") from None
    if not isinstance(request, dict):
        raise DatasetError("ERROR_KIND_INVALID_ARGUMENT", f"bad {what}: expected a JSON object")
    return request
