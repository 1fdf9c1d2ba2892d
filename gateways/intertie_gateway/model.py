"""The core's own vocabulary: plain, immutable records, no wire types. Pure (stdlib only).

``convert`` turns them into wire messages at the edge; ``journal`` stores them.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


class ErrorKind(enum.IntEnum):
    """Why a task failed, numbered as the wire's ErrorKind (a unit test pins the two together)."""

    UNSPECIFIED = 0
    REMOTE = 1             # the user's function raised
    CANCELLED = 2
    TIMEOUT = 3
    PLACEMENT = 4          # no site can run it
    PAYLOAD_TOO_LARGE = 5
    NOT_FOUND = 6
    INVALID_ARGUMENT = 7
    SERIALIZATION = 8
    SITE_FAILURE = 9       # the site or worker failed, retries spent
    INTERNAL = 10
    DATASET_NOT_FOUND = 11
    UNAUTHENTICATED = 12
    PERMISSION_DENIED = 13
    QUOTA_EXCEEDED = 14

    @classmethod
    def named(cls, name: str, default: ErrorKind) -> ErrorKind:
        """The kind a wire name such as "ERROR_KIND_TIMEOUT" stands for, else ``default``."""
        return cls.__members__.get(name.removeprefix("ERROR_KIND_"), default)


# How a failed call inside Ray is to be treated (``RayRunner.outcome`` says which).
RETRY = "retry"          # the worker or node failed while running it: spend an attempt
PREEMPTED = "preempted"  # it only waited on a worker that died for another task: rerun free
INTERNAL = "internal"    # Ray refused or broke in a way no rerun fixes


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a task failed. ``exception`` is the user's exception, pickled by the worker and
    never unpickled at a gateway."""

    kind: int
    message: str
    exception_type: str = ""
    exception: bytes = b""
    traceback: str = ""


@dataclass(frozen=True, slots=True)
class Update:
    """What a task's sessions are told: it started, or how it finished."""

    task_id: str
    state: int
    site: str
    attempt: int
    result: bytes = b""
    error: Failure | None = None
    run_s: float = 0.0


# ----------------------------------------------------------------------------- metering
@dataclass(frozen=True, slots=True)
class Usage:
    """What one attempt of a task used at the site that ran it: one entry of that site's
    usage ledger, recorded in the same journal transaction as the attempt's end (the
    ``usage`` of a Finished or Requeued change), so a crash neither skips nor double-counts
    it. Reserved seconds are resources x wall time; ``cpu_time_s`` is what the worker
    measured (user + system). ``home``: the site that placed the task ("" for this one);
    ``tenant`` as this site names it ("acme", "acme@home"). ``price_per_cpu_hour``: the
    site's price label when the attempt ended (0 without one)."""

    tenant: str
    task_id: str
    attempt: int
    home: str
    outcome: str  # the attempt's end: "succeeded", "failed", "retried", "preempted", "cancelled", "dropped"
    started_at: float
    ended_at: float
    cpus: float
    gpus: float
    cpu_time_s: float
    args_bytes: int
    result_bytes: int
    dataset_bytes_pulled: int = 0  # copied to this site for the attempt's inputs
    dataset_bytes_read: int = 0  # of datasets the attempt read here
    price_per_cpu_hour: float = 0.0
    function: str = ""  # the function's name as submitted (for summaries by function)

    @property
    def wall_s(self) -> float:
        return max(0.0, self.ended_at - self.started_at)

    @property
    def cpu_s_reserved(self) -> float:
        return self.cpus * self.wall_s

    @property
    def gpu_s_reserved(self) -> float:
        return self.gpus * self.wall_s


# ----------------------------------------------------------------------------- journal changes
# What the transition function asks the journal to record; the driver commits the changes of
# one loop turn together (group commit).

@dataclass(frozen=True, slots=True)
class Placed:
    """Sent to ``site`` (possibly this one), waiting there. ``placements``: every placement
    record of the task so far (``placement.PlacementRecord``s)."""

    task_id: str
    attempts: int
    site: str
    placements: Sequence[Any]


@dataclass(frozen=True, slots=True)
class Started:
    task_id: str
    attempts: int
    site: str
    at: float


@dataclass(frozen=True, slots=True)
class Requeued:
    task_id: str
    attempts: int
    history: Sequence[dict[str, object]]
    usage: Usage | None = None  # the attempt that ended here (None: it ran elsewhere, or never started)


@dataclass(frozen=True, slots=True)
class Finished:
    task_id: str
    state: int
    attempts: int
    site: str
    at: float
    result: bytes | None
    error: Failure | None
    history: Sequence[dict[str, object]] = field(default_factory=list)
    usage: Usage | None = None  # the attempt that ended here (None: it ran elsewhere, or never started)


@dataclass(frozen=True, slots=True)
class Forgotten:
    """An unfinished task dropped from this site (its home took it back): its rows go."""

    task_id: str
    usage: Usage | None = None  # the attempt it was running here, stopped


Change = Placed | Started | Requeued | Finished | Forgotten


# ----------------------------------------------------------------------------- a task's spec
# What a client asked for, as the core reads it: built once from the wire message at the edge
# (``convert.spec_from_proto``), where ``args`` are copied out once; the parsed request
# that carried it is then free to go.

@dataclass(frozen=True, slots=True)
class DatasetInput:
    id: str
    site: str  # the site that holds it
    num_bytes: int


@dataclass(frozen=True, slots=True)
class Resources:
    cpus: float = 0.0
    gpus: float = 0.0
    memory_bytes: int = 0
    custom: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Constraints:
    accelerator: str = ""
    arch: str = ""
    site: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)


NO_RESOURCES = Resources()
NO_CONSTRAINTS = Constraints()

# What a task asks of an accelerator type, as Ray's own accelerator_type resources expect.
ACCELERATOR_SHARE = 0.001


@dataclass(frozen=True, slots=True)
class TaskSpec:
    task_id: str
    function_digest: str
    args: bytes  # cloudpickled by the client; opaque here, unpickled only by Ray workers
    name: str = ""
    resources: Resources = NO_RESOURCES
    constraints: Constraints = NO_CONSTRAINTS
    max_retries: int = 0
    timeout_s: float = 0.0
    batch: bool = False
    python_version: str = ""
    home: str = ""  # the site that forwarded it here ("": a client's task, this site is its home)
    inputs: tuple[DatasetInput, ...] = ()
    returns_dataset: bool = False
    tenant: str = ""  # whose task: a tenant of this site, or "tenant@home" for a forwarded one

    def ray_request(self) -> dict[str, float]:
        """The resources in Ray's names; zero entries dropped."""
        res = self.resources
        out = {"CPU": res.cpus, "GPU": res.gpus, "memory": float(res.memory_bytes), **res.custom}
        if self.constraints.accelerator:
            out[f"accelerator_type:{self.constraints.accelerator}"] = ACCELERATOR_SHARE
        return {k: float(v) for k, v in out.items() if v}
