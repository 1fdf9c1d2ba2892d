"""Who is calling this gateway, decided once per call (a client's Connect stream is one
call, so the per-task cost is nil) before the call reaches any servicer.

- A **peer**: a caller on the peers' endpoint, known by the CN of the certificate the
  federation CA signed (``transport.peer_site``). No token.
- A **tenant**: with ``auth = "token"``, the tenant of the ``authorization: Bearer itk_...``
  entry (``tokens.TokenStore``). Without a valid one the call ends with UNAUTHENTICATED
  (the SDK raises ``intertie.AuthenticationError``), its reason in one line that never
  repeats the token.
- With ``auth = "none"``: an anonymous tenant ("") for everyone on the tenants' endpoint.

Servicers read the decision with :func:`caller`. Health checks stay open (load balancers
probe them). A source (IP address) that fails authentication ``MAX_FAILURES`` times within
``FAILURE_WINDOW_S`` is refused outright for the rest of that window, valid token or not:
guessing tokens costs a window per ``MAX_FAILURES`` guesses. Failures are logged at most
once a minute per kind.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from intertie_gateway.tenancy import ANONYMOUS, Caller
from intertie_gateway.throttle import log_throttled
from intertie_gateway.tokens import TokenError, TokenStore, bearer_token
from intertie_gateway.transport import peer_site

logger = logging.getLogger(__name__)

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
KIND = (("intertie-error-kind", "ERROR_KIND_UNAUTHENTICATED"),)
# Failed authentications from one source within a window, before it is refused outright.
MAX_FAILURES = 20
FAILURE_WINDOW_S = 60.0
# Sources remembered at most (the oldest window is forgotten first): bounded memory under a
# flood of spoofed or many addresses.
MAX_SOURCES = 10_000


_caller: contextvars.ContextVar[Caller] = contextvars.ContextVar("intertie_caller", default=ANONYMOUS)


def caller() -> Caller:
    """The caller of the RPC being served (inside a servicer and what it starts)."""
    return _caller.get()


def bearer(metadata: Any) -> str | None:
    """The token of an ``authorization: Bearer ...`` entry, if any."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            return bearer_token(value)
    return None


class FailureLimit:
    """Counts failed authentications per source in fixed windows (pure; clock injected)."""

    def __init__(self, max_failures: int = MAX_FAILURES, window_s: float = FAILURE_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic, max_sources: int = MAX_SOURCES) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.clock = clock
        self.max_sources = max_sources
        self._windows: dict[str, tuple[float, int]] = {}  # source -> (window start, failures)

    def blocked_for(self, source: str) -> float:
        """Seconds the source is still refused (0: it may try)."""
        entry = self._windows.get(source)
        if entry is None:
            return 0.0
        left = entry[0] + self.window_s - self.clock()
        if left <= 0:
            del self._windows[source]
            return 0.0
        return left if entry[1] >= self.max_failures else 0.0

    def failed(self, source: str) -> None:
        now = self.clock()
        start, count = self._windows.get(source, (now, 0))
        if now - start >= self.window_s:
            start, count = now, 0
        self._windows.pop(source, None)  # re-inserted last: the dict stays oldest-first
        self._windows[source] = (start, count + 1)
        while len(self._windows) > self.max_sources:
            del self._windows[next(iter(self._windows))]


def revoked(tokens: TokenStore | None, who: Caller) -> bool:
    """Whether the token ``who`` was let in with has been revoked since."""
    return tokens is not None and bool(who.token_id) and not tokens.active(who.token_id)


def source_of(peer: str) -> str:
    """The address part of a gRPC peer string ("ipv4:1.2.3.4:5678" -> "ipv4:1.2.3.4")."""
    return peer.rpartition(":")[0] or peer


class Gatekeeper(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Decides the caller of every call (see the module doc) and refuses the unauthenticated.

    ``tokens`` None: auth none (every tenant caller is anonymous)."""

    def __init__(self, tokens: TokenStore | None, limit: FailureLimit | None = None) -> None:
        self.tokens = tokens
        self.limit = limit or FailureLimit()

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        return _wrapped(handler, lambda context: self._decide(details, context))

    def _decide(self, details: grpc.HandlerCallDetails, context: grpc.aio.ServicerContext) -> Caller | str:
        """The caller, or why the call is refused."""
        site = peer_site(context)
        if site:
            return Caller(peer=site)
        if self.tokens is None:
            return ANONYMOUS
        source = source_of(context.peer() or "")
        wait = self.limit.blocked_for(source)
        if wait:
            log_throttled(logger, "auth-blocked", "refused a call from %s: too many failed authentications", source)
            return f"too many failed authentications from your address; try again in {wait:.0f} s"
        token = bearer(details.invocation_metadata)
        try:
            if token is None:
                raise TokenError("no token: pass connect(..., token=...), INTERTIE_TOKEN or --token")
            tenant = self.tokens.check(token)
            return Caller(tenant=tenant, token_id=token.split("_")[1])
        except TokenError as exc:
            why = str(exc)
        self.limit.failed(source)
        log_throttled(logger, f"auth-{why.split(' ')[0]}", "refused a call to %s from %s: %s", details.method,
                      source, why)
        return f"not authenticated: {why}"


def _wrapped(handler: Any, decide: Callable[[grpc.aio.ServicerContext], Caller | str]) -> Any:
    """A handler of the same shape as ``handler`` that decides the caller first: it ends the
    call with UNAUTHENTICATED, or serves it with :func:`caller` set."""
    kwargs = dict(request_deserializer=handler.request_deserializer,
                  response_serializer=handler.response_serializer)

    async def admit(context: grpc.aio.ServicerContext) -> None:
        who = decide(context)
        if isinstance(who, str):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, who, trailing_metadata=KIND)
        else:
            _caller.set(who)  # each call is served in a task of its own: the setting stays in it

    if handler.unary_unary or handler.stream_unary:
        inner = handler.unary_unary or handler.stream_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await admit(context)
            return await inner(request, context)

        make = grpc.unary_unary_rpc_method_handler if handler.unary_unary else grpc.stream_unary_rpc_method_handler
        return make(unary, **kwargs)
    inner = handler.unary_stream or handler.stream_stream

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await admit(context)
        async for item in answers_of(inner(request, context)):
            yield item

    make = grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
    return make(streaming, **kwargs)


async def answers_of(result: Any) -> AsyncIterator[Any]:
    """What a streaming handler's call yields (one that writes with ``context.write`` instead
    yields nothing here): for interceptors that wrap streaming handlers."""
    if hasattr(result, "__aiter__"):
        async for item in result:
            yield item
    else:
        await result
