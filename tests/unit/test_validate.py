from __future__ import annotations

import math

import pytest

from intertie.v1 import common_pb2, tasks_pb2
from intertie_gateway.convert import spec_from_proto
from intertie_gateway.validate import check_spec

K = common_pb2.ErrorKind
DIGEST = "a" * 64


def spec(**fields: object) -> tasks_pb2.TaskSpec:
    base: dict[str, object] = dict(task_id="t1", function_digest=DIGEST, python_version="3.11")
    base.update(fields)
    return tasks_pb2.TaskSpec(**base)  # type: ignore[arg-type]


def check(s: tasks_pb2.TaskSpec) -> common_pb2.Error | None:
    return check_spec(s, max_payload_bytes=100, python_version="3.11", site_id="s")


def test_good_spec_passes() -> None:
    assert check(spec(args=b"x" * 100, max_retries=3, timeout_s=5)) is None
    assert check(spec(python_version="")) is None  # unknown version: accepted
    assert check(spec(inputs=[tasks_pb2.DatasetInput(id="0f3a-result.1", site="beta", num_bytes=10)])) is None


@pytest.mark.parametrize("fields,kind,text", [
    ({"task_id": ""}, K.ERROR_KIND_INVALID_ARGUMENT, "task_id"),
    ({"task_id": "a b"}, K.ERROR_KIND_INVALID_ARGUMENT, "task_id"),
    ({"task_id": "x" * 201}, K.ERROR_KIND_INVALID_ARGUMENT, "task_id"),
    ({"function_digest": "ABC"}, K.ERROR_KIND_INVALID_ARGUMENT, "digest"),
    ({"args": b"x" * 101}, K.ERROR_KIND_PAYLOAD_TOO_LARGE, "101 bytes"),
    ({"resources": common_pb2.ResourceRequest(cpus=-1)}, K.ERROR_KIND_INVALID_ARGUMENT, "cpus"),
    ({"resources": common_pb2.ResourceRequest(gpus=math.inf)}, K.ERROR_KIND_INVALID_ARGUMENT, "gpus"),
    ({"resources": common_pb2.ResourceRequest(memory_bytes=-1)}, K.ERROR_KIND_INVALID_ARGUMENT, "memory"),
    ({"resources": common_pb2.ResourceRequest(custom={"x": math.nan})}, K.ERROR_KIND_INVALID_ARGUMENT, "'x'"),
    ({"max_retries": 101}, K.ERROR_KIND_INVALID_ARGUMENT, "max_retries"),
    ({"timeout_s": math.nan}, K.ERROR_KIND_INVALID_ARGUMENT, "timeout"),
    ({"python_version": "3.12"}, K.ERROR_KIND_PLACEMENT, "Python 3.12"),
    ({"inputs": [tasks_pb2.DatasetInput(id="../../etc/passwd", site="a", num_bytes=1)]},
     K.ERROR_KIND_INVALID_ARGUMENT, "not a valid dataset reference"),
    ({"inputs": [tasks_pb2.DatasetInput(id="abc", site="", num_bytes=1)]},
     K.ERROR_KIND_INVALID_ARGUMENT, "at ''"),
    ({"inputs": [tasks_pb2.DatasetInput(id="abc", site="a", num_bytes=-5)]},
     K.ERROR_KIND_INVALID_ARGUMENT, "(-5 bytes)"),
    ({"inputs": [tasks_pb2.DatasetInput(id=f"d{i}", site="a") for i in range(1001)]},
     K.ERROR_KIND_INVALID_ARGUMENT, "at most 1000 dataset arguments"),
])
def test_each_problem_is_named(fields: dict[str, object], kind: int, text: str) -> None:
    err = check(spec(**fields))
    assert err is not None and err.kind == kind
    assert text in err.message


def test_ray_request_drops_zeroes_and_maps_names() -> None:
    req = common_pb2.ResourceRequest(cpus=1, gpus=0, memory_bytes=1024, custom={"tpu": 2, "none": 0})
    task = spec_from_proto(tasks_pb2.TaskSpec(task_id="t", resources=req, constraints={"accelerator": "T4"}))
    assert task.ray_request() == {"CPU": 1.0, "memory": 1024.0, "tpu": 2.0, "accelerator_type:T4": 0.001}
