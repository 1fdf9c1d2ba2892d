"""Frozen value types that users and the scheduler see; protobuf stops at to_proto/from_proto."""

from __future__ import annotations

import dataclasses
import math
import platform
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from intertie.v1 import common_pb2, site_pb2, tasks_pb2

# Defaults a task gets when the user says nothing: one CPU, as in Ray, and three
# retries after a worker or site failure (user exceptions are never retried).
DEFAULT_CPUS = 1.0
DEFAULT_MAX_RETRIES = 3

TASK_STATES = {
    tasks_pb2.TASK_STATE_QUEUED: "QUEUED",
    tasks_pb2.TASK_STATE_RUNNING: "RUNNING",
    tasks_pb2.TASK_STATE_SUCCEEDED: "SUCCEEDED",
    tasks_pb2.TASK_STATE_FAILED: "FAILED",
    tasks_pb2.TASK_STATE_CANCELLED: "CANCELLED",
}
TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})


def python_version() -> str:
    """The running interpreter's minor version, e.g. "3.11": pickles cross only between equals."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def machine_arch() -> str:
    return platform.machine().lower()


def _number(name: str, value: Any, *, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if math.isnan(value) or value < 0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if integer and int(value) != value:
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return value


@dataclass(frozen=True)
class Resources:
    """A task's resource request (Ray's vocabulary: CPU, GPU, memory in bytes, custom)."""

    cpus: float = DEFAULT_CPUS
    gpus: float = 0.0
    memory: int = 0
    custom: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _number("cpus", self.cpus)
        _number("gpus", self.gpus)
        _number("memory", self.memory, integer=True)
        if not isinstance(self.custom, Mapping):
            raise TypeError("resources must be a mapping of resource name to amount")
        for key, amount in self.custom.items():
            if not isinstance(key, str) or not key:
                raise TypeError(f"resource names must be non-empty strings, got {key!r}")
            _number(f"resources[{key!r}]", amount)
        object.__setattr__(self, "custom", dict(self.custom))

    def as_ray(self) -> dict[str, float]:
        """The request as Ray resource names -> amounts (zero entries dropped)."""
        out = {"CPU": float(self.cpus), "GPU": float(self.gpus), "memory": float(self.memory)}
        out.update({k: float(v) for k, v in self.custom.items()})
        return {k: v for k, v in out.items() if v}

    def to_proto(self) -> common_pb2.ResourceRequest:
        return common_pb2.ResourceRequest(cpus=self.cpus, gpus=self.gpus, memory_bytes=int(self.memory),
                                          custom=dict(self.custom))

    @classmethod
    def from_proto(cls, msg: common_pb2.ResourceRequest) -> Resources:
        return cls(cpus=msg.cpus, gpus=msg.gpus, memory=msg.memory_bytes, custom=dict(msg.custom))


@dataclass(frozen=True)
class TaskOptions:
    """How a task is to be run; set by ``@intertie.remote(...)`` and ``.options(...)``."""

    resources: Resources = field(default_factory=Resources)
    max_retries: int = DEFAULT_MAX_RETRIES
    timeout: float | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        _number("max_retries", self.max_retries, integer=True)
        if self.timeout is not None and (_number("timeout", self.timeout) == 0):
            raise ValueError("timeout must be > 0 seconds (or None for no limit)")

    _RESOURCE_KEYS = ("cpus", "gpus", "memory", "resources")

    def replace(self, **changes: Any) -> TaskOptions:
        """A copy with the given options changed; resource keys go into ``resources``."""
        res_changes = {k: changes.pop(k) for k in list(changes) if k in self._RESOURCE_KEYS}
        if "resources" in res_changes:
            res_changes["custom"] = res_changes.pop("resources") or {}
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown task option(s): {', '.join(sorted(unknown))}")
        resources = dataclasses.replace(self.resources, **res_changes) if res_changes else self.resources
        return dataclasses.replace(self, resources=resources, **changes)


@dataclass(frozen=True)
class SiteStatus:
    """What a site publishes about itself (see ``fed.sites()``)."""

    site_id: str
    compute_id: str
    address: str
    state: str
    arch: str
    python_version: str
    resources_total: Mapping[str, float]
    resources_free: Mapping[str, float]
    queued: int
    running: int
    throughput: float
    labels: Mapping[str, str]
    max_payload_bytes: int
    version: str

    @classmethod
    def from_proto(cls, msg: site_pb2.SiteStatus) -> SiteStatus:
        return cls(site_id=msg.site_id, compute_id=msg.compute_id, address=msg.address, state=msg.state,
                   arch=msg.arch, python_version=msg.python_version,
                   resources_total=dict(msg.resources_total), resources_free=dict(msg.resources_free),
                   queued=msg.queued, running=msg.running, throughput=msg.throughput,
                   labels=dict(msg.labels), max_payload_bytes=msg.max_payload_bytes, version=msg.version)

    def to_proto(self) -> site_pb2.SiteStatus:
        return site_pb2.SiteStatus(
            site_id=self.site_id, compute_id=self.compute_id, address=self.address, state=self.state,
            arch=self.arch, python_version=self.python_version,
            resources_total=dict(self.resources_total), resources_free=dict(self.resources_free),
            queued=self.queued, running=self.running, throughput=self.throughput,
            labels=dict(self.labels), max_payload_bytes=self.max_payload_bytes, version=self.version)


@dataclass(frozen=True)
class AttemptInfo:
    attempt: int
    site: str
    started_at: float
    ended_at: float
    outcome: str


@dataclass(frozen=True)
class TaskInfo:
    """A task's state as its gateway knows it (``intertie task ID``)."""

    task_id: str
    name: str
    state: str
    site: str
    attempts: int
    max_retries: int
    error: str
    error_kind: str
    submitted_at: float
    started_at: float
    finished_at: float
    resources: Resources
    history: tuple[AttemptInfo, ...]

    @classmethod
    def from_proto(cls, msg: tasks_pb2.TaskInfo) -> TaskInfo:
        kind = common_pb2.ErrorKind.Name(msg.error.kind) if msg.HasField("error") else ""
        return cls(task_id=msg.task_id, name=msg.name, state=TASK_STATES.get(msg.state, "UNKNOWN"),
                   site=msg.site, attempts=msg.attempts, max_retries=msg.max_retries,
                   error=msg.error.message if msg.HasField("error") else "",
                   error_kind=kind.removeprefix("ERROR_KIND_").lower(),
                   submitted_at=msg.submitted_at, started_at=msg.started_at, finished_at=msg.finished_at,
                   resources=Resources.from_proto(msg.resources),
                   history=tuple(AttemptInfo(a.attempt, a.site, a.started_at, a.ended_at, a.outcome)
                                 for a in msg.history))
