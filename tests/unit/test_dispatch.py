"""Local dispatch against a stand-in Ray and a loop that runs callbacks at once: no cluster,
no asyncio, no journal."""

from __future__ import annotations

from typing import Any

from core_fakes import DIGEST, FakeRunner, InlineLoop, book_world, ok, spec

from intertie_gateway.admission import Capacity
from intertie_gateway.book import Task
from intertie_gateway.dispatch import Dispatch, Slots
from intertie_gateway.fairshare import Entitlement
from intertie_gateway.lifecycle import Phase
from intertie_gateway.model import ErrorKind, Finished
from intertie_gateway.runner import PREEMPTED, RETRY


class World:
    def __init__(self, pool_size: int = 0, cpus: float = 2.0, max_payload_bytes: int = 1 << 20,
                 limits: dict[str, Entitlement] | None = None) -> None:
        self.runner = FakeRunner(pool_size)
        self.runner.total_resources = lambda: {"CPU": cpus}  # type: ignore[method-assign]
        self.loop = InlineLoop()
        self.slots = Slots(Capacity({"CPU": cpus}))
        self.books = book_world(release=self.slots.release)
        self.book = self.books.book
        self.wakes = 0
        self.dispatch = Dispatch(self.book, self.slots, self.runner, site_id="here",  # type: ignore[arg-type]
                                 max_payload_bytes=max_payload_bytes, inputs_for=lambda task: {},
                                 functions=lambda digest: b"fn", wake=self._wake, loop=self.loop,  # type: ignore[arg-type]
                                 limits=lambda tenant: (limits or {}).get(tenant, Entitlement()))

    def _wake(self) -> None:
        self.wakes += 1
        self.dispatch.run_queue()

    def add(self, *task_ids: str, **fields: Any) -> list[Task]:
        tasks = [Task(spec(i, **fields), 0.0) for i in task_ids]
        for task in tasks:
            self.book.admit(task)
        return tasks

    def finish(self, index: int, outcome: Any) -> None:
        self.runner.started[index][1].ref.result.set_result(outcome)
        self.loop.run()


def test_tasks_start_while_they_fit_and_the_rest_wait_in_order() -> None:
    w = World(cpus=2)
    tasks = w.add("a", "b", "c", resources=_cpus(1))
    w.dispatch.run_queue()
    assert [ids for ids, _ in w.runner.started] == [["a"], ["b"]] and tasks[2].phase is Phase.QUEUED
    w.finish(0, ok(b"ra"))
    assert [ids for ids, _ in w.runner.started][-1] == ["c"]
    assert tasks[0].phase is Phase.SUCCEEDED and w.slots.running == 2


def test_a_head_that_does_not_fit_lets_a_smaller_task_behind_it_through() -> None:
    w = World(cpus=2)
    w.add("first", resources=_cpus(1))
    w.dispatch.run_queue()
    big, small = w.add("big", resources=_cpus(2)) + w.add("small", resources=_cpus(1))
    w.dispatch.run_queue()
    assert [ids for ids, _ in w.runner.started] == [["first"], ["small"]] and big.phase is Phase.QUEUED
    w.finish(0, ok(b""))
    w.finish(1, ok(b""))
    assert [ids for ids, _ in w.runner.started][-1] == ["big"]


def _cpus(n: float) -> Any:
    from intertie_gateway.model import Resources

    return Resources(cpus=n)


def start_group(w: World, *task_ids: str) -> list[Task]:
    """Short tasks of one function behind a long queue run fused, several per Ray call."""
    w.slots.capacity.observe(0.001)  # this site's tasks are short
    tasks = w.add(*task_ids)
    w.dispatch.run_queue()
    return tasks


def test_short_tasks_of_one_function_are_fused_into_one_call() -> None:
    w = World(pool_size=1, cpus=64)
    tasks = start_group(w, *(f"t{i}" for i in range(8)))
    calls = [ids for ids, _ in w.runner.started]
    assert len(calls) < 8 and sorted(sum(calls, [])) == sorted(t.task_id for t in tasks)
    assert all(t.phase is Phase.RUNNING for t in tasks)


