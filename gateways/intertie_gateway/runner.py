"""The gateway's side of Ray: start or attach (``ray_attach``), ship functions once, run
and cancel tasks."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from typing import Any

from intertie_gateway.config import GatewayConfig
from intertie_gateway.model import INTERNAL, PREEMPTED, RETRY
from intertie_gateway.ray_attach import init_within, prepare_attach
from intertie_gateway.worker import KV_NAMESPACE, KV_PREFIX, Outcome, PoolWorker, Stored, execute

logger = logging.getLogger(__name__)

# Functions up to this size go into the GCS key-value store, where a worker reads them
# once; larger ones into the object store, passed as a nested ref (which costs ~0.1 ms
# more per task submission for Ray's reference bookkeeping).
KV_FUNCTION_LIMIT = 512 * 1024
# Tasks that ask for exactly one CPU (the default) go to a pool of long-lived workers, one
# per CPU: an actor call skips Ray's per-task worker lease and costs about half a plain
# task's round trip. Everything else is a plain Ray task with its resources.
POOL_REQUEST = {"CPU": 1.0}
class _Slot:
    """One pooled worker (a Ray actor) and the tasks sent to it, in the order it runs them;
    ``node``: the Ray node it was placed on (one worker per CPU of each node)."""

    __slots__ = ("actor", "inflight", "dead", "killed", "culprit", "node", "retired")

    def __init__(self, actor: Any, node: str = "") -> None:
        self.actor = actor
        self.node = node
        self.inflight: list[Running] = []
        self.dead = False
        self.killed = False  # the gateway stopped it (cancel or timeout of its running task)
        self.culprit: Running | None = None  # the task it was running when it died
        self.retired = False  # its node left the cluster: no new work, stopped once idle


class Running:
    """A task inside Ray: its object ref and, for pooled tasks, the worker it was sent to."""

    __slots__ = ("ref", "slot", "index")

    def __init__(self, ref: Any, slot: _Slot | None = None, index: int = -1) -> None:
        self.ref = ref
        self.slot = slot
        self.index = index


class RayRunner:
    def __init__(self, config: GatewayConfig) -> None:
        # Ray would otherwise try to report usage over the network at start.
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        started = time.monotonic()
        # Before Ray is imported: it reads its auth settings from the environment once.
        auth = "" if config.ray == "local" else prepare_attach(config.ray, config.ray_token_file,
                                                                config.ray_connect_timeout_s)
        import ray

        self._ray = ray
        kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=config.log_to_driver,
                                      namespace="intertie", logging_level=logging.WARNING)
        if config.ray == "local":
            kwargs.update(address="local", num_cpus=config.num_cpus, num_gpus=config.num_gpus,
                          resources=dict(config.resources) or None,
                          object_store_memory=config.embedded_object_store_bytes)
            logger.info("starting an embedded Ray")
            ray.init(**kwargs)
        else:
            kwargs.update(address=config.ray)
            init_within(ray, kwargs, config.ray_connect_timeout_s - (time.monotonic() - started), config.ray)
            nodes = self._nodes()
            logger.info("attached to Ray at %s (%s): %d nodes, %s in total, the largest node %s", config.ray, auth,
                        len(nodes), _shown(self.total_resources()), _shown(self.largest_node()))
        self._remote = ray.remote(execute)
        self._variants: dict[tuple[Any, ...], Any] = {}
        self._functions: dict[str, list[Any] | None] = {}
        # Pooled workers take no CPU in Ray's books: the gateway's admission control is what
        # keeps them within the site's CPUs. Each node gets one per CPU (Ray would put
        # them all on the gateway's node, which asks nothing of any).
        self._pool_class = ray.remote(PoolWorker)
        self._worker_pool = config.worker_pool
        # The site's dataset endpoint, and the size from which a Table result stays there (0: never).
        self._results_at = ""
        self._results_threshold = 0
        self._slots: list[_Slot] = []
        self.refresh_pool()

    def total_resources(self) -> dict[str, float]:
        return _requestable(self._ray.cluster_resources())

    def _nodes(self) -> list[tuple[str, dict[str, float]]]:
        """The live nodes of the cluster: (node id, resources)."""
        return [(node["NodeID"], _requestable(node.get("Resources") or {}))
                for node in self._ray.nodes() if node.get("Alive")]

    def largest_node(self) -> dict[str, float]:
        """The most of each resource any one live node has: a task runs on one node."""
        largest: dict[str, float] = {}
        for _, resources in self._nodes():
            for name, amount in resources.items():
                largest[name] = max(largest.get(name, 0.0), amount)
        return largest

    def refresh_pool(self) -> None:
        """One pooled worker per CPU of each live node: workers of a node that joined are
        started, those of a node that left are retired (their tasks came back from Ray as
        failed with the node; they get no new ones)."""
        if not self._worker_pool:
            return
        want = {node: int(resources.get("CPU", 0.0)) for node, resources in self._nodes()}
        have: dict[str, int] = {}
        for slot in self._slots:
            if slot.node not in want or have.get(slot.node, 0) >= want[slot.node]:
                slot.retired = True
            else:
                have[slot.node] = have.get(slot.node, 0) + 1
        for node, count in want.items():
            for _ in range(count - have.get(node, 0)):
                self._slots.append(self._new_slot(node))
        for slot in [s for s in self._slots if s.retired and not s.inflight]:
            self._slots.remove(slot)
            with contextlib.suppress(Exception):
                self._ray.kill(slot.actor, no_restart=True)

    def _new_slot(self, node: str) -> _Slot:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # Hard affinity: a soft one lets Ray put the worker elsewhere whenever the node is
        # busy starting workers, and the pool piles up on one node. A worker whose node
        # left is not replaced (``_replace``).
        actor = self._pool_class.options(num_cpus=0, max_restarts=0, max_task_retries=0,
                                         scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
        slot = _Slot(actor, node)
        self._configure(slot)
        return slot

    def has_function(self, digest: str) -> bool:
        return digest in self._functions

    def put_function(self, digest: str, payload: bytes) -> None:
        """Ships a function's bytes into Ray once; tasks then refer to it by digest."""
        if digest in self._functions:
            return
        if len(payload) <= KV_FUNCTION_LIMIT:
            from ray.experimental import internal_kv

            internal_kv._internal_kv_put(KV_PREFIX + digest.encode(), payload, overwrite=True,
                                         namespace=KV_NAMESPACE)
            self._functions[digest] = None
        else:
            self._functions[digest] = [self._ray.put(payload)]

    @property
    def pool_size(self) -> int:
        return sum(1 for slot in self._slots if not slot.retired)

    def pooled(self, request: Mapping[str, float]) -> bool:
        """Whether tasks with this request run on the pool of long-lived workers."""
        return bool(self._slots) and request == POOL_REQUEST

    def _least_loaded(self) -> tuple[int, _Slot]:
        index = min((i for i, slot in enumerate(self._slots) if not slot.retired),
                    key=lambda i: len(self._slots[i].inflight))
        return index, self._slots[index]

    def keep_results_at(self, address: str, threshold: int) -> None:
        """Table results of at least ``threshold`` bytes stay at the site: workers store them
        at its dataset endpoint ``address``. Pooled workers are told once, not per task."""
        self._results_at, self._results_threshold = address, threshold
        for slot in self._slots:
            self._configure(slot)

    def _configure(self, slot: _Slot) -> None:
        if self._results_threshold:
            slot.actor.configure.remote((self._results_at, self._results_threshold))

    def submit_many(self, digest: str, items: list[tuple[str, bytes, bool, str]],
                    request: Mapping[str, float], *, tenants: Sequence[str] = ()) -> Running:
        """Several tasks of one function, (name, args, batch, task id) each, in one call to a
        pooled worker; the ref resolves to their outcomes, in order. ``tenants``: each task's
        (whose its stored results are; none given: "")."""
        holder = self._functions[digest]
        extra = () if holder is None else (holder,)
        index, slot = self._least_loaded()
        owned = [(*item, tenant) for item, tenant in zip(items, [*tenants] or [""] * len(items), strict=True)]
        running = Running(slot.actor.execute_many.remote(digest, owned, *extra), slot, index)
        slot.inflight.append(running)
        return running

    def submit(self, digest: str, name: str, args: bytes, batch: bool, request: Mapping[str, float],
               inputs: dict[str, str] | None = None, *, task_id: str = "", returns_dataset: bool = False,
               tenant: str = "") -> Running:
        """Starts a task in Ray; the caller watches ``running.ref``. ``inputs`` maps the
        dataset ids in its arguments to where the worker reads them. A function declared
        ``returns_dataset`` stores its Table at the site under the task's id. Tables stored at
        the site belong to ``tenant``, the task's."""
        pooled = self.pooled(request)
        stored: Stored | None = None
        if returns_dataset or (self._results_threshold and not pooled):  # pooled workers know the site
            stored = (self._results_at, self._results_threshold, returns_dataset, task_id, tenant)
        extra: tuple[Any, ...] = (self._functions[digest], inputs or None, stored)
        while extra and extra[-1] is None:  # nothing to send for plain tasks
            extra = extra[:-1]
        if pooled:
            index, slot = self._least_loaded()
            owner = {"tenant": tenant} if tenant else {}
            running = Running(slot.actor.execute.remote(digest, args, name, batch, *extra, **owner), slot, index)
            slot.inflight.append(running)
        else:
            running = Running(self._variant(request).remote(digest, args, name, batch, *extra))
        return running

    def _variant(self, request: Mapping[str, float]) -> Any:
        key = tuple(sorted(request.items()))
        variant = self._variants.get(key)
        if variant is None:
            custom = {k: v for k, v in request.items() if k not in ("CPU", "GPU", "memory")}
            # Retries are the gateway's decision (it counts attempts across restarts).
            variant = self._remote.options(num_cpus=request.get("CPU", 0.0), num_gpus=request.get("GPU", 0.0),
                                           memory=int(request.get("memory", 0)) or None,
                                           resources=custom or None, max_retries=0, retry_exceptions=False)
            self._variants[key] = variant
        return variant

    def outcome(self, running: Running, fut: Future[Outcome]) -> tuple[str, Any]:
        """What became of a task whose ref resolved: ("ok", Outcome) or (RETRY | PREEMPTED |
        INTERNAL, exception). Called on the gateway's loop, once per ref."""
        try:
            return "ok", fut.result()
        except Exception as exc:
            return self._classify(running, exc), exc
        finally:
            if running.slot is not None:
                try:
                    running.slot.inflight.remove(running)
                except ValueError:
                    pass

    def _classify(self, running: Running, exc: BaseException) -> str:
        from ray import exceptions as rex

        slot = running.slot
        if slot is not None and isinstance(exc, (rex.ActorDiedError, rex.ActorUnavailableError)):
            if slot.killed:
                return PREEMPTED  # the gateway stopped the worker for another task
            if not slot.dead:
                slot.culprit = slot.inflight[0] if slot.inflight else None
                logger.warning("pooled worker %d died; starting another", running.index)
                self._replace(slot, running.index)
            # The worker ran its tasks in order; the others only waited behind the one it died in.
            return RETRY if slot.culprit is None or slot.culprit is running else PREEMPTED
        if isinstance(exc, (rex.WorkerCrashedError, rex.NodeDiedError, rex.ObjectLostError,
                            rex.RaySystemError, rex.LocalRayletDiedError, rex.OutOfMemoryError,
                            rex.TaskUnschedulableError, rex.RuntimeEnvSetupError, rex.ActorDiedError)):
            return RETRY
        return INTERNAL

    def cancel(self, running: Running) -> None:
        """Stops a task. A pooled task still waiting is cancelled in Ray; a running one takes
        its worker with it (an actor task cannot be interrupted), and the tasks queued behind
        it come back PREEMPTED, to be rerun without spending an attempt."""
        slot = running.slot
        if slot is None:
            try:
                self._ray.cancel(running.ref, force=True)
            except Exception as exc:  # already finished, or the worker is gone
                logger.debug("ray.cancel: %s", exc)
            return
        if slot.dead or running not in slot.inflight:
            return
        if slot.inflight[0] is not running:
            try:
                self._ray.cancel(running.ref)
                return
            except Exception as exc:
                logger.debug("ray.cancel of a waiting pooled task: %s", exc)
        slot.killed = True
        try:
            self._ray.kill(slot.actor, no_restart=True)
        except Exception as exc:
            logger.debug("ray.kill: %s", exc)
        self._replace(slot, running.index)

    def _replace(self, slot: _Slot, index: int) -> None:
        """A pooled worker died: another takes its place on its node, unless the node left
        the cluster (then its CPUs are gone too, until ``refresh_pool`` sees a change)."""
        slot.dead = True
        for i, other in enumerate(self._slots):  # (indexes shift when retired workers are dropped)
            if other is slot:
                if slot.retired or slot.node not in {node for node, _ in self._nodes()}:
                    del self._slots[i]
                else:
                    self._slots[i] = self._new_slot(slot.node)
                return

    def shutdown(self) -> None:
        try:
            self._ray.shutdown()
        except Exception:
            logger.exception("ray.shutdown failed")


def _requestable(resources: Mapping[str, Any]) -> dict[str, float]:
    """Resources tasks can ask for: node:* and object-store entries are Ray's bookkeeping."""
    return {k: float(v) for k, v in resources.items() if not k.startswith("node:") and k != "object_store_memory"}


def _shown(resources: Mapping[str, float]) -> str:
    """CPUs, GPUs and custom resources, for the log (memory in bytes is noise there)."""
    return ", ".join(f"{name}={amount:g}" for name, amount in sorted(resources.items())
                     if not name.startswith(("memory", "accelerator_type:"))) or "nothing"
