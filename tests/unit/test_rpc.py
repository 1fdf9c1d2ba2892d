from __future__ import annotations

import grpc

import intertie
from intertie import _rpc


class FakeRpcError(grpc.RpcError):
    """Pure logic under test: mapping status codes; no transport involved."""

    def __init__(self, code: grpc.StatusCode, details: str = "d", kind: str = "") -> None:
        self._code, self._details, self._kind = code, details, kind

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((_rpc.ERROR_KIND_KEY, self._kind),) if self._kind else ()


def test_status_codes_map_to_the_hierarchy() -> None:
    assert isinstance(_rpc.translate(FakeRpcError(grpc.StatusCode.UNAVAILABLE), "h:1"), intertie.SiteUnavailableError)
    assert "h:1" in str(_rpc.translate(FakeRpcError(grpc.StatusCode.UNAVAILABLE), "h:1"))
    assert isinstance(_rpc.translate(FakeRpcError(grpc.StatusCode.NOT_FOUND)), intertie.TaskNotFoundError)
    assert isinstance(_rpc.translate(FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED)), intertie.PayloadTooLargeError)
    assert type(_rpc.translate(FakeRpcError(grpc.StatusCode.INTERNAL))) is intertie.IntertieError


def test_error_kind_metadata_wins_over_status_code() -> None:
    err = _rpc.translate(FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, kind="ERROR_KIND_SERIALIZATION"))
    assert isinstance(err, intertie.SerializationError)


def test_retry_policy() -> None:
    assert _rpc.is_retryable(FakeRpcError(grpc.StatusCode.UNAVAILABLE))
    assert not _rpc.is_retryable(FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT))
    assert not _rpc.is_retryable(FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED))
