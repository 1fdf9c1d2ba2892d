"""The Connect stream's edge: how a failure to accept a batch reaches the client."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from intertie.v1 import tasks_pb2
from intertie_gateway.service import Malformed, TaskService
from intertie_gateway.sessions import SessionHub


class Aborted(Exception):
    pass


class FakeContext:
    def __init__(self) -> None:
        self.status: tuple[grpc.StatusCode, str] | None = None

    async def abort(self, code: grpc.StatusCode, message: str, trailing_metadata: Any = ()) -> None:
        self.status = (code, dict(trailing_metadata).get("intertie-error-kind", ""))
        raise Aborted(message)


class BrokenIntake:
    async def submit(self, request: tasks_pb2.SubmitRequest, *, peer: str = "") -> list[tasks_pb2.TaskAck]:
        raise OSError("disk I/O error")


class BrokenScheduler:
    draining = False
    intake = BrokenIntake()


async def messages(second: Any) -> AsyncIterator[Any]:
    yield tasks_pb2.ClientMessage(open=tasks_pb2.WatchRequest(session_id="s"))
    yield second
    await asyncio.Event().wait()  # the client keeps its side open


def connect(second: Any) -> tuple[grpc.StatusCode, str] | None:
    async def main() -> tuple[grpc.StatusCode, str] | None:
        context = FakeContext()
        service = TaskService(BrokenScheduler(), SessionHub())  # type: ignore[arg-type]
        with pytest.raises(Aborted):
            async for _ in service.Connect(messages(second), context):  # type: ignore[arg-type]
                pass
        return context.status

    return asyncio.run(main())


def test_a_batch_the_gateway_fails_to_accept_ends_the_stream_with_a_retryable_internal() -> None:
    batch = tasks_pb2.ClientMessage(submit=tasks_pb2.SubmitBatch(seq=1, request=tasks_pb2.SubmitRequest()))
    assert connect(batch) == (grpc.StatusCode.INTERNAL, "ERROR_KIND_INTERNAL")


def test_a_malformed_message_ends_the_stream_with_invalid_argument() -> None:
    assert connect(Malformed("bad bytes")) == (grpc.StatusCode.INVALID_ARGUMENT, "ERROR_KIND_INVALID_ARGUMENT")


class FailingSites:
    async def GetStatus(self, request: Any, context: Any) -> Any:
        raise KeyError("a bug with a /secret/path in its message " + "x" * 10_000)

    async def ListSites(self, request: Any, context: Any) -> Any:
        raise AssertionError("never called")


def test_garbage_and_failures_get_short_typed_statuses_and_few_log_lines(caplog: pytest.LogCaptureFixture,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from grpc_health.v1 import health, health_pb2

    from intertie_gateway import throttle

    monkeypatch.setattr(throttle, "_throttle", throttle.Throttle())  # counts of this test only
    from grpc_reflection.v1alpha import reflection, reflection_pb2

    from intertie.v1 import site_pb2
    from intertie_gateway.service import register
    from intertie_gateway.throttle import quiet_grpc_noise

    async def main() -> list[tuple[grpc.StatusCode, str]]:
        server = grpc.aio.server()
        register(server, FailingSites(), site_pb2.DESCRIPTOR.services_by_name["SiteService"])
        register(server, health.aio.HealthServicer(), health_pb2.DESCRIPTOR.services_by_name["Health"],
                 own_streams=False)
        register(server, reflection.aio.ReflectionServicer(("grpc.health.v1.Health",)),
                 reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"], own_streams=False)
        quiet_grpc_noise()
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        answers = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                calls = [
                    (channel.unary_unary("/intertie.v1.SiteService/GetStatus"), lambda: b""),
                    (channel.unary_unary("/grpc.health.v1.Health/Check"), lambda: b"\xff\xff\xff"),
                    (channel.unary_stream("/grpc.health.v1.Health/Watch"), lambda: b"\x0a\xff"),
                    (channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
                     lambda: iter([b"\x3a\x03abc", b"\xff\xff"])),
                ]
                for call, request in calls:
                    for _ in range(20):
                        try:
                            result = call(request(), timeout=10)
                            if hasattr(result, "__aiter__"):
                                async for _ in result:
                                    pass
                            else:
                                await result
                            answers.append((grpc.StatusCode.OK, ""))
                        except grpc.aio.AioRpcError as exc:
                            answers.append((exc.code(), exc.details() or ""))
        finally:
            await server.stop(0)
        return answers

    with caplog.at_level(logging.WARNING):
        answers = asyncio.run(main())
    codes = [code for code, _ in answers]
    assert codes[:20] == [grpc.StatusCode.INTERNAL] * 20  # the servicer's bug
    assert codes[20:] == [grpc.StatusCode.INVALID_ARGUMENT] * 60  # garbage
    assert all(len(details) < 300 and "Traceback" not in details and "secret" not in details
               for _, details in answers)
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1  # the bug's, once per minute; the rest counted
