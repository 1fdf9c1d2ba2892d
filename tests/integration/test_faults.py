"""Faults on the wire: a client link and a peer link that are cut, frozen and healed.

Two real gateways (alpha, beta; 2 CPUs each, each with its own Ray) peer over loopback;
alpha reaches beta only through a :class:`~faults.FaultProxy` (``--peer`` points at it), and
each client test reaches alpha through its own proxy. Every task appends its key to a side
file when it completes (the workers run on this machine), so a task that ran twice shows.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from faults import DeliveryTap, FaultProxy, executions, wait_until

import intertie
from intertie.embedded import EmbeddedGateway, free_ports, stop_all

HEARTBEAT_S = 0.5
# grpc keepalive (runtime/intertie/_rpc.py): a ping after 10 s, unanswered for 10 s, closes
# the transport, so a frozen link is noticed within about 20 s (~10 s measured here while results
# flow: a ping already in flight when the link froze times out first); the rest is room for a
# loaded machine.
NOTICE_BOUND_S = 35.0


def work(key: int, path: str, seconds: float) -> int:
    time.sleep(seconds)
    with open(path, "a") as f:  # one short O_APPEND write per completed execution
        f.write(f"{key} {os.getpid()}\n")
    return key * key


@dataclass
class Sites:
    alpha: EmbeddedGateway
    beta: EmbeddedGateway
    link: FaultProxy  # alpha -> beta


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sites]:
    base = tmp_path_factory.mktemp("faults")
    alpha_port, beta_port = free_ports(2)
    # A plaintext federation (auth none): its links run through TCP proxies that cut and stall them.
    common = ["--heartbeat", str(HEARTBEAT_S), "--object-store-memory", str(128 << 20), "--auth", "none"]
    gateways: list[EmbeddedGateway] = []
    with FaultProxy(f"127.0.0.1:{beta_port}", name="alpha->beta") as link:
        try:
            gateways.append(EmbeddedGateway(
                num_cpus=2, site_id="alpha", state_dir=base / "alpha", listen=f"127.0.0.1:{alpha_port}",
                extra_args=[*common, "--peer", link.address], wait=False))
            gateways.append(EmbeddedGateway(
                num_cpus=2, site_id="beta", state_dir=base / "beta", listen=f"127.0.0.1:{beta_port}",
                extra_args=[*common, "--peer", f"127.0.0.1:{alpha_port}"], wait=False))
            for gateway in gateways:  # both start at once; Ray takes a while each
                gateway.wait_ready()
            yield Sites(gateways[0], gateways[1], link)
        finally:
            stop_all(gateways)


def all_up(fed: intertie.Federation) -> bool:
    return [s.state for s in fed.sites()] == ["up", "up"]


def wait_quiet(fed: intertie.Federation, hold_s: float = 3 * HEARTBEAT_S, timeout: float = 60.0) -> None:
    """Until no site has anything queued or running, for ``hold_s`` in a row (peers' figures
    are as of their last heartbeat): only then can the side file be counted."""
    quiet_since: list[float] = []

    def quiet() -> bool:
        if any(s.queued or s.running for s in fed.sites()):
            quiet_since.clear()
            return False
        if not quiet_since:
            quiet_since.append(time.monotonic())
        return time.monotonic() - quiet_since[0] >= hold_s

    wait_until(quiet, "the sites never became idle after the run", timeout=timeout, poll=0.2)


def completion_times(futures: list[intertie.TaskFuture]) -> dict[int, float]:
    """Index -> time.monotonic() when each future resolved (filled in as they do)."""
    times: dict[int, float] = {}
    for i, fut in enumerate(futures):
        fut.add_done_callback(lambda _f, i=i: times.setdefault(i, time.monotonic()))
    return times


def check_outcome(futures: list[intertie.TaskFuture], side: Path, n: int, what: str) -> None:
    failed = [(i, repr(fut.exception(0))) for i, fut in enumerate(futures) if fut.exception(0) is not None]
    assert not failed, f"{what}: {len(failed)} of {n} tasks failed, e.g. {failed[:3]}"
    assert [fut.result(0) for fut in futures] == [i * i for i in range(n)], f"{what}: wrong results"
    runs = executions(side)
    twice = {k: c for k, c in runs.items() if c > 1}
    moved = [(i, fut.site, fut.attempts) for i, fut in enumerate(futures) if fut.attempts > 1]
    assert not twice, (f"{what}: {len(twice)} tasks ran to completion more than once (key: runs): "
                       f"{dict(list(twice.items())[:10])}; tasks with attempts > 1: {moved[:10]}")
    assert set(runs) == {str(i) for i in range(n)}, f"{what}: tasks with no completed run in the side file"


def test_the_proxy_cuts_freezes_and_stops_cleanly(tmp_path: Path) -> None:
    """The proxy itself, against an echo server: what the tests above rely on."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def echo() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return

            def serve(c: socket.socket = conn) -> None:
                with c:
                    try:
                        while data := c.recv(1024):
                            c.sendall(data)
                    except OSError:
                        pass

            threading.Thread(target=serve, daemon=True).start()

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    try:
        with FaultProxy(server.getsockname()[:2], name="echo") as proxy:
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
                s.sendall(b"ping")
                assert s.recv(16) == b"ping"
                proxy.stall()
                s.sendall(b"held")
                wait_until(lambda: proxy.held == 1, "the proxy did not hold the bytes sent while frozen")
                s.settimeout(0.3)
                with pytest.raises(TimeoutError):
                    s.recv(16)  # nothing passes while frozen
                proxy.resume()
                s.settimeout(5)
                assert s.recv(16) == b"held"
                assert proxy.cut() == 1
                with pytest.raises(ConnectionResetError):  # a RST, not a clean FIN
                    s.recv(16)
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
                s.sendall(b"again")  # still accepting after a cut
                assert s.recv(16) == b"again"
            assert proxy.connections == 2 and proxy.cuts == 1
        assert not [t for t in threading.enumerate() if t.name == "fault-proxy-echo"], "close() left its thread"

    finally:
        stop.set()
        server.close()
        thread.join(5)


