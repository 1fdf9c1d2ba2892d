"""A site's policy on a real gateway: whom it serves, a tenant's running cap (extra tasks wait),
its queue quota (per-task QuotaExceededError, the stream stays), its allowed functions, and a
change of the file taking effect without a restart."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from operator_cli import token_for

import intertie
from intertie.embedded import EmbeddedGateway
from intertie.serialization import pickle_function

# A task starts on an idle site, and a policy change is read, well within this.
WITHIN_S = 60.0


def double(x: int) -> int:
    return 2 * x


def triple(x: int) -> int:
    return 3 * x


def sleeps(seconds: float) -> float:
    time.sleep(seconds)
    return seconds



POLICY = """
accept = ["acme", "globex"]
[tenant.acme]
max_running = 1
max_queued = 3
max_dataset_bytes = 200000
[tenant.globex]
allowed_functions = ["{digest}"]
"""


@dataclass
class Site:
    address: str
    policy: Path
    tokens: dict[str, str]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    state = tmp_path_factory.mktemp("policy")
    tokens = {t: token_for(t, state) for t in ("acme", "globex", "initech")}
    policy = state / "policy.toml"
    policy.write_text(POLICY.format(digest=pickle_function(double).digest))
    gateway = EmbeddedGateway(num_cpus=2, site_id="ruled", state_dir=state,
                              extra_args=["--auth", "token", "--policy", str(policy),
                                          "--object-store-memory", str(100 << 20)])
    try:
        yield Site(gateway.address, policy, tokens)
    finally:
        gateway.stop()


def test_a_running_cap_queues_extra_tasks_and_a_queue_quota_refuses_the_one_over_it(site: Site) -> None:
    with intertie.connect(site.address, token=site.tokens["acme"]) as acme:
        held = [acme.submit(sleeps, 300) for _ in range(3)]
        deadline = time.monotonic() + WITHIN_S
        while not any(f.running() for f in held):
            assert time.monotonic() < deadline, "no task of acme started"
            time.sleep(0.05)
        states = sorted(acme.task(f.task_id).state for f in held)
        assert states == ["QUEUED", "QUEUED", "RUNNING"]  # two CPUs free, but acme may run one at a time
        over = acme.submit(double, 1)
        with pytest.raises(intertie.QuotaExceededError, match="3 unfinished tasks"):
            over.result(timeout=30)
        with intertie.connect(site.address, token=site.tokens["globex"]) as globex:
            assert globex.submit(double, 21).result(timeout=60) == 42  # others are not held up
        assert acme.submit(double, 2).exception(timeout=30) is not None  # the session goes on: refused again
        acme.cancel_all()


def test_a_tenants_dataset_quota_refuses_what_would_exceed_it(site: Site) -> None:
    import pyarrow as pa

    with intertie.connect(site.address, token=site.tokens["acme"]) as acme:
        small = acme.put_dataset(pa.table({"v": list(range(1000))}), name="small")
        with pytest.raises(intertie.QuotaExceededError, match="quota of tenant 'acme', 200000 bytes"):
            acme.put_dataset(pa.table({"v": list(range(100_000))}), name="big")
        assert [r.name for r in acme.datasets()] == ["small"] and small.num_rows == 1000


def test_tenants_and_functions_the_policy_does_not_allow_are_refused_and_a_change_applies_without_restart(
        site: Site) -> None:
    with intertie.connect(site.address, token=site.tokens["globex"]) as globex:
        with pytest.raises(intertie.PermissionDeniedError, match="allowed_functions"):
            globex.submit(triple, 1).result(timeout=30)
    with intertie.connect(site.address, token=site.tokens["initech"]) as initech:
        with pytest.raises(intertie.PermissionDeniedError, match="does not accept tenant 'initech'"):
            initech.submit(double, 1).result(timeout=30)
        import pyarrow as pa

        with pytest.raises(intertie.PermissionDeniedError, match="does not accept tenant 'initech'"):
            initech.put_dataset(pa.table({"v": [1]}), name="refused")  # its data plane applies the policy too
        site.policy.write_text('accept = ["*"]\n')
        os.utime(site.policy, ns=(1, 2))  # a new mtime whatever the file system's resolution
        deadline = time.monotonic() + WITHIN_S
        while True:  # the running gateway re-reads its policy (at most once a second)
            try:
                assert initech.submit(double, 4).result(timeout=30) == 8
                break
            except intertie.PermissionDeniedError:
                assert time.monotonic() < deadline, "the new policy never took effect"
                time.sleep(0.2)
