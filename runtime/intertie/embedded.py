"""An embedded local site: a gateway child process with its own Ray, as ray.init() starts Ray.

The SDK never imports the gateway package; it starts it as a program.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from intertie.errors import SiteUnavailableError

logger = logging.getLogger(__name__)

# Ray needs ~6 s to start on a small machine; leave room for a loaded CI box.
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0


class EmbeddedGateway:
    """A local ``intertie-gateway run`` process; stopped by :meth:`stop` or at exit."""

    def __init__(self, *, num_cpus: int | None = None, num_gpus: int | None = None,
                 state_dir: str | os.PathLike[str] | None = None, site_id: str = "local",
                 extra_args: list[str] | None = None, listen: str = "127.0.0.1:0", wait: bool = True,
                 tls_ca: Path | None = None) -> None:
        self._own_dir = state_dir is None
        self.state_dir = Path(state_dir) if state_dir else Path(tempfile.mkdtemp(prefix="intertie-"))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.site_id = site_id
        self.address = ""
        self._cmd = [sys.executable, "-m", "intertie_gateway", "run", "--listen", listen,
                     "--state-dir", str(self.state_dir), "--site-id", site_id, "--parent-pid", str(os.getpid())]
        if num_cpus is not None:
            self._cmd += ["--num-cpus", str(num_cpus)]
        if num_gpus is not None:
            self._cmd += ["--num-gpus", str(num_gpus)]
        self._cmd += extra_args or []
        # Token auth, as every gateway: the gateway writes a token of tenant "local" for this
        # program at start (unless the caller chose the gateway's auth in extra_args).
        self.token: str | None = None
        self._token_file = None if "--auth" in self._cmd else self.state_dir / "client-token"
        if self._token_file is not None:
            self._cmd += ["--bootstrap-token", str(self._token_file)]
        self.tls_ca = tls_ca  # the CA of its certificate, when it serves TLS
        self.log_path = self.state_dir / "gateway.log"
        self._log = open(self.log_path, "ab")
        self.process: subprocess.Popen[bytes] | None = None
        self._users = 0  # connections using it, when shared by acquire()
        self._shared_key: tuple[int | None, int | None, str | None] | None = None
        self.launch()
        if wait:
            self.wait_ready()

    def launch(self) -> None:
        """Starts the gateway process (again, after :meth:`kill`, with the same state)."""
        (self.state_dir / "address").unlink(missing_ok=True)
        if self._log.closed:
            self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self._cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        atexit.register(self.stop)

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> str:
        assert self.process is not None
        address_file = self.state_dir / "address"
        deadline = time.monotonic() + timeout
        while not address_file.exists():
            if self.process.poll() is not None:
                code = self.process.returncode
                self.stop()
                raise SiteUnavailableError(f"the embedded gateway {self.site_id} exited with code {code}:\n"
                                           f"{self._tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise SiteUnavailableError(f"the embedded gateway {self.site_id} did not start within "
                                           f"{timeout:.0f} s:\n{self._tail()}")
            time.sleep(0.05)
        self.address = address_file.read_text().strip()
        if self._token_file is not None:  # written before the gateway serves
            self.token = self._token_file.read_text().strip()
        logger.info("embedded gateway %s at %s (state %s)", self.site_id, self.address, self.state_dir)
        return self.address

    def _tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL the gateway and its embedded Ray, as a crash would; :meth:`launch` restarts it."""
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        if self.process is not None:
            try:  # also whatever Ray left in the gateway's process group
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.process.wait()
        self._log.close()
        atexit.unregister(self.stop)
        if self._own_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def release(self) -> None:
        """Ends one connection's use of this site (see :func:`acquire`): the last one stops it."""
        with _shared_lock:
            self._users -= 1
            last = self._users <= 0
            if last and self._shared_key is not None and _shared.get(self._shared_key) is self:
                del _shared[self._shared_key]
        if last:
            self.stop()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None and bool(self.address)


# The embedded sites ``intertie.connect()`` started, by their options: a notebook cell that
# connects again reuses the site (and its Ray) while an earlier connection to it is open;
# the last connection closed stops it (EmbeddedGateway.release).
_shared: dict[tuple[int | None, int | None, str | None], EmbeddedGateway] = {}
_shared_lock = threading.Lock()


