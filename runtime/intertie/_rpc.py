"""gRPC plumbing shared by the SDK and the CLI: channels, retry policy, error translation."""

from __future__ import annotations

import functools
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


def is_retryable(exc: grpc.RpcError) -> bool:
    code = exc.code() if hasattr(exc, "code") else None
    return code not in NON_RETRYABLE_CODES


F = TypeVar("F", bound=Callable[..., Any])


def translated(fn: F) -> F:
    """Decorator: grpc.RpcError raised inside becomes an IntertieError."""

    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except grpc.RpcError as exc:
            raise translate(exc, getattr(self, "address", "")) from None

    return wrapper  # type: ignore[return-value]


__all__ = ["ERROR_KIND_KEY", "NON_RETRYABLE_CODES", "ErrorKind", "channel_options", "is_retryable",
           "translate", "translated"]
