"""Intertie: federated job execution over independently run Ray clusters.

>>> import intertie
>>> fed = intertie.connect()                # an embedded local site; or connect("host:port")
>>> @intertie.remote(cpus=1)
... def square(x): return x * x
>>> square.submit(4).result()
16
"""

from __future__ import annotations

from typing import Any

from intertie.client import Federation
from intertie.datasets import DatasetRef
from intertie.errors import (
    AuthenticationError,
    DatasetNotFoundError,
    IntertieError,
    InvalidRequestError,
    PayloadTooLargeError,
    PermissionDeniedError,
    PlacementError,
    RemoteTaskError,
    SerializationError,
    SiteFailureError,
    SiteUnavailableError,
    TaskCancelledError,
    TaskNotFoundError,
    TaskTimeoutError,
)
from intertie.executor import FederationExecutor
from intertie.futures import TaskFuture
from intertie.remote import RemoteFunction, remote
from intertie.spec import Resources, SiteStatus, TaskInfo, TaskOptions

__version__ = "0.1.0"


def connect(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None,
            state_dir: str | None = None, **kwargs: Any) -> Federation:
    """Connects to a gateway at ``address`` ("host:port"), which becomes the tasks' home.

    With no address (and no ``INTERTIE_ADDRESS`` in the environment) an embedded
    local site is started: a gateway child process with its own Ray, stopped when
    the connection is closed or the program exits.
    """
    import os

    address = address or os.environ.get("INTERTIE_ADDRESS") or None
    if address is not None:
        return Federation(address, **kwargs)
    from intertie.embedded import EmbeddedGateway

    gateway = EmbeddedGateway(num_cpus=num_cpus, num_gpus=num_gpus, state_dir=state_dir)
    try:
        return Federation(gateway.address, on_close=gateway.stop, **kwargs)
    except BaseException:
        gateway.stop()
        raise


__all__ = [
    "AuthenticationError",
    "DatasetNotFoundError",
    "DatasetRef",
    "Federation",
    "FederationExecutor",
    "IntertieError",
    "InvalidRequestError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "PlacementError",
    "RemoteFunction",
    "RemoteTaskError",
    "Resources",
    "SerializationError",
    "SiteFailureError",
    "SiteStatus",
    "SiteUnavailableError",
    "TaskCancelledError",
    "TaskFuture",
    "TaskInfo",
    "TaskNotFoundError",
    "TaskOptions",
    "TaskTimeoutError",
    "__version__",
    "connect",
    "remote",
]
