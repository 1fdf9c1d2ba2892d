"""Datasets between owners, on a secure federation of two real gateways (TLS, mutual TLS
between peers, token auth): a tenant's token is good only at its home, so the SDK makes
every dataset call at the home, which acts at the peer for it; the peer knows the home by
its certificate and keeps the tenant's datasets apart from everyone else's.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pyarrow as pa
import pyarrow.flight as flight
import pytest

import intertie
from intertie.embedded import LocalFederation

START_S = 60.0


def column_sum(table: pa.Table, column: str) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(table.column(column)).as_py())


def doubled(table: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    return table.set_column(0, "v", pc.multiply(table.column("v"), 2))


def sample(rows: int) -> pa.Table:
    return pa.table({"v": pa.array(range(rows), pa.int64())})


def wait_for(condition: Callable[[], bool], message: str, timeout: float = START_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.1)


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    with LocalFederation(2, base_dir=tmp_path_factory.mktemp("federated-data"), heartbeat_s=0.3,
                         object_store_memory=100_000_000, extra_args=["--num-cpus", "1"]) as federation:
        yield federation


@pytest.fixture(scope="module")
def tenants(local: LocalFederation) -> Iterator[dict[str, intertie.Federation]]:
    """Tenant "local" (the federation's own token at alpha) and tenant "bolt", both of alpha."""
    alpha = local.site("alpha")
    made = subprocess.run([sys.executable, "-m", "intertie_gateway", "token", "create", "--tenant", "bolt",
                           "--state-dir", str(alpha.state_dir)], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    bolt_token = made.stdout.strip().splitlines()[-1]
    # Acme's connection last: the tasks' default federation (``remote(...).submit``).
    with intertie.connect(alpha.address, token=bolt_token, tls_ca=local.tls_ca) as bolt, \
            intertie.connect(alpha) as acme:
        wait_for(lambda: [s.state for s in acme.sites()] == ["up", "up"], "beta never came up")
        yield {"acme": acme, "bolt": bolt}


def test_a_tenant_puts_lists_reads_and_deletes_at_a_peer_through_its_home(
        tenants: dict[str, intertie.Federation]) -> None:
    acme = tenants["acme"]
    ref = acme.put_dataset(sample(5000), name="far", site="beta")
    assert ref.site == "beta" and ref.num_rows == 5000
    assert ref.id in {r.id for r in acme.datasets(site="beta")}
    assert (ref.id, "beta") in {(r.id, r.site) for r in acme.datasets()}
    assert acme.get_dataset(ref).equals(sample(5000)) and acme.dataset("far", site="beta").id == ref.id
    # A task forwarded to beta reads it there (no transfer); beta keeps its result for the tenant.
    read = intertie.remote(site="beta")(column_sum).submit(ref, "v")
    assert read.result(timeout=60) == sum(range(5000)) and read.site == "beta"
    made = intertie.remote(site="beta", returns="dataset")(doubled).submit(ref)
    result = made.result(timeout=60)
    assert result.site == "beta" and acme.get_dataset(result).column("v").to_pylist()[:3] == [0, 2, 4]
    assert result.id in {r.id for r in acme.datasets(site="beta")}
    # A task at alpha pulls the dataset over the peers' mutual TLS.
    pulled = intertie.remote(site="alpha")(column_sum).submit(ref, "v")
    assert pulled.result(timeout=60) == sum(range(5000)) and pulled.site == "alpha"
    assert acme.delete_dataset(result).id == result.id
    assert result.id not in {r.id for r in acme.datasets(site="beta")}


def test_another_tenant_of_the_home_cannot_list_read_or_delete_it(tenants: dict[str, intertie.Federation]) -> None:
    acme, bolt = tenants["acme"], tenants["bolt"]
    ref = acme.put_dataset(sample(100), name="acme-at-beta", site="beta")
    assert ref.id not in {r.id for r in bolt.datasets(site="beta")} | {r.id for r in bolt.datasets()}
    unknown = "0" * len(ref.id)
    calls: list[Callable[[str], object]] = [
        lambda k: bolt.get_dataset(k, site="beta"), lambda k: bolt.dataset(k, site="beta"),
        lambda k: bolt.delete_dataset(k, site="beta")]
    for call in calls:
        answers = []
        for key in (ref.id, unknown):
            with pytest.raises(intertie.DatasetNotFoundError) as err:
                call(key)
            answers.append(str(err.value).replace(key, "KEY"))
        assert answers[0] == answers[1]  # another tenant's answers like an unknown one
    assert acme.get_dataset(ref).equals(sample(100))  # still there, whole
    mine = bolt.put_dataset(sample(3), name="acme-at-beta", site="beta")  # the name, in bolt's own space
    assert mine.id != ref.id and acme.get_dataset("acme-at-beta", site="beta").num_rows == 100


def test_where_another_tenants_dataset_lies_shows_in_no_quote(tenants: dict[str, intertie.Federation]) -> None:
    acme, bolt = tenants["acme"], tenants["bolt"]
    ref = acme.put_dataset(sample(1000), name="placed", site="beta")
    # Its id known, its place not (said to be at alpha), and said to be large: residency decides.
    by_id = dataclasses.replace(ref, site="alpha", num_bytes=10**10)
    unknown = dataclasses.replace(by_id, id="0" * len(ref.id))

    def transfer_to_beta(fed: intertie.Federation, dataset: intertie.DatasetRef) -> float:
        return {s.site: s.transfer_s for s in fed.quote(column_sum, dataset, "v")}["beta"]

    # Beta tells alpha what it holds with its status; acme's own quote counts it as there.
    wait_for(lambda: transfer_to_beta(acme, by_id) < 1.0, "alpha never heard that beta holds acme's dataset")
    assert transfer_to_beta(acme, unknown) > 10  # (the data is what makes the difference)
    # Bolt, with the same id, is quoted as for an id that does not exist: nothing tells where it is.
    assert transfer_to_beta(bolt, by_id) == pytest.approx(transfer_to_beta(bolt, unknown), rel=0.01)


def _peer_client(local: LocalFederation, cert: str, key: str) -> flight.FlightClient:
    port = int((local.site("beta").state_dir / "dataplane.port").read_text().split()[1])
    assert local.tls_ca is not None
    return flight.FlightClient(f"grpc+tls://127.0.0.1:{port}", tls_root_certs=local.tls_ca.read_bytes(),
                               cert_chain=open(cert, "rb").read(), private_key=open(key, "rb").read())


def test_a_site_acts_at_a_peer_only_for_its_own_tenants(
        local: LocalFederation, tenants: dict[str, intertie.Federation]) -> None:
    ref = tenants["acme"].put_dataset(sample(10), name="vouched", site="beta")
    assert local.tls_ca is not None
    certs = local.tls_ca.parent
    alpha = _peer_client(local, str(certs / "alpha.pem"), str(certs / "alpha.key"))
    try:
        def listed(tenant: str) -> set[str]:
            options = flight.FlightCallOptions(timeout=10, headers=[(b"intertie-tenant", tenant.encode())])
            return {json.loads(i.descriptor.command)["id"] for i in alpha.list_flights(options=options)}

        assert ref.id in listed("local@alpha") and ref.id not in listed("bolt@alpha")
        for foreign in ("local@beta", "local@gamma", "local"):  # not a tenant of alpha's
            with pytest.raises(flight.FlightUnauthenticatedError, match="may act only for its own tenants"):
                listed(foreign)
    finally:
        alpha.close()


def test_a_peer_certificate_of_another_ca_is_refused(local: LocalFederation, tmp_path_factory:
                                                     pytest.TempPathFactory) -> None:
    other = tmp_path_factory.mktemp("other-ca")
    made = subprocess.run([sys.executable, "-m", "intertie_gateway", "certs", "create", "--dir", str(other),
                           "--site", "alpha", "--host", "127.0.0.1"], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    intruder = _peer_client(local, str(other / "alpha.pem"), str(other / "alpha.key"))
    try:
        with pytest.raises(flight.FlightUnavailableError):
            list(intruder.list_flights(options=flight.FlightCallOptions(
                timeout=10, headers=[(b"intertie-tenant", b"local@alpha")])))
    finally:
        intruder.close()
