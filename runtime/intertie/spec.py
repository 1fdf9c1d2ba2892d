"""Frozen value types that users and the scheduler see; protobuf stops at to_proto/from_proto."""

from __future__ import annotations

import dataclasses
import html
import math
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from intertie.display import (
    REPR_LIMIT,
    Cell,
    Tabled,
    clip,
    fmt_age,
    fmt_labels,
    fmt_number,
    fmt_resources,
    fmt_seconds,
    html_table,
    short_id,
    short_name,
    short_repr,
)
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

    __repr__ = short_repr

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
    # Where it may run: a Ray accelerator type, an architecture, a pinned site, and
    # operator labels that must all match.
    accelerator: str | None = None
    arch: str | None = None
    site: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    # "value": the result comes back to the caller; "dataset": the function returns a
    # pyarrow.Table that stays at the executing site, and the caller gets a DatasetRef.
    returns: str = "value"

    def __post_init__(self) -> None:
        _number("max_retries", self.max_retries, integer=True)
        if self.returns not in ("value", "dataset"):
            raise ValueError(f"returns must be 'value' or 'dataset', got {self.returns!r}")
        if self.timeout is not None and (_number("timeout", self.timeout) == 0):
            raise ValueError("timeout must be > 0 seconds (or None for no limit)")
        for key in ("accelerator", "arch", "site", "name"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise TypeError(f"{key} must be a non-empty string or None, got {value!r}")
        if not isinstance(self.labels, Mapping) or not all(
                isinstance(k, str) and k and isinstance(v, str) for k, v in self.labels.items()):
            raise TypeError("labels must be a mapping of non-empty string keys to string values")
        object.__setattr__(self, "labels", dict(self.labels))

    __repr__ = short_repr

    def constraints(self) -> common_pb2.Constraints:
        return common_pb2.Constraints(accelerator=self.accelerator or "", arch=self.arch or "",
                                      site=self.site or "", labels=dict(self.labels))

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
class SiteStatus(Tabled):
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
    accelerators: tuple[str, ...] = ()
    movable: int = 0
    mean_run_s: float = 0.0
    last_seen: float = 0.0  # when the reporting gateway last heard from it
    rtt_s: float = 0.0
    flight_address: str = ""  # where its datasets are served (Arrow Flight)

    @classmethod
    def from_proto(cls, msg: site_pb2.SiteStatus) -> SiteStatus:
        return cls(site_id=msg.site_id, compute_id=msg.compute_id, address=msg.address, state=msg.state,
                   arch=msg.arch, python_version=msg.python_version,
                   resources_total=dict(msg.resources_total), resources_free=dict(msg.resources_free),
                   queued=msg.queued, running=msg.running, throughput=msg.throughput,
                   labels=dict(msg.labels), max_payload_bytes=msg.max_payload_bytes, version=msg.version,
                   accelerators=tuple(msg.accelerators), movable=msg.movable, mean_run_s=msg.mean_run_s,
                   last_seen=msg.last_seen, rtt_s=msg.rtt_s, flight_address=msg.flight_address)

    def __repr__(self) -> str:
        parts = [f"<SiteStatus {self.site_id} {self.state} at {self.address}",
                 clip(f"free {fmt_resources(self.resources_free, self.resources_total) or 'nothing'}", 80),
                 f"{self.queued} queued, {self.running} running, {fmt_number(self.throughput)} tasks/s"]
        if self.accelerators:
            parts.append(clip(",".join(self.accelerators), 30))
        if self.labels:
            parts.append(clip(fmt_labels(self.labels), 40))
        if self.last_seen:
            parts.append(f"seen {fmt_age(self.last_seen)}")
        return clip("; ".join(parts), REPR_LIMIT - 1) + ">"

    _table_headers = ("SITE", "STATE", "ADDRESS", "ARCH", "PYTHON", "FREE / TOTAL", "ACCEL", "QUEUED", "RUNNING",
                      "THROUGHPUT", "LABELS", "SEEN")

    def _table_row(self) -> tuple[Cell, ...]:
        return (self.site_id, self.state, self.address, self.arch, self.python_version,
                fmt_resources(self.resources_free, self.resources_total), ",".join(self.accelerators) or "-",
                str(self.queued), str(self.running), f"{fmt_number(self.throughput)}/s",
                fmt_labels(self.labels) or "-", fmt_age(self.last_seen))


@dataclass(frozen=True)
class SiteScore(Tabled):
    """One site's estimate for a task: the terms placement adds up (lower total wins)."""

    site: str
    wait_s: float
    transfer_s: float
    run_s: float
    price: float
    carbon_g: float
    total: float

    @property
    def start_s(self) -> float:
        """Estimated seconds until the task starts there (queue wait plus input transfer)."""
        return self.wait_s + self.transfer_s

    def __repr__(self) -> str:
        text = (f"<SiteScore {self.site}: start {fmt_seconds(self.start_s)} (wait {fmt_seconds(self.wait_s)}, "
                f"transfer {fmt_seconds(self.transfer_s)}), run {fmt_seconds(self.run_s)}")
        if self.price:
            text += f", price {fmt_number(self.price)}"
        if self.carbon_g:
            text += f", carbon {fmt_number(self.carbon_g)} g"
        return clip(f"{text}, total {fmt_seconds(self.total)}", REPR_LIMIT - 1) + ">"

    def _repr_html_(self) -> str:
        return html_table(*score_table([self]))


def score_table(scores: Sequence[SiteScore]) -> tuple[list[str], list[tuple[Cell, ...]]]:
    """Headers and rows of a table of estimates; the price and carbon columns only when
    some site has one (placement without prices or carbon intensities leaves them 0)."""
    price, carbon = any(s.price for s in scores), any(s.carbon_g for s in scores)
    headers = ["SITE", "START", "WAIT", "TRANSFER", "RUN"] + ["PRICE"] * price + ["CARBON"] * carbon + ["TOTAL"]
    rows: list[tuple[Cell, ...]] = [(s.site, fmt_seconds(s.start_s), fmt_seconds(s.wait_s), fmt_seconds(s.transfer_s),
             fmt_seconds(s.run_s), *[fmt_number(s.price)] * price, *[f"{fmt_number(s.carbon_g)} g"] * carbon,
             fmt_seconds(s.total)) for s in scores]
    return headers, rows


def _ranking(scores: Sequence[SiteScore], most: int = 3) -> str:
    """ "b 1.1 s, a 2.3 s (+2 more)": sites by estimated total, best first."""
    text = ", ".join(f"{s.site} {fmt_seconds(s.total)}" for s in scores[:most])
    return text + (f" (+{len(scores) - most} more)" if len(scores) > most else "")


@dataclass(frozen=True)
class PlacementInfo:
    """A placement decision and why: ``fut.placement``, ``intertie explain``, ``fed.quote``."""

    site: str | None
    reason: str
    candidates: tuple[SiteScore, ...]  # best first
    rejected: tuple[tuple[str, str], ...]  # (site, why) samples
    rejected_count: int
    feasible_count: int
    decided_at: float

    @classmethod
    def from_proto(cls, msg: tasks_pb2.Placement) -> PlacementInfo:
        return cls(site=msg.site or None, reason=msg.reason,
                   candidates=tuple(SiteScore(c.site, c.wait_s, c.transfer_s, c.run_s, c.price, c.carbon_g, c.total)
                                    for c in msg.candidates),
                   rejected=tuple((r.site, r.reason) for r in msg.rejected),
                   rejected_count=msg.rejected_count, feasible_count=msg.feasible_count, decided_at=msg.decided_at)

    def headline(self, verb: str = "placed on") -> str:
        """ "placed on b: lowest estimated completion", or "no site can run it: ..." when none."""
        if self.site is None:
            return f"no site can run it: {self.reason}" if self.reason else "no site can run it"
        return f"{verb} {self.site}: {self.reason}" if self.reason else f"{verb} {self.site}"

    def _summary(self, verb: str) -> list[str]:
        parts = [clip(self.headline(verb), 80)]
        if self.candidates:
            parts.append(f"ranked {_ranking(self.candidates)}")
        if self.rejected_count:
            sample = f" ({clip(f'{self.rejected[0][0]}: {self.rejected[0][1]}', 50)})" if self.rejected else ""
            parts.append(f"{self.rejected_count} rejected{sample}")
        return parts

    def __repr__(self) -> str:
        parts = self._summary("placed on")
        if self.decided_at:
            parts.append(f"decided {fmt_age(self.decided_at)}")
        return clip("<PlacementInfo " + "; ".join(parts), REPR_LIMIT - 1) + ">"

    def _html(self, verb: str) -> str:
        out = [f"<p>{html.escape(self.headline(verb))}</p>"]
        if self.candidates:
            out.append(html_table(*score_table(self.candidates)))
        if self.rejected:
            more = self.rejected_count - len(self.rejected)
            out.append(html_table(("REJECTED", "WHY"), self.rejected,
                                  caption=f"{self.rejected_count} site(s) rejected" + (f", {more} not shown" if more > 0 else "")))
        return "".join(out)

    def _repr_html_(self) -> str:
        return self._html("placed on")


class Quote(tuple):  # type: ignore[type-arg]
    """Ranked candidate sites for a task, best first (``fed.quote``); ``q[0].site`` is the best.

    Pass it as ``f.submit(..., quote=q)`` to run on the best quoted site."""

    placement: PlacementInfo

    def __new__(cls, placement: PlacementInfo) -> Quote:
        quote = super().__new__(cls, placement.candidates)
        quote.placement = placement
        return quote

    def __repr__(self) -> str:
        return clip("<Quote " + "; ".join(self.placement._summary("would place on")), REPR_LIMIT - 1) + ">"

    def _repr_html_(self) -> str:
        return self.placement._html("would place on")


@dataclass(frozen=True)
class AttemptInfo(Tabled):
    attempt: int
    site: str
    started_at: float
    ended_at: float
    outcome: str

    def __repr__(self) -> str:
        ran = f", ran {fmt_seconds(self.ended_at - self.started_at)}" if self.started_at and self.ended_at else ""
        ended = f", ended {fmt_age(self.ended_at)}" if self.ended_at else ""
        return clip(f"<AttemptInfo {self.attempt} at {self.site}{ran}{ended}: {self.outcome}", REPR_LIMIT - 1) + ">"

    _table_headers = ("ATTEMPT", "SITE", "STARTED", "RAN", "OUTCOME")

    def _table_row(self) -> tuple[Cell, ...]:
        ran = fmt_seconds(self.ended_at - self.started_at) if self.started_at and self.ended_at else "-"
        return (str(self.attempt), self.site, fmt_age(self.started_at), ran, self.outcome)


@dataclass(frozen=True)
class TaskInfo(Tabled):
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
    placements: tuple[PlacementInfo, ...] = ()
    home: str = ""
    error_type: str = ""  # the class of the exception the function raised (module.qualname)
    tenant: str = ""  # whose task, as the answering site names it ("" without token auth)

    @property
    def placement(self) -> PlacementInfo | None:
        """The latest placement decision."""
        return self.placements[-1] if self.placements else None

    @property
    def error_text(self) -> str:
        """The error as one reads it: "ValueError: bad input" for an exception the function
        raised, "[kind] message" for other failures ("[timeout] ..."); "" without one."""
        if not (self.error or self.error_kind):
            return ""
        kind = f"[{self.error_kind}] " if self.error_kind and self.error_kind != "remote" else ""
        cls = self.error_type.removeprefix("builtins.")
        return f"{kind}{cls}: {self.error}" if cls else f"{kind}{self.error}"

    def ran_for(self, now: float | None = None) -> float | None:
        """Seconds it ran (so far, if still running); None if it never started."""
        if not self.started_at:
            return None
        return (self.finished_at or (time.time() if now is None else now)) - self.started_at

    def __repr__(self) -> str:
        where = f" at {self.site}" if self.site else ""
        if self.home and self.home != self.site:
            where += f" (home {self.home})"
        parts = [f"<TaskInfo {short_id(self.task_id)} {clip(short_name(self.name), 40)} {self.state}{where}"]
        if self.attempts:
            parts.append(f"{self.attempts} attempt{'s' * (self.attempts != 1)}")
        ran = self.ran_for()
        if self.finished_at:
            parts.append((f"ran {fmt_seconds(ran)}, " if ran is not None else "") + f"finished {fmt_age(self.finished_at)}")
        elif self.started_at:
            parts.append(f"started {fmt_age(self.started_at)}")
        else:
            parts.append(f"submitted {fmt_age(self.submitted_at)}")
        text = ", ".join(parts)
        if self.error_text:
            text += f"; {self.error_text}"
        return clip(text, REPR_LIMIT - 1) + ">"

    _table_headers = ("TASK", "NAME", "STATE", "SITE", "ATTEMPTS", "SUBMITTED", "RAN", "ERROR")

    def _table_row(self) -> tuple[Cell, ...]:
        ran = self.ran_for()
        return ((short_id(self.task_id), self.task_id), (short_name(self.name), self.name), self.state,
                self.site or "-", str(self.attempts), fmt_age(self.submitted_at),
                fmt_seconds(ran) if ran is not None else "-",
                (clip(self.error_text, 80), self.error_text) if self.error_text else "-")

    def _repr_html_(self) -> str:
        out = super()._repr_html_()
        if self.history:
            out += html_table(AttemptInfo._table_headers, [a._table_row() for a in self.history], caption="moves")
        return out

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
                                 for a in msg.history),
                   placements=tuple(PlacementInfo.from_proto(p) for p in msg.placements), home=msg.home,
                   tenant=msg.tenant,
                   error_type=msg.error.exception_type if msg.HasField("error") else "")
