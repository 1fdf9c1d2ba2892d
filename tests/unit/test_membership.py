"""A gateway's peers going up and down, with the peers and this site's core stood in for."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest

from intertie.v1 import tasks_pb2
from intertie_gateway.membership import Membership
from intertie_gateway.peers import Peer
from intertie_gateway.ports import PeerPort
from intertie_gateway.scheduler import Task


class FakeListener:
    """This site's core, as membership and the links call it (a ``ports.PeerListener``)."""

    site_id = "home"

    def __init__(self) -> None:
        self.downs: list[PeerPort[Task]] = []

    def tasks_at(self, site_id: str) -> list[str]:
        return []

    def function_bytes(self, digest: str) -> bytes | None:
        return b"pickled function"

    def on_forward_acks(self, peer: PeerPort[Task], batch: Sequence[Task],
                        acks: Sequence[tasks_pb2.TaskAck]) -> None:
        pass

    def on_peer_events(self, peer: PeerPort[Task], events: Sequence[tasks_pb2.TaskEvent]) -> None:
        pass

    def on_reconciled(self, peer: PeerPort[Task], unknown: Sequence[str], unsent: set[str]) -> None:
        pass

    def on_peer_down(self, peer: PeerPort[Task]) -> None:
        self.downs.append(peer)

    def on_peer_up(self, peer: PeerPort[Task]) -> None:
        raise RuntimeError("a bug in on_peer_up")

    def catalogue_changed(self) -> None:
        pass

    def retry_unplaced(self) -> None:
        pass

    def idle_slots(self) -> int:
        return 0


class Unanswered:
    async def GetStatus(self, *args: Any, **kwargs: Any) -> Any:
        raise TimeoutError


def run(body: Callable[[Membership[Task], FakeListener], Awaitable[None]]) -> None:
    async def main() -> None:
        listener = FakeListener()
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
