"""Bad input gets a typed error and harms neither the gateway nor other tasks."""

from __future__ import annotations

import hashlib
import sys
import textwrap
import time
import uuid
from pathlib import Path

import cloudpickle
import grpc
import pytest

import intertie
from intertie.v1 import common_pb2, tasks_pb2, tasks_pb2_grpc

K = common_pb2.ErrorKind


def identity(x: object) -> object:
    return x


@pytest.fixture
def raw(gateway) -> tasks_pb2_grpc.TaskServiceStub:  # type: ignore[no-untyped-def]
    channel = grpc.insecure_channel(gateway.address, options=[("grpc.max_send_message_length", 64 << 20)])
    try:
        yield tasks_pb2_grpc.TaskServiceStub(channel)
    finally:
        channel.close()


def _spec(digest: str, args: bytes = b"", **fields: object) -> tasks_pb2.TaskSpec:
    base: dict[str, object] = dict(task_id=uuid.uuid4().hex, function_digest=digest, args=args,
                                   resources=common_pb2.ResourceRequest(cpus=1), python_version="3.11")
    base.update(fields)
    return tasks_pb2.TaskSpec(**base)  # type: ignore[arg-type]


def _function() -> tasks_pb2.Function:
    payload = cloudpickle.dumps(identity)
    return tasks_pb2.Function(digest=hashlib.sha256(payload).hexdigest(), payload=payload, name="identity")


def _still_serving(fed: intertie.Federation) -> None:
    assert fed.submit(identity, "alive").result(timeout=60) == "alive"


def test_unmeetable_resources_fail_fast_with_placement_error(fed: intertie.Federation) -> None:
    started = time.monotonic()
    with pytest.raises(intertie.PlacementError, match="GPU=1"):
        intertie.remote(gpus=1)(identity).submit(1).result(timeout=30)
    with pytest.raises(intertie.PlacementError, match="bigmem=5"):
        intertie.remote(resources={"bigmem": 5})(identity).submit(1).result(timeout=30)
    with pytest.raises(intertie.PlacementError, match="nosuch"):
        intertie.remote(resources={"nosuch": 1})(identity).submit(1).result(timeout=30)
    assert time.monotonic() - started < 10
    _still_serving(fed)


def test_oversize_arguments_rejected_by_client(fed: intertie.Federation) -> None:
    assert fed.max_payload_bytes == 4 * 1024 * 1024
    with pytest.raises(intertie.PayloadTooLargeError, match="over the gateway's limit"):
        fed.submit(len, b"x" * (5 * 1024 * 1024))  # refused at submit: the client knows the home's limit
    _still_serving(fed)


