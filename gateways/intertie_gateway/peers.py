"""The link to one peer gateway: what this site sends it and hears back from it.

Forwarded tasks wait in an outbox and are written as batches (bounded in tasks and bytes,
function bytes sent once per digest) on one Connect stream, the session stream, on which
the peer acknowledges each batch and reports the tasks' events. After every (re)connect the
unacknowledged batches are resent and a Reconcile lists what this site has there. The link
also cancels tasks at the peer and asks it for work. Whether the peer is up is decided by
``membership``, which opens the stream when it comes up and ends it when it goes down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic

import grpc

from intertie._rpc import channel_options
from intertie.v1 import peer_pb2, peer_pb2_grpc, site_pb2, site_pb2_grpc, tasks_pb2, tasks_pb2_grpc
from intertie_gateway.convert import acks_refused, spec_to_proto, update_from_event
from intertie_gateway.lifecycle import TERMINAL_STATES
from intertie_gateway.placement import SiteView
from intertie_gateway.ports import PeerListener, TaskT

logger = logging.getLogger(__name__)

# A Submit to a peer carries at most this many tasks, and tasks of at most this many bytes
# (one task more when the first alone is larger): the peer takes messages of its payload
# limit plus 16 MiB, so a batch of many large tasks would be refused, and resent, forever.
FORWARD_BATCH_TASKS = 1000
FORWARD_BATCH_BYTES = 8 << 20
# What a spec takes on the wire besides its arguments (ids, digest, name, limits), about.
SPEC_OVERHEAD_BYTES = 200
# Messages between gateways may carry a full payload plus the rest of a batch.
PEER_MESSAGE_BYTES = 1 << 30
# The session under which a gateway's forwarded tasks are watched at a peer:
# "peer:SITE:SECRET", a random secret per link, so nobody else can open or take it over.
SESSION_PREFIX = "peer:"
# A Reconcile message lists at most this many task ids (more follow in further messages).
RECONCILE_CHUNK = 50_000
# A peer that refuses our link (it does not list this site as a peer) is asked again this often.
REFUSED_RETRY_S = 5.0


# Opens the channel to a peer's address with these options (mutual TLS: ``transport``).
Channels = Callable[[str, Sequence[tuple[str, Any]]], grpc.aio.Channel]


def insecure(address: str, options: Sequence[tuple[str, Any]]) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=list(options))


class Peer(Generic[TaskT]):
    """One configured peer gateway: what its heartbeats told (kept by ``membership``) and
    the link to it."""

    def __init__(self, address: str, listener: PeerListener[TaskT], bandwidth: Mapping[str, float],
                 channel: Channels = insecure) -> None:
        self.address = address
        self.listener = listener
        self._bandwidth = bandwidth  # bytes/s per peer site, as configured
        self.site_id = ""  # learnt from its first status
        self.state = "down"  # until it answers
        self.status: site_pb2.SiteStatus | None = None
        self.last_seen = 0.0
        self.rtt_s = 0.0
        self.missed = 0
        self.shipped: set[str] = set()  # function digests the peer has from us
        self.outbox: list[TaskT] = []
        self.sending = False
        self._sender: asyncio.Task[None] | None = None  # referenced: the loop keeps only weak references
        self.pending = 0  # forwarded since its last status
        self._channel = channel(address, channel_options(PEER_MESSAGE_BYTES))
        self.tasks = tasks_pb2_grpc.TaskServiceStub(self._channel)
        self.site = site_pb2_grpc.SiteServiceStub(self._channel)
        self.peer = peer_pb2_grpc.PeerServiceStub(self._channel)
        self._watch: asyncio.Task[None] | None = None
        self._call: grpc.aio.StreamStreamCall | None = None
        self.session_id = f"{SESSION_PREFIX}{listener.site_id}:{secrets.token_hex(16)}"
        self._seq = 0
        self.inflight: dict[int, list[TaskT]] = {}  # batches written, not yet acknowledged
        self.offered: set[str] = set()  # function digests sent on this stream, not yet acknowledged
        # Set while the session stream to the peer is open: tasks are sent on it, and their
        # events come back on it (the peer does not buffer for absent sessions).
        self.watching = asyncio.Event()
        self.closed = False  # this site is stopping: the stream is not reopened

    @property
    def up(self) -> bool:
        return self.state == "up"

    def view(self) -> SiteView | None:
        status = self.status
        if status is None:
            return None
        return SiteView(
            site_id=status.site_id, state=self.state if self.state != "up" else (status.state or "up"),
            arch=status.arch, python_version=status.python_version, total=dict(status.resources_total),
            node_max=dict(status.resources_node_max), free=dict(status.resources_free), queued=status.queued,
            running=status.running, mean_run_s=status.mean_run_s or None, overhead_s=status.overhead_s or None,
            labels=dict(status.labels),
            max_payload_bytes=status.max_payload_bytes, rtt_s=self.rtt_s,
            bandwidth=self._bandwidth.get(status.site_id, 0.0), pending=self.pending,
            resident=dict(status.dataset_owners), accepts=tuple(status.accepts) or ("*",))

    # ------------------------------------------------------------------ up and down
    def open(self) -> None:
        """The peer came up: the session stream is opened, unless it still is."""
        # Functions it has from us are kept: its function store is journaled. A peer that lost
        # its journal refuses their tasks NOT_FOUND, and those go again with the bytes.
        if self._watch is None or self._watch.done():
            self._watch = asyncio.create_task(self._session_loop())

    def end_stream(self) -> None:
        """The peer went down. Its stream may still be open (a partition shorter than the
        keepalive): it is ended, so that the stream opened when the peer answers again
        reconciles, and the peer cancels what this site is about to move elsewhere rather
        than run it too."""
        if self._call is not None:
            self._call.cancel()

    # ------------------------------------------------------------------ forwarding
    def forward(self, tasks: Sequence[TaskT]) -> None:
        self.outbox.extend(tasks)
        self.pending += len(tasks)
        if not self.sending:
            self.sending = True
            self._sender = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        """Writes the outbox to the peer's session stream as batches; acks come back on it."""
        try:
            while self.outbox:
                await self.watching.wait()  # the stream is open (a peer that goes down is handled apart)
                call = self._call
                batch = self._take_batch()
                if not batch or call is None:
                    continue
                self._seq += 1
                self.inflight[self._seq] = batch
                try:
                    await call.write(self._message(self._seq, batch))
                except (grpc.RpcError, asyncio.InvalidStateError) as exc:
                    # Still in flight: resent when the stream opens again.
                    logger.info("writing to peer %s failed: %s", self.site_id, exc)
        finally:
            self.sending = False

    def _take_batch(self) -> list[TaskT]:
        """The next batch from the outbox: up to FORWARD_BATCH_TASKS tasks and about
        FORWARD_BATCH_BYTES of specs; tasks no longer this peer's are dropped on the way."""
        batch: list[TaskT] = []
        size = taken = 0
        for task in self.outbox:
            if len(batch) >= FORWARD_BATCH_TASKS:
                break
            if self._sendable(task):
                nbytes = len(task.spec.args) + SPEC_OVERHEAD_BYTES
                if batch and size + nbytes > FORWARD_BATCH_BYTES:
                    break
                batch.append(task)
                size += nbytes
            taken += 1
        self.outbox = self.outbox[taken:]
        return batch

    def _sendable(self, task: TaskT) -> bool:
        """Still this peer's to run: not placed elsewhere meanwhile, nor finished (cancelled)."""
        return task.site == self.site_id and task.state not in TERMINAL_STATES

    def _message(self, seq: int, batch: Sequence[TaskT]) -> tasks_pb2.ClientMessage:
        functions: list[tasks_pb2.Function] = []
        for task in batch:
            digest = task.spec.function_digest
            if digest not in self.shipped and digest not in self.offered:
                payload = self.listener.function_bytes(digest)
                if payload is not None:
                    self.offered.add(digest)
                    functions.append(tasks_pb2.Function(digest=digest, payload=payload, name=task.spec.name))
        # ``home`` is left empty: the peer sets it to this link's site itself.
        request = tasks_pb2.SubmitRequest(functions=functions, tasks=[spec_to_proto(t.spec) for t in batch])
        return tasks_pb2.ClientMessage(submit=tasks_pb2.SubmitBatch(seq=seq, request=request))

    def _on_ack(self, ack: tasks_pb2.SubmitAck) -> None:
        batch = self.inflight.pop(ack.seq, None)
        if batch is None:
            return
        self.shipped.update(t.spec.function_digest for t in batch)
        if any(not a.accepted and a.error.kind == 6 for a in ack.acks):  # NOT_FOUND: its function store was lost
            self.shipped.clear()
            self.offered.clear()
        self.listener.on_forward_acks(self, batch, acks_refused(ack.acks))

    def abandon(self) -> list[TaskT]:
        """The peer went down: what was on its way there (queued here, or sent and not
        acknowledged, so not started there) is placed elsewhere by the caller."""
        lost = [t for batch in self.inflight.values() for t in batch] + self.outbox
        self.inflight.clear()
        self.outbox = []
        return lost

    async def cancel(self, task_ids: Sequence[str]) -> None:
        try:
            await self.tasks.Cancel(tasks_pb2.CancelRequest(task_ids=list(task_ids)), timeout=30)
        except grpc.RpcError as exc:
            logger.warning("cancelling %d tasks at %s failed: %s", len(task_ids), self.site_id, exc.code())

    async def steal(self, max_tasks: int) -> int:
        """Asks this (busy) peer to send us up to ``max_tasks`` of its queued tasks."""
        try:
            response = await self.peer.Steal(peer_pb2.StealRequest(
                site_id=self.listener.site_id, max_tasks=max_tasks), timeout=10)
        except grpc.RpcError as exc:
            logger.debug("steal from %s failed: %s", self.site_id, exc.code())
            return 0
        return response.moved

    # ------------------------------------------------------------------ the session stream
    async def _session_loop(self) -> None:
        """One Connect stream to the peer: our batches go up, their acks and the tasks'
        events come down. Reopened with backoff while the peer is configured."""
        listener = self.listener
        backoff = 0.05
        while not self.closed:
            call = self.tasks.Connect()
            try:
                await call.write(tasks_pb2.ClientMessage(open=tasks_pb2.WatchRequest(
                    session_id=self.session_id, progress=True, peer_site=listener.site_id)))
                opened = await call.read()
                if opened is grpc.aio.EOF:
                    raise ConnectionError("the peer closed the stream")
                self.shipped.clear()  # what the peer has is unknown after a (re)connect
                self.offered.clear()
                self._call = call
                for seq in sorted(self.inflight):  # unacknowledged: resend (idempotent there)
                    batch = [t for t in self.inflight.get(seq, ()) if self._sendable(t)]
                    if not batch:
                        self.inflight.pop(seq, None)
                        continue
                    self.inflight[seq] = batch
                    await call.write(self._message(seq, batch))
                # After the resent batches, before new ones: what we have there. The peer runs
                # what it held since a restart only if listed, cancels the rest of ours, and
                # sends the events of listed tasks that finished while no stream was open.
                unsent = await self._reconcile(call)
                self.watching.set()
                backoff = 0.05
                while True:
                    message = await call.read()
                    if message is grpc.aio.EOF:
                        break
                    kind = message.WhichOneof("kind")
                    if kind == "ack":
                        self._on_ack(message.ack)
                    elif kind == "reconciled":
                        if message.reconciled.dropped:
                            logger.info("peer %s dropped %d tasks this site had moved elsewhere", self.site_id,
                                        message.reconciled.dropped)
                        listener.on_reconciled(self, message.reconciled.unknown_task_ids, unsent)
                    else:
                        listener.on_peer_events(self, [update_from_event(e) for e in message.events.events])
            except grpc.RpcError as exc:
                if self.closed:
                    return
                if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                    logger.error("peer %s (%s) refused this site's link: %s (does it list this site as a peer?)",
                                 self.site_id or "?", self.address, exc.details())
                    backoff = REFUSED_RETRY_S
                else:
                    logger.info("session stream to peer %s broke: %s", self.site_id, exc.code())
            except asyncio.CancelledError:
                call.cancel()
                raise
            except Exception:
                logger.exception("session stream to peer %s failed", self.site_id)
            finally:
                self.watching.clear()
                self._call = None
            call.cancel()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, max(backoff, 1.0))

    async def _reconcile(self, call: grpc.aio.StreamStreamCall) -> set[str]:
        """Writes the Reconcile of this link; returns the ids listed that were not yet sent
        (the peer cannot know those yet)."""
        ids = self.listener.tasks_at(self.site_id)
        unsent = {t.task_id for t in self.outbox}
        for start in range(0, max(len(ids), 1), RECONCILE_CHUNK):
            chunk = ids[start:start + RECONCILE_CHUNK]
            await call.write(tasks_pb2.ClientMessage(reconcile=tasks_pb2.Reconcile(
                task_ids=chunk, more=start + RECONCILE_CHUNK < len(ids))))
        return unsent

    async def close(self) -> None:
        self.closed = True
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watch
        await self._channel.close()