def acquire(*, num_cpus: int | None = None, num_gpus: int | None = None,
            state_dir: str | os.PathLike[str] | None = None) -> EmbeddedGateway:
    """The running embedded site with these options, or a new one, for one more connection
    (which calls :meth:`EmbeddedGateway.release` once when it closes)."""
    key = (num_cpus, num_gpus, str(Path(state_dir).resolve()) if state_dir is not None else None)
    with _shared_lock:  # held while a new site starts: a second connect() waits for it, not another Ray
        gateway = _shared.get(key)
        if gateway is not None and gateway.alive():
            gateway._users += 1
            logger.info("reusing the embedded site at %s (started by an earlier intertie.connect())", gateway.address)
            return gateway
        gateway = EmbeddedGateway(num_cpus=num_cpus, num_gpus=num_gpus, state_dir=state_dir)
        gateway._users, gateway._shared_key = 1, key
        _shared[key] = gateway
        return gateway


def stop_all(gateways: list[EmbeddedGateway]) -> None:
    """Stops gateways together: SIGTERM to all first (they drain in parallel), then waits for each."""
    for gateway in gateways:
        if gateway.process is not None and gateway.process.poll() is None:
            gateway.process.send_signal(signal.SIGTERM)
    for gateway in gateways:
        gateway.stop()


# The sites of a local federation: different sizes, prices, carbon intensity, and one
# with a (logical) GPU of accelerator type T4, so placement has something to choose.
LOCAL_SITES: tuple[dict[str, object], ...] = (
    {"site_id": "alpha", "num_cpus": 2, "labels": {"region": "eu-north", "price": "0.04", "carbon": "30"}},
    {"site_id": "beta", "num_cpus": 4, "labels": {"region": "eu-west", "price": "0.03", "carbon": "250"}},
    {"site_id": "gamma", "num_cpus": 2, "num_gpus": 1, "resources": {"accelerator_type:T4": 1},
     "labels": {"region": "us-east", "price": "0.09", "carbon": "400"}},
)


def _make_certs(directory: Path, site_ids: list[str]) -> Path:
    """A CA and a certificate per site for loopback (``intertie-gateway certs create``, a
    program: the SDK does not import the gateway); returns the CA's certificate."""
    sites = [arg for site_id in site_ids for arg in ("--site", site_id)]
    done = subprocess.run([sys.executable, "-m", "intertie_gateway", "certs", "create", "--dir", str(directory),
                           *sites, "--host", "127.0.0.1", "--host", "localhost"],
                          capture_output=True, text=True, timeout=START_TIMEOUT_S)
    if done.returncode != 0:
        raise SiteUnavailableError(f"could not make the local federation's certificates: {done.stderr.strip()}")
    return directory / "ca.pem"


