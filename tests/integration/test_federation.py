"""A real federation: three gateway processes, each with its own Ray, peered over loopback.

The client talks only to alpha (the home); alpha places, forwards and moves the work.
Sites: alpha 2 CPUs (eu-north), beta 4 CPUs (eu-west), gamma 2 CPUs + a T4 GPU (us-east).
"""

from __future__ import annotations

import collections
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import intertie
from intertie.embedded import EmbeddedGateway, LocalFederation, free_ports

REPO = Path(__file__).resolve().parents[2]
HEARTBEAT_S = 0.3
# Each site keeps at most this many bytes of replicas pulled from others.
REPLICA_CACHE_BYTES = 48 << 20


def square(x: int) -> int:
    return x * x


def nap_square(x: int, seconds: float = 0.01) -> int:
    time.sleep(seconds)
    return x * x


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    with LocalFederation(3, base_dir=tmp_path_factory.mktemp("fed"), heartbeat_s=HEARTBEAT_S,
                         extra_args=["--replica-cache", str(REPLICA_CACHE_BYTES)]) as local:
        yield local


@pytest.fixture(scope="module")
def home(federation: LocalFederation) -> Iterator[intertie.Federation]:
    alpha = federation.site("alpha")
    ALPHA_ENV.update(INTERTIE_ADDRESS=alpha.address, INTERTIE_TOKEN=alpha.token or "",
                     INTERTIE_TLS_CA=str(federation.tls_ca or ""))
    with intertie.connect(federation.site("alpha")) as fed:
        wait_for(lambda: sum(s.state == "up" for s in fed.sites()) == 3, "peers never came up")
        yield fed


def wait_for(condition, message: str, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.1)


# What a program needs to use the federation through alpha as its tenant (set by ``home``).
ALPHA_ENV: dict[str, str] = {}


def as_alpha(home: intertie.Federation) -> dict[str, str]:
    """The environment of a program that uses the federation through ``home`` (alpha)."""
    assert ALPHA_ENV["INTERTIE_ADDRESS"] == home.address
    return {**os.environ, **ALPHA_ENV}


def cli(*args: str, home: intertie.Federation) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "intertie", *args], capture_output=True, text=True, timeout=60,
                          env=as_alpha(home))


def test_catalogue_shows_the_whole_federation(home: intertie.Federation, federation: LocalFederation) -> None:
    sites = {s.site_id: s for s in home.sites()}
    assert list(sites) == ["alpha", "beta", "gamma"]  # home first
    assert sites["beta"].compute_id == "urn:intertie:site:eu-west:beta"
    assert sites["gamma"].accelerators == ("T4",) and sites["gamma"].resources_total["GPU"] == 1
    assert sites["beta"].resources_total["CPU"] == 4 and sites["beta"].labels["carbon"] == "250"
    assert all(s.state == "up" and s.python_version and s.arch for s in sites.values())
    assert sites["beta"].last_seen > time.time() - 30
    out = cli("sites", home=home)
    assert out.returncode == 0, out.stderr
    for name in ("urn:intertie:site:eu-north:alpha", "urn:intertie:site:eu-west:beta", "T4", "price=0.09"):
        assert name in out.stdout


def test_burst_runs_on_all_three_sites(home: intertie.Federation) -> None:
    f = intertie.remote(nap_square)
    futures = [f.submit(i) for i in range(600)]
    assert [fut.result(timeout=180) for fut in futures] == [i * i for i in range(600)]
    where = collections.Counter(fut.site for fut in futures)
    assert set(where) == {"alpha", "beta", "gamma"}, where
    assert where["beta"] > where["alpha"]  # twice the CPUs, about twice the work


def test_constraints_route_tasks(home: intertie.Federation) -> None:
    on_t4 = intertie.remote(gpus=1, accelerator="T4")(square).submit(3)
    in_west = intertie.remote(labels={"region": "eu-west"})(square).submit(4)
    pinned = intertie.remote(site="alpha")(square).submit(5)
    assert (on_t4.result(timeout=60), on_t4.site) == (9, "gamma")
    assert (in_west.result(timeout=60), in_west.site) == (16, "beta")
    assert (pinned.result(timeout=60), pinned.site) == (25, "alpha")


def test_impossible_constraints_fail_fast_naming_the_constraint(home: intertie.Federation) -> None:
    started = time.monotonic()
    with pytest.raises(intertie.PlacementError) as info:
        intertie.remote(accelerator="A100")(square).submit(1).result(timeout=30)
    message = str(info.value)
    assert "A100" in message and "alpha" in message and "gamma" in message
    with pytest.raises(intertie.PlacementError, match="arch is .*, the task needs riscv64"):
        intertie.remote(arch="riscv64")(square).submit(1).result(timeout=30)
    with pytest.raises(intertie.PlacementError, match="needs CPU=64 but the site has CPU=4"):
        intertie.remote(cpus=64)(square).submit(1).result(timeout=30)
    with pytest.raises(intertie.PlacementError, match="pinned to site 'nowhere'"):
        intertie.remote(site="nowhere")(square).submit(1).result(timeout=30)
    assert time.monotonic() - started < 20


