"""How this gateway's endpoints are secured: TLS towards tenants, mutual TLS between peers.

Tenants reach ``listen`` over TLS (server certificate only) and say who they are with a
bearer token. Peers reach ``peer_listen``, where the gateway asks every caller for a
certificate signed by the federation CA (mutual TLS): the certificate's CN is the peer's
site id, whatever its messages claim. Two endpoints, because gRPC's server credentials
either require a client certificate of every caller or never ask for one.

Without a certificate configured everything is plaintext, as before (a trusted network).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from intertie_gateway.config import ConfigError, GatewayConfig


def _read(path: str, what: str) -> bytes:
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path!r} ({exc.strerror})") from None
    if b"-----BEGIN" not in data:
        raise ConfigError(f"{what}: {path!r} is not a PEM file")
    return data


@dataclass(frozen=True)
class Transport:
    """PEM bytes of this site's certificate chain and key, and of the federation CA."""

    cert: bytes = b""
    key: bytes = b""
    ca: bytes = b""

    @classmethod
    def from_config(cls, config: GatewayConfig) -> Transport:
        if not config.tls_cert:
            return cls()
        return cls(cert=_read(config.tls_cert, "tls_cert"), key=_read(config.tls_key, "tls_key"),
                   ca=_read(config.tls_ca, "tls_ca") if config.tls_ca else b"")

    @property
    def tls(self) -> bool:
        return bool(self.cert)

    @property
    def mutual(self) -> bool:
        """Peers are authenticated by certificates of the federation CA."""
        return bool(self.ca)

    def serve_tenants(self, server: grpc.aio.Server, listen: str) -> int:
        """Opens the tenants' endpoint; returns its port (0: could not bind)."""
        if not self.tls:
            return server.add_insecure_port(listen)
        return server.add_secure_port(listen, grpc.ssl_server_credentials([(self.key, self.cert)]))

    def serve_peers(self, server: grpc.aio.Server, listen: str) -> int:
        """Opens the peers' endpoint: a caller without a certificate of the federation CA
        does not get past the handshake."""
        return server.add_secure_port(listen, grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=True))

    def peer_channel(self, address: str, options: Sequence[tuple[str, Any]]) -> grpc.aio.Channel:
        """A channel to a peer's endpoint: mutual TLS when the federation CA is configured
        (the peer must show a certificate of that CA for ``address``, and this site shows
        its own), plaintext otherwise."""
        if not self.mutual:
            return grpc.aio.insecure_channel(address, options=list(options))
        credentials = grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                                   certificate_chain=self.cert)
        return grpc.aio.secure_channel(address, credentials, options=list(options))


def peer_site(context: grpc.aio.ServicerContext) -> str:
    """The site id a caller proved with its certificate ("" without one: a tenant, or a
    plaintext endpoint). Only the peers' endpoint asks for certificates, and the handshake
    there already checked that the federation CA signed it."""
    names = context.auth_context().get("x509_common_name") or ()
    return names[0].decode("utf-8", "replace") if names else ""
