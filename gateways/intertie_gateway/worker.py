"""Runs inside Ray workers: the only place where user payloads are unpickled.

The gateway process imports this module only to hand :func:`execute` to Ray; it
never calls it itself.
"""

from __future__ import annotations

import json
import pickle
import re
import sys
import time
import traceback
import uuid
from collections import OrderedDict
from typing import Any

import cloudpickle

from intertie_gateway.model import ErrorKind  # the wire's numbers, without a protobuf import in workers

KIND_REMOTE = ErrorKind.REMOTE
KIND_PAYLOAD_TOO_LARGE = ErrorKind.PAYLOAD_TOO_LARGE
KIND_SERIALIZATION = ErrorKind.SERIALIZATION
KIND_SITE_FAILURE = ErrorKind.SITE_FAILURE

# Rows per record batch when a result table is stored at the site.
STORE_BATCH_ROWS = 64 * 1024

# Unpickled functions per worker process; a worker serves many tasks of few functions.
_FUNCTION_CACHE_SIZE = 256
_functions: OrderedDict[str, Any] = OrderedDict()

# What execute returns: (ok, result bytes, error kind, exception type, message, traceback,
# pickled exception, seconds it ran in the worker, CPU seconds it used there (user + system),
# bytes of the tables it stored at the site). Ray carries the tuple; the gateway reads only
# the plain fields.
Outcome = tuple[bool, bytes, int, str, str, str, bytes, float, float, int]


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _pickle_exception(exc: BaseException) -> bytes:
    """(class, args, attributes) rather than the exception itself: many exception classes
    with their own __init__ cannot be unpickled, but can be rebuilt from these three."""
    states: tuple[tuple[Any, ...], ...] = ((type(exc), exc.args, dict(getattr(exc, "__dict__", {}))),
                  (type(exc), tuple(repr(a) for a in exc.args), {}))
    for state in states:
        try:
            return cloudpickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:
            continue
    return b""


def _failure(kind: int, exc: BaseException, message: str) -> Outcome:
    pickled = _pickle_exception(exc)
    return (False, b"", kind, _qualified(type(exc)), message, traceback.format_exc(), pickled, 0.0, 0.0, 0)


# Small functions live in the GCS key-value store under this prefix (as Ray exports its
# own remote functions); large ones come as an object ref in ``holder``.
KV_NAMESPACE = "intertie"
KV_PREFIX = b"fn:"


def _function(digest: str, holder: list[Any] | None, name: str) -> Any:
    fn = _functions.get(digest)
    if fn is not None:
        _functions.move_to_end(digest)
        return fn
    import ray

    if holder:
        # Wrapped in a list so Ray does not fetch it for every task, only on a miss here.
        payload = ray.get(holder[0])
    else:
        from ray.experimental import internal_kv

        payload = internal_kv._internal_kv_get(KV_PREFIX + digest.encode(), namespace=KV_NAMESPACE)
        if payload is None:
            raise LookupError(f"function {digest[:12]} is not in this site's function store")
    fn = cloudpickle.loads(payload)
    _functions[digest] = fn
    if len(_functions) > _FUNCTION_CACHE_SIZE:
        _functions.popitem(last=False)
    return fn


# Where and how a task's Table results are stored at the site: (its dataset endpoint, a size
# threshold, whether the function is declared returns="dataset", the task id, the task's tenant).
Stored = tuple[str, int, bool, str, str]


def execute(digest: str, args: bytes, name: str, batch: bool, holder: list[Any] | None = None,
            inputs: dict[str, str] | None = None, stored: Stored | None = None) -> Outcome:
    """Runs one task. ``inputs``: dataset id -> a local path to memory-map, or
    ``flight://`` and the site's dataset endpoint (see :func:`_flight`). ``stored``: see
    :data:`Stored` - a Table result over the threshold, or any result of a function declared
    ``returns="dataset"``, is stored at the site, owned by the task's tenant (so that only it
    sees it, as "tenant@home" at a peer), and the task returns its DatasetRef.

    Measured per task (a pooled worker runs one call at a time, a fused call its tasks one
    after another): the wall time and the process's CPU time (user + system, all its threads,
    so a function's own threads count; a child process it starts does not; Ray's threads in
    the worker add a little) from the arguments' unpickling to the result's pickling."""
    started = time.perf_counter()
    cpu = time.process_time()
    outcome = _execute(digest, args, name, batch, holder, inputs, stored)
    return (*outcome[:7], time.perf_counter() - started, time.process_time() - cpu, outcome[9])


