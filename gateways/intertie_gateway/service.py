"""gRPC servicers: the wire edge of the gateway. Bad input becomes a typed status, never a crash."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
from google.protobuf import symbol_database

from intertie._rpc import ERROR_KIND_KEY
from intertie.v1 import peer_pb2, peer_pb2_grpc, site_pb2, site_pb2_grpc, tasks_pb2, tasks_pb2_grpc
from intertie_gateway.auth import caller
from intertie_gateway.convert import placement_to_proto, spec_from_proto
from intertie_gateway.scheduler import Scheduler
from intertie_gateway.sessions import Session, SessionHub
from intertie_gateway.tenancy import Caller, scope
from intertie_gateway.throttle import log_throttled
from intertie_gateway.validate import check_spec, clip

logger = logging.getLogger(__name__)

# The stream splits a burst of events into messages of about this size, so that many
# results never exceed the message limit together.
EVENT_MESSAGE_BYTES = 4 * 1024 * 1024
MAX_IDS_PER_CALL = 100_000
# Session ids are UUIDs (clients) or "peer:SITE:SECRET" (links); longer ones are refused.
MAX_SESSION_ID_CHARS = 256
# An open session stream of a tenant looks this often whether its token was revoked.
REVOCATION_CHECK_S = 1.0


class Malformed:
    """Stands in for a request whose bytes did not parse, so the handler can answer with
    INVALID_ARGUMENT (gRPC itself would answer UNKNOWN)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:
            return Malformed(str(exc))

    return deserialize


def register(server: grpc.aio.Server, servicer: object, service: Any, *, own_streams: bool = True) -> None:
    """Adds ``servicer``'s methods for the proto ``service`` descriptor, with requests that
    fail to parse answered by a typed INVALID_ARGUMENT instead of reaching the method (and
    instead of a traceback in the log per garbage request, as grpcio does), and a method
    that fails unexpectedly answered by a short INTERNAL (its traceback stays in the log).

    ``own_streams``: the servicer's client-streaming methods meet Malformed items in their
    request iterators and answer them; otherwise (stock services: health, reflection) the
    stream is ended with INVALID_ARGUMENT at the first one."""
    db = symbol_database.Default()
    handlers = {}
    for method in service.methods:
        request_cls = db.GetSymbol(method.input_type.full_name)
        impl = getattr(servicer, method.name)
        name = f"{service.name}.{method.name}"
        deserialize = _lenient(request_cls.FromString)
        if method.client_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                _contained_stream(name, impl, strict=not own_streams), request_deserializer=deserialize,
                response_serializer=lambda m: m.SerializeToString())
        elif method.server_streaming and inspect.isasyncgenfunction(impl):
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _contained_stream(name, impl, strict=True), request_deserializer=deserialize,
                response_serializer=lambda m: m.SerializeToString())
        else:  # unary, or a stream written with context.write (the stock health Watch)
            handler = grpc.unary_stream_rpc_method_handler if method.server_streaming \
                else grpc.unary_unary_rpc_method_handler
            handlers[method.name] = handler(_contained_unary(name, impl), request_deserializer=deserialize,
                                            response_serializer=lambda m: m.SerializeToString())
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


async def _reject(request: Malformed, context: grpc.aio.ServicerContext) -> None:
    await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "ERROR_KIND_INVALID_ARGUMENT",
                 f"malformed request: {clip(request.reason)}")


async def _internal(name: str, exc: Exception, context: grpc.aio.ServicerContext) -> None:
    if isinstance(exc, NotImplementedError):  # a stock servicer's method it does not implement
        await _abort(context, grpc.StatusCode.UNIMPLEMENTED, "ERROR_KIND_INVALID_ARGUMENT",
                     f"{name} is not implemented by this gateway")
    log_throttled(logger, f"rpc:{name}", "%s failed: %s: %s", name, type(exc).__name__, clip(str(exc)),
                  level=logging.ERROR, exc_info=True)
    await _abort(context, grpc.StatusCode.INTERNAL, "ERROR_KIND_INTERNAL",
                 f"the gateway failed to serve {name} ({type(exc).__name__}; logged at the site)")


