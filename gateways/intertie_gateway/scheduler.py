"""The site's task lifecycle: accept (journal first), queue, admit into Ray, finish, recover.

Everything here runs on the gateway's event loop; Ray calls back through
``call_soon_threadsafe``. Only unfinished tasks are kept in memory; finished ones
are read back from the journal.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import platform
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from intertie.spec import python_version
from intertie.v1 import common_pb2, site_pb2, tasks_pb2
from intertie_gateway import journal as jr
from intertie_gateway.admission import Capacity
from intertie_gateway.config import GatewayConfig
from intertie_gateway.journal import Journal
from intertie_gateway.runner import PREEMPTED, RETRY, RayRunner, Running
from intertie_gateway.sessions import SessionHub
from intertie_gateway.validate import check_spec, ray_request

logger = logging.getLogger(__name__)
K = common_pb2.ErrorKind

# Batches of accepted tasks larger than this are journaled on a thread, so that one
# big upload does not stall every other client on the event loop.
INLINE_JOURNAL_BYTES = 1 << 20
# When the head of the queue does not fit, look this far behind it for one that does.
QUEUE_SCAN_DEPTH = 32
# Throughput is reported over this window.
THROUGHPUT_WINDOW_S = 60


class Task:
    __slots__ = ("task_id", "spec", "request", "state", "attempts", "site", "submitted_at", "started_at",
                 "ref", "timer", "sessions", "history", "holding")

    def __init__(self, spec: tasks_pb2.TaskSpec, submitted_at: float) -> None:
        self.task_id = spec.task_id
        self.spec = spec
        self.request = ray_request(spec.resources)
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
        self.capacity = Capacity(runner.total_resources(), config.admission_overcommit)
        self.tasks: dict[str, Task] = {}
        self.queue: deque[Task] = deque()
        self.running = 0
        self._known_functions = journal.function_digests()
        self._fresh_functions: dict[str, bytes] = {}  # received, not yet put into Ray
        self._writes: list[tuple[str, Sequence[object]]] = []
        self._events: list[tuple[set[str] | None, tasks_pb2.TaskEvent]] = []
        self._flush_scheduled = False
        self._finished_buckets = [0] * THROUGHPUT_WINDOW_S
        self._bucket_second = 0
        self._loop = asyncio.get_running_loop()
        self.draining = False

    # ------------------------------------------------------------------ accept
    async def submit(self, request: tasks_pb2.SubmitRequest) -> list[tasks_pb2.TaskAck]:
        now = time.time()
        bad_functions: dict[str, common_pb2.Error] = {}
        new_functions: list[tuple[str, str, bytes]] = []
        for fn in request.functions:
            if len(fn.payload) > self.config.max_payload_bytes:
                bad_functions[fn.digest] = common_pb2.Error(
                    kind=K.ERROR_KIND_PAYLOAD_TOO_LARGE,
                    message=f"function {fn.name or fn.digest} is {len(fn.payload)} bytes pickled, over this "
                            f"site's limit of {self.config.max_payload_bytes} bytes")
            elif hashlib.sha256(fn.payload).hexdigest() != fn.digest:
                bad_functions[fn.digest] = common_pb2.Error(
                    kind=K.ERROR_KIND_INVALID_ARGUMENT,
                    message=f"function {fn.name or fn.digest}: payload does not match its sha256 digest")
            elif fn.digest not in self._known_functions:
                new_functions.append((fn.digest, fn.name, fn.payload))
        offered = {d for d, _, _ in new_functions}

        acks: list[tasks_pb2.TaskAck] = []
        accepted: list[tasks_pb2.TaskSpec] = []
        seen: set[str] = set()
        nbytes = 0
        for spec in request.tasks:
            error = check_spec(spec, max_payload_bytes=self.config.max_payload_bytes,
                               python_version=self.python, site_id=self.site_id)
            if error is None:
                error = bad_functions.get(spec.function_digest)
            if error is None and spec.function_digest not in self._known_functions \
                    and spec.function_digest not in offered:
                error = common_pb2.Error(kind=K.ERROR_KIND_NOT_FOUND, message=(
                    f"task {spec.task_id}: function {spec.function_digest[:12]} is unknown to site "
                    f"{self.site_id!r}; send its bytes with the task"))
            if error is None:
                why = self.capacity.never_fits(ray_request(spec.resources), f"site {self.site_id!r}")
                if why is not None:
                    error = common_pb2.Error(kind=K.ERROR_KIND_PLACEMENT,
                                             message=f"task {spec.task_id}: no site can run it: {why}")
            if error is not None:
                acks.append(tasks_pb2.TaskAck(task_id=spec.task_id, accepted=False, error=error))
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
            existed = await self._loop.run_in_executor(None, self.journal.accept, new_functions, rows, now)
        else:
            existed = self.journal.accept(new_functions, rows, now)
        # Journaled: from here on the tasks survive a crash, and may be acknowledged.
        for digest, _, payload in new_functions:
            self._known_functions.add(digest)
            self._fresh_functions[digest] = payload
        for spec in accepted:
            if spec.task_id in existed:  # finished before: answer from the journal
                self.subscribe(request.session_id, [spec.task_id])
                continue
            task = Task(spec, now)
            task.add_session(request.session_id)
            self.tasks[task.task_id] = task
            self.queue.append(task)
        self.pump()
        return acks

    # ------------------------------------------------------------------ dispatch
    def pump(self) -> None:
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
                self._start(task)
                continue
            # The head waits (e.g. for a GPU); let a smaller task behind it through.
            for i in range(1, min(len(queue), QUEUE_SCAN_DEPTH)):
                other = queue[i]
                if other.state == jr.QUEUED and self.capacity.fits(other.request):
                    del queue[i]
                    self._start(other)
                    break
            else:
                return

    def _start(self, task: Task) -> None:
        spec = task.spec
        digest = spec.function_digest
        if not self.runner.has_function(digest):
            payload = self._fresh_functions.pop(digest, None) or self.journal.function_payload(digest)
            if payload is None:
                self._finish(task, jr.FAILED, error=common_pb2.Error(
                    kind=K.ERROR_KIND_INTERNAL, message=f"function {digest[:12]} is missing from the journal"))
                return
            self.runner.put_function(digest, payload)
        task.attempts += 1
        task.state = jr.RUNNING
        task.site = self.site_id
        task.started_at = time.time()
        task.holding = True
        self.capacity.acquire(task.request)
        self.running += 1
        attempt = task.attempts
        loop = self._loop
        try:
            task.ref = running = self.runner.submit(digest, spec.name, spec.args, spec.batch, task.request)
            running.ref.future().add_done_callback(
                lambda fut: loop.call_soon_threadsafe(self._on_done, task, attempt, running, fut))
        except Exception as exc:  # e.g. Ray rejected the options
            logger.exception("task %s: Ray did not take it", task.task_id)
            self._finish(task, jr.FAILED, error=common_pb2.Error(
                kind=K.ERROR_KIND_INTERNAL, message=f"site {self.site_id!r} could not start the task: {exc}"))
            return
        if spec.timeout_s > 0:
            task.timer = loop.call_later(spec.timeout_s, self._on_timeout, task, attempt)
        self._write(jr.Journal.started(task.task_id, attempt, self.site_id, task.started_at))
        if task.sessions:
            self.hub.push(task.sessions, tasks_pb2.TaskEvent(
                task_id=task.task_id, state=jr.RUNNING, site=self.site_id, attempt=attempt), progress=True)

    def _release(self, task: Task) -> None:
        if task.holding:
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
        self.capacity.observe(time.time() - task.started_at)
        if verdict != "ok":
            exc = outcome
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
            self.pump()
            return
        ok, data, kind, etype, message, tb, pickled = outcome
        if ok:
            if len(data) > self.config.max_payload_bytes:
                self._finish(task, jr.FAILED, error=common_pb2.Error(
                    kind=K.ERROR_KIND_PAYLOAD_TOO_LARGE,
                    message=f"task {task.task_id}: result is {len(data)} bytes, over this site's limit of "
                            f"{self.config.max_payload_bytes} bytes"))
            else:
                self._finish(task, jr.SUCCEEDED, result=data)
        else:
            self._finish(task, jr.FAILED, error=common_pb2.Error(
                kind=kind, message=message, exception_type=etype, exception=pickled, traceback=tb))
        self.pump()

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
            self.queue.appendleft(task)
        else:
            self._finish(task, jr.FAILED, error=common_pb2.Error(
                kind=K.ERROR_KIND_SITE_FAILURE,
                message=f"task {task.task_id}: {why} (attempt {task.attempts}, max_retries="
                        f"{task.spec.max_retries}: no retries left)"))

    # ------------------------------------------------------------------ finish
    def _finish(self, task: Task, state: tasks_pb2.TaskState, result: bytes | None = None,
                error: common_pb2.Error | None = None) -> None:
        if task.state in jr.TERMINAL:
            return
        self._release(task)
        task.state = state
        task.ref = None
        now = time.time()
        self.tasks.pop(task.task_id, None)
        self._count_finished(now)
        self._write(jr.Journal.finished(task.task_id, state, task.attempts, task.site, now, result,
                                        error.SerializeToString() if error is not None else None, task.history))
        if task.sessions:
            event = tasks_pb2.TaskEvent(task_id=task.task_id, state=state, site=task.site, attempt=task.attempts,
                                        result=result or b"", error=error)
            self._events.append((task.sessions, event))

    def _write(self, statement: tuple[str, Sequence[object]]) -> None:
        self._writes.append(statement)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Group commit of the state changes of one loop turn, then their events.

        A result is journaled before the client hears of it, so a crash between the two
        leaves it fetchable rather than lost."""
        self._flush_scheduled = False
        writes, self._writes = self._writes, []
        events, self._events = self._events, []
        try:
            self.journal.write(writes)
        except Exception:
            logger.exception("journal write of %d changes failed", len(writes))
        for sessions, event in events:
            self.hub.push(sessions, event)

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

    def cancel(self, task_ids: Sequence[str]) -> list[str]:
        cancelled = []
        for task_id in task_ids:
            task = self.tasks.get(task_id)
            if task is None:
                continue
            if task.state == jr.RUNNING:
                self.runner.cancel(task.ref)
            self._finish(task, jr.CANCELLED, error=common_pb2.Error(
                kind=K.ERROR_KIND_CANCELLED, message=f"task {task_id} was cancelled"))
            cancelled.append(task_id)
        if cancelled:
            self.flush()
            self.pump()
        return cancelled

    def info(self, task_id: str) -> tasks_pb2.TaskInfo | None:
        task = self.tasks.get(task_id)
        if task is not None:
            spec = task.spec
            return tasks_pb2.TaskInfo(
                task_id=task_id, name=spec.name, state=task.state, site=task.site, attempts=task.attempts,
                max_retries=spec.max_retries, submitted_at=task.submitted_at, started_at=task.started_at,
                resources=spec.resources, history=[_attempt(h) for h in task.history])
        row = self.journal.get(task_id)
        if row is None:
            return None
        spec = tasks_pb2.TaskSpec.FromString(row.spec)
        info = tasks_pb2.TaskInfo(
            task_id=task_id, name=spec.name, state=row.state, site=row.site, attempts=row.attempts,
            max_retries=spec.max_retries, submitted_at=row.submitted_at, started_at=row.started_at,
            finished_at=row.finished_at, resources=spec.resources, history=[_attempt(h) for h in row.history])
        if row.error:
            info.error.CopyFrom(common_pb2.Error.FromString(row.error))
            info.error.exception = b""  # pickled bytes are for the result stream, not for display
        return info

    def status(self) -> site_pb2.SiteStatus:
        return site_pb2.SiteStatus(
            site_id=self.site_id, compute_id=self.config.compute_id, address=self.address,
            state="draining" if self.draining else "up", arch=platform.machine().lower(),
            python_version=self.python, resources_total=self.capacity.total,
            resources_free=self.capacity.free(), queued=len(self.tasks) - self.running, running=self.running,
            throughput=self.throughput(), labels=dict(self.config.labels),
            max_payload_bytes=self.config.max_payload_bytes, version=_version())

    # ------------------------------------------------------------------ restart
    def recover(self) -> tuple[int, int]:
        """Requeues every unfinished task from the journal. Returns (requeued, failed)."""
        requeued = failed = 0
        for row in self.journal.unfinished():
            spec = tasks_pb2.TaskSpec.FromString(row.spec)
            task = Task(spec, row.submitted_at)
            task.attempts = row.attempts
            task.history = row.history
            task.site = row.site
            self.tasks[task.task_id] = task
            if row.state == jr.RUNNING:
                self._retry_or_fail(task, "the gateway stopped while the task was running")
                if task.state == jr.QUEUED:
                    requeued += 1
                else:
                    failed += 1
                continue
            self.queue.append(task)
            requeued += 1
        self.flush()
        self.pump()
        return requeued, failed

    def drain(self) -> None:
        """Clean shutdown: running tasks go back to the queue without spending a retry."""
        self.draining = True
        for task in list(self.tasks.values()):
            if task.state == jr.RUNNING:  # Ray's shutdown stops it; the next start reruns it
                self._release(task)
                task.state = jr.QUEUED
                task.attempts -= 1
                self._write(jr.Journal.requeued(task.task_id, task.attempts, task.history))
        self.flush()

    def expire_results(self) -> int:
        return self.journal.expire(time.time() - self.config.result_ttl_s)


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