# Per address of the site's dataset endpoint: what it was told (address, roots, secret), a
# client, and the call options that show the site's secret (workers call as the site itself).
_flight_clients: dict[str, tuple[dict[str, str], Any, Any]] = {}


def _flight(endpoint: str) -> tuple[Any, Any]:
    """A client of the site's dataset endpoint and its call options. ``endpoint``: the JSON
    of ``DataPlane.worker_endpoint`` (address, certificate to verify, secret), or a bare
    address that was told in full before (a dataset argument read over Flight)."""
    import pyarrow.flight as flight

    from intertie_gateway.flight_service import SECRET_HEADER

    access = json.loads(endpoint) if endpoint.startswith("{") else {"address": endpoint}
    known = _flight_clients.get(access["address"])
    if known is not None and (len(access) == 1 or known[0] == access):
        return known[1], known[2]
    if access.get("roots"):
        client = flight.FlightClient(f"grpc+tls://{access['address']}", tls_root_certs=access["roots"].encode())
    else:
        client = flight.FlightClient(f"grpc://{access['address']}")
    secret = access.get("secret", "")
    options = flight.FlightCallOptions(headers=[(SECRET_HEADER.encode(), secret.encode())] if secret else [])
    _flight_clients[access["address"]] = (access, client, options)
    return client, options


def _is_table(value: Any) -> bool:
    pa = sys.modules.get("pyarrow")  # a function that made a Table has imported pyarrow
    return pa is not None and isinstance(value, (pa.Table, pa.RecordBatch))


class ResultNotATable(TypeError):
    pass


def _keep_at_site(value: Any, name: str, batch: bool, stored: Stored) -> tuple[Any, int]:
    """The result with its (large, or declared) tables stored at the site as datasets, and
    the bytes of those tables."""
    address, threshold, declared, task_id, tenant = stored
    kept = 0

    def keep(item: Any, index: int | None) -> Any:
        nonlocal kept
        if _is_table(item) and (declared or (threshold and item.nbytes >= threshold)):
            kept += item.nbytes
            return _store(item, address, name, task_id and (task_id if index is None else f"{task_id}-{index}"),
                          tenant)
        if declared:
            raise ResultNotATable(f"{name} is declared returns='dataset' but returned {type(item).__name__}, "
                                  f"not a pyarrow.Table")
        return item

    value = [keep(item, i) for i, item in enumerate(value)] if batch else keep(value, None)
    return value, kept


def _store(table: Any, address: str, name: str, dataset_id: str, owner: str) -> Any:
    import pyarrow as pa
    import pyarrow.flight as flight

    from intertie.datasets import DatasetRef

    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    label = re.sub(r"[^A-Za-z0-9._-]", "_", name.rsplit(".", 1)[-1]).strip("._-")[:80] or "result"
    # The task id names the dataset when the worker has it (a rerun of the task then replaces
    # it rather than adding one): always for returns="dataset", and for fused tasks.
    dataset_id = re.sub(r"[^A-Za-z0-9._-]", "_", dataset_id) if dataset_id else uuid.uuid4().hex
    descriptor = flight.FlightDescriptor.for_command(
        json.dumps({"name": f"{label}-{dataset_id[:12]}", "id": dataset_id, "owner": owner}).encode())
    client, options = _flight(address)
    writer, answers = client.do_put(descriptor, table.schema, options)
    with writer:
        writer.write_table(table, max_chunksize=STORE_BATCH_ROWS)
        writer.done_writing()
        answer = answers.read()
    return DatasetRef.from_json(answer.to_pybytes())


