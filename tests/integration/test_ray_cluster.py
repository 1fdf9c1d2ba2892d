"""A gateway attached to a real two-node Ray cluster on this machine, as an operator runs it:
`ray start --head` (2 CPUs) plus a second node joining it (1 CPU), both with Ray's token auth,
then `intertie-gateway run --ray HOST:PORT --ray-token-file FILE`.

Each Ray node is its own `ray start --block` process in its own session, stopped by its PID
(never `ray stop`: that stops every Ray on the machine, other tests' included); whatever
outlives it is found by its temp dir, which only this test's processes name, and killed.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import intertie
from intertie.embedded import free_ports
from intertie.errors import PlacementError

RAY = str(Path(sys.executable).with_name("ray"))
# `ray start` takes ~3-6 s here, more when other tests start Ray on the same 2 cores.
NODE_START_TIMEOUT_S = 60.0
# A `ray start --block` stops its processes within a few seconds of SIGTERM.
NODE_STOP_TIMEOUT_S = 20.0
# A refused attach must be said at once (the probe of the head answers in milliseconds).
REFUSAL_TIMEOUT_S = 10.0


def processes_naming(marker: str) -> list[int]:
    """PIDs of the processes whose command line contains ``marker`` (a temp dir of this test)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if marker.encode() in cmdline:
            found.append(int(entry.name))
    return found


class RayNode:
    """One `ray start --block` process of the cluster: a head, or a node joining one."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], base: Path) -> None:
        self.name = name
        self.log_path = base / f"{name}.log"
        # A short temp dir: Ray's socket paths under it must stay within the 107 bytes of AF_UNIX.
        self.temp_dir = base / name
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [RAY, "start", "--block", "--disable-usage-stats", f"--temp-dir={self.temp_dir}", *args],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)

    def wait_started(self) -> None:
        """Until `ray start` says the node runs (it has registered with the head by then)."""
        deadline = time.monotonic() + NODE_START_TIMEOUT_S
        while b"Ray runtime started" not in self.log_path.read_bytes():
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start ({self.name}) exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"ray start ({self.name}) did not start in {NODE_START_TIMEOUT_S:g} s:\n{self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])

    def stop(self) -> None:
        """SIGTERM to `ray start --block` (it stops its raylet, GCS, agents); SIGKILL to its
        process group if it does not exit in time; then any process still naming its temp
        dir (Ray's workers run in sessions of their own) is killed by its PID."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(NODE_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # its own group (start_new_session)
        except ProcessLookupError:
            pass
        self.process.wait()
        deadline = time.monotonic() + NODE_STOP_TIMEOUT_S
        while (left := processes_naming(str(self.temp_dir))) and time.monotonic() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[str, Path]]:
    """A head of 2 CPUs and a node of 1, with token auth: (the head's HOST:PORT, token file)."""
    base = Path(tempfile.mkdtemp(prefix="itr-", dir="/tmp"))
    token_file = base / "token"
    token_file.write_text(secrets.token_hex(16))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH_", "RAY_ADDRESS"))}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file), RAY_USAGE_STATS_ENABLED="0")
    gcs, dashboard, client, agent_head, agent_node = free_ports(5)
    address = f"127.0.0.1:{gcs}"
    nodes: list[RayNode] = []
    try:
        # Every port given: two nodes on one machine, and other tests' Ray beside them.
        nodes.append(RayNode("head", ["--head", f"--port={gcs}", "--num-cpus=2", "--include-dashboard=false",
                                      f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
                                      f"--dashboard-agent-listen-port={agent_head}",
                                      f"--object-store-memory={128 << 20}"], env, base))
        nodes[0].wait_started()
        nodes.append(RayNode("node", [f"--address={address}", "--num-cpus=1",
                                      f"--dashboard-agent-listen-port={agent_node}",
                                      f"--object-store-memory={128 << 20}"], env, base))
        nodes[1].wait_started()
        yield address, token_file
    finally:
        for node in reversed(nodes):
            node.stop()
        leaked = processes_naming(str(base))
        shutil.rmtree(base, ignore_errors=True)
    assert not leaked, f"Ray processes of the test cluster outlived it: {leaked}"  # (not reached on an error)


