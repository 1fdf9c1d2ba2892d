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
                 extra_args: list[str] | None = None) -> None:
        self._own_dir = state_dir is None
        self.state_dir = Path(state_dir) if state_dir else Path(tempfile.mkdtemp(prefix="intertie-"))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        address_file = self.state_dir / "address"
        address_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "intertie_gateway", "run", "--listen", "127.0.0.1:0",
               "--state-dir", str(self.state_dir), "--site-id", site_id, "--parent-pid", str(os.getpid())]
        if num_cpus is not None:
            cmd += ["--num-cpus", str(num_cpus)]
        if num_gpus is not None:
            cmd += ["--num-gpus", str(num_gpus)]
        cmd += extra_args or []
        self.log_path = self.state_dir / "gateway.log"
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        atexit.register(self.stop)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not address_file.exists():
            if self.process.poll() is not None:
                self.stop()
                raise SiteUnavailableError(
                    f"the embedded gateway exited with code {self.process.returncode}:\n{self._tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise SiteUnavailableError(f"the embedded gateway did not start within "
                                           f"{START_TIMEOUT_S:.0f} s:\n{self._tail()}")
            time.sleep(0.05)
        self.address = address_file.read_text().strip()
        logger.info("embedded gateway at %s (state %s)", self.address, self.state_dir)

    def _tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()
        atexit.unregister(self.stop)
        if self._own_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)
