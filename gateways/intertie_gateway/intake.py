"""Intake: where a wire batch of tasks (a client's, or a peer's on a verified link) becomes
accepted tasks. Each is checked, converted to the core's spec, journaled (the point of
acknowledgement), and handed to the book; one ack per task, in order.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from intertie.v1 import common_pb2, tasks_pb2
from intertie_gateway import convert
from intertie_gateway.book import Task, TaskBook
from intertie_gateway.config import GatewayConfig
from intertie_gateway.journal import TERMINAL, Journal, TaskRow
from intertie_gateway.model import TaskSpec
from intertie_gateway.policy import Policy, SubmitRates
from intertie_gateway.sessions import SessionHub
from intertie_gateway.tenancy import TENANT, foreign
from intertie_gateway.validate import MAX_NAME_CHARS, check_spec, clip

logger = logging.getLogger(__name__)
K = common_pb2.ErrorKind

# Batches of accepted tasks larger than this are journaled on a thread, so that one
# big upload does not stall every other client on the event loop.
INLINE_JOURNAL_BYTES = 1 << 20
# A batch of more tasks than this is taken in slices of this many, each validated, journaled
# and queued before the next, and other clients' calls are served in between: one tenant's
# 2,000-task batches (tens of ms of work) do not hold up another's single task.
SLICE_TASKS = 128


class Intake:
    """``feasibility`` builds, per batch, the check of whether any site can ever run a task;
    ``restore`` puts a journaled task back in memory; ``commit`` is the driver's group
    commit, ``pump`` its pump, ``spawn`` runs a coroutine in the background."""

    def __init__(self, book: TaskBook, journal: Journal, hub: SessionHub, *, config: GatewayConfig, python: str,
                 feasibility: Callable[[], Callable[[Task, bool], str | None]],
                 restore: Callable[[TaskRow, str], Task], commit: Callable[[], None], pump: Callable[[], None],
                 spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]],
                 policy: Callable[[], Policy] = Policy,
                 on_refused: Callable[[str, int], None] | None = None) -> None:
        self.book = book
        self.journal = journal
        self.hub = hub
        self.config = config
        self.site_id = config.site_id
        self.python = python
        self._feasibility = feasibility
        self._restore = restore
        self._commit = commit
        self._pump = pump
        self._spawn = spawn
        self._known_functions = journal.function_digests()
        self._policy = policy
        self._rates = SubmitRates(time.monotonic)
        self._on_refused = on_refused  # (metrics: tasks refused, by error kind)

    async def submit(self, request: tasks_pb2.SubmitRequest, *, peer: str = "",
                     tenant: str = "") -> list[tasks_pb2.TaskAck]:
        """Validates, journals and queues a batch; one ack per task, in order.

        ``peer``: the site whose verified link the batch came on ("" for a client). Only
        there are ``home`` and ``tenant`` honoured: the home is the link's site whatever the
        spec says, and the tenant is the home's, named "tenant@home" here. ``tenant``: the
        calling client's tenant (from its token), written into each of its tasks.

        A batch of more than SLICE_TASKS is taken a slice at a time, as if the client had sent
        smaller batches (the acks, one per task in order, go back together)."""
        limit = self.config.max_payload_bytes
        bad_functions: dict[str, common_pb2.Error] = {}
        new_functions: list[tuple[str, str, bytes]] = []
        for fn in request.functions:
            if len(fn.payload) > limit:
                bad_functions[fn.digest] = common_pb2.Error(
                    kind=K.ERROR_KIND_PAYLOAD_TOO_LARGE,
                    message=f"function {clip(fn.name or fn.digest)} is {len(fn.payload)} bytes pickled, over this "
                            f"site's limit of {limit} bytes")
            elif hashlib.sha256(fn.payload).hexdigest() != fn.digest:
                bad_functions[fn.digest] = common_pb2.Error(
                    kind=K.ERROR_KIND_INVALID_ARGUMENT,
                    message=f"function {clip(fn.name or fn.digest)}: payload does not match its sha256 digest")
            elif fn.digest not in self._known_functions:
                new_functions.append((fn.digest, clip(fn.name, MAX_NAME_CHARS), fn.payload))
        offered = {d for d, _, _ in new_functions}
        tasks = request.tasks
        if len(tasks) <= SLICE_TASKS:
            acks = await self._submit_slice(request.session_id, tasks, new_functions, bad_functions, offered,
                                            peer=peer, tenant=tenant)
        else:
            acks = []
            for start in range(0, len(tasks), SLICE_TASKS):
                if start:
                    await asyncio.sleep(0)  # the calls that arrived meanwhile go first
                acks += await self._submit_slice(request.session_id, tasks[start:start + SLICE_TASKS],
                                                 new_functions if not start else [], bad_functions, offered,
                                                 peer=peer, tenant=tenant)
        if self._on_refused is not None:
            refused = Counter(K.Name(a.error.kind).removeprefix("ERROR_KIND_") for a in acks if not a.accepted)
            for kind, count in refused.items():
                self._on_refused(kind, count)
        return acks

    async def _submit_slice(self, session_id: str, tasks: Sequence[tasks_pb2.TaskSpec],
                            new_functions: list[tuple[str, str, bytes]], bad_functions: dict[str, common_pb2.Error],
                            offered: set[str], *, peer: str, tenant: str) -> list[tasks_pb2.TaskAck]:
        """Validates, journals and queues tasks of a batch (with the batch's new functions,
        journaled with its first slice)."""
        now = self.book.now()
        limit = self.config.max_payload_bytes
        acks: list[tasks_pb2.TaskAck] = []
        accepted: list[Task] = []
        rows: list[tuple[str, bytes, bytes]] = []
        seen: set[str] = set()
        nbytes = 0
        never_runs = self._feasibility()
        policy = self._policy()
        pending: Counter[str] = Counter()  # per tenant: accepted in this batch
        for spec in tasks:
            error = None
            if peer:
                spec.home = peer
                if spec.tenant and not TENANT.match(spec.tenant):
                    error = common_pb2.Error(kind=K.ERROR_KIND_INVALID_ARGUMENT, message=(
                        f"task {clip(spec.task_id)}: tenant {clip(spec.tenant)!r} is not a tenant's name"))
                spec.tenant = foreign(spec.tenant, peer)
            elif spec.home or spec.tenant:
                error = common_pb2.Error(kind=K.ERROR_KIND_INVALID_ARGUMENT, message=(
                    f"task {clip(spec.task_id)}: {'home' if spec.home else 'tenant'} is set by the gateway (from the "
                    "caller's credentials), not by a client"))
            else:
                spec.tenant = tenant
            federated = self.book.federated and not spec.home
            if error is None:
                error = check_spec(spec, max_payload_bytes=limit, python_version="" if federated else self.python,
                                   site_id=self.site_id)
            if error is None:
                error = bad_functions.get(spec.function_digest)
            if error is None and spec.function_digest not in self._known_functions \
                    and spec.function_digest not in offered:
                error = common_pb2.Error(kind=K.ERROR_KIND_NOT_FOUND, message=(
                    f"task {spec.task_id}: function {spec.function_digest[:12]} is unknown to site "
                    f"{self.site_id!r}; send its bytes with the task"))
            task = None
            if error is None:
                task = Task(convert.spec_from_proto(spec), now)
                why = never_runs(task, federated)
                if why is not None:
                    error = common_pb2.Error(kind=K.ERROR_KIND_PLACEMENT, message=f"task {spec.task_id}: {why}")
            if error is not None or task is None:
                acks.append(tasks_pb2.TaskAck(task_id=clip(spec.task_id), accepted=False, error=error))
                continue
            acks.append(tasks_pb2.TaskAck(task_id=spec.task_id, accepted=True))
            if spec.task_id in seen:
                continue
            seen.add(spec.task_id)
            live = self.book.get(spec.task_id)
            if live is not None and (live.spec.tenant, live.spec.home) != (spec.tenant, spec.home):
                acks[-1] = tasks_pb2.TaskAck(task_id=spec.task_id, accepted=False, error=_id_taken(spec.task_id))
                continue
            if live is not None:  # a resubmission of a task in flight: idempotent
                live.add_session(session_id)
                continue
            refused = self._refusal(policy, task.spec, pending[task.spec.tenant])
            if refused is not None:
                acks[-1] = tasks_pb2.TaskAck(task_id=spec.task_id, accepted=False, error=refused)
                continue
            pending[task.spec.tenant] += 1
            accepted.append(task)
            # The args go to the journal as they are, beside the rest of the spec: not encoded again.
            spec.ClearField("args")
            rows.append((spec.task_id, spec.SerializeToString(), task.spec.args))
            nbytes += len(task.spec.args)

        if not accepted and not new_functions:
            return acks
        if nbytes + sum(len(p) for _, _, p in new_functions) > INLINE_JOURNAL_BYTES:
            # One step that cancelling the caller (its stream closed, its deadline passed) does
            # not split: tasks journaled but not registered would be acknowledged on a resend
            # (found journaled) and never run.
            taken = await asyncio.shield(self._spawn(self._accept_off_loop(session_id, new_functions,
                                                                           accepted, rows, now)))
        else:
            taken = self._register(session_id, new_functions, accepted,
                                   self.journal.accept(new_functions, rows, now))
        if taken:
            acks = [tasks_pb2.TaskAck(task_id=a.task_id, accepted=False, error=_id_taken(a.task_id))
                    if a.accepted and a.task_id in taken else a for a in acks]
        return acks

    def _refusal(self, policy: Policy, spec: TaskSpec, pending: int) -> common_pb2.Error | None:
        """Why the site's policy refuses a new task of its tenant, if it does: a tenant it
        does not serve or a function not on the tenant's list (PERMISSION_DENIED), or over a
        quota (QUOTA_EXCEEDED: the same task may be sent again later)."""
        tenant = spec.tenant
        why = policy.why_refused(tenant, self.site_id)
        if why is not None:
            return common_pb2.Error(kind=K.ERROR_KIND_PERMISSION_DENIED, message=f"task {spec.task_id}: {why}")
        limits = policy.limits(tenant)
        shown = tenant or "anonymous"
        if not limits.allows(spec.function_digest):
            return common_pb2.Error(kind=K.ERROR_KIND_PERMISSION_DENIED, message=(
                f"task {spec.task_id}: function {spec.function_digest[:12]} is not among those tenant {shown!r} may "
                f"run at site {self.site_id!r} (its policy's allowed_functions)"))
        if limits.max_queued and self.book.unfinished[tenant] + pending >= limits.max_queued:
            return common_pb2.Error(kind=K.ERROR_KIND_QUOTA_EXCEEDED, message=(
                f"task {spec.task_id}: tenant {shown!r} has {limits.max_queued} unfinished tasks at site "
                f"{self.site_id!r}, its quota; submit more as these finish"))
        if not self._rates.take(tenant, limits.submit_rate):
            return common_pb2.Error(kind=K.ERROR_KIND_QUOTA_EXCEEDED, message=(
                f"task {spec.task_id}: tenant {shown!r} submits faster than its quota of {limits.submit_rate:g} "
                f"tasks/s at site {self.site_id!r}; submit it again later"))
        return None

    async def _accept_off_loop(self, session_id: str, new_functions: list[tuple[str, str, bytes]],
                               accepted: list[Task], rows: list[tuple[str, bytes, bytes]], now: float) -> set[str]:
        existed = await asyncio.get_running_loop().run_in_executor(None, self.journal.accept, new_functions, rows,
                                                                   now)
        return self._register(session_id, new_functions, accepted, existed)

    def _register(self, session_id: str, new_functions: list[tuple[str, str, bytes]], accepted: list[Task],
                  existed: set[str]) -> set[str]:
        """Journaled: from here on the tasks survive a crash, and may be acknowledged. Returns
        the ids that turned out to be another owner's (refused, saying nothing of that task)."""
        taken: set[str] = set()
        for digest, _, _ in new_functions:
            self._known_functions.add(digest)  # its bytes are read back from the journal when needed
        journaled_before: list[Task] = []
        for task in accepted:
            live = self.book.get(task.task_id)
            if live is not None and (live.spec.tenant, live.spec.home) != (task.spec.tenant, task.spec.home):
                taken.add(task.task_id)
                continue
            if live is not None:  # a concurrent submit of the same task registered it meanwhile
                live.add_session(session_id)
                continue
            if task.task_id in existed:
                journaled_before.append(task)
                continue
            task.add_session(session_id)
            self.book.admit(task)
        if journaled_before:
            taken |= self._rejoin(session_id, journaled_before)
        self._pump()
        return taken

    def _rejoin(self, session_id: str, tasks: list[Task]) -> set[str]:
        """Resubmitted tasks that were journaled before and are not in memory: a finished one is
        answered from the journal; an unfinished one (its first submit journaled it but never
        registered it) is put back as at a restart. Returns the ids journaled for another
        owner: refused (the row is not theirs to read)."""
        taken: set[str] = set()
        self._commit()
        rows = self.journal.get_many([t.task_id for t in tasks])
        for task in tasks:
            task_id = task.task_id
            row = rows.get(task_id)
            if row is None:
                continue
            journaled = tasks_pb2.TaskSpec.FromString(row.spec)
            if (journaled.tenant, journaled.home) != (task.spec.tenant, task.spec.home):
                taken.add(task_id)
                continue
            if row.state in TERMINAL:
                self.hub.push({session_id}, convert.event_from_row(row.task_id, row.state, row.site, row.attempts,
                                                                   row.result, row.error))
            elif not self.book.changes:  # unless the commit failed: then the row may be stale
                logger.warning("task %s: journaled but not queued; restoring it", task_id)
                self._restore(row, "lost before it started").add_session(session_id)
        return taken


def _id_taken(task_id: str) -> common_pb2.Error:
    """A task id already used by another tenant (or peer): refused, saying nothing of that task."""
    return common_pb2.Error(kind=K.ERROR_KIND_INVALID_ARGUMENT, message=(
        f"task {clip(task_id)}: this id is taken; submit with a new id (the SDK makes a random one per task)"))
