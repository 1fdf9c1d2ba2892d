"""The federation's certificates work for mutual TLS on loopback: a real gRPC handshake with
the certificates `intertie-gateway certs create` makes, and one from another CA refused."""

from __future__ import annotations

import stat
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from intertie_gateway import certs


@pytest.fixture
def mtls_server(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A gRPC server (the stock health service) that requires a client certificate of the CA
    in ``tmp_path/fed``."""
    ca = certs.create_ca(tmp_path / "fed")
    alpha = certs.create_site(ca, tmp_path / "fed", "alpha", ["localhost", "127.0.0.1"])
    server = grpc.server(futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    credentials = grpc.ssl_server_credentials([(alpha.key.read_bytes(), alpha.cert.read_bytes())],
                                              root_certificates=ca.cert.read_bytes(), require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield port, tmp_path / "fed"
    finally:
        server.stop(None)


def check(port: int, ca: Path, client: certs.Issued) -> health_pb2.HealthCheckResponse:
    credentials = grpc.ssl_channel_credentials(ca.read_bytes(), client.key.read_bytes(), client.cert.read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)


def test_a_site_of_the_federation_is_let_in_and_named_by_its_certificate(mtls_server: tuple[int, Path]) -> None:
    port, fed = mtls_server
    ca = certs.Issued(fed / "ca.pem", fed / "ca.key")
    beta = certs.create_site(ca, fed, "beta", ["127.0.0.1"])
    assert check(port, ca.cert, beta).status == health_pb2.HealthCheckResponse.SERVING
    assert certs.site_of(beta.cert.read_bytes()) == "beta"
    # What Arrow Flight shows of a client certificate: the first name of its subjectAltName.
    names = x509.load_pem_x509_certificate(beta.cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert certs.site_of_uri(list(names)[0].value) == "beta" and certs.site_of_uri("127.0.0.1") == ""
    assert stat.S_IMODE(beta.key.stat().st_mode) == 0o600 and stat.S_IMODE(ca.key.stat().st_mode) == 0o600


def test_a_certificate_of_another_ca_is_refused(mtls_server: tuple[int, Path], tmp_path: Path) -> None:
    port, fed = mtls_server
    other_ca = certs.create_ca(tmp_path / "other")
    intruder = certs.create_site(other_ca, tmp_path / "other", "beta", ["127.0.0.1"])
    with pytest.raises(grpc.RpcError) as err:
        check(port, fed / "ca.pem", intruder)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake fails


def test_the_operator_command_makes_a_ca_once_and_a_certificate_per_site(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "intertie_gateway", "certs", "create", "--dir",
                               str(tmp_path), *args], capture_output=True, text=True, timeout=60)

    made = run("--site", "alpha", "--site", "beta")
    assert made.returncode == 0, made.stderr
    assert "created the CA" in made.stdout and {"ca.pem", "ca.key", "alpha.pem", "beta.key"} <= {
        p.name for p in tmp_path.iterdir()}
    ca_before = (tmp_path / "ca.pem").read_bytes()
    again = run("--site", "gamma", "--host", "gamma.example")
    assert again.returncode == 0 and "created the CA" not in again.stdout
    assert (tmp_path / "ca.pem").read_bytes() == ca_before  # the federation keeps its CA
    assert certs.site_of((tmp_path / "gamma.pem").read_bytes()) == "gamma"
