"""gRPC plumbing shared by the SDK and the CLI: addresses, channels, retry policy, error
translation, and the first contact with a gateway (fast, with the cause when it fails)."""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import pathlib
import re
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from intertie import errors
from intertie._wire import ErrorKind, error_class

# Status codes a client never retries: retrying cannot change the answer.
NON_RETRYABLE_CODES: tuple[grpc.StatusCode, ...] = (
    grpc.StatusCode.INVALID_ARGUMENT,     # the request itself is wrong
    grpc.StatusCode.NOT_FOUND,            # unknown task/dataset id stays unknown
    grpc.StatusCode.ALREADY_EXISTS,       # idempotent writes answer this once done
    grpc.StatusCode.PERMISSION_DENIED,    # policy, not load
    grpc.StatusCode.UNAUTHENTICATED,      # credentials do not fix themselves
    grpc.StatusCode.FAILED_PRECONDITION,  # e.g. a Python version no site runs
    grpc.StatusCode.OUT_OF_RANGE,         # a bad offset or limit
    grpc.StatusCode.UNIMPLEMENTED,        # an older gateway without this method
    grpc.StatusCode.RESOURCE_EXHAUSTED,   # oversize message; the same bytes fail again
)

# Trailing-metadata key through which a gateway names the ErrorKind of a failed RPC.
ERROR_KIND_KEY = "intertie-error-kind"

# Keepalive: a ping after this long without traffic, and how long its ack may take.
KEEPALIVE_TIME_MS = 10_000
PING_TIMEOUT_MS = 10_000
# gRPC's own reconnect backoff to a transport that failed: from this, to at most that.
RECONNECT_MIN_MS = 100
RECONNECT_MAX_MS = 1_000

# Headroom above the payload limit for the rest of a message (ids, specs, functions).
MESSAGE_OVERHEAD_BYTES = 16 * 1024 * 1024


def channel_options(max_payload_bytes: int) -> list[tuple[str, Any]]:
    limit = max_payload_bytes + MESSAGE_OVERHEAD_BYTES
    return [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        # Keep idle connections alive through NATs and notice a dead connection (a peer that
        # vanished without a FIN: power cut, half-open NAT entry) within about 20 s: a ping
        # every KEEPALIVE_TIME_MS, unanswered for PING_TIMEOUT_MS, closes the transport.
        # This grpcio waits for the ping's ack for ``grpc.http2.ping_timeout_ms`` (60 s by
        # default); ``keepalive_timeout_ms`` alone does not shorten it, so both are set.
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", PING_TIMEOUT_MS),
        ("grpc.http2.ping_timeout_ms", PING_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # Reconnect to a gateway that went away soon after it is back: gRPC's own backoff
        # (1 s growing to 120 s) left a restarted gateway unused for seconds after a long
        # outage, whatever the caller's own retry pace. One attempt per RECONNECT_MAX_MS at
        # most is cheap for a client and for a peer.
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_MIN_MS),
        ("grpc.min_reconnect_backoff_ms", RECONNECT_MIN_MS),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_MAX_MS),
    ]


def server_options(max_payload_bytes: int) -> list[tuple[str, Any]]:
    """Channel options plus what lets clients' keepalive pings through: without these a
    server answers a ping every 10 s with GOAWAY too_many_pings and drops the streams."""
    return channel_options(max_payload_bytes) + [
        ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
        ("grpc.http2.max_ping_strikes", 0),
    ]


_CODE_TO_CLASS: dict[grpc.StatusCode, type[errors.IntertieError]] = {
    grpc.StatusCode.UNAVAILABLE: errors.SiteUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.SiteUnavailableError,
    grpc.StatusCode.CANCELLED: errors.SiteUnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: errors.AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.PayloadTooLargeError,
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidRequestError,
    grpc.StatusCode.NOT_FOUND: errors.TaskNotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: errors.PlacementError,
}


