"""The site's dataset store and its Flight endpoint, in process (real Flight on loopback, no Ray)."""

from __future__ import annotations

import json
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from intertie_gateway.datasets import DatasetError, DatasetStore
from intertie_gateway.flight_service import FlightService

SECRET = "the-site-s-own"


def table(rows: int, start: int = 0) -> pa.Table:
    return pa.table({"v": pa.array(range(start, start + rows), pa.int64())})


def batches(t: pa.Table, rows: int = 1000) -> pa.RecordBatchReader:
    return pa.RecordBatchReader.from_batches(t.schema, t.to_batches(max_chunksize=rows))


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[tuple[DatasetStore, str]]:
    store = DatasetStore(str(tmp_path / "holder"), "holder")
    server = FlightService("grpc://127.0.0.1:0", store, secret=SECRET)
    try:
        yield store, f"127.0.0.1:{server.port}"
    finally:
        server.shutdown()


def test_pull_keeps_the_id_marks_a_replica_and_skips_sources_that_fail(
        holder: tuple[DatasetStore, str], tmp_path: Path) -> None:
    source, address = holder
    meta = source.write("numbers", batches(table(10_000)))
    here = DatasetStore(str(tmp_path / "here"), "here")
    dead = "127.0.0.1:1"  # nothing listens there
    replica = here.pull(meta.id, lambda: [("gone", dead), ("holder", address)], timeout_s=5)
    assert (replica.id, replica.name, replica.origin, replica.num_rows) == (meta.id, "numbers", "holder", 10_000)
    path = here.location(meta.id)
    assert path and pa.ipc.open_file(pa.memory_map(path)).read_all().equals(table(10_000))
    assert here.used_bytes() == 0 and here.used_bytes(replicas=True) == meta.num_bytes
    assert not list((tmp_path / "here").glob("*.part"))


def test_pull_with_no_source_fails_with_a_clear_error_and_leaves_nothing(tmp_path: Path) -> None:
    here = DatasetStore(str(tmp_path / "here"), "here")
    started = time.monotonic()
    with pytest.raises(DatasetError, match="could not be fetched to site 'here'.*nothing arrived for 1 s") as err:
        here.pull("abc", lambda: [], timeout_s=1, retry_s=0.1)
    assert err.value.kind == "ERROR_KIND_SITE_FAILURE" and time.monotonic() - started < 5
    assert here.ids() == [] and not list((tmp_path / "here").iterdir())


def test_a_dataset_no_source_holds_fails_at_once(holder: tuple[DatasetStore, str], tmp_path: Path) -> None:
    _, address = holder
    here = DatasetStore(str(tmp_path / "here"), "here")
    started = time.monotonic()
    with pytest.raises(DatasetError, match="no site holds it any more .holder: does not hold it") as err:
        here.pull("deleted", lambda: [("holder", address)], timeout_s=60)
    assert err.value.kind == "ERROR_KIND_DATASET_NOT_FOUND" and time.monotonic() - started < 5


def test_a_transfer_resumes_at_a_batch(holder: tuple[DatasetStore, str]) -> None:
    source, address = holder
    meta = source.write("", batches(table(10_000), rows=1000))
    client = flight.FlightClient(f"grpc://{address}")
    try:
        ticket = flight.Ticket(json.dumps({"id": meta.id, "from_batch": 7}).encode())
        assert client.do_get(ticket).read_all().equals(table(3_000, start=7_000))
        with pytest.raises(flight.FlightServerError, match="ERROR_KIND_INVALID_ARGUMENT: bad ticket"):
            client.do_get(flight.Ticket(b'{"from_batch": 1}')).read_all()
    finally:
        client.close()


def test_replicas_evict_least_recently_used_first_never_one_in_use(
        holder: tuple[DatasetStore, str], tmp_path: Path) -> None:
    source, address = holder
    metas = [source.write(f"d{i}", batches(table(1000, start=i))) for i in range(4)]  # the same size each
    size = metas[0].num_bytes
    here = DatasetStore(str(tmp_path / "here"), "here", replica_cache_bytes=3 * size)
    mine = here.write("mine", batches(table(5000)))  # originals are never evicted
    for meta in metas[:3]:
        here.pull(meta.id, lambda: [("holder", address)])
        time.sleep(0.01)
    here.location(metas[0].id)  # read by a task: now the most recently used
    here.pull(metas[3].id, lambda: [("holder", address)])
    dropped = here.evict(keep={metas[1].id})  # d1 is being read, d2 is the oldest free one
    assert [m.id for m in dropped] == [metas[2].id]
    assert set(here.ids()) == {mine.id, metas[0].id, metas[1].id, metas[3].id}
    here.replica_cache_bytes = 2 * size
    dropped = here.evict()  # d1 no longer in use: the least recently used now
    assert [m.id for m in dropped] == [metas[1].id] and here.used_bytes(replicas=True) <= 2 * size
    assert mine.id in here.ids()


