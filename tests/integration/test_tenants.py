"""Tenants of one site (token auth): each sees, follows, cancels and reuses only its own tasks;
another tenant's ids behave exactly like unknown ones."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from operator_cli import token_for

import intertie
from intertie._rpc import BearerToken
from intertie.embedded import EmbeddedGateway
from intertie.serialization import pickle_function
from intertie.spec import python_version
from intertie.v1 import tasks_pb2, tasks_pb2_grpc

# A task is RUNNING at its site within this long of being submitted to an idle site.
STARTS_S = 60.0


def sleeps(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def double(x: int) -> int:
    return 2 * x


def rows(table: object) -> int:
    return table.num_rows  # type: ignore[attr-defined,no-any-return]



@dataclass
class Site:
    address: str
    acme: str
    globex: str


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    state = tmp_path_factory.mktemp("tenants")
    tokens = token_for("acme", state), token_for("globex", state)
    gateway = EmbeddedGateway(num_cpus=2, site_id="tenants", state_dir=state,
                              extra_args=["--auth", "token", "--object-store-memory", str(100 << 20)])
    try:
        yield Site(gateway.address, *tokens)
    finally:
        gateway.stop()


def _unknown_message(fed: intertie.Federation, task_id: str) -> str:
    with pytest.raises(intertie.TaskNotFoundError) as err:
        fed.task(task_id)
    return str(err.value).replace(task_id, "ID")


def test_a_tenant_cannot_see_follow_cancel_or_take_over_another_tenants_task(site: Site) -> None:
    with intertie.connect(site.address, token=site.acme) as acme, \
            intertie.connect(site.address, token=site.globex) as globex:
        done = acme.submit(double, 21)
        assert done.result(timeout=60) == 42
        running = acme.submit(sleeps, 300)
        deadline = time.monotonic() + STARTS_S
        while not running.running():
            assert time.monotonic() < deadline, "the task never started"
            time.sleep(0.05)
        info = acme.task(running.task_id)
        assert info.tenant == "acme" and acme.task(done.task_id).tenant == "acme"
        unknown = _unknown_message(globex, "f" * 32)
        for task_id in (done.task_id, running.task_id):  # finished (journal) and live (book)
            assert _unknown_message(globex, task_id) == unknown
            assert globex.cancel([task_id]) == []
            with pytest.raises(intertie.TaskNotFoundError):
                globex.future(task_id).result(timeout=30)
        assert globex.cancel_all(tenant=True) == []
        assert acme.task(running.task_id).state == "RUNNING"
        # The same id from another tenant is that tenant's own task, as an unknown id would be: ids are per tenant.
        channel = grpc.intercept_channel(grpc.insecure_channel(site.address), BearerToken(site.globex))
        with channel:
            stub = tasks_pb2_grpc.TaskServiceStub(channel)
            digest = pickle_function(double).digest  # a function the site knows
            for task_id in (done.task_id, running.task_id, "f" * 32):
                ack = stub.Submit(tasks_pb2.SubmitRequest(session_id="globex-s", tasks=[tasks_pb2.TaskSpec(
                    task_id=task_id, function_digest=digest, python_version=python_version())]), timeout=30).acks[0]
                assert (ack.accepted, ack.task_id) == (True, task_id), ack
                assert globex.task(task_id).tenant == "globex"
            assert acme.task(done.task_id).state == "SUCCEEDED" and acme.task(done.task_id).tenant == "acme"
            forged = stub.Submit(tasks_pb2.SubmitRequest(session_id="globex-s", tasks=[tasks_pb2.TaskSpec(
                task_id="forged-tenant", function_digest="0" * 64, tenant="acme")]), timeout=30).acks[0]
            assert not forged.accepted and "tenant is set by the gateway" in forged.error.message
        assert acme.task(running.task_id).state == "RUNNING"
        # acme's other program (here: the CLI) cancels every unfinished task of acme's.
        out = subprocess.run([sys.executable, "-m", "intertie", "--address", site.address, "cancel", "--all-mine"],
                             capture_output=True, text=True, timeout=60,
                             env={**os.environ, "INTERTIE_TOKEN": site.acme, "INTERTIE_ADDRESS": ""})
        assert out.returncode == 0 and out.stdout == f"{running.task_id}  cancelled\n", out.stderr
        with pytest.raises(concurrent.futures.CancelledError):  # as for any task cancelled at its site
            running.result(timeout=30)


def test_a_tenant_that_floods_the_site_does_not_hold_up_another(site: Site) -> None:
    with intertie.connect(site.address, token=site.acme) as acme, \
            intertie.connect(site.address, token=site.globex) as globex:
        flood = [acme.submit(sleeps, 0.2) for _ in range(400)]  # 40 s of work on 2 CPUs (a wide margin)
        deadline = time.monotonic() + STARTS_S
        while not any(f.running() for f in flood):
            assert time.monotonic() < deadline, "the flood never started"
            time.sleep(0.05)
        assert globex.submit(double, 4).result(timeout=60) == 8
        unfinished = sum(not f.done() for f in flood)
        assert unfinished > 300, f"globex waited for acme's flood ({unfinished} of 400 left)"
        acme.cancel_all()


def test_a_tenant_sees_only_its_own_datasets_and_no_site_status_lists_anyone_elses(site: Site) -> None:
    import pyarrow as pa

    from intertie.v1 import site_pb2, site_pb2_grpc

    with intertie.connect(site.address, token=site.acme) as acme, \
            intertie.connect(site.address, token=site.globex) as globex:
        ref = acme.put_dataset(pa.table({"v": [1, 2, 3]}), name="acme-private")
        assert [r.name for r in acme.datasets()] == ["acme-private"]
        assert "acme-private" not in [r.name for r in globex.datasets()]
        with pytest.raises(intertie.DatasetNotFoundError):
            globex.get_dataset(ref.id)
        assert acme.submit(rows, ref).result(timeout=60) == 3
        with pytest.raises(intertie.DatasetNotFoundError, match=f"dataset {ref.id} is not at site 'tenants'"):
            globex.submit(rows, ref).result(timeout=60)  # a task reads only its tenant's datasets
        channel = grpc.intercept_channel(grpc.insecure_channel(site.address), BearerToken(site.globex))
        with channel:
            status = site_pb2_grpc.SiteServiceStub(channel).GetStatus(site_pb2.GetStatusRequest(), timeout=30)
        assert dict(status.dataset_owners) == {}  # the datasets a site holds are for its peers, not its tenants
