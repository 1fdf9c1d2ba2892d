"""Membership: this gateway's links to its peers.

Each peer is pulled for its status every ``heartbeat_s``; ``down_after`` missed answers
in a row mark it down, one answer marks it up again. Over a link the gateway forwards
tasks (one Submit in flight per peer, the rest batched behind it, function bytes sent
once per digest), cancels them, asks for work when idle, and holds one Watch stream on
which the peer reports the tasks this gateway sent it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import grpc

from intertie._rpc import channel_options
from intertie.v1 import peer_pb2, peer_pb2_grpc, site_pb2, site_pb2_grpc, tasks_pb2, tasks_pb2_grpc
from intertie_gateway.journal import TERMINAL
from intertie_gateway.placement import SiteView
from intertie_gateway.validate import clip

if TYPE_CHECKING:
    from intertie_gateway.scheduler import Scheduler, Task

logger = logging.getLogger(__name__)

# A Submit to a peer carries at most this many tasks, and tasks of at most this many bytes
# (one task more when the first alone is larger): the peer takes messages of its payload
# limit plus 16 MiB, so a batch of many large tasks would be refused, and resent, forever.
FORWARD_BATCH_TASKS = 1000
FORWARD_BATCH_BYTES = 8 << 20
# Messages between gateways may carry a full payload plus the rest of a batch.
PEER_MESSAGE_BYTES = 1 << 30
# The session under which a gateway's forwarded tasks are watched at a peer:
# "peer:SITE:SECRET", a random secret per link, so nobody else can open or take it over.
SESSION_PREFIX = "peer:"
# A Reconcile message lists at most this many task ids (more follow in further messages).
RECONCILE_CHUNK = 50_000
# A peer that refuses our link (it does not list this site as a peer) is asked again this often.
REFUSED_RETRY_S = 5.0
# How long a peer may take to confirm a link we are asked to accept.
VERIFY_TIMEOUT_S = 5.0


class Peer:
    """One configured peer gateway."""

    def __init__(self, address: str, membership: Membership) -> None:
        self.address = address
        self.membership = membership
        self.site_id = ""  # learnt from its first status
        self.state = "down"  # until it answers
        self.status: site_pb2.SiteStatus | None = None
        self.last_seen = 0.0
        self.rtt_s = 0.0
        self.missed = 0
        self.shipped: set[str] = set()  # function digests the peer has from us
        self.outbox: list[Task] = []
        self.sending = False
        self._sender: asyncio.Task[None] | None = None  # referenced: the loop keeps only weak references
        self.pending = 0  # forwarded since its last status
        self._channel = grpc.aio.insecure_channel(address, options=channel_options(PEER_MESSAGE_BYTES))
        self.tasks = tasks_pb2_grpc.TaskServiceStub(self._channel)
        self.site = site_pb2_grpc.SiteServiceStub(self._channel)
        self.peer = peer_pb2_grpc.PeerServiceStub(self._channel)
        self._watch: asyncio.Task[None] | None = None
        self._call: grpc.aio.StreamStreamCall | None = None
        self.session_id = f"{SESSION_PREFIX}{membership.scheduler.site_id}:{secrets.token_hex(16)}"
        self._seq = 0
        self.inflight: dict[int, list[Task]] = {}  # batches written, not yet acknowledged
        self.offered: set[str] = set()  # function digests sent on this stream, not yet acknowledged
        # Set while the session stream to the peer is open: tasks are sent on it, and their
        # events come back on it (the peer does not buffer for absent sessions).
        self.watching = asyncio.Event()

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
            free=dict(status.resources_free), queued=status.queued, running=status.running,
            mean_run_s=status.mean_run_s or None, labels=dict(status.labels),
            max_payload_bytes=status.max_payload_bytes, rtt_s=self.rtt_s,
            bandwidth=self.membership.scheduler.config.bandwidth.get(status.site_id, 0.0), pending=self.pending,
            resident=dict.fromkeys(status.datasets, 0))

    def catalogue_entry(self) -> site_pb2.SiteStatus:
        entry = site_pb2.SiteStatus()
        if self.status is not None:
            entry.CopyFrom(self.status)
        else:
            entry.site_id = self.site_id or "?"
        entry.address = self.address
        if not self.up:
            entry.state = self.state
        entry.last_seen = self.last_seen
        entry.rtt_s = self.rtt_s
        return entry

    # ------------------------------------------------------------------ heartbeat
    async def heartbeat(self) -> None:
        started = time.monotonic()
        try:
            status = await self.site.GetStatus(site_pb2.GetStatusRequest(),
                                               timeout=max(self.membership.heartbeat_s, 0.5))
        except (TimeoutError, grpc.RpcError) as exc:
            self.missed += 1
            # A draining peer still holds tasks: when it stops answering they are placed again.
            if self.state in ("up", "draining") and self.missed >= self.membership.down_after:
                logger.warning("peer %s (%s) missed %d heartbeats: down (%s)", self.site_id, self.address,
                               self.missed, exc.code() if isinstance(exc, grpc.RpcError) else exc)
                self.state = "down"
                # Its link may still be open (a partition shorter than the keepalive): end it, so
                # that the link opened when the peer answers again reconciles, and the peer
                # cancels what this site is about to move elsewhere rather than run it too.
                if self._call is not None:
                    self._call.cancel()
                self.membership.scheduler.on_peer_down(self)
            return
        self.rtt_s = time.monotonic() - started
        self.last_seen = time.time()
        self.missed = 0
        if self.site_id and status.site_id != self.site_id:
            logger.warning("peer at %s is now site %s (was %s)", self.address, status.site_id, self.site_id)
        if status.site_id == self.membership.scheduler.site_id:
            if self.state != "self":
                logger.error("peer %s is this site itself; ignoring it", self.address)
            self.state = "self"
            return
        self.site_id = status.site_id
        self.status = status
        self.pending = 0
        # In the same turn: what a client sees in the catalogue is what the next placement uses.
        self.membership.scheduler.catalogue_changed()
        was = self.state
        self.state = "up" if status.state != "draining" else "draining"
        if was != self.state and self.state == "up":
            logger.info("peer %s (%s) is up", self.site_id, self.address)
            self.shipped.clear()  # it may have restarted with a fresh function store
            self.membership.by_site[self.site_id] = self
            if self._watch is None or self._watch.done():
                self._watch = asyncio.create_task(self._session_loop())
            self.membership.scheduler.on_peer_up(self)

    # ------------------------------------------------------------------ forwarding
    def forward(self, tasks: Sequence[Task]) -> None:
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

    def _take_batch(self) -> list[Task]:
        """The next batch from the outbox: up to FORWARD_BATCH_TASKS tasks and about
        FORWARD_BATCH_BYTES of specs; tasks no longer this peer's are dropped on the way."""
        batch: list[Task] = []
        size = taken = 0
        for task in self.outbox:
            if len(batch) >= FORWARD_BATCH_TASKS:
                break
            if self._sendable(task):
                nbytes = task.spec.ByteSize()
                if batch and size + nbytes > FORWARD_BATCH_BYTES:
                    break
                batch.append(task)
                size += nbytes
            taken += 1
        self.outbox = self.outbox[taken:]
        return batch

    def _sendable(self, task: Task) -> bool:
        """Still this peer's to run: not placed elsewhere meanwhile, nor finished (cancelled)."""
        return task.site == self.site_id and task.state not in TERMINAL

    def _message(self, seq: int, batch: Sequence[Task]) -> tasks_pb2.ClientMessage:
        scheduler = self.membership.scheduler
        functions: list[tasks_pb2.Function] = []
        for task in batch:
            digest = task.spec.function_digest
            if digest not in self.shipped and digest not in self.offered:
                payload = scheduler.function_bytes(digest)
                if payload is not None:
                    self.offered.add(digest)
                    functions.append(tasks_pb2.Function(digest=digest, payload=payload, name=task.spec.name))
        request = tasks_pb2.SubmitRequest(functions=functions, tasks=[_forwarded(t.spec, scheduler.site_id)
                                                                      for t in batch])
        return tasks_pb2.ClientMessage(submit=tasks_pb2.SubmitBatch(seq=seq, request=request))

    def _on_ack(self, ack: tasks_pb2.SubmitAck) -> None:
        batch = self.inflight.pop(ack.seq, None)
        if batch is None:
            return
        self.shipped.update(t.spec.function_digest for t in batch)
        if any(not a.accepted and a.error.kind == 6 for a in ack.acks):  # NOT_FOUND: its function store was lost
            self.shipped.clear()
            self.offered.clear()
        self.membership.scheduler.on_forward_acks(self, batch, ack.acks)

    def abandon(self) -> list[Task]:
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
                site_id=self.membership.scheduler.site_id, max_tasks=max_tasks), timeout=10)
        except grpc.RpcError as exc:
            logger.debug("steal from %s failed: %s", self.site_id, exc.code())
            return 0
        return response.moved

    # ------------------------------------------------------------------ the session stream
    async def _session_loop(self) -> None:
        """One Connect stream to the peer: our batches go up, their acks and the tasks'
        events come down. Reopened with backoff while the peer is configured."""
        scheduler = self.membership.scheduler
        backoff = 0.05
        while not self.membership.closed:
            call = self.tasks.Connect()
            try:
                await call.write(tasks_pb2.ClientMessage(open=tasks_pb2.WatchRequest(
                    session_id=self.session_id, progress=True, peer_site=scheduler.site_id)))
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
                        scheduler.on_reconciled(self, message.reconciled.unknown_task_ids, unsent)
                    else:
                        scheduler.on_peer_events(self, message.events.events)
            except grpc.RpcError as exc:
                if self.membership.closed:
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
        ids = self.membership.scheduler.tasks_at(self.site_id)
        unsent = {t.task_id for t in self.outbox}
        for start in range(0, max(len(ids), 1), RECONCILE_CHUNK):
            chunk = ids[start:start + RECONCILE_CHUNK]
            await call.write(tasks_pb2.ClientMessage(reconcile=tasks_pb2.Reconcile(
                task_ids=chunk, more=start + RECONCILE_CHUNK < len(ids))))
        return unsent

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watch
        await self._channel.close()


