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
    LedgerVerificationError,
    PayloadTooLargeError,
    PermissionDeniedError,
    PlacementError,
    QuotaExceededError,
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


def connect(address: str | Any | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None,
            state_dir: str | None = None, **kwargs: Any) -> Federation:
    """Connects to a gateway at ``address`` ("host:port"), which becomes the tasks' home.

    With no address (and no ``INTERTIE_ADDRESS`` in the environment) an embedded
    local site is started: a gateway child process with its own Ray, stopped when
    its last connection is closed or the program exits; connecting again while one is
    open (a re-run notebook cell) reuses it. An empty address is an error, as is a
    malformed one; a refused connection or an unknown host fails within seconds.
    ``kwargs`` go to :class:`Federation`: ``token`` (a tenant's token, for a gateway with
    token auth; default ``INTERTIE_TOKEN``), ``tls_ca`` (the CA certificate of a gateway
    serving TLS, a file or PEM bytes; default ``INTERTIE_TLS_CA``), ``connect_timeout``,
    ``unavailable_timeout`` (how long the home may be unreachable before waiting futures
    fail; default 30 s), ``cancel_on_interrupt`` (Ctrl-C while waiting cancels the tasks
    waited for; default True). The embedded site makes a token for its program itself.
    ``address`` may also be a site or a federation started with :mod:`intertie.embedded`
    (its first site): its address, token and CA are used.
    """
    from intertie import client

    return client.connect(address, num_cpus=num_cpus, num_gpus=num_gpus, state_dir=state_dir, **kwargs)


__all__ = [
    "AuthenticationError",
    "DatasetNotFoundError",
    "DatasetRef",
    "Federation",
    "FederationExecutor",
    "IntertieError",
    "InvalidRequestError",
    "LedgerVerificationError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "PlacementError",
    "QuotaExceededError",
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
