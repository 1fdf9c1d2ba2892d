"""Local dispatch: which queued tasks start in this site's Ray now (admission, head-of-line
scan, fusion of short tasks into one call), and what their Ray calls came back with.

Ray calls back on its own threads; the callbacks are moved onto the event loop
(``call_soon_threadsafe``) before they touch a task. Ray and the loop are reached through
``ports.Executor`` and ``ports.Loop``: this module does no I/O of its own.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from intertie_gateway.admission import Capacity
from intertie_gateway.book import Measured, Task, TaskBook
from intertie_gateway.fairshare import UNLIMITED, Entitlement, dominant_share
from intertie_gateway.lifecycle import Phase
from intertie_gateway.model import PREEMPTED, RETRY, ErrorKind, Failure
from intertie_gateway.ports import Executor, Loop

logger = logging.getLogger(__name__)


def _is_queued(task: Task) -> bool:
    return task.phase is Phase.QUEUED


# When the head of the queue does not fit, look this far behind it for one that does.
QUEUE_SCAN_DEPTH = 32
# Fusing queued tasks of one function into one Ray call: only when this site's tasks run
# shorter than this on average, and at most this many per call.
FUSE_MAX_RUN_S = 0.005
FUSE_MAX_TASKS = 32
# While tenants compete for the site, each keeps at most its part of this many tasks per CPU
# in Ray, and none are fused: a shallow pipeline, so that another tenant's next task waits
# behind few of them (Ray's own queues are first come, first served). A tenant competes for
# this long after it last had tasks queued here.
CONTENDED_DEPTH_PER_CPU = 2.0
CONTENDED_WINDOW_S = 2.0


class Slots:
    """What the tasks running here hold: admission capacity, and the datasets they read
    (a replica being read is not evicted)."""

    def __init__(self, capacity: Capacity) -> None:
        self.capacity = capacity
        self.running = 0
        self.reading: Counter[str] = Counter()
        # Per tenant: its tasks running here, and the resources they hold (fair share).
        self.running_by: Counter[str] = Counter()
        self.used_by: dict[str, Counter[str]] = {}

    def take(self, task: Task) -> None:
        task.holding = True
        self.capacity.acquire(task.request)
        self.running += 1
        self.running_by[task.tenant] += 1
        self.used_by.setdefault(task.tenant, Counter()).update(task.request)
        for item in task.spec.inputs:
            self.reading[item.id] += 1

    def release(self, task: Task) -> None:
        """Frees what a task running here holds (the book calls it when a task leaves RUNNING)."""
        if task.holding:
            for item in task.spec.inputs:
                self.reading[item.id] -= 1
                if self.reading[item.id] <= 0:
                    del self.reading[item.id]
            task.holding = False
            self.capacity.release(task.request)
            self.running -= 1
            self.running_by[task.tenant] -= 1
            if self.running_by[task.tenant] <= 0:
                del self.running_by[task.tenant]
                self.used_by.pop(task.tenant, None)
            else:
                self.used_by[task.tenant].subtract(task.request)
        if task.timer is not None:
            task.timer.cancel()
            task.timer = None


class Dispatch:
    """``inputs_for``: where a task's dataset arguments are read, or None while they are
    fetched (the task is then FETCHING, and comes back to the queue). ``functions``: a
    function's pickled bytes from the journal. ``wake``: the driver's pump, after a Ray
    call came back. ``limits(tenant)``: what the tenant may hold of the site (its policy)."""

    def __init__(self, book: TaskBook, slots: Slots, runner: Executor, *, site_id: str, max_payload_bytes: int,
                 inputs_for: Callable[[Task], dict[str, str] | None], functions: Callable[[str], bytes | None],
                 wake: Callable[[], None], loop: Loop,
                 limits: Callable[[str], Entitlement] = lambda tenant: UNLIMITED) -> None:
        self.book = book
        self.slots = slots
        self.capacity = slots.capacity
        self.runner = runner
        self.site_id = site_id
        self.max_payload_bytes = max_payload_bytes
        self._inputs_for = inputs_for
        self._functions = functions
        self._wake = wake
        self._loop = loop
        self._limits = limits
        self._active: dict[str, float] = {}  # tenant -> when it last had tasks queued
        self._depth = 0  # while tenants compete: the most tasks each may have in Ray (0: no limit)

    def queued(self) -> int:
        return sum(1 for t in self.book.queue if t.phase is Phase.QUEUED)

    def run_queue(self) -> None:
        """Starts queued tasks while they fit, each from the tenant with the smallest
        weighted share of the site that is under its running cap (``fairshare``); within a
        tenant, in order, and a head that does not fit (e.g. it waits for a GPU) lets a
        smaller task behind it through."""
        queue = self.book.queue
        queue.prune(_is_queued)
        self._contention()
        while True:
            for tenant in queue.order(self._share):
                if self._start_next(tenant, self._limits(tenant)):
                    break
            else:
                return
            queue.prune(_is_queued)

    def _contention(self) -> None:
        """Which tenants compete for the site now, and how deep each may fill Ray's queues."""
        now = self.book.now()
        for tenant in self.book.queue.lanes:
            self._active[tenant] = now
        if len(self._active) > 1:
            self._active = {t: at for t, at in self._active.items() if now - at < CONTENDED_WINDOW_S}
        competing = len(self._active)
        cpus = self.capacity.total.get("CPU", 1.0)
        self._depth = max(1, int(cpus * CONTENDED_DEPTH_PER_CPU / competing)) if competing > 1 else 0

    def _share(self, tenant: str) -> float:
        used = self.slots.used_by.get(tenant)
        return dominant_share(used, self.capacity.total, self._limits(tenant).weight) if used else 0.0

    def _may_start(self, task: Task, limits: Entitlement) -> bool:
        """Whether the site has room for the task, and its tenant (its entitlement, and its
        part of Ray's queues while tenants compete)."""
        running = self.slots.running_by[task.tenant]
        if self._depth and running >= self._depth:
            return False
        return self.capacity.fits(task.request) and limits.admits(running, self.slots.used_by.get(task.tenant),
                                                                 task.request)

    def _start_next(self, tenant: str, limits: Entitlement) -> bool:
        """Starts the next task of a tenant that fits (its head, with tasks fused behind it,
        or one of the next few); whether one started. Over its entitlement, a tenant's tasks
        wait queued."""
        running = self.slots.running_by[tenant]
        if (self._depth and running >= self._depth) or (limits.max_running and running >= limits.max_running):
            return False  # (at its cap: no task of it starts, whatever its size)
        queue = self.book.queue
        lane = queue.lanes[tenant]
        task = lane[0]  # (pruned: queued)
        if self._may_start(task, limits):
            queue.popleft(tenant)
            if task.spec.inputs or task.spec.returns_dataset:
                self._launch(task)
                return True
            group = self._fusable_behind(task)
            if group:
                self._start_group([task, *group])
            else:
                self._start(task)
            return True
        for i in range(1, min(len(lane), QUEUE_SCAN_DEPTH)):
            other = lane[i]
            if other.phase is Phase.QUEUED and self._may_start(other, limits):
                self._launch(queue.remove(tenant, i))
                return True
        return False

    def _launch(self, task: Task) -> None:
        """Starts a task alone, once its dataset arguments are here."""
        paths = self._inputs_for(task) if task.spec.inputs else {}
        if paths is not None:
            self._start(task, paths)

    def _fusable_behind(self, head: Task) -> list[Task]:
        """Tasks right behind ``head`` in the queue that may run in the same Ray call.

        Only while the queue is long and tasks of this site are short (a fused call runs its
        tasks one after another): then one call per several tasks saves most of Ray's
        per-call cost, and each worker still gets work. Removed from the queue."""
        mean = self.capacity.mean_run_s
        slots = self.runner.pool_size
        queue = self.book.queue
        lane = queue.lanes.get(head.tenant)
        if (lane is None or self._depth or not head.fuse or not slots or mean is None or mean > FUSE_MAX_RUN_S
                or len(lane) < 2 * slots or not self.runner.pooled(head.request)):
            return []
        # Keep several calls queued per worker, so none idles while its results come back.
        size = min(FUSE_MAX_TASKS, len(lane) // slots, self.capacity.max_count // (slots * 4)) - 1
        limits = self._limits(head.tenant)
        if limits.max_running or limits.max_resources:  # fused tasks count against the tenant's limits one by one
            return []
        group: list[Task] = []
        while lane and len(group) < size:
            other = lane[0]
            if (other.phase is not Phase.QUEUED or not other.fuse
                    or other.spec.function_digest != head.spec.function_digest or other.request != head.request
                    or other.spec.inputs or other.spec.returns_dataset or not self.capacity.fits(other.request)):
                break
            group.append(queue.popleft(head.tenant))
            self.capacity.acquire(other.request)  # counted now so fits() sees it; released per task
        for other in group:
            self.capacity.release(other.request)
        return group

    def _ensure_function(self, task: Task) -> bool:
        digest = task.spec.function_digest
        if not self.runner.has_function(digest):
            payload = self._functions(digest)
            if payload is None:
                self.book.move(task, Phase.FAILED, error=Failure(
                    ErrorKind.INTERNAL, f"function {digest[:12]} is missing from the journal"))
                return False
            self.runner.put_function(digest, payload)
        return True

    def _mark_started(self, task: Task) -> int:
        self.book.move(task, Phase.RUNNING)
        self.slots.take(task)
        return task.attempts

    def _could_not_start(self, task: Task, exc: Exception) -> None:
        self.book.move(task, Phase.FAILED, error=Failure(
            ErrorKind.INTERNAL, f"site {self.site_id!r} could not start the task: {exc}"))

    def _start_group(self, tasks: list[Task]) -> None:
        """Several queued tasks of one function in one call to a pooled worker."""
        if not self._ensure_function(tasks[0]):
            for task in reversed(tasks[1:]):
                self.book.queue.appendleft(task)
            return
        attempts = [self._mark_started(t) for t in tasks]
        loop = self._loop
        try:
            running = self.runner.submit_many(tasks[0].spec.function_digest,
                                              [(t.spec.name, t.spec.args, t.spec.batch, t.task_id) for t in tasks],
                                              tasks[0].request, tenants=[t.spec.tenant for t in tasks])
        except Exception as exc:
            logger.exception("a group of %d tasks: Ray did not take it", len(tasks))
            for task in tasks:
                self._could_not_start(task, exc)
            return
        for task in tasks:
            task.ref = running
            task.group = tasks
        running.ref.future().add_done_callback(
            lambda fut: loop.call_soon_threadsafe(self._on_group_done, tasks, attempts, running, fut))

    def _start(self, task: Task, inputs: dict[str, str] | None = None) -> None:
        spec = task.spec
        if not self._ensure_function(task):
            return
        attempt = self._mark_started(task)
        loop = self._loop
        try:
            task.ref = running = self.runner.submit(spec.function_digest, spec.name, spec.args, spec.batch,
                                                    task.request, inputs, task_id=task.task_id,
                                                    returns_dataset=spec.returns_dataset, tenant=spec.tenant)
            running.ref.future().add_done_callback(
                lambda fut: loop.call_soon_threadsafe(self._on_done, task, attempt, running, fut))
        except Exception as exc:  # e.g. Ray rejected the options
            logger.exception("task %s: Ray did not take it", task.task_id)
            self._could_not_start(task, exc)
            return
        if spec.timeout_s > 0:
            task.timer = loop.call_later(spec.timeout_s, self._on_timeout, task, attempt)

    def _runs(self, task: Task, attempt: int) -> bool:
        """Whether the call that came back is still the task's (not cancelled, timed out or
        retried meanwhile: then it is a late duplicate)."""
        return task.phase is Phase.RUNNING and task.attempts == attempt

    def _on_done(self, task: Task, attempt: int, running: Any, fut: Future[Any]) -> None:
        try:
            verdict, outcome = self.runner.outcome(running, fut)
            if self._runs(task, attempt):
                if verdict == "ok":
                    run_s = outcome[7]  # measured in the worker: without the wait in Ray's queues
                    self.capacity.observe(run_s)
                    self._apply(task, outcome, run_s)
                else:
                    self._failed_in_ray(task, verdict, outcome)
        except Exception as exc:  # a bug here must not leave the task RUNNING forever
            logger.exception("task %s: settling its outcome failed", task.task_id)
            self._settle_failed(task, exc)
        self._wake()

    def _on_group_done(self, tasks: list[Task], attempts: list[int], running: Any, fut: Future[Any]) -> None:
        try:
            verdict, outcome = self.runner.outcome(running, fut)
            for i, task in enumerate(tasks):
                if not self._runs(task, attempts[i]):
                    continue
                if verdict == "ok":
                    self.capacity.observe(outcome[i][7])
                    self._apply(task, outcome[i], outcome[i][7])
                elif verdict in (RETRY, PREEMPTED):
                    # Which of the fused tasks took the worker down is unknown: all of them run
                    # again, alone and free; the culprit then fails alone and is charged.
                    task.fuse = False
                    self._failed_in_ray(task, PREEMPTED, outcome)
                else:
                    self._failed_in_ray(task, verdict, outcome)
        except Exception as exc:
            logger.exception("settling a group of %d tasks failed", len(tasks))
            for task in tasks:
                self._settle_failed(task, exc)
        self._wake()

    def _settle_failed(self, task: Task, exc: Exception) -> None:
        if task.phase is Phase.RUNNING:
            self.book.move(task, Phase.FAILED, error=Failure(
                ErrorKind.INTERNAL, f"site {self.site_id!r}: {type(exc).__name__}: {exc}"))

    def _failed_in_ray(self, task: Task, verdict: str, exc: BaseException) -> None:
        if verdict == PREEMPTED:  # waited on a worker stopped for another task: costs nothing
            self.book.move(task, Phase.QUEUED, refund=True, front=True)
        elif verdict == RETRY:
            self.book.retry(task, f"worker failed: {type(exc).__name__}: {str(exc)[:500]}")
        else:
            logger.error("task %s: unexpected failure from Ray: %s", task.task_id, exc)
            self.book.move(task, Phase.FAILED, error=Failure(
                ErrorKind.INTERNAL, f"site {self.site_id!r}: {type(exc).__name__}: {exc}"))

    def _apply(self, task: Task, outcome: Any, run_s: float) -> None:
        """Finishes a task with what its worker returned (``worker.Outcome``), and what the
        worker measured of it: its CPU time, and its result's bytes (the tables it stored at
        the site, when it stored any; else the bytes it returned)."""
        ok, data, kind, etype, message, tb, pickled, _, cpu_s, kept = outcome
        measured = Measured(cpu_s, kept or len(data))
        if not ok:
            self.book.move(task, Phase.FAILED, run_s=run_s, measured=measured,
                           error=Failure(kind, message, etype, pickled, tb))
        elif len(data) > self.max_payload_bytes:
            self.book.move(task, Phase.FAILED, run_s=run_s, measured=measured, error=Failure(
                ErrorKind.PAYLOAD_TOO_LARGE, (f"task {task.task_id}: result is {len(data)} bytes, over this "
                                              f"site's limit of {self.max_payload_bytes} bytes")))
        else:
            self.book.move(task, Phase.SUCCEEDED, result=data, run_s=run_s, measured=measured)

    def _on_timeout(self, task: Task, attempt: int) -> None:
        if not self._runs(task, attempt):
            return
        task.timer = None
        self.runner.cancel(task.ref)
        self.book.move(task, Phase.FAILED, error=Failure(ErrorKind.TIMEOUT, (
            f"task {task.task_id} ran longer than its timeout of {task.spec.timeout_s:g} s and was stopped")))
        self._wake()

    def stop_run(self, task: Task) -> None:
        """Stops the Ray call of a task running here. Stopping a fused call would fail the
        other tasks in it: it is stopped only with the last of them; until then the task's
        outcome is ignored."""
        if task.ref is not None and not any(t is not task and t.ref is task.ref and t.phase is Phase.RUNNING
                                            for t in task.group):
            self.runner.cancel(task.ref)

    def movable(self) -> list[Task]:
        """Queued home tasks beyond what this site starts next: what an idle peer may take."""
        slots = max(1, int(self.capacity.total.get("CPU", 1.0)))
        waiting = [t for t in self.book.queue if t.phase is Phase.QUEUED and t.home_here
                   and not t.spec.constraints.site]
        return waiting[slots:]

    def idle_slots(self, draining: bool) -> int:
        """How many queued tasks this site could start at once right now (0 unless idle)."""
        if draining or any(t.phase is Phase.QUEUED for t in self.book.queue):
            return 0
        free_cpu = self.capacity.total.get("CPU", 0.0) - self.capacity.in_use.get("CPU", 0.0)
        return max(0, int(free_cpu)) * 2

    def tasks_running_here(self) -> Sequence[Task]:
        return [t for t in self.book.tasks.values() if t.phase is Phase.RUNNING and t.site == self.site_id]
