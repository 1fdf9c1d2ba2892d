"""The driver of a site's task core: it builds the core's parts, owns the event loop's side
(background work, the group commit of each loop turn, recovery at start, draining at stop),
and is what the servicers call.

The parts, one concept each: ``book`` (the tasks and the one transition function),
``intake`` (wire batches in), ``dispatch`` (this site's Ray), ``transfers`` (dataset
arguments), ``federate`` (placement and peers), ``queries`` (what is read). The servicers
call ``intake`` and ``queries`` directly, and the driver for what spans parts. Everything
runs on the gateway's event loop; Ray calls back through ``call_soon_threadsafe``. Only
unfinished tasks are kept in memory; finished ones are read back from the journal.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from intertie.spec import python_version
from intertie_gateway import convert
from intertie_gateway.admission import Capacity
from intertie_gateway.book import Task, TaskBook, site_price
from intertie_gateway.config import GatewayConfig
from intertie_gateway.dispatch import Dispatch, Slots
from intertie_gateway.estimates import Estimates
from intertie_gateway.fairshare import Entitlement
from intertie_gateway.federate import Federate
from intertie_gateway.intake import Intake
from intertie_gateway.journal import RUNNING, Journal, TaskRow
from intertie_gateway.lifecycle import Phase
from intertie_gateway.metrics import CoreSnapshot, Metrics
from intertie_gateway.model import ErrorKind, Failure, Finished, Forgotten, Requeued, TaskSpec
from intertie_gateway.placement import PlacementRecord
from intertie_gateway.policy import PolicyFile
from intertie_gateway.ports import Federation, PeerListener, PeerPort
from intertie_gateway.queries import Queries
from intertie_gateway.runner import RayRunner
from intertie_gateway.sessions import SessionHub
from intertie_gateway.tenancy import Caller
from intertie_gateway.transfers import Transfers

if TYPE_CHECKING:
    from intertie_gateway.dataplane import DataPlane

logger = logging.getLogger(__name__)

# A failed journal write (disk full, I/O error) is retried this often; long enough not to
# flood the log, short enough that results wait little once the disk recovers.
FLUSH_RETRY_S = 1.0


class _MeteredBook(TaskBook):
    """The book, telling the metrics of every run here that ends (the CPU-seconds its metered
    usage reserved, as the ledger records them) and every finish. Only with metrics on (a
    subclass: the book itself stays pure, and a gateway without metrics pays nothing)."""

    def __init__(self, *args: Any, metrics: Metrics, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._metrics = metrics

    def move(self, task: Task, to: Phase, **kwargs: Any) -> None:
        before = len(self.changes)
        super().move(task, to, **kwargs)
        for change in self.changes[before:]:  # (the attempt that ended, metered by the move)
            if isinstance(change, Finished | Requeued | Forgotten) and change.usage is not None:
                self._metrics.task_ran(change.usage.tenant, change.usage.cpu_s_reserved)
        if to.terminal and to is not Phase.DROPPED:
            self._metrics.task_finished(task.spec.tenant, to.name.lower())


def _not_measured(seconds: float, ok: bool) -> None:
    pass


class Scheduler:
    """``address``: where this gateway serves; ``store``: its data plane (None: no datasets);
    ``make_federation``: builds the membership of its peers around the core's listener (None:
    a site without peers); ``metrics``: where the core's metrics go (None: metrics off)."""

    def __init__(self, config: GatewayConfig, journal: Journal, runner: RayRunner, hub: SessionHub, *,
                 address: str = "", store: DataPlane | None = None,
                 make_federation: Callable[[PeerListener[Task]], Federation[Task]] | None = None,
                 metrics: Metrics | None = None) -> None:
        self.config = config
        self.journal = journal
        self.runner = runner
        self.hub = hub
        self.site_id = config.site_id
        self.draining = False
        self._loop = asyncio.get_running_loop()
        self._background: set[asyncio.Task[Any]] = set()  # the loop keeps only weak references
        self._flush_scheduled = False
        self._flush_retry: asyncio.TimerHandle | None = None
        python = python_version()
        draining = self._is_draining
        self.estimates = Estimates()
        self.policy = PolicyFile(config.policy_file, clock=time.monotonic)
        total, largest = self._resources()
        self.slots = Slots(Capacity(total, config.admission_overcommit, largest))
        make_book = TaskBook if metrics is None else functools.partial(_MeteredBook, metrics=metrics)
        self.book = make_book(self.site_id, federated=make_federation is not None, estimates=self.estimates,
                              release=self.slots.release, changed=self._changed,
                              progress=functools.partial(hub.tell, progress=True), clock=time.time,
                              price_per_cpu_hour=site_price(config.labels))
        self._committed = metrics.committed if metrics is not None else _not_measured
        self.transfers = Transfers(self.book, self.slots, store, lambda: self.federate.federation.up_statuses(),
                                   site_id=self.site_id, pull_timeout_s=config.pull_timeout_s, spawn=self._spawn,
                                   done=self._commit_and_pump, draining=draining, isolated=config.auth == "token",
                                   on_pulled=metrics.pulled if metrics is not None else None)
        self.dispatch = Dispatch(self.book, self.slots, runner, site_id=self.site_id,
                                 max_payload_bytes=config.max_payload_bytes, inputs_for=self.transfers.inputs_for,
                                 functions=journal.function_payload, wake=self.pump, loop=self._loop,
                                 limits=self._running_limits)
        self.federate = Federate(self.book, self.dispatch, self.estimates, config=config, python=python,
                                 resident=store.owners if store is not None else dict,
                                 functions=journal.function_payload, draining=draining, wake=self.pump,
                                 make_federation=make_federation,
                                 on_event=metrics.federation_event if metrics is not None else None)
        self.intake = Intake(self.book, journal, hub, config=config, python=python,
                             feasibility=self.federate.feasibility, restore=self._restore, commit=self.flush,
                             pump=self.pump, spawn=self._spawn, policy=self.policy.current,
                             on_refused=metrics.refused_at_intake if metrics is not None else None)
        self.queries = Queries(self.book, journal, hub, self.dispatch, self.federate, self.estimates, config=config,
                               python=python, address=address, store=store, draining=draining, commit=self.flush,
                               policy=self.policy.current)
        if metrics is not None:
            metrics.read_core(self.snapshot)

    def _running_limits(self, tenant: str) -> Entitlement:
        return self.policy.current().limits(tenant).entitlement

    @property
    def federation(self) -> Federation[Task]:
        return self.federate.federation

    def _is_draining(self) -> bool:
        return self.draining

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Runs ``coro`` in the background, referenced until it is done."""
        task = self._loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # ------------------------------------------------------------------ the loop turn
    def pump(self) -> None:
        """Places what waits for a placement, then starts what fits here."""
        if self.draining:
            return
        if self.book.unplaced:
            self.federate.place()
        self.dispatch.run_queue()

    def _commit_and_pump(self) -> None:
        self.flush()
        self.pump()

    def _changed(self) -> None:
        """The first journal change of a turn: the commit runs at the end of the turn."""
        if not self._flush_scheduled and self._flush_retry is None:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Group commit of the state changes of one loop turn, then their finishes are told.

        A result is journaled before the client hears of it, so a crash between the two
        leaves it fetchable rather than lost. A failed commit keeps its changes, and holds
        their updates, until a retry goes through."""
        self._flush_scheduled = False
        book = self.book
        if book.changes:
            started = time.perf_counter()
            try:
                self.journal.write(book.changes)
            except Exception:
                self._committed(time.perf_counter() - started, False)
                logger.exception("journal write of %d changes failed; retrying in %g s", len(book.changes),
                                 FLUSH_RETRY_S)
                if self._flush_retry is None:
                    self._flush_retry = self._loop.call_later(FLUSH_RETRY_S, self._retry_flush)
                return
            self._committed(time.perf_counter() - started, True)
            book.changes = []
            if self._flush_retry is not None:  # went through before the retry was due
                self._flush_retry.cancel()
                self._flush_retry = None
        updates, book.updates = book.updates, []
        for sessions, update in updates:
            self.hub.tell(sessions, update)

    def _retry_flush(self) -> None:
        self._flush_retry = None
        self.flush()

    # ------------------------------------------------------------------ what the servicers call
    def quote(self, spec: TaskSpec, args_bytes: int) -> PlacementRecord:
        return self.federate.quote(spec, args_bytes)

    def steal(self, thief_id: str, max_tasks: int) -> int:
        return self.federate.steal(thief_id, max_tasks)

    async def verify_link(self, site_id: str, session_id: str) -> tuple[str, str]:
        """Whether ``site_id`` (a configured peer) confirms it opened a link here with
        ``session_id``: ("ok", ""), ("refused", why) or ("unreachable", why)."""
        return await self.federation.verify(site_id, session_id)

    def owns_link(self, site_id: str, session_id: str) -> bool:
        return self.federation.owns_link(site_id, session_id)

    def cancel(self, task_ids: Sequence[str], why: str = "was cancelled") -> list[str]:
        cancelled = []
        remote: dict[PeerPort[Task], list[str]] = {}
        for task_id in task_ids:
            task = self.book.get(task_id)
            if task is None:
                continue
            if task.ref is not None:
                self.dispatch.stop_run(task)
            elif task.site and task.site != self.site_id:
                peer = self.federation.peer_for(task.site)
                if peer is not None:
                    remote.setdefault(peer, []).append(task_id)
            self.book.move(task, Phase.CANCELLED, error=Failure(ErrorKind.CANCELLED, f"task {task_id} {why}"))
            cancelled.append(task_id)
        for peer, ids in remote.items():
            self._spawn(peer.cancel(ids))
        if cancelled:
            self._commit_and_pump()
        return cancelled

    def reconcile(self, home: str, session_id: str, listed: Sequence[str]) -> tuple[list[str], int]:
        """The home ``home`` lists every unfinished task it has here (see
        ``Federate.confirm``). Returns (listed ids unknown here, how many were dropped)."""
        dropped = self.federate.confirm(home, listed, self.dispatch.stop_run)
        unknown = self.queries.subscribe(session_id, listed, Caller(peer=home))
        self._commit_and_pump()
        return unknown, dropped

    # ------------------------------------------------------------------ start and stop
    def recover(self) -> tuple[int, int]:
        """Puts every unfinished task of the journal back. Returns (requeued, failed)."""
        requeued = failed = 0
        for row in self.journal.unfinished():
            if self._restore(row, "the gateway stopped while the task was running").phase.terminal:
                failed += 1
            else:
                requeued += 1
        for home, count in self.federate.held().items():
            logger.info("holding %d tasks forwarded by %s until %s confirms them", count, home, home)
        self._commit_and_pump()
        return requeued, failed

    def _restore(self, row: TaskRow, why_running: str) -> Task:
        """Puts an unfinished task of the journal back in memory, where the row says it is."""
        task = Task(convert.spec_from_journal(row.spec, row.args), row.submitted_at)
        task.attempts = row.attempts
        task.history = row.history
        task.site = row.site
        task.placements = list(convert.placements_from_blob(row.placements))
        if not task.home_here:
            self.federate.hold(task, row.state == RUNNING)
        elif row.site and row.site != self.site_id and self.book.federated:
            self.federate.resend_later(task)
        elif self.book.federated and not row.site:
            self.book.move(task, Phase.UNPLACED)
        elif row.state == RUNNING:
            self.book.move(task, Phase.RUNNING)
            self.book.retry(task, why_running)
        else:
            self.book.move(task, Phase.QUEUED)
        return task

    def _resources(self) -> tuple[dict[str, float], dict[str, float]]:
        """Ray's total and the most any one node has."""
        return self.runner.total_resources(), self.runner.largest_node()

    def refresh_resources(self) -> None:
        """Ray's view of capacity is read again (nodes of an attached cluster come and go)."""
        self.slots.capacity.update_total(*self._resources())
        self.runner.refresh_pool()
        self.pump()

    def drain(self) -> None:
        """Clean shutdown: tasks running here go back to the queue without spending an attempt
        (Ray's shutdown stops them; the next start runs them). One at a peer goes on there."""
        self.draining = True
        for task in self.dispatch.tasks_running_here():
            self.book.move(task, Phase.QUEUED, refund=True)
        self.transfers.close()
        self.flush()

    def snapshot(self) -> CoreSnapshot:
        """What a metrics scrape reads of the core (on the loop): the unfinished tasks by phase
        and tenant, the queue's length, the tasks running here."""
        tasks = Counter((t.phase.name.lower(), t.spec.tenant) for t in self.book.tasks.values())
        return CoreSnapshot(tasks, len(self.book.queue), self.dispatch.slots.running)

    def expire_results(self) -> int:
        return self.journal.expire(time.time() - self.config.result_ttl_s)
