"""Federation decisions of a home: where its tasks run (placement, by catalogue epoch),
sending them to peers, and what a peer's answers, events, going down or coming up mean for
them; handing queued work to an idle peer (stealing); quotes. Also the forwarded tasks a
restart found here, held until their home confirms them.

It is the core's ``PeerListener``: membership and the peer links call it through
``ports``, and it calls them through the ``Federation`` and ``PeerPort`` protocols there.
"""

from __future__ import annotations

import functools
import logging
import platform
import time
from collections.abc import Callable, Mapping, Sequence

from intertie_gateway.book import Task, TaskBook
from intertie_gateway.config import GatewayConfig
from intertie_gateway.dispatch import Dispatch
from intertie_gateway.estimates import Estimates
from intertie_gateway.lifecycle import Phase
from intertie_gateway.model import ErrorKind, Failure, TaskSpec, Update
from intertie_gateway.placement import PlacementRecord, Placer, SiteView, Weights, rejection
from intertie_gateway.ports import Federation, NoFederation, PeerListener, PeerPort

logger = logging.getLogger(__name__)

ARCH = platform.machine().lower()
# A placer (filtered, scored sites per task shape) is reused for this long.
PLACER_REFRESH_S = 1.0
# What ``on_event`` is told, as (kind, site, how many tasks); LOCAL is this site, NOWHERE no site.
PLACED, FORWARDED, MIGRATED, STOLEN = "placed", "forwarded", "migrated", "stolen"
LOCAL, NOWHERE = "local", "none"


def _no_event(kind: str, site: str, count: int) -> None:
    pass


