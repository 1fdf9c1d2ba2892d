from __future__ import annotations

from intertie_gateway.admission import MIN_SLOTS, Capacity


def test_overcommit_bounds_cpu_tasks_inside_ray() -> None:
    cap = Capacity({"CPU": 2.0, "memory": 1e9}, overcommit=2.0)
    admitted = 0
    while cap.fits({"CPU": 1.0}):
        cap.acquire({"CPU": 1.0})
        admitted += 1
    assert admitted == 4
    cap.release({"CPU": 1.0})
    assert cap.fits({"CPU": 1.0})


def test_gpus_and_custom_resources_are_not_overcommitted() -> None:
    cap = Capacity({"CPU": 8.0, "GPU": 1.0, "tpu": 2.0}, overcommit=4.0)
    cap.acquire({"CPU": 1.0, "GPU": 1.0})
    assert not cap.fits({"CPU": 1.0, "GPU": 1.0})
    assert cap.fits({"CPU": 1.0})
    cap.acquire({"tpu": 2.0})
    assert not cap.fits({"tpu": 1.0})


def test_zero_resource_tasks_are_capped_by_slots() -> None:
    cap = Capacity({"CPU": 0.0}, overcommit=1.0)
    for _ in range(MIN_SLOTS):
        assert cap.fits({})
        cap.acquire({})
    assert not cap.fits({})


def test_a_task_that_can_ever_fit_runs_alone() -> None:
    cap = Capacity({"CPU": 2.0}, overcommit=1.0)
    assert cap.fits({"CPU": 2.0})


def test_never_fits_names_the_resource() -> None:
    cap = Capacity({"CPU": 2.0, "memory": 1e9})
    assert cap.never_fits({"CPU": 2.0}) is None
    assert cap.never_fits({"GPU": 1.0}, "site 'a'") == "needs GPU=1 but site 'a' has GPU=0 in total"
    assert "CPU=3" in (cap.never_fits({"CPU": 3.0}) or "")


def test_free_and_release_never_go_negative() -> None:
    cap = Capacity({"CPU": 2.0})
    cap.acquire({"CPU": 1.5})
    assert cap.free() == {"CPU": 0.5}
    cap.release({"CPU": 1.5})
    assert cap.free() == {"CPU": 2.0} and cap.count == 0


def test_factor_adapts_to_run_times() -> None:
    cap = Capacity({"CPU": 2.0}, overcommit=32.0)
    assert cap.factor == 2.0  # before anything is known
    for _ in range(200):
        cap.observe(0.001)  # millisecond tasks: deep pipeline, up to the cap
    assert cap.factor == 32.0 and cap.max_count == 64
    for _ in range(400):
        cap.observe(10.0)  # long tasks: about one per CPU
    assert cap.factor < 1.01 and cap.max_count == MIN_SLOTS
    admitted = 0
    while cap.fits({"CPU": 1.0}):
        cap.acquire({"CPU": 1.0})
        admitted += 1
    assert admitted == 2


def test_a_site_spans_nodes_when_its_total_is_more_than_its_largest_node() -> None:
    assert not Capacity({"CPU": 2.0, "memory": 8.0}).spans_nodes  # one node: total and largest agree
    assert Capacity({"CPU": 3.0, "memory": 8.0}, node_max={"CPU": 2.0, "memory": 8.0}).spans_nodes
