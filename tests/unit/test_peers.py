"""A gateway's links to its peers, with the peer's side and the scheduler stood in for."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from intertie_gateway.peers import Membership, Peer


class FakeScheduler:
    site_id = "home"

    def __init__(self) -> None:
        self.downs: list[Peer] = []

    def on_peer_down(self, peer: Peer) -> None:
        self.downs.append(peer)

    def on_peer_up(self, peer: Peer) -> None:
        raise RuntimeError("a bug in on_peer_up")

    def retry_unplaced(self) -> None:
        pass


class Unanswered:
    async def GetStatus(self, *args: Any, **kwargs: Any) -> Any:
        raise asyncio.TimeoutError


def run(body: Callable[[Membership], Awaitable[None]]) -> None:
    async def main() -> None:
        membership = Membership(FakeScheduler(), ["127.0.0.1:1"], heartbeat_s=0.01,  # type: ignore[arg-type]
                                down_after=3, steal=False)
        try:
            await body(membership)
        finally:
            await membership.close()

    asyncio.run(main())


def test_a_draining_peer_that_stops_answering_goes_down() -> None:
    async def body(membership: Membership) -> None:
        peer = membership.peers[0]
        peer.site_id, peer.state = "b", "draining"
        peer.site = Unanswered()  # type: ignore[assignment]
        for _ in range(3):
            await peer.heartbeat()
        assert peer.state == "down"
        assert membership.scheduler.downs == [peer]  # type: ignore[attr-defined]

    run(body)


def test_a_failing_heartbeat_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def body(membership: Membership) -> None:
        async def heartbeat() -> None:
            membership.scheduler.on_peer_up(membership.peers[0])

        membership.peers[0].heartbeat = heartbeat  # type: ignore[method-assign]
        membership.start()
        for _ in range(100):
            if caplog.records:
                break
            await asyncio.sleep(0.01)

    with caplog.at_level(logging.ERROR, logger="intertie_gateway.peers"):
        run(body)
    assert any("heartbeat of peer" in r.getMessage() and r.exc_info for r in caplog.records)
