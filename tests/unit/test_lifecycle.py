"""The task lifecycle and its one transition function (``TaskBook.move``), without a
cluster, a journal or an event loop."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
from core_fakes import book_world, spec

from intertie.v1 import common_pb2, tasks_pb2
from intertie_gateway.book import Task
from intertie_gateway.lifecycle import ALLOWED, TERMINAL, IllegalMove, Phase, State
from intertie_gateway.model import ErrorKind, Failure, Finished, Forgotten, Placed, Requeued, Started
from intertie_gateway.placement import PlacementRecord


def test_public_states_and_error_kinds_are_the_wire_s_numbers() -> None:
    assert {s.name: int(s) for s in State} == {
        name.removeprefix("TASK_STATE_"): n for name, n in tasks_pb2.TaskState.items() if n}
    assert {k.name: int(k) for k in ErrorKind} == {
        name.removeprefix("ERROR_KIND_"): n for name, n in common_pb2.ErrorKind.items()}


def test_every_phase_has_a_public_state_and_terminal_phases_lead_nowhere() -> None:
    assert set(ALLOWED) == set(Phase)
    assert {p.state for p in Phase} == set(State)
    assert all(not ALLOWED[p] for p in TERMINAL)
    assert all(ALLOWED[p] for p in Phase if p not in TERMINAL)


def test_every_phase_is_reachable_from_new_and_every_unfinished_one_can_finish() -> None:
    reached, frontier = {Phase.NEW}, [Phase.NEW]
    while frontier:
        for nxt in ALLOWED[frontier.pop()] - reached:
            reached.add(nxt)
            frontier.append(nxt)
    assert reached == set(Phase)
    for phase in set(Phase) - TERMINAL:  # nothing is stuck: a terminal phase is always reachable
        seen, stack = {phase}, [phase]
        while stack:
            for nxt in ALLOWED[stack.pop()] - seen:
                seen.add(nxt)
                stack.append(nxt)
        assert seen & TERMINAL, phase


def test_move_takes_every_allowed_pair_and_refuses_every_other() -> None:
    taken = refused = 0
    for frm, to in itertools.product(Phase, Phase):
        world = book_world(federated=True)
        task = Task(spec("t", max_retries=3), 0.0)
        task.site = "peer" if frm in (Phase.FORWARDING, Phase.AT_PEER, Phase.RUNNING_AT_PEER) else ""
        task.phase = frm  # where the walk starts; every move from here goes through move()
        before = (task.attempts, list(task.history), list(world.book.changes))
        if to in ALLOWED[frm]:
            world.book.move(task, to, site="peer")
            assert task.phase is to, (frm, to)
            taken += 1
        else:
            with pytest.raises(IllegalMove, match=f"{frm.value} -> {to.value}"):
                world.book.move(task, to)
            assert task.phase is frm and (task.attempts, task.history, world.book.changes) == before, (frm, to)
            refused += 1
    assert taken == sum(len(v) for v in ALLOWED.values()) and taken + refused == len(Phase) ** 2


def test_an_attempt_is_counted_when_it_starts_here_or_is_sent_and_refunded_when_it_never_ran() -> None:
    world = book_world(federated=True)
    book = world.book
    task = Task(spec("t", max_retries=1), 0.0)
    book.admit(task)
    assert task.phase is Phase.UNPLACED and book.unplaced == [task]
    p1, p2 = PlacementRecord("b", "best", 1.0), PlacementRecord("here", "b refused it", 2.0)
    book.move(task, Phase.FORWARDING, site="b", placement=p1)
    assert (task.attempts, task.site, task.placements) == (1, "b", [p1])
    book.move(task, Phase.UNPLACED, why="refused by site b", refund=True)
    assert (task.attempts, task.site) == (0, "")
    assert task.history[-1]["outcome"] == "refused by site b"
    book.move(task, Phase.QUEUED, placement=p2)
    assert task.site == "here" and list(book.queue)[-1] is task
    book.move(task, Phase.RUNNING)
    assert (task.attempts, task.started_at) == (1, 100.0)
    assert [type(c) for c in book.changes] == [Placed, Requeued, Placed, Started]
    assert book.changes[-2] == Placed("t", 0, "here", (p1, p2))


def test_leaving_running_releases_what_the_run_held_once() -> None:
    world = book_world()
    task = Task(spec("t"), 0.0)
    world.book.admit(task)
    world.book.move(task, Phase.RUNNING)
    world.book.move(task, Phase.QUEUED, refund=True, front=True)  # preempted: free
    assert world.released == [task] and task.attempts == 0 and list(world.book.queue)[0] is task
    assert isinstance(world.book.changes[-1], Requeued)


def test_a_start_is_told_at_once_a_finish_only_after_its_change_is_committed() -> None:
    world = book_world()
    book = world.book
    task = Task(spec("t"), 0.0)
    task.add_session("client")
    book.admit(task)
    book.move(task, Phase.RUNNING)
    assert [(s, u.state) for s, u in world.started] == [({"client"}, State.RUNNING)]
    assert book.updates == []
    world.clock.now = 103.0
    book.move(task, Phase.SUCCEEDED, result=b"r")
    assert book.get("t") is None and len(book) == 0
    (sessions, update), = book.updates
    assert (sessions, update.state, update.result, update.run_s) == ({"client"}, State.SUCCEEDED, b"r", 0.0)
    finished = book.changes[-1]
    assert isinstance(finished, Finished) and finished.usage is not None  # (metering: test_metering.py)
    assert replace(finished, usage=None) == Finished("t", State.SUCCEEDED, 1, "here", 103.0, b"r", None, ())
    assert world.turns == 1  # one commit per turn, however many changes


def test_retries_spend_attempts_until_none_are_left() -> None:
    world = book_world()
    book = world.book
    task = Task(spec("t", max_retries=1), 0.0)
    book.admit(task)
    book.move(task, Phase.RUNNING)
    book.retry(task, "worker died")
    assert (task.phase, task.attempts, list(book.queue)[0]) == (Phase.QUEUED, 1, task)
    book.move(task, Phase.RUNNING)
    book.retry(task, "worker died again")
    assert task.phase is Phase.FAILED
    finished = book.changes[-1]
    assert isinstance(finished, Finished) and finished.error is not None
    assert finished.error.kind == ErrorKind.SITE_FAILURE and "no retries left" in finished.error.message
    assert [h["outcome"] for h in finished.history] == ["worker died", "worker died again"]


def test_a_home_places_a_retried_task_again_a_forwarded_one_runs_where_it_is() -> None:
    world = book_world(federated=True)
    book = world.book
    home = Task(spec("home", max_retries=1), 0.0)
    forwarded = Task(spec("fwd", max_retries=1, home="h"), 0.0)
    for task in (home, forwarded):
        book.admit(task)
    assert forwarded.phase is Phase.QUEUED and home.phase is Phase.UNPLACED
    book.move(home, Phase.QUEUED, placement=PlacementRecord("here", "best", 1.0))
    for task in (home, forwarded):
        book.move(task, Phase.RUNNING)
        book.retry(task, "node lost")
    assert (home.phase, home.site, book.unplaced[0]) == (Phase.UNPLACED, "", home)
    assert (forwarded.phase, forwarded.site) == (Phase.QUEUED, "here")


def test_a_dropped_task_is_forgotten_without_an_event() -> None:
    world = book_world()
    book = world.book
    task = Task(spec("t", home="h"), 0.0)
    task.add_session("peer:h:x")
    book.admit(task)
    book.move(task, Phase.DROPPED)
    assert book.changes == [Forgotten("t")] and book.updates == [] and book.get("t") is None


def test_a_peer_s_start_is_told_but_not_journaled() -> None:
    world = book_world(federated=True)
    book = world.book
    task = Task(spec("t"), 0.0)
    task.add_session("client")
    book.admit(task)
    book.move(task, Phase.FORWARDING, site="b", placement=PlacementRecord("b", "best", 1.0))
    book.move(task, Phase.AT_PEER)
    changes = len(book.changes)
    book.move(task, Phase.RUNNING_AT_PEER)
    assert len(book.changes) == changes and world.started[-1][1].site == "b"
    book.move(task, Phase.FAILED, error=Failure(ErrorKind.REMOTE, "boom"), run_s=2.0)
    assert book.estimates.run_s(task.spec.function_digest) == 2.0