def translate(exc: grpc.RpcError, target: str = "") -> errors.IntertieError:
    """Maps a gRPC failure onto the Intertie hierarchy."""
    code = exc.code() if hasattr(exc, "code") else None
    details = (exc.details() if hasattr(exc, "details") else None) or str(code)
    kind = ""
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == ERROR_KIND_KEY:
            kind = value if isinstance(value, str) else value.decode()
    by_kind = error_class(ErrorKind.Value(kind)) if kind in ErrorKind.keys() else None
    cls = by_kind or _CODE_TO_CLASS.get(code, errors.IntertieError)  # type: ignore[arg-type]
    if cls is errors.SiteUnavailableError and target:
        details = f"gateway {target} unavailable: {details}"
    return cls(details)


# ---------------------------------------------------------------------- addresses
# The port a gateway listens on unless told otherwise (intertie-gateway run --listen).
DEFAULT_GATEWAY_PORT = 7070
# gRPC target schemes passed through as they are (a deliberate gRPC target, not host:port).
_GRPC_SCHEMES = ("unix:", "unix-abstract:", "vsock:", "dns:", "ipv4:", "ipv6:")
_HOST = re.compile(r"^[A-Za-z0-9._-]+$")


def check_address(address: object) -> str:
    """A gateway address as "host:port" (or "[v6]:port", or a gRPC target such as
    "unix:/path"), checked for form before any connection is tried: a mistake is an
    :class:`~intertie.InvalidRequestError` at once, naming what is wrong."""
    if not isinstance(address, str):
        raise errors.InvalidRequestError(f"a gateway address is a string \"host:port\", not {type(address).__name__}")
    text = address.strip()

    def bad(why: str) -> errors.InvalidRequestError:
        return errors.InvalidRequestError(f"invalid gateway address {address!r}: {why}")

    if not text:
        raise errors.InvalidRequestError(
            "empty gateway address: give \"host:port\" (e.g. \"localhost:7070\"), or call "
            "intertie.connect() with no address for an embedded local site")
    if text.startswith(_GRPC_SCHEMES):
        return text
    scheme, sep, rest = text.partition("://")
    if sep:
        raise bad(f"drop the \"{scheme}://\" prefix: the gateway speaks gRPC at \"host:port\", "
                  f"e.g. \"{rest.rstrip('/')}\"")
    if any(c.isspace() for c in text) or "/" in text:
        raise bad("expected \"host:port\"")
    if text.startswith("["):  # [v6]:port
        host, sep, port = text[1:].partition("]")
        if not sep or not port.startswith(":"):
            raise bad("expected \"[IPv6]:port\"")
        port = port[1:]
    else:
        if text.count(":") > 1:
            raise bad("an IPv6 address needs brackets: \"[::1]:7070\"")
        host, sep, port = text.partition(":")
        if not sep:
            raise bad(f"no port: expected \"host:port\", e.g. \"{text}:{DEFAULT_GATEWAY_PORT}\" "
                      f"({DEFAULT_GATEWAY_PORT} is the gateway's default)")
        if not host or not _HOST.match(host):
            raise bad(f"{host!r} is not a host name")
    if not port.isdigit():
        raise bad(f"the port {port!r} is not a number")
    if not 1 <= int(port) <= 65535:
        raise bad(f"the port {port} is out of range (1-65535)")
    return text


# Words of gRPC's TLS failures, and what they mean to a user; a retry cannot mend them.
_TLS_FAILURES = (
    ("certificate_verify_failed", "the gateway's certificate is not signed by the CA given (tls_ca= or "
                                  "INTERTIE_TLS_CA): is that the CA of this gateway's federation?"),
    ("not in peer certificate", "the gateway's certificate is not for the host name connected to: connect with a "
                                "name or address its certificate lists (intertie-gateway certs create --host)"),
    ("wrong_version_number", "the TLS handshake failed: the gateway does not serve TLS (connect without tls_ca)"),
    ("handshake failed", "the TLS handshake failed: does the gateway serve TLS with a certificate of this CA?"),
)


