"""The link to a peer gateway, with the peer's side and this site's core stood in for."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import grpc
from peer_fakes import FakeListener

from intertie.v1 import tasks_pb2
from intertie_gateway.book import Task
from intertie_gateway.lifecycle import Phase
from intertie_gateway.membership import Membership
from intertie_gateway.model import TaskSpec
from intertie_gateway.peers import Peer


class FakeCall:
    """The peer's end of a Connect stream: opens the session, then stays open."""

    def __init__(self) -> None:
        self.written: list[tasks_pb2.ClientMessage] = []
        self.opened = False
        self.closed = asyncio.Event()

    async def write(self, message: tasks_pb2.ClientMessage) -> None:
        self.written.append(message)

    async def read(self) -> object:
        if not self.opened:
            self.opened = True
            return tasks_pb2.ServerMessage(events=tasks_pb2.TaskEvents())
        await self.closed.wait()
        return grpc.aio.EOF

    def cancel(self) -> None:
        self.closed.set()

    def sent(self) -> list[str]:
        return [t.task_id for m in self.written if m.HasField("submit") for t in m.submit.request.tasks]


class FakeTasks:
    """The peer's TaskService."""

    def __init__(self) -> None:
        self.calls: list[FakeCall] = []

    def Connect(self) -> FakeCall:
        self.calls.append(FakeCall())
        return self.calls[-1]


def task(task_id: str, site: str = "b", phase: Phase = Phase.FORWARDING, args: bytes = b"") -> Task:
    t = Task(TaskSpec(task_id=task_id, function_digest="0" * 64, args=args, name="f"), 0.0)
    t.site, t.phase = site, phase
    return t


async def until(condition: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def run(body: Callable[[Peer[Task], FakeListener], Awaitable[None]]) -> None:
    """Runs ``body`` with a link to a peer at a closed port, known as site b."""
    async def main() -> None:
        listener = FakeListener()
        peer = Peer("127.0.0.1:1", listener, {})
        peer.site_id = "b"
        try:
            await body(peer, listener)
        finally:
            await peer.close()

    asyncio.run(main())


def test_a_task_cancelled_before_it_was_sent_is_not_sent() -> None:
    async def body(peer: Peer[Task], listener: FakeListener) -> None:
        peer._call = call = FakeCall()  # type: ignore[assignment]
        peer.watching.set()
        live, cancelled, moved = task("live"), task("cancelled", phase=Phase.CANCELLED), task("moved", site="c")
        peer.forward([live, cancelled, moved])
        assert peer._sender is not None
        await peer._sender
        assert call.sent() == ["live"]
        assert list(peer.inflight.values()) == [[live]]

    run(body)


def test_a_reconnect_resends_unacknowledged_tasks_except_finished_ones() -> None:
    async def body(peer: Peer[Task], listener: FakeListener) -> None:
        peer.tasks = stub = FakeTasks()  # type: ignore[assignment]
        live = task("live")
        peer.inflight = {1: [live, task("cancelled", phase=Phase.CANCELLED)], 2: [task("done", phase=Phase.SUCCEEDED)]}
        peer._watch = asyncio.create_task(peer._session_loop())
        await until(peer.watching.is_set)
        assert stub.calls[0].sent() == ["live"]
        assert peer.inflight == {1: [live]}

    run(body)


def test_the_link_opens_as_a_peer_and_reconciles_after_resent_batches_before_new_ones() -> None:
    async def main() -> None:
        listener = FakeListener()
        membership = Membership(listener, ["127.0.0.1:1"], heartbeat_s=0.01, down_after=3, steal=False,
                                bandwidth={})
        try:
            peer = membership.peers[0]
            peer.site_id = "b"
            peer.tasks = stub = FakeTasks()  # type: ignore[assignment]
            resent, waiting = task("resent"), task("waiting")
            peer.inflight = {1: [resent]}
            listener.at_peer = ["resent", "running-there", "waiting"]
            peer.outbox = [waiting]
            peer._watch = asyncio.create_task(peer._session_loop())
            await until(peer.watching.is_set)
            written = stub.calls[0].written
            assert [m.WhichOneof("kind") for m in written] == ["open", "submit", "reconcile"]
            opened = written[0].open
            assert opened.peer_site == "home" and opened.session_id.startswith("peer:home:")
            assert len(opened.session_id) >= len("peer:home:") + 32  # an unguessable secret per link
            assert opened.session_id != Peer("127.0.0.1:2", listener, {}).session_id
            assert list(written[2].reconcile.task_ids) == ["resent", "running-there", "waiting"]
            assert not written[2].reconcile.more
            assert membership.owns_link("b", opened.session_id) and not membership.owns_link("c", opened.session_id)
            assert not membership.owns_link("b", "peer:home")
        finally:
            await membership.close()

    asyncio.run(main())


def test_batches_to_a_peer_are_bounded_in_bytes_as_in_tasks() -> None:
    async def body(peer: Peer[Task], listener: FakeListener) -> None:
        peer._call = call = FakeCall()  # type: ignore[assignment]
        peer.watching.set()
        big = [task(f"big{i}", args=b"x" * (3 << 20)) for i in range(5)]  # two fit in 8 MiB: 6 + 3 > 8 MiB
        small = [task(f"s{i}") for i in range(2500)]
        peer.forward([*big, task("gone", phase=Phase.CANCELLED), *small])
        assert peer._sender is not None
        await peer._sender
        sizes = [len(m.submit.request.tasks) for m in call.written if m.HasField("submit")]
        assert sizes == [2, 2, 1000, 1000, 501]  # the last big one leads 999 small ones
        assert call.sent() == [t.task_id for t in [*big, *small]]
        assert all(m.ByteSize() < 16 << 20 for m in call.written)

    run(body)