def test_quota_counts_originals_and_a_rewrite_replaces(tmp_path: Path) -> None:
    store = DatasetStore(str(tmp_path / "s"), "s", quota_bytes=20_000)
    first = store.write("r", batches(table(2000)), dataset_id="task-1")
    again = store.write("r", batches(table(2000, start=5)), dataset_id="task-1")  # a rerun: replaces
    assert first.id == again.id == "task-1" and store.used_bytes() == again.num_bytes
    # The size is what was written (the file, with its footer), not what the batches claim.
    assert again.num_bytes == (tmp_path / "s" / "task-1.arrow").stat().st_size > 16_000
    with pytest.raises(DatasetError, match="exceed the site's quota of 20000 bytes"):
        store.write("big", batches(table(1000)))
    with pytest.raises(DatasetError, match="dataset id"):
        store.write("x", batches(table(10)), dataset_id="../escape")
    reopened = DatasetStore(str(tmp_path / "s"), "s")
    _, reader = reopened.open("task-1")
    assert reader.read_all().equals(table(2000, start=5))


def test_unfinished_writes_are_removed_at_start(tmp_path: Path) -> None:
    root = tmp_path / "s"
    root.mkdir()
    (root / f"{uuid.uuid4().hex}.arrow.part").write_bytes(b"half")
    (root / "x.1234abcd.arrow.part").write_bytes(b"half")
    (root / "x.1234abcd.json.part").write_text("{half")
    (root / "broken.json").write_text("{not json")
    (root / "orphan.arrow").write_bytes(b"data without metadata")
    store = DatasetStore(str(root), "s")
    assert store.ids() == [] and sorted(p.name for p in root.iterdir()) == ["broken.json"]
    kept = store.write("kept", batches(table(10)))
    assert sorted(p.name for p in root.iterdir()) == sorted(["broken.json", f"{kept.id}.arrow", f"{kept.id}.json"])
    assert DatasetStore(str(root), "s").ids() == [kept.id]


def test_a_worker_stores_a_result_under_its_task_id(holder: tuple[DatasetStore, str]) -> None:
    from intertie_gateway import worker

    store, address = holder
    endpoint = json.dumps({"address": address, "roots": "", "secret": SECRET})
    ref = worker._store(table(100), endpoint, "jobs.<locals>.clean", "batch:7", "acme")
    again = worker._store(table(50), endpoint, "jobs.<locals>.clean", "batch:7", "acme")  # a rerun replaces it
    assert ref.id == again.id == "batch_7" and ref.name == "clean-batch_7" and ref.site == "holder"
    assert store.ids() == ["batch_7"] and store.open("batch_7")[1].read_all().equals(table(50))
    assert store.resolve("batch_7").owner == "acme"  # the task's tenant: told by the site, through Ray
    assert worker._store(table(10), address, "f", "", "").id != worker._store(table(10), address, "f", "", "").id


class HangingService(FlightService):
    """Sends one batch, then nothing: a peer that froze mid-transfer."""

    released = threading.Event()

    def do_get(self, context, ticket):  # type: ignore[no-untyped-def]
        def batches():  # type: ignore[no-untyped-def]
            yield table(10).to_batches()[0]
            while not self.released.wait(0.05) and not context.is_cancelled():
                pass

        return flight.GeneratorStream(table(1).schema, batches())


def test_a_transfer_that_stalls_is_cancelled_and_fails(tmp_path: Path) -> None:
    source = DatasetStore(str(tmp_path / "holder"), "holder")
    meta = source.write("numbers", batches(table(10_000)))
    server = HangingService("grpc://127.0.0.1:0", source)
    here = DatasetStore(str(tmp_path / "here"), "here")
    try:
        started = time.monotonic()
        with pytest.raises(DatasetError, match="nothing arrived for 1 s; 1 batches before"):
            here.pull(meta.id, lambda: [("holder", f"127.0.0.1:{server.port}")], timeout_s=1, retry_s=0.1)
        assert time.monotonic() - started < 10 and here.ids() == []
    finally:
        HangingService.released.set()
        server.shutdown()


