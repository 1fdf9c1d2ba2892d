"""TLS towards tenants and mutual TLS between peers, on real gateways over loopback.

Two sites, alpha and beta, with certificates of one federation CA (``intertie-gateway certs
create``), token auth, and a peers' endpoint each. A second CA stands for an outsider.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from operator_cli import gateway_cli

import intertie
from intertie.embedded import EmbeddedGateway, free_ports, stop_all
from intertie.v1 import peer_pb2, peer_pb2_grpc, site_pb2, site_pb2_grpc, tasks_pb2, tasks_pb2_grpc

START_S = 120.0
# Sites hear of each other within a few heartbeats (0.5 s) of both serving.
PEERS_UP_S = 60.0



@dataclass
class Sites:
    certs: Path
    outsider: Path  # a CA of no federation, with a certificate for "alpha"
    token: str  # tenant "acme" at alpha
    alpha: EmbeddedGateway
    peer_addresses: dict[str, str]
    initech: str  # another tenant at alpha, whom beta does not serve

    def creds(self, site: str) -> tuple[bytes, bytes]:
        return (self.certs / f"{site}.key").read_bytes(), (self.certs / f"{site}.pem").read_bytes()


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sites]:
    base = tmp_path_factory.mktemp("tls")
    certs, outsider = base / "certs", base / "outsider"
    gateway_cli("certs", "create", "--dir", str(certs), "--site", "alpha", "--site", "beta", "--site", "gamma",
                "--host", "127.0.0.1")  # gamma: a member of the federation, but no peer of alpha's
    gateway_cli("certs", "create", "--dir", str(outsider), "--site", "alpha", "--host", "127.0.0.1")
    token = gateway_cli("token", "create", "--tenant", "acme", "--state-dir", str(base / "alpha"))
    initech = gateway_cli("token", "create", "--tenant", "initech", "--state-dir", str(base / "alpha"))
    policy = base / "beta-policy.toml"  # beta serves alpha's acme, not alpha's other tenants
    policy.write_text('accept = ["acme@alpha"]\n')
    ports = free_ports(4)
    listen = {"alpha": f"127.0.0.1:{ports[0]}", "beta": f"127.0.0.1:{ports[1]}"}
    peer = {"alpha": f"127.0.0.1:{ports[2]}", "beta": f"127.0.0.1:{ports[3]}"}
    gateways = []
    try:
        for site, other in (("alpha", "beta"), ("beta", "alpha")):
            gateways.append(EmbeddedGateway(
                num_cpus=1, site_id=site, state_dir=base / site, listen=listen[site], wait=False,
                extra_args=["--auth", "token", "--tls-cert", str(certs / f"{site}.pem"),
                            "--tls-key", str(certs / f"{site}.key"), "--tls-ca", str(certs / "ca.pem"),
                            "--peer-listen", peer[site], "--peer", peer[other], "--heartbeat", "0.5",
                            "--object-store-memory", str(100 << 20),
                            *(["--policy", str(policy)] if site == "beta" else [])]))
        for gateway in gateways:
            gateway.wait_ready(START_S)
        with intertie.connect(gateways[0].address, token=token, tls_ca=certs / "ca.pem") as fed:
            deadline = time.monotonic() + PEERS_UP_S
            while {s.site_id: s.state for s in fed.sites()}.get("beta") != "up":  # alpha has heard from beta
                assert time.monotonic() < deadline, f"alpha never saw beta up: {fed.sites()}"
                time.sleep(0.1)
        yield Sites(certs, outsider, token, gateways[0], peer, initech)
    finally:
        stop_all(gateways)


def double(x: int) -> int:
    return 2 * x


def test_a_tenant_reaches_a_tls_site_with_its_ca_and_token_and_work_crosses_to_a_peer_over_mtls(
        sites: Sites) -> None:
    with intertie.connect(sites.alpha.address, token=sites.token, tls_ca=sites.certs / "ca.pem") as fed:
        assert fed.submit(double, 21).result(timeout=60) == 42
        at_beta = intertie.remote(double).options(site="beta").submit(5)
        assert at_beta.result(timeout=60) == 10
        info = fed.task(at_beta.task_id)
        assert (info.site, info.home) == ("beta", "alpha")
        assert {s.site_id: s.state for s in fed.sites()} == {"alpha": "up", "beta": "up"}
    cli = subprocess.run([sys.executable, "-m", "intertie", "--address", sites.alpha.address, "--token", sites.token,
                          "--tls-ca", str(sites.certs / "ca.pem"), "sites"], capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0 and "beta" in cli.stdout, cli.stderr


def test_tls_mistakes_fail_fast_and_say_what_is_wrong(sites: Sites) -> None:
    with pytest.raises(intertie.SiteUnavailableError, match="tls_ca"):
        intertie.connect(sites.alpha.address, token=sites.token, connect_timeout=10)
    with pytest.raises(intertie.SiteUnavailableError, match="not signed by the CA given"):
        intertie.connect(sites.alpha.address, token=sites.token, tls_ca=sites.outsider / "ca.pem", connect_timeout=10)
    with pytest.raises(intertie.InvalidRequestError, match="PEM certificate"):
        intertie.connect(sites.alpha.address, token=sites.token, tls_ca=b"not a certificate")


def _status(address: str, credentials: grpc.ChannelCredentials) -> site_pb2.SiteStatus:
    with grpc.secure_channel(address, credentials) as channel:
        return site_pb2_grpc.SiteServiceStub(channel).GetStatus(site_pb2.GetStatusRequest(), timeout=10)


def test_the_peers_endpoint_takes_only_certificates_of_the_federation_ca(sites: Sites) -> None:
    peers_endpoint = sites.peer_addresses["alpha"]
    ca = (sites.certs / "ca.pem").read_bytes()
    key, cert = sites.creds("beta")
    assert _status(peers_endpoint, grpc.ssl_channel_credentials(ca, key, cert)).site_id == "alpha"
    outsider = ((sites.outsider / "alpha.key").read_bytes(), (sites.outsider / "alpha.pem").read_bytes())
    for credentials in (grpc.ssl_channel_credentials(ca),  # a tenant without a certificate
                        grpc.ssl_channel_credentials(ca, *outsider)):  # a certificate of another CA
        with pytest.raises(grpc.RpcError) as refused:
            _status(peers_endpoint, credentials)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake fails


def _first_reply(channel: grpc.Channel, peer_site: str) -> grpc.RpcError:
    call = tasks_pb2_grpc.TaskServiceStub(channel).Connect(iter([tasks_pb2.ClientMessage(
        open=tasks_pb2.WatchRequest(session_id="s-forged", peer_site=peer_site))]), timeout=10)
    with pytest.raises(grpc.RpcError) as refused:
        next(call)
    return refused.value


def test_neither_a_tenant_nor_a_peer_can_claim_to_be_another_site(sites: Sites) -> None:
    ca = (sites.certs / "ca.pem").read_bytes()
    tenant = grpc.intercept_channel(grpc.secure_channel(sites.alpha.address, grpc.ssl_channel_credentials(ca)),
                                    intertie._rpc.BearerToken(sites.token))
    with tenant:
        refused = _first_reply(tenant, "beta")
        assert refused.code() == grpc.StatusCode.PERMISSION_DENIED and "peers' endpoint" in refused.details()
        with pytest.raises(grpc.RpcError) as steal:
            peer_pb2_grpc.PeerServiceStub(tenant).Steal(peer_pb2.StealRequest(site_id="beta", max_tasks=5), timeout=10)
        assert steal.value.code() == grpc.StatusCode.PERMISSION_DENIED
        forged = tasks_pb2.TaskSpec(task_id="forged-home", function_digest="0" * 64, home="beta")
        ack = tasks_pb2_grpc.TaskServiceStub(tenant).Submit(
            tasks_pb2.SubmitRequest(session_id="s", tasks=[forged]), timeout=10).acks[0]
        assert not ack.accepted and "home is set by the gateway" in ack.error.message
    with grpc.secure_channel(sites.peer_addresses["alpha"], grpc.ssl_channel_credentials(ca, *sites.creds("beta"))) \
            as beta:
        refused = _first_reply(beta, "gamma")
        assert refused.code() == grpc.StatusCode.PERMISSION_DENIED and "certificate names 'beta'" in refused.details()
        with pytest.raises(grpc.RpcError) as steal:
            peer_pb2_grpc.PeerServiceStub(beta).Steal(peer_pb2.StealRequest(site_id="gamma", max_tasks=5), timeout=10)
        assert steal.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with grpc.secure_channel(sites.peer_addresses["alpha"], grpc.ssl_channel_credentials(ca, *sites.creds("gamma"))) \
            as gamma:
        refused = _first_reply(gamma, "gamma")
        assert refused.code() == grpc.StatusCode.PERMISSION_DENIED and "not one of the peers" in refused.details()
        with pytest.raises(grpc.RpcError) as steal:
            peer_pb2_grpc.PeerServiceStub(gamma).Steal(peer_pb2.StealRequest(site_id="gamma", max_tasks=5), timeout=10)
        assert steal.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_home_does_not_place_a_tenant_at_a_peer_that_does_not_serve_it_and_says_why(sites: Sites) -> None:
    with intertie.connect(sites.alpha.address, token=sites.initech, tls_ca=sites.certs / "ca.pem") as fed:
        with pytest.raises(intertie.PlacementError, match="does not accept tenant 'initech@alpha'"):
            intertie.remote(double).options(site="beta").submit_to(fed, (1,), {}).result(timeout=60)
        anywhere = fed.submit(double, 2)
        assert anywhere.result(timeout=60) == 4 and anywhere.site == "alpha"
        rejected = dict(fed.task(anywhere.task_id).placement.rejected)
        assert "does not accept tenant 'initech@alpha'" in rejected["beta"]
