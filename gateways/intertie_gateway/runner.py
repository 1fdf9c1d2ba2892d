"""The gateway's side of Ray: start or attach, ship functions once, run and cancel tasks."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any

from intertie_gateway.config import GatewayConfig
from intertie_gateway.worker import KV_NAMESPACE, KV_PREFIX, Outcome, execute

logger = logging.getLogger(__name__)

# Functions up to this size go into the GCS key-value store, where a worker reads them
# once; larger ones into the object store, passed as a nested ref (which costs ~0.1 ms
# more per task submission for Ray's reference bookkeeping).
KV_FUNCTION_LIMIT = 512 * 1024


class RayRunner:
    def __init__(self, config: GatewayConfig) -> None:
        import ray

        self._ray = ray
        # Ray would otherwise try to report usage over the network at start.
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=config.log_to_driver,
                                      namespace="intertie", logging_level=logging.WARNING)
        if config.ray == "local":
            kwargs.update(address="local", num_cpus=config.num_cpus, num_gpus=config.num_gpus,
                          resources=dict(config.resources) or None,
                          object_store_memory=config.object_store_memory)
        else:
            kwargs.update(address=config.ray)
        logger.info("starting Ray (%s)", config.ray)
        ray.init(**kwargs)
        self._remote = ray.remote(execute)
        self._variants: dict[tuple[Any, ...], Any] = {}
        self._functions: dict[str, list[Any] | None] = {}

    def total_resources(self) -> dict[str, float]:
        # node:* and object-store entries are Ray's bookkeeping, not something tasks ask for.
        return {k: float(v) for k, v in self._ray.cluster_resources().items()
                if not k.startswith("node:") and k != "object_store_memory"}

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

    def submit(self, digest: str, name: str, args: bytes, batch: bool, request: Mapping[str, float],
               on_done: Callable[[Future[Outcome]], object]) -> Any:
        key = tuple(sorted(request.items()))
        variant = self._variants.get(key)
        if variant is None:
            custom = {k: v for k, v in request.items() if k not in ("CPU", "GPU", "memory")}
            # Retries are the gateway's decision (it counts attempts across restarts).
            variant = self._remote.options(num_cpus=request.get("CPU", 0.0), num_gpus=request.get("GPU", 0.0),
                                           memory=int(request.get("memory", 0)) or None,
                                           resources=custom or None, max_retries=0, retry_exceptions=False)
            self._variants[key] = variant
        holder = self._functions[digest]
        ref = (variant.remote(digest, args, name, batch) if holder is None
               else variant.remote(digest, args, name, batch, holder))
        ref.future().add_done_callback(on_done)
        return ref

    def cancel(self, ref: Any) -> None:
        try:
            self._ray.cancel(ref, force=True)
        except Exception as exc:  # already finished, or the worker is gone
            logger.debug("ray.cancel: %s", exc)

    def is_system_failure(self, exc: BaseException) -> bool:
        """A failure of the worker or node, not of the task: worth another attempt."""
        from ray import exceptions as rex

        return isinstance(exc, (rex.WorkerCrashedError, rex.NodeDiedError, rex.ObjectLostError,
                                rex.RaySystemError, rex.LocalRayletDiedError, rex.OutOfMemoryError,
                                rex.TaskUnschedulableError, rex.RuntimeEnvSetupError))

    def shutdown(self) -> None:
        try:
            self._ray.shutdown()
        except Exception:
            logger.exception("ray.shutdown failed")
