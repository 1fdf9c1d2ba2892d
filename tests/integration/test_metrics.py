"""A gateway's Prometheus metrics (--metrics-listen): scraped over HTTP from a real gateway after real
tasks, parsed as Prometheus parses them; off by default; a bad address refused at start."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from operator_cli import token_for
from prometheus_client.parser import text_string_to_metric_families

import intertie
from intertie.v1 import site_pb2, site_pb2_grpc

Samples = dict[str, list[tuple[dict[str, str], float]]]
# How long a stream the client closed may take to end at the gateway.
STREAM_END_S = 30.0
CONNECT = "intertie.v1.TaskService/Connect"
LIST_SITES = "intertie.v1.SiteService/ListSites"


def square(x: int) -> int:
    return x * x


def fails(x: int) -> int:
    raise ValueError(f"no {x}")


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        assert answer.headers["Content-Type"].startswith("text/plain")
        text = answer.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample of ``name`` with exactly ``labels`` (0 when there is none)."""
    found = [v for have, v in samples.get(name, []) if have == labels]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else 0.0


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` that have ``labels`` (and any others)."""
    return sum(v for have, v in samples.get(name, []) if labels.items() <= have.items())


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.05)


def test_a_scrape_counts_what_a_run_did(gateway_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    gateway = gateway_factory("--auth", "token", "--metrics-listen", "127.0.0.1:0", site_id="metered")
    token = token_for("acme", gateway.state_dir)
    gateway.start()
    port = int((gateway.state_dir / "metrics.port").read_text())

    with intertie.connect(gateway.address, token=token) as fed:
        squares = [fed.submit(square, i) for i in range(5)]
        failing = fed.submit(fails, 1)
        assert [f.result(timeout=120) for f in squares] == [i * i for i in range(5)]
        with pytest.raises(ValueError):
            failing.result(timeout=120)
        before = scrape(port)
        for _ in range(3):
            assert [s.site_id for s in fed.sites()] == ["metered"]
        after = scrape(port)
        with grpc.insecure_channel(gateway.address) as channel:  # no token: refused by the gatekeeper
            with pytest.raises(grpc.RpcError) as refused:
                site_pb2_grpc.SiteServiceStub(channel).GetStatus(site_pb2.GetStatusRequest(), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # (an abort sends the status before the interceptor around the handler has counted it)
        wait_for(lambda: value(scrape(port), "intertie_rpc_duration_seconds_count",
                               method="intertie.v1.SiteService/GetStatus", code="UNAUTHENTICATED") >= 1,
                 10, "the refused GetStatus to be counted")
        connected = scrape(port)

    # Finishes per tenant and state: exact (counted before the result is journaled, let alone sent).
    assert value(after, "intertie_tasks_finished_total", tenant="acme", state="succeeded") == 5
    assert value(after, "intertie_tasks_finished_total", tenant="acme", state="failed") == 1
    assert total(after, "intertie_tasks_finished_total") == 6
    # Every task asked for one CPU and ran here: CPU-seconds reserved, more than nothing, less than
    # six tasks held a CPU for the whole run.
    assert 0 < value(after, "intertie_tenant_cpu_seconds_total", tenant="acme") < 6 * 120
    # Nothing is left unfinished.
    assert total(after, "intertie_tasks") == 0
    assert value(after, "intertie_queue_length") == 0 and value(after, "intertie_running_tasks") == 0
    # The three ListSites between the two scrapes, and nothing else of that method.
    listed = [value(s, "intertie_rpc_duration_seconds_count", method=LIST_SITES, code="OK") for s in (before, after)]
    assert listed[1] - listed[0] == 3
    assert value(after, "intertie_rpc_duration_seconds_bucket", method=LIST_SITES, code="OK", le="+Inf") == listed[1]
    assert value(connected, "intertie_rpc_duration_seconds_count", method="intertie.v1.SiteService/GetStatus",
                 code="UNAUTHENTICATED") == 1
    # The client's one Connect stream is open while it is connected; timed, not histogrammed.
    assert value(after, "intertie_rpc_streams_open", method=CONNECT) == 1
    assert total(after, "intertie_rpc_duration_seconds_count", method=CONNECT) == 0
    # Group commits: at least one for the starts and one for the finishes; all within the buckets.
    commits = value(after, "intertie_journal_commit_seconds_count")
    assert commits >= 2 and value(after, "intertie_journal_commit_seconds_bucket", le="+Inf") == commits
    assert value(after, "intertie_journal_commit_seconds_sum") > 0
    assert value(after, "intertie_journal_commit_failures_total") == 0
    assert 0 <= value(after, "intertie_scrape_loop_wait_seconds") < 2.0

    # The client closed: its stream ended, counted once.
    def stream_ended() -> bool:
        return value(scrape(port), "intertie_rpc_streams_open", method=CONNECT) == 0

    wait_for(stream_ended, STREAM_END_S, "the client's Connect stream to end at the gateway")
    assert total(scrape(port), "intertie_rpc_streams_total", method=CONNECT) == 1

    # Stopped: the endpoint and its port file go with the gateway.
    assert gateway.stop() == 0
    assert not (gateway.state_dir / "metrics.port").exists()
    with pytest.raises(urllib.error.URLError):
        scrape(port)


def test_metrics_are_off_by_default(gateway) -> None:  # type: ignore[no-untyped-def]
    assert (gateway.state_dir / "address").exists()
    assert not (gateway.state_dir / "metrics.port").exists()


@pytest.mark.parametrize("bad", ["9100", "localhost:http"])
def test_a_bad_metrics_address_is_one_line_at_start(tmp_path: Path, bad: str) -> None:
    done = subprocess.run([sys.executable, "-m", "intertie_gateway", "run", "--listen", "127.0.0.1:0",
                           "--state-dir", str(tmp_path), "--metrics-listen", bad], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert lines == [f"intertie-gateway: configuration error: metrics_listen (--metrics-listen): expected "
                     f"HOST:PORT, got {bad!r}"], done.stderr
    assert not (tmp_path / "address").exists() and not (tmp_path / "metrics.port").exists()