def test_cancelling_one_task_of_a_fused_call_spares_the_others() -> None:
    w = World(pool_size=1, cpus=64)
    a, b, c = start_group(w, "a", "b", "c", "d")[:3]
    group = w.runner.started[0][0]
    assert {"a", "b"} <= set(group)
    w.dispatch.stop_run(a)
    w.book.move(a, Phase.CANCELLED)
    assert w.runner.cancelled == []  # the call goes on for the others
    w.finish(0, [ok(f"r{i}".encode()) for i in group])
    assert a.phase is Phase.CANCELLED and b.phase is Phase.SUCCEEDED


def test_cancelling_every_task_of_a_fused_call_stops_it() -> None:
    w = World(pool_size=1, cpus=64)
    tasks = start_group(w, "a", "b", "c", "d")
    call_ids, running = w.runner.started[0]
    group = [t for t in tasks if t.task_id in call_ids]
    for task in group:
        w.dispatch.stop_run(task)
        w.book.move(task, Phase.CANCELLED)
    assert w.runner.cancelled == [running]


def test_a_fused_call_that_lost_its_worker_reruns_its_tasks_alone_and_free() -> None:
    w = World(pool_size=1, cpus=64)
    tasks = start_group(w, "a", "b", "c", "d")
    call_ids, _ = w.runner.started[0]
    w.runner.outcome = lambda running, fut: (RETRY, RuntimeError("worker died"))  # type: ignore[method-assign]
    w.finish(0, None)
    rerun = [t for t in tasks if t.task_id in call_ids]
    assert all(not t.fuse and t.attempts == 1 for t in rerun)  # started again, alone: its first attempt
    assert all([t.task_id] in [ids for ids, _ in w.runner.started[1:]] for t in rerun)


def test_a_worker_failure_spends_a_retry_and_a_preemption_does_not() -> None:
    w = World()
    a, b = w.add("a", "b", max_retries=1)
    w.dispatch.run_queue()
    verdicts = {"a": (RETRY, RuntimeError("node lost")), "b": (PREEMPTED, RuntimeError("stopped"))}
    w.runner.outcome = lambda running, fut: verdicts[  # type: ignore[method-assign]
        next(ids[0] for ids, r in w.runner.started if r is running)]
    w.finish(0, None)
    w.finish(1, None)
    assert (a.phase, a.attempts, a.history[-1]["outcome"]) == (Phase.RUNNING, 2, "worker failed: RuntimeError: node lost")
    assert (b.phase, b.attempts, b.history) == (Phase.RUNNING, 1, [])


def test_a_timeout_stops_the_call_and_fails_the_task() -> None:
    w = World()
    task, = w.add("slow", timeout_s=2.0)
    w.dispatch.run_queue()
    timer, = w.loop.timers
    assert timer.delay == 2.0
    timer.fire()
    w.loop.run()  # the stopped call's outcome comes back: late, ignored
    assert w.runner.cancelled == [w.runner.started[0][1]] and task.phase is Phase.FAILED
    finished = w.book.changes[-1]
    assert isinstance(finished, Finished) and finished.error is not None
    assert finished.error.kind == ErrorKind.TIMEOUT and w.slots.running == 0
    assert sum(isinstance(c, Finished) for c in w.book.changes) == 1  # the stopped call's outcome was ignored


def test_a_result_over_the_payload_limit_fails_the_task() -> None:
    w = World(max_payload_bytes=10)
    task, = w.add("big")
    w.dispatch.run_queue()
    w.finish(0, ok(b"x" * 11))
    finished = w.book.changes[-1]
    assert task.phase is Phase.FAILED and isinstance(finished, Finished) and finished.error is not None
    assert finished.error.kind == ErrorKind.PAYLOAD_TOO_LARGE


def test_a_function_missing_from_the_journal_fails_its_task_only() -> None:
    w = World()
    w.dispatch = Dispatch(w.book, w.slots, w.runner, site_id="here", max_payload_bytes=1 << 20,  # type: ignore[arg-type]
                          inputs_for=lambda task: {}, functions=lambda digest: None if digest == "0" * 64 else b"fn",
                          wake=w._wake, loop=w.loop)  # type: ignore[arg-type]
    lost, fine = w.add("lost", function_digest="0" * 64) + w.add("fine", function_digest=DIGEST)
    w.dispatch.run_queue()
    assert lost.phase is Phase.FAILED and fine.phase is Phase.RUNNING


