"""Who may call this gateway: a bearer token checked once per call (a client's Connect stream
is one call, so the per-task cost is nil), before the call reaches any servicer.

A call without a valid ``authorization: Bearer itk_...`` metadata entry ends with
UNAUTHENTICATED (the SDK raises ``intertie.AuthenticationError``), its reason in one line
that never repeats the token. Health checks stay open (load balancers probe them).
Failures are logged at most once a minute per kind of failure.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from intertie_gateway.throttle import log_throttled
from intertie_gateway.tokens import MAX_TOKEN_CHARS, TokenError, TokenStore

logger = logging.getLogger(__name__)

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
KIND = (("intertie-error-kind", "ERROR_KIND_UNAUTHENTICATED"),)


def bearer(metadata: Any) -> str | None:
    """The token of an ``authorization: Bearer ...`` entry, if any."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value[:MAX_TOKEN_CHARS + 16].partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


class TokenAuth(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, store: TokenStore) -> None:
        self.store = store

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        token = bearer(details.invocation_metadata)
        try:
            if token is None:
                raise TokenError("no token: pass connect(..., token=...), INTERTIE_TOKEN or --token")
            self.store.check(token)
            return handler
        except TokenError as exc:
            why = str(exc)
        log_throttled(logger, f"auth-{why.split(' ')[0]}", "refused a call to %s: %s", details.method, why)
        return _denied(handler, f"not authenticated: {why}")


def _denied(handler: Any, message: str) -> Any:
    """A handler of the same shape as ``handler`` that ends the call with UNAUTHENTICATED."""
    async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message, trailing_metadata=KIND)

    kwargs = dict(request_deserializer=handler.request_deserializer,
                  response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny, **kwargs)
    return grpc.stream_stream_rpc_method_handler(deny, **kwargs)
