"""The data plane's trust, on a real gateway over loopback: its Flight endpoint serves TLS
with the site's certificate, takes tenants by their bearer tokens and the site's own
gateway and Ray workers by the site's secret, and keeps each tenant's datasets to itself.

One site with token auth, TLS and a federation CA (``intertie-gateway certs create``), so
its data plane serves peers on a second endpoint with mutual TLS; tenants acme and bolt. The
SDK's dataset calls are made with ``DatasetClient`` and a connection's credentials.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
import pytest
from operator_cli import gateway_cli

import intertie
from intertie._rpc import Credentials
from intertie.datasets import DatasetClient
from intertie.embedded import EmbeddedGateway, free_ports

START_S = 120.0



@dataclass
class Site:
    gateway: EmbeddedGateway
    ca: Path
    tokens: dict[str, str]
    flight_address: str

    def connect(self, tenant: str) -> intertie.Federation:
        return intertie.connect(self.gateway.address, token=self.tokens[tenant], tls_ca=self.ca)

    def datasets(self, token: str | None, ca: bytes | None = None) -> DatasetClient:
        return DatasetClient(lambda site: ("alpha", self.flight_address),
                             Credentials(token, ca if ca is not None else self.ca.read_bytes()))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    base = tmp_path_factory.mktemp("flight-security")
    certs = base / "certs"
    gateway_cli("certs", "create", "--dir", str(certs), "--site", "alpha", "--site", "beta", "--host", "127.0.0.1")
    tokens = {t: gateway_cli("token", "create", "--tenant", t, "--state-dir", str(base / "alpha"))
              for t in ("acme", "bolt")}
    gateway = EmbeddedGateway(
        num_cpus=1, site_id="alpha", state_dir=base / "alpha", listen=f"127.0.0.1:{free_ports(1)[0]}", wait=False,
        extra_args=["--auth", "token", "--tls-cert", str(certs / "alpha.pem"), "--tls-key", str(certs / "alpha.key"),
                    "--tls-ca", str(certs / "ca.pem"), "--object-store-memory", str(100 << 20)])
    try:
        gateway.wait_ready(START_S)
        with intertie.connect(gateway.address, token=tokens["acme"], tls_ca=certs / "ca.pem") as fed:
            flight_address = fed.sites()[0].flight_address
        yield Site(gateway, certs / "ca.pem", tokens, flight_address)
    finally:
        gateway.stop()


def sample(rows: int) -> pa.Table:
    return pa.table({"v": pa.array(range(rows), pa.int64())})


def rows(table: pa.Table) -> int:
    return table.num_rows


def test_a_tenant_without_or_with_a_wrong_token_is_refused_by_flight(site: Site) -> None:
    kept = site.datasets(site.tokens["acme"]).put(sample(10), "kept", None)
    wrong = site.tokens["acme"][:-6] + "AAAAAA"
    for token in (None, wrong):
        client = site.datasets(token)
        calls: list[Callable[[DatasetClient], object]] = [
            lambda c: c.list(), lambda c: c.get(kept.id), lambda c: c.put(sample(3), "x", None)]
        for call in calls:
            with pytest.raises(intertie.AuthenticationError, match="not authenticated") as refused:
                call(client)
            assert "\n" not in str(refused.value) and (token is None or token not in str(refused.value))
        client.close()
    log = site.gateway.log_path.read_text(errors="replace")
    assert "refused a Flight call" in log and wrong not in log and wrong.rsplit("_", 1)[1] not in log


def test_tenant_b_cannot_list_read_or_delete_tenant_a_s_dataset(site: Site) -> None:
    acme, bolt = site.datasets(site.tokens["acme"]), site.datasets(site.tokens["bolt"])
    ref = acme.put(sample(1000), "acme-only", None)
    assert ref.id not in {r.id for r in bolt.list()} and ref.id in {r.id for r in acme.list()}
    unknown = "0" * len(ref.id)
    for call in (bolt.get, lambda k: bolt.action("get", k), lambda k: bolt.action("delete", k)):
        answers = []
        for key in (ref.id, unknown):
            with pytest.raises(intertie.DatasetNotFoundError) as err:
                call(key)
            answers.append(str(err.value).replace(key, "KEY"))
        assert answers[0] == answers[1]
    assert acme.get(ref.id).equals(sample(1000))  # still there, whole
    mine = bolt.put(sample(5), "acme-only", None)  # the same name, in bolt's own space
    assert mine.id != ref.id and acme.get("acme-only").num_rows == 1000 and bolt.get("acme-only").num_rows == 5


def test_a_plaintext_client_cannot_talk_to_the_tls_flight_endpoint(site: Site) -> None:
    client = flight.FlightClient(f"grpc://{site.flight_address}")
    with pytest.raises(flight.FlightUnavailableError):
        list(client.list_flights(options=flight.FlightCallOptions(
            timeout=10, headers=[(b"authorization", f"Bearer {site.tokens['acme']}".encode())])))
    client.close()
    outsider = site.datasets(site.tokens["acme"], ca=_other_ca(site.ca.parent.parent / "outsider"))
    with pytest.raises(intertie.SiteUnavailableError):
        outsider.list()


def _other_ca(directory: Path) -> bytes:
    gateway_cli("certs", "create", "--dir", str(directory), "--site", "alpha", "--host", "127.0.0.1")
    return (directory / "ca.pem").read_bytes()


def test_the_site_s_own_workers_read_and_store_datasets_over_tls(site: Site) -> None:
    ref = site.datasets(site.tokens["acme"]).put(sample(2000), "input", None)
    with site.connect("acme") as fed:
        assert fed.submit(rows, ref).result(timeout=60) == 2000  # the worker read the tenant's dataset
        stored = intertie.remote(returns="dataset")(sample).submit(300).result(timeout=60)
    assert isinstance(stored, intertie.DatasetRef) and stored.num_rows == 300 and stored.site == "alpha"


def test_the_peers_flight_endpoint_takes_only_certificates_of_the_federation_ca(site: Site) -> None:
    ref = site.datasets(site.tokens["acme"]).put(sample(40), "for-peers", None)
    # Not yet in the site's status (see the report on queries.py): the data plane says where it listens.
    peer_port = int((site.gateway.state_dir / "dataplane.port").read_text().split()[1])
    address = f"grpc+tls://127.0.0.1:{peer_port}"
    certs = site.ca.parent
    ca = site.ca.read_bytes()
    outsider = site.ca.parent.parent / "outsider-peer"
    _other_ca(outsider)
    for refused in (flight.FlightClient(address, tls_root_certs=ca),  # a tenant's client: no certificate
                    flight.FlightClient(address, tls_root_certs=ca, cert_chain=(outsider / "alpha.pem").read_bytes(),
                                        private_key=(outsider / "alpha.key").read_bytes())):  # another CA's
        with pytest.raises(flight.FlightUnavailableError):
            list(refused.list_flights(options=flight.FlightCallOptions(timeout=10)))
        refused.close()
    beta = flight.FlightClient(address, tls_root_certs=ca, cert_chain=(certs / "beta.pem").read_bytes(),
                               private_key=(certs / "beta.key").read_bytes())
    assert beta.do_get(flight.Ticket(ref.id.encode())).read_all().equals(sample(40))  # peers read
    with pytest.raises(flight.FlightError, match="unknown action"):
        list(beta.do_action(flight.Action("delete", ref.id.encode())))  # and delete nothing
    beta.close()
    assert site.datasets(site.tokens["acme"]).get(ref.id).equals(sample(40))



def test_guessing_tokens_at_flight_is_cut_off_per_source_but_not_the_site_s_own_calls(site: Site) -> None:
    """Last in this module: it leaves this address blocked at the Flight endpoint for a while."""
    from intertie_gateway.auth import MAX_FAILURES

    guesser = site.datasets("itk_0123456789ab_" + "G" * 43)
    for _ in range(MAX_FAILURES + 1):  # (earlier tests' wrong tokens count too)
        with pytest.raises(intertie.AuthenticationError) as err:
            guesser.list(None)
        if "too many failed authentications" in str(err.value):
            break
    else:
        pytest.fail(f"{MAX_FAILURES + 1} wrong tokens in a row were never cut off")
    assert "\n" not in str(err.value) and "G" * 20 not in str(err.value)
    with pytest.raises(intertie.AuthenticationError, match="too many failed authentications"):
        site.datasets(site.tokens["acme"]).list(None)  # even a valid token, from this address, for a while
    with site.connect("acme") as fed:  # the gateway's and its workers' own Flight calls go on
        stored = intertie.remote(returns="dataset")(sample).submit_to(fed, (30,), {}).result(timeout=60)
    assert isinstance(stored, intertie.DatasetRef) and stored.num_rows == 30