def corrupted(offset: int = 1 << 30) -> tuple[pa.Schema, pa.RecordBatch]:
    """A 3-row batch that decodes (as a hostile upload or peer would send it) but whose list
    offsets point ``offset`` past the end of the values: Arrow's IPC writer may abort on it,
    and its claimed size comes from the bogus offsets."""
    good = pa.record_batch({"l": pa.array([[1, 2], [3], [4, 5, 6]], pa.list_(pa.int64())),
                            "s": pa.array(["a", "bb", "ccc"])})
    message = pa.ipc.read_message(good.serialize())
    body = bytearray(message.body.to_pybytes())
    at = body.find(struct.pack("<4i", 0, 2, 3, 6))  # the list column's offsets buffer
    body[at + 12:at + 16] = struct.pack("<i", offset)
    metadata = message.metadata.to_pybytes()
    frame = struct.pack("<Ii", 0xFFFFFFFF, len(metadata)) + metadata + bytes(body)
    return good.schema, pa.ipc.read_record_batch(pa.py_buffer(frame), good.schema)


class Stream:
    """An uploaded stream: a schema and its batches."""

    def __init__(self, schema: pa.Schema, items: list[pa.RecordBatch]) -> None:
        self.schema = schema
        self._items = items

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        return iter(self._items)


@pytest.mark.parametrize("offset", [7, 1 << 20, 1 << 30, -5])
def test_an_upload_with_corrupted_buffers_is_refused_and_nothing_is_stored(tmp_path: Path, offset: int) -> None:
    store = DatasetStore(str(tmp_path / "s"), "s")
    schema, bad = corrupted(offset)
    assert bad.num_rows == 3  # it decodes: only full validation finds it
    with pytest.raises(DatasetError, match="is not valid Arrow data: .*[Oo]ffset") as err:
        store.write("bad", Stream(schema, [table_batch(schema), bad]))
    assert err.value.kind == "ERROR_KIND_INVALID_ARGUMENT" and len(str(err.value)) < 600
    assert store.ids() == [] and not list((tmp_path / "s").iterdir())


def table_batch(schema: pa.Schema) -> pa.RecordBatch:
    return pa.record_batch({"l": pa.array([[9]], pa.list_(pa.int64())), "s": pa.array(["z"])}, schema=schema)


def test_a_batch_of_another_schema_is_refused(tmp_path: Path) -> None:
    store = DatasetStore(str(tmp_path / "s"), "s")
    with pytest.raises(DatasetError, match="schema differs") as err:
        store.write("x", Stream(table(1).schema, [pa.record_batch({"w": pa.array(["a"])})]))
    assert err.value.kind == "ERROR_KIND_INVALID_ARGUMENT" and store.ids() == []


class HostileService(FlightService):
    """A peer that sends a dataset's batches corrupted."""

    def do_get(self, context, ticket):  # type: ignore[no-untyped-def]
        schema, bad = corrupted()
        return flight.GeneratorStream(schema, iter([table_batch(schema), bad]))


def test_a_peer_that_sends_invalid_data_is_not_asked_again_and_nothing_is_stored(tmp_path: Path) -> None:
    source = DatasetStore(str(tmp_path / "holder"), "holder")
    schema, _ = corrupted()
    meta = source.write("hostile", Stream(schema, [table_batch(schema)] * 2))
    server = HostileService("grpc://127.0.0.1:0", source)
    here = DatasetStore(str(tmp_path / "here"), "here")
    asked = []

    def sources() -> list[tuple[str, str]]:
        asked.append(1)
        return [("holder", f"127.0.0.1:{server.port}")]

    try:
        started = time.monotonic()
        with pytest.raises(DatasetError, match="holder sent invalid data .*batch 1 is not valid Arrow data") as err:
            here.pull(meta.id, sources, timeout_s=60, retry_s=0.1)
        assert err.value.kind == "ERROR_KIND_SITE_FAILURE"
        assert time.monotonic() - started < 10 and len(asked) == 2  # failed at once, not after the timeout
        assert here.ids() == [] and not list((tmp_path / "here").iterdir())
    finally:
        server.shutdown()


