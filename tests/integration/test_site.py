"""The site's public face: status, CLI, health, reflection, the embedded site, the example."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import intertie
from intertie import serialization
from intertie.v1 import tasks_pb2, tasks_pb2_grpc

REPO = Path(__file__).resolve().parents[2]


def double(x: int) -> int:
    return 2 * x


def test_sites_reports_status(fed: intertie.Federation, gateway) -> None:  # type: ignore[no-untyped-def]
    (site,) = fed.sites()
    assert site.site_id == "shared"
    assert site.compute_id == "urn:intertie:site:local:shared"
    assert site.address == gateway.address
    assert site.state == "up"
    assert site.arch == platform.machine().lower()
    assert site.python_version == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert site.resources_total["CPU"] == 2 and site.resources_total["bigmem"] == 1
    assert 0 <= site.resources_free["CPU"] <= 2
    assert site.labels == {"region": "test"}
    assert site.max_payload_bytes == 4 * 1024 * 1024
    assert site.queued >= 0 and site.running >= 0


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "intertie", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_cli_sites_and_task(fed: intertie.Federation, gateway) -> None:  # type: ignore[no-untyped-def]
    out = _cli("--address", gateway.address, "sites")
    assert out.returncode == 0, out.stderr
    header, rule, row = out.stdout.splitlines()[:3]
    assert header.split()[:3] == ["SITE", "STATE", "ADDRESS"]
    assert row.split()[:3] == ["shared", "up", gateway.address]
    assert "CPU=2" in row and "region=test" in row

    fut = fed.submit(double, 4)
    assert fut.result(timeout=60) == 8
    out = _cli("task", fut.task_id, env={"INTERTIE_ADDRESS": gateway.address})
    assert out.returncode == 0, out.stderr
    fields = dict(line.split(None, 1) for line in out.stdout.splitlines() if line.strip())
    assert fields["state"] == "SUCCEEDED"
    assert fields["site"] == "shared"
    assert fields["attempts"].startswith("1 ")
    assert fields["name"].endswith("double")


def test_cli_errors_are_readable(gateway) -> None:  # type: ignore[no-untyped-def]
    out = _cli("--address", gateway.address, "task", "nope")
    assert out.returncode == 1
    assert "TaskNotFoundError" in out.stderr and "Traceback" not in out.stderr
    out = _cli("sites", env={"INTERTIE_ADDRESS": ""})
    assert out.returncode == 2 and "INTERTIE_ADDRESS" in out.stderr


def test_health_and_reflection(gateway) -> None:  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(gateway.address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              timeout=10)
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"intertie.v1.TaskService", "intertie.v1.SiteService", "grpc.health.v1.Health"} <= names


def test_submit_and_watch_serve_a_client_without_the_bidirectional_stream(gateway) -> None:  # type: ignore[no-untyped-def]
    """The unary Submit and the server-streaming Watch: what a client in another language, or
    grpcurl, uses instead of the SDK's Connect stream."""
    fn = serialization.pickle_function(double)
    task_id, session = uuid.uuid4().hex, uuid.uuid4().hex
    spec = tasks_pb2.TaskSpec(task_id=task_id, function_digest=fn.digest, args=serialization.dumps_call((21,), {}),
                              python_version=f"{sys.version_info.major}.{sys.version_info.minor}", name=fn.name)
    with grpc.insecure_channel(gateway.address) as channel:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        events = stub.Watch(tasks_pb2.WatchRequest(session_id=session), timeout=60)
        assert list(next(events).events) == []  # watching from here on
        answer = stub.Submit(tasks_pb2.SubmitRequest(
            session_id=session, tasks=[spec],
            functions=[tasks_pb2.Function(digest=fn.digest, payload=fn.payload, name=fn.name)]), timeout=30)
        assert [a.accepted for a in answer.acks] == [True]
        finished = next(e for batch in events for e in batch.events if e.state != tasks_pb2.TASK_STATE_RUNNING)
        events.cancel()
    assert (finished.task_id, finished.state) == (task_id, tasks_pb2.TASK_STATE_SUCCEEDED)
    assert serialization.loads_result(finished.result) == 42


def test_quickstart_example_runs(gateway) -> None:  # type: ignore[no-untyped-def]
    out = subprocess.run([sys.executable, str(REPO / "examples" / "quickstart.py")], capture_output=True,
                         text=True, timeout=180, env={**os.environ, "INTERTIE_ADDRESS": gateway.address})
    assert out.returncode == 0, out.stderr
    assert "pi ~ 3.1" in out.stdout
    assert "remote error caught as ValueError" in out.stdout
    assert "timeout:" in out.stdout and "cancelled a running task: True" in out.stdout


def test_embedded_site_starts_and_stops_with_the_client() -> None:
    fed = intertie.connect(num_cpus=1)
    try:
        assert fed.submit(double, 21).result(timeout=60) == 42
        (site,) = fed.sites()
        assert site.site_id == "local" and site.resources_total["CPU"] == 1
        gateway = fed._on_close.__self__  # type: ignore[union-attr]
        process = gateway.process
        state_dir = gateway.state_dir
    finally:
        fed.close()
    assert process.poll() == 0  # stopped cleanly by close()
    assert not state_dir.exists()


def test_gateway_refuses_bad_configuration(tmp_path: Path) -> None:
    config = tmp_path / "site.toml"
    config.write_text('site_id = "ok"\nnum_cpus = "many"\n')
    out = subprocess.run([sys.executable, "-m", "intertie_gateway", "run", "--config", str(config)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "num_cpus" in out.stderr and "Traceback" not in out.stderr
