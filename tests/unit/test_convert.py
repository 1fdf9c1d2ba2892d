"""Wire messages <-> the core's records: what goes out is what came in."""

from __future__ import annotations

from intertie.spec import SiteScore
from intertie.v1 import common_pb2, tasks_pb2
from intertie_gateway import convert
from intertie_gateway.model import ErrorKind, Failure
from intertie_gateway.placement import PlacementRecord


def test_a_spec_forwarded_is_the_spec_received_and_its_args_are_copied_out() -> None:
    wire = tasks_pb2.TaskSpec(
        task_id="t", function_digest="d" * 64, args=b"pickled", name="f", max_retries=2, timeout_s=1.5, batch=True,
        python_version="3.11", returns_dataset=True,
        resources=common_pb2.ResourceRequest(cpus=1, gpus=2, memory_bytes=3, custom={"TPU": 1}),
        constraints=common_pb2.Constraints(accelerator="T4", arch="x86_64", site="s", labels={"zone": "eu"}),
        inputs=[tasks_pb2.DatasetInput(id="i", site="s", num_bytes=9)])
    spec = convert.spec_from_proto(wire, home="peer")
    assert spec.home == "peer" and spec.inputs[0].num_bytes == 9 and spec.constraints.labels == {"zone": "eu"}
    wire.args = b"changed"  # the request may go: the spec holds its own bytes
    assert spec.args == b"pickled"
    wire.args = b"pickled"
    assert convert.spec_to_proto(spec) == wire
    plain = tasks_pb2.TaskSpec(task_id="p", function_digest="d" * 64)
    assert convert.spec_to_proto(convert.spec_from_proto(plain)) == plain
    assert convert.spec_from_journal(plain.SerializeToString(), b"beside").args == b"beside"


def test_failures_updates_and_placements_round_trip() -> None:
    failure = Failure(ErrorKind.REMOTE, "boom", "ValueError", b"pickled", "Traceback ...")
    assert convert.failure_from_proto(convert.failure_to_proto(failure)) == failure
    event = tasks_pb2.TaskEvent(task_id="t", state=tasks_pb2.TASK_STATE_FAILED, site="b", attempt=2, run_s=0.5,
                                error=convert.failure_to_proto(failure))
    update = convert.update_from_event(event)
    assert convert.update_to_event(update) == event
    acks = [tasks_pb2.TaskAck(task_id="ok", accepted=True),
            tasks_pb2.TaskAck(task_id="no", accepted=False, error=common_pb2.Error(
                kind=common_pb2.ERROR_KIND_PLACEMENT, message="no GPU"))]
    assert convert.acks_refused(acks) == {"no": Failure(ErrorKind.PLACEMENT, "no GPU")}
    record = PlacementRecord("b", "lowest estimated completion", 12.0,
                             (SiteScore("b", 0.1, 0.2, 0.3, 0.0, 0.0, 0.6),), (("c", "needs GPU=1"),), 1, 1)
    assert convert.placements_from_blob(convert.placements_blob([record])) == [record]