@pytest.mark.parametrize("call", [
    lambda c: c.do_get(flight.Ticket(b"[" * 100_000 + b"]" * 100_000)).read_all(),  # RecursionError in json
    lambda c: c.do_get(flight.Ticket(b'{' + b'"id": {"id": 1}' + b'}')).read_all(),  # not a string
    lambda c: c.do_get(flight.Ticket(b'{"id": "x", "from_batch": -3}')).read_all(),
    lambda c: c.do_get(flight.Ticket(b'{"id": "x", "from_batch": 1e400}')).read_all(),
    lambda c: c.do_get(flight.Ticket(b"k" * 100_000)).read_all(),  # a 100 KB key is not repeated back
    lambda c: c.do_get(flight.Ticket(b"\xff\xfe")).read_all(),
    lambda c: list(c.do_action(flight.Action("get", b"k" * 100_000))),
    lambda c: list(c.do_action(flight.Action("get", "\U0001f642".encode() * 1000))),  # 4 KB of emoji, %-encoded 3x
    lambda c: c.do_get(flight.Ticket("\U0001f642".encode() * 1000)).read_all(),
    lambda c: list(c.do_action(flight.Action("x" * 100_000, b"k"))),
    lambda c: list(c.do_action(flight.Action("delete-replica", b"\xff"))),
    lambda c: c.get_flight_info(flight.FlightDescriptor.for_command(b"x")),
    lambda c: c.do_put(flight.FlightDescriptor.for_command(b'{"name": ["a"]}'), table(1).schema)[0].close(),
    lambda c: c.do_put(flight.FlightDescriptor.for_command(b"[" * 50_000), table(1).schema)[0].close(),
], ids=["deep-json", "id-not-string", "negative-batch", "huge-batch", "100kb-key", "not-utf8", "100kb-action-key",
        "emoji-action-key", "emoji-ticket",
        "100kb-action-type", "action-not-utf8", "flight-info", "name-not-string", "deep-descriptor"])
def test_bad_flight_requests_get_a_short_typed_error_without_a_traceback(
        holder: tuple[DatasetStore, str], call) -> None:  # type: ignore[no-untyped-def]
    _, address = holder
    client = flight.FlightClient(f"grpc://{address}")
    try:
        with pytest.raises(flight.FlightError) as err:
            call(client)
        text = str(err.value)
        assert "ERROR_KIND_INVALID_ARGUMENT" in text or "ERROR_KIND_NOT_FOUND" in text, text[:500]
        assert "Traceback" not in text and "Python exception" not in text and len(text) < 1000, text[:500]
        assert client.list_actions()  # still serving
    finally:
        client.close()


def test_a_dictionary_encoded_dataset_downloads_and_resumes(holder: tuple[DatasetStore, str]) -> None:
    store, address = holder
    t = pa.table({"d": pa.array(["x", "y", "x", "z"]).dictionary_encode(), "v": pa.array(range(4), pa.int64())})
    meta = store.write("dict", pa.RecordBatchReader.from_batches(t.schema, t.to_batches(max_chunksize=2)))
    client = flight.FlightClient(f"grpc://{address}")
    try:
        assert client.do_get(flight.Ticket(meta.id.encode())).read_all().equals(t)
        rest = client.do_get(flight.Ticket(json.dumps({"id": meta.id, "from_batch": 1}).encode())).read_all()
        assert rest.to_pydict() == {"d": ["x", "z"], "v": [2, 3]}
        # GetSchema: the schema, or an empty one saying why (never pyarrow's traceback).
        assert client.get_schema(flight.FlightDescriptor.for_command(meta.id)).schema.equals(t.schema)
        missing = client.get_schema(flight.FlightDescriptor.for_command(b"nope")).schema
        assert len(missing) == 0 and b"ERROR_KIND_NOT_FOUND" in missing.metadata[b"intertie-error"]
    finally:
        client.close()


def test_a_read_reported_later_counts_for_the_eviction_order(holder: tuple[DatasetStore, str], tmp_path: Path) -> None:
    source, address = holder
    metas = [source.write(f"t{i}", batches(table(1000, start=i))) for i in range(3)]
    here = DatasetStore(str(tmp_path / "here"), "here", replica_cache_bytes=2 * metas[0].num_bytes)
    for meta in metas[:2]:
        here.pull(meta.id, lambda: [("holder", address)])
        time.sleep(0.01)
    here.touch([metas[0].id, "unknown"])  # the gateway found t0's file itself and a task read it
    here.pull(metas[2].id, lambda: [("holder", address)])
    assert [m.id for m in here.evict(keep={metas[2].id})] == [metas[1].id]