def test_an_idle_site_offers_slots_and_a_busy_one_offers_its_queue_tail() -> None:
    w = World(cpus=2)
    assert w.dispatch.idle_slots(draining=False) == 4 and w.dispatch.idle_slots(draining=True) == 0
    w.add(*(f"t{i}" for i in range(6)), resources=_cpus(1))
    w.dispatch.run_queue()
    assert w.dispatch.idle_slots(draining=False) == 0
    assert [t.task_id for t in w.dispatch.movable()] == ["t4", "t5"]  # beyond the two this site starts next


def _started(w: World) -> list[str]:
    return [ids[0] for ids, _ in w.runner.started]


def test_a_tenant_that_floods_the_queue_waits_behind_its_own_tasks_not_in_front_of_others() -> None:
    w = World(cpus=2)
    w.add(*(f"a{i}" for i in range(50)), resources=_cpus(1), tenant="acme")
    w.dispatch.run_queue()
    assert _started(w) == ["a0", "a1"]
    w.add("b0", "b1", resources=_cpus(1), tenant="globex")
    w.finish(0, ok(b""))
    assert _started(w)[-1] == "b0"  # globex holds nothing: it goes next, not after acme's 48
    w.finish(1, ok(b""))
    assert _started(w)[-1] == "a2"  # acme now holds nothing, globex 1 CPU
    w.finish(2, ok(b""))
    assert _started(w)[-1] == "b1"  # globex holds nothing again: one each, turn by turn


def test_weights_share_the_site_in_proportion() -> None:
    w = World(cpus=4, limits={"acme": Entitlement(weight=3.0), "globex": Entitlement(weight=1.0)})
    w.add(*(f"a{i}" for i in range(20)), resources=_cpus(1), tenant="acme")
    w.add(*(f"g{i}" for i in range(20)), resources=_cpus(1), tenant="globex")
    w.dispatch.run_queue()
    assert sorted(t[0] for t in _started(w)) == ["a", "a", "a", "g"]  # 3:1


def test_a_running_cap_keeps_a_tenants_extra_tasks_queued_and_lets_others_through() -> None:
    w = World(cpus=4, limits={"acme": Entitlement(max_running=1)})
    tasks = w.add("a0", "a1", "a2", resources=_cpus(1), tenant="acme")
    w.add("g0", resources=_cpus(1), tenant="globex")
    w.dispatch.run_queue()
    assert sorted(_started(w)) == ["a0", "g0"]
    assert [t.phase for t in tasks[1:]] == [Phase.QUEUED, Phase.QUEUED]  # queued, not refused
    w.finish(_started(w).index("a0"), ok(b""))
    assert _started(w)[-1] == "a1" and tasks[2].phase is Phase.QUEUED


def test_while_tenants_compete_each_keeps_a_shallow_pipeline_in_ray_and_nothing_is_fused() -> None:
    w = World(pool_size=1, cpus=2)
    w.slots.capacity.observe(0.001)  # short tasks
    w.add(*(f"a{i}" for i in range(100)), tenant="acme")
    w.dispatch.run_queue()
    alone = sum((ids for ids, _ in w.runner.started), [])
    assert len(alone) == 4  # alone, acme fills all the site admits (2 CPUs overcommitted)
    w2 = World(pool_size=1, cpus=2)
    w2.slots.capacity.observe(0.001)
    w2.add(*(f"a{i}" for i in range(100)), tenant="acme")
    w2.add("g0", tenant="globex")
    w2.dispatch.run_queue()
    calls = [ids for ids, _ in w2.runner.started]
    assert all(len(ids) == 1 for ids in calls)  # not fused
    assert sorted(ids[0] for ids in calls) == ["a0", "a1", "g0"]  # 2 CPUs x 2 / 2 tenants: 2 each at most


def test_a_cpu_cap_keeps_a_tenants_tasks_queued_beyond_the_cpus_it_may_hold() -> None:
    w = World(cpus=8, limits={"acme": Entitlement(max_resources={"CPU": 3.0})})
    tasks = w.add("a0", "a1", "a2", resources=_cpus(2), tenant="acme")
    w.add("s0", resources=_cpus(1), tenant="acme")
    w.dispatch.run_queue()
    assert _started(w) == ["a0", "s0"] and tasks[1].phase is Phase.QUEUED  # 2 + 1 CPUs; another 2 would be 5
