"""A site's policy: whom it serves, each tenant's limits, reloading, and submission rates."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from intertie_gateway.fairshare import dominant_share
from intertie_gateway.policy import Policy, PolicyError, PolicyFile, SubmitRates


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_accept_patterns_and_limits_per_tenant() -> None:
    policy = Policy.parse({"accept": ["acme", "*@alpha"], "default": {"max_running": 8, "weight": 1},
                           "tenant": {"acme": {"max_running": 2, "weight": 3},
                                      "*@alpha": {"allowed_functions": ["ab" * 32]}}})
    assert policy.accepts("acme") and policy.accepts("globex@alpha")
    assert not policy.accepts("globex") and not policy.accepts("acme@beta")
    assert "does not accept tenant 'globex'" in (policy.why_refused("globex", "here") or "")
    assert policy.limits("acme").max_running == 2 and policy.limits("acme").weight == 3.0
    alpha = policy.limits("globex@alpha")
    assert alpha.max_running == 8 and alpha.allows("ab" * 32) and not alpha.allows("cd" * 32)
    assert policy.limits("someone").max_running == 8 and policy.limits("someone").allows("cd" * 32)
    capped = Policy.parse({"default": {"max_cpus": 4, "max_gpus": 1, "max_running": 3, "weight": 2}}).limits("x")
    assert capped.entitlement.max_resources == {"CPU": 4.0, "GPU": 1.0}
    assert (capped.entitlement.max_running, capped.entitlement.weight) == (3, 2.0)


@pytest.mark.parametrize("data,match", [
    ({"accpet": ["*"]}, "unknown policy key"),
    ({"accept": "acme"}, "accept: expected a list"),
    ({"default": {"max_running": -1}}, r"\[default\] max_running"),
    ({"default": {"weight": 0}}, r"weight: expected a number > 0"),
    ({"tenant": {"acme": {"max_runing": 1}}}, r"\[tenant.acme\]: unknown key"),
    ({"tenant": {"acme": {"allowed_functions": ["short"]}}}, "sha256"),
])
def test_a_wrong_policy_names_the_key(data: dict[str, object], match: str) -> None:
    with pytest.raises(PolicyError, match=match):
        Policy.parse(data)


def test_a_policy_file_is_reloaded_when_it_changes_and_a_broken_one_keeps_the_last_good(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('accept = ["acme"]\n')
    clock = Clock()
    source = PolicyFile(str(path), clock)
    assert source.current().accepts("acme") and not source.current().accepts("globex")
    path.write_text('accept = ["acme", "globex"]\n')
    os.utime(path, ns=(1, 2))  # a different mtime whatever the file system's resolution
    assert not source.current().accepts("globex")  # checked at most once a second
    clock.now += 1.0
    assert source.current().accepts("globex")
    path.write_text("accept = [\n")
    clock.now += 1.0
    assert source.current().accepts("globex")  # the last good policy stays
    with pytest.raises(PolicyError):
        PolicyFile(str(path), clock)  # but a broken one does not start a site


def test_submission_rates_are_token_buckets_per_tenant() -> None:
    clock = Clock()
    rates = SubmitRates(clock)
    assert [rates.take("acme", 2.0) for _ in range(3)] == [True, True, False]  # a burst of one second's worth
    assert rates.take("globex", 2.0)  # others have their own
    clock.now += 0.5
    assert rates.take("acme", 2.0) and not rates.take("acme", 2.0)
    assert all(rates.take("acme", 0.0) for _ in range(100))  # 0: no limit


def test_dominant_share_is_the_largest_fraction_held_over_the_weight() -> None:
    total = {"CPU": 8.0, "GPU": 2.0}
    assert dominant_share({"CPU": 2.0, "GPU": 1.0}, total, 1.0) == 0.5
    assert dominant_share({"CPU": 2.0}, total, 2.0) == 0.125
    assert dominant_share({"TPU": 1.0}, total, 1.0) == 0.0


def test_a_policy_file_that_is_not_text_is_a_policy_error(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_bytes(b"accept = [\"\xff\xfe\"]\n")
    with pytest.raises(PolicyError):
        PolicyFile(str(path), Clock())