def test_names_are_unique_per_site_and_replace_swaps_the_dataset_a_name_names(
        holder: tuple[DatasetStore, str], tmp_path: Path) -> None:
    store, address = holder
    first = store.write("sales", batches(table(10)))
    with pytest.raises(DatasetError, match="already has a dataset named 'sales'.*replace") as err:
        store.write("sales", batches(table(20)))
    assert err.value.kind == "ERROR_KIND_INVALID_ARGUMENT" and store.ids() == [first.id]
    assert not list((tmp_path / "holder").glob("*.part"))
    # A replica of it elsewhere goes when the name is replaced (over Flight, as a client does).
    peer = DatasetStore(str(tmp_path / "peer"), "peer")
    replica = peer.pull(first.id, lambda: [("holder", address)], timeout_s=5)
    peer_server = FlightService("grpc://127.0.0.1:0", peer)
    try:
        service = FlightService("grpc://127.0.0.1:0", store, peers=lambda: [f"127.0.0.1:{peer_server.port}"])
        try:
            client = flight.FlightClient(f"grpc://127.0.0.1:{service.port}")
            writer, answer = client.do_put(flight.FlightDescriptor.for_command(
                json.dumps({"name": "sales", "replace": True}).encode()), table(20).schema)
            with writer:
                writer.write_table(table(20))
                writer.done_writing()
                new = json.loads(answer.read().to_pybytes())
            client.close()
        finally:
            service.shutdown()
    finally:
        peer_server.shutdown()
    assert store.ids() == [new["id"]] and store.resolve("sales").num_rows == 20
    assert replica.id not in peer.ids()
    # A rerun of a task writes its result under its own id again: not a clash with itself.
    store.write("result-1", batches(table(5)), dataset_id="task-1")
    assert store.write("result-1", batches(table(6)), dataset_id="task-1").num_rows == 6


def test_a_name_shared_by_replicas_of_two_sites_is_refused_as_ambiguous(tmp_path: Path) -> None:
    a, b = DatasetStore(str(tmp_path / "a"), "a"), DatasetStore(str(tmp_path / "b"), "b")
    servers = [FlightService("grpc://127.0.0.1:0", s) for s in (a, b)]
    try:
        metas = [s.write("shared", batches(table(3))) for s in (a, b)]
        here = DatasetStore(str(tmp_path / "here"), "here")
        for meta, server in zip(metas, servers, strict=True):
            here.pull(meta.id, lambda server=server: [("x", f"127.0.0.1:{server.port}")], timeout_s=5)
        with pytest.raises(DatasetError, match="2 datasets named 'shared'.*by its id"):
            here.resolve("shared")
        mine = here.write("shared", batches(table(1)))  # this site's own wins over replicas
        assert here.resolve("shared").id == mine.id
    finally:
        for server in servers:
            server.shutdown()


def test_a_file_put_without_a_name_is_named_after_the_file() -> None:
    from intertie.datasets import name_for

    assert name_for("s3://bucket/raw/sales 2024.parquet") == "sales_2024"
    assert name_for(Path("/data/events.csv.gz")) == "events"
    assert name_for("/data/partitioned/") == "partitioned"
    assert name_for(table(1)) is None


def test_a_tenant_sees_only_its_own_datasets_and_another_s_is_answered_like_an_unknown_one(tmp_path: Path) -> None:
    store = DatasetStore(str(tmp_path / "s"), "s")
    mine = store.write("sales", batches(table(10)), owner="acme")
    theirs = store.write("sales", batches(table(20)), owner="bolt")  # names are unique per tenant
    assert [m.id for m in store.listing("acme")] == [mine.id] and len(store.listing()) == 2
    assert store.resolve("sales", "acme").id == mine.id and store.resolve("sales", "bolt").id == theirs.id
    for call in (lambda k: store.resolve(k, "acme"), lambda k: store.open(k, "acme"),
                 lambda k: store.delete(k, "acme")):
        with pytest.raises(DatasetError) as other:
            call(theirs.id)
        with pytest.raises(DatasetError) as unknown:
            call("f" * len(theirs.id))
        assert other.value.kind == unknown.value.kind == "ERROR_KIND_NOT_FOUND"
        assert str(other.value).replace(theirs.id, "ID") == str(unknown.value).replace("f" * len(theirs.id), "ID")
    assert store.ids() == [mine.id, theirs.id]  # nothing of bolt's was deleted
    with pytest.raises(DatasetError, match="already has a dataset named 'sales'"):
        store.write("sales", batches(table(1)), owner="acme")
    assert store.write("sales", batches(table(3)), owner="acme", replace=True).num_rows == 3
    assert store.resolve("sales", "bolt").id == theirs.id  # acme's replace left bolt's alone


def test_a_store_from_before_owners_opens_with_its_datasets_owned_by_no_tenant(tmp_path: Path) -> None:
    store = DatasetStore(str(tmp_path / "s"), "s")
    meta = store.write("old", batches(table(4)))
    path = tmp_path / "s" / f"{meta.id}.json"
    raw = json.loads(path.read_text())
    del raw["owner"]  # as written by the previous release
    path.write_text(json.dumps(raw))
    reopened = DatasetStore(str(tmp_path / "s"), "s")
    assert reopened.resolve("old").owner == "" and reopened.listing("acme") == []
    assert [m.id for m in reopened.listing("")] == [meta.id]