def _forwarded(spec: tasks_pb2.TaskSpec, home: str) -> tasks_pb2.TaskSpec:
    if spec.home:
        return spec
    copy = tasks_pb2.TaskSpec()
    copy.CopyFrom(spec)
    copy.home = home
    return copy


class Membership:
    """All peers of this gateway, their heartbeats, and work stealing when idle."""

    def __init__(self, scheduler: Scheduler, addresses: Sequence[str], *, heartbeat_s: float,
                 down_after: int, steal: bool) -> None:
        self.scheduler = scheduler
        self.heartbeat_s = heartbeat_s
        self.down_after = down_after
        self.steal_enabled = steal
        self.peers = [Peer(a, self) for a in addresses]
        self.by_site: dict[str, Peer] = {}
        self.closed = False
        self._loop_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while not self.closed:
            started = time.monotonic()
            peers = [p for p in self.peers if p.state != "self"]
            results = await asyncio.gather(*(p.heartbeat() for p in peers), return_exceptions=True)
            for peer, result in zip(peers, results, strict=True):
                if isinstance(result, Exception):  # e.g. from on_peer_down / on_peer_up
                    logger.error("heartbeat of peer %s (%s) failed", peer.site_id, peer.address, exc_info=result)
            try:
                if self.steal_enabled:
                    await self._maybe_steal()
                self.scheduler.retry_unplaced()
            except Exception:
                logger.exception("federation housekeeping failed")
            await asyncio.sleep(max(0.0, self.heartbeat_s - (time.monotonic() - started)))

    async def _maybe_steal(self) -> None:
        room = self.scheduler.idle_slots()
        if room <= 0:
            return
        busy = sorted((p for p in self.peers if p.up and p.status is not None and p.status.movable > 0),
                      key=lambda p: -p.status.movable if p.status else 0)
        for peer in busy:
            moved = await peer.steal(room)
            if moved:
                logger.info("took %d queued tasks from busy peer %s", moved, peer.site_id)
                room -= moved
                if peer.status is not None:
                    peer.status.movable = max(0, peer.status.movable - moved)
            if room <= 0:
                return

    async def verify(self, site_id: str, session_id: str) -> tuple[str, str]:
        """Asks the configured peer that is (or may be) ``site_id`` whether it opened a
        link here with ``session_id``. The answer comes from the address in this site's
        configuration, not from the stream that claims it. Returns ("ok", ""), ("refused",
        why) or ("unreachable", why): the peer could not be asked (it may be starting)."""
        candidates = [p for p in self.peers if p.state != "self" and p.site_id in (site_id, "")]
        if not candidates:
            return "refused", f"{clip(site_id)!r} is not one of its peers"

        async def ask(peer: Peer) -> bool | None:
            try:
                answer = await peer.peer.VerifyLink(peer_pb2.VerifyLinkRequest(
                    site_id=self.scheduler.site_id, session_id=session_id), timeout=VERIFY_TIMEOUT_S,
                    wait_for_ready=True)
            except grpc.RpcError as exc:
                logger.info("verifying a link from %s at %s failed: %s", clip(site_id), peer.address, exc.code())
                return None
            return answer.ok and answer.site_id == site_id

        answers = await asyncio.gather(*(ask(p) for p in candidates))
        if any(answers):
            return "ok", ""
        if None in answers:
            return "unreachable", f"could not reach {clip(site_id)!r} at its configured address to verify the link"
        return "refused", f"no configured peer {clip(site_id)!r} confirms that link"

    def owns_link(self, site_id: str, session_id: str) -> bool:
        """Whether this site opened a link to ``site_id`` with ``session_id``."""
        return any(p.session_id == session_id and p.site_id == site_id for p in self.peers)

    def views(self) -> list[SiteView]:
        return [v for v in (p.view() for p in self.peers if p.state != "self") if v is not None]

    def peer_for(self, site_id: str) -> Peer | None:
        return self.by_site.get(site_id)

    def catalogue(self) -> list[site_pb2.SiteStatus]:
        return [p.catalogue_entry() for p in self.peers if p.state != "self"]

    async def close(self) -> None:
        self.closed = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._loop_task
        await asyncio.gather(*(p.close() for p in self.peers), return_exceptions=True)

