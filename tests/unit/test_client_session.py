"""The client's session stream against a stand-in gateway that can go away and come back."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest

from intertie import _session, errors
from intertie.client import Federation
from intertie.v1 import site_pb2, site_pb2_grpc, tasks_pb2, tasks_pb2_grpc


class FakeGateway(tasks_pb2_grpc.TaskServiceServicer, site_pb2_grpc.SiteServiceServicer):
    """Acknowledges every task and runs none; its first ``failing`` Subscribe calls fail."""

    def __init__(self, failing: int = 0, max_payload_bytes: int = 1 << 20) -> None:
        self.failing = failing
        self.max_payload_bytes = max_payload_bytes
        self.batch_bytes: list[int] = []  # size of each batch message received
        self.opened = 0
        self.submitted: list[str] = []
        self.subscribed: list[list[str]] = []

    def GetStatus(self, request: Any, context: Any) -> site_pb2.SiteStatus:
        return site_pb2.SiteStatus(site_id="fake", max_payload_bytes=self.max_payload_bytes)

    def Connect(self, requests: Iterator[tasks_pb2.ClientMessage], context: Any) -> Iterator[tasks_pb2.ServerMessage]:
        next(requests)  # open
        self.opened += 1
        yield tasks_pb2.ServerMessage(events=tasks_pb2.TaskEvents())
        for message in requests:
            tasks = message.submit.request.tasks
            self.batch_bytes.append(message.ByteSize())
            self.submitted.extend(t.task_id for t in tasks)
            yield tasks_pb2.ServerMessage(ack=tasks_pb2.SubmitAck(
                seq=message.submit.seq, acks=[tasks_pb2.TaskAck(task_id=t.task_id, accepted=True) for t in tasks]))

    def Subscribe(self, request: tasks_pb2.SubscribeRequest, context: Any) -> tasks_pb2.SubscribeResponse:
        if self.failing:
            self.failing -= 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "the gateway is starting")
        self.subscribed.append(list(request.task_ids))
        return tasks_pb2.SubscribeResponse()


def serve(gateway: FakeGateway, port: int = 0) -> tuple[grpc.Server, int]:
    server = grpc.server(ThreadPoolExecutor(8), options=[("grpc.max_receive_message_length", 64 << 20)])
    tasks_pb2_grpc.add_TaskServiceServicer_to_server(gateway, server)
    site_pb2_grpc.add_SiteServiceServicer_to_server(gateway, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, port


def until(condition: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_failed_resubscribe_after_a_reconnect_is_asked_again() -> None:
    server, port = serve(FakeGateway())
    fed = Federation(f"127.0.0.1:{port}")
    try:
        future = fed.submit(abs, -1)
        assert future._acked.wait(10)
        server.stop(None).wait()
        # It comes back without the events of the tasks it finished meanwhile: the client
        # must get its Subscribe through, even when the first one fails.
        restarted = FakeGateway(failing=1)
        server, _ = serve(restarted, port)
        until(lambda: restarted.subscribed)
        assert restarted.subscribed == [[future.task_id]]
        assert restarted.opened == 2
    finally:
        fed.close()
        server.stop(None)


def test_tasks_failed_after_the_reconnect_timeout_are_not_sent_later(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_session, "RECONNECT_TIMEOUT_S", 0.5)
    server, port = serve(FakeGateway())
    fed = Federation(f"127.0.0.1:{port}")
    try:
        server.stop(None).wait()
        future = fed.submit(abs, -1)
        with pytest.raises(errors.SiteUnavailableError):
            future.result(timeout=30)
        restarted = FakeGateway()
        server, _ = serve(restarted, port)
        until(lambda: restarted.opened)
        time.sleep(0.5)
        assert restarted.submitted == []
    finally:
        fed.close()
        server.stop(None)


def test_close_does_not_wait_for_an_unreachable_gateway() -> None:
    server, port = serve(FakeGateway())
    fed = Federation(f"127.0.0.1:{port}")
    server.stop(None).wait()
    future = fed.submit(abs, -1)
    started = time.monotonic()
    fed.close()
    assert time.monotonic() - started < 5  # not CLOSE_FLUSH_TIMEOUT_S
    # Taken back if it was still queued, failed if it may have left: either way, done.
    assert future.done()
    if not future.cancelled():
        with pytest.raises(errors.IntertieError):
            future.result(timeout=0)


def test_batches_count_the_functions_they_carry() -> None:
    gateway = FakeGateway(max_payload_bytes=64 << 20)
    server, port = serve(gateway)
    fed = Federation(f"127.0.0.1:{port}")
    try:
        functions = []
        for i in range(4):  # four functions of 3 MB each (their closures), tiny arguments
            blob = bytes([i]) * (3 << 20)
            functions.append(lambda x, blob=blob: len(blob) + x)
        session = fed._session
        with session._lock:  # all four queued before the I/O loop flushes them
            session._flush_scheduled = True
        futures = [fed.submit(f, 1) for f in functions]
        session._loop.call_soon_threadsafe(session._flush)
        until(lambda: len(gateway.submitted) == 4)
        assert [f.task_id for f in futures] == gateway.submitted
        assert len(gateway.batch_bytes) >= 2 and max(gateway.batch_bytes) < 10 << 20
    finally:
        fed.close()
        server.stop(None)


def test_a_burst_waits_for_acks_and_goes_as_one_batch() -> None:
    acks_held = threading.Event()

    class SlowToAck(FakeGateway):
        def Connect(self, requests: Iterator[tasks_pb2.ClientMessage],
                    context: Any) -> Iterator[tasks_pb2.ServerMessage]:
            next(requests)
            yield tasks_pb2.ServerMessage(events=tasks_pb2.TaskEvents())
            for message in requests:
                acks_held.wait(30)
                tasks = message.submit.request.tasks
                self.batch_bytes.append(len(tasks))
                self.submitted.extend(t.task_id for t in tasks)
                yield tasks_pb2.ServerMessage(ack=tasks_pb2.SubmitAck(
                    seq=message.submit.seq, acks=[tasks_pb2.TaskAck(task_id=t.task_id, accepted=True) for t in tasks]))

    gateway = SlowToAck()
    server, port = serve(gateway)
    fed = Federation(f"127.0.0.1:{port}")
    session = fed._session

    def flushed() -> None:  # the flush that a submit scheduled on the I/O loop has run
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0), session._loop).result(10)

    try:
        futures = []
        for _ in range(_session.MAX_INFLIGHT_BATCHES):  # one batch each, unacknowledged
            futures.append(fed.submit(abs, -1))
            flushed()
        assert len(session._inflight) == _session.MAX_INFLIGHT_BATCHES
        futures += [fed.submit(abs, -i) for i in range(300)]
        flushed()
        assert len(session._inflight) == _session.MAX_INFLIGHT_BATCHES and len(session._queue) == 300
        acks_held.set()
        until(lambda: len(gateway.submitted) == len(futures))
        assert gateway.submitted == [f.task_id for f in futures]
        assert gateway.batch_bytes == [1] * _session.MAX_INFLIGHT_BATCHES + [300]  # the burst: one batch
        # Futures failed while a flush waited for room (the gateway known down): what is
        # submitted next is sent, although the acks that flush waited for never come.
        with session._lock:
            session._flush_scheduled = True
        session._loop.call_soon_threadsafe(session.fail_all, errors.IntertieError("gone"))
        flushed()
        assert fed.submit(abs, -7)._acked.wait(10)
    finally:
        acks_held.set()
        fed.close()
        server.stop(None)


def test_a_finished_future_asks_for_its_placement_once() -> None:
    from intertie.futures import TaskFuture

    class Home:
        asked = 0

        def task(self, task_id: str) -> object:
            Home.asked += 1
            return type("Info", (), {"placement": f"placement of {task_id}"})()

    future = TaskFuture("t1", Home())  # type: ignore[arg-type]
    assert future.placement == "placement of t1" and future.placement  # running: asked each time
    assert Home.asked == 2
    future._resolve(1)
    assert [future.placement for _ in range(5)] == ["placement of t1"] * 5
    assert Home.asked == 3  # done: asked once more, then kept