def test_a_replica_s_owner_is_named_as_this_site_names_tenants() -> None:
    from intertie_gateway.tenancy import owner_here

    assert owner_here("acme", "beta", "alpha") == "acme@beta"  # a tenant of the holder
    assert owner_here("acme@alpha", "beta", "alpha") == "acme"  # this site's own tenant, back home
    assert owner_here("acme@gamma", "beta", "alpha") == "acme@gamma"
    assert owner_here("", "beta", "alpha") == "anonymous@beta"  # as its forwarded tasks' tenant is named


@pytest.fixture
def tenants(tmp_path: Path) -> Iterator[tuple[DatasetStore, str, dict[str, str]]]:
    """A Flight endpoint with token auth and TLS; tokens of tenants acme and bolt."""
    from intertie_gateway.certs import create_ca, create_site
    from intertie_gateway.tokens import TokenStore

    tokens = TokenStore(tmp_path / "tokens.json")
    issued = {tenant: tokens.create(tenant)[1] for tenant in ("acme", "bolt")}
    ca = create_ca(tmp_path / "certs")
    site = create_site(ca, tmp_path / "certs", "s", ["127.0.0.1"])
    store = DatasetStore(str(tmp_path / "s"), "s")
    server = FlightService("grpc+tls://127.0.0.1:0", store, secret=SECRET, tokens=tokens,
                           tls_certificates=[(site.cert.read_bytes(), site.key.read_bytes())])
    try:
        yield store, f"127.0.0.1:{server.port}", {**issued, "ca": ca.cert.read_text()}
    finally:
        server.shutdown()


def _sdk(address: str, token: str | None, ca: str) -> object:
    from intertie._rpc import Credentials
    from intertie.datasets import DatasetClient

    return DatasetClient(lambda site: ("s", address), Credentials(token, ca.encode()))


def test_flight_refuses_a_missing_or_wrong_token_in_one_line_that_never_repeats_it(
        tenants: tuple[DatasetStore, str, dict[str, str]]) -> None:
    import intertie

    store, address, issued = tenants
    kept = store.write("kept", batches(table(5)), owner="acme")
    wrong = issued["acme"][:-4] + "AAAA"
    for token in (None, wrong, "itk_not-a-token"):
        client = _sdk(address, token, issued["ca"])
        for call in (lambda c: c.list(), lambda c: c.get(kept.id), lambda c: c.put(table(3), "x", None),  # type: ignore[attr-defined]
                     lambda c: c.action("delete", kept.id)):  # type: ignore[attr-defined]
            with pytest.raises(intertie.AuthenticationError) as refused:
                call(client)
            text = str(refused.value)
            assert "\n" not in text and "not authenticated" in text and (token is None or token not in text), text
    assert store.ids() == [kept.id]


def test_over_flight_tenant_b_gets_the_same_answer_for_a_s_dataset_as_for_an_unknown_one(
        tenants: tuple[DatasetStore, str, dict[str, str]]) -> None:
    import intertie

    store, address, issued = tenants
    acme, bolt = _sdk(address, issued["acme"], issued["ca"]), _sdk(address, issued["bolt"], issued["ca"])
    ref = acme.put(table(100), "private", None)  # type: ignore[attr-defined]
    assert store.resolve(ref.id).owner == "acme" and acme.get(ref.id).equals(table(100))  # type: ignore[attr-defined]
    assert bolt.list() == [] and [r.id for r in acme.list()] == [ref.id]  # type: ignore[attr-defined]
    unknown = "0" * len(ref.id)
    for call in (lambda k: bolt.get(k), lambda k: bolt.action("get", k),  # type: ignore[attr-defined]
                 lambda k: bolt.action("delete", k)):  # type: ignore[attr-defined]
        answers = []
        for key in (ref.id, unknown, "private"):
            with pytest.raises(intertie.DatasetNotFoundError) as err:
                call(key)
            answers.append(str(err.value).replace(key, "KEY"))
        assert answers[0] == answers[1] == answers[2], answers
    assert bolt.put(table(7), "private", None).num_rows == 7  # type: ignore[attr-defined]  # its own name space
    assert store.resolve(ref.id).num_rows == 100  # acme's is untouched
    # Only the site itself says which id or owner a dataset gets.
    client = flight.FlightClient(f"grpc+tls://{address}", tls_root_certs=issued["ca"].encode())
    options = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {issued['bolt']}".encode())])
    for command in ({"name": "x", "id": ref.id}, {"name": "x", "owner": "acme"}):
        writer, _ = client.do_put(flight.FlightDescriptor.for_command(json.dumps(command).encode()),
                                  table(1).schema, options)
        with pytest.raises(flight.FlightError, match="set by the site"):
            with writer:
                writer.write_table(table(1))
                writer.done_writing()
    client.close()
    assert store.resolve(ref.id).num_rows == 100 and store.resolve(ref.id).owner == "acme"