# Ports that sites must know of each other before they start are picked from here: outside
# the range the kernel hands out for bind(0) and outgoing connections, and outside Ray's worker
# ports (10002-19999 by default). A port the kernel chose at random is free when looked at,
# but the next process that starts (another site's Ray) may be given it before the site binds it.
PICK_PORTS_FROM = (20000, 32767)


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (peers must know each other's address before start)."""
    import random
    import socket

    low, high = PICK_PORTS_FROM
    if _overlaps_ephemeral(low, high):
        low = high = 0  # (a machine that hands out these ports itself: let the kernel choose)
    rng = random.Random()
    socks: list[socket.socket] = []
    try:
        for _ in range(n * 50):
            if len(socks) == n:
                break
            sock = socket.socket()
            try:
                sock.bind(("127.0.0.1", rng.randint(low, high) if high else 0))
            except OSError:  # in use: another
                sock.close()
                continue
            socks.append(sock)
        if len(socks) < n:
            raise OSError(f"found only {len(socks)} of {n} free ports between {low} and {high}")
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _overlaps_ephemeral(low: int, high: int) -> bool:
    try:
        first, last = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return False  # (not Linux: its default ephemeral range is 49152-65535)
    return first <= high and low <= last


class LocalFederation:
    """N gateways on loopback, each with its own embedded Ray, all peered with each other.

    ``intertie-gateway local --sites N`` runs one from the command line; tests and
    examples use it directly. Sites follow :data:`LOCAL_SITES` (cycled, with a suffix,
    beyond three).

    ``secure`` (the default), as a federation between owners runs: a CA and a certificate
    per site (``intertie-gateway certs create``), TLS towards tenants, mutual TLS between the
    sites on their peers' endpoints, and token auth; ``intertie.connect(local)`` (its first
    site) or ``intertie.connect(local.site("beta"))`` use a site's token and CA. ``secure=False``: plaintext and no auth, as on a trusted network.
    """

    def __init__(self, sites: int = 3, *, base_dir: str | os.PathLike[str] | None = None,
                 heartbeat_s: float = 0.5, object_store_memory: int = 128 << 20,
                 extra_args: list[str] | None = None, secure: bool = True) -> None:
        if sites < 1:
            raise ValueError("a federation needs at least one site")
        self._own_dir = base_dir is None
        self.base_dir = Path(base_dir) if base_dir else Path(tempfile.mkdtemp(prefix="intertie-fed-"))
        ids = [str(LOCAL_SITES[i % len(LOCAL_SITES)]["site_id"]) + (f"-{i // len(LOCAL_SITES)}"
                                                                    if i >= len(LOCAL_SITES) else "")
               for i in range(sites)]
        ports = free_ports(2 * sites if secure else sites)
        addresses = [f"127.0.0.1:{p}" for p in ports[:sites]]
        # Where sites reach each other: the peers' endpoints (mutual TLS), or the one endpoint.
        links = [f"127.0.0.1:{p}" for p in ports[sites:]] if secure else addresses
        self.tls_ca: Path | None = None
        if secure:
            self.tls_ca = _make_certs(self.base_dir / "certs", ids)
        self.gateways: list[EmbeddedGateway] = []
        try:
            for i, site_id in enumerate(ids):
                profile = dict(LOCAL_SITES[i % len(LOCAL_SITES)])
                labels = dict(profile.get("labels", {}))  # type: ignore[call-overload]
                args = ["--heartbeat", str(heartbeat_s), "--object-store-memory", str(object_store_memory),
                        "--region", str(labels.get("region", "local"))]
                for key, value in labels.items():
                    args += ["--label", f"{key}={value}"]
                if profile.get("resources"):
                    import json

                    args += ["--resources", json.dumps(profile["resources"])]
                for j, peer in enumerate(links):
                    if j != i:
                        args += ["--peer", peer]
                if secure:
                    certs = self.base_dir / "certs"
                    args += ["--tls-cert", str(certs / f"{site_id}.pem"), "--tls-key", str(certs / f"{site_id}.key"),
                             "--tls-ca", str(self.tls_ca), "--peer-listen", links[i]]
                else:
                    args += ["--auth", "none"]
                gpus = profile.get("num_gpus")
                self.gateways.append(EmbeddedGateway(
                    num_cpus=int(profile["num_cpus"]),  # type: ignore[call-overload]
                    num_gpus=int(gpus) if gpus is not None else None,  # type: ignore[call-overload]
                    state_dir=self.base_dir / site_id, site_id=site_id, listen=addresses[i],
                    extra_args=args + list(extra_args or []), wait=False, tls_ca=self.tls_ca))
            for gateway in self.gateways:  # they start in parallel; Ray takes a while each
                gateway.wait_ready()
        except BaseException:
            self.stop()
            raise

    # What intertie.connect(local) reaches: the first site, as its tenant "local".
    @property
    def address(self) -> str:
        return self.gateways[0].address

    @property
    def token(self) -> str | None:
        return self.gateways[0].token

    @property
    def addresses(self) -> list[str]:
        return [g.address for g in self.gateways]

    def site(self, site_id: str) -> EmbeddedGateway:
        for gateway in self.gateways:
            if gateway.site_id == site_id:
                return gateway
        raise KeyError(site_id)

    def stop(self) -> None:
        stop_all(self.gateways)
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
