"""Your usage, verified, on a real site with token auth and two tenants (issue 13, point 2): a
tenant's table holds exactly its attempts and what they reserved, another tenant's none of
them; the SDK and the CLI check the entries against the site's signed checkpoints, the second
time that the ledger extends the first check; hostile LedgerService requests get typed errors
and the gateway goes on."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from operator_cli import token_for

import intertie
from intertie import usage
from intertie._rpc import ERROR_KIND_KEY, BearerToken
from intertie.embedded import EmbeddedGateway, LocalFederation
from intertie.v1 import ledger_pb2, ledger_pb2_grpc

BOUND_S = 120.0  # a task, or a checkpoint after it, on a loaded 2-core machine
SITE = "usage"


def nap(seconds: float) -> str:
    time.sleep(seconds)
    return "rested"


def double(x: int) -> int:
    return 2 * x


def _name(fn: Any) -> str:
    """A function's name as a task records it."""
    return f"{fn.__module__}.{fn.__qualname__}"


@dataclass
class Site:
    address: str
    acme: str
    globex: str
    home: Path  # the users' home: where the SDK keeps what it verified


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    state = tmp_path_factory.mktemp("usage")
    config = state / "site.toml"
    config.write_text("ledger_checkpoint_s = 0.2\n")  # entries signed within about a second
    tokens = token_for("acme", state), token_for("globex", state)
    gateway = EmbeddedGateway(num_cpus=2, site_id=SITE, state_dir=state, extra_args=[
        "--auth", "token", "--config", str(config), "--object-store-memory", str(100 << 20)])
    try:
        yield Site(gateway.address, *tokens, home=tmp_path_factory.mktemp("home"))
    finally:
        gateway.stop()


@pytest.fixture(autouse=True)
def users_home(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(site.home))


def _usage_of(fed: intertie.Federation, count: int = 0, task_id: str = "") -> Any:
    """The caller's table once it holds ``count`` attempts, or ``task_id``'s (entries are signed
    within a second or so of their attempt's end, and shown once signed)."""
    deadline = time.monotonic() + BOUND_S
    while (table := fed.usage()).num_rows < count or task_id not in [*table.column("task_id").to_pylist(), ""]:
        assert time.monotonic() < deadline, f"{table.num_rows} of {count} attempts in the ledger"
        time.sleep(0.2)
    return table


def _cli(site: Site, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "intertie", "--address", site.address, "usage", *args],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "INTERTIE_TOKEN": token, "INTERTIE_ADDRESS": "", "HOME": str(site.home)})


def test_a_tenant_sees_exactly_its_attempts_and_verifies_them_twice(site: Site) -> None:
    with intertie.connect(site.address, token=site.acme) as acme, \
            intertie.connect(site.address, token=site.globex) as globex:
        two_cpus = intertie.remote(nap).options(cpus=2)
        # The first 2-CPU task waits for Ray to start a worker, which its reservation covers too.
        warm = acme.submit(two_cpus, 0.0)
        assert warm.result(timeout=BOUND_S) == "rested"
        napped = acme.submit(two_cpus, 1.0)
        doubled = [acme.submit(double, i) for i in range(3)]
        theirs = globex.submit(double, 21)
        assert napped.result(timeout=BOUND_S) == "rested" and [f.result(timeout=BOUND_S) for f in doubled] == [0, 2, 4]
        assert theirs.result(timeout=BOUND_S) == 42
        mine = {warm.task_id, napped.task_id, *(f.task_id for f in doubled)}

        table = _usage_of(acme, len(mine))
        rows = {r["task_id"]: r for r in table.to_pylist()}
        assert set(rows) == mine and table.num_rows == len(mine)  # one attempt each, nobody else's
        assert {(r["site"], r["tenant"], r["attempt"], r["outcome"]) for r in rows.values()} == {
            (SITE, "acme", 1, "succeeded")}
        slept = rows[napped.task_id]
        assert slept["cpus"] == 2.0 and slept["function"] == _name(nap), slept
        assert 2.0 <= slept["cpu_s_reserved"] < 3.5 and slept["cpu_time_s"] < 0.2, slept
        by_function = {r["function"]: r for r in acme.usage(by="function").to_pylist()}
        assert by_function[_name(nap)]["attempts"] == 2 and by_function[_name(double)]["attempts"] == 3

        other = _usage_of(globex, 1)
        assert other.column("task_id").to_pylist() == [theirs.task_id]
        assert not set(other.column("task_id").to_pylist()) & mine

        first = acme.verify_usage()
        assert (first.site, first.entries, first.previous_size) == (SITE, len(mine), None), first
        again = acme.submit(double, 5)
        assert again.result(timeout=BOUND_S) == 10
        _usage_of(acme, len(mine) + 1)
        second = acme.verify_usage()
        assert second.entries == len(mine) + 1 and second.previous_size == first.size < second.size, second
        assert "; extends the one verified " in str(second)
        pin = site.home / ".intertie" / "ledgers" / f"{SITE}.json"
        assert oct(pin.stat().st_mode & 0o777) == "0o600" and json.loads(pin.read_text())["size"] == second.size