def test_a_plaintext_client_cannot_talk_to_a_tls_flight_endpoint(
        tenants: tuple[DatasetStore, str, dict[str, str]]) -> None:
    _, address, issued = tenants
    client = flight.FlightClient(f"grpc://{address}")
    with pytest.raises(flight.FlightUnavailableError):
        list(client.list_flights(options=flight.FlightCallOptions(
            timeout=10, headers=[(b"authorization", f"Bearer {issued['acme']}".encode())])))
    client.close()


def test_the_peers_endpoint_takes_only_certificates_of_the_federation_ca_and_peers_only_read(tmp_path: Path) -> None:
    from intertie_gateway.certs import create_ca, create_site
    from intertie_gateway.dataplane import connect
    from intertie_gateway.flight_service import PeerFlightService

    ca = create_ca(tmp_path / "fed")
    alpha, beta = (create_site(ca, tmp_path / "fed", s, ["127.0.0.1"]) for s in ("alpha", "beta"))
    outsider_ca = create_ca(tmp_path / "outsider")
    outsider = create_site(outsider_ca, tmp_path / "outsider", "beta", ["127.0.0.1"])
    store = DatasetStore(str(tmp_path / "alpha"), "alpha")
    original = store.write("shared", batches(table(50)), owner="acme")
    server = PeerFlightService("grpc+tls://127.0.0.1:0", store, verify_client=True,
                               root_certificates=ca.cert.read_bytes(),
                               tls_certificates=[(alpha.cert.read_bytes(), alpha.key.read_bytes())])
    address = f"127.0.0.1:{server.port}"

    def client(issued: object | None) -> flight.FlightClient:
        mine = {} if issued is None else {"cert_chain": issued.cert.read_bytes(),  # type: ignore[attr-defined]
                                          "private_key": issued.key.read_bytes()}  # type: ignore[attr-defined]
        return connect(address, ca.cert.read_bytes(), **mine)

    try:
        for refused in (client(None), client(outsider)):  # a tenant's client, a certificate of another CA
            with pytest.raises(flight.FlightUnavailableError):
                list(refused.list_flights(options=flight.FlightCallOptions(timeout=10)))
            refused.close()
        peer = client(beta)
        # As itself, a peer reads by id (its tasks' inputs), and neither lists, stores nor deletes.
        assert peer.do_get(flight.Ticket(original.id.encode())).read_all().equals(table(50))
        with pytest.raises(flight.FlightError, match="only for a tenant"):
            list(peer.list_flights())
        with pytest.raises(flight.FlightError, match="unknown action 'delete'"):
            list(peer.do_action(flight.Action("delete", original.id.encode())))
        writer, _ = peer.do_put(flight.FlightDescriptor.for_command(b'{"name": "x"}'), table(1).schema)
        with pytest.raises(flight.FlightError, match="only for a tenant"):
            with writer:
                writer.write_table(table(1))
                writer.done_writing()
        # For one of its own tenants it lists, stores and deletes that tenant's datasets only.
        def vouching(tenant: str) -> flight.FlightCallOptions:
            return flight.FlightCallOptions(timeout=10, headers=[(b"intertie-tenant", tenant.encode())])

        assert list(peer.list_flights(options=vouching("acme@beta"))) == []  # acme of alpha is another tenant
        writer, answer = peer.do_put(flight.FlightDescriptor.for_command(b'{"name": "x"}'), table(1).schema,
                                     vouching("acme@beta"))
        with writer:
            writer.write_table(table(1))
            writer.done_writing()
            stored = json.loads(answer.read().to_pybytes())
        assert stored["owner"] == "acme@beta" and store.resolve(stored["id"], "acme@beta").num_rows == 1
        with pytest.raises(flight.FlightError, match="not found|has no dataset"):
            list(peer.do_action(flight.Action("delete", original.id.encode()), vouching("acme@beta")))
        assert json.loads(next(iter(peer.do_action(flight.Action("delete", stored["id"].encode()),
                                                   vouching("acme@beta")))).body.to_pybytes())["id"] == stored["id"]
        with pytest.raises(flight.FlightUnauthenticatedError, match="may act only for its own tenants"):
            list(peer.list_flights(options=vouching("acme@alpha")))  # beta does not act for alpha's tenants
        peer.close()
        # A pull with the site's certificate gets a replica, owned by the holder's tenant as named here.
        here = DatasetStore(str(tmp_path / "beta"), "beta", connect=lambda a: connect(
            a, ca.cert.read_bytes(), cert_chain=beta.cert.read_bytes(), private_key=beta.key.read_bytes()))
        replica = here.pull(original.id, lambda: [("alpha", address)], timeout_s=5)
        assert (replica.origin, replica.owner, replica.num_rows) == ("alpha", "acme@alpha", 50)
        assert store.ids() == [original.id]
    finally:
        server.shutdown()


