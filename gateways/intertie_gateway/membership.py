"""Membership: this gateway's peers, which of them are up, and what is known of them.

Each peer is pulled for its status every ``heartbeat_s``; ``down_after`` missed answers in
a row mark it down, one answer marks it up again (and opens its link, ``peers``). From
the last statuses come the site views placement reads and the catalogue clients see. Once
per heartbeat an idle site asks busy peers for work, and the core places what waits for a
site. A link a peer opens here is verified with that peer at its configured address.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Generic

import grpc

from intertie.v1 import peer_pb2, site_pb2
from intertie_gateway.peers import Channels, Peer, insecure
from intertie_gateway.placement import SiteView
from intertie_gateway.ports import PeerListener, TaskT
from intertie_gateway.validate import clip

logger = logging.getLogger(__name__)

# How long a peer may take to confirm a link we are asked to accept.
VERIFY_TIMEOUT_S = 5.0


class Membership(Generic[TaskT]):
    """All peers of this gateway, their heartbeats, and work stealing when idle."""

    def __init__(self, listener: PeerListener[TaskT], addresses: Sequence[str], *, heartbeat_s: float,
                 down_after: int, steal: bool, bandwidth: Mapping[str, float], channel: Channels = insecure) -> None:
        self.listener = listener
        self.heartbeat_s = heartbeat_s
        self.down_after = down_after
        self.steal_enabled = steal
        self.peers = [Peer(a, listener, bandwidth, channel) for a in addresses]
        self.by_site: dict[str, Peer[TaskT]] = {}
        self.closed = False
        self._loop_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while not self.closed:
            started = time.monotonic()
            peers = [p for p in self.peers if p.state != "self"]
            results = await asyncio.gather(*(self.heartbeat(p) for p in peers), return_exceptions=True)
            for peer, result in zip(peers, results, strict=True):
                if isinstance(result, Exception):  # e.g. from on_peer_down / on_peer_up
                    logger.error("heartbeat of peer %s (%s) failed", peer.site_id, peer.address, exc_info=result)
            try:
                if self.steal_enabled:
                    await self._maybe_steal()
                self.listener.retry_unplaced()
            except Exception:
                logger.exception("federation housekeeping failed")
            await asyncio.sleep(max(0.0, self.heartbeat_s - (time.monotonic() - started)))

    async def heartbeat(self, peer: Peer[TaskT]) -> None:
        """Pulls one peer's status: it is up, draining or down (or this site itself)."""
        started = time.monotonic()
        try:
            status = await peer.site.GetStatus(site_pb2.GetStatusRequest(), timeout=max(self.heartbeat_s, 0.5))
        except (TimeoutError, grpc.RpcError) as exc:
            peer.missed += 1
            # A draining peer still holds tasks: when it stops answering they are placed again.
            if peer.state in ("up", "draining") and peer.missed >= self.down_after:
                logger.warning("peer %s (%s) missed %d heartbeats: down (%s)", peer.site_id, peer.address,
                               peer.missed, exc.code() if isinstance(exc, grpc.RpcError) else exc)
                peer.state = "down"
                peer.end_stream()
                self.listener.on_peer_down(peer)
            return
        peer.rtt_s = time.monotonic() - started
        peer.last_seen = time.time()
        peer.missed = 0
        if peer.site_id and status.site_id != peer.site_id:
            logger.warning("peer at %s is now site %s (was %s)", peer.address, status.site_id, peer.site_id)
        if status.site_id == self.listener.site_id:
            if peer.state != "self":
                logger.error("peer %s is this site itself; ignoring it", peer.address)
            peer.state = "self"
            return
        peer.site_id = status.site_id
        peer.status = status
        peer.pending = 0
        # In the same turn: what a client sees in the catalogue is what the next placement uses.
        self.listener.catalogue_changed()
        was = peer.state
        peer.state = "up" if status.state != "draining" else "draining"
        if was != peer.state and peer.state == "up":
            logger.info("peer %s (%s) is up", peer.site_id, peer.address)
            self.by_site[peer.site_id] = peer
            peer.open()
            self.listener.on_peer_up(peer)

    async def _maybe_steal(self) -> None:
        room = self.listener.idle_slots()
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

        async def ask(peer: Peer[TaskT]) -> bool | None:
            try:
                answer = await peer.peer.VerifyLink(peer_pb2.VerifyLinkRequest(
                    site_id=self.listener.site_id, session_id=session_id), timeout=VERIFY_TIMEOUT_S,
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

    def peer_for(self, site_id: str) -> Peer[TaskT] | None:
        return self.by_site.get(site_id)

    def catalogue(self) -> list[site_pb2.SiteStatus]:
        return [_catalogue_entry(p) for p in self.peers if p.state != "self"]

    def up_statuses(self) -> list[site_pb2.SiteStatus]:
        """The last status of each peer that is up (read from Flight threads too)."""
        return [p.status for p in list(self.peers) if p.up and p.status is not None]

    async def close(self) -> None:
        self.closed = True
        for peer in self.peers:  # no link reopens while the heartbeats wind down
            peer.closed = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._loop_task
        await asyncio.gather(*(p.close() for p in self.peers), return_exceptions=True)


def _catalogue_entry(peer: Peer[TaskT]) -> site_pb2.SiteStatus:
    """A peer as clients see it in ListSites: its last status, with how this site sees it."""
    entry = site_pb2.SiteStatus()
    if peer.status is not None:
        entry.CopyFrom(peer.status)
    else:
        entry.site_id = peer.site_id or "?"
    entry.address = peer.address
    if not peer.up:
        entry.state = peer.state
    entry.last_seen = peer.last_seen
    entry.rtt_s = peer.rtt_s
    return entry
