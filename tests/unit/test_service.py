"""The Connect stream's edge: how a failure to accept a batch reaches the client."""

from __future__ import annotations

import asyncio
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


class BrokenScheduler:
    draining = False

    async def submit(self, request: tasks_pb2.SubmitRequest) -> list[tasks_pb2.TaskAck]:
        raise OSError("disk I/O error")


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
