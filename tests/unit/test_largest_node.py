"""The largest node of a site's Ray, end to end through the gateway's parts (no Ray): the
runner's figure reaches admission, this site's view and status, and a peer's view of that
status; a task that fits the total but no node is refused at once where it arrives, whether
a client sent it or a peer forwarded it. (The two-node cluster itself is in
tests/integration/test_ray_cluster.py; the filter and its message in test_placement.py.)"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from core_fakes import FakeRunner
from peer_fakes import FakeListener

from intertie.spec import python_version
from intertie.v1 import common_pb2, site_pb2, tasks_pb2
from intertie_gateway.book import Task
from intertie_gateway.config import GatewayConfig
from intertie_gateway.journal import Journal
from intertie_gateway.peers import Peer
from intertie_gateway.scheduler import Scheduler
from intertie_gateway.sessions import SessionHub

PAYLOAD = b"pickled function"
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


class TwoNodeRunner(FakeRunner):
    """Ray with a node of 2 CPUs and one of 1."""

    def total_resources(self) -> dict[str, float]:
        return {"CPU": 3.0}

    def largest_node(self) -> dict[str, float]:
        return {"CPU": 2.0}

    def refresh_pool(self) -> None:
        pass


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal(tmp_path / "journal.sqlite")
    yield j
    j.close()


def spec(task_id: str, cpus: float) -> tasks_pb2.TaskSpec:
    return tasks_pb2.TaskSpec(task_id=task_id, function_digest=DIGEST, args=b"args", python_version=python_version(),
                              resources=common_pb2.ResourceRequest(cpus=cpus))


def test_a_task_no_node_holds_is_refused_where_it_arrives(journal: Journal) -> None:
    async def main() -> None:
        s = Scheduler(GatewayConfig(site_id="cluster"), journal, TwoNodeRunner(), SessionHub())  # type: ignore[arg-type]
        assert s.slots.capacity.node_max == {"CPU": 2.0}
        assert s.federate.local_view().node_max == {"CPU": 2.0}
        assert dict(s.queries.status().resources_node_max) == {"CPU": 2.0}
        function = tasks_pb2.Function(digest=DIGEST, payload=PAYLOAD, name="f")
        from_client = await s.intake.submit(tasks_pb2.SubmitRequest(
            functions=[function], tasks=[spec("three", 3.0), spec("two", 2.0)], session_id="client"))
        forwarded = await s.intake.submit(tasks_pb2.SubmitRequest(
            functions=[function], tasks=[spec("three-from-home", 3.0)], session_id="peer:home:x"), peer="home")
        for ack in (from_client[0], forwarded[0]):
            assert not ack.accepted and ack.error.kind == common_pb2.ERROR_KIND_PLACEMENT
            assert "largest node has CPU=2 (3 in total over its nodes)" in ack.error.message
        assert from_client[1].accepted
        s.refresh_resources()  # (the housekeeping's call: reads both figures again)
        assert s.slots.capacity.node_max == {"CPU": 2.0}

    asyncio.run(main())


def test_a_peer_s_view_carries_its_largest_node() -> None:
    async def main() -> None:
        peer: Peer[Task] = Peer("127.0.0.1:1", FakeListener(), {})
        try:
            peer.status = site_pb2.SiteStatus(site_id="b", state="up", resources_total={"CPU": 3.0},
                                              resources_node_max={"CPU": 2.0}, overhead_s=0.004)
            peer.state = "up"
            view = peer.view()
            assert view is not None and view.node_max == {"CPU": 2.0} and view.overhead_s == 0.004
            peer.status = site_pb2.SiteStatus(site_id="b", state="up", resources_total={"CPU": 3.0})
            view = peer.view()  # a gateway older than the fields
            assert view is not None and view.node_max == {} and view.overhead_s is None
        finally:
            await peer.close()

    asyncio.run(main())
