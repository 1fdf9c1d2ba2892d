"""The site's data plane in a process of its own, so that Arrow decoding of network data
cannot take the gateway down.

Arrow's C++ IPC reader can crash on some malformed streams before any Python code sees a
batch (Arrow 26: a Flight message with a body but no header dereferences a null buffer in
``arrow::ipc::Message::Open``), and validation in the handler cannot catch that. So the
Flight endpoint (uploads from clients and workers, downloads, actions) and the pulls from
peers run in a child process that owns the dataset store; the gateway talks to it over
Flight on loopback and restarts it, on the same port, when it dies. A crash then fails the
transfers under way, not the site: its journal, its Ray and its tasks go on.

The child serves the public Flight surface of :class:`~intertie_gateway.flight_service.FlightService`
plus internal actions (``dp-*``) that only the site itself may call: pull a dataset from
peers, evict replicas, where a dataset lies, stop transfers, and a sync that hands it the
peers' Flight addresses and returns the ids it holds.

The site itself (this gateway, and its Ray workers) shows a secret made at each gateway
start; the child gets it, with the site's certificate and key, on its stdin (never in its
arguments or environment). With a certificate the endpoint serves TLS (``grpc+tls://``), and
every client of the site verifies it with the federation CA, or the certificate itself.

With the federation CA, the child serves peers on a second endpoint with mutual TLS
(:class:`~intertie_gateway.flight_service.PeerFlightService`; a Flight server, like a gRPC
one, either requires a client certificate of every caller or never asks for one), and
pulls from peers, tells them of deleted originals and makes its tenants' requests at them
(:class:`~intertie_gateway.relay.Relay`) with the site's certificate.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from intertie_gateway.certs import site_of_uri
from intertie_gateway.datasets import DatasetError, DatasetMeta, DatasetStore
from intertie_gateway.files import write_private
from intertie_gateway.flight_service import SECRET_HEADER, FlightService, PeerFlightService, caller_of
from intertie_gateway.policy import PolicyError, PolicyFile
from intertie_gateway.relay import Relay
from intertie_gateway.tokens import TokenStore
from intertie_gateway.transport import Transport

logger = logging.getLogger(__name__)

# How often the gateway refreshes the ids the data plane holds (the site's status lists them,
# placement counts them as resident) and tells it the peers' Flight addresses.
SYNC_S = 0.5
# How long a (re)started data plane may take to serve.
START_TIMEOUT_S = 60.0
# An internal call that is not a pull answers within this (a pull may take minutes).
CALL_TIMEOUT_S = 30.0
# Restarts closer together than this are delayed to it: a data plane that dies at once on
# every start must not spin.
RESTART_MIN_INTERVAL_S = 1.0
# Owners of local datasets remembered at most (see DataPlane._owner_of).
MAX_OWNERS_KNOWN = 100_000
# Asking a non-local store where a dataset is happens on the event loop: briefly.
LOCATION_TIMEOUT_S = 2.0
# A pull that has no source yet (peers not up after a restart) asks again this often.
SOURCES_RETRY_S = 0.5
# A peer's endpoint that has not shown its certificate in this time is asked again at the
# next request that needs it.
IDENTIFY_TIMEOUT_S = 5.0


class DataPlaneService(FlightService):
    """The child's Flight service: the public surface plus the gateway's own actions.
    ``identify``: which site serves a peer's endpoint (None: a federation without a CA, where
    tenants call each site themselves; else its tenants' requests that name a peer are
    relayed there)."""

    def __init__(self, location: str, store: DatasetStore, *, connect: Callable[[str], flight.FlightClient],
                 identify: Callable[[str], str] | None, **kwargs: Any) -> None:
        self._peer_addresses: list[str] = []

        def peers() -> list[str]:
            return list(self._peer_addresses)

        relay = Relay(store.site_id, peers, connect, identify) if identify is not None else None
        super().__init__(location, store, peers=peers, connect=connect, relay=relay, **kwargs)

    def do_action(self, context: Any, action: flight.Action) -> Any:
        if not action.type.startswith("dp-"):
            return super().do_action(context, action)
        who = caller_of(context)
        internal_caller = who.internal and not who.worker  # (the gateway; not its Ray workers)

        def internal() -> Any:
            try:
                request = json.loads(action.body.to_pybytes())
            except ValueError:
                request = None
            if not internal_caller or not isinstance(request, dict):
                raise DatasetError("ERROR_KIND_INVALID_ARGUMENT", f"unknown action {action.type[:40]!r}")
            if action.type == "dp-sync":
                self._peer_addresses = [str(a) for a in request.get("peers", [])]
                self.store.touch([str(i) for i in request.get("touched", [])])
                return {"owners": self.store.owners()}
            if action.type == "dp-location":
                owner = request.get("owner")
                return {"path": self.store.location(str(request["id"]), None if owner is None else str(owner))}
            if action.type == "dp-pull":
                sources = [(str(s), str(a)) for s, a in request["sources"]]
                owner = request.get("owner")
                meta = self.store.pull(str(request["id"]), lambda: sources, timeout_s=float(request["timeout_s"]),
                                       owner=None if owner is None else str(owner))
                return json.loads(meta.to_json())
            if action.type == "dp-evict":
                return {"dropped": [m.id for m in self.store.evict(set(request["keep"]))]}
            if action.type == "dp-close":
                self.store.close()
                return {}
            raise DatasetError("ERROR_KIND_INVALID_ARGUMENT", f"unknown action {action.type[:40]!r}")

        answer = self._served("action", internal)
        return iter([flight.Result(pa.py_buffer(json.dumps(answer).encode()))])


class DataPlane:
    """The gateway's handle on its data-plane process: what the scheduler asks of the
    dataset store, as calls to the child, which it starts and restarts."""

    def __init__(self, state_dir: Path, url: str, site_id: str, *, host: str, port: int = 0,
                 quota_bytes: int = 0, replica_cache_bytes: int = 0, max_rate: float = 0.0,
                 peers: Callable[[], Sequence[str]] = lambda: (), transport: Transport, tokens: Path | None,
                 policy_file: str = "") -> None:
        """``transport``: the site's certificate (TLS) and the federation CA; ``tokens``: the
        tenants' token file (None: auth none); ``policy_file``: the site's policy (tenants'
        dataset quotas), which the child reads itself, as the gateway does."""
        self.url = url
        self.site_id = site_id
        self._state_dir = state_dir
        self._host = host
        self._port = port
        self._peer_port = 0  # the peers' endpoint (mutual TLS), kept across restarts like the other
        self._args = ["--quota", str(quota_bytes), "--replica-cache", str(replica_cache_bytes),
                      "--max-rate", str(max_rate), *(["--tokens", str(tokens)] if tokens is not None else []),
                      *(["--policy", policy_file] if policy_file else [])]
        self._peers = peers
        self._transport = transport
        self._secret = secrets.token_hex(32)
        # What the site's Ray workers show: they run tenants' code, so it opens less (see Caller).
        self._worker_secret = secrets.token_hex(32)
        self._owners: dict[str, tuple[tuple[int, int, int], str]] = {}  # id -> (metadata file version, owner)
        self._options = [(SECRET_HEADER.encode(), self._secret.encode())]
        self._process: subprocess.Popen[bytes] | None = None
        self._client: flight.FlightClient | None = None
        self._lock = threading.Lock()
        self._holdings: dict[str, str] = {}  # id -> owner, as of the last sync
        self._touched: set[str] = set()
        # A local folder (what workers memory-map): the gateway finds files there itself.
        self._root = None if "://" in url and not url.startswith("file://") \
            else Path(url.removeprefix("file://")).expanduser().resolve()  # absolute: workers run elsewhere
        self._stopping = threading.Event()
        self._closing = threading.Event()  # transfers give up
        self._started_at = 0.0
        self.restarts = 0
        self._start()
        self._watch = threading.Thread(target=self._supervise, name="intertie-dataplane", daemon=True)
        self._watch.start()

    @property
    def address(self) -> str:
        return f"{self._host}:{self._port}"

    @property
    def peer_address(self) -> str:
        """Where peers read this site's datasets over mutual TLS ("": a plaintext federation,
        whose peers read at ``address``)."""
        return f"{self._host}:{self._peer_port}" if self._transport.mutual else ""

    @property
    def worker_endpoint(self) -> str:
        """What the site's Ray workers need to reach this endpoint: its address, the
        certificate to verify it with, and the workers' secret (handed to workers by the
        gateway through Ray, never to a client; it reads and stores by id, and opens no more)."""
        return json.dumps({"address": self.address, "roots": _roots(self._transport).decode(),
                           "secret": self._worker_secret})
    def _start(self) -> None:
        ready = self._state_dir / "dataplane.port"
        ready.unlink(missing_ok=True)
        peers = ["--peer-listen", f"{self._host}:{self._peer_port}"] if self._transport.mutual else []
        cmd = [sys.executable, "-m", "intertie_gateway.dataplane", "--url", self.url, "--site-id", self.site_id,
               "--listen", f"{self._host}:{self._port}", *peers, "--ready-file", str(ready),
               "--parent-pid", str(os.getpid()), "--log-level", logging.getLevelName(logger.getEffectiveLevel()),
               *self._args]
        # Its log lines go where the gateway's go: one log per site for the operator.
        self._process = subprocess.Popen(cmd, stdin=subprocess.PIPE)
        assert self._process.stdin is not None
        with self._process.stdin as pipe:
            pipe.write(json.dumps({"secret": self._secret, "worker_secret": self._worker_secret,
                                   "cert": self._transport.cert.decode(),
                                   "key": self._transport.key.decode(), "ca": self._transport.ca.decode()}).encode())
        self._started_at = time.monotonic()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready.exists():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self._process.kill()
                raise OSError(f"the data plane of site {self.site_id!r} did not start (its log lines are above)")
            time.sleep(0.02)
        self._port, self._peer_port = (int(p) for p in ready.read_text().split())
        client = connect(self.address, _roots(self._transport))
        with self._lock:
            old, self._client = self._client, client
        if old is not None:
            old.close()
        self._sync()

    def _supervise(self) -> None:
        """Restarts the child when it dies (a crash decoding a hostile stream); refreshes ids."""
        while not self._stopping.wait(SYNC_S):
            process = self._process
            if process is not None and process.poll() is not None:
                logger.error("the data plane of site %s died (exit %s); restarting it on port %d", self.site_id,
                             process.returncode, self._port)
                wait = RESTART_MIN_INTERVAL_S - (time.monotonic() - self._started_at)
                if wait > 0 and self._stopping.wait(wait):
                    return
                try:
                    self._start()
                    self.restarts += 1
                except OSError as exc:
                    logger.error("%s", exc)
                continue
            try:
                self._sync()
            except DatasetError as exc:
                logger.debug("data plane sync: %s", exc)

    def _sync(self) -> None:
        with self._lock:
            touched, self._touched = self._touched, set()
        answer = self._call("dp-sync", {"peers": list(self._peers()), "touched": sorted(touched)})
        with self._lock:
            self._holdings = {str(i): str(o) for i, o in dict(answer["owners"]).items()}

    def _call(self, action: str, body: dict[str, Any], timeout: float | None = CALL_TIMEOUT_S) -> Any:
        with self._lock:
            client = self._client
        if client is None:
            raise DatasetError("ERROR_KIND_SITE_FAILURE", f"site {self.site_id!r}: its data plane is not running")
        request = json.dumps(body).encode()
        try:
            result = next(iter(client.do_action(flight.Action(action, request),
                                                flight.FlightCallOptions(timeout=timeout, headers=self._options))))
        except flight.FlightError as exc:
            text = str(exc).split(". Detail:", 1)[0]
            for kind in ("ERROR_KIND_NOT_FOUND", "ERROR_KIND_DATASET_NOT_FOUND", "ERROR_KIND_SITE_FAILURE",
                         "ERROR_KIND_INVALID_ARGUMENT", "ERROR_KIND_PAYLOAD_TOO_LARGE"):
                if text.startswith(kind + ": "):
                    raise DatasetError(kind, text[len(kind) + 2:]) from None
            raise DatasetError("ERROR_KIND_SITE_FAILURE",
                               f"site {self.site_id!r}: its data plane failed ({text[:300]})") from None
        return json.loads(result.body.to_pybytes())

    # ---------------------------------------------------------------- what the scheduler asks
    def owners(self) -> dict[str, str]:
        """The datasets here (id -> owner, as this site names it), as of the last sync."""
        with self._lock:
            return dict(self._holdings)

    def location(self, dataset_id: str, owner: str | None = None) -> str | None:
        """Where a worker reads a dataset (see DatasetStore.location), if it is ``owner``'s
        (None: whoever's). Called on the event loop: a local folder is looked at directly
        (ids were validated as plain names), other stores are asked briefly."""
        if self._root is not None:
            if owner is not None:
                if self._owner_of(dataset_id) != owner:
                    return None
            elif not (self._root / f"{dataset_id}.json").exists():
                return None
            with self._lock:
                self._touched.add(dataset_id)  # for the eviction order, told at the next sync
            return str(self._root / f"{dataset_id}.arrow")
        try:
            path = self._call("dp-location", {"id": dataset_id, "owner": owner}, timeout=LOCATION_TIMEOUT_S)["path"]
        except DatasetError as exc:
            logger.warning("where is dataset %s? %s", dataset_id, exc)
            return None
        return path if isinstance(path, str) else None

    def _owner_of(self, dataset_id: str) -> str | None:
        """The owner a local dataset's metadata names (None: not here). Read once per version
        of the file (a stat tells the version): tasks start on the event loop."""
        path = self._root / f"{dataset_id}.json" if self._root is not None else None
        try:
            assert path is not None
            stat = path.stat()
            version = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            known = self._owners.get(dataset_id)
            if known is not None and known[0] == version:
                return known[1]
            owner = str(json.loads(path.read_text()).get("owner", ""))
        except (OSError, ValueError, AttributeError):
            return None
        if len(self._owners) >= MAX_OWNERS_KNOWN:
            self._owners.clear()
        self._owners[dataset_id] = (version, owner)
        return owner

    def pull(self, dataset_id: str, sources: Callable[[], Sequence[tuple[str, str]]], *,
             timeout_s: float, owner: str | None = None) -> DatasetMeta:
        """Has the data plane copy a dataset from the sites that hold it. ``sources()`` is
        asked again until it names one (peers come up after a restart) and after a transfer
        that failed for want of a reachable source, until nothing has arrived for ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = list(sources())
            left = deadline - time.monotonic()
            if found:
                try:
                    meta = self._call("dp-pull", {"id": dataset_id, "sources": found, "timeout_s": max(left, 1.0),
                                                  "owner": owner}, timeout=None)
                    break
                except DatasetError as exc:
                    # Asked again only when no source answered in time (the store's stall error):
                    # one that sent invalid data, or no longer holds it, fails the pull at once.
                    if "nothing arrived for" not in str(exc) or self._closing.is_set() \
                            or time.monotonic() > deadline:
                        raise
            elif left <= 0:
                raise DatasetError("ERROR_KIND_SITE_FAILURE",
                                   f"dataset {dataset_id} could not be fetched to site {self.site_id!r} "
                                   f"(nothing arrived for {timeout_s:.0f} s): no site that holds it is reachable")
            if self._closing.wait(SOURCES_RETRY_S):
                raise DatasetError("ERROR_KIND_SITE_FAILURE", f"site {self.site_id!r} stopped during the transfer")
        with self._lock:
            self._holdings.setdefault(dataset_id, str(meta.get("owner", "")))
        return DatasetMeta(**{f.name: meta[f.name] for f in fields(DatasetMeta) if f.name in meta})

    def evict(self, keep: Collection[str] = ()) -> list[str]:
        dropped = list(self._call("dp-evict", {"keep": sorted(keep)})["dropped"])
        with self._lock:
            for dataset_id in dropped:
                self._holdings.pop(dataset_id, None)
        return dropped

    def close(self) -> None:
        """Stops the transfers under way (the gateway is stopping)."""
        self._closing.set()
        try:
            self._call("dp-close", {}, timeout=5)
        except DatasetError as exc:
            logger.info("stopping the data plane's transfers: %s", exc)

    def shutdown(self) -> None:
        self._stopping.set()
        self._watch.join(timeout=5)
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _roots(transport: Transport) -> bytes:
    """What the site's own clients verify its endpoint with: the federation CA, else the
    site's certificate itself (b"": plaintext)."""
    return transport.ca or transport.cert


def connect(address: str, roots: bytes, **tls: Any) -> flight.FlightClient:
    """A Flight client of an endpoint that serves TLS with a certificate ``roots`` verify
    (plaintext when ``roots`` is empty); ``tls``: a client certificate (mutual TLS)."""
    if not roots:
        return flight.FlightClient(f"grpc://{address}")
    return flight.FlightClient(f"grpc+tls://{address}", tls_root_certs=roots, **tls)


def identify_with(transport: Transport) -> Callable[[str], str]:
    """Which site serves a peer's endpoint: the site its certificate names (its
    ``intertie-site:`` URI), checked with the federation CA in a TLS handshake in which this
    site shows its own certificate (that endpoint asks every caller for one). The gateway
    knows the peers' addresses; this is how the data plane knows whose each one is."""
    context = ssl.create_default_context(cadata=transport.ca.decode())
    context.check_hostname = False  # the site is what is checked here; Flight's clients check the host
    context.set_alpn_protocols(["h2"])
    with tempfile.TemporaryDirectory() as folder:  # ssl loads a certificate and its key from files only
        cert, key = Path(folder) / "site.pem", Path(folder) / "site.key"
        cert.write_bytes(transport.cert)
        write_private(key, transport.key)
        context.load_cert_chain(cert, key)

    def identify(address: str) -> str:
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        with socket.create_connection((host, int(port)), timeout=IDENTIFY_TIMEOUT_S) as raw, \
                context.wrap_socket(raw, server_hostname=host) as tls:
            names: Any = (tls.getpeercert() or {}).get("subjectAltName", ())  # ((kind, value), ...)
        for kind, value in names:
            if kind == "URI" and site_of_uri(str(value)):
                return site_of_uri(str(value))
        raise OSError(f"the certificate served at {address} names no site")

    return identify


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="intertie_gateway.dataplane")
    parser.add_argument("--url", required=True)
    parser.add_argument("--site-id", required=True)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--peer-listen", default="")
    parser.add_argument("--ready-file", required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--quota", type=int, default=0)
    parser.add_argument("--replica-cache", type=int, default=0)
    parser.add_argument("--max-rate", type=float, default=0.0)
    parser.add_argument("--tokens", default=None)
    parser.add_argument("--policy", default="")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s [data plane]: %(message)s",
                        stream=sys.stderr)
    try:
        given = json.loads(sys.stdin.read())
    except ValueError:
        given = {}
    if not isinstance(given, dict) or not given.get("secret"):
        print("intertie_gateway.dataplane: started without its secret on stdin", file=sys.stderr)
        return 2
    transport = Transport(given["cert"].encode(), given["key"].encode(), given["ca"].encode())
    tls: dict[str, Any] = {"tls_certificates": [(transport.cert, transport.key)]} if transport.tls else {}

    def peer(address: str) -> flight.FlightClient:
        """A client of a peer's endpoint: mutual TLS with the site's certificate in a federation with a CA."""
        if not transport.mutual:
            return flight.FlightClient(f"grpc://{address}")
        return connect(address, transport.ca, cert_chain=transport.cert, private_key=transport.key)

    try:  # (the gateway refused to start on a broken policy; one broken since is not in force there either)
        policy = PolicyFile(args.policy, clock=time.monotonic)
    except PolicyError as exc:
        logger.error("policy: %s; the data plane applies no tenant's dataset quota until it is mended", exc)
        policy = PolicyFile("", clock=time.monotonic)
    store = DatasetStore(args.url, args.site_id, quota_bytes=args.quota, replica_cache_bytes=args.replica_cache,
                         connect=peer, owner_quota=lambda owner: policy.current().limits(owner).max_dataset_bytes)
    tokens = TokenStore(Path(args.tokens)) if args.tokens else None

    def serves(tenant: str) -> bool:
        return policy.current().accepts(tenant)

    server = DataPlaneService(f"{'grpc+tls' if transport.tls else 'grpc'}://{args.listen}", store,
                              max_rate=args.max_rate, secret=given["secret"], tokens=tokens, connect=peer,
                              worker_secret=str(given.get("worker_secret", "")), serves=serves,
                              identify=identify_with(transport) if transport.mutual else None, **tls)
    servers: list[FlightService] = [server]
    if args.peer_listen:
        servers.append(PeerFlightService(f"grpc+tls://{args.peer_listen}", store, max_rate=args.max_rate,
                                         peers=server.peers, connect=peer, verify_client=True, serves=serves,
                                         root_certificates=transport.ca, **tls))
    ready = Path(args.ready_file)
    tmp = ready.with_suffix(".tmp")
    tmp.write_text(f"{server.port} {servers[-1].port if args.peer_listen else 0}")
    os.replace(tmp, ready)

    def watch_parent() -> None:  # stops with the gateway, however that ends
        while os.getppid() == args.parent_pid:
            time.sleep(1.0)
        store.close()
        for each in servers:
            each.shutdown()

    threading.Thread(target=watch_parent, daemon=True).start()
    try:
        server.serve()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
