"""The site's Arrow Flight endpoint for datasets: the handlers that serve a
:class:`~intertie_gateway.datasets.DatasetStore` over Flight.

Flight surface (the gateway never unpickles anything here; it is all Arrow):
- ``do_put`` with descriptor command ``{"name": ..., "id": ..., "replace": false}`` (names
  are unique per site: a name in use is refused unless ``replace``; the id is optional;
  a task's stored result names its own, so a rerun replaces it): stores a stream of
  record batches; answers with the dataset's metadata as JSON in the put result.
- ``do_get`` with ticket = dataset id or name, or ``{"id": ..., "from_batch": k}`` to
  resume an interrupted transfer at batch k: streams the batches back.
- ``list_flights``: one FlightInfo per dataset (its metadata JSON in the descriptor).
- actions ``get`` (metadata of an id or name), ``delete`` (which also asks the up
  peers to drop their replicas) and ``delete-replica``.

Every handler runs inside ``_served``, which answers bad input with a typed
``ERROR_KIND_<KIND>`` and anything unexpected with a bounded internal error; tickets,
descriptors and action bodies are bounded and parsed here.

Who calls is decided once per call, before any handler, by :class:`Gate` (a Flight server
middleware): the site itself (its gateway and its Ray workers, by a secret that never
leaves the site), a tenant (by the bearer token of the site's gRPC endpoint, with auth
"token"), or anyone (auth "none": tenant "", who sees every dataset, as before tenants).
A tenant sees, reads, replaces and deletes only its own datasets; only the site sets a
dataset's id or owner (a task's result belongs to the task's tenant).

A tenant's token is good only at its home, so a tenant reaches the datasets of other sites
through its home: a request may name a ``site`` (the put descriptor, a JSON ticket,
``list_flights`` criteria ``{"site": ...}``, an action body ``{"key": ..., "site": ...}``),
and the home's :class:`Relay` makes it at that peer's endpoint (mutual TLS), vouching for the
tenant. The peer (:class:`PeerFlightService`) knows the calling site by its certificate and
lets it act only for that site's own tenants, which it names "tenant@home".
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from intertie_gateway.arrow_checks import first_line
from intertie_gateway.auth import FailureLimit, source_of
from intertie_gateway.certs import site_of_uri
from intertie_gateway.datasets import DatasetError, DatasetMeta, DatasetStore
from intertie_gateway.relay import TENANT_HEADER, Relay
from intertie_gateway.tenancy import TENANT
from intertie_gateway.throttle import log_throttled
from intertie_gateway.tokens import TokenError, TokenStore, bearer_token
from intertie_gateway.validate import clip

logger = logging.getLogger(__name__)

# A peer that does not answer a replica deletion in this time keeps its copy until it
# is evicted from its cache.
REPLICA_DELETE_TIMEOUT_S = 5.0


# The header that carries the site's own secret (its gateway and its workers).
SECRET_HEADER = "intertie-secret"
GATE = "gate"




@dataclass(frozen=True)
class Caller:
    """Who is calling. ``tenant``: whose datasets it sees (None: every dataset: the site
    itself, and everyone when the site runs without authentication); ``internal``: the site
    itself; ``peer``: the site a peer's certificate names (at the peers' endpoint)."""

    tenant: str | None
    internal: bool = False
    peer: str = ""
    # The site's Ray workers (they run tenants' code): they read inputs and store results by id,
    # but do not list, delete or call the gateway's own actions.
    worker: bool = False


class Admitted(flight.ServerMiddleware):  # type: ignore[misc]
    """The caller of a call, or why it is refused: told by the handler, which knows the
    caller's address (a middleware does not), so that failures count per source."""

    def __init__(self, caller: Caller, refusal: flight.FlightError | None = None) -> None:
        self.caller = caller
        self.refusal = refusal


