from __future__ import annotations

import pytest

import intertie
from intertie.serialization import pickle_function
from intertie.spec import Resources, TaskOptions


def f(x: int) -> int:
    return x


def test_options_replace_routes_resource_keys() -> None:
    opts = TaskOptions().replace(cpus=2, gpus=1, memory=1024, resources={"tpu": 1}, max_retries=0, timeout=5)
    assert opts.resources == Resources(cpus=2, gpus=1, memory=1024, custom={"tpu": 1})
    assert opts.max_retries == 0 and opts.timeout == 5
    assert opts.resources.as_ray() == {"CPU": 2.0, "GPU": 1.0, "memory": 1024.0, "tpu": 1.0}


def test_resources_round_trip_proto() -> None:
    res = Resources(cpus=0.5, gpus=2, memory=10, custom={"a": 1})
    assert Resources.from_proto(res.to_proto()) == res


@pytest.mark.parametrize("kwargs", [{"cpus": "1"}, {"memory": 1.5}, {"resources": {"": 1}}, {"max_retries": -1}])
def test_bad_options_raise(kwargs: dict[str, object]) -> None:
    with pytest.raises((TypeError, ValueError)):
        intertie.remote(**kwargs)(f)  # type: ignore[arg-type]


def test_functions_are_pickled_once_and_digested() -> None:
    first = pickle_function(f)
    assert pickle_function(f) is first
    assert len(first.digest) == 64 and first.name.endswith(".f")
    assert pickle_function(len).digest != first.digest


def test_remote_decorator_forms() -> None:
    bare = intertie.remote(f)
    configured = intertie.remote(cpus=2, max_retries=1)(f)
    assert bare(3) == 3 and configured(4) == 4
    assert configured.task_options.resources.cpus == 2
    assert configured.options(cpus=1).task_options.resources.cpus == 1
    assert configured.task_options.resources.cpus == 2  # options() copies
    with pytest.raises(TypeError):
        intertie.remote(f, cpus=1)  # type: ignore[call-overload]