def test_the_command_line_prints_the_table_and_what_it_verified(site: Site) -> None:
    with intertie.connect(site.address, token=site.globex) as globex:
        ran = globex.submit(double, 1)
        assert ran.result(timeout=BOUND_S) == 2
        count = _usage_of(globex, task_id=ran.task_id).num_rows

    listed = _cli(site, site.globex)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split()[:4] == ["TASK", "FUNCTION", "ATTEMPT", "OUTCOME"] and len(lines) == 2 + count
    assert any(line.startswith(ran.task_id) and f" {_name(double)} " in line for line in lines[2:]), listed.stdout
    assert f"{count} attempt(s) at site {SITE}: " in listed.stderr
    summed = _cli(site, site.globex, "--by", "function", "--since", "2000-01-01")
    assert summed.returncode == 0 and summed.stdout.splitlines()[2].split()[:2] == [_name(double), str(count)], summed
    assert _cli(site, site.globex, "--since", "2999-01-01").stdout.splitlines()[2:] == []

    checked = _cli(site, site.globex, "verify")
    assert checked.returncode == 0, checked
    assert re.fullmatch(rf"site {SITE}: {count} of your entries verified against checkpoint of size \d+ \(signed "
                        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\); (first check: the site's key \S+ is pinned in \S+|"
                        r"extends the one verified .*)\n", checked.stdout), checked.stdout
    again = _cli(site, site.globex, "verify")
    assert again.returncode == 0 and "; extends the one verified " in again.stdout, again

    # A site whose key is not the one pinned fails, in one line.
    pin = site.home / ".intertie" / "ledgers" / f"{SITE}.json"
    kept = pin.read_text()
    pin.write_text(json.dumps({**json.loads(kept), "public_key": base64.b64encode(b"\x01" * 32).decode()}))
    try:
        refused = _cli(site, site.globex, "verify")
    finally:
        pin.write_text(kept)
    assert refused.returncode == 1 and refused.stderr == "", refused
    assert refused.stdout.startswith(f"site {SITE}: NOT verified: site '{SITE}' now signs with key ") \
        and len(refused.stdout.splitlines()) == 1, refused.stdout


