"""The site's task lifecycle: accept (journal first), queue, admit into Ray, finish, recover.

Everything here runs on the gateway's event loop; Ray calls back through
``call_soon_threadsafe``. Only unfinished tasks are kept in memory; finished ones
are read back from the journal.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import logging
import platform
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from intertie.spec import python_version
from intertie.v1 import common_pb2, site_pb2, tasks_pb2
from intertie_gateway import journal as jr
from intertie_gateway.admission import Capacity
from intertie_gateway.config import GatewayConfig
from intertie_gateway.datasets import DatasetError
from intertie_gateway.journal import Journal
from intertie_gateway.placement import Decision, Demand, Placer, SiteView, Weights, rejection
from intertie_gateway.ports import Federation, PeerPort
from intertie_gateway.runner import PREEMPTED, RETRY, RayRunner, Running
from intertie_gateway.sessions import SessionHub
from intertie_gateway.validate import MAX_NAME_CHARS, check_spec, clip, ray_request

if TYPE_CHECKING:
    from intertie_gateway.dataplane import DataPlane

logger = logging.getLogger(__name__)
K = common_pb2.ErrorKind

# Batches of accepted tasks larger than this are journaled on a thread, so that one
# big upload does not stall every other client on the event loop.
INLINE_JOURNAL_BYTES = 1 << 20
# When the head of the queue does not fit, look this far behind it for one that does.
QUEUE_SCAN_DEPTH = 32
# A placer (filtered, scored sites per task shape) is reused for this long.
PLACER_REFRESH_S = 1.0
# Fusing queued tasks of one function into one Ray call: only when this site's tasks run
# shorter than this on average, and at most this many per call.
FUSE_MAX_RUN_S = 0.005
FUSE_MAX_TASKS = 32
# Run-time estimates per function: weight of the newest run, and how many functions are kept.
RUN_EWMA_ALPHA = 0.2
MAX_RUN_ESTIMATES = 10_000
# Throughput is reported over this window.
THROUGHPUT_WINDOW_S = 60
# Datasets fetched from other sites at once (each transfer holds a thread).
MAX_TRANSFERS = 4
# A failed journal write (disk full, I/O error) is retried this often; long enough not to
# flood the log, short enough that results wait little once the disk recovers.
FLUSH_RETRY_S = 1.0


class Task:
    __slots__ = ("task_id", "spec", "request", "state", "attempts", "site", "submitted_at", "started_at",
                 "ref", "timer", "sessions", "history", "holding", "placements", "exclude", "resent", "fuse", "group")

    def __init__(self, spec: tasks_pb2.TaskSpec, submitted_at: float) -> None:
        self.task_id = spec.task_id
        self.spec = spec
        self.request = ray_request(spec.resources, spec.constraints.accelerator)
        self.state = jr.QUEUED
        self.attempts = 0
        self.site = ""
        self.submitted_at = submitted_at
        self.started_at = 0.0
        self.ref: Any = None
        self.timer: asyncio.TimerHandle | None = None
        self.sessions: set[str] | None = None
        self.history: list[dict[str, object]] = []
        self.holding = False  # occupies admission capacity
        self.placements: list[tasks_pb2.Placement] = []
        self.exclude: set[str] = set()  # sites that refused it
        self.resent = False  # re-forwarded once with its function after a NOT_FOUND
        self.fuse = spec.timeout_s == 0 and not spec.inputs  # may share one Ray call with others
        self.group: Sequence[Task] = ()  # the tasks of its last fused Ray call

    def demand(self, run_s: float | None = None) -> Demand:
        c = self.spec.constraints
        return Demand(self.request, python_version=self.spec.python_version, arch=c.arch, site=c.site,
                      labels=dict(c.labels), input_bytes=len(self.spec.args), exclude=frozenset(self.exclude),
                      run_s=run_s, inputs={i.id: i.num_bytes for i in self.spec.inputs},
                      holders={i.id: i.site for i in self.spec.inputs})

    @property
    def home_here(self) -> bool:
        """Accepted from a client (not forwarded by a peer): this gateway places it."""
        return not self.spec.home

    def add_session(self, session_id: str) -> None:
        if session_id:
            if self.sessions is None:
                self.sessions = set()
            self.sessions.add(session_id)


class Scheduler:
    def __init__(self, config: GatewayConfig, journal: Journal, runner: RayRunner, hub: SessionHub) -> None:
        self.config = config
        self.journal = journal
        self.runner = runner
        self.hub = hub
        self.site_id = config.site_id
        self.python = python_version()
        self.address = ""
        self.flight_address = ""
        self.store: DataPlane | None = None
        self._pulling: set[str] = set()  # tasks waiting for a dataset to arrive
        self._pulls: dict[str, asyncio.Future[Any]] = {}  # dataset id -> its transfer here, under way
        self._reading: Counter[str] = Counter()  # dataset id -> running tasks that read it
        # Transfers block a thread each while they last; their own pool keeps them from
        # starving the journal's (the loop's default executor).
        self._transfers = ThreadPoolExecutor(MAX_TRANSFERS, thread_name_prefix="intertie-pull")
        self.capacity = Capacity(runner.total_resources(), config.admission_overcommit)
        self.tasks: dict[str, Task] = {}
        self.queue: deque[Task] = deque()
        self.running = 0
        self._known_functions = journal.function_digests()
        self._writes: list[tuple[str, Sequence[object]]] = []
        self._events: list[tuple[set[str] | None, tasks_pb2.TaskEvent]] = []
        self._flush_scheduled = False
        self._flush_retry: asyncio.TimerHandle | None = None
        self._finished_buckets = [0] * THROUGHPUT_WINDOW_S
        self._bucket_second = 0
        self._loop = asyncio.get_running_loop()
        self.draining = False
        self.membership: Federation[Task] | None = None  # set by the composition root when peers are configured
        self.weights = Weights(price=config.price_weight, carbon=config.carbon_weight,
                               default_bandwidth=config.default_bandwidth)
        self._unplaced: list[Task] = []  # home tasks waiting for a placement decision
        # Home tasks only sites that are down now could run: placed again on the next heartbeat
        # or when a peer comes up, not on every pump.
        self._waiting: list[Task] = []
        self._reforward: dict[str, list[Task]] = {}  # recovered tasks that were at a peer
        # Recovered tasks forwarded by a peer (home -> task id -> (task, was running)): not
        # run until their home confirms them.
        self._held: dict[str, dict[str, tuple[Task, bool]]] = {}
        self._started_at = time.time()
        self._run_estimates: dict[str, float] = {}
        self._placer: Placer | None = None
        self._placer_built = 0.0
        self._background: set[asyncio.Task[Any]] = set()  # the loop keeps only weak references

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Runs ``coro`` in the background, referenced until it is done."""
        task = self._loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # ------------------------------------------------------------------ accept
    async def submit(self, request: tasks_pb2.SubmitRequest, *, peer: str = "") -> list[tasks_pb2.TaskAck]:
        """Validates, journals and queues a batch; one ack per task, in order.

        ``peer``: the site whose verified link the batch came on ("" for a client). Only
        there is ``home`` honoured, and it is the link's site whatever the spec says."""
        now = time.time()
        bad_functions: dict[str, common_pb2.Error] = {}
        new_functions: list[tuple[str, str, bytes]] = []
        for fn in request.functions:
            if len(fn.payload) > self.config.max_payload_bytes:
                bad_functions[fn.digest] = common_pb2.Error(
                    kind=K.ERROR_KIND_PAYLOAD_TOO_LARGE,
                    message=f"function {clip(fn.name or fn.digest)} is {len(fn.payload)} bytes pickled, over this "
                            f"site's limit of {self.config.max_payload_bytes} bytes")
            elif hashlib.sha256(fn.payload).hexdigest() != fn.digest:
                bad_functions[fn.digest] = common_pb2.Error(
                    kind=K.ERROR_KIND_INVALID_ARGUMENT,
                    message=f"function {clip(fn.name or fn.digest)}: payload does not match its sha256 digest")
            elif fn.digest not in self._known_functions:
                new_functions.append((fn.digest, clip(fn.name, MAX_NAME_CHARS), fn.payload))
        offered = {d for d, _, _ in new_functions}

        acks: list[tasks_pb2.TaskAck] = []
        accepted: list[tasks_pb2.TaskSpec] = []
        seen: set[str] = set()
        nbytes = 0
        never_runs = self._feasibility()
        for spec in request.tasks:
            error = None
            if peer:
                spec.home = peer
            elif spec.home:
                error = common_pb2.Error(kind=K.ERROR_KIND_INVALID_ARGUMENT, message=(
                    f"task {clip(spec.task_id)}: home is set by the gateway a task was forwarded from, not by a "
                    "client"))
            federated = self.membership is not None and not spec.home
            if error is None:
                error = check_spec(spec, max_payload_bytes=self.config.max_payload_bytes,
                                   python_version="" if federated else self.python, site_id=self.site_id)
            if error is None:
                error = bad_functions.get(spec.function_digest)
            if error is None and spec.function_digest not in self._known_functions \
                    and spec.function_digest not in offered:
                error = common_pb2.Error(kind=K.ERROR_KIND_NOT_FOUND, message=(
                    f"task {spec.task_id}: function {spec.function_digest[:12]} is unknown to site "
                    f"{self.site_id!r}; send its bytes with the task"))
            if error is None:
                why = never_runs(spec, federated)
                if why is not None:
                    error = common_pb2.Error(kind=K.ERROR_KIND_PLACEMENT, message=f"task {spec.task_id}: {why}")
            if error is not None:
                acks.append(tasks_pb2.TaskAck(task_id=clip(spec.task_id), accepted=False, error=error))
                continue
            acks.append(tasks_pb2.TaskAck(task_id=spec.task_id, accepted=True))
            if spec.task_id in seen:
                continue
            seen.add(spec.task_id)
            live = self.tasks.get(spec.task_id)
            if live is not None:  # a resubmission of a task in flight: idempotent
                live.add_session(request.session_id)
                continue
            accepted.append(spec)
            nbytes += len(spec.args)

        if not accepted and not new_functions:
            return acks
        rows = [(s.task_id, s.SerializeToString()) for s in accepted]
        if nbytes + sum(len(p) for _, _, p in new_functions) > INLINE_JOURNAL_BYTES:
            # One step that cancelling the caller (its stream closed, its deadline passed) does
            # not split: tasks journaled but not registered would be acknowledged on a resend
            # (found journaled) and never run.
            await asyncio.shield(self._spawn(self._accept_off_loop(request.session_id, new_functions, accepted,
                                                                   rows, now)))
        else:
            self._register(request.session_id, new_functions, accepted,
                           self.journal.accept(new_functions, rows, now), now)
        return acks

    async def _accept_off_loop(self, session_id: str, new_functions: list[tuple[str, str, bytes]],
                               accepted: list[tasks_pb2.TaskSpec], rows: list[tuple[str, bytes]], now: float) -> None:
        existed = await self._loop.run_in_executor(None, self.journal.accept, new_functions, rows, now)
        self._register(session_id, new_functions, accepted, existed, now)

    def _register(self, session_id: str, new_functions: list[tuple[str, str, bytes]],
                  accepted: list[tasks_pb2.TaskSpec], existed: set[str], now: float) -> None:
        """Journaled: from here on the tasks survive a crash, and may be acknowledged."""
        for digest, _, _ in new_functions:
            self._known_functions.add(digest)  # its bytes are read back from the journal when needed
        journaled_before: list[str] = []
        for spec in accepted:
            task = self.tasks.get(spec.task_id)
            if task is not None:  # a concurrent submit of the same task registered it meanwhile
                task.add_session(session_id)
                continue
            if spec.task_id in existed:
                journaled_before.append(spec.task_id)
                continue
            task = Task(spec, now)
            task.add_session(session_id)
            self.tasks[task.task_id] = task
            if self.membership is not None and task.home_here:
                self._unplaced.append(task)
            else:
                task.site = self.site_id
                self.queue.append(task)
        if journaled_before:
            self._rejoin(session_id, journaled_before)
        self.pump()

    def _rejoin(self, session_id: str, task_ids: list[str]) -> None:
        """Resubmitted tasks that were journaled before and are not in memory: a finished one is
        answered from the journal; an unfinished one (its first submit journaled it but never
        registered it) is put back as at a restart."""
        if self._writes:
            self.flush()
        rows = self.journal.get_many(task_ids)
        for task_id in task_ids:
            row = rows.get(task_id)
            if row is None:
                continue
            if row.state in jr.TERMINAL:
                self.hub.push({session_id}, _event_from_row(row))
            elif not self._writes:  # unless the flush failed: then the row may be stale
                logger.warning("task %s: journaled but not queued; restoring it", task_id)
                self._restore(row, "lost before it started").add_session(session_id)

    def _feasibility(self) -> Callable[[tasks_pb2.TaskSpec, bool], str | None]:
        """A check for one batch: why no site can ever run a task (it fails before it is
        journaled), or None. The site views and placer are built once, on first use."""
        local = functools.cache(self.local_view)

        @functools.cache
        def everywhere() -> Placer:
            assert self.membership is not None
            return Placer([local(), *self.membership.views()], self.weights, ignore_state=True)

        def never_runs(spec: tasks_pb2.TaskSpec, federated: bool) -> str | None:
            demand = Task(spec, 0.0).demand()
            if not federated:
                why = rejection(local(), demand, ignore_state=True)
                return None if why is None else f"no site can run it: site {self.site_id!r} {why}"
            decision = everywhere().place(demand, commit=False)
            return None if decision.site_id is not None else decision.why_not()

        return never_runs

    # ------------------------------------------------------------------ placement
    def local_view(self) -> SiteView:
        return SiteView(
            site_id=self.site_id, state="draining" if self.draining else "up", arch=_ARCH,
            python_version=self.python, total=self.capacity.total, free=self.capacity.free(),
            queued=len(self.queue), running=self.running, mean_run_s=self.capacity.mean_run_s,
            labels=self.config.labels, max_payload_bytes=self.config.max_payload_bytes, local=True,
            resident=dict.fromkeys(self.store.ids(), 0) if self.store is not None else {})

    def _current_placer(self) -> Placer:
        """The placer of this catalogue epoch. Rebuilt from fresh views once the peers'
        statuses of a heartbeat are in (``catalogue_changed``), when a peer goes up or down,
        or every PLACER_REFRESH_S: building one filters and scores every site (O(sites) per
        task shape), reusing it costs O(log sites) per task."""
        assert self.membership is not None
        now = time.monotonic()
        placer = self._placer
        if placer is None or now - self._placer_built > PLACER_REFRESH_S:
            placer = self._placer = Placer([self.local_view(), *self.membership.views()], self.weights)
            self._placer_built = now
        else:  # this site's own load is known exactly (and may have fallen: the placer re-keys it)
            placer.refresh([self.local_view()])
        return placer

    def catalogue_changed(self) -> None:
        """The peers' statuses of a heartbeat are in: the next placement reads them (a kept
        placer would place on their earlier queues, pending counts and round trips)."""
        self._placer = None

    def _place_unplaced(self) -> None:
        assert self.membership is not None
        tasks, self._unplaced = self._unplaced, []
        placer = self._current_placer()
        by_peer: dict[str, list[Task]] = {}
        waiting: list[Task] = []
        now = time.time()
        ever_placer: Placer | None = None
        for task in tasks:
            if task.state != jr.QUEUED:
                continue  # cancelled while unplaced
            demand = task.demand(self._run_estimates.get(task.spec.function_digest))
            decision = placer.place(demand)
            if decision.site_id is None:
                if ever_placer is None:
                    ever_placer = Placer(placer.sites, self.weights, ignore_state=True)
                ever = ever_placer.place(demand, commit=False)
                if ever.site_id is not None:  # only sites that are down now could run it
                    waiting.append(task)
                    continue
                self._finish(task, jr.FAILED, error=common_pb2.Error(
                    kind=K.ERROR_KIND_PLACEMENT, message=f"task {task.task_id}: {decision.why_not()}"))
                continue
            reason = "lowest estimated completion" if decision.feasible_count > 1 else "only site that can run it"
            self._assign(task, decision.site_id, _placement_proto(decision, reason, now), by_peer)
        self._waiting.extend(waiting)
        for site_id, batch in by_peer.items():
            self._send_to_peer(site_id, batch)

    def _assign(self, task: Task, site_id: str, record: tasks_pb2.Placement,
                by_peer: dict[str, list[Task]]) -> None:
        task.placements.append(record)
        task.site = site_id
        if site_id == self.site_id:
            self._write(jr.Journal.placed(task.task_id, task.attempts, site_id, _placements_blob(task)))
            self.queue.append(task)
            return
        task.attempts += 1  # an attempt at the peer (a local one is counted when it starts)
        task.started_at = time.time()
        self._write(jr.Journal.placed(task.task_id, task.attempts, site_id, _placements_blob(task)))
        by_peer.setdefault(site_id, []).append(task)

    def _send_to_peer(self, site_id: str, batch: list[Task]) -> None:
        assert self.membership is not None
        peer = self.membership.peer_for(site_id)
        if peer is None:
            for task in batch:
                task.exclude.add(site_id)
            self.on_forward_failed(None, batch, f"site {site_id} is not a peer of {self.site_id}")
            return
        peer.forward(batch)

    def _unassign(self, task: Task, why: str, *, spent: bool) -> None:
        """A forwarded task came back unstarted (refused, or never delivered)."""
        task.history.append({"attempt": task.attempts, "site": task.site, "started_at": task.started_at,
                             "ended_at": time.time(), "outcome": why})
        if not spent:
            task.attempts -= 1
        task.state = jr.QUEUED
        task.site = ""
        self._write(jr.Journal.requeued(task.task_id, task.attempts, task.history))
        self._unplaced.append(task)

    def on_forward_acks(self, peer: PeerPort[Task], batch: Sequence[Task], acks: Sequence[tasks_pb2.TaskAck]) -> None:
        refused = {a.task_id: a.error for a in acks if not a.accepted}
        resend: list[Task] = []
        for task in batch:
            error = refused.get(task.task_id)
            if error is None or task.state in jr.TERMINAL or task.site != peer.site_id:
                continue
            if error.kind == K.ERROR_KIND_NOT_FOUND and not task.resent:
                task.resent = True  # the peer lost its function store (restart): send the bytes again
                resend.append(task)
                continue
            task.exclude.add(peer.site_id)
            self._unassign(task, f"refused by site {peer.site_id}: {error.message}", spent=False)
        if resend:
            peer.forward(resend)
        self.pump()

    def on_forward_failed(self, peer: PeerPort[Task] | None, batch: Sequence[Task], why: str) -> None:
        for task in batch:
            if task.state in jr.TERMINAL or (peer is not None and task.site != peer.site_id):
                continue
            if peer is not None:
                task.exclude.add(peer.site_id)
            self._unassign(task, why, spent=False)
        self.pump()

    def on_peer_events(self, peer: PeerPort[Task], events: Sequence[tasks_pb2.TaskEvent]) -> None:
        for event in events:
            task = self.tasks.get(event.task_id)
            # Only the site the task is at now may report on it: a site it was moved away
            # from (down, then back) may still finish it, and that late duplicate is ignored.
            if task is None or task.site != peer.site_id or task.home_here is False:
                continue
            if event.state == jr.RUNNING:
                if task.state == jr.QUEUED:
                    task.state = jr.RUNNING
                    task.started_at = time.time()
                    self._write(jr.Journal.started(task.task_id, task.attempts, peer.site_id, task.started_at))
                    if task.sessions:
                        self.hub.push(task.sessions, tasks_pb2.TaskEvent(
                            task_id=task.task_id, state=jr.RUNNING, site=peer.site_id, attempt=task.attempts),
                            progress=True)
            elif event.state in jr.TERMINAL:
                self._finish(task, event.state, result=event.result if event.state == jr.SUCCEEDED else None,
                             error=event.error if event.HasField("error") else None, run_s=event.run_s)
        self.pump()

    def on_peer_down(self, peer: PeerPort[Task]) -> None:
        """Every unfinished task at a peer that went down is placed again: at the cost of an
        attempt when the peer had it, free when it never got there."""
        self._placer = None
        undelivered = {id(t) for t in peer.abandon()}
        lost = [t for t in self.tasks.values() if t.site == peer.site_id and t.home_here
                and t.state in (jr.QUEUED, jr.RUNNING)]
        for task in lost:
            if id(task) in undelivered:
                self._unassign(task, f"site {peer.site_id} went down before it acknowledged the task", spent=False)
            else:
                self._retry_or_fail(task, f"site {peer.site_id} went down")
        if lost:
            logger.warning("site %s went down: placing its %d unfinished tasks again", peer.site_id, len(lost))
        self.pump()

    def on_peer_up(self, peer: PeerPort[Task]) -> None:
        self._placer = None
        self._unplaced.extend(self._waiting)
        self._waiting = []
        tasks = [t for t in self._reforward.pop(peer.site_id, []) if t.state not in jr.TERMINAL]
        if tasks:  # forwarded before this gateway restarted: idempotent at the peer
            logger.info("re-sending %d tasks to %s after a restart", len(tasks), peer.site_id)
            peer.forward(tasks)
        self.pump()

    def retry_unplaced(self) -> None:
        """Called every heartbeat: tasks waiting for a site that was down get another go."""
        deadline = self._started_at + self.config.heartbeat_s * (self.config.down_after + 2)
        if self._reforward and time.time() > deadline:
            for site_id, tasks in list(self._reforward.items()):
                del self._reforward[site_id]
                for task in tasks:
                    if task.state not in jr.TERMINAL:
                        self._retry_or_fail(task, f"site {site_id} did not come back after this gateway restarted")
        if self._waiting:
            self._unplaced.extend(self._waiting)
            self._waiting = []
        if self._unplaced:
            self.pump()

    def reconcile(self, home: str, session_id: str, listed: Sequence[str]) -> tuple[list[str], int]:
        """The home ``home`` lists every unfinished task it has here (on its verified link,
        after it (re)opened). Held tasks it lists run; tasks of that home it does not list
        were moved elsewhere (or finished there) and are dropped, journaled, so that no
        restart runs them again. Returns (listed ids unknown here, how many were dropped)."""
        keep = set(listed)
        held = self._held.pop(home, {})
        moved = [t for t in self.tasks.values()
                 if t.spec.home == home and t.task_id not in keep and t.state not in jr.TERMINAL]
        for task in moved:
            self._drop(task)
        released = 0
        for task, was_running in held.values():
            if task.task_id not in keep or task.state in jr.TERMINAL:
                continue
            released += 1
            if was_running:
                self._retry_or_fail(task, "the gateway stopped while the task was running")
            else:
                self.queue.append(task)
        if held:
            logger.info("home %s confirmed %d of the %d tasks held since the restart", home, released, len(held))
        if moved:
            logger.warning("dropped %d tasks that home %s moved elsewhere (e.g. %s)", len(moved), home,
                           moved[0].task_id)
        unknown = self.subscribe(session_id, listed)
        self.flush()
        self.pump()
        return unknown, len(moved)

    def on_reconciled(self, peer: PeerPort[Task], unknown: Sequence[str], unsent: set[str]) -> None:
        """A peer does not know tasks this home has there (its journal was lost): they are
        run elsewhere, at the cost of an attempt (they may have started there)."""
        for task_id in unknown:
            task = self.tasks.get(task_id)
            if task is None or task.site != peer.site_id or task.state in jr.TERMINAL or task_id in unsent:
                continue
            self._retry_or_fail(task, f"site {peer.site_id} no longer knows the task")
        self.pump()

    async def verify_link(self, site_id: str, session_id: str) -> tuple[str, str]:
        """Whether ``site_id`` (a configured peer) confirms it opened a link here with
        ``session_id``: ("ok", ""), ("refused", why) or ("unreachable", why)."""
        if self.membership is None:
            return "refused", f"site {self.site_id!r} has no peers configured"
        return await self.membership.verify(site_id, session_id)

    def owns_link(self, site_id: str, session_id: str) -> bool:
        return self.membership is not None and self.membership.owns_link(site_id, session_id)

    def tasks_at(self, site_id: str) -> list[str]:
        return [t.task_id for t in self.tasks.values() if t.site == site_id and t.home_here]

    def function_bytes(self, digest: str) -> bytes | None:
        return self.journal.function_payload(digest)

    def idle_slots(self) -> int:
        """How many queued tasks this site could start at once right now (0 unless idle)."""
        if self.draining or any(t.state == jr.QUEUED for t in self.queue):
            return 0
        free_cpu = self.capacity.total.get("CPU", 0.0) - self.capacity.in_use.get("CPU", 0.0)
        return max(0, int(free_cpu)) * 2

    def _movable(self) -> list[Task]:
        """Queued home tasks beyond what this site starts next: what an idle peer may take."""
        slots = max(1, int(self.capacity.total.get("CPU", 1.0)))
        waiting = [t for t in self.queue if t.state == jr.QUEUED and t.home_here and not t.spec.constraints.site]
        return waiting[slots:]

    def steal(self, thief_id: str, max_tasks: int) -> int:
        """An idle peer asks for work: forward it queued tasks it can run, newest first."""
        peer = self.membership.peer_for(thief_id) if self.membership is not None else None
        view = peer.view() if peer is not None and peer.up else None
        if view is None or max_tasks <= 0:
            return 0
        chosen: list[Task] = []
        for task in reversed(self._movable()):
            if rejection(view, task.demand()) is None:
                chosen.append(task)
                if len(chosen) >= max_tasks:
                    break
        if not chosen:
            return 0
        taken = {id(t) for t in chosen}
        self.queue = deque(t for t in self.queue if id(t) not in taken)
        now = time.time()
        by_peer: dict[str, list[Task]] = {}
        for task in chosen:
            self._assign(task, thief_id, tasks_pb2.Placement(
                site=thief_id, reason=f"moved from {self.site_id}: idle site {thief_id} asked for work",
                decided_at=now), by_peer)
        self._send_to_peer(thief_id, by_peer[thief_id])
        return len(chosen)

    def quote(self, spec: tasks_pb2.TaskSpec, args_bytes: int) -> tasks_pb2.Placement:
        task = Task(spec, 0.0)
        demand = task.demand(self._run_estimates.get(spec.function_digest))
        if args_bytes:
            demand = dataclasses.replace(demand, input_bytes=args_bytes)
        views = [self.local_view(), *(self.membership.views() if self.membership is not None else [])]
        decision = Placer(views, self.weights).rank(demand)
        return _placement_proto(decision, "quote: every site that can run it, best first", time.time())

    # ------------------------------------------------------------------ dispatch
    def pump(self) -> None:
        if self._unplaced and not self.draining:
            self._place_unplaced()
        queue = self.queue
        while queue:
            task = queue[0]
            if task.state != jr.QUEUED:
                queue.popleft()
                continue
            if self.draining:
                return
            if self.capacity.fits(task.request):
                queue.popleft()
                if task.spec.inputs or task.spec.returns_dataset:
                    self._launch(task)
                    continue
                group = self._fusable_behind(task)
                if group:
                    self._start_group([task, *group])
                else:
                    self._start(task)
                continue
            # The head waits (e.g. for a GPU); let a smaller task behind it through.
            for i in range(1, min(len(queue), QUEUE_SCAN_DEPTH)):
                other = queue[i]
                if other.state == jr.QUEUED and self.capacity.fits(other.request):
                    del queue[i]
                    self._launch(other)
                    break
            else:
                return

    def _launch(self, task: Task) -> None:
        """Starts a task alone, once its dataset arguments are here (else it is parked,
        still QUEUED, while they are fetched)."""
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
        if (not head.fuse or not slots or mean is None or mean > FUSE_MAX_RUN_S
                or len(self.queue) < 2 * slots or not self.runner.pooled(head.request)):
            return []
        # Keep several calls queued per worker, so none idles while its results come back.
        size = min(FUSE_MAX_TASKS, len(self.queue) // slots, self.capacity.max_count // (slots * 4)) - 1
        group: list[Task] = []
        queue = self.queue
        while queue and len(group) < size:
            other = queue[0]
            if (other.state != jr.QUEUED or not other.fuse or other.spec.function_digest != head.spec.function_digest
                    or other.request != head.request or other.spec.inputs or other.spec.returns_dataset
                    or not self.capacity.fits(other.request)):
                break
            group.append(queue.popleft())
            self.capacity.acquire(other.request)  # counted now so fits() sees it; released per task
        for other in group:
            self.capacity.release(other.request)
        return group

    def _ensure_function(self, task: Task) -> bool:
        digest = task.spec.function_digest
        if not self.runner.has_function(digest):
            payload = self.journal.function_payload(digest)
            if payload is None:
                self._finish(task, jr.FAILED, error=common_pb2.Error(
                    kind=K.ERROR_KIND_INTERNAL, message=f"function {digest[:12]} is missing from the journal"))
                return False
            self.runner.put_function(digest, payload)
        return True

    def _mark_started(self, task: Task) -> int:
        task.attempts += 1
        task.state = jr.RUNNING
        task.site = self.site_id
        task.started_at = time.time()
        task.holding = True
        self.capacity.acquire(task.request)
        self.running += 1
        self._write(jr.Journal.started(task.task_id, task.attempts, self.site_id, task.started_at))
        if task.sessions:
            self.hub.push(task.sessions, tasks_pb2.TaskEvent(
                task_id=task.task_id, state=jr.RUNNING, site=self.site_id, attempt=task.attempts), progress=True)
        return task.attempts

    def _start_group(self, tasks: list[Task]) -> None:
        """Several queued tasks of one function in one call to a pooled worker."""
        if not self._ensure_function(tasks[0]):
            for task in tasks[1:]:
                self.queue.appendleft(task)
            return
        attempts = [self._mark_started(t) for t in tasks]
        loop = self._loop
        try:
            running = self.runner.submit_many(tasks[0].spec.function_digest,
                                              [(t.spec.name, t.spec.args, t.spec.batch, t.task_id) for t in tasks],
                                              tasks[0].request)
        except Exception as exc:
            logger.exception("a group of %d tasks: Ray did not take it", len(tasks))
            for task in tasks:
                self._finish(task, jr.FAILED, error=common_pb2.Error(
                    kind=K.ERROR_KIND_INTERNAL, message=f"site {self.site_id!r} could not start the task: {exc}"))
            return
        for task in tasks:
            task.ref = running
            task.group = tasks
        running.ref.future().add_done_callback(
            lambda fut: loop.call_soon_threadsafe(self._on_group_done, tasks, attempts, running, fut))

    def _inputs_for(self, task: Task) -> dict[str, str] | None:
        """Where the worker reads each dataset argument (a local path it memory-maps, or
        ``flight://HOST:PORT`` of this site's endpoint); None while some are being fetched
        from the sites that hold them (the task waits, still QUEUED, and comes back)."""
        paths: dict[str, str] = {}
        missing = []
        for item in task.spec.inputs:
            where = self.store.location(item.id) if self.store is not None else None
            if where is None:
                missing.append(item)
            else:
                paths[item.id] = where or f"flight://{self.flight_address}"
        if not missing:
            return paths
        if task.task_id not in self._pulling:
            self._pulling.add(task.task_id)
            self._spawn(self._fetch(task, missing))
        return None

    def _dataset_peers(self) -> list[site_pb2.SiteStatus]:
        """The last status of each up peer that serves datasets (read from Flight threads too)."""
        if self.membership is None:
            return []
        return [s for s in self.membership.up_statuses() if s.flight_address]

    def dataset_sources(self, dataset_id: str, holder: str) -> list[tuple[str, str]]:
        """(site, Flight address) of the up peers that hold a dataset: the site its ref
        names first, then those that list a replica."""
        found = [(s.site_id != holder, s.site_id, s.flight_address) for s in self._dataset_peers()
                 if s.site_id == holder or dataset_id in s.datasets]
        return [(site, address) for _, site, address in sorted(found)]

    def peer_flight_addresses(self) -> list[str]:
        """The dataset endpoints of the up peers: told when an original is deleted."""
        return [s.flight_address for s in self._dataset_peers()]

    async def _fetch(self, task: Task, missing: list[tasks_pb2.DatasetInput]) -> None:
        try:
            for item in missing:
                if self.store is None:
                    raise DatasetError("ERROR_KIND_DATASET_NOT_FOUND", f"site {self.site_id!r} keeps no datasets")
                if item.site == self.site_id and not self.dataset_sources(item.id, item.site):
                    raise DatasetError("ERROR_KIND_DATASET_NOT_FOUND",
                                       f"task {task.task_id}: dataset {item.id} is not at site {self.site_id!r}")
                pull = self._pulls.get(item.id)
                if pull is None:  # one transfer per dataset, however many tasks wait for it
                    pull = self._pulls[item.id] = self._spawn(self._pull(item))
                await asyncio.shield(pull)
        except Exception as exc:
            if self.draining:  # stopping: the task stays QUEUED in the journal and fetches again
                return
            kind = getattr(exc, "kind", "")
            logger.warning("task %s: fetching its data failed: %s", task.task_id, exc)
            self._finish(task, jr.FAILED, error=common_pb2.Error(
                kind=kind if kind in K.keys() else "ERROR_KIND_SITE_FAILURE",
                message=str(exc) if isinstance(exc, DatasetError)
                else f"task {task.task_id}: its dataset could not be fetched to site {self.site_id!r}: {exc}"))
        else:
            if task.state == jr.QUEUED:
                self.queue.appendleft(task)
        finally:
            self._pulling.discard(task.task_id)
            self.flush()
            self.pump()

    async def _pull(self, item: tasks_pb2.DatasetInput) -> None:
        assert self.store is not None
        try:
            started = time.monotonic()
            meta = await self._loop.run_in_executor(
                self._transfers, functools.partial(self.store.pull, item.id,
                                        lambda: self.dataset_sources(item.id, item.site),
                                        timeout_s=self.config.pull_timeout_s))
            elapsed = time.monotonic() - started
            logger.info("pulled dataset %s (%d bytes) from %s in %.2f s (%.0f MB/s)", item.id, meta.num_bytes,
                        meta.origin, elapsed, meta.num_bytes / max(elapsed, 1e-9) / 1e6)
            # On the loop, so no task starts reading a replica while it is chosen for eviction;
            # kept: what running tasks read and what queued or parked tasks here are waiting for.
            keep = set(self._reading) | {item.id} | {
                i.id for t in self.tasks.values() if t.spec.inputs and t.state == jr.QUEUED and t.site == self.site_id
                for i in t.spec.inputs}
            try:
                self.store.evict(keep)
            except Exception:
                logger.exception("evicting replicas after pulling %s failed", item.id)
        finally:
            self._pulls.pop(item.id, None)

    def _start(self, task: Task, inputs: dict[str, str] | None = None) -> None:
        spec = task.spec
        digest = spec.function_digest
        if not self._ensure_function(task):
            return
        attempt = self._mark_started(task)
        for item in spec.inputs:
            self._reading[item.id] += 1
        loop = self._loop
        try:
            task.ref = running = self.runner.submit(digest, spec.name, spec.args, spec.batch, task.request, inputs,
                                                    task_id=task.task_id, returns_dataset=spec.returns_dataset)
            running.ref.future().add_done_callback(
                lambda fut: loop.call_soon_threadsafe(self._on_done, task, attempt, running, fut))
        except Exception as exc:  # e.g. Ray rejected the options
            logger.exception("task %s: Ray did not take it", task.task_id)
            self._finish(task, jr.FAILED, error=common_pb2.Error(
                kind=K.ERROR_KIND_INTERNAL, message=f"site {self.site_id!r} could not start the task: {exc}"))
            return
        if spec.timeout_s > 0:
            task.timer = loop.call_later(spec.timeout_s, self._on_timeout, task, attempt)

    def _release(self, task: Task) -> None:
        if task.holding:
            for item in task.spec.inputs:
                self._reading[item.id] -= 1
                if self._reading[item.id] <= 0:
                    del self._reading[item.id]
            task.holding = False
            self.capacity.release(task.request)
            self.running -= 1
        if task.timer is not None:
            task.timer.cancel()
            task.timer = None

    def _on_done(self, task: Task, attempt: int, running: Running, fut: Future[Any]) -> None:
        try:
            self._settle(task, attempt, running, fut)
        except Exception as exc:  # a bug here must not leave the task RUNNING forever
            logger.exception("task %s: settling its outcome failed", task.task_id)
            self._finish(task, jr.FAILED, error=common_pb2.Error(
                kind=K.ERROR_KIND_INTERNAL, message=f"site {self.site_id!r}: {type(exc).__name__}: {exc}"))
            self.pump()

    def _settle(self, task: Task, attempt: int, running: Running, fut: Future[Any]) -> None:
        verdict, outcome = self.runner.outcome(running, fut)
        if task.state != jr.RUNNING or task.attempts != attempt:
            return  # cancelled, timed out or retried meanwhile: a late duplicate
        self._release(task)
        if verdict == "ok":
            run_s = outcome[7]  # measured in the worker: without the wait in Ray's queues
            self.capacity.observe(run_s)
            self._apply(task, outcome, run_s)
        else:
            self._failed_in_ray(task, verdict, outcome)
        self.pump()

    def _on_group_done(self, tasks: list[Task], attempts: list[int], running: Running, fut: Future[Any]) -> None:
        try:
            verdict, outcome = self.runner.outcome(running, fut)
            for i, task in enumerate(tasks):
                if task.state != jr.RUNNING or task.attempts != attempts[i]:
                    continue
                self._release(task)
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
                self._finish(task, jr.FAILED, error=common_pb2.Error(
                    kind=K.ERROR_KIND_INTERNAL, message=f"site {self.site_id!r}: {type(exc).__name__}: {exc}"))
        self.pump()

    def _failed_in_ray(self, task: Task, verdict: str, exc: BaseException) -> None:
        if verdict == PREEMPTED:  # waited on a worker stopped for another task: costs nothing
            task.attempts -= 1
            task.state = jr.QUEUED
            task.ref = None
            self._write(jr.Journal.requeued(task.task_id, task.attempts, task.history))
            self.queue.appendleft(task)
        elif verdict == RETRY:
            self._retry_or_fail(task, f"worker failed: {type(exc).__name__}: {str(exc)[:500]}")
        else:
            logger.error("task %s: unexpected failure from Ray: %s", task.task_id, exc)
            self._finish(task, jr.FAILED, error=common_pb2.Error(
                kind=K.ERROR_KIND_INTERNAL, message=f"site {self.site_id!r}: {type(exc).__name__}: {exc}"))

    def _apply(self, task: Task, outcome: Any, run_s: float) -> None:
        """Finishes a task with what its worker returned."""
        ok, data, kind, etype, message, tb, pickled, _ = outcome
        if ok:
            if len(data) > self.config.max_payload_bytes:
                self._finish(task, jr.FAILED, run_s=run_s, error=common_pb2.Error(
                    kind=K.ERROR_KIND_PAYLOAD_TOO_LARGE,
                    message=f"task {task.task_id}: result is {len(data)} bytes, over this site's limit of "
                            f"{self.config.max_payload_bytes} bytes"))
            else:
                self._finish(task, jr.SUCCEEDED, result=data, run_s=run_s)
        else:
            self._finish(task, jr.FAILED, run_s=run_s, error=common_pb2.Error(
                kind=kind, message=message, exception_type=etype, exception=pickled, traceback=tb))

    def _on_timeout(self, task: Task, attempt: int) -> None:
        if task.state != jr.RUNNING or task.attempts != attempt:
            return
        task.timer = None
        self.runner.cancel(task.ref)
        self._release(task)
        self._finish(task, jr.FAILED, error=common_pb2.Error(
            kind=K.ERROR_KIND_TIMEOUT,
            message=f"task {task.task_id} ran longer than its timeout of {task.spec.timeout_s:g} s and was stopped"))
        self.pump()

    def _retry_or_fail(self, task: Task, why: str) -> None:
        task.history.append({"attempt": task.attempts, "site": task.site, "started_at": task.started_at,
                             "ended_at": time.time(), "outcome": why})
        if task.attempts <= task.spec.max_retries:
            logger.warning("task %s attempt %d at %s: %s; retrying", task.task_id, task.attempts, task.site, why)
            task.state = jr.QUEUED
            task.ref = None
            self._write(jr.Journal.requeued(task.task_id, task.attempts, task.history))
            if self.membership is not None and task.home_here:
                task.site = ""
                self._unplaced.insert(0, task)  # placed again: another site may be better now
            else:
                self.queue.appendleft(task)
        else:
            self._finish(task, jr.FAILED, error=common_pb2.Error(
                kind=K.ERROR_KIND_SITE_FAILURE,
                message=f"task {task.task_id}: {why} (attempt {task.attempts}, max_retries="
                        f"{task.spec.max_retries}: no retries left)"))

    # ------------------------------------------------------------------ finish
    def _finish(self, task: Task, state: tasks_pb2.TaskState, result: bytes | None = None,
                error: common_pb2.Error | None = None, run_s: float = 0.0) -> None:
        if task.state in jr.TERMINAL:
            return
        now = time.time()
        if not run_s and task.ref is not None and task.started_at:  # ran here
            run_s = now - task.started_at
        if run_s > 0 and state != jr.CANCELLED:
            self._observe_run(task.spec.function_digest, run_s)
        self._release(task)
        task.state = state
        task.ref = None
        self.tasks.pop(task.task_id, None)
        self._count_finished(now)
        self._write(jr.Journal.finished(task.task_id, state, task.attempts, task.site, now, result,
                                        error.SerializeToString() if error is not None else None, task.history))
        if task.sessions:
            event = tasks_pb2.TaskEvent(task_id=task.task_id, state=state, site=task.site, attempt=task.attempts,
                                        result=result or b"", error=error, run_s=run_s)
            self._events.append((task.sessions, event))

    def _observe_run(self, digest: str, run_s: float) -> None:
        """Per-function run time (moving average), for placement's run and wait terms."""
        old = self._run_estimates.get(digest)
        self._run_estimates[digest] = run_s if old is None else old + RUN_EWMA_ALPHA * (run_s - old)
        if len(self._run_estimates) > MAX_RUN_ESTIMATES:
            self._run_estimates.pop(next(iter(self._run_estimates)))

    def _write(self, statement: tuple[str, Sequence[object]]) -> None:
        self._writes.append(statement)
        if not self._flush_scheduled and self._flush_retry is None:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Group commit of the state changes of one loop turn, then their events.

        A result is journaled before the client hears of it, so a crash between the two
        leaves it fetchable rather than lost. A failed commit keeps its writes, and holds
        their events, until a retry goes through."""
        self._flush_scheduled = False
        if self._writes:
            try:
                self.journal.write(self._writes)
            except Exception:
                logger.exception("journal write of %d changes failed; retrying in %g s", len(self._writes),
                                 FLUSH_RETRY_S)
                if self._flush_retry is None:
                    self._flush_retry = self._loop.call_later(FLUSH_RETRY_S, self._retry_flush)
                return
            self._writes = []
            if self._flush_retry is not None:  # went through before the retry was due
                self._flush_retry.cancel()
                self._flush_retry = None
        events, self._events = self._events, []
        for sessions, event in events:
            self.hub.push(sessions, event)

    def _retry_flush(self) -> None:
        self._flush_retry = None
        self.flush()

    def _roll(self, now: float) -> int:
        """Zeroes the throughput buckets of the seconds passed since the last call."""
        second = int(now)
        if second != self._bucket_second:
            for i in range(1, min(second - self._bucket_second, THROUGHPUT_WINDOW_S) + 1):
                self._finished_buckets[(self._bucket_second + i) % THROUGHPUT_WINDOW_S] = 0
            self._bucket_second = second
        return second

    def _count_finished(self, now: float) -> None:
        self._finished_buckets[self._roll(now) % THROUGHPUT_WINDOW_S] += 1

    def throughput(self) -> float:
        """Tasks finished per second over the last minute."""
        self._roll(time.time())
        return sum(self._finished_buckets) / THROUGHPUT_WINDOW_S

    # ------------------------------------------------------------------ queries
    def subscribe(self, session_id: str, task_ids: Sequence[str]) -> list[str]:
        """Adds tasks to a session; finished ones are answered at once from the journal."""
        unknown: list[str] = []
        lookup: list[str] = []
        for task_id in task_ids:
            task = self.tasks.get(task_id)
            if task is not None:
                task.add_session(session_id)
            else:
                lookup.append(task_id)
        if lookup:
            if self._writes:  # a task finished this turn: its row must say so before it is read
                self.flush()
            rows = self.journal.get_many(lookup)
            for task_id in lookup:
                row = rows.get(task_id)
                if row is None:
                    unknown.append(task_id)
                elif row.state in jr.TERMINAL:
                    self.hub.push({session_id}, _event_from_row(row))
                else:  # journaled but not yet in memory: cannot happen after recovery
                    unknown.append(task_id)
        return unknown

    def cancel(self, task_ids: Sequence[str], why: str = "was cancelled") -> list[str]:
        cancelled = []
        remote: dict[PeerPort[Task], list[str]] = {}
        for task_id in task_ids:
            task = self.tasks.get(task_id)
            if task is None:
                continue
            if task.ref is not None:
                self._stop_run(task)
            elif task.site and task.site != self.site_id and self.membership is not None:
                peer = self.membership.peer_for(task.site)
                if peer is not None:
                    remote.setdefault(peer, []).append(task_id)
            self._finish(task, jr.CANCELLED, error=common_pb2.Error(
                kind=K.ERROR_KIND_CANCELLED, message=f"task {task_id} {why}"))
            cancelled.append(task_id)
        for peer, ids in remote.items():
            self._spawn(peer.cancel(ids))
        if cancelled:
            self.flush()
            self.pump()
        return cancelled

    def _stop_run(self, task: Task) -> None:
        """Stops the Ray call of a task running here. Stopping a fused call would fail the
        other tasks in it: it is stopped only with the last of them; until then the task's
        outcome is ignored."""
        if task.ref is not None and not any(t is not task and t.ref is task.ref and t.state == jr.RUNNING
                                            for t in task.group):
            self.runner.cancel(task.ref)

    def _drop(self, task: Task) -> None:
        """Forgets a forwarded task its home took back: stopped if running, its journal rows
        deleted, no event (the home moved it; a CANCELLED event could reach it after it sent
        the same task here again). A later forward of the same id is then a new task here."""
        self._stop_run(task)
        self._release(task)
        task.state = jr.CANCELLED  # in memory only: late callbacks of its run are ignored
        task.ref = None
        self.tasks.pop(task.task_id, None)
        for statement in jr.Journal.forgotten(task.task_id):
            self._write(statement)

    def info(self, task_id: str) -> tasks_pb2.TaskInfo | None:
        task = self.tasks.get(task_id)
        if task is not None:
            spec = task.spec
            return tasks_pb2.TaskInfo(
                task_id=task_id, name=spec.name, state=task.state, site=task.site, attempts=task.attempts,
                max_retries=spec.max_retries, submitted_at=task.submitted_at, started_at=task.started_at,
                resources=spec.resources, history=[_attempt(h) for h in task.history],
                placements=task.placements, home=spec.home or self.site_id)
        if self._writes:  # as in subscribe()
            self.flush()
        row = self.journal.get(task_id)
        if row is None:
            return None
        spec = tasks_pb2.TaskSpec.FromString(row.spec)
        info = tasks_pb2.TaskInfo(
            task_id=task_id, name=spec.name, state=row.state, site=row.site, attempts=row.attempts,
            max_retries=spec.max_retries, submitted_at=row.submitted_at, started_at=row.started_at,
            finished_at=row.finished_at, resources=spec.resources, history=[_attempt(h) for h in row.history],
            home=spec.home or self.site_id)
        if row.placements:
            info.placements.extend(tasks_pb2.TaskInfo.FromString(row.placements).placements)
        if row.error:
            info.error.CopyFrom(common_pb2.Error.FromString(row.error))
            info.error.exception = b""  # pickled bytes are for the result stream, not for display
        return info

    def status(self) -> site_pb2.SiteStatus:
        return site_pb2.SiteStatus(
            site_id=self.site_id, compute_id=self.config.compute_id, address=self.address,
            state="draining" if self.draining else "up", arch=_ARCH,
            python_version=self.python, resources_total=self.capacity.total,
            resources_free=self.capacity.free(), queued=sum(1 for t in self.queue if t.state == jr.QUEUED),
            running=self.running, throughput=self.throughput(), labels=dict(self.config.labels),
            max_payload_bytes=self.config.max_payload_bytes, version=_version(),
            movable=len(self._movable()), mean_run_s=self.capacity.mean_run_s or 0.0,
            accelerators=sorted(k.split(":", 1)[1] for k in self.capacity.total if k.startswith("accelerator_type:")),
            last_seen=time.time(), flight_address=self.flight_address,
            datasets=self.store.ids() if self.store is not None else [])

    def catalogue(self) -> list[site_pb2.SiteStatus]:
        """This site, then its peers as last seen."""
        return [self.status(), *(self.membership.catalogue() if self.membership is not None else [])]

    # ------------------------------------------------------------------ restart
    def recover(self) -> tuple[int, int]:
        """Requeues every unfinished task from the journal. Returns (requeued, failed)."""
        requeued = failed = 0
        for row in self.journal.unfinished():
            if self._restore(row, "the gateway stopped while the task was running").state == jr.QUEUED:
                requeued += 1
            else:
                failed += 1
        for home, held in self._held.items():
            logger.info("holding %d tasks forwarded by %s until %s confirms them", len(held), home, home)
        self.flush()
        self.pump()
        return requeued, failed

    def _restore(self, row: jr.TaskRow, why_running: str) -> Task:
        """Puts an unfinished task of the journal back in memory, where the row says it is."""
        spec = tasks_pb2.TaskSpec.FromString(row.spec)
        task = Task(spec, row.submitted_at)
        task.attempts = row.attempts
        task.history = row.history
        task.site = row.site
        if row.placements:
            task.placements = list(tasks_pb2.TaskInfo.FromString(row.placements).placements)
        self.tasks[task.task_id] = task
        if not task.home_here:
            # Forwarded by a peer before this gateway stopped: its home may have moved it
            # elsewhere meanwhile (and it may have finished there). It waits, queued but not
            # run, until the home's link lists it again (reconcile), or cancels it.
            self._held.setdefault(spec.home, {})[task.task_id] = (task, row.state == jr.RUNNING)
            task.state = jr.QUEUED
        elif row.site and row.site != self.site_id and self.membership is not None:
            # It was forwarded: the peer journaled it and still has it. Send it again once
            # the peer answers (idempotent there), rather than running it twice.
            self._reforward.setdefault(row.site, []).append(task)
        elif self.membership is not None and not row.site:
            self._unplaced.append(task)
        elif row.state == jr.RUNNING:
            self._retry_or_fail(task, why_running)
        else:
            self.queue.append(task)
        return task

    def drain(self) -> None:
        """Clean shutdown: running tasks go back to the queue without spending a retry."""
        self.draining = True
        for task in list(self.tasks.values()):
            # Ray's shutdown stops it; the next start reruns it. (One running at a peer goes on there.)
            if task.state == jr.RUNNING and task.site == self.site_id:
                self._release(task)
                task.state = jr.QUEUED
                task.attempts -= 1
                self._write(jr.Journal.requeued(task.task_id, task.attempts, task.history))
        self._transfers.shutdown(wait=False, cancel_futures=True)
        self.flush()

    def expire_results(self) -> int:
        return self.journal.expire(time.time() - self.config.result_ttl_s)


_ARCH = platform.machine().lower()


def _placement_proto(decision: Decision, reason: str, now: float) -> tasks_pb2.Placement:
    return tasks_pb2.Placement(
        site=decision.site_id or "", reason=reason, decided_at=now,
        candidates=[tasks_pb2.PlacementScore(site=c.site, wait_s=c.wait_s, transfer_s=c.transfer_s, run_s=c.run_s,
                                             price=c.price, carbon_g=c.carbon_g, total=c.total)
                    for c in decision.candidates],
        rejected=[tasks_pb2.Rejection(site=site, reason=why) for site, why in decision.rejected],
        rejected_count=decision.rejected_count, feasible_count=decision.feasible_count)


def _placements_blob(task: Task) -> bytes:
    return tasks_pb2.TaskInfo(placements=task.placements).SerializeToString()


def _attempt(h: dict[str, Any]) -> tasks_pb2.Attempt:
    return tasks_pb2.Attempt(attempt=int(h.get("attempt", 0)), site=str(h.get("site", "")),
                             started_at=float(h.get("started_at", 0)), ended_at=float(h.get("ended_at", 0)),
                             outcome=str(h.get("outcome", "")))


def _event_from_row(row: jr.TaskRow) -> tasks_pb2.TaskEvent:
    event = tasks_pb2.TaskEvent(task_id=row.task_id, state=row.state, site=row.site, attempt=row.attempts,
                                result=row.result or b"")
    if row.error:
        event.error.CopyFrom(common_pb2.Error.FromString(row.error))
    return event


def _version() -> str:
    from intertie import __version__

    return __version__
