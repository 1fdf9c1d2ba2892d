"""The pure parts of the gateway's door: who a bearer entry names, and the per-source limit
on failed authentications."""

from __future__ import annotations

from intertie_gateway.auth import FailureLimit, bearer, source_of


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_source_is_refused_after_too_many_failures_until_its_window_ends() -> None:
    clock = Clock()
    limit = FailureLimit(max_failures=3, window_s=60.0, clock=clock)
    for _ in range(2):
        limit.failed("ipv4:10.0.0.1")
    assert limit.blocked_for("ipv4:10.0.0.1") == 0.0
    limit.failed("ipv4:10.0.0.1")
    assert limit.blocked_for("ipv4:10.0.0.1") == 60.0
    assert limit.blocked_for("ipv4:10.0.0.2") == 0.0  # others are not punished
    clock.now += 59.0
    assert limit.blocked_for("ipv4:10.0.0.1") == 1.0
    clock.now += 1.0
    assert limit.blocked_for("ipv4:10.0.0.1") == 0.0  # a new window
    limit.failed("ipv4:10.0.0.1")
    assert limit.blocked_for("ipv4:10.0.0.1") == 0.0


def test_the_memory_of_sources_is_bounded() -> None:
    limit = FailureLimit(max_failures=1, window_s=60.0, clock=Clock(), max_sources=100)
    for i in range(1000):
        limit.failed(f"ipv4:10.0.{i // 256}.{i % 256}")
    assert len(limit._windows) == 100
    assert limit.blocked_for("ipv4:10.0.3.231") > 0  # the newest are remembered


def test_bearer_entries_and_sources() -> None:
    assert bearer([("authorization", "Bearer itk_x")]) == "itk_x"
    assert bearer([("authorization", "Basic abc")]) == ""
    assert bearer([("other", "x")]) is None
    assert len(bearer([("authorization", "Bearer " + "a" * 100_000)]) or "") < 300
    assert source_of("ipv4:127.0.0.1:5555") == "ipv4:127.0.0.1"
    assert source_of("ipv6:[::1]:5555") == "ipv6:[::1]"
