"""Certificates for a federation: a local certificate authority and a certificate per site,
made with the ``cryptography`` library (no openssl shell-outs), for tests, the demo and
small federations. A federation in production would use its own CA; the files are the same.

A site's certificate names the site twice: in its subject (CN = site id, what gRPC shows of a
peer) and as the first name of its subjectAltName, the URI ``intertie-site:<site id>`` (Arrow
Flight shows of a client certificate only its first subjectAltName). The addresses it serves
follow in the subjectAltName (host verification matches those; a URI never matches a host). It
can serve and authenticate as a client (a peer opening a link). Keys are ECDSA P-256, written 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from intertie_gateway.files import write_private

CA_DAYS = 3650
SITE_DAYS = 825  # the longest validity common TLS clients accept for a server certificate
# The scheme of the URI that names a site in its certificate.
SITE_URI = "intertie-site:"


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    write_private(path, pem)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def create_ca(directory: Path, name: str = "Intertie federation CA") -> Issued:
    """A new CA (``ca.pem``, ``ca.key``) in ``directory``."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    issued = Issued(directory / "ca.pem", directory / "ca.key")
    directory.mkdir(parents=True, exist_ok=True)
    issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(issued.key, key)
    return issued


def create_site(ca: Issued, directory: Path, site_id: str, hosts: list[str]) -> Issued:
    """A certificate for ``site_id`` signed by ``ca``, valid for ``hosts`` (names or IP
    addresses), as ``<site_id>.pem`` and ``<site_id>.key`` in ``directory``."""
    if not hosts:
        raise ValueError("a site certificate needs at least one host name or address")
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{ca.key}: expected an ECDSA key")
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(SITE_URI + site_id)]
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, site_id)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=SITE_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    issued = Issued(directory / f"{site_id}.pem", directory / f"{site_id}.key")
    directory.mkdir(parents=True, exist_ok=True)
    issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(issued.key, key)
    return issued


def site_of(cert_pem: bytes) -> str:
    """The site a certificate names (its subject's CN)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise ValueError("the certificate names no site (no CN)")
    return str(names[0].value)


def site_of_uri(name: str) -> str:
    """The site an ``intertie-site:`` URI names ("": another kind of name, e.g. a host: a
    certificate made before sites were named by URI, or not by ``create_site``)."""
    return name[len(SITE_URI):] if name.startswith(SITE_URI) else ""
