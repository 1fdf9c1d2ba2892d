"""Datasets over real Arrow Flight at a real gateway: put, get, list, delete, restart, bad input."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

import intertie


def sample(rows: int = 50_000) -> pa.Table:
    return pa.table({"id": pa.array(range(rows), pa.int64()),
                     "name": [f"row-{i}" for i in range(rows)],
                     "value": pa.array([i * 0.5 for i in range(rows)], pa.float64())})


def test_table_round_trip_and_ref(fed: intertie.Federation) -> None:
    table = sample()
    seen: list[int] = []
    ref = fed.put_dataset(table, name="roundtrip", progress=lambda rows, _: seen.append(rows))
    assert (ref.name, ref.site, ref.num_rows) == ("roundtrip", fed.site_id, 50_000)
    assert ref.schema == table.schema and ref.num_bytes > 0
    assert seen and seen[-1] == 50_000  # streamed in batches, progress per batch
    assert fed.get_dataset(ref).equals(table)
    assert fed.get_dataset("roundtrip").equals(table)  # by name
    assert pickle.loads(pickle.dumps(ref)) == ref
    assert fed.dataset(ref.id) == ref
    assert ref.id in {r.id for r in fed.datasets()}


def test_reader_parquet_and_csv_sources(fed: intertie.Federation, tmp_path: Path) -> None:
    table = sample(10_000)
    reader = pa.RecordBatchReader.from_batches(table.schema, table.to_batches(max_chunksize=1000))
    assert fed.get_dataset(fed.put_dataset(reader)).equals(table)
    pq.write_table(table, tmp_path / "t.parquet")
    from_parquet = fed.put_dataset(str(tmp_path / "t.parquet"))
    assert from_parquet.name == "t" and fed.get_dataset(from_parquet).equals(table)  # named after the file
    pacsv.write_csv(table, tmp_path / "t.csv")
    with pytest.raises(intertie.InvalidRequestError, match="already has a dataset named 't'"):
        fed.put_dataset(tmp_path / "t.csv")  # the same name: refused, the first one kept
    assert fed.dataset("t").id == from_parquet.id
    from_csv = fed.get_dataset(fed.put_dataset(tmp_path / "t.csv", name="t-csv"))
    assert from_csv.num_rows == 10_000 and from_csv.column("name").to_pylist()[:2] == ["row-0", "row-1"]


def test_delete_and_unknown_datasets(fed: intertie.Federation) -> None:
    ref = fed.put_dataset(sample(100), name="doomed")
    assert fed.delete_dataset(ref).id == ref.id
    for call in (lambda: fed.get_dataset(ref), lambda: fed.delete_dataset(ref), lambda: fed.dataset("no-such")):
        with pytest.raises(intertie.DatasetNotFoundError, match="has no dataset"):
            call()
    assert ref.id not in {r.id for r in fed.datasets()}


def test_bad_dataset_input_gets_typed_errors(fed: intertie.Federation, tmp_path: Path) -> None:
    with pytest.raises(intertie.InvalidRequestError, match="dataset name"):
        fed.put_dataset(sample(10), name="no spaces allowed")
    with pytest.raises(intertie.InvalidRequestError, match="expected a .parquet"):
        fed.put_dataset(str(tmp_path / "file.txt"))
    (tmp_path / "broken.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(intertie.InvalidRequestError, match="cannot read"):
        fed.put_dataset(str(tmp_path / "broken.parquet"))
    with pytest.raises(intertie.InvalidRequestError, match="not int"):
        fed.put_dataset(42)
    assert fed.submit(len, "still serving").result(timeout=60) == 13


def test_datasets_survive_restart_and_quota_is_enforced(gateway_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    site = gateway_factory("--dataset-quota", str(2_000_000), site_id="keeper", num_cpus=1).start()
    table = sample(20_000)
    with intertie.connect(site.address) as fed:
        ref = fed.put_dataset(table, name="kept")
        with pytest.raises(intertie.PayloadTooLargeError, match="quota"):
            fed.put_dataset(sample(200_000), name="too-big")
        assert [r.name for r in fed.datasets()] == ["kept"]  # the refused upload left nothing behind
    assert site.stop() == 0
    site.start()
    with intertie.connect(site.address) as fed:
        assert fed.get_dataset(ref).equals(table)
        assert [r.id for r in fed.datasets()] == [ref.id]


def test_any_fsspec_filesystem_and_the_cli(gateway_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    site = gateway_factory("--data-url", "memory://intertie-test", "--result-dataset-bytes", "100000",
                           site_id="inmemory", num_cpus=1).start()
    pq.write_table(sample(5_000), tmp_path / "in.parquet")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "intertie", "--address", site.address, "datasets", *args],
                              capture_output=True, text=True, timeout=60)

    out = cli("put", str(tmp_path / "in.parquet"), "--name", "cli-set")
    assert out.returncode == 0, out.stderr
    assert "5,000 rows" in out.stdout and "uploaded 5,000 rows" in out.stderr
    listing = cli("ls")
    assert "cli-set" in listing.stdout and "id,name,value" in listing.stdout
    got = cli("get", "cli-set", str(tmp_path / "out.parquet"))
    assert got.returncode == 0, got.stderr
    assert pq.read_table(tmp_path / "out.parquet").equals(sample(5_000))
    assert cli("rm", "cli-set").returncode == 0
    missing = cli("get", "cli-set", str(tmp_path / "again.parquet"))
    assert missing.returncode == 1 and "DatasetNotFoundError" in missing.stderr

    # Workers cannot open a memory:// store: they read and write over the site's Flight endpoint.
    with intertie.connect(site.address) as fed:
        ref = fed.put_dataset(sample(20_000))
        assert fed.submit(count_rows, [ref]).result(timeout=60) == 20_000
        # A Table result over the site's threshold (100 kB here) stays there; a small one comes back.
        big = fed.submit(head, ref, 20_000).result(timeout=60)
        assert isinstance(big, intertie.DatasetRef) and big.site == "inmemory" and big.num_rows == 20_000
        assert fed.get_dataset(big).equals(sample(20_000))
        small = fed.submit(head, ref, 10).result(timeout=60)
        assert isinstance(small, pa.Table) and small.equals(sample(10))


def count_rows(tables: list, extra=None) -> int:  # type: ignore[no-untyped-def,type-arg]
    return sum(t.num_rows for t in tables) + (extra.num_rows if extra is not None else 0)


def test_refs_in_arguments_arrive_as_tables(fed: intertie.Federation) -> None:
    a = fed.put_dataset(sample(1_000))
    b = fed.put_dataset(sample(2_000))
    assert fed.submit(count_rows, [a, b], extra=a).result(timeout=60) == 4_000
    gone = fed.put_dataset(sample(10))
    fed.delete_dataset(gone)
    with pytest.raises(intertie.DatasetNotFoundError, match=f"dataset {gone.id} is not at site"):
        fed.submit(count_rows, [gone]).result(timeout=60)


def head(table: pa.Table, rows: int) -> pa.Table:
    return table.slice(0, rows)


def scaled(table: pa.Table, factor: float) -> pa.Table:
    import pyarrow.compute as pc

    return table.set_column(2, "value", pc.multiply(table.column("value"), factor))


def test_a_chain_of_dataset_results_stays_at_the_site(fed: intertie.Federation) -> None:
    step = intertie.remote(returns="dataset")(scaled)
    ref = fed.put_dataset(sample(30_000), name="chain-input")
    first = step.submit(ref, 2.0)
    once = first.result(timeout=60)
    assert isinstance(once, intertie.DatasetRef) and once.site == fed.site_id == first.site
    twice = step.submit(once, 3.0).result(timeout=60)  # a ref in, a ref out: no table crossed the client
    assert isinstance(twice, intertie.DatasetRef) and twice.num_rows == 30_000 and twice.id != once.id
    assert fed.get_dataset(twice).column("value").to_pylist() == [i * 0.5 * 6.0 for i in range(30_000)]
    assert {once.id, twice.id} <= {r.id for r in fed.datasets()}
    assert once.name.startswith("scaled-")
    # A function declared returns="dataset" that returns something else fails with a clear error.
    with pytest.raises(intertie.RemoteTaskError, match="declared returns='dataset' but returned int"):
        intertie.remote(returns="dataset")(count_rows).submit([ref]).result(timeout=60)
    with pytest.raises(ValueError, match="returns must be"):
        intertie.remote(returns="table")(scaled)
