"""A home's federation decisions against stand-in peers: no network, no asyncio, no journal."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from core_fakes import FakeRunner, InlineLoop, book_world, spec

from intertie.spec import python_version
from intertie_gateway.admission import Capacity
from intertie_gateway.book import Task
from intertie_gateway.config import GatewayConfig
from intertie_gateway.dispatch import Dispatch, Slots
from intertie_gateway.federate import Federate
from intertie_gateway.lifecycle import Phase, State
from intertie_gateway.model import ErrorKind, Failure, Forgotten, Requeued, Resources, Update
from intertie_gateway.placement import Placer, SiteView


class StubPeer:
    def __init__(self, site_id: str, view: SiteView | None = None) -> None:
        self.site_id = site_id
        self.up = view is not None and view.state == "up"
        self._view = view
        self.sent: list[list[Task]] = []
        self.unacked: list[Task] = []

    def view(self) -> SiteView | None:
        return self._view

    def forward(self, tasks: Sequence[Task]) -> None:
        self.sent.append(list(tasks))
        self.unacked.extend(tasks)

    def abandon(self) -> list[Task]:
        taken, self.unacked = self.unacked, []
        return taken

    async def cancel(self, task_ids: Sequence[str]) -> None:
        pass


class StubFederation:
    def __init__(self, *peers: StubPeer) -> None:
        self.peers = {p.site_id: p for p in peers}

    def views(self) -> list[SiteView]:
        return [v for p in self.peers.values() if (v := p.view()) is not None]

    def peer_for(self, site_id: str) -> StubPeer | None:
        return self.peers.get(site_id)


def peer_view(site_id: str, state: str = "up", **resources: float) -> SiteView:
    total = {"CPU": 8.0, **resources}
    return SiteView(site_id, state=state, python_version=python_version(), total=total, free=dict(total))


class World:
    def __init__(self, *peers: StubPeer) -> None:
        self.slots = Slots(Capacity({"CPU": 2.0}))
        self.books = book_world(federated=True, release=self.slots.release)
        self.book = self.books.book
        self.runner = FakeRunner()
        self.dispatch = Dispatch(self.book, self.slots, self.runner, site_id="here",  # type: ignore[arg-type]
                                 max_payload_bytes=1 << 20, inputs_for=lambda task: {},
                                 functions=lambda digest: b"fn", wake=lambda: None, loop=InlineLoop())  # type: ignore[arg-type]
        self.federation = StubFederation(*peers)
        self.wakes = 0
        self.federate = Federate(self.book, self.dispatch, self.book.estimates,
                                 config=GatewayConfig(site_id="here", heartbeat_s=1.0), python=python_version(),
                                 resident=dict, functions=lambda digest: b"fn", draining=lambda: False,
                                 wake=self._wake, make_federation=lambda listener: self.federation)  # type: ignore[arg-type,return-value]

    def _wake(self) -> None:
        self.wakes += 1

    def add(self, *task_ids: str, **fields: Any) -> list[Task]:
        tasks = [Task(spec(i, python_version=python_version(), **fields), 0.0) for i in task_ids]
        for task in tasks:
            self.book.admit(task)
        return tasks


def test_a_gpu_task_goes_to_the_gpu_peer_and_its_ack_puts_it_there() -> None:
    b = StubPeer("b", peer_view("b", GPU=1))
    w = World(b)
    gpu, = w.add("gpu", resources=Resources(gpus=1))
    w.federate.place()
    assert b.sent == [[gpu]] and (gpu.phase, gpu.site, gpu.attempts) == (Phase.FORWARDING, "b", 1)
    w.federate.on_forward_acks(b, [gpu], {})  # type: ignore[arg-type]
    assert gpu.phase is Phase.AT_PEER


def test_a_refusal_excludes_the_peer_and_a_lost_function_store_gets_the_bytes_once() -> None:
    b = StubPeer("b", peer_view("b", GPU=1))
    w = World(b)
    lost, refused = w.add("lost", "refused", resources=Resources(gpus=1))
    w.federate.place()
    w.federate.on_forward_acks(b, [lost, refused], {  # type: ignore[arg-type]
        "lost": Failure(ErrorKind.NOT_FOUND, "unknown function"),
        "refused": Failure(ErrorKind.PLACEMENT, "no GPU after all")})
    assert b.sent[-1] == [lost] and lost.phase is Phase.FORWARDING  # resent once, with its function
    assert (refused.phase, refused.attempts, refused.exclude) == (Phase.UNPLACED, 0, {"b"})
    assert "no GPU after all" in str(refused.history[-1]["outcome"])
    w.federate.on_forward_acks(b, [lost], {"lost": Failure(ErrorKind.NOT_FOUND, "still unknown")})  # type: ignore[arg-type]
    assert lost.phase is Phase.UNPLACED and lost.exclude == {"b"}


def test_a_peer_going_down_charges_only_the_tasks_it_had() -> None:
    b = StubPeer("b", peer_view("b", GPU=1))
    w = World(b)
    sent, unsent = w.add("sent", "unsent", resources=Resources(gpus=1))  # max_retries=0
    w.federate.place()
    w.federate.on_forward_acks(b, [sent], {})  # type: ignore[arg-type]
    b.unacked = [unsent]
    w.federate.on_peer_down(b)  # type: ignore[arg-type]
    assert sent.phase is Phase.FAILED  # it was there: its one attempt is spent
    assert (unsent.phase, unsent.attempts) == (Phase.UNPLACED, 0)  # never got there: free


def test_a_late_event_from_a_site_the_task_left_is_ignored() -> None:
    b, c = StubPeer("b", peer_view("b", GPU=1)), StubPeer("c", peer_view("c", GPU=1))
    w = World(b, c)
    task, = w.add("t", resources=Resources(gpus=1), max_retries=1)
    w.federate.place()
    first = task.site
    w.federate.on_peer_down(w.federation.peers[first])  # type: ignore[arg-type]
    w.federation.peers.pop(first)
    w.federate.place()
    assert task.site != first and task.phase is Phase.FORWARDING
    w.federate.on_peer_events(b if first == "b" else c, [  # type: ignore[arg-type]
        Update("t", State.SUCCEEDED, first, 1, b"stale")])
    assert task.phase is Phase.FORWARDING


@pytest.fixture
def placers_built(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Each Placer federate builds, as whether it ignores site state (feasibility checks)."""
    built: list[bool] = []

    class CountingPlacer(Placer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            built.append(kwargs.get("ignore_state", False))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr("intertie_gateway.federate.Placer", CountingPlacer)
    return built


def test_a_batch_is_checked_against_the_federation_with_one_placer(placers_built: list[bool]) -> None:
    w = World(StubPeer("b", peer_view("b", state="down")))
    never_runs = w.federate.feasibility()
    tasks = [Task(spec(f"t{i}", python_version=python_version()), 0.0) for i in range(50)]
    gpu = Task(spec("gpu", python_version=python_version(), resources=Resources(gpus=1)), 0.0)
    assert [never_runs(t, True) for t in tasks] == [None] * 50
    why = never_runs(gpu, True)
    assert why is not None and "no site" in why and "GPU" in why
    assert placers_built == [True]  # the feasibility check's: all sites, whatever their state


def test_a_task_waiting_for_a_down_site_is_placed_again_per_heartbeat_not_per_pump(
        placers_built: list[bool]) -> None:
    w = World(StubPeer("b", peer_view("b", state="down", GPU=1)))
    gpu = w.add(*(f"gpu{i}" for i in range(20)), resources=Resources(gpus=1))
    w.federate.place()
    assert all(t.phase is Phase.WAITING_SITE for t in gpu) and len(w.book.waiting) == 20
    built = len(placers_built)
    assert not w.book.unplaced  # a pump (another task finishing here) has nothing to place
    w.federate.retry_unplaced()  # a heartbeat: one more try for all of them, with one placer
    assert len(w.book.unplaced) == 20
    w.federate.place()
    assert all(t.phase is Phase.WAITING_SITE for t in gpu) and placers_built[built:].count(True) == 1


def test_held_tasks_run_when_their_home_lists_them_and_the_rest_of_that_home_is_dropped() -> None:
    w = World()
    kept, moved, running = (Task(spec(i, home="h", max_retries=1), 0.0) for i in ("kept", "moved", "running"))
    other = Task(spec("other", home="g"), 0.0)
    for task in (kept, moved, other):
        w.federate.hold(task, was_running=False)
    running.attempts = 1
    w.federate.hold(running, was_running=True)
    assert w.federate.held() == {"h": 3, "g": 1} and not w.book.queue
    stopped: list[Task] = []
    assert w.federate.confirm("h", ["kept", "running"], stopped.append) == 1
    assert (kept.phase, moved.phase, other.phase) == (Phase.QUEUED, Phase.DROPPED, Phase.HELD)
    assert (running.phase, running.attempts) == (Phase.QUEUED, 1)  # its cut run is spent
    assert stopped == [moved] and Forgotten("moved") in w.book.changes
    assert any(isinstance(c, Requeued) and c.task_id == "running" for c in w.book.changes)
    assert w.federate.held() == {"g": 1}


def test_an_idle_peer_takes_the_newest_movable_tasks_and_the_queue_no_longer_counts_them() -> None:
    idle = StubPeer("b", peer_view("b"))
    w = World(idle)
    tasks = w.add(*(f"t{i}" for i in range(6)), resources=Resources(cpus=2))
    for task in tasks:  # placed here (the peer was busy then)
        w.book.move(task, Phase.QUEUED)
    w.book.unplaced.clear()
    w.dispatch.run_queue()  # t0 runs: the rest wait for the CPUs
    assert w.federate.steal("b", 2) == 2
    assert [t.task_id for t in idle.sent[0]] == ["t5", "t4"] and tasks[5].phase is Phase.FORWARDING
    assert [t.task_id for t in w.book.queue] == ["t1", "t2", "t3"]
    assert w.federate.local_view().queued == 3
