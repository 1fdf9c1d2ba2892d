"""Wire messages <-> the core's records, in one place. The gateway's modules that speak the
wire (the servicers, the peer link, the session hub, the journal's encodings) call these;
the core never sees a generated type.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from intertie.spec import SiteScore
from intertie.v1 import common_pb2, tasks_pb2
from intertie_gateway.model import (
    NO_CONSTRAINTS,
    NO_RESOURCES,
    Constraints,
    DatasetInput,
    Failure,
    Resources,
    TaskSpec,
    Update,
)
from intertie_gateway.placement import PlacementRecord


# ----------------------------------------------------------------------------- task specs
def spec_from_proto(spec: tasks_pb2.TaskSpec, home: str | None = None) -> TaskSpec:
    """The core's spec of a checked wire spec (``validate.check_spec``). ``args`` is copied
    out here, once, so the parsed request can go. ``home``: the verified link's site, which
    replaces what the message says."""
    res = spec.resources
    resources = NO_RESOURCES if not spec.HasField("resources") else Resources(
        res.cpus, res.gpus, res.memory_bytes, dict(res.custom))
    c = spec.constraints
    constraints = NO_CONSTRAINTS if not spec.HasField("constraints") else Constraints(
        c.accelerator, c.arch, c.site, dict(c.labels))
    return TaskSpec(
        task_id=spec.task_id, function_digest=spec.function_digest, args=spec.args, name=spec.name,
        resources=resources, constraints=constraints, max_retries=spec.max_retries, timeout_s=spec.timeout_s,
        batch=spec.batch, python_version=spec.python_version, home=spec.home if home is None else home,
        inputs=tuple(DatasetInput(i.id, i.site, i.num_bytes) for i in spec.inputs) if spec.inputs else (),
        returns_dataset=spec.returns_dataset, tenant=spec.tenant)


def spec_from_journal(blob: bytes, args: bytes | None) -> TaskSpec:
    """The core's spec of a journaled wire spec (checked when it was accepted) and its args
    (None: journaled inside the spec, before schema 4)."""
    spec = tasks_pb2.TaskSpec.FromString(blob)
    if args is not None:
        spec.args = args
    return spec_from_proto(spec)


def spec_to_proto(spec: TaskSpec, *, home: str = "") -> tasks_pb2.TaskSpec:
    """The wire spec to forward (``home`` is set by the receiving peer from the link; the
    tenant is the home's name of it, which the peer qualifies with the home)."""
    out = tasks_pb2.TaskSpec(task_id=spec.task_id, function_digest=spec.function_digest, args=spec.args,
                             max_retries=spec.max_retries, timeout_s=spec.timeout_s, batch=spec.batch,
                             python_version=spec.python_version, name=spec.name, home=home,
                             returns_dataset=spec.returns_dataset, tenant=spec.tenant)
    if spec.resources is not NO_RESOURCES:  # fields set in place: no message built to be copied in
        res, wire = spec.resources, out.resources
        wire.cpus, wire.gpus, wire.memory_bytes = res.cpus, res.gpus, res.memory_bytes
        wire.custom.update(res.custom)
    if spec.constraints is not NO_CONSTRAINTS:
        c, wc = spec.constraints, out.constraints
        wc.accelerator, wc.arch, wc.site = c.accelerator, c.arch, c.site
        wc.labels.update(c.labels)
    for item in spec.inputs:
        out.inputs.add(id=item.id, site=item.site, num_bytes=item.num_bytes)
    return out


def resources_to_proto(res: Resources) -> common_pb2.ResourceRequest:
    return common_pb2.ResourceRequest(cpus=res.cpus, gpus=res.gpus, memory_bytes=res.memory_bytes, custom=res.custom)


# ----------------------------------------------------------------------------- failures, updates
def failure_to_proto(failure: Failure) -> common_pb2.Error:
    return common_pb2.Error(kind=failure.kind, message=failure.message, exception_type=failure.exception_type,  # type: ignore[arg-type]
                            exception=failure.exception, traceback=failure.traceback)


def failure_from_proto(error: common_pb2.Error) -> Failure:
    return Failure(error.kind, error.message, error.exception_type, error.exception, error.traceback)


def failure_bytes(failure: Failure | None) -> bytes | None:
    return None if failure is None else failure_to_proto(failure).SerializeToString()


def update_to_event(update: Update) -> tasks_pb2.TaskEvent:
    event = tasks_pb2.TaskEvent(task_id=update.task_id, state=update.state, site=update.site,  # type: ignore[arg-type]
                                attempt=update.attempt, result=update.result, run_s=update.run_s)
    if update.error is not None:
        event.error.CopyFrom(failure_to_proto(update.error))
    return event


def event_from_row(task_id: str, state: int, site: str, attempts: int, result: bytes | None,
                   error: bytes | None) -> tasks_pb2.TaskEvent:
    """The event of a finished task, from its journal row."""
    event = tasks_pb2.TaskEvent(task_id=task_id, state=state, site=site, attempt=attempts,  # type: ignore[arg-type]
                                result=result or b"")
    if error:
        event.error.ParseFromString(error)
    return event


# ----------------------------------------------------------------------------- placements, history
def placement_to_proto(record: PlacementRecord) -> tasks_pb2.Placement:
    return tasks_pb2.Placement(
        site=record.site, reason=record.reason, decided_at=record.decided_at,
        candidates=[tasks_pb2.PlacementScore(site=c.site, wait_s=c.wait_s, transfer_s=c.transfer_s, run_s=c.run_s,
                                             price=c.price, carbon_g=c.carbon_g, total=c.total)
                    for c in record.candidates],
        rejected=[tasks_pb2.Rejection(site=site, reason=why) for site, why in record.rejected],
        rejected_count=record.rejected_count, feasible_count=record.feasible_count)


def placement_from_proto(p: tasks_pb2.Placement) -> PlacementRecord:
    return PlacementRecord(
        p.site, p.reason, p.decided_at,
        tuple(SiteScore(site=c.site, wait_s=c.wait_s, transfer_s=c.transfer_s, run_s=c.run_s, price=c.price,
                        carbon_g=c.carbon_g, total=c.total) for c in p.candidates),
        tuple((r.site, r.reason) for r in p.rejected), p.rejected_count, p.feasible_count)


def placements_blob(placements: Iterable[PlacementRecord]) -> bytes:
    """How the journal keeps a task's placement records."""
    return tasks_pb2.TaskInfo(placements=[placement_to_proto(p) for p in placements]).SerializeToString()


def placements_from_blob(blob: bytes | None) -> list[PlacementRecord]:
    return [placement_from_proto(p) for p in tasks_pb2.TaskInfo.FromString(blob).placements] if blob else []


def acks_refused(acks: Iterable[tasks_pb2.TaskAck]) -> dict[str, Failure]:
    """A peer's acks of a forwarded batch: why each refused task was refused, by id."""
    return {a.task_id: failure_from_proto(a.error) for a in acks if not a.accepted}


def update_from_event(event: tasks_pb2.TaskEvent) -> Update:
    """A peer's event about a task this home sent it."""
    return Update(event.task_id, event.state, event.site, event.attempt, event.result,
                  failure_from_proto(event.error) if event.HasField("error") else None, event.run_s)


def attempts(history: Iterable[Mapping[str, Any]]) -> list[tasks_pb2.Attempt]:
    return [tasks_pb2.Attempt(attempt=int(h.get("attempt", 0)), site=str(h.get("site", "")),
                              started_at=float(h.get("started_at", 0)), ended_at=float(h.get("ended_at", 0)),
                              outcome=str(h.get("outcome", ""))) for h in history]