def _contained_unary(name: str, impl: Callable[..., Any]) -> Callable[..., Any]:
    async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Malformed):
            await _reject(request, context)
        try:
            return await impl(request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await _internal(name, exc, context)

    return behavior


def _contained_stream(name: str, impl: Callable[..., Any], *, strict: bool) -> Callable[..., Any]:
    """A server-streaming or bidirectional method. ``strict``: a Malformed request (the
    single one, or any in the request stream) ends the call with INVALID_ARGUMENT."""
    async def parsed(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, Malformed):
                await _reject(request, context)
            yield request

    async def behavior(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if strict:
            if isinstance(request, Malformed):
                await _reject(request, context)
            elif hasattr(request, "__aiter__"):
                request = parsed(request, context)
        try:
            async for item in impl(request, context):
                yield item
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await _internal(name, exc, context)

    return behavior


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, kind: str, message: str) -> None:
    await context.abort(code, message, trailing_metadata=((ERROR_KIND_KEY, kind),))


def _scoped(request: tasks_pb2.SubmitRequest, prefix: str) -> None:
    """A tenant's tasks, filed under its own ids (tenancy.scope)."""
    if prefix:
        for spec in request.tasks:
            spec.task_id = prefix + spec.task_id


def _unscoped_acks(acks: list[tasks_pb2.TaskAck], prefix: str) -> list[tasks_pb2.TaskAck]:
    if prefix:
        for ack in acks:
            ack.task_id = ack.task_id.removeprefix(prefix)
    return acks


def _unscoped_events(events: list[tasks_pb2.TaskEvent], prefix: str) -> list[tasks_pb2.TaskEvent]:
    """Events as a tenant's session sends them: with the tenant's own ids. (All sessions of a
    task are its tenant's: an event shared by several is changed once.)"""
    if prefix:
        for event in events:
            event.task_id = event.task_id.removeprefix(prefix)
    return events


def _batches(events: list[tasks_pb2.TaskEvent]) -> Iterator[list[tasks_pb2.TaskEvent]]:
    """Events in messages of about EVENT_MESSAGE_BYTES."""
    batch: list[tasks_pb2.TaskEvent] = []
    size = 0
    for event in events:
        n = len(event.result) + 256
        if batch and size + n > EVENT_MESSAGE_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(event)
        size += n
    if batch:
        yield batch


class TaskService(tasks_pb2_grpc.TaskServiceServicer):
    """``revoked(caller)``: whether the token a caller was let in with has been revoked since
    (a session stream outlives the check at its start: it ends within seconds of that)."""

    def __init__(self, scheduler: Scheduler, hub: SessionHub,
                 revoked: Callable[[Caller], bool] = lambda who: False) -> None:
        self._scheduler = scheduler
        self._hub = hub
        self._revoked = revoked

    async def Submit(self, request: tasks_pb2.SubmitRequest,
                     context: grpc.aio.ServicerContext) -> tasks_pb2.SubmitResponse:
        if self._scheduler.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down")
        who = caller()
        if who.peer:  # peers forward on their link, where home and tenant are set from it
            await _abort(context, grpc.StatusCode.PERMISSION_DENIED, "ERROR_KIND_PERMISSION_DENIED",
                         "a peer forwards tasks on its link (Connect), not with Submit")
        request.session_id = self._session_key(request.session_id)
        prefix = scope(who.tenant)
        _scoped(request, prefix)
        acks = await self._scheduler.intake.submit(request, tenant=who.tenant)
        return tasks_pb2.SubmitResponse(acks=_unscoped_acks(acks, prefix))

    async def Watch(self, request: tasks_pb2.WatchRequest,
                    context: grpc.aio.ServicerContext) -> AsyncIterator[tasks_pb2.TaskEvents]:
        if not 0 < len(request.session_id) <= MAX_SESSION_ID_CHARS:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "ERROR_KIND_INVALID_ARGUMENT",
                         f"Watch needs a session_id of 1-{MAX_SESSION_ID_CHARS} characters")
        session = self._hub.open(self._session_key(request.session_id), request.progress)
        session.scope = scope(caller().tenant)
        guard = asyncio.get_running_loop().create_task(self._end_if_revoked(session))
        try:
            yield tasks_pb2.TaskEvents()  # tells the client its events will now be delivered
            while not session.closed:
                await session.wakeup.wait()
                for batch in _batches(_unscoped_events(session.take(), session.scope)):
                    yield tasks_pb2.TaskEvents(events=batch)
                if session.failure_kind == "ERROR_KIND_UNAUTHENTICATED":
                    await _abort(context, grpc.StatusCode.UNAUTHENTICATED, session.failure_kind, session.failure or "")
        finally:
            guard.cancel()
            self._hub.close(session)

    async def Connect(self, requests: AsyncIterator[Any],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[tasks_pb2.ServerMessage]:
        stream = requests.__aiter__()
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            return
        if isinstance(first, Malformed) or first.WhichOneof("kind") != "open" \
                or not 0 < len(first.open.session_id) <= MAX_SESSION_ID_CHARS:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "ERROR_KIND_INVALID_ARGUMENT",
                         f"Connect: the first message must open a session (open.session_id, 1-{MAX_SESSION_ID_CHARS} "
                         "characters)")
        peer, refused = self._link_site(first.open.peer_site)
        if refused:
            await _abort(context, grpc.StatusCode.PERMISSION_DENIED, "ERROR_KIND_PERMISSION_DENIED", refused)
        if peer and not caller().peer:  # a plaintext federation: ask the claimed site itself
            verdict, why = await self._scheduler.verify_link(peer, first.open.session_id)
            if verdict != "ok":  # unreachable: the opener retries (UNAVAILABLE), refused: it is told why
                code = grpc.StatusCode.PERMISSION_DENIED if verdict == "refused" else grpc.StatusCode.UNAVAILABLE
                await _abort(context, code, "ERROR_KIND_INVALID_ARGUMENT",
                             f"site {self._scheduler.site_id!r} did not open a peer link: {why}")
        session = self._hub.open(self._session_key(first.open.session_id), first.open.progress, peer)
        if not peer:
            session.scope = scope(caller().tenant)
        reader = asyncio.get_running_loop().create_task(self._read_batches(stream, session))
        guard = asyncio.get_running_loop().create_task(self._end_if_revoked(session))
        try:
            yield tasks_pb2.ServerMessage(events=tasks_pb2.TaskEvents())  # the session is open
            while not session.closed:
                await session.wakeup.wait()
                # Take everything before yielding: what arrives while a message is being
                # sent sets the wakeup again and is taken on the next turn.
                replies = session.take_replies()
                events = _unscoped_events(session.take(), session.scope)  # clears the wakeup
                for reply in replies:
                    yield reply
                for batch in _batches(events):
                    yield tasks_pb2.ServerMessage(events=tasks_pb2.TaskEvents(events=batch))
                if session.failure is not None:
                    if self._scheduler.draining:
                        code, kind = grpc.StatusCode.UNAVAILABLE, ""
                    elif session.failure_kind == "ERROR_KIND_INVALID_ARGUMENT":
                        code, kind = grpc.StatusCode.INVALID_ARGUMENT, session.failure_kind
                    elif session.failure_kind == "ERROR_KIND_UNAUTHENTICATED":
                        code, kind = grpc.StatusCode.UNAUTHENTICATED, session.failure_kind
                    else:  # the gateway's own: the client reconnects and resends (idempotent)
                        code, kind = grpc.StatusCode.INTERNAL, "ERROR_KIND_INTERNAL"
                    await _abort(context, code, kind, session.failure)
        finally:
            reader.cancel()
            guard.cancel()
            self._hub.close(session)

    async def _end_if_revoked(self, session: Session) -> None:
        """Ends a tenant's session stream within REVOCATION_CHECK_S of its token's revocation."""
        who = caller()
        if not who.token_id:
            return
        while not session.closed:
            await asyncio.sleep(REVOCATION_CHECK_S)
            if self._revoked(who):
                session.failure = f"not authenticated: token {who.token_id} was revoked"
                session.failure_kind = "ERROR_KIND_UNAUTHENTICATED"
                session.wakeup.set()
                return

    def _session_key(self, session_id: str) -> str:
        """The session as the gateway files it: a tenant's session ids are its own, so another
        tenant who learns one can neither take its stream over nor read its events."""
        who = caller()
        if who.peer:
            return f"p:{who.peer}/{session_id}"
        return f"t:{who.tenant}/{session_id}" if who.tenant else session_id

    def _link_site(self, claimed: str) -> tuple[str, str]:
        """(the peer site whose link this stream is, or "" for a tenant's session; why the
        stream is refused, or ""). A peer is who its certificate says; a claim without a
        certificate is honoured only where peers are not required to show one."""
        who = caller()
        if who.peer:
            if claimed and claimed != who.peer:
                return "", f"the link claims site {clip(claimed)!r} but its certificate names {who.peer!r}"
            if self._scheduler.federation.peer_for(who.peer) is None:
                return "", (f"site {who.peer!r} is not one of the peers of site {self._scheduler.site_id!r} (or not "
                            "heard from yet)")
            return who.peer, ""
        if claimed and self._scheduler.config.peers_by_certificate:
            return "", (f"site {self._scheduler.site_id!r} takes peer links only on its peers' endpoint, with a "
                        "certificate of the federation CA")
        return claimed, ""

    async def _read_batches(self, stream: AsyncIterator[Any], session: Session) -> None:
        """Submits each batch of a Connect stream in order; its ack goes back on the stream."""
        who = caller()  # (this task was started by the call's own: it has the caller)
        try:
            async for message in stream:
                kind = None if isinstance(message, Malformed) else message.WhichOneof("kind")
                if kind not in ("submit", "reconcile") or (kind == "reconcile" and not session.peer):
                    why = message.reason if isinstance(message, Malformed) else \
                        "reconcile is for peer links" if kind == "reconcile" else "expected a submit batch"
                    session.failure = f"malformed message on the session stream: {clip(why)}"
                    session.failure_kind = "ERROR_KIND_INVALID_ARGUMENT"
                    break
                if self._scheduler.draining:
                    session.failure = "the gateway is shutting down"
                    break
                if kind == "reconcile":
                    session.reconciling.extend(message.reconcile.task_ids)
                    if not message.reconcile.more:
                        listed, session.reconciling = session.reconciling, []
                        unknown, dropped = self._scheduler.reconcile(session.peer, session.session_id, listed)
                        session.push_reply(tasks_pb2.ServerMessage(reconciled=tasks_pb2.ReconcileAck(
                            unknown_task_ids=unknown, dropped=dropped)))
                    continue
                request = message.submit.request
                request.session_id = session.session_id
                _scoped(request, session.scope)
                acks = _unscoped_acks(await self._scheduler.intake.submit(request, peer=session.peer,
                                                                          tenant=who.tenant), session.scope)
                session.push_reply(tasks_pb2.ServerMessage(ack=tasks_pb2.SubmitAck(seq=message.submit.seq, acks=acks)))
        except asyncio.CancelledError:
            raise
        except grpc.RpcError:
            pass  # the client went away
        except Exception as exc:
            logger.exception("session %s: submit failed", session.session_id)
            session.failure = f"the gateway failed to accept a batch: {type(exc).__name__}: {exc}"
            session.failure_kind = "ERROR_KIND_INTERNAL"
        # A client that closes its side still gets its events until it cancels the call.
        if session.failure is not None:
            session.wakeup.set()

    async def Subscribe(self, request: tasks_pb2.SubscribeRequest,
                        context: grpc.aio.ServicerContext) -> tasks_pb2.SubscribeResponse:
        if len(request.task_ids) > MAX_IDS_PER_CALL:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "ERROR_KIND_INVALID_ARGUMENT",
                         f"at most {MAX_IDS_PER_CALL} task ids per call")
        prefix = scope(caller().tenant)
        unknown = self._scheduler.queries.subscribe(self._session_key(request.session_id),
                                                    [prefix + i for i in request.task_ids], caller())
        return tasks_pb2.SubscribeResponse(unknown_task_ids=[i.removeprefix(prefix) for i in unknown])

    async def GetTask(self, request: tasks_pb2.GetTaskRequest,
                      context: grpc.aio.ServicerContext) -> tasks_pb2.TaskInfo:
        prefix = scope(caller().tenant)
        info = self._scheduler.queries.info(prefix + request.task_id, caller())
        if info is not None:
            info.task_id = request.task_id
        if info is None:
            await _abort(context, grpc.StatusCode.NOT_FOUND, "ERROR_KIND_NOT_FOUND",
                         f"site {self._scheduler.site_id!r} knows no task {clip(request.task_id)!r}")
        assert info is not None
        return info

    async def Cancel(self, request: tasks_pb2.CancelRequest,
                     context: grpc.aio.ServicerContext) -> tasks_pb2.CancelResponse:
        if len(request.task_ids) > MAX_IDS_PER_CALL:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "ERROR_KIND_INVALID_ARGUMENT",
                         f"at most {MAX_IDS_PER_CALL} task ids per call")
        who = caller()
        prefix = scope(who.tenant)
        ids = self._scheduler.queries.visible([prefix + i for i in request.task_ids], who)
        if request.all_mine:
            if self._scheduler.config.auth != "token" or who.peer:
                await _abort(context, grpc.StatusCode.FAILED_PRECONDITION, "ERROR_KIND_INVALID_ARGUMENT",
                             f"site {self._scheduler.site_id!r} runs without token auth: its tasks belong to no "
                             "tenant, so there are none that are yours to cancel all at once; cancel by task id")
            ids += self._scheduler.queries.owned(who.tenant)
        cancelled = self._scheduler.cancel(list(dict.fromkeys(ids)))
        return tasks_pb2.CancelResponse(cancelled=[i.removeprefix(prefix) for i in cancelled])

    async def Quote(self, request: tasks_pb2.QuoteRequest,
                    context: grpc.aio.ServicerContext) -> tasks_pb2.Placement:
        spec = request.task
        if not spec.task_id:
            spec.task_id = "quote"
        if not spec.function_digest:
            spec.function_digest = "0" * 64
        spec.tenant = caller().tenant  # sites that would refuse the caller's tenant are ranked out
        error = check_spec(spec, max_payload_bytes=1 << 62, python_version="", site_id=self._scheduler.site_id)
        if error is not None or request.args_bytes < 0:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "ERROR_KIND_INVALID_ARGUMENT",
                         error.message if error is not None else "args_bytes must be >= 0")
        return placement_to_proto(self._scheduler.quote(spec_from_proto(spec), request.args_bytes))