# Methods whose handlers ask for the caller (``_caller``) before anything else: a refusal of
# one of them is raised there, counted against the caller's address; any other method is
# refused by the Gate at once.
_HANDLED = frozenset({flight.FlightMethod.DO_GET, flight.FlightMethod.DO_PUT, flight.FlightMethod.LIST_FLIGHTS,
                      flight.FlightMethod.DO_ACTION, flight.FlightMethod.GET_SCHEMA})


class Gate(flight.ServerMiddlewareFactory):  # type: ignore[misc]
    """Decides the caller of every Flight call before it is served (see the module doc).
    ``tokens`` None: auth none. A refusal is a Flight UNAUTHENTICATED error in one line that
    never repeats what was sent."""

    def __init__(self, secret: str, tokens: TokenStore | None, worker_secret: str = "",
                 serves: Callable[[str], bool] = lambda tenant: True) -> None:
        self._secret = secret
        self._worker_secret = worker_secret
        self._tokens = tokens
        self._serves = serves

    def start_call(self, info: Any, headers: dict[str, list[Any]]) -> Admitted:
        try:
            return self._admit(info, headers)
        except flight.FlightUnauthenticatedError as exc:
            if info.method not in _HANDLED:
                raise
            return Admitted(Caller(None), refusal=exc)

    def _admit(self, info: Any, headers: dict[str, list[Any]]) -> Admitted:
        secret = _header(headers, SECRET_HEADER)
        if secret is not None:
            if self._worker_secret and secrets.compare_digest(secret.encode(), self._worker_secret.encode()):
                return Admitted(Caller(None, internal=True, worker=True))
            if not self._secret or not secrets.compare_digest(secret.encode(), self._secret.encode()):
                raise _refused("not authenticated: a wrong site secret")
            return Admitted(Caller(None, internal=True))
        if self._tokens is None:
            return Admitted(Caller(None))
        token = bearer_token(_header(headers, "authorization") or "")
        try:
            if not token:
                raise TokenError("no token: pass connect(..., token=...), INTERTIE_TOKEN or --token")
            tenant = self._tokens.check(token)
        except TokenError as exc:
            log_throttled(logger, f"flight-auth-{str(exc).split(' ')[0]}", "refused a Flight call (%s): %s",
                          info.method, exc)
            raise _refused(f"not authenticated: {exc}") from None
        if not self._serves(tenant):
            raise _not_served(tenant)
        return Admitted(Caller(tenant))


def _not_served(tenant: str) -> flight.FlightUnauthorizedError:
    return flight.FlightUnauthorizedError(f"ERROR_KIND_PERMISSION_DENIED: this site does not accept tenant "
                                          f"{clip(tenant, 80)!r} (its policy)")


class PeerGate(flight.ServerMiddlewareFactory):  # type: ignore[misc]
    """The peers' endpoint: the handshake proved a certificate of the federation CA; the
    tenant a peer vouches for is noted here and checked against the site its certificate
    names by the handler (a middleware does not see the certificate)."""

    def start_call(self, info: Any, headers: dict[str, list[Any]]) -> Admitted:
        return Admitted(Caller(_header(headers, TENANT_HEADER)))


def _header(headers: dict[str, list[Any]], name: str) -> str | None:
    values = headers.get(name) or ()
    for value in values:
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return None


def _refused(why: str) -> flight.FlightUnauthenticatedError:
    return flight.FlightUnauthenticatedError(f"ERROR_KIND_UNAUTHENTICATED: {clip(why, 300)}")


