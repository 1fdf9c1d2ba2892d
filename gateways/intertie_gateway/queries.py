"""What clients and peers read: a task (live from the book, or finished from the journal),
a session's subscriptions, this site's status and the catalogue of the federation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from intertie.v1 import site_pb2, tasks_pb2
from intertie_gateway import convert
from intertie_gateway.book import TaskBook
from intertie_gateway.config import GatewayConfig
from intertie_gateway.dispatch import Dispatch
from intertie_gateway.estimates import Estimates
from intertie_gateway.federate import ARCH, Federate
from intertie_gateway.journal import TERMINAL, Journal
from intertie_gateway.policy import Policy
from intertie_gateway.sessions import SessionHub
from intertie_gateway.tenancy import ANONYMOUS, SERVES_NO_ONE, Caller, may_see

if TYPE_CHECKING:
    from intertie_gateway.dataplane import DataPlane


class Queries:
    """``commit``: the driver's group commit; a task that finished this turn must say so in
    the journal before its row is read."""

    def __init__(self, book: TaskBook, journal: Journal, hub: SessionHub, dispatch: Dispatch, federate: Federate,
                 estimates: Estimates, *, config: GatewayConfig, python: str, address: str, store: DataPlane | None,
                 draining: Callable[[], bool], commit: Callable[[], None],
                 policy: Callable[[], Policy] = Policy) -> None:
        self.book = book
        self.journal = journal
        self.hub = hub
        self.dispatch = dispatch
        self.federate = federate
        self.estimates = estimates
        self.config = config
        self.python = python
        self.address = address
        self.store = store
        self._draining = draining
        self._commit = commit
        self._policy = policy

    @property
    def flight_address(self) -> str:
        """This site's dataset endpoint (the data plane keeps its port across restarts)."""
        return self.store.address if self.store is not None else ""

    def sees(self, who: Caller, tenant: str, home: str) -> bool:
        return may_see(tenant, home, who, isolated=self.config.auth == "token")

    def visible(self, task_ids: Sequence[str], who: Caller) -> list[str]:
        """The unfinished tasks among ``task_ids`` that ``who`` may see."""
        return [i for i in task_ids if (t := self.book.get(i)) is not None and self.sees(who, t.spec.tenant, t.spec.home)]

    def owned(self, tenant: str) -> list[str]:
        """The unfinished tasks of one of this site's tenants whose home is here."""
        return [t.task_id for t in self.book.tasks.values() if not t.spec.home and t.spec.tenant == tenant]

    def subscribe(self, session_id: str, task_ids: Sequence[str], who: Caller = ANONYMOUS) -> list[str]:
        """Adds tasks to a session; finished ones are answered at once from the journal.
        Returns the ids unknown here (and those ``who`` may not see: the same to the caller)."""
        unknown: list[str] = []
        lookup: list[str] = []
        for task_id in task_ids:
            task = self.book.get(task_id)
            if task is not None:
                if self.sees(who, task.spec.tenant, task.spec.home):
                    task.add_session(session_id)
                else:
                    unknown.append(task_id)
            else:
                lookup.append(task_id)
        if lookup:
            if self.book.changes:
                self._commit()
            rows = self.journal.get_many(lookup)
            for task_id in lookup:
                row = rows.get(task_id)
                if row is None or row.state not in TERMINAL or not self._sees_row(who, row.spec):
                    unknown.append(task_id)  # (journaled, unfinished, not in memory: not after recovery)
                else:
                    self.hub.push({session_id}, convert.event_from_row(row.task_id, row.state, row.site,
                                                                       row.attempts, row.result, row.error))
        return unknown

    def _sees_row(self, who: Caller, blob: bytes) -> bool:
        if self.config.auth != "token" and not who.peer:
            return True  # (no parse)
        spec = tasks_pb2.TaskSpec.FromString(blob)
        return self.sees(who, spec.tenant, spec.home)

    def info(self, task_id: str, who: Caller = ANONYMOUS) -> tasks_pb2.TaskInfo | None:
        """What ``who`` may know of a task (None: unknown here, or not theirs to see)."""
        task = self.book.get(task_id)
        if task is not None:
            spec = task.spec
            if not self.sees(who, spec.tenant, spec.home):
                return None
            return tasks_pb2.TaskInfo(
                task_id=task_id, name=spec.name, state=task.state, site=task.site,  # type: ignore[arg-type]
                attempts=task.attempts, max_retries=spec.max_retries, submitted_at=task.submitted_at,
                started_at=task.started_at, resources=convert.resources_to_proto(spec.resources),
                history=convert.attempts(task.history),
                placements=[convert.placement_to_proto(p) for p in task.placements],
                home=spec.home or self.config.site_id, tenant=spec.tenant)
        if self.book.changes:
            self._commit()
        row = self.journal.get(task_id)
        if row is None:
            return None
        wire = tasks_pb2.TaskSpec.FromString(row.spec)
        if not self.sees(who, wire.tenant, wire.home):
            return None
        info = tasks_pb2.TaskInfo(
            task_id=task_id, name=wire.name, state=row.state, site=row.site,  # type: ignore[arg-type]
            attempts=row.attempts, max_retries=wire.max_retries, submitted_at=row.submitted_at,
            started_at=row.started_at, finished_at=row.finished_at, resources=wire.resources,
            history=convert.attempts(row.history),
            placements=tasks_pb2.TaskInfo.FromString(row.placements).placements if row.placements else [],
            home=wire.home or self.config.site_id, tenant=wire.tenant)
        if row.error:
            info.error.ParseFromString(row.error)
            info.error.exception = b""  # pickled bytes are for the result stream, not for display
        return info

    def status(self) -> site_pb2.SiteStatus:
        capacity = self.dispatch.capacity
        return site_pb2.SiteStatus(
            site_id=self.config.site_id, compute_id=self.config.compute_id, address=self.address,
            state="draining" if self._draining() else "up", arch=ARCH, python_version=self.python,
            resources_total=capacity.total, resources_node_max=capacity.node_max, resources_free=capacity.free(),
            queued=self.dispatch.queued(), overhead_s=capacity.overhead_s or 0.0,
            running=self.dispatch.slots.running, throughput=self.estimates.throughput(time.time()),
            labels=dict(self.config.labels), max_payload_bytes=self.config.max_payload_bytes, version=_version(),
            movable=len(self.dispatch.movable()), mean_run_s=capacity.mean_run_s or 0.0,
            accelerators=sorted(k.split(":", 1)[1] for k in capacity.total if k.startswith("accelerator_type:")),
            last_seen=time.time(), flight_address=self.flight_address,
            peer_flight_address=self.store.peer_address if self.store is not None else "",
            accepts=list(self._policy().accept) or [SERVES_NO_ONE],
            dataset_owners=self.store.owners() if self.store is not None else {})

    def catalogue(self) -> list[site_pb2.SiteStatus]:
        """This site, then its peers as last seen."""
        return [self.status(), *self.federate.federation.catalogue()]


def _version() -> str:
    from intertie import __version__

    return __version__
