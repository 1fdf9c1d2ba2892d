"""A gateway's peers going up and down, with the peers and this site's core stood in for."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from peer_fakes import FakeListener

from intertie_gateway.book import Task
from intertie_gateway.membership import Membership
from intertie_gateway.peers import Peer


class Unanswered:
    async def GetStatus(self, *args: Any, **kwargs: Any) -> Any:
        raise TimeoutError


def run(body: Callable[[Membership[Task], FakeListener], Awaitable[None]]) -> None:
    async def main() -> None:
        listener = FakeListener(broken_up=True)
        membership = Membership(listener, ["127.0.0.1:1"], heartbeat_s=0.01, down_after=3, steal=False,
                                bandwidth={})
        try:
            await body(membership, listener)
        finally:
            await membership.close()

    asyncio.run(main())


def test_a_draining_peer_that_stops_answering_goes_down() -> None:
    async def body(membership: Membership[Task], listener: FakeListener) -> None:
        peer = membership.peers[0]
        peer.site_id, peer.state = "b", "draining"
        peer.site = Unanswered()  # type: ignore[assignment]
        for _ in range(3):
            await membership.heartbeat(peer)
        assert peer.state == "down"
        assert listener.downs == [peer]

    run(body)


def test_a_failing_heartbeat_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def body(membership: Membership[Task], listener: FakeListener) -> None:
        async def heartbeat(peer: Peer[Task]) -> None:
            listener.on_peer_up(peer)

        membership.heartbeat = heartbeat  # type: ignore[method-assign]
        membership.start()
        for _ in range(100):
            if caplog.records:
                break
            await asyncio.sleep(0.01)

    with caplog.at_level(logging.ERROR, logger="intertie_gateway.membership"):
        run(body)
    assert any("heartbeat of peer" in r.getMessage() and r.exc_info for r in caplog.records)