def test_client_link_cut_repeatedly_loses_nothing_and_runs_nothing_twice(
        sites: Sites, fault_proxy, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    n = 300
    proxy = fault_proxy(sites.alpha.address, name="client->alpha")
    side = tmp_path / "runs.txt"
    with intertie.connect(proxy.address) as fed:
        wait_until(lambda: all_up(fed), "beta never came up at alpha")
        tap = DeliveryTap(fed)
        f = intertie.remote(work)
        futures: list[intertie.TaskFuture] = []
        # Cut while batches are on their way: unacknowledged ones are resent after the reconnect.
        for start in range(0, n, 50):
            futures += [f.submit(i, str(side), 0.02) for i in range(start, start + 50)]
            proxy.cut()

        def done() -> int:
            return sum(fut.done() for fut in futures)

        # Cut again every 25 results while they stream back.
        while done() < n:
            target = min(n, done() + 25)
            wait_until(lambda target=target: done() >= target,  # type: ignore[misc]
                       f"results stopped at {done()} of {n} after {proxy.cuts} cuts ({proxy.stats()})")
            if done() < n:
                proxy.cut()
        check_outcome(futures, side, n, f"client link cut {proxy.cuts} times")
        wait_quiet(fed)
        check_outcome(futures, side, n, "after the sites went idle")
    # The faults really happened: live connections were cut, and the client came back each time.
    assert proxy.cuts >= 5, f"only {proxy.cuts} cuts hit a live connection ({proxy.stats()})"
    assert proxy.connections > proxy.cuts, f"the client did not reconnect after every cut ({proxy.stats()})"
    assert len(tap.counts) == n, f"terminal events arrived for {len(tap.counts)} of {n} tasks"


def test_a_frozen_client_link_is_noticed_and_results_still_arrive(
        sites: Sites, fault_proxy, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO, logger="intertie.client")
    n = 40
    proxy = fault_proxy(sites.alpha.address, name="client->alpha (frozen)")
    side = tmp_path / "runs.txt"
    with intertie.connect(proxy.address) as fed:
        wait_until(lambda: all_up(fed), "beta never came up at alpha")
        f = intertie.remote(work)
        futures = [f.submit(i, str(side), 0.25) for i in range(n)]
        finished_at = completion_times(futures)
        wait_until(lambda: len(finished_at) >= 4, "no result arrived before the freeze")
        # Freeze the link with results still to come: no byte, FIN or RST passes, the sockets
        # stay open. Only the client's own keepalive on its session stream (the grpc.aio channel
        # in Session._session_loop) can tell: the gateway's pings and its eventual close are
        # held by the proxy too. The client then reconnects, which is the new connection below;
        # new connections are not frozen (a new flow, as through a NAT whose old entry went stale).
        connections = proxy.connections
        frozen_at = time.monotonic()
        assert proxy.stall() >= 1, "no open connection to freeze"
        wait_until(lambda: proxy.connections > connections,
                   f"the client never noticed its frozen link: no reconnect within 90 s ({proxy.stats()})", timeout=90)
        reconnected_at = proxy.events_of("accept", since=frozen_at)[0].at
        noticed_s = reconnected_at - frozen_at
        broke = [r.getMessage() for r in caplog.records if "broke" in r.getMessage() or "reconnecting" in r.getMessage()]
        assert noticed_s < NOTICE_BOUND_S, (
            f"the client took {noticed_s:.1f} s to notice a frozen connection; keepalive_time_ms=10000 plus "
            f"grpc.http2.ping_timeout_ms=10000 should close it in about 20 s (bound {NOTICE_BOUND_S:.0f} s "
            f"for a loaded machine). Client log: {broke[-3:]}")
        proxy.resume()  # what the frozen link held is now passed on (to ends that gave up on it)
        wait_until(lambda: all(fut.done() for fut in futures),
                   f"results stopped at {sum(fut.done() for fut in futures)} of {n} after the reconnect", timeout=90)
        check_outcome(futures, side, n, f"link frozen, noticed after {noticed_s:.1f} s")
        wait_quiet(fed)
        check_outcome(futures, side, n, "after the sites went idle")
    before = sorted(t for t in finished_at.values() if t < reconnected_at)
    # Results were held back by the freeze and came on the new connection (resubscribed).
    assert len(before) < n, f"all {n} results arrived before the client reconnected: the freeze tested nothing"
    assert proxy.held_total > 0, "nothing tried to cross the frozen link"


def test_a_short_freeze_heals_without_a_reconnect(sites: Sites, fault_proxy, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    n = 30
    proxy = fault_proxy(sites.alpha.address, name="client->alpha (short freeze)")
    side = tmp_path / "runs.txt"
    with intertie.connect(proxy.address) as fed:
        f = intertie.remote(work)
        futures = [f.submit(i, str(side), 0.1) for i in range(n)]
        wait_until(lambda: any(fut.done() for fut in futures), "no result arrived before the freeze")
        connections = proxy.connections
        proxy.stall(new_connections=True)
        # Frozen until a result (or anything) has been held back, far inside the keepalive window.
        wait_until(lambda: proxy.held_total > 0, "nothing tried to cross the frozen link", timeout=30)
        proxy.resume()
        wait_until(lambda: all(fut.done() for fut in futures),
                   f"results stopped at {sum(fut.done() for fut in futures)} of {n} after the freeze ended")
        check_outcome(futures, side, n, "after a short freeze")
        wait_quiet(fed)
        check_outcome(futures, side, n, "after the sites went idle")
    assert proxy.connections == connections, (
        f"the client opened {proxy.connections - connections} new connections although the link froze "
        f"for far less than the keepalive window")


def test_cutting_the_peer_link_mid_run_loses_nothing_and_runs_nothing_twice(
        sites: Sites, tmp_path: Path) -> None:
    n = 400
    link = sites.link
    side = tmp_path / "runs.txt"
    with intertie.connect(sites.alpha.address) as fed:
        wait_until(lambda: all_up(fed), "beta never came up at alpha")
        f = intertie.remote(max_retries=3)(work)
        futures = [f.submit(i, str(side), 0.03) for i in range(n)]

        def at_beta() -> int:
            return sum(1 for fut in futures if fut.done() and fut.site == "beta")

        def all_done() -> bool:
            return all(fut.done() for fut in futures)

        wait_until(lambda: at_beta() >= 10, "no task ran at beta")
        connections = link.connections
        busy_at_cut: list[int] = []
        after_cut = 0
        seen: list[int] = []  # beta's queued + running, as alpha last heard of it, at each look

        def beta_busy() -> bool:
            beta = {s.site_id: s for s in fed.sites()}["beta"]
            seen.append(beta.queued + beta.running)
            return seen[-1] > 0

        for k in range(3):
            # Cut while beta has work (alpha hears of it with beta's heartbeats; on a loaded
            # machine a single look can fall between them).
            wait_until(lambda: beta_busy() or all_done(), "beta never had work while the run went on")
            busy_at_cut.append(seen[-1])
            if not link.cut():
                continue
            mark = at_beta()
            wait_until(lambda: at_beta() >= mark + 10 or all_done(),  # noqa: B023
                       f"after cut {k + 1} of the peer link nothing more finished at beta ({link.stats()})")
            after_cut += at_beta() - mark
        wait_until(all_done, f"results stopped at {sum(fut.done() for fut in futures)} of {n}", timeout=120)
        check_outcome(futures, side, n, f"peer link cut {link.cuts} times")
        wait_quiet(fed)
        check_outcome(futures, side, n, "after the sites went idle")
        where = collections.Counter(fut.site for fut in futures)
    assert link.cuts >= 3, f"only {link.cuts} cuts hit a live peer connection ({link.stats()})"
    assert link.connections > connections, "alpha never reconnected to beta"
    assert max(busy_at_cut) > 0, f"beta had no work queued or running at any cut: {busy_at_cut}"
    assert after_cut > 0, f"no task finished at beta after a cut ({where})"


def test_a_partition_shorter_than_the_keepalive_is_reconciled_when_it_heals(sites: Sites, tmp_path: Path) -> None:
    """The link to beta freezes (no FIN, no RST) long enough for alpha to mark beta down and
    move its queue, then heals before the keepalive would have broken the stream: alpha must
    still end that stream, so that the link reopened on the heal reconciles and beta drops,
    journaled, the queued tasks alpha moved, rather than run them too."""
    n = 120
    link = sites.link
    side = tmp_path / "runs.txt"
    with intertie.connect(sites.alpha.address) as fed:
        wait_until(lambda: all_up(fed), "beta never came up at alpha")
        f = intertie.remote(max_retries=3)(work)
        futures = [f.submit(i, str(side), 0.5) for i in range(n)]

        def queued_at_beta() -> int:
            return {s.site_id: s for s in fed.sites()}["beta"].queued

        wait_until(lambda: queued_at_beta() >= 10, "beta never had a queue to move")
        link.stall()
        try:
            wait_until(lambda: {s.site_id: s.state for s in fed.sites()}["beta"] == "down",
                       "alpha never marked the frozen beta down", timeout=30)
        finally:
            link.resume()
        moved_from_beta = [fut for fut in futures if fed.task(fut.task_id).history
                           and fed.task(fut.task_id).history[0].site == "beta"]
        assert moved_from_beta, "alpha moved nothing away from beta"
        wait_until(lambda: all(fut.done() for fut in futures), "results stopped", timeout=180)
        assert [fut.result(0) for fut in futures] == [i * i for i in range(n)]
        with intertie.connect(sites.beta.address) as at_beta:
            def state_at_beta(task_id: str) -> str:
                try:
                    return at_beta.task(task_id).state
                except intertie.TaskNotFoundError:
                    return "dropped"

            wait_until(lambda: all(state_at_beta(fut.task_id) != "QUEUED" for fut in moved_from_beta),
                       "beta kept tasks alpha had moved queued", timeout=60)
            dropped = [fut for fut in moved_from_beta if state_at_beta(fut.task_id) == "dropped"]
            assert dropped, "beta dropped nothing alpha had moved: the healed link never reconciled"