def test_every_placement_is_explained(home: intertie.Federation) -> None:
    fut = intertie.remote(square).submit(7)
    assert fut.result(timeout=60) == 49
    placement = fut.placement
    assert placement is not None and placement.site == fut.site
    assert {c.site for c in placement.candidates} == {"alpha", "beta", "gamma"}
    totals = [c.total for c in placement.candidates]
    assert totals == sorted(totals) and placement.candidates[0].site == fut.site
    assert all(c.site == "alpha" or c.transfer_s > 0 for c in placement.candidates)  # forwarding costs a trip
    gpu = intertie.remote(gpus=1)(square).submit(2)
    gpu.result(timeout=60)
    assert gpu.placement is not None
    assert dict(gpu.placement.rejected) == {"alpha": "needs GPU=1 but the site has GPU=0 in total",
                                            "beta": "needs GPU=1 but the site has GPU=0 in total"}
    out = cli("explain", gpu.task_id, home=home)
    assert out.returncode == 0, out.stderr
    assert "placed on gamma" in out.stdout and "beta: needs GPU=1" in out.stdout


def test_quote_ranks_sites_and_commits(home: intertie.Federation) -> None:
    f = intertie.remote(square)
    quote = home.quote(f, 3)
    assert [c.site for c in quote] and {c.site for c in quote} == {"alpha", "beta", "gamma"}
    assert [c.total for c in quote] == sorted(c.total for c in quote)
    assert all(c.start_s >= 0 and c.run_s > 0 and c.price > 0 and c.carbon_g > 0 for c in quote)
    gpu_quote = home.quote(f, 3, gpus=1, accelerator="T4")
    assert [c.site for c in gpu_quote] == ["gamma"]
    fut = f.submit(6, quote=quote)
    assert fut.result(timeout=60) == 36 and fut.site == quote[0].site
    out = cli("quote", "--gpus", "1", home=home)
    assert out.returncode == 0 and "would place on gamma" in out.stdout and "alpha: needs GPU=1" in out.stdout