def test_hostile_ledger_requests_get_typed_errors_and_the_site_goes_on(site: Site) -> None:
    with intertie.connect(site.address, token=site.acme) as acme:  # (a checkpoint to ask about)
        _usage_of(acme, task_id=acme.submit(double, 3).task_id)
    channel = grpc.intercept_channel(grpc.insecure_channel(site.address), BearerToken(site.acme))
    with channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)

        def refused(call: Any, request: Any) -> tuple[grpc.StatusCode, str, str]:
            with pytest.raises(grpc.RpcError) as err:
                call(request, timeout=30)
            kind = dict(err.value.trailing_metadata() or ()).get(ERROR_KIND_KEY, "")  # type: ignore[attr-defined]
            return err.value.code(), kind, err.value.details()  # type: ignore[attr-defined]

        invalid = (grpc.StatusCode.INVALID_ARGUMENT, "ERROR_KIND_INVALID_ARGUMENT")
        for call, request in ((stub.GetCheckpoint, ledger_pb2.GetCheckpointRequest(size=2**64 - 1)),
                              (stub.ListEntries, ledger_pb2.ListEntriesRequest(size=10**12)),
                              (stub.ListEntries, ledger_pb2.ListEntriesRequest(max_entries=2**32 - 1)),
                              (stub.ListEntries, ledger_pb2.ListEntriesRequest(since=float("nan"))),
                              (stub.ListEntries, ledger_pb2.ListEntriesRequest(start=2**63)),
                              (stub.GetConsistencyProof, ledger_pb2.ConsistencyProofRequest(size1=0)),
                              (stub.GetConsistencyProof, ledger_pb2.ConsistencyProofRequest(size1=2**64 - 1))):
            code, kind, details = refused(call, request)
            assert (code, kind) == invalid and "Traceback" not in details, (request, details)
        garbage = channel.unary_unary("/intertie.v1.LedgerService/ListEntries")
        code, kind, _ = refused(garbage, b"\xff\xff\xff")
        assert (code, kind) == invalid
        anonymous = ledger_pb2_grpc.LedgerServiceStub(grpc.insecure_channel(site.address))
        assert refused(anonymous.GetCheckpoint, ledger_pb2.GetCheckpointRequest())[0] == grpc.StatusCode.UNAUTHENTICATED

        latest = stub.GetCheckpoint(ledger_pb2.GetCheckpointRequest(), timeout=30)  # the site still answers
        assert latest.site_id == SITE and len(latest.public_key) == 32
    with intertie.connect(site.address, token=site.acme) as acme:
        assert acme.submit(double, 2).result(timeout=BOUND_S) == 4


def test_a_peer_reads_and_verifies_the_entries_of_the_tasks_it_forwarded_on_the_peers_endpoint(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    base = tmp_path_factory.mktemp("usage-fed")
    config = base / "site.toml"
    config.write_text("ledger_checkpoint_s = 0.2\n")
    with LocalFederation(2, base_dir=base / "fed", heartbeat_s=0.3, object_store_memory=100 << 20,
                         extra_args=["--config", str(config)]) as local:
        with intertie.connect(local.site("alpha")) as alpha, intertie.connect(local.site("beta")) as beta:
            deadline = time.monotonic() + BOUND_S
            while sum(s.state == "up" for s in alpha.sites()) < 2:
                assert time.monotonic() < deadline, f"the sites never both came up: {alpha.sites()}"
                time.sleep(0.1)
            forwarded = intertie.remote(double).options(site="beta").submit_to(alpha, (4,), {})
            own = beta.submit(double, 5)
            assert forwarded.result(timeout=BOUND_S) == 8 and own.result(timeout=BOUND_S) == 10
            assert alpha.task(forwarded.task_id).site == "beta"
            _usage_of(beta, task_id=own.task_id)
            assert forwarded.task_id not in beta.usage().column("task_id").to_pylist()  # alpha's tenant's
            assert alpha.usage().num_rows == 0  # it ran at beta: in beta's ledger, not alpha's
        # Alpha, as a peer (its certificate, on beta's peers' endpoint), sees its tenant's entry there.
        certs = base / "fed" / "certs"
        credentials = grpc.ssl_channel_credentials(root_certificates=(certs / "ca.pem").read_bytes(),
                                                   private_key=(certs / "alpha.key").read_bytes(),
                                                   certificate_chain=(certs / "alpha.pem").read_bytes())
        gateway = local.site("beta")
        peers_endpoint = gateway._cmd[gateway._cmd.index("--peer-listen") + 1]
        with grpc.secure_channel(peers_endpoint, credentials) as channel:
            deadline = time.monotonic() + BOUND_S
            while not (seen := usage.table(usage.GrpcLedger(channel)).to_pylist()):  # (signed within a second)
                assert time.monotonic() < deadline, "the forwarded task's entry was never signed at beta"
                time.sleep(0.2)
            assert [(r["task_id"], r["tenant"], r["site"]) for r in seen] == [
                (forwarded.task_id, "local@alpha", "beta")]
            checked = usage.verify(usage.GrpcLedger(channel), "beta", pins=base / "alpha-pins")
            assert checked.entries == 1 and checked.size >= 2, checked