def test_oversize_arguments_rejected_by_gateway(fed: intertie.Federation, raw) -> None:  # type: ignore[no-untyped-def]
    fn = _function()
    spec = _spec(fn.digest, args=b"x" * (5 * 1024 * 1024))
    resp = raw.Submit(tasks_pb2.SubmitRequest(functions=[fn], tasks=[spec]), timeout=30)
    assert not resp.acks[0].accepted
    assert resp.acks[0].error.kind == K.ERROR_KIND_PAYLOAD_TOO_LARGE
    # A message over the transport limit is refused as a whole, with a typed error in the SDK.
    with pytest.raises(grpc.RpcError) as info:
        raw.Submit(tasks_pb2.SubmitRequest(tasks=[_spec(fn.digest, args=b"x" * (40 * 1024 * 1024))]), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    _still_serving(fed)


def test_oversize_result_is_typed_error(fed: intertie.Federation) -> None:
    fut = fed.submit(bytes, 5 * 1024 * 1024)
    with pytest.raises(intertie.PayloadTooLargeError, match="result is"):
        fut.result(timeout=60)
    _still_serving(fed)


def test_function_that_cannot_be_unpickled_on_site(fed: intertie.Federation, tmp_path: Path) -> None:
    # A module that exists only on the client: the function pickles by reference to it.
    (tmp_path / "only_on_client.py").write_text(textwrap.dedent("""
        def double(x):
            return 2 * x
    """))
    sys.path.insert(0, str(tmp_path))
    try:
        import only_on_client  # type: ignore[import-not-found]

        fut = fed.submit(only_on_client.double, 21)
        with pytest.raises(intertie.SerializationError, match="could not be unpickled on this site.*only_on_client"):
            fut.result(timeout=60)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("only_on_client", None)
    _still_serving(fed)


def test_arguments_that_cannot_be_pickled_fail_at_submit(fed: intertie.Federation) -> None:
    import threading

    with pytest.raises(intertie.SerializationError, match="cannot pickle task arguments"):
        fed.submit(identity, threading.Lock())


def test_result_that_cannot_be_pickled(fed: intertie.Federation) -> None:
    def make_lock() -> object:
        import threading

        return threading.Lock()

    with pytest.raises(intertie.SerializationError, match="could not be pickled"):
        fed.submit(make_lock).result(timeout=60)


def test_unknown_task_ids(fed: intertie.Federation) -> None:
    with pytest.raises(intertie.TaskNotFoundError, match="no-such-task"):
        fed.future("no-such-task")
    with pytest.raises(intertie.TaskNotFoundError):
        fed.task("no-such-task")
    assert fed.cancel(["no-such-task"]) == []
    with pytest.raises(intertie.InvalidRequestError):
        fed.future(123)  # type: ignore[arg-type]
    # A 100 KB id is not repeated back: the typed error must fit gRPC's metadata limit.
    with pytest.raises(intertie.TaskNotFoundError, match="100000 chars") as info:
        fed.task("k" * 100_000)
    assert len(str(info.value)) < 1000


def test_other_python_minor_version_is_refused(fed: intertie.Federation, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(fed, "_py", "3.12")
    with pytest.raises(intertie.PlacementError, match="needs Python 3.12 but site 'shared' runs Python 3.11"):
        fed.submit(identity, 1).result(timeout=30)
    monkeypatch.undo()
    _still_serving(fed)


def test_malformed_bytes_do_not_harm_gateway(fed: intertie.Federation, gateway) -> None:  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(gateway.address) as channel:
        for method in ("Submit", "Subscribe", "GetTask", "Cancel"):
            call = channel.unary_unary(f"/intertie.v1.TaskService/{method}",
                                       request_serializer=lambda b: b, response_deserializer=lambda b: b)
            with pytest.raises(grpc.RpcError) as info:
                call(b"\xff\xfe\x00garbage\x12\x34", timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "malformed request" in (info.value.details() or "")
    _still_serving(fed)


def test_session_stream_refuses_bad_messages(fed: intertie.Federation, gateway) -> None:  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(gateway.address) as channel:
        connect = channel.stream_stream("/intertie.v1.TaskService/Connect",
                                        request_serializer=lambda b: b, response_deserializer=lambda b: b)
        opening = tasks_pb2.ClientMessage(open=tasks_pb2.WatchRequest(session_id="bad-stream")).SerializeToString()
        cases = {
            "first message is not an open": [tasks_pb2.ClientMessage(
                submit=tasks_pb2.SubmitBatch(seq=1)).SerializeToString()],
            "garbage after the open": [opening, b"\xff\xfe\x00garbage\x12\x34"],
            "a second open": [opening, opening],
        }
        for case, messages in cases.items():
            with pytest.raises(grpc.RpcError) as info:
                for _ in connect(iter(messages), timeout=10):
                    pass
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case
    _still_serving(fed)


def test_a_client_cannot_open_a_peer_link_reconcile_or_set_home(fed: intertie.Federation, gateway,  # type: ignore[no-untyped-def]
                                                                 raw) -> None:
    with grpc.insecure_channel(gateway.address) as channel:
        connect = channel.stream_stream("/intertie.v1.TaskService/Connect",
                                        request_serializer=lambda b: b, response_deserializer=lambda b: b)
        claim = tasks_pb2.ClientMessage(open=tasks_pb2.WatchRequest(session_id="peer:alpha:guess", peer_site="alpha"))
        with pytest.raises(grpc.RpcError) as info:
            for _ in connect(iter([claim.SerializeToString()]), timeout=10):
                pass
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "did not open a peer link" in (info.value.details() or "")
        opening = tasks_pb2.ClientMessage(open=tasks_pb2.WatchRequest(session_id=uuid.uuid4().hex))
        reconcile = tasks_pb2.ClientMessage(reconcile=tasks_pb2.Reconcile(task_ids=["a"]))
        with pytest.raises(grpc.RpcError) as info:
            for _ in connect(iter([opening.SerializeToString(), reconcile.SerializeToString()]), timeout=10):
                pass
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "reconcile is for peer links" in (info.value.details() or "")
    fn = _function()
    forged = _spec(fn.digest, home="some-peer")
    acks = raw.Submit(tasks_pb2.SubmitRequest(functions=[fn], tasks=[forged]), timeout=30).acks
    assert not acks[0].accepted and acks[0].error.kind == common_pb2.ERROR_KIND_INVALID_ARGUMENT
    assert "home is set by the gateway" in acks[0].error.message
    _still_serving(fed)


def test_session_stream_acknowledges_batches_in_order(fed: intertie.Federation, gateway) -> None:  # type: ignore[no-untyped-def]
    fn = _function()
    batches = [tasks_pb2.ClientMessage(submit=tasks_pb2.SubmitBatch(seq=seq, request=tasks_pb2.SubmitRequest(
        functions=[fn] if seq == 1 else [], tasks=[_spec(fn.digest, args=cloudpickle.dumps(((seq,), {})))])))
        for seq in (1, 2, 3)]
    opening = tasks_pb2.ClientMessage(open=tasks_pb2.WatchRequest(session_id=uuid.uuid4().hex))
    with grpc.insecure_channel(gateway.address) as channel:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        acks, results = [], {}
        stream = stub.Connect(iter([opening, *batches]), timeout=60)
        for message in stream:
            if message.HasField("ack"):
                acks.append(message.ack.seq)
                assert all(a.accepted for a in message.ack.acks)
            for event in message.events.events:
                results[event.task_id] = cloudpickle.loads(event.result)
            if len(results) == 3:
                break
        stream.cancel()
    assert acks == [1, 2, 3]
    assert sorted(results.values()) == [1, 2, 3]


def test_session_stream_delivers_every_ack_even_without_events(gateway) -> None:  # type: ignore[no-untyped-def]
    # Refused tasks produce no events: each batch's ack is all the client will hear, so
    # none may be held back behind another message.
    bad = tasks_pb2.TaskSpec(task_id="x", function_digest="not-a-digest")
    batches = [tasks_pb2.ClientMessage(submit=tasks_pb2.SubmitBatch(seq=seq, request=tasks_pb2.SubmitRequest(
        tasks=[bad]))) for seq in range(1, 201)]
    opening = tasks_pb2.ClientMessage(open=tasks_pb2.WatchRequest(session_id=uuid.uuid4().hex))
    with grpc.insecure_channel(gateway.address) as channel:
        stream = tasks_pb2_grpc.TaskServiceStub(channel).Connect(iter([opening, *batches]), timeout=30)
        acks = []
        for message in stream:
            if message.HasField("ack"):
                assert not message.ack.acks[0].accepted
                acks.append(message.ack.seq)
                if len(acks) == len(batches):
                    break
        stream.cancel()
    assert acks == list(range(1, 201))


def test_malformed_specs_get_per_task_errors(fed: intertie.Federation, raw) -> None:  # type: ignore[no-untyped-def]
    fn = _function()
    good = _spec(fn.digest, args=cloudpickle.dumps((("ok",), {})))
    bad = {
        "empty id": (_spec(fn.digest, task_id=""), K.ERROR_KIND_INVALID_ARGUMENT),
        "bad digest": (_spec("not-a-digest"), K.ERROR_KIND_INVALID_ARGUMENT),
        "negative cpus": (_spec(fn.digest, resources=common_pb2.ResourceRequest(cpus=-1)),
                          K.ERROR_KIND_INVALID_ARGUMENT),
        "nan gpus": (_spec(fn.digest, resources=common_pb2.ResourceRequest(gpus=float("nan"))),
                     K.ERROR_KIND_INVALID_ARGUMENT),
        "negative retries": (_spec(fn.digest, max_retries=-1), K.ERROR_KIND_INVALID_ARGUMENT),
        "negative timeout": (_spec(fn.digest, timeout_s=-5), K.ERROR_KIND_INVALID_ARGUMENT),
        "unknown function": (_spec("ab" * 32), K.ERROR_KIND_NOT_FOUND),
    }
    resp = raw.Submit(tasks_pb2.SubmitRequest(functions=[fn], tasks=[good] + [s for s, _ in bad.values()]),
                      timeout=30)
    acks = {a.task_id: a for a in resp.acks}
    assert acks[good.task_id].accepted
    for name, (spec, kind) in bad.items():
        ack = [a for a in resp.acks if a.task_id == spec.task_id][0]
        assert not ack.accepted, name
        assert ack.error.kind == kind, name
        assert ack.error.message, name
    # The good task in the same batch ran.
    assert fed.future(good.task_id).result(timeout=60) == "ok"


def test_function_bytes_must_match_digest(fed: intertie.Federation, raw) -> None:  # type: ignore[no-untyped-def]
    fn = _function()
    forged = tasks_pb2.Function(digest="cd" * 32, payload=fn.payload, name="forged")
    resp = raw.Submit(tasks_pb2.SubmitRequest(functions=[forged], tasks=[_spec(forged.digest)]), timeout=30)
    assert not resp.acks[0].accepted
    assert resp.acks[0].error.kind == K.ERROR_KIND_INVALID_ARGUMENT
    assert "digest" in resp.acks[0].error.message


def test_wrong_types_in_sdk_options() -> None:
    with pytest.raises(TypeError, match="cpus must be a number"):
        intertie.remote(cpus="two")(identity)
    with pytest.raises(ValueError, match="gpus must be a finite number"):
        intertie.remote(gpus=-1)(identity)
    with pytest.raises(TypeError, match="unknown task option"):
        intertie.remote(identity).options(cpu=1)
    with pytest.raises(ValueError, match="timeout must be > 0"):
        intertie.remote(timeout=0)(identity)


def test_resubmitting_same_task_id_is_idempotent(fed: intertie.Federation, raw) -> None:  # type: ignore[no-untyped-def]
    fn = _function()
    spec = _spec(fn.digest, args=cloudpickle.dumps(((uuid.uuid4().hex,), {})))
    for _ in range(3):
        resp = raw.Submit(tasks_pb2.SubmitRequest(functions=[fn], tasks=[spec, spec]), timeout=30)
        assert all(a.accepted for a in resp.acks)
    fut = fed.future(spec.task_id)
    fut.result(timeout=60)
    info = fed.task(spec.task_id)
    assert info.attempts == 1 and info.state == "SUCCEEDED"
