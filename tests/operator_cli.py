"""What an operator runs for tests: `intertie-gateway` commands (tokens, certificates) as programs."""

from __future__ import annotations

import os
import subprocess
import sys


def gateway_cli(*args: str) -> str:
    """Runs ``intertie-gateway ARGS``; its last line of output ("" if none). Fails the test if it fails."""
    done = subprocess.run([sys.executable, "-m", "intertie_gateway", *args], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


def token_for(tenant: str, state_dir: str | os.PathLike[str]) -> str:
    """A new token of ``tenant`` at the site of ``state_dir`` (a running gateway takes it at once)."""
    return gateway_cli("token", "create", "--tenant", tenant, "--state-dir", str(state_dir))
