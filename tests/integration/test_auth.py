"""A gateway run with --auth token: only a tenant's token gets in, checked once per call."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from operator_cli import token_for

import intertie
from intertie.v1 import site_pb2, site_pb2_grpc

# How long a revocation may take to reach the running gateway (it re-reads its tokens each second).
REVOCATION_S = 10.0



def double(x: int) -> int:
    return 2 * x


def test_only_a_valid_token_gets_in_and_a_revoked_one_is_refused_within_seconds(  # type: ignore[no-untyped-def]
        gateway_factory, tmp_path: Path) -> None:
    state = tmp_path / "site"
    token = token_for("acme", state)
    gateway = gateway_factory("--auth", "token", state_dir=state).start()
    assert "auth: token" in gateway.log_tail()
    for bad in (None, "itk_0123456789ab_" + "A" * 43, "garbage"):
        started = time.monotonic()
        with pytest.raises(intertie.AuthenticationError, match="not authenticated") as err:
            intertie.connect(gateway.address, token=bad or "")
        assert time.monotonic() - started < 5 and (bad is None or bad not in str(err.value))
    held = intertie.connect(gateway.address, token=token)  # a session open when the token is revoked
    assert held.submit(double, 21).result(timeout=60) == 42
    with grpc.insecure_channel(gateway.address) as channel:  # health stays open to load balancers
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as rpc:
            site_pb2_grpc.SiteServiceStub(channel).GetStatus(site_pb2.GetStatusRequest(), timeout=10)
        assert rpc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    revoked = subprocess.run([sys.executable, "-m", "intertie_gateway", "token", "revoke", token,
                              "--state-dir", str(state)], capture_output=True, text=True, timeout=60)
    assert revoked.returncode == 0, revoked.stderr
    deadline = time.monotonic() + REVOCATION_S
    while True:  # the running gateway picks the revocation up from its token file
        try:
            intertie.connect(gateway.address, token=token).close()
        except intertie.AuthenticationError as exc:
            assert "revoked" in str(exc)
            break
        assert time.monotonic() < deadline, "the revoked token was still taken"
        time.sleep(0.2)
    try:  # the open session is ended too: what it submits fails with the reason
        while True:
            try:
                held.submit(double, 1).result(timeout=30)
            except intertie.AuthenticationError as exc:
                assert "revoked" in str(exc)
                break
            assert time.monotonic() < deadline, "the open session outlived its revoked token"
            time.sleep(0.2)
    finally:
        held.close()


def test_token_auth_between_peers_is_refused_until_mutual_tls(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    gateway = gateway_factory("--auth", "token", "--peer", "127.0.0.1:1")
    assert gateway.process is None
    out = subprocess.run([sys.executable, "-m", "intertie_gateway", "run", *gateway.args], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "mutual TLS" in out.stderr and "Traceback" not in out.stderr


def test_malformed_tokens_get_one_line_and_guessing_is_cut_off_per_source(  # type: ignore[no-untyped-def]
        gateway_factory, tmp_path: Path) -> None:
    from intertie_gateway.auth import MAX_FAILURES

    state = tmp_path / "site"
    token = token_for("acme", state)
    gateway = gateway_factory("--auth", "token", state_dir=state).start()
    refusals = []
    for bad in ("itk_" + "z" * 4000, "itk_0123456789ab_" + "A" * 42 + "!", "Bearer", token[:-1] + "x"):
        with pytest.raises(intertie.AuthenticationError) as err:
            intertie.connect(gateway.address, token=bad, connect_timeout=10)
        refusals.append(str(err.value))
    assert "token too long" in refusals[0] and "malformed token" in refusals[1]
    assert all("\n" not in r and len(r) < 300 and "z" * 50 not in r for r in refusals)
    assert token not in refusals[3] and token[:-1] not in refusals[3]
    for _ in range(MAX_FAILURES - len(refusals)):  # a guesser's attempts from this address
        with pytest.raises(intertie.AuthenticationError):
            intertie.connect(gateway.address, token="itk_0123456789ab_" + "B" * 43, connect_timeout=10)
    with pytest.raises(intertie.AuthenticationError, match="too many failed authentications"):
        intertie.connect(gateway.address, token=token, connect_timeout=10)  # even a valid one, for a while
    assert gateway.process is not None and gateway.process.poll() is None
    log = gateway.log_path.read_text(errors="replace")
    assert "refused a call" in log  # failures are logged (throttled) ...
    secret = token[len("itk_0123456789ab_"):]  # (the secret may hold '_' itself)
    assert len(secret) == 43
    assert secret not in log and secret[:20] not in log and "z" * 100 not in log  # ... never what was sent