def caller_of(context: Any) -> Caller:
    """The caller the Gate decided for this call (its refusal, raised)."""
    admitted: Admitted = context.get_middleware(GATE)
    if admitted.refusal is not None:
        raise admitted.refusal
    return admitted.caller


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
                 peers: Callable[[], Sequence[str]] = lambda: (), secret: str = "", tokens: TokenStore | None = None,
                 connect: Callable[[str], flight.FlightClient] = lambda a: flight.FlightClient(f"grpc://{a}"),
                 relay: Relay | None = None, gate: flight.ServerMiddlewareFactory | None = None,
                 worker_secret: str = "", serves: Callable[[str], bool] = lambda tenant: True,
                 **server: Any) -> None:
        """``secret``: what the site's own calls show (""): none can); ``tokens``: the tenants'
        (None: auth none); ``connect``: a client for a peer's address; ``relay``: how requests
        of tenants that name a peer are made there (None: a federation without a CA, whose
        tenants call each site's endpoint themselves); ``gate``: who calls (default
        :class:`Gate`); ``worker_secret``: what the site's Ray workers show; ``serves``: whether
        the site's policy accepts a tenant; ``server``: TLS options of ``FlightServerBase``."""
        super().__init__(location, middleware={GATE: gate or Gate(secret, tokens, worker_secret, serves)}, **server)
        self._serves = serves  # which tenants the site's policy accepts
        self.store = store
        self.max_rate = max_rate  # bytes/s per transfer served; 0: no limit
        self.peers = peers  # Flight addresses of the up peers, told when a primary is deleted
        self._connect = connect
        self._relay = relay
        self._failures = FailureLimit()  # per source, as the gRPC endpoint counts them
        self._failures_lock = threading.Lock()  # (handlers run on several threads)

    def _caller(self, context: Any) -> Caller:
        """The caller; a source that failed authentication too often lately is refused, as
        at the gRPC endpoint (guessing tokens costs a window per few guesses). The site's
        own gateway and workers (its secrets) are never held up by what others at their
        address tried."""
        admitted: Admitted = context.get_middleware(GATE)
        if admitted.refusal is None and admitted.caller.internal:
            return admitted.caller
        source = source_of(context.peer())
        with self._failures_lock:
            wait = self._failures.blocked_for(source)
            if not wait and admitted.refusal is not None:
                self._failures.failed(source)
        if wait:
            raise _refused(f"too many failed authentications from your address; try again in {wait:.0f} s")
        if admitted.refusal is not None:
            raise admitted.refusal
        return admitted.caller

    def _elsewhere(self, site: Any, who: Caller) -> tuple[Relay, str, str] | None:
        """(the relay, the peer a request names, the tenant it acts for); None: this site."""
        if site is None or site == "" or site == self.store.site_id:
            return None
        if not isinstance(site, str):
            raise DatasetError("ERROR_KIND_INVALID_ARGUMENT", "bad request: its site must be a string")
        if self._relay is None or not who.tenant or who.internal or who.peer:
            raise DatasetError("ERROR_KIND_INVALID_ARGUMENT",
                               f"site {self.store.site_id!r} does not act at site {clip(site)!r} for this caller "
                               "(only for its own tenants, in a federation with a CA): ask that site itself")
        return self._relay, site, who.tenant

    def _drop_replicas(self, meta: DatasetMeta) -> int:
        """Asks every up peer to delete its replica of a deleted primary; how many did."""
        def drop(address: str) -> int:
            client = self._connect(address)
            try:
                options = flight.FlightCallOptions(timeout=REPLICA_DELETE_TIMEOUT_S)
                list(client.do_action(flight.Action("delete-replica", meta.id.encode()), options))
                return 1
            except flight.FlightError as exc:
                if "ERROR_KIND_NOT_FOUND" not in str(exc):
                    logger.warning("could not delete the replica of %s at %s: %s", meta.id, address,
                                   first_line(exc))
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
        who = self._caller(context)

        def put() -> DatasetMeta:
            request = _json_request(descriptor.command or b"{}", "put descriptor")
            away = self._elsewhere(request.pop("site", None), who)
            if away is not None:
                relay, site, tenant = away
                return relay.put(site, tenant, request, reader)
            name, dataset_id = request.get("name") or "", request.get("id") or None
            replace, owner = request.get("replace", False), request.get("owner", "")
            if not isinstance(name, str) or not (dataset_id is None or isinstance(dataset_id, str)) \
                    or not isinstance(replace, bool) or not isinstance(owner, str):
                raise DatasetError("ERROR_KIND_INVALID_ARGUMENT",
                                   "bad put descriptor: name, id and owner must be strings, replace true or false")
            if (dataset_id is not None and who.tenant is not None) or (owner and not who.internal):
                raise DatasetError("ERROR_KIND_INVALID_ARGUMENT",
                                   "bad put descriptor: a dataset's id and owner are set by the site")
            return self.store.write(name, reader, dataset_id=dataset_id, replace=replace, replaced=replaced,
                                    owner=owner if who.internal else who.tenant or "")

        replaced: list[DatasetMeta] = []
        meta = self._served("put", put)
        for old in replaced:  # the peers' replicas of what the name named before go too
            self._drop_replicas(old)
        writer.write(pa.py_buffer(meta.to_json()))
        logger.info("stored dataset %s (%s) at %s: %d rows, %d bytes", meta.id, meta.name, meta.site, meta.num_rows,
                    meta.num_bytes)

    def do_get(self, context: Any, ticket: flight.Ticket) -> flight.RecordBatchStream:
        who = self._caller(context)

        def get() -> flight.RecordBatchStream:
            key, start, away = ticket.ticket, 0, None
            if key.startswith(b"{"):
                request = _json_request(key, "ticket")
                key, start = request.get("id"), request.get("from_batch", 0)
                if not isinstance(key, str) or not isinstance(start, int) or isinstance(start, bool) or start < 0:
                    raise DatasetError("ERROR_KIND_INVALID_ARGUMENT", "bad ticket: expected {\"id\": a string, "
                                       "\"from_batch\": a whole number >= 0, \"site\": a site id}")
                away = self._elsewhere(request.get("site"), who)
            else:
                key = _text(key, "ticket")
            if away is not None:
                relay, site, tenant = away
                return flight.RecordBatchStream(relay.get(site, tenant, key, start))
            _, file_reader = self.store.open(key, who.tenant)
            batches: Iterator[pa.RecordBatch] = (
                file_reader.get_batch(i) for i in range(min(start, file_reader.num_record_batches),
                                                        file_reader.num_record_batches))
            if self.max_rate > 0:
                batches = _paced(batches, self.max_rate)
            # A RecordBatchStream (not a GeneratorStream) sends dictionary batches too.
            return flight.RecordBatchStream(pa.RecordBatchReader.from_batches(file_reader.schema, batches))

        return self._served("get", get)

    def list_flights(self, context: Any, criteria: bytes) -> Any:
        who = self._caller(context)
        if who.worker:
            raise flight.FlightServerError("ERROR_KIND_INVALID_ARGUMENT: a task does not list the site's datasets")

        def listing() -> list[flight.FlightInfo]:
            away = self._elsewhere(_json_request(criteria, "criteria").get("site"), who) if criteria else None
            out = []
            for meta in away[0].listing(*away[1:]) if away is not None else self.store.listing(who.tenant):
                schema = pa.ipc.read_schema(pa.py_buffer(bytes.fromhex(meta.schema)))
                out.append(flight.FlightInfo(schema, flight.FlightDescriptor.for_command(meta.to_json()),
                                             [flight.FlightEndpoint(meta.id, [])], meta.num_rows, meta.num_bytes))
            return out

        return iter(self._served("listing", listing))

    def do_action(self, context: Any, action: flight.Action) -> Any:
        who = self._caller(context)
        if who.worker and action.type != "get":
            raise flight.FlightServerError(f"ERROR_KIND_INVALID_ARGUMENT: a task may not {clip(action.type, 40)!r}")

        def act() -> DatasetMeta:
            key = _text(action.body.to_pybytes(), "action body")
            if key.startswith("{"):
                request = _json_request(action.body.to_pybytes(), "action body")
                named, away = request.get("key"), self._elsewhere(request.get("site"), who)
                if not isinstance(named, str) or (away is not None and action.type not in ("get", "delete")):
                    raise DatasetError("ERROR_KIND_INVALID_ARGUMENT", "bad action body: expected {\"key\": an id or "
                                       "name, \"site\": a site id} (get and delete act at another site)")
                key = named
                if away is not None:
                    relay, site, tenant = away
                    return relay.action(action.type, site, tenant, key)
            if action.type == "get":
                return self.store.resolve(key, who.tenant)
            if action.type == "delete":
                meta = self.store.delete(key, who.tenant)
                if not meta.replica:
                    dropped = self._drop_replicas(meta)
                    if dropped:
                        logger.info("deleted dataset %s and %d replicas of it", meta.id, dropped)
                return meta
            if action.type == "delete-replica" and who.tenant is None:
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
        """The schema of a dataset here (descriptor command: its id or name). pyarrow attaches
        the server's traceback to any error raised here (unlike every other method), so a
        request that cannot be answered gets an empty schema whose metadata says why."""
        who = self._caller(context)

        def schema() -> pa.Schema:
            key = _text(descriptor.command or b"", "descriptor") if descriptor.command is not None else ""
            meta = self.store.resolve(key, who.tenant)
            return pa.ipc.read_schema(pa.py_buffer(bytes.fromhex(meta.schema)))

        try:
            return flight.SchemaResult(self._served("schema", schema))
        except flight.FlightError as exc:
            return flight.SchemaResult(pa.schema([], metadata={"intertie-error": clip(str(exc), 1000)}))


