"""Datasets at a site: Arrow IPC files under an fsspec URL, served over Arrow Flight.

Each dataset is two objects under the store's root: ``<id>.arrow`` (an Arrow IPC file,
written as ``<id>.arrow.part`` and renamed when complete) and ``<id>.json`` (its
metadata, written last). A dataset exists once its metadata does, so a crash in the
middle of an upload leaves at most a ``.part`` file, removed at the next start.

A dataset is a *primary* (uploaded here, or a task result stored here) or a *replica*
(pulled from another site for a task that ran here, same id). Replicas are a cache:
bounded by ``replica_cache_bytes``, the least recently used one is evicted first, and
never one a task is reading. The quota bounds primaries only.

Each dataset has an owner: the tenant that put it, or the tenant of the task whose result it
is ("" without authentication, and for datasets stored before owners were recorded). A
caller that names a tenant sees only that tenant's datasets: another tenant's is answered
exactly like one that does not exist. Names are unique per owner.

Uploads and pulled replicas are validated in full as they arrive (``arrow_checks``); a
pull's watchdog and its check of a holder's answer are in ``pulls``; the Flight endpoint
that serves the store is ``flight_service``.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.flight as flight
from fsspec.implementations.local import LocalFileSystem

from intertie_gateway.arrow_checks import (
    VALID_NAME,
    DatasetError,
    arrow_call,
    batches_of,
    check_batch,
    checked_schema,
    first_line,
    write_batch,
)
from intertie_gateway.pulls import Watchdog, peer_meta, quietly
from intertie_gateway.tenancy import owner_here
from intertie_gateway.validate import clip

__all__ = ["DatasetError", "DatasetMeta", "DatasetStore"]

logger = logging.getLogger(__name__)


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
    owner: str = ""  # the tenant it belongs to, as this site names it

    @property
    def replica(self) -> bool:
        return bool(self.origin)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()


class DatasetStore:
    """Arrow IPC datasets under an fsspec URL (a local folder, ``memory://``, object stores)."""

    def __init__(self, url: str, site_id: str, *, quota_bytes: int = 0,
                 owner_quota: Callable[[str], int] = lambda owner: 0, replica_cache_bytes: int = 0,
                 connect: Callable[[str], flight.FlightClient] = lambda a: flight.FlightClient(f"grpc://{a}")) -> None:
        """``connect``: a Flight client of a peer's address (mutual TLS in a federation with a CA)."""
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self._connect = connect
        self.url = url
        self.site_id = site_id
        self.quota_bytes = quota_bytes
        self._owner_quota = owner_quota  # bytes of primaries an owner may store here (0: no limit)
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

    def owned_bytes(self, owner: str) -> int:
        """Bytes of the primaries ``owner`` stores here (what its quota bounds)."""
        return sum(m.num_bytes for m in list(self._meta.values()) if not m.replica and m.owner == owner)

    def listing(self, tenant: str | None = None) -> list[DatasetMeta]:
        """The datasets ``tenant`` owns (None: all of them)."""
        with self._lock:
            return sorted((m for m in self._meta.values() if _visible(m, tenant)), key=lambda m: m.created_at)

    def resolve(self, key: str, tenant: str | None = None) -> DatasetMeta:
        """A dataset by id, or by name: this site's own of that name (names are unique among
        them), else the one replica of that name. ``tenant``: only among that tenant's (None:
        among all); another's is not found, with the same message as one that does not exist."""
        with self._lock:
            meta = self._meta.get(key)
            if meta is not None and not _visible(meta, tenant):
                meta = None
            if meta is None:
                named = [m for m in self._meta.values() if m.name == key and _visible(m, tenant)]
                pool = [m for m in named if not m.replica] or named
                if len(pool) > 1:  # replicas of two sites' datasets, or a store from before names were unique
                    ids = ", ".join(sorted(m.id for m in pool)[:5])
                    raise DatasetError("ERROR_KIND_INVALID_ARGUMENT",
                                       f"site {self.site_id!r} has {len(pool)} datasets named {clip(key)!r} "
                                       f"(ids {ids}): name one by its id")
                meta = pool[0] if pool else None
        if meta is None:
            raise DatasetError("ERROR_KIND_NOT_FOUND", f"site {self.site_id!r} has no dataset {clip(key)!r}")
        return meta

    def _holders_of(self, name: str, other_than: str, owner: str) -> list[DatasetMeta]:
        """This site's own datasets of ``owner`` named ``name``, except the one of id ``other_than``
        (call with the lock)."""
        return [m for m in self._meta.values()
                if m.name == name and not m.replica and m.id != other_than and m.owner == owner]

    def _taken(self, name: str, dataset_id: str) -> DatasetError:
        return DatasetError("ERROR_KIND_INVALID_ARGUMENT",
                            f"site {self.site_id!r} already has a dataset named {clip(name)!r}: choose another "
                            "name, or replace it (replace=True, --replace)")

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._meta)

    def owners(self) -> dict[str, str]:
        """Every dataset here (primaries and replicas): id -> owner, as this site names it."""
        with self._lock:
            return {m.id: m.owner for m in self._meta.values()}

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

    def location(self, dataset_id: str, owner: str | None = None) -> str | None:
        """The local path a worker memory-maps ("" when the store is not a local folder:
        the worker then reads over Flight); None when the dataset is not here, or is not
        ``owner``'s (None: whoever's)."""
        with self._lock:
            meta = self._meta.get(dataset_id)
            if meta is None or (owner is not None and meta.owner != owner):
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
             timeout_s: float = 120.0, retry_s: float = 0.5, owner: str | None = None) -> DatasetMeta:
        """Copies a dataset from other sites' Flight endpoints, keeping its id (a replica).

        ``sources()`` gives (site id, Flight address) of the sites that hold it, best first;
        it is asked again after each failure. An interrupted transfer resumes at the next
        batch, from the same or another source (replicas keep their holder's batches), and
        is retried with backoff until no batch has arrived for ``timeout_s``. What a peer
        sends is validated like an upload: a site that sends invalid data is not asked
        again, and when every holder did, the pull fails at once. ``owner``: whose it must be
        (as this site names tenants; None: anyone's): another's is not copied, and fails as a
        dataset no site holds would."""
        if not VALID_NAME.match(dataset_id):
            raise DatasetError("ERROR_KIND_INVALID_ARGUMENT", f"dataset id {clip(dataset_id)!r} is not valid")
        part = self._path(dataset_id, "arrow.part")
        deadline = time.monotonic() + timeout_s
        delay = retry_s
        done = 0  # batches received so far
        rows = 0
        expected: tuple[str, int, str] | None = None  # the holder's name, row count and owner
        fh: Any = None
        writer: Any = None
        schema: pa.Schema | None = None
        failures: list[str] = []
        refused: dict[str, str] = {}  # site -> why: sent data that is not valid
        watch = Watchdog(timeout_s, self._closing)
        try:
            while True:
                asked = missing = 0
                for site, address in sources():
                    if site in refused:
                        continue
                    asked += 1
                    client = self._connect(address)
                    try:
                        if expected is None:
                            info = next(iter(client.do_action(flight.Action("get", dataset_id.encode()))), None)
                            expected = peer_meta(info.body.to_pybytes() if info is not None else b"", dataset_id)
                            if owner is not None and owner_here(expected[2], site, self.site_id) != owner:
                                raise DatasetError("ERROR_KIND_DATASET_NOT_FOUND", (
                                    f"dataset {dataset_id} is not at site {self.site_id!r}, and no site holds it"))
                        ticket = json.dumps({"id": dataset_id, "from_batch": done}).encode()
                        reader = client.do_get(flight.Ticket(ticket))
                        watch.reader = reader
                        incoming = checked_schema(arrow_call(functools.partial(getattr, reader, "schema"),
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
                                chunk = arrow_call(reader.read_chunk, f"{site}'s stream")
                            except StopIteration:
                                break
                            if self._closing.is_set():
                                raise DatasetError("ERROR_KIND_SITE_FAILURE",
                                                   f"site {self.site_id!r} stopped during the transfer")
                            if chunk.data is None:
                                continue
                            where = f"dataset {dataset_id} from {site}, batch {done}"
                            check_batch(chunk.data, schema, where)
                            write_batch(writer, chunk.data, where)
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
                        return self._commit(dataset_id, expected[0], rows, nbytes, schema, origin=site,
                                            owner=owner_here(expected[2], site, self.site_id))
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
                            failures.append(f"{site}: {first_line(exc)}")
                        logger.warning("pulling dataset %s from %s stopped after %d batches: %s", dataset_id, site,
                                       done, first_line(exc))
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
                quietly(writer.close)
                quietly(fh.close)
            if self.fs.exists(part):
                self.fs.rm(part)

    def write(self, name: str, reader: Any, dataset_id: str | None = None, *, replace: bool = False,
              replaced: list[DatasetMeta] | None = None, owner: str = "") -> DatasetMeta:
        """Stores a stream of record batches (``reader.read_chunk()`` or iteration) as a
        primary of ``owner``; a given id replaces the dataset of that id (a rerun task's result).

        Names are unique among an owner's datasets at this site: a name in use is refused
        (before the stream is read, and again when it is committed) unless ``replace``, which
        deletes the dataset that had it once the new one is stored (and adds it to ``replaced``).

        Every batch is validated in full before it is written (the stream comes from the
        network: a bad offset would crash Arrow's writer or, stored, every reader); the size
        recorded is what was written, not what the batches claim."""
        if name and not VALID_NAME.match(name):
            raise DatasetError("ERROR_KIND_INVALID_ARGUMENT",
                               f"dataset name {clip(name)!r}: use 1-128 letters, digits, '.', '_' or '-'")
        if dataset_id is not None and not VALID_NAME.match(dataset_id):
            raise DatasetError("ERROR_KIND_INVALID_ARGUMENT",
                               f"dataset id {clip(dataset_id)!r}: use 1-128 letters, digits, '.', '_' or '-'")
        dataset_id = dataset_id or uuid.uuid4().hex
        if name and not replace:
            with self._lock:
                if self._holders_of(name, dataset_id, owner):
                    raise self._taken(name, dataset_id)
        part = self._path(dataset_id, f"{uuid.uuid4().hex[:8]}.arrow.part")
        rows = 0
        previous = self._meta.get(dataset_id)
        if previous is not None and previous.owner != owner:  # (an id is another tenant's: say nothing of it)
            raise DatasetError("ERROR_KIND_INVALID_ARGUMENT", f"dataset id {dataset_id} is taken; store under "
                                                              "another id")
        replacing = previous.num_bytes if previous is not None and not previous.replica else 0
        in_use = self.used_bytes() - replacing
        owner_quota = self._owner_quota(owner)
        owner_in_use = self.owned_bytes(owner) - (replacing if previous is not None and previous.owner == owner else 0)
        try:
            schema = checked_schema(arrow_call(lambda: reader.schema, "the stream's schema"))
            with self._sink(part) as fh, pa.ipc.new_file(fh, schema) as writer:
                for batch in batches_of(reader):
                    check_batch(batch, schema, f"dataset {dataset_id}, batch after row {rows}")
                    write_batch(writer, batch, f"dataset {dataset_id}, batch after row {rows}")
                    rows += batch.num_rows
                    if self.quota_bytes and in_use + fh.tell() > self.quota_bytes:
                        raise DatasetError("ERROR_KIND_PAYLOAD_TOO_LARGE",
                                           f"site {self.site_id!r}: the dataset would exceed the site's quota of "
                                           f"{self.quota_bytes} bytes ({in_use} in use)")
                    if owner_quota and owner_in_use + fh.tell() > owner_quota:
                        raise DatasetError("ERROR_KIND_QUOTA_EXCEEDED",
                                           f"site {self.site_id!r}: the dataset would exceed the quota of tenant "
                                           f"{owner or 'anonymous'!r}, {owner_quota} bytes of datasets "
                                           f"({owner_in_use} in use); delete some, or ask the site's operator")
            nbytes = self.fs.size(part)
            with self._lock:  # another upload of the name may have been committed meanwhile
                if name and not replace and self._holders_of(name, dataset_id, owner):
                    raise self._taken(name, dataset_id)
            self.fs.mv(part, self._path(dataset_id, "arrow"))
        except BaseException:
            if self.fs.exists(part):
                self.fs.rm(part)
            raise
        meta = self._commit(dataset_id, name or dataset_id, rows, nbytes, schema, owner=owner)
        if name and replace:
            with self._lock:
                olds = self._holders_of(name, dataset_id, owner)
            for old in olds:
                self.delete(old.id)
                logger.info("dataset %s replaces %s as %r", dataset_id, old.id, name)
                if replaced is not None:
                    replaced.append(old)
        return meta

    def _commit(self, dataset_id: str, name: str, rows: int, nbytes: int, schema: pa.Schema,
                origin: str = "", owner: str = "") -> DatasetMeta:
        meta = DatasetMeta(id=dataset_id, name=name, site=self.site_id, num_rows=rows, num_bytes=nbytes,
                           created_at=time.time(), schema=schema.serialize().to_pybytes().hex(), origin=origin,
                           owner=owner)
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

    def open(self, key: str, tenant: str | None = None) -> tuple[DatasetMeta, pa.ipc.RecordBatchFileReader]:
        meta = self.resolve(key, tenant)
        with self._lock:
            self._used_at[meta.id] = time.time()
        path = self._path(meta.id, "arrow")
        if isinstance(self.fs, LocalFileSystem):
            source: Any = pa.memory_map(path)  # zero copy for local files
        else:
            source = pa.BufferReader(self.fs.cat_file(path))
        return meta, pa.ipc.open_file(source)

    def delete(self, key: str, tenant: str | None = None) -> DatasetMeta:
        meta = self.resolve(key, tenant)
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


def _visible(meta: DatasetMeta, tenant: str | None) -> bool:
    return tenant is None or meta.owner == tenant
