"""Fail fast, say why: wrong addresses, unreachable and dead homes, closed connections and
oversize payloads are errors at once (or within a bound the user sets), naming the cause."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

import pytest

import intertie
from intertie import _session

BOUND_S = 60.0


def square(x: int) -> int:
    return x * x


def hold(path: str) -> None:
    while not os.path.exists(path):
        time.sleep(0.01)


def wait_for(condition: Callable[[], object], what: str, timeout: float = BOUND_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(("address", "says"), [
    ("localhost", "no port"),
    ("http://localhost:7070", 'drop the "http://" prefix'),
    ("grpc://10.0.0.1:7070", 'drop the "grpc://" prefix'),
    ("localhost:99999", "out of range"),
    ("localhost:0", "out of range"),
    ("localhost:http", "not a number"),
    ("::1", "needs brackets"),
    ("", "empty gateway address"),
    ("   ", "empty gateway address"),
])
def test_a_malformed_address_is_refused_at_once(address: str, says: str) -> None:
    started = time.monotonic()
    with pytest.raises(intertie.InvalidRequestError) as info:
        intertie.connect(address)
    assert time.monotonic() - started < 1
    assert says in str(info.value)
    assert isinstance(info.value, ValueError)


def test_an_empty_INTERTIE_ADDRESS_is_an_error_not_the_embedded_site(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTERTIE_ADDRESS", "")
    started = time.monotonic()
    with pytest.raises(intertie.InvalidRequestError, match="INTERTIE_ADDRESS is set but empty"):
        intertie.connect()
    assert time.monotonic() - started < 1  # no embedded site was started


def test_a_refused_connection_fails_within_seconds_naming_the_cause() -> None:
    port = closed_port()
    started = time.monotonic()
    with pytest.raises(intertie.SiteUnavailableError) as info:
        intertie.connect(f"127.0.0.1:{port}")
    assert time.monotonic() - started < 5
    assert "connection refused" in str(info.value) and f"127.0.0.1:{port}" in str(info.value)


def test_an_unknown_host_fails_within_seconds_naming_the_cause() -> None:
    started = time.monotonic()
    with pytest.raises(intertie.SiteUnavailableError, match="unknown host 'no-such-host.invalid'"):
        intertie.connect("no-such-host.invalid:7070")
    assert time.monotonic() - started < 10  # one DNS lookup; no retries


def test_calls_on_a_closed_connection_say_it_is_closed(gateway) -> None:  # type: ignore[no-untyped-def]
    fed = intertie.connect(gateway.address)
    fed.close()
    for call in (fed.sites, lambda: fed.task("x" * 32), lambda: fed.submit(square, 2), fed.cancel_all,
                 lambda: fed.future("x" * 32)):
        with pytest.raises(intertie.IntertieError, match="is closed"):
            call()


def test_a_payload_over_the_limit_is_refused_at_submit(fed: intertie.Federation) -> None:
    assert fed.max_payload_bytes == 4 << 20  # learnt from the site at connect
    started = time.monotonic()
    with pytest.raises(intertie.PayloadTooLargeError, match=r"5.0 MiB pickled, over the gateway's limit of 4.0 MiB"):
        fed.submit(len, b"x" * (5 << 20))
    with pytest.raises(intertie.PayloadTooLargeError, match="over the gateway's limit"):
        intertie.remote(cpus=1)(len).submit(b"x" * (5 << 20))
    with fed.executor() as ex, pytest.raises(intertie.PayloadTooLargeError):
        ex.map(len, [b"x" * (3 << 20), b"y" * (3 << 20)], chunksize=2)  # one chunk of 6 MiB
    assert time.monotonic() - started < 5
    assert fed.submit(square, 3).result(timeout=BOUND_S) == 9


def test_a_dead_home_fails_waiting_futures_within_the_bound_and_refuses_submits_until_back(
        gateway_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    site = gateway_factory(num_cpus=1, site_id="mortal").start()
    port = site.address.rpartition(":")[2]
    fed = intertie.connect(site.address, unavailable_timeout=3)
    try:
        assert fed.unavailable_timeout == 3
        held = intertie.remote(cpus=0.5)(hold).submit(str(tmp_path / "never"))
        wait_for(held.running, "the task to run")
        site.kill()  # SIGKILL: the gateway and its Ray; it stays down
        killed = time.monotonic()
        with pytest.raises(intertie.SiteUnavailableError) as info:
            held.result(timeout=BOUND_S)
        assert 3 <= time.monotonic() - killed < 15
        assert "unreachable for" in str(info.value) and "connection refused" in str(info.value)
        # Known down: a new submit fails at once, saying why.
        started = time.monotonic()
        with pytest.raises(intertie.SiteUnavailableError, match="refused until it is back"):
            fed.submit(square, 2)
        assert time.monotonic() - started < 0.5

        site.args[site.args.index("--listen") + 1] = f"127.0.0.1:{port}"
        site.start()

        def accepts() -> bool:
            try:
                fed.submit(square, 0)
            except intertie.SiteUnavailableError:
                return False
            return True

        wait_for(accepts, "the client to see the gateway back")
        assert fed.submit(square, 7).result(timeout=BOUND_S) == 49
    finally:
        fed.close()


def test_unavailable_timeout_defaults_to_30_s_and_must_be_positive(fed: intertie.Federation, gateway) -> None:  # type: ignore[no-untyped-def]
    assert fed.unavailable_timeout == _session.RECONNECT_TIMEOUT_S == 30.0
    with pytest.raises(intertie.InvalidRequestError):
        intertie.connect(gateway.address, unavailable_timeout=0)
