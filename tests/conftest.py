"""Shared test fixtures. Integration fixtures start real gateway processes with real Ray."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faults import fault_proxy  # noqa: F401  (a fixture: a TCP proxy that cuts, stalls and delays links)

REPO = Path(__file__).resolve().parent.parent
# Ray takes ~6 s to start here, more when several start at once on 2 cores.
GATEWAY_START_TIMEOUT_S = 120.0
# Every embedded Ray in the suite gets a small object store: the machine has 2 cores
# and the suite starts several sites.
OBJECT_STORE_BYTES = 128 * 1024 * 1024


class GatewayProcess:
    """A real ``intertie-gateway run`` process in its own process group."""

    def __init__(self, state_dir: Path, *args: str, site_id: str = "test", num_cpus: int = 2) -> None:
        self.state_dir = state_dir
        # These sites test what a site does, not who may call it (test_auth, test_tenants and
        # test_tls do, as do the embedded site and the local federation, secure by default):
        # they run without auth unless a test says otherwise.
        auth = [] if "--auth" in args else ["--auth", "none"]
        self.args = ["--listen", "127.0.0.1:0", "--state-dir", str(state_dir), "--site-id", site_id,
                     "--num-cpus", str(num_cpus), "--object-store-memory", str(OBJECT_STORE_BYTES), *auth, *args]
        self.process: subprocess.Popen[bytes] | None = None
        self.address = ""
        self.log_path = state_dir / "gateway-test.log"

    def start(self) -> GatewayProcess:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        address_file = self.state_dir / "address"
        address_file.unlink(missing_ok=True)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen([sys.executable, "-m", "intertie_gateway", "run", *self.args],
                                        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True, cwd=REPO)
        log.close()
        deadline = time.monotonic() + GATEWAY_START_TIMEOUT_S
        while not address_file.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"gateway did not start:\n{self.log_tail()}")
            time.sleep(0.05)
        self.address = address_file.read_text().strip()
        return self

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL the gateway and everything in its process group (its embedded Ray)."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, as an operator would; SIGKILL if it does not stop in time."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        code = self.process.poll()
        self.kill()  # also reaps Ray processes left in the group
        return code


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """One site shared by the session: 2 CPUs, a 4 MiB payload limit, a custom resource."""
    proc = GatewayProcess(tmp_path_factory.mktemp("site"), "--max-payload-bytes", str(4 * 1024 * 1024),
                          "--resources", '{"bigmem": 1}', "--label", "region=test", site_id="shared")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def fed(gateway: GatewayProcess) -> Iterator[object]:
    import intertie

    federation = intertie.connect(gateway.address)
    try:
        yield federation
    finally:
        federation.close()


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[object]:
    """Starts dedicated gateways for tests that kill or restart them; all stopped afterwards."""
    started: list[GatewayProcess] = []

    def make(*args: str, state_dir: Path | None = None, **kwargs: object) -> GatewayProcess:
        proc = GatewayProcess(state_dir or tmp_path / f"site{len(started)}", *args, **kwargs)  # type: ignore[arg-type]
        started.append(proc)
        return proc

    try:
        yield make
    finally:
        for proc in started:
            proc.stop(timeout=10)