def test_a_tenants_dataset_quota_bounds_what_it_stores_and_no_one_elses(tmp_path: Path) -> None:
    quotas = {"acme": 200_000}
    store = DatasetStore(str(tmp_path / "site"), "site", owner_quota=lambda owner: quotas.get(owner, 0))
    first = store.write("a", batches(table(5_000)), owner="acme")
    assert 0 < first.num_bytes < 200_000
    with pytest.raises(DatasetError, match="exceed the quota of tenant 'acme', 200000 bytes") as over:
        store.write("b", batches(table(50_000)), owner="acme")
    assert over.value.kind == "ERROR_KIND_QUOTA_EXCEEDED"
    assert [m.name for m in store.listing("acme")] == ["a"]  # nothing half-written is left
    assert store.write("b", batches(table(50_000)), owner="globex").num_rows == 50_000  # others: no limit
    assert store.write("a", batches(table(5_000)), owner="acme", replace=True).num_rows == 5_000  # a replacement fits


def test_a_dataset_id_of_another_owner_is_refused_not_replaced(tmp_path: Path) -> None:
    store = DatasetStore(str(tmp_path / "site"), "site")
    theirs = store.write("r", batches(table(10)), "task-1", owner="acme")
    with pytest.raises(DatasetError, match="dataset id task-1 is taken"):
        store.write("r", batches(table(3)), "task-1", owner="globex")
    assert store.resolve("task-1", "acme").num_rows == theirs.num_rows == 10


def test_the_workers_secret_reads_and_stores_by_id_but_lists_deletes_and_steers_nothing(tmp_path: Path) -> None:
    from intertie_gateway.dataplane import DataPlaneService
    from intertie_gateway.flight_service import SECRET_HEADER

    store = DatasetStore(str(tmp_path / "site"), "site")
    kept = store.write("kept", batches(table(5)), owner="acme")
    server = DataPlaneService("grpc://127.0.0.1:0", store, connect=lambda a: flight.FlightClient(f"grpc://{a}"),
                              identify=None, secret=SECRET, worker_secret="the-workers")
    client = flight.FlightClient(f"grpc://127.0.0.1:{server.port}")
    as_worker = flight.FlightCallOptions(timeout=10, headers=[(SECRET_HEADER.encode(), b"the-workers")])
    try:
        assert client.do_get(flight.Ticket(kept.id.encode()), as_worker).read_all().num_rows == 5  # an input
        descriptor = flight.FlightDescriptor.for_command(json.dumps({"name": "result", "id": "task-9",
                                                                     "owner": "acme"}).encode())
        writer, _ = client.do_put(descriptor, table(2).schema, as_worker)  # a result, the task's tenant's
        writer.write_table(table(2))
        writer.close()
        assert store.resolve("task-9", "acme").num_rows == 2
        for call in (lambda: list(client.list_flights(options=as_worker)),
                     lambda: list(client.do_action(flight.Action("delete", kept.id.encode()), as_worker)),
                     lambda: list(client.do_action(flight.Action("dp-sync", b'{"peers": ["10.0.0.1:1"]}'),
                                                   as_worker))):
            with pytest.raises(flight.FlightError):
                call()
        assert [m.id for m in store.listing("acme")] == [kept.id, "task-9"]
    finally:
        client.close()
        server.shutdown()


def test_a_pull_for_a_tenant_copies_only_that_tenants_dataset(holder: tuple[DatasetStore, str], tmp_path: Path) -> None:
    source, address = holder
    meta = source.write("private", batches(table(1_000)), owner="acme")
    here = DatasetStore(str(tmp_path / "here"), "here")
    with pytest.raises(DatasetError, match="no site holds it") as refused:
        here.pull(meta.id, lambda: [("holder", address)], timeout_s=5, owner="globex@holder")
    assert refused.value.kind == "ERROR_KIND_DATASET_NOT_FOUND"
    assert here.location(meta.id) is None and not list((tmp_path / "here").glob("*.part"))
    replica = here.pull(meta.id, lambda: [("holder", address)], timeout_s=5, owner="acme@holder")
    assert (replica.num_rows, replica.owner) == (1_000, "acme@holder")