def test_federated_example_runs(home: intertie.Federation) -> None:
    out = subprocess.run([sys.executable, str(REPO / "examples" / "federated_map.py")], capture_output=True,
                         text=True, timeout=240, env=as_alpha(home))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ran on {'alpha'" in out.stdout and "'gamma'" in out.stdout
    assert "at gamma" in out.stdout  # the GPU task


def column_sum(table, column: str) -> float:  # type: ignore[no-untyped-def]
    import pyarrow as pa
    import pyarrow.compute as pc

    assert isinstance(table, pa.Table)  # the ref arrived as a table
    return pc.sum(table.column(column)).as_py()


def wait_until_idle(home: intertie.Federation) -> None:
    """Until every site, as the home sees it, has nothing queued or running (earlier tests'
    bursts drain in seconds). The home's placement reads the same statuses: it takes a new
    snapshot of the catalogue as each heartbeat's statuses arrive, before anything else runs
    on its loop, so a placement after this sees idle sites, not a burst an earlier snapshot
    caught."""
    wait_for(lambda: all(s.queued == 0 and s.running == 0 for s in home.sites()), "sites never drained")


def test_a_task_on_a_dataset_runs_where_the_data_is(home: intertie.Federation) -> None:
    import pyarrow as pa

    table = pa.table({"v": pa.array(range(4_000_000), pa.int64())})  # 32 MB
    ref = home.put_dataset(table, name="big", site="beta")
    assert ref.site == "beta"
    # Placement trades transfer time against queue wait, and this test is about the transfer term.
    wait_until_idle(home)
    f = intertie.remote(column_sum)
    fut = f.submit(ref, "v")
    assert fut.result(timeout=60) == sum(range(4_000_000))
    placement = fut.placement
    assert placement is not None
    assert fut.site == "beta", placement
    transfer = {c.site: c.transfer_s for c in placement.candidates}
    # The 32 MB would have to move to alpha (at the default 100 MB/s); the round trip to beta
    # counts on both sides, forwarding the task there or fetching the data from there.
    assert transfer["alpha"] - transfer["beta"] == pytest.approx(0.32, abs=0.01), placement

    # Pinned elsewhere: gamma pulls it from beta over Flight, keeps a replica, and runs.
    pinned = f.options(site="gamma").submit(ref, "v")
    assert pinned.result(timeout=60) == sum(range(4_000_000)) and pinned.site == "gamma"
    assert ref.id in {r.id for r in home.datasets(site="gamma")}
    again = f.options(site="gamma").submit(ref, "v")
    assert again.result(timeout=60) == sum(range(4_000_000))


def add_one(table):  # type: ignore[no-untyped-def]
    import pyarrow.compute as pc

    return table.set_column(0, "v", pc.add(table.column("v"), 1))


def test_a_chain_of_dataset_results_runs_where_the_data_is(home: intertie.Federation) -> None:
    import pyarrow as pa

    wait_for(lambda: all(s.queued == 0 for s in home.sites()), "sites never drained")
    ref = home.put_dataset(pa.table({"v": pa.array(range(3_000_000), pa.int64())}), site="gamma")  # 24 MB
    step = intertie.remote(returns="dataset")(add_one)
    for _ in range(3):
        fut = step.submit(ref)
        ref = fut.result(timeout=60)
        # Each result stays where it was made, and pulls the next step there.
        assert isinstance(ref, intertie.DatasetRef) and ref.site == fut.site == "gamma", fut.placement
    assert home.get_dataset(ref).column("v").to_pylist()[:3] == [3, 4, 5]
    column_total = intertie.remote(column_sum)
    assert column_total.submit(ref, "v").result(timeout=60) == sum(range(3_000_000)) + 3 * 3_000_000


def test_replicas_are_a_bounded_cache_and_deleting_the_original_drops_them(home: intertie.Federation) -> None:
    import pyarrow as pa

    refs = [home.put_dataset(pa.table({"v": pa.array(range(i, i + 2_500_000), pa.int64())}), site="beta")
            for i in range(3)]  # 20 MB each
    pinned = intertie.remote(site="gamma")(column_sum)
    for ref in refs:
        assert pinned.submit(ref, "v").result(timeout=60) == sum(range(ref.num_rows)) + refs.index(ref) * ref.num_rows
    at_gamma = {r.id: r for r in home.datasets(site="gamma")}
    # Three 20 MB replicas do not fit in 48 MB: the least recently used one went.
    assert refs[0].id not in at_gamma and refs[1].id in at_gamma and refs[2].id in at_gamma
    assert at_gamma[refs[2].id].origin == "beta"
    assert sum(r.num_bytes for r in at_gamma.values() if r.origin) <= REPLICA_CACHE_BYTES
    # Deleting the original also deletes the replicas elsewhere.
    home.delete_dataset(refs[2])
    assert refs[2].id not in {r.id for r in home.datasets(site="gamma")}
    assert refs[2].id not in {r.id for r in home.datasets(site="beta")}
    # A task on a dataset no site holds any more fails at once, naming it.
    with pytest.raises(intertie.DatasetNotFoundError, match=f"dataset {refs[2].id} .*no site holds it"):
        intertie.remote(site="alpha")(column_sum).submit(refs[2], "v").result(timeout=30)


def test_datasets_example_runs(home: intertie.Federation) -> None:
    out = subprocess.run([sys.executable, str(REPO / "examples" / "datasets.py")], capture_output=True,
                         text=True, timeout=240, env=as_alpha(home))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "computed at beta (submitted to alpha)" in out.stdout
    assert "pinned to gamma: mean fare 14.750" in out.stdout
    assert "'trips'" in out.stdout.split("gamma now holds:")[1]
    assert "chain: long_trips ran at beta" in out.stdout and "computed at beta" in out.stdout.split("chain:")[1]
    assert "'trips'" not in out.stdout.split("after deleting: gamma holds")[1]


def test_killed_site_work_moves_and_late_duplicates_change_nothing(
        home: intertie.Federation, federation: LocalFederation) -> None:
    import pyarrow as pa

    beta = federation.site("beta")
    # A dataset held by beta, with a replica at gamma: it stays usable while beta is down.
    kept = home.put_dataset(pa.table({"v": pa.array(range(100_000), pa.int64())}), site="beta")
    assert intertie.remote(site="gamma")(column_sum).submit(kept, "v").result(timeout=60) == sum(range(100_000))
    f = intertie.remote(max_retries=3)(nap_square)
    futures = [f.submit(i, 0.05) for i in range(500)]
    wait_for(lambda: sum(home.task(fut.task_id).site == "beta" for fut in futures[:100:5]) > 0,
             "nothing was placed on beta")
    time.sleep(0.5)  # let beta start some of them
    beta.kill()
    assert [fut.result(timeout=300) for fut in futures] == [i * i for i in range(500)]
    moved = [fut for fut in futures if fut.attempts > 1]
    assert moved, "no task was running or queued at beta when it died"
    assert all(fut.site != "beta" for fut in moved)
    info = home.task(moved[0].task_id)
    assert info.history[0].site == "beta" and "site beta went down" in info.history[0].outcome
    assert info.state == "SUCCEEDED"
    wait_for(lambda: {s.site_id: s.state for s in home.sites()}["beta"] == "down", "beta never marked down")
    on_replica = intertie.remote(column_sum).submit(kept, "v")
    assert on_replica.result(timeout=60) == sum(range(100_000)) and on_replica.site != "beta"

    # Beta comes back with its journal and reruns what it had; alpha ignores those late results.
    beta.launch()
    beta.wait_ready()
    wait_for(lambda: {s.site_id: s.state for s in home.sites()}["beta"] == "up", "beta never came back up")
    time.sleep(3)
    for fut in moved[:20]:
        again = home.task(fut.task_id)
        assert again.site == fut.site and again.attempts == fut.attempts and again.state == "SUCCEEDED"
    # One row per task at the home, finished once, with the result the client got. (The home files the tasks
    # of its tenant "local" under "local~<id>": each tenant's ids are its own.)
    db = sqlite3.connect(str(federation.site("alpha").state_dir / "journal.sqlite"))
    try:
        rows = db.execute(f"SELECT task_id, state, site FROM tasks WHERE task_id IN "
                          f"({','.join('?' * len(futures))})", [f"local~{fut.task_id}" for fut in futures]).fetchall()
    finally:
        db.close()
    assert len(rows) == 500 and all(state == 3 for _, state, _ in rows)
    assert {tid: site for tid, _, site in rows} == {f"local~{fut.task_id}": fut.site for fut in futures}
    assert f.submit(3).result(timeout=60) == 9


def test_idle_site_steals_queued_work(tmp_path: Path) -> None:
    # The home prices its peer out (price weight), so placement keeps every task at home;
    # the idle peer still takes queued tasks that have not started.
    home_port, peer_port = free_ports(2)
    config = tmp_path / "home.toml"
    config.write_text("[placement]\nprice_weight = 1e9\n")
    common = ["--heartbeat", str(HEARTBEAT_S), "--object-store-memory", str(128 << 20)]
    gateways = [
        EmbeddedGateway(num_cpus=1, site_id="home", state_dir=tmp_path / "home", listen=f"127.0.0.1:{home_port}",
                        extra_args=[*common, "--config", str(config), "--peer", f"127.0.0.1:{peer_port}", "--auth",
                                    "none"],
                        wait=False),
        EmbeddedGateway(num_cpus=2, site_id="idle", state_dir=tmp_path / "idle", listen=f"127.0.0.1:{peer_port}",
                        extra_args=[*common, "--label", "price=100", "--peer", f"127.0.0.1:{home_port}", "--auth",
                                    "none"],
                        wait=False),
    ]
    try:
        for gateway in gateways:
            gateway.wait_ready()
        with intertie.connect(gateways[0].address) as fed:
            wait_for(lambda: [s.state for s in fed.sites()] == ["up", "up"], "peers never came up")
            f = intertie.remote(nap_square)
            futures = [f.submit(i, 0.05) for i in range(120)]
            assert [fut.result(timeout=180) for fut in futures] == [i * i for i in range(120)]
            stolen = [fut for fut in futures if fut.site == "idle"]
            assert stolen, "the idle site took nothing"
            assert len(stolen) < len(futures)
            info = fed.task(stolen[0].task_id)
            assert info.placements[0].site == "home"  # placed at home first...
            assert "asked for work" in info.placements[-1].reason  # ...then taken by the idle site
    finally:
        for gateway in gateways:
            gateway.stop()


def test_datasets_are_listed_over_the_whole_federation_and_a_name_is_replaced_on_request(
        home: intertie.Federation, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    at_beta = home.put_dataset(pa.table({"v": [1, 2]}), name="listed-everywhere", site="beta")
    at_gamma = home.put_dataset(pa.table({"v": [3]}), name="listed-everywhere", site="gamma")  # unique per site
    everywhere = {(r.id, r.site) for r in home.datasets()}
    assert {(at_beta.id, "beta"), (at_gamma.id, "gamma")} <= everywhere
    assert {r.site for r in home.datasets(site="beta")} == {"beta"}
    pq.write_table(pa.table({"v": [4, 5, 6]}), tmp_path / "listed-everywhere.parquet")
    path = str(tmp_path / "listed-everywhere.parquet")
    refused = cli("datasets", "put", path, "--site", "beta", home=home)
    assert refused.returncode != 0 and "already has a dataset named 'listed-everywhere'" in refused.stderr
    replaced = cli("datasets", "put", path, "--site", "beta", "--replace", home=home)
    assert replaced.returncode == 0, replaced.stderr
    now = home.dataset("listed-everywhere", site="beta")
    assert now.num_rows == 3 and now.id != at_beta.id
    listing = cli("datasets", "ls", home=home)
    assert listing.returncode == 0 and "beta" in listing.stdout and "gamma" in listing.stdout