class Federate:
    """``on_event(kind, site, count)``: told of federation events, once per batch (metrics):
    PLACED (by the site chosen, LOCAL or NOWHERE), FORWARDED (tasks sent to a peer), MIGRATED
    (tasks taken back from a peer to be placed again), STOLEN (queued tasks handed to an idle peer)."""

    def __init__(self, book: TaskBook, dispatch: Dispatch, estimates: Estimates, *, config: GatewayConfig,
                 python: str, resident: Callable[[], Mapping[str, str]], functions: Callable[[str], bytes | None],
                 draining: Callable[[], bool], wake: Callable[[], None],
                 make_federation: Callable[[PeerListener[Task]], Federation[Task]] | None,
                 on_event: Callable[[str, str, int], None] | None = None) -> None:
        self.book = book
        self.dispatch = dispatch
        self.estimates = estimates
        self.config = config
        self.site_id = config.site_id
        self.python = python
        self._resident = resident
        self._functions = functions
        self._draining = draining
        self._wake = wake
        self._on_event = on_event or _no_event
        self.weights = Weights(price=config.price_weight, carbon=config.carbon_weight,
                               default_bandwidth=config.default_bandwidth)
        self.federation: Federation[Task] = make_federation(self) if make_federation else NoFederation()
        self._reforward: dict[str, list[Task]] = {}  # recovered tasks that were at a peer
        # Recovered tasks forwarded by a peer (home -> task id -> (task, was running)): not
        # run until their home confirms them.
        self._held: dict[str, dict[str, tuple[Task, bool]]] = {}
        self._started_at = time.time()
        self._placer: Placer | None = None
        self._placer_built = 0.0

    # ------------------------------------------------------------------ views and placement
    def local_view(self) -> SiteView:
        capacity = self.dispatch.capacity
        return SiteView(
            site_id=self.site_id, state="draining" if self._draining() else "up", arch=ARCH,
            python_version=self.python, total=capacity.total, node_max=capacity.node_max, free=capacity.free(),
            queued=len(self.book.queue), running=self.dispatch.slots.running, mean_run_s=capacity.mean_run_s,
            overhead_s=capacity.overhead_s,
            labels=self.config.labels, max_payload_bytes=self.config.max_payload_bytes, local=True,
            resident=self._resident())

    def feasibility(self) -> Callable[[Task, bool], str | None]:
        """A check for one batch: why no site can ever run a task (it is then refused before
        it is journaled), or None. The views and placer are built once, on first use."""
        local = functools.cache(self.local_view)

        @functools.cache
        def everywhere() -> Placer:
            return Placer([local(), *self.federation.views()], self.weights, ignore_state=True)

        def never_runs(task: Task, federated: bool) -> str | None:
            demand = task.demand(home=self.site_id)
            if not federated:
                why = rejection(local(), demand, ignore_state=True)
                return None if why is None else f"no site can run it: site {self.site_id!r} {why}"
            decision = everywhere().place(demand, commit=False)
            return None if decision.site_id is not None else decision.why_not()

        return never_runs

    def _current_placer(self) -> Placer:
        """The placer of this catalogue epoch. Rebuilt from fresh views once the peers'
        statuses of a heartbeat are in (``catalogue_changed``), when a peer goes up or down,
        or every PLACER_REFRESH_S: building one filters and scores every site (O(sites) per
        task shape), reusing it costs O(log sites) per task."""
        now = time.monotonic()
        placer = self._placer
        if placer is None or now - self._placer_built > PLACER_REFRESH_S:
            placer = self._placer = Placer([self.local_view(), *self.federation.views()], self.weights)
            self._placer_built = now
        else:  # this site's own load is known exactly (and may have fallen: the placer re-keys it)
            placer.refresh([self.local_view()])
        return placer

    def catalogue_changed(self) -> None:
        """The peers' statuses of a heartbeat are in: the next placement reads them (a kept
        placer would place on their earlier queues, pending counts and round trips)."""
        self._placer = None

    def place(self) -> None:
        """Places the tasks waiting for a placement: here, at a peer, waiting for a site
        that is down now, or failed when no site can ever run them."""
        tasks, self.book.unplaced = self.book.unplaced, []
        placer = self._current_placer()
        by_peer: dict[str, list[Task]] = {}
        now = time.time()
        ever_placer: Placer | None = None
        here = nowhere = 0
        for task in tasks:
            if task.phase is not Phase.UNPLACED:
                continue  # cancelled meanwhile
            demand = task.demand(self.estimates.run_s(task.spec.function_digest), home=self.site_id)
            decision = placer.place(demand)
            if decision.site_id is None:
                nowhere += 1
                if ever_placer is None:
                    ever_placer = Placer(placer.sites, self.weights, ignore_state=True)
                if ever_placer.place(demand, commit=False).site_id is not None:
                    self.book.move(task, Phase.WAITING_SITE)  # only sites that are down now could run it
                else:
                    self.book.move(task, Phase.FAILED, error=Failure(
                        ErrorKind.PLACEMENT, f"task {task.task_id}: {decision.why_not()}"))
                continue
            reason = "lowest estimated completion" if decision.feasible_count > 1 else "only site that can run it"
            record = PlacementRecord.of(decision, reason, now)
            if decision.site_id == self.site_id:
                here += 1
                self.book.move(task, Phase.QUEUED, placement=record)
            else:
                self.book.move(task, Phase.FORWARDING, site=decision.site_id, placement=record)
                by_peer.setdefault(decision.site_id, []).append(task)
        for site, count in ((LOCAL, here), (NOWHERE, nowhere)):
            if count:
                self._on_event(PLACED, site, count)
        for site_id, batch in by_peer.items():
            self._on_event(PLACED, site_id, len(batch))
            self._send(site_id, batch)

    def _send(self, site_id: str, batch: list[Task]) -> None:
        peer = self.federation.peer_for(site_id)
        if peer is None:
            for task in batch:
                task.exclude.add(site_id)
            self.on_forward_failed(None, batch, f"site {site_id} is not a peer of {self.site_id}")
            return
        self._on_event(FORWARDED, site_id, len(batch))
        peer.forward(batch)

    def quote(self, spec: TaskSpec, args_bytes: int) -> PlacementRecord:
        """Every site that can run ``spec``, best first."""
        demand = Task(spec, 0.0).demand(self.estimates.run_s(spec.function_digest), args_bytes or None,
                                        home=self.site_id)
        decision = Placer([self.local_view(), *self.federation.views()], self.weights).rank(demand)
        return PlacementRecord.of(decision, "every site that can run it, best first", time.time())

    def steal(self, thief_id: str, max_tasks: int) -> int:
        """An idle peer asks for work: forward it queued tasks it can run, newest first."""
        peer = self.federation.peer_for(thief_id)
        view = peer.view() if peer is not None and peer.up else None
        if view is None or max_tasks <= 0:
            return 0
        chosen: list[Task] = []
        for task in reversed(self.dispatch.movable()):
            if rejection(view, task.demand(home=self.site_id)) is None:
                chosen.append(task)
                if len(chosen) >= max_tasks:
                    break
        if not chosen:
            return 0
        now = time.time()
        record = PlacementRecord(thief_id, f"moved from {self.site_id}: idle site {thief_id} asked for work", now)
        for task in chosen:
            self.book.move(task, Phase.FORWARDING, site=thief_id, placement=record)
        self.book.unqueue(chosen)
        self._on_event(STOLEN, thief_id, len(chosen))
        self._send(thief_id, chosen)
        return len(chosen)

    # ------------------------------------------------------------------ what peers report (PeerListener)
    def tasks_at(self, site_id: str) -> list[str]:
        return [t.task_id for t in self.book.tasks.values() if t.site == site_id and t.home_here]

    def function_bytes(self, digest: str) -> bytes | None:
        return self._functions(digest)

    def idle_slots(self) -> int:
        return self.dispatch.idle_slots(self._draining())

    def on_forward_acks(self, peer: PeerPort[Task], batch: Sequence[Task], refused: Mapping[str, Failure]) -> None:
        resend: list[Task] = []
        taken: list[Task] = []
        for task in batch:
            if task.phase is not Phase.FORWARDING or task.site != peer.site_id:
                continue  # finished, reported or moved meanwhile
            error = refused.get(task.task_id)
            if error is None:
                self.book.move(task, Phase.AT_PEER)
            elif error.kind == ErrorKind.NOT_FOUND and not task.resent:
                task.resent = True  # the peer lost its function store (restart): send the bytes again
                resend.append(task)
            else:
                task.exclude.add(peer.site_id)
                self.book.move(task, Phase.UNPLACED, why=f"refused by site {peer.site_id}: {error.message}",
                               refund=True)
                taken.append(task)
        self._migrated(peer.site_id, taken)
        if resend:
            peer.forward(resend)
        self._wake()

    def on_forward_failed(self, peer: PeerPort[Task] | None, batch: Sequence[Task], why: str) -> None:
        taken: list[Task] = []
        for task in batch:
            if task.phase is not Phase.FORWARDING or (peer is not None and task.site != peer.site_id):
                continue
            if peer is not None:
                task.exclude.add(peer.site_id)
            self.book.move(task, Phase.UNPLACED, why=why, refund=True)
            taken.append(task)
        if peer is not None:
            self._migrated(peer.site_id, taken)
        self._wake()

    def on_peer_events(self, peer: PeerPort[Task], events: Sequence[Update]) -> None:
        for event in events:
            task = self.book.tasks.get(event.task_id)
            # Only the site the task is at now may report on it: a site it was moved away
            # from (down, then back) may still finish it, and that late duplicate is ignored.
            if task is None or task.site != peer.site_id or not task.home_here \
                    or task.phase not in (Phase.FORWARDING, Phase.AT_PEER, Phase.RUNNING_AT_PEER):
                continue
            if event.state == Phase.RUNNING.state:
                if task.phase is not Phase.RUNNING_AT_PEER:
                    self.book.move(task, Phase.RUNNING_AT_PEER)
            elif event.state == Phase.SUCCEEDED.state:
                self.book.move(task, Phase.SUCCEEDED, result=event.result, run_s=event.run_s)
            elif event.state in (Phase.FAILED.state, Phase.CANCELLED.state):
                self.book.move(task, Phase.FAILED if event.state == Phase.FAILED.state else Phase.CANCELLED,
                               error=event.error, run_s=event.run_s)
        self._wake()

    def on_peer_down(self, peer: PeerPort[Task]) -> None:
        """Every unfinished task at a peer that went down is placed again: at the cost of an
        attempt when the peer had it, free when it never got there."""
        self._placer = None
        undelivered = {id(t) for t in peer.abandon()}
        lost = [t for t in self.book.tasks.values() if t.site == peer.site_id and t.home_here
                and t.phase in (Phase.FORWARDING, Phase.AT_PEER, Phase.RUNNING_AT_PEER)]
        for task in lost:
            if id(task) in undelivered:
                self.book.move(task, Phase.UNPLACED, why=f"site {peer.site_id} went down before it acknowledged "
                                                         "the task", refund=True)
            else:
                self.book.retry(task, f"site {peer.site_id} went down")
        self._migrated(peer.site_id, lost)
        if lost:
            logger.warning("site %s went down: placing its %d unfinished tasks again", peer.site_id, len(lost))
        self._wake()

    def on_peer_up(self, peer: PeerPort[Task]) -> None:
        self._placer = None
        self._unwait()
        tasks = [t for t in self._reforward.pop(peer.site_id, []) if t.phase is Phase.FORWARDING
                 and t.site == peer.site_id]  # (not placed elsewhere meanwhile)
        if tasks:  # forwarded before this gateway restarted: idempotent at the peer
            logger.info("re-sending %d tasks to %s after a restart", len(tasks), peer.site_id)
            peer.forward(tasks)
        self._wake()

    def retry_unplaced(self) -> None:
        """Called every heartbeat: tasks waiting for a site that was down get another go."""
        deadline = self._started_at + self.config.heartbeat_s * (self.config.down_after + 2)
        if self._reforward and time.time() > deadline:
            for site_id, tasks in list(self._reforward.items()):
                del self._reforward[site_id]
                taken = [t for t in tasks if t.phase is Phase.FORWARDING and t.site == site_id]
                for task in taken:
                    self.book.retry(task, f"site {site_id} did not come back after this gateway restarted")
                self._migrated(site_id, taken)
        self._unwait()
        if self.book.unplaced:
            self._wake()

    def _migrated(self, site_id: str, tasks: Sequence[Task]) -> None:
        """Tells ``on_event`` how many of ``tasks``, just taken back from ``site_id``, wait for
        a placement again (the others failed: no retries left). Before the wake that places them."""
        count = sum(1 for t in tasks if t.phase is Phase.UNPLACED)
        if count:
            self._on_event(MIGRATED, site_id, count)

    def _unwait(self) -> None:
        waiting, self.book.waiting = self.book.waiting, []
        for task in waiting:
            if task.phase is Phase.WAITING_SITE:
                self.book.move(task, Phase.UNPLACED)

    def on_reconciled(self, peer: PeerPort[Task], unknown: Sequence[str], unsent: set[str]) -> None:
        """A peer does not know tasks this home has there (its journal was lost): they are
        run elsewhere, at the cost of an attempt (they may have started there)."""
        taken: list[Task] = []
        for task_id in unknown:
            task = self.book.tasks.get(task_id)
            if task is None or task.site != peer.site_id or task_id in unsent \
                    or task.phase not in (Phase.FORWARDING, Phase.AT_PEER, Phase.RUNNING_AT_PEER):
                continue
            self.book.retry(task, f"site {peer.site_id} no longer knows the task")
            taken.append(task)
        self._migrated(peer.site_id, taken)
        self._wake()

    # ------------------------------------------------------------------ restarts
    def resend_later(self, task: Task) -> None:
        """A recovered task that this home had sent to a peer: sent again once the peer
        answers (idempotent there), rather than run twice."""
        self.book.move(task, Phase.FORWARDING)
        self._reforward.setdefault(task.site, []).append(task)

    def hold(self, task: Task, was_running: bool) -> None:
        """A recovered task forwarded by a peer: its home may have moved it elsewhere meanwhile
        (and it may have finished there). It waits, not run, until the home's link lists it
        again (``confirm``), or cancels it."""
        self.book.move(task, Phase.HELD)
        self._held.setdefault(task.spec.home, {})[task.task_id] = (task, was_running)

    def held(self) -> dict[str, int]:
        return {home: len(tasks) for home, tasks in self._held.items()}

    def confirm(self, home: str, listed: Sequence[str], stop_run: Callable[[Task], None]) -> int:
        """The home ``home`` lists every unfinished task it has here (on its verified link,
        after it (re)opened). Held tasks it lists run; tasks of that home it does not list
        were moved elsewhere (or finished there) and are dropped, journaled, so that no
        restart runs them again. Returns how many were dropped."""
        keep = set(listed)
        held = self._held.pop(home, {})
        moved = [t for t in self.book.tasks.values() if t.spec.home == home and t.task_id not in keep]
        for task in moved:
            stop_run(task)
            self.book.move(task, Phase.DROPPED)
        released = 0
        for task, was_running in held.values():
            if task.phase is not Phase.HELD:
                continue
            released += 1
            if was_running:
                self.book.retry(task, "the gateway stopped while the task was running")
            else:
                self.book.move(task, Phase.QUEUED)
        if held:
            logger.info("home %s confirmed %d of the %d tasks held since the restart", home, released, len(held))
        if moved:
            logger.warning("dropped %d tasks that home %s moved elsewhere (e.g. %s)", len(moved), home,
                           moved[0].task_id)
        return len(moved)
