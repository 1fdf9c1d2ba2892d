"""Dataset arguments of the tasks that run here: where the worker reads each one, and the
transfers that bring those held by other sites (one per dataset, however many tasks wait
for it; each blocks a thread of its own pool while it lasts).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from intertie_gateway.book import Task, TaskBook
from intertie_gateway.datasets import DatasetError
from intertie_gateway.dispatch import Slots
from intertie_gateway.lifecycle import WAITING_HERE, Phase
from intertie_gateway.model import DatasetInput, ErrorKind, Failure

if TYPE_CHECKING:
    from intertie_gateway.dataplane import DataPlane

logger = logging.getLogger(__name__)

# Datasets fetched from other sites at once (each transfer holds a thread).
MAX_TRANSFERS = 4


class Transfers:
    """``store``: this site's data plane (None: it keeps no datasets). ``up_statuses``: the
    last status of each peer that is up (what it holds, where it serves). ``spawn`` runs a
    coroutine in the background; ``done`` is the driver's commit-and-pump, after a fetch
    ended; ``draining`` says whether the gateway is stopping; ``on_pulled(site, bytes)`` is
    told of each dataset pulled here (metrics)."""

    def __init__(self, book: TaskBook, slots: Slots, store: DataPlane | None,
                 up_statuses: Callable[[], list[Any]], *,
                 site_id: str, pull_timeout_s: float, spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]],
                 done: Callable[[], None], draining: Callable[[], bool], isolated: bool = False,
                 on_pulled: Callable[[str, int], None] | None = None) -> None:
        self.book = book
        self.slots = slots
        self.store = store
        self._up_statuses = up_statuses
        self.site_id = site_id
        self.pull_timeout_s = pull_timeout_s
        self._spawn = spawn
        self._done = done
        self._draining = draining
        self._isolated = isolated  # token auth: a task reads only its own tenant's datasets
        self._on_pulled = on_pulled or (lambda site, num_bytes: None)
        # (dataset id, for whom) -> its transfer here, under way
        self._pulls: dict[tuple[str, str | None], asyncio.Future[Any]] = {}
        # Transfers block a thread each while they last; their own pool keeps them from
        # starving the journal's (the loop's default executor).
        self._pool = ThreadPoolExecutor(MAX_TRANSFERS, thread_name_prefix="intertie-pull")

    def inputs_for(self, task: Task) -> dict[str, str] | None:
        """Where the worker reads each dataset argument (a local path it memory-maps, or
        ``flight://HOST:PORT`` of this site's endpoint); None while some are fetched from
        the sites that hold them (the task is FETCHING, and comes back to the queue)."""
        paths: dict[str, str] = {}
        missing = []
        # A local path serves workers on this machine only: on a Ray of several nodes every
        # worker reads over this site's Flight endpoint (it must then listen on an address the
        # nodes reach: --flight-listen).
        remote_workers = self.slots.capacity.spans_nodes
        owner = self._owner(task)
        for item in task.spec.inputs:
            where = self.store.location(item.id, owner) if self.store is not None else None
            if where is None or self.store is None:
                missing.append(item)
            else:
                paths[item.id] = f"flight://{self.store.worker_endpoint}" if remote_workers or not where else where
        if not missing:
            return paths
        self.book.move(task, Phase.FETCHING)
        self._spawn(self._fetch(task, missing))
        return None

    def sources(self, dataset_id: str, holder: str) -> list[tuple[str, str]]:
        """(site, Flight address) of the up peers that hold a dataset: the site its ref
        names first, then those that list a replica (read from Flight threads too). Peers
        read at each other's peers' endpoint (mutual TLS) where there is one."""
        found = [(s.site_id != holder, s.site_id, s.peer_flight_address or s.flight_address)
                 for s in self._up_statuses() if s.flight_address and (s.site_id == holder or dataset_id in s.dataset_owners)]
        return [(site, address) for _, site, address in sorted(found)]

    def peer_flight_addresses(self) -> list[str]:
        """The dataset endpoints of the up peers: told when an original is deleted."""
        return [s.peer_flight_address or s.flight_address for s in self._up_statuses() if s.flight_address]

    def _owner(self, task: Task) -> str | None:
        """Whose datasets a task may read (None: anyone's, without token auth)."""
        return task.spec.tenant if self._isolated else None

    async def _fetch(self, task: Task, missing: list[DatasetInput]) -> None:
        try:
            for item in missing:
                if self.store is None:
                    raise DatasetError("ERROR_KIND_DATASET_NOT_FOUND", f"site {self.site_id!r} keeps no datasets")
                if item.site == self.site_id and not self.sources(item.id, item.site):
                    raise DatasetError("ERROR_KIND_DATASET_NOT_FOUND",
                                       f"task {task.task_id}: dataset {item.id} is not at site {self.site_id!r}")
                key = (item.id, self._owner(task))
                pull = self._pulls.get(key)
                caused = pull is None  # one transfer per dataset and tenant, however many tasks wait for it
                if pull is None:
                    pull = self._pulls[key] = self._spawn(self._pull(item, key[1]))
                num_bytes = await asyncio.shield(pull)
                if caused:
                    # Metered once: for the task whose input started the transfer (its next
                    # attempt's Usage), not for the others that waited for the same one.
                    task.pulled += num_bytes
                if self.store.location(item.id, self._owner(task)) is None:  # here now, but another tenant's
                    raise DatasetError("ERROR_KIND_DATASET_NOT_FOUND", f"dataset {item.id} is not at site "
                                       f"{self.site_id!r}, and no site holds it")
        except Exception as exc:
            if self._draining():  # stopping: the task stays QUEUED in the journal and fetches again
                return
            logger.warning("task %s: fetching its data failed: %s", task.task_id, exc)
            if task.phase is Phase.FETCHING:
                kind = ErrorKind.named(getattr(exc, "kind", ""), ErrorKind.SITE_FAILURE)
                self.book.move(task, Phase.FAILED, error=Failure(kind, (
                    str(exc) if isinstance(exc, DatasetError)
                    else f"task {task.task_id}: its dataset could not be fetched to site {self.site_id!r}: {exc}")))
        else:
            if task.phase is Phase.FETCHING:
                self.book.move(task, Phase.QUEUED, front=True)
        finally:
            self._done()

    async def _pull(self, item: DatasetInput, owner: str | None) -> int:
        """Copies a dataset here for tasks of ``owner`` (None: anyone's): another tenant's is
        refused before any of it moves. Returns the bytes copied."""
        assert self.store is not None
        store = self.store
        try:
            started = time.monotonic()
            meta = await asyncio.get_running_loop().run_in_executor(
                self._pool, functools.partial(store.pull, item.id, lambda: self.sources(item.id, item.site),
                                              timeout_s=self.pull_timeout_s, owner=owner))
            elapsed = time.monotonic() - started
            self._on_pulled(meta.origin or item.site, meta.num_bytes)
            logger.info("pulled dataset %s (%d bytes) from %s in %.2f s (%.0f MB/s)", item.id, meta.num_bytes,
                        meta.origin, elapsed, meta.num_bytes / max(elapsed, 1e-9) / 1e6)
            # On the loop, so no task starts reading a replica while it is chosen for eviction;
            # kept: what running tasks read and what queued or fetching tasks here wait for.
            keep = set(self.slots.reading) | {item.id} | {
                i.id for t in self.book.tasks.values()
                if t.spec.inputs and t.phase in WAITING_HERE and t.site == self.site_id
                for i in t.spec.inputs}
            try:
                store.evict(keep)
            except Exception:
                logger.exception("evicting replicas after pulling %s failed", item.id)
            return meta.num_bytes
        finally:
            self._pulls.pop((item.id, owner), None)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