def tls_cause(exc: grpc.RpcError) -> str | None:
    """Why a call failed in the TLS handshake, in words, if it did."""
    details = ((exc.details() if hasattr(exc, "details") else None) or str(exc)).lower()
    for words, meaning in _TLS_FAILURES:
        if words in details:
            return meaning
    return None


def is_loopback(address: str) -> bool:
    """Whether "host:port" names this machine (tokens may cross it in plaintext)."""
    host = address.rpartition(":")[0].strip("[]") if ":" in address else address
    return host in ("localhost", "::1") or host.startswith("127.") or address.startswith(("unix:", "unix-abstract:"))


def unreachable_cause(exc: grpc.RpcError, target: str = "", *, tls: bool = False) -> str:
    """Why an UNAVAILABLE call failed, in words (gRPC's own text follows in parentheses).
    ``tls``: whether the client connected with TLS."""
    details = (exc.details() if hasattr(exc, "details") else None) or str(exc)
    host = target.rpartition(":")[0] or target
    lowered = details.lower()
    meaning = tls_cause(exc)
    if meaning:
        return f"{meaning} [{details}]"
    if "connection refused" in lowered:
        why = f"connection refused: nothing listens at {target} (is the gateway running, and is that its port?)"
    elif "domain name not found" in lowered or "lookup failed" in lowered or "name or service not known" in lowered \
            or "nodename nor servname" in lowered or "could not resolve" in lowered:
        why = f"unknown host {host!r} (the name does not resolve)"
    elif "no route to host" in lowered or "network is unreachable" in lowered:
        why = f"no route to {host!r}"
    elif "connection reset" in lowered or "socket closed" in lowered:
        why = f"the connection to {target} was reset" + ("" if tls else (
            " (if the gateway serves TLS, connect with its CA: tls_ca= or INTERTIE_TLS_CA)"))
    else:
        return details
    return f"{why} [{details}]"


# A refused connection is tried again for this long (a gateway just starting, a port being
# rebound) before connect() gives up with the cause; an unknown host is not tried again.
REFUSED_RETRY_S = 2.0


def first_contact(call: Callable[[float], Any], target: str, timeout: float, *, tls: bool = False) -> Any:
    """``call(timeout_s)``: the first RPC to a gateway, failing fast with the cause.

    A refused connection or an unknown host is a :class:`~intertie.SiteUnavailableError`
    within REFUSED_RETRY_S, saying which; a host that never answers (packets dropped) one
    after ``timeout`` seconds, saying so; any other failure is translated as usual."""
    started = time.monotonic()
    deadline = started + timeout
    while True:
        try:
            return call(max(0.05, deadline - time.monotonic()))
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            now = time.monotonic()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED or (code == grpc.StatusCode.UNAVAILABLE and now >= deadline):
                raise errors.SiteUnavailableError(
                    f"gateway {target} did not answer within {timeout:g} s (is a firewall dropping the "
                    f"connection, or is it another kind of server?)") from None
            if code != grpc.StatusCode.UNAVAILABLE:
                raise translate(exc, target) from None
            cause = unreachable_cause(exc, target, tls=tls)
            if cause.startswith("unknown host") or tls_cause(exc) or now - started >= min(REFUSED_RETRY_S, timeout):
                raise errors.SiteUnavailableError(f"cannot reach gateway {target}: {cause}") from None
            time.sleep(0.1)  # a retry's pace, not a synchronisation: gRPC backs off 0.1 s too


def is_retryable(exc: grpc.RpcError) -> bool:
    code = exc.code() if hasattr(exc, "code") else None
    return code not in NON_RETRYABLE_CODES


F = TypeVar("F", bound=Callable[..., Any])


def translated(fn: F) -> F:
    """Decorator: grpc.RpcError raised inside becomes an IntertieError; a call on a closed
    connection (``self.closed``) is one at once."""

    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(self, "closed", False) is True:  # not a raw "Cannot invoke RPC on closed channel!"
            raise errors.IntertieError(f"{fn.__name__}(): the connection to {getattr(self, 'address', '?')} "
                                       f"is closed (intertie.connect() opens a new one)")
        try:
            return fn(self, *args, **kwargs)
        except grpc.RpcError as exc:
            raise translate(exc, getattr(self, "address", "")) from None

    return wrapper  # type: ignore[return-value]