def _tables(call: Any, inputs: dict[str, str]) -> Any:
    """The call's (args, kwargs) with each DatasetRef replaced by its table, read from the
    site's copy (memory-mapped when the store is a local folder: no copy)."""
    import pyarrow as pa

    from intertie.datasets import DatasetRef, map_refs

    cache: dict[str, Any] = {}

    def table(ref: DatasetRef) -> Any:
        if ref.id not in cache:
            location = inputs[ref.id]
            if location.startswith("flight://"):  # a store workers cannot open: ask the gateway
                import pyarrow.flight as flight

                client, options = _flight(location[len("flight://"):])
                reader = client.do_get(flight.Ticket(ref.id.encode()), options)
                cache[ref.id] = reader.read_all()
            else:
                cache[ref.id] = pa.ipc.open_file(pa.memory_map(location)).read_all()
        return cache[ref.id]

    args, kwargs = call
    return map_refs(args, kwargs, table)


def _execute(digest: str, args: bytes, name: str, batch: bool, holder: list[Any] | None,
             inputs: dict[str, str] | None = None, stored: Stored | None = None) -> Outcome:
    try:
        fn = _function(digest, holder, name)
    except Exception as exc:
        return _failure(KIND_SERIALIZATION, exc,
                        f"function {name} could not be unpickled on this site: {type(exc).__name__}: {exc}")
    try:
        call = cloudpickle.loads(args)
    except Exception as exc:
        return _failure(KIND_SERIALIZATION, exc,
                        f"arguments of {name} could not be unpickled on this site: {type(exc).__name__}: {exc}")
    if inputs:
        try:
            call = [_tables(c, inputs) for c in call] if batch else _tables(call, inputs)
        except Exception as exc:
            return _failure(KIND_SITE_FAILURE, exc,
                            f"a dataset argument of {name} could not be read on this site: {type(exc).__name__}: {exc}")
    try:
        if batch:
            value: Any = [fn(*a, **k) for a, k in call]
        else:
            value = fn(*call[0], **call[1])
    except KeyboardInterrupt:
        raise  # Ray's way of cancelling a task
    except BaseException as exc:  # SystemExit from user code is an error of the task too
        return _failure(KIND_REMOTE, exc, str(exc))
    kept = 0
    if stored is not None:
        try:
            value, kept = _keep_at_site(value, name, batch, stored)
        except ResultNotATable as exc:
            return _failure(KIND_REMOTE, exc, str(exc))
        except Exception as exc:
            text = str(exc).split(". Detail:", 1)[0]
            kind = KIND_PAYLOAD_TOO_LARGE if "ERROR_KIND_PAYLOAD_TOO_LARGE" in text else KIND_SITE_FAILURE
            return _failure(kind, exc, f"the result of {name} could not be stored at the site: "
                                       f"{text.split('ERROR_KIND_PAYLOAD_TOO_LARGE: ')[-1]}")
    try:
        return (True, cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL), 0, "", "", "", b"", 0.0, 0.0, kept)
    except Exception as exc:
        return _failure(KIND_SERIALIZATION, exc,
                        f"the result of {name} could not be pickled: {type(exc).__name__}: {exc}")


class PoolWorker:
    """A long-lived worker of the gateway's pool (a Ray actor): runs one task at a time."""

    def __init__(self) -> None:
        self._site: tuple[str, int] | None = None  # where and from what size Table results stay

    def configure(self, site: tuple[str, int] | None) -> None:
        """(the site's dataset endpoint, threshold): told once rather than with every task."""
        self._site = site

    def _stored(self, stored: Stored | None, task_id: str, tenant: str) -> Stored | None:
        if stored is not None or self._site is None:
            return stored
        return (self._site[0], self._site[1], False, task_id, tenant)

    def execute(self, digest: str, args: bytes, name: str, batch: bool, holder: list[Any] | None = None,
                inputs: dict[str, str] | None = None, stored: Stored | None = None, tenant: str = "") -> Outcome:
        """``tenant``: the task's, owner of the results stored at the site (when ``stored`` is None)."""
        return execute(digest, args, name, batch, holder, inputs, self._stored(stored, "", tenant))

    def execute_many(self, digest: str, items: list[tuple[str, bytes, bool, str, str]],
                     holder: list[Any] | None = None) -> list[Outcome]:
        """Several queued tasks of one function, one after another (fused by the gateway):
        (name, args, batch, task id, tenant) each."""
        return [execute(digest, args, name, batch, holder, None, self._stored(None, task_id, tenant))
                for name, args, batch, task_id, tenant in items]
