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


def test_addresses_are_checked_for_form() -> None:
    import pytest

    for good in ("localhost:7070", "10.0.0.1:1", "gw-1.example.org:65535", "[::1]:7070", "unix:/tmp/gw.sock",
                 " localhost:7070\n"):
        assert _rpc.check_address(good) == good.strip()
    for bad, says in (("", "empty"), ("localhost", "no port"), ("https://h:1", "prefix"), ("h:65536", "out of range"),
                      ("h:-1", "not a number"), ("h:1:2", "brackets"), ("[::1]", r"\[IPv6\]:port"), ("h :1", "host:port"),
                      ("h:1/x", "host:port"), (":7070", "not a host name")):
        with pytest.raises(intertie.InvalidRequestError, match=says):
            _rpc.check_address(bad)


def test_unreachable_causes_are_named() -> None:
    refused = FakeRpcError(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; last error: UNKNOWN: "
                           "ipv4:127.0.0.1:1: Failed to connect to remote host: Connection refused")
    assert _rpc.unreachable_cause(refused, "127.0.0.1:1").startswith("connection refused: nothing listens at 127.0.0.1:1")
    dns = FakeRpcError(grpc.StatusCode.UNAVAILABLE, "errors resolving nosuch:7070: [field:hostname lookup error:"
                       "address lookup failed for nosuch:7070: Domain name not found]")
    assert _rpc.unreachable_cause(dns, "nosuch:7070").startswith("unknown host 'nosuch'")
    assert _rpc.unreachable_cause(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "odd"), "h:1") == "odd"


def test_loopback_addresses_are_told_from_the_network() -> None:
    assert all(_rpc.is_loopback(a) for a in ("127.0.0.1:7070", "localhost:7070", "[::1]:7070", "unix:/tmp/s"))
    assert not any(_rpc.is_loopback(a) for a in ("10.0.0.5:7070", "gateway.example:7070", "0.0.0.0:7070"))