__all__ = ["DEFAULT_GATEWAY_PORT", "ERROR_KIND_KEY", "NON_RETRYABLE_CODES", "ErrorKind", "channel_options",
           "check_address", "first_contact", "is_retryable", "tls_cause", "translate", "translated",
           "unreachable_cause"]


class _Details(collections.namedtuple("_Details", "method timeout metadata credentials wait_for_ready compression"),
               grpc.ClientCallDetails):  # type: ignore[misc]
    """A call's details with the token added (what grpc's channel interceptors hand on)."""


class BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
                  grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``authorization: Bearer TOKEN`` to every call of a channel (a tenant's token)."""

    def __init__(self, token: str) -> None:
        self.entry = ("authorization", f"Bearer {token}")

    def _details(self, details: Any) -> _Details:
        return _Details(details.method, details.timeout, [*(details.metadata or ()), self.entry],
                        details.credentials, getattr(details, "wait_for_ready", None),
                        getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


@dataclasses.dataclass(frozen=True)
class Credentials:
    """How a client proves itself and checks the gateway: a tenant's bearer token, and the
    PEM of the CA that signed the gateway's certificate (TLS; None: plaintext)."""

    token: str | None = None
    tls_ca: bytes | None = None

    @classmethod
    def resolve(cls, token: str | None = None, tls_ca: str | os.PathLike[str] | bytes | None = None) -> Credentials:
        """From the arguments, else ``INTERTIE_TOKEN`` and ``INTERTIE_TLS_CA`` (a file name).
        ``tls_ca``: a PEM file's name, or PEM bytes; "" (or b""): plaintext, whatever the
        environment says."""
        token = token if token is not None else (os.environ.get("INTERTIE_TOKEN") or None)
        if token is not None and not isinstance(token, str):
            raise errors.InvalidRequestError(f"token: expected a string, got {type(token).__name__}")
        token = token.strip() or None if isinstance(token, str) else token  # "": no token
        if token is not None and any(c.isspace() or not c.isprintable() for c in token):
            raise errors.InvalidRequestError("token: expected the token printed by `intertie-gateway token create` "
                                             "(one word, no spaces)")
        source = tls_ca if tls_ca is not None else (os.environ.get("INTERTIE_TLS_CA") or None)
        pem: bytes | None = None
        if source in ("", b""):
            source = None
        if isinstance(source, bytes):
            pem = source
        elif source is not None:
            try:
                pem = pathlib.Path(source).expanduser().read_bytes()
            except OSError as exc:
                raise errors.InvalidRequestError(f"tls_ca: cannot read the CA certificate {str(source)!r} "
                                                 f"({exc.strerror})") from None
        if pem is not None and b"-----BEGIN CERTIFICATE-----" not in pem:
            raise errors.InvalidRequestError("tls_ca: expected a PEM certificate (-----BEGIN CERTIFICATE-----), "
                                             "e.g. the ca.pem of `intertie-gateway certs create`")
        return cls(token, pem)

    def metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")] if self.token else []

    def channel(self, address: str, options: list[tuple[str, Any]]) -> grpc.Channel:
        """A blocking channel to a gateway, with TLS and the token when given."""
        if self.tls_ca is not None:
            channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(self.tls_ca), options=options)
        else:
            channel = grpc.insecure_channel(address, options=options)
        return grpc.intercept_channel(channel, BearerToken(self.token)) if self.token else channel

    def aio_channel(self, address: str, options: list[tuple[str, Any]]) -> grpc.aio.Channel:
        """An asyncio channel (the token goes in each call's metadata: ``metadata()``)."""
        import grpc.aio

        if self.tls_ca is not None:
            return grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(self.tls_ca), options=options)
        return grpc.aio.insecure_channel(address, options=options)