class PeerFlightService(FlightService):
    """The peers' endpoint (mutual TLS: the handshake admits only certificates of the
    federation CA). A peer is known by the site its certificate names (its ``intertie-site:``
    URI, the first subjectAltName, all that Flight shows of it). As itself, it reads datasets
    by id (for the tasks it runs) and drops its replicas of a deleted original. For a tenant
    it vouches for (``TENANT_HEADER``), which must be one of its own ("tenant@<its site id>"),
    it lists, reads, stores and deletes that tenant's datasets, and only those."""

    SITE_ACTIONS = ("get", "delete-replica")
    TENANT_ACTIONS = ("get", "delete")

    def __init__(self, location: str, store: DatasetStore, **kwargs: Any) -> None:
        super().__init__(location, store, gate=PeerGate(), **kwargs)

    def _caller(self, context: Any) -> Caller:
        site = site_of_uri(context.peer_identity().decode("utf-8", "replace"))
        vouched = caller_of(context).tenant
        if vouched is None:  # as itself: a certificate made before sites were named by URI still pulls
            return Caller(None, peer=site or "(a site of the federation)")
        tenant, _, home = vouched.rpartition("@")
        if not site or home != site or not TENANT.match(tenant):
            log_throttled(logger, f"flight-vouch-{site}", "refused site %s acting for tenant %r", site, clip(vouched))
            raise _refused(f"not authenticated: a site may act only for its own tenants (tenant@<its site id>, "
                           f"named by an intertie-site: URI first in its certificate); this one is {site!r}")
        if not self._serves(vouched):
            raise _not_served(vouched)
        return Caller(vouched, peer=site)

    def do_put(self, context: Any, descriptor: flight.FlightDescriptor, reader: Any, writer: Any) -> None:
        if self._caller(context).tenant is None:
            raise flight.FlightServerError("ERROR_KIND_INVALID_ARGUMENT: peers store datasets here only for a tenant")
        super().do_put(context, descriptor, reader, writer)

    def list_flights(self, context: Any, criteria: bytes) -> Any:
        if self._caller(context).tenant is None:
            raise flight.FlightServerError("ERROR_KIND_INVALID_ARGUMENT: peers list datasets here only for a tenant")
        return super().list_flights(context, criteria)

    def do_action(self, context: Any, action: flight.Action) -> Any:
        if action.type not in (self.SITE_ACTIONS if self._caller(context).tenant is None else self.TENANT_ACTIONS):
            raise flight.FlightServerError(f"ERROR_KIND_INVALID_ARGUMENT: unknown action {clip(action.type)!r}")
        return super().do_action(context, action)

    def list_actions(self, context: Any) -> list[tuple[str, str]]:
        allowed = set(self.SITE_ACTIONS) | set(self.TENANT_ACTIONS)
        return [(kind, text) for kind, text in super().list_actions(context) if kind in allowed]


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