@pytest.fixture
def no_ray_auth_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The gateway's environment as an operator's shell without Ray's auth variables, and
    a home without ~/.ray/auth_token: what it knows of the token is what it is told."""
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def attach_fails(address: str, state_dir: Path, *args: str, code: int = 1) -> str:
    """Runs a gateway that must refuse to start: its one line on stderr."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "intertie_gateway", "run", "--listen", "127.0.0.1:0",
                           "--state-dir", str(state_dir), "--ray", address, *args], capture_output=True, text=True,
                          timeout=REFUSAL_TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert done.returncode == code, done
    assert time.monotonic() - started < REFUSAL_TIMEOUT_S
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


def test_a_gateway_attached_to_a_two_node_cluster_uses_both_and_knows_the_largest_node(  # type: ignore[no-untyped-def]
        cluster: tuple[str, Path], no_ray_auth_env: Path, tmp_path: Path, gateway_factory) -> None:
    address, token_file = cluster
    # Token auth is detected; without the token the gateway says what to pass, at once.
    refused = tmp_path / "refused"
    line = attach_fails(address, refused)
    assert line == (f"intertie-gateway: Ray at {address} requires token auth (its nodes run with RAY_AUTH_MODE=token) "
                    "and no token was found here: pass --ray-token-file FILE (a copy of the head node's "
                    "~/.ray/auth_token), or set RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN")
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not the cluster's token")
    assert "refused the token from --ray-token-file" in attach_fails(address, refused, "--ray-token-file", str(wrong))
    line = attach_fails(address, refused, "--num-cpus", "2", "--object-store-memory", "1GiB", code=2)
    assert "num_cpus (--num-cpus), object_store_memory (--object-store-memory) are for the embedded Ray" in line

    gateway = gateway_factory(site_id="cluster")  # (stopped by the fixture)
    # Its own flags: the factory's --num-cpus and --object-store-memory are the embedded Ray's.
    gateway.args = ["--listen", "127.0.0.1:0", "--state-dir", str(gateway.state_dir), "--site-id", "cluster",
                    "--ray", address, "--ray-token-file", str(token_file), "--auth", "none"]
    gateway.start()
    assert "token auth, token from --ray-token-file" in gateway.log_tail() and "2 nodes" in gateway.log_tail()

    @intertie.remote
    def node_of(i: int) -> str:
        import time

        import ray

        time.sleep(0.2)  # long enough that every pooled worker gets one
        return str(ray.get_runtime_context().get_node_id())

    @intertie.remote(cpus=2)
    def on_two_cpus() -> str:
        import ray

        return str(ray.get_runtime_context().get_node_id())

    @intertie.remote(cpus=3)
    def on_three_cpus() -> int:
        return 3

    @intertie.remote
    def count_on_node(table: object) -> tuple[str, int]:
        import time

        import ray

        time.sleep(0.3)  # several at once: the head's 2 CPUs cannot take them all
        return str(ray.get_runtime_context().get_node_id()), table.num_rows  # type: ignore[attr-defined]

    with intertie.connect(gateway.address) as fed:
        status = fed.sites()[0]
        assert status.resources_total["CPU"] == 3.0
        nodes = {f.result(timeout=60) for f in [node_of.submit(i) for i in range(12)]}
        assert len(nodes) == 2  # one-CPU tasks run on both nodes (the pool spans them)
        assert on_two_cpus.submit().result(timeout=60) in nodes  # fits the head
        started = time.monotonic()
        with pytest.raises(PlacementError, match=r"largest node has CPU=2 \(3 in total over its nodes\)"):
            on_three_cpus.submit().result(timeout=30)
        assert time.monotonic() - started < 5.0  # at once, not a task Ray never schedules
        # Dataset arguments reach tasks on either node (over the site's Flight endpoint: a
        # path on the gateway's machine means nothing on another node).
        import pyarrow as pa

        ref = fed.put_dataset(pa.table({"v": list(range(1000))}), name="cluster-input")
        read = [count_on_node.submit(ref) for _ in range(9)]
        where = {node for node, rows in (f.result(timeout=60) for f in read) if rows == 1000}
        assert len(where) == 2
