"""The task book: the unfinished tasks of this gateway, where each one stands, and ``move``,
the one function that changes a task's phase.

``move`` checks the move against the lifecycle's table, keeps the attempt count and the
history, files the task where its new phase is served (the queue here, the tasks waiting
for a placement, the tasks waiting for a site), and says what the move means to the outside:
a journal change (committed by the driver with the others of the same loop turn) and, for a
task's sessions, an update (a start at once, a finish once its change is committed). It is
where later hooks (quota counters, usage records) belong.

Pure: no I/O, no clock of its own, no wire types.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from intertie_gateway.estimates import Estimates
from intertie_gateway.fairshare import FairQueue
from intertie_gateway.lifecycle import ACTIVE, Phase, check
from intertie_gateway.model import (
    Change,
    ErrorKind,
    Failure,
    Finished,
    Forgotten,
    Placed,
    Requeued,
    Started,
    TaskSpec,
    Update,
    Usage,
)
from intertie_gateway.placement import Demand, PlacementRecord, SiteView

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Measured:
    """What the worker measured of an attempt it ran to its end (``dispatch`` reads it from
    Ray's answer): the CPU time of the call (user + system) and the result's bytes (those
    returned, or those of the tables it stored at the site)."""

    cpu_time_s: float
    result_bytes: int


# How an attempt that ran here ended, as its Usage says: by the phase it left RUNNING for.
_OUTCOMES = {Phase.SUCCEEDED: "succeeded", Phase.FAILED: "failed", Phase.CANCELLED: "cancelled",
             Phase.DROPPED: "dropped"}


def site_price(labels: Mapping[str, str]) -> float:
    """The site's price per CPU-hour: its ``placement.PRICE_LABEL`` label, read as placement
    reads it for its price term (0: none, or not a positive number)."""
    return SiteView("", labels=labels).price()


class Task:
    """One unfinished task, as this gateway tracks it. Its phase, attempts, site and history
    change only through ``TaskBook.move``."""

    __slots__ = ("task_id", "spec", "request", "phase", "attempts", "site", "submitted_at", "started_at",
                 "ref", "timer", "sessions", "history", "holding", "placements", "exclude", "resent", "fuse", "group",
                 "pulled")

    def __init__(self, spec: TaskSpec, submitted_at: float) -> None:
        self.task_id = spec.task_id
        self.spec = spec
        self.request = spec.ray_request()
        self.phase = Phase.NEW
        self.attempts = 0
        self.site = ""
        self.submitted_at = submitted_at
        self.started_at = 0.0
        self.ref: Any = None  # its Ray call while it runs here
        self.timer: Any = None  # its timeout while it runs here
        self.sessions: set[str] | None = None
        self.history: list[dict[str, object]] = []
        self.holding = False  # occupies admission capacity
        self.placements: list[PlacementRecord] = []  # where it was sent, and why
        self.exclude: set[str] = set()  # sites that refused it
        self.resent = False  # re-forwarded once with its function after a NOT_FOUND
        self.fuse = spec.timeout_s == 0 and not spec.inputs  # may share one Ray call with others
        self.group: Sequence[Task] = ()  # the tasks of its last fused Ray call
        self.pulled = 0  # bytes of datasets pulled here for its next (or running) attempt (``transfers``)

    @property
    def state(self) -> int:
        """The public state (the wire's TaskState number)."""
        return self.phase.state

    @property
    def tenant(self) -> str:
        return self.spec.tenant

    @property
    def home_here(self) -> bool:
        """Accepted from a client (not forwarded by a peer): this gateway places it."""
        return not self.spec.home

    def demand(self, run_s: float | None = None, input_bytes: int | None = None, *, home: str = "") -> Demand:
        """What the task needs of a site; ``home``: the placing site (the tenant's home)."""
        c = self.spec.constraints
        return Demand(self.request, python_version=self.spec.python_version, arch=c.arch, site=c.site,
                      labels=dict(c.labels), input_bytes=len(self.spec.args) if input_bytes is None else input_bytes,
                      exclude=frozenset(self.exclude), run_s=run_s,
                      inputs={i.id: i.num_bytes for i in self.spec.inputs},
                      holders={i.id: i.site for i in self.spec.inputs}, tenant=self.spec.tenant, home=home)

    def add_session(self, session_id: str) -> None:
        if session_id:
            if self.sessions is None:
                self.sessions = set()
            self.sessions.add(session_id)


class TaskBook:
    """``federated``: this site has peers, so the tasks it is home to are placed (UNPLACED)
    rather than queued here. ``release`` frees what a task running here holds (its slot,
    its timer); ``changed`` is told of the first journal change of a turn; ``progress``
    delivers a start to the task's sessions at once. ``price_per_cpu_hour``: the site's price
    label (0: none), written into every attempt's Usage."""

    def __init__(self, site_id: str, *, federated: bool, estimates: Estimates, release: Callable[[Task], None],
                 changed: Callable[[], None], progress: Callable[[set[str], Update], None],
                 clock: Callable[[], float], price_per_cpu_hour: float = 0.0) -> None:
        self.site_id = site_id
        self.federated = federated
        self.price_per_cpu_hour = price_per_cpu_hour
        self.estimates = estimates
        self._release = release
        self._changed = changed
        self._progress = progress
        self._clock = clock
        self.tasks: dict[str, Task] = {}
        # Where each waiting phase is served. A task leaves them lazily: whoever takes from
        # one skips tasks no longer in its phase.
        self.queue: FairQueue[Task] = FairQueue()  # QUEUED: to run here, in order per tenant
        # Per tenant: its unfinished tasks here (quotas read it).
        self.unfinished: Counter[str] = Counter()
        self.unplaced: list[Task] = []  # UNPLACED: to be placed on the next pump
        self.waiting: list[Task] = []  # WAITING_SITE: placed again on a heartbeat or a peer coming up
        # Journal changes not yet committed, and finishes told once they are.
        self.changes: list[Change] = []
        self.updates: list[tuple[set[str], Update]] = []

    def __len__(self) -> int:
        return len(self.tasks)

    def now(self) -> float:
        return self._clock()

    def get(self, task_id: str) -> Task | None:
        return self.tasks.get(task_id)

    def unqueue(self, tasks: Sequence[Task]) -> None:
        """Takes tasks that left QUEUED (handed to an idle peer) out of the queue at once, so
        that the queue's length, which placement reads, does not count them."""
        gone = {id(t) for t in tasks}
        self.queue.keep(lambda t: id(t) not in gone)

    def admit(self, task: Task) -> None:
        """An accepted task (journaled): placed by this home, or queued here."""
        if self.federated and task.home_here:
            self.move(task, Phase.UNPLACED)
        else:
            task.site = self.site_id
            self.move(task, Phase.QUEUED)

    def retry(self, task: Task, why: str) -> None:
        """An attempt failed for a reason that is not the task's (a worker, a node, a site
        went down): run it again, spending an attempt, or fail it when none are left."""
        if task.attempts <= task.spec.max_retries:
            logger.warning("task %s attempt %d at %s: %s; retrying", task.task_id, task.attempts, task.site, why)
            # A home places it again (another site may be better now); others run it here.
            self.move(task, Phase.UNPLACED if self.federated and task.home_here else Phase.QUEUED, why=why, front=True)
        else:
            self.move(task, Phase.FAILED, why=why, error=Failure(ErrorKind.SITE_FAILURE, (
                f"task {task.task_id}: {why} (attempt {task.attempts}, max_retries={task.spec.max_retries}: "
                "no retries left)")))

    def move(self, task: Task, to: Phase, *, why: str = "", refund: bool = False, site: str = "",
             front: bool = False, placement: PlacementRecord | None = None, result: bytes | None = None,
             error: Failure | None = None, run_s: float = 0.0, measured: Measured | None = None) -> None:
        """Moves ``task`` to phase ``to``; raises ``IllegalMove`` for a move the lifecycle
        does not have.

        ``why``: the attempt under way ended for this reason (it goes into the history).
        ``refund``: that attempt is not counted (the task never got to run).
        ``site`` and ``placement``: where a placement sent it, and the record of why.
        ``front``: first in line again (a retry, or a task whose inputs arrived).
        ``result``, ``error``, ``run_s``: how a finished task ended; ``measured``: what its
        worker measured of the attempt (None: the worker did not answer, e.g. it was stopped).

        An attempt that ran here and ends with this move is metered: its ``Usage`` goes with
        the Finished or Requeued change that records the end (one object per attempt; no
        change of its own)."""
        frm = task.phase
        check(task.task_id, frm, to)
        now = self._clock()
        # (started_at is 0 for a run restored at a restart: its start was not seen here)
        usage = (self._usage(task, to, now, refund, measured, result)
                 if frm is Phase.RUNNING and task.started_at else None)
        task.phase = to
        if frm is Phase.NEW:
            self.tasks[task.task_id] = task
            self.unfinished[task.spec.tenant] += 1
        if why:
            task.history.append({"attempt": task.attempts, "site": task.site, "started_at": task.started_at,
                                 "ended_at": now, "outcome": why})
        if refund:
            task.attempts -= 1
        if frm is Phase.RUNNING:
            self._release(task)
            if not to.terminal:
                task.ref = None

        if to.terminal:
            self._finished(task, to, now, result, error, run_s, usage)
        elif to is Phase.QUEUED:
            if frm is Phase.UNPLACED:  # placed here
                if placement is not None:
                    task.placements.append(placement)
                task.site = self.site_id
                self._write(Placed(task.task_id, task.attempts, task.site, tuple(task.placements)))
            elif frm in ACTIVE or why:
                self._write(Requeued(task.task_id, task.attempts, tuple(task.history), usage))
            if front:
                self.queue.appendleft(task)
            else:
                self.queue.append(task)
        elif to is Phase.UNPLACED:
            if frm in ACTIVE:
                task.site = ""
                self._write(Requeued(task.task_id, task.attempts, tuple(task.history), usage))
            if front:
                self.unplaced.insert(0, task)
            else:
                self.unplaced.append(task)
        elif to is Phase.WAITING_SITE:
            self.waiting.append(task)
        elif to is Phase.FORWARDING:
            if frm is not Phase.NEW:  # placed at a peer (a restored one is there already)
                if placement is not None:
                    task.placements.append(placement)
                task.site = site
                task.attempts += 1  # an attempt at the peer (one here is counted when it starts)
                task.started_at = now
                self._write(Placed(task.task_id, task.attempts, site, tuple(task.placements)))
        elif to is Phase.RUNNING:
            if frm is not Phase.NEW:  # (a restored one was running before the restart)
                task.attempts += 1
                task.site = self.site_id
                task.started_at = now
                self._write(Started(task.task_id, task.attempts, self.site_id, now))
                self._tell_start(task)
        elif to is Phase.RUNNING_AT_PEER:
            # Not journaled: after a restart the home resends it, and the peer knows it.
            task.started_at = now
            self._tell_start(task)
        # FETCHING, AT_PEER, HELD: where it is served changes nothing outside

    def _tell_start(self, task: Task) -> None:
        if task.sessions:
            self._progress(task.sessions, Update(task.task_id, task.state, task.site, task.attempts))

    def _usage(self, task: Task, to: Phase, now: float, refund: bool, measured: Measured | None,
               result: bytes | None) -> Usage:
        """What the attempt running here, ending now, used (before a refund lowers the count:
        a preempted attempt is metered under the number it ran as, which its rerun takes again).
        Not measured by a worker (it was stopped, or lost): no CPU time, and no result but one given."""
        inputs = task.spec.inputs
        pulled, task.pulled = task.pulled, 0
        request = task.request
        return Usage(task.spec.tenant, task.task_id, task.attempts, task.spec.home,
                     _OUTCOMES.get(to) or ("preempted" if refund else "retried"), task.started_at, now,
                     request.get("CPU", 0.0), request.get("GPU", 0.0),
                     measured.cpu_time_s if measured is not None else 0.0, len(task.spec.args),
                     measured.result_bytes if measured is not None else len(result or b""), pulled,
                     sum(i.num_bytes for i in inputs) if inputs else 0, self.price_per_cpu_hour, task.spec.name)

    def _finished(self, task: Task, to: Phase, now: float, result: bytes | None, error: Failure | None,
                  run_s: float, usage: Usage | None) -> None:
        self.tasks.pop(task.task_id, None)
        self.unfinished[task.spec.tenant] -= 1
        if self.unfinished[task.spec.tenant] <= 0:
            del self.unfinished[task.spec.tenant]
        ran_here = task.ref is not None
        task.ref = None
        if to is Phase.DROPPED:  # its home took it back: no event (it may send the same task here again)
            self._write(Forgotten(task.task_id, usage))
            return
        if not run_s and ran_here and task.started_at:
            run_s = now - task.started_at
        if run_s > 0 and to is not Phase.CANCELLED:
            self.estimates.observe_run(task.spec.function_digest, run_s)
        self.estimates.count_finished(now)
        self._write(Finished(task.task_id, to.state, task.attempts, task.site, now, result, error, tuple(task.history),
                             usage))
        if task.sessions:
            self.updates.append((task.sessions, Update(task.task_id, to.state, task.site, task.attempts,
                                                       result or b"", error, run_s)))

    def _write(self, change: Change) -> None:
        if not self.changes:
            self._changed()
        self.changes.append(change)