class SiteService(site_pb2_grpc.SiteServiceServicer):
    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler

    async def GetStatus(self, request: site_pb2.GetStatusRequest,
                        context: grpc.aio.ServicerContext) -> site_pb2.SiteStatus:
        return self._for_caller(self._scheduler.queries.status())

    async def ListSites(self, request: site_pb2.ListSitesRequest,
                        context: grpc.aio.ServicerContext) -> site_pb2.SiteList:
        return site_pb2.SiteList(sites=[self._for_caller(s) for s in self._scheduler.queries.catalogue()])

    def _for_caller(self, status: site_pb2.SiteStatus) -> site_pb2.SiteStatus:
        """A status as the caller may see it: the ids of the datasets a site holds and the
        tenants it serves are for peers (placement); to tenants of a site with token auth they
        would tell other tenants' dataset ids and names."""
        if self._scheduler.config.auth == "token" and not caller().peer:
            status.ClearField("dataset_owners")
            status.ClearField("accepts")  # names other tenants
        return status


class PeerService(peer_pb2_grpc.PeerServiceServicer):
    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler

    async def _peer_only(self, context: grpc.aio.ServicerContext, claimed: str = "") -> None:
        """Peers' methods: where peers show certificates, only a peer may call them, and only
        as the site its certificate names."""
        who = caller()
        if not self._scheduler.config.peers_by_certificate:
            return
        if not who.peer:
            await _abort(context, grpc.StatusCode.PERMISSION_DENIED, "ERROR_KIND_PERMISSION_DENIED",
                         "only a peer site may call this (on the peers' endpoint, with a certificate of the "
                         "federation CA)")
        if claimed and claimed != who.peer:
            await _abort(context, grpc.StatusCode.PERMISSION_DENIED, "ERROR_KIND_PERMISSION_DENIED",
                         f"the request claims site {clip(claimed)!r} but the certificate names {who.peer!r}")
        if self._scheduler.federation.peer_for(who.peer) is None:  # a member of the federation, not a peer
            await _abort(context, grpc.StatusCode.PERMISSION_DENIED, "ERROR_KIND_PERMISSION_DENIED",
                         f"site {who.peer!r} is not one of the peers of site {self._scheduler.site_id!r}")

    async def Steal(self, request: peer_pb2.StealRequest,
                    context: grpc.aio.ServicerContext) -> peer_pb2.StealResponse:
        await self._peer_only(context, request.site_id)
        return peer_pb2.StealResponse(moved=self._scheduler.steal(request.site_id, min(request.max_tasks, 10_000)))

    async def VerifyLink(self, request: peer_pb2.VerifyLinkRequest,
                         context: grpc.aio.ServicerContext) -> peer_pb2.VerifyLinkResponse:
        await self._peer_only(context)
        return peer_pb2.VerifyLinkResponse(ok=self._scheduler.owns_link(request.site_id, request.session_id),
                                           site_id=self._scheduler.site_id)
