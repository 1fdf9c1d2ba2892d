"""Assembles and runs one site gateway: journal, Ray, scheduler, gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from intertie._rpc import is_loopback, server_options
from intertie.v1 import ledger_pb2, peer_pb2, site_pb2, tasks_pb2
from intertie_gateway.auth import Gatekeeper, revoked
from intertie_gateway.config import GatewayConfig
from intertie_gateway.dataplane import DataPlane
from intertie_gateway.journal import Journal
from intertie_gateway.ledger import INTEGRATE_BATCH, LedgerSettings
from intertie_gateway.ledger_service import LedgerService
from intertie_gateway.membership import Membership
from intertie_gateway.metrics import Metrics
from intertie_gateway.runner import RayRunner
from intertie_gateway.scheduler import Scheduler
from intertie_gateway.service import PeerService, SiteService, TaskService, register
from intertie_gateway.sessions import SessionHub
from intertie_gateway.throttle import quiet_grpc_noise
from intertie_gateway.tokens import TokenStore
from intertie_gateway.transport import Transport

logger = logging.getLogger(__name__)

# Finished tasks past their TTL are deleted this often.
EXPIRE_INTERVAL_S = 300.0
# Ray's view of capacity is re-read this often (nodes of an attached cluster come and go).
RESOURCE_REFRESH_S = 10.0
PARENT_CHECK_S = 1.0
# How often the usage ledger is asked whether a checkpoint is due (its ledger_checkpoint_s has
# passed with entries unsigned): a comparison unless one is, so a quiet site's last entries
# are signed within a second of being due.
LEDGER_TICK_S = 1.0
# Recorded usage is appended to the ledger's log (``Ledger.integrate``, a few ms a batch, on
# the loop) when the site has no unfinished task, or once it has waited this long: a burst of
# tasks is not slowed by its own bookkeeping, and a busy site's entries are in the log within
# a few seconds all the same.
LEDGER_MAX_DEFER_S = 2.0
# A clean stop lets in-flight RPCs finish for this long.
STOP_GRACE_S = 3.0


async def serve(config: GatewayConfig, ready: asyncio.Event | None = None, parent_pid: int | None = None) -> None:
    # Ray first: attaching to a cluster is what fails most often (ray_attach.RayConnectError says
    # why), and then nothing else has been started or touched.
    runner = RayRunner(config)
    state = config.state_path
    state.mkdir(parents=True, exist_ok=True)
    (state / "address").unlink(missing_ok=True)
    (state / "metrics.port").unlink(missing_ok=True)
    journal = Journal(state / "journal.sqlite", fsync=config.fsync, checkpoints_apart=True,
                      ledger=LedgerSettings(config.site_id, state / "ledger.key", every=config.ledger_checkpoint_entries,
                                            every_s=config.ledger_checkpoint_s,
                                            integrate_every_s=config.ledger_integrate_s) if config.ledger else None)
    if not config.ledger:
        logger.warning("--no-ledger: this site keeps no usage records (nothing to verify or settle)")
    hub = SessionHub()

    transport = Transport.from_config(config)
    tokens = None
    if config.auth == "token":
        tokens = TokenStore(state / "tokens.json")
        logger.info("auth: token (tokens in %s)", state / "tokens.json")
    else:
        logger.warning("auth: none: anyone who reaches %s may run code at this site (--auth token to require "
                       "tokens)", config.listen)
    # Metrics (off by default): the outermost interceptor, so the gatekeeper's refusals are counted too.
    metrics = Metrics(asyncio.get_running_loop()) if config.metrics_listen else None
    interceptors = [metrics.interceptor()] if metrics is not None else []
    server = grpc.aio.server(options=server_options(config.max_payload_bytes),
                             interceptors=[*interceptors, Gatekeeper(tokens)])
    port = transport.serve_tenants(server, config.listen)
    if port == 0:
        raise OSError(f"cannot listen on {config.listen}")
    if config.peer_listen and transport.serve_peers(server, config.peer_listen) == 0:
        raise OSError(f"cannot listen on {config.peer_listen} (peer_listen)")
    if metrics is not None:
        metrics_port = metrics.serve(config.metrics_listen)
        logger.log(logging.INFO if is_loopback(config.metrics_listen) else logging.WARNING,
                   "metrics: Prometheus at http://%s:%d/metrics (plain HTTP, no auth: anyone who reaches it sees "
                   "tenants' names and activity)", config.metrics_listen.rpartition(":")[0], metrics_port)
    if tokens is not None and not transport.tls and not is_loopback(config.listen):
        logger.warning("auth: token over plaintext at %s: tokens cross the network in the clear; serve TLS "
                       "(--tls-cert, --tls-key)", config.listen)
    logger.info("transport: %s", "TLS, peers by mutual TLS at " + config.peer_listen if transport.mutual and
                config.peer_listen else "TLS" if transport.tls else "plaintext (--tls-cert/--tls-key for TLS)")
    host = config.listen.rpartition(":")[0]
    address = f"{host}:{port}"
    cores: list[Scheduler] = []  # the core, once built

    def peer_endpoints() -> list[str]:
        """The up peers' dataset endpoints (told when an original is deleted). The data plane
        first asks at its start, before the core exists, when no peer is up yet."""
        return cores[0].transfers.peer_flight_addresses() if cores else []

    # Datasets are stored and served by a process of its own (Arrow decoding of network
    # data can crash; see dataplane.py), restarted on the same port when it dies.
    flight_host, _, flight_port = (config.flight_listen or f"{host}:0").rpartition(":")
    store = DataPlane(state, config.data_url or str(state / "datasets"), config.site_id, host=flight_host,
                      port=int(flight_port), quota_bytes=config.dataset_quota_bytes,
                      replica_cache_bytes=config.replica_cache_bytes, max_rate=config.flight_max_rate,
                      peers=peer_endpoints, transport=transport, tokens=tokens.path if tokens is not None else None,
                      policy_file=config.policy_file)
    runner.keep_results_at(store.worker_endpoint, config.result_dataset_bytes)
    # The membership of the peers is built by the core around its own listener (each calls
    # the other through the ports protocols: neither imports the other).
    make_federation = functools.partial(
        Membership, addresses=config.peers, heartbeat_s=config.heartbeat_s, down_after=config.down_after,
        steal=config.steal, bandwidth=config.bandwidth, channel=transport.peer_channel) if config.peers else None
    scheduler = Scheduler(config, journal, runner, hub, address=address, store=store,
                          make_federation=make_federation, metrics=metrics)
    cores.append(scheduler)

    register(server, TaskService(scheduler, hub, revoked=functools.partial(revoked, tokens)),
             tasks_pb2.DESCRIPTOR.services_by_name["TaskService"])
    register(server, SiteService(scheduler), site_pb2.DESCRIPTOR.services_by_name["SiteService"])
    register(server, PeerService(scheduler), peer_pb2.DESCRIPTOR.services_by_name["PeerService"])
    # The usage ledger, on both endpoints (one server): tenants see their entries, peers those
    # of the tasks they forwarded here (ledger_service.visibility).
    services = [tasks_pb2.DESCRIPTOR.services_by_name["TaskService"],
                site_pb2.DESCRIPTOR.services_by_name["SiteService"], peer_pb2.DESCRIPTOR.services_by_name["PeerService"]]
    if config.ledger:
        register(server, LedgerService(journal.ledger, isolated=config.auth == "token"),
                 ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"])
        services.append(ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"])
        if metrics is not None:
            metrics.ledger(lambda: journal.ledger.size, lambda: _checkpoint_time(journal))
    # The stock health and reflection services, behind the same lenient parsing as ours.
    health_servicer = health.aio.HealthServicer()
    register(server, health_servicer, health_pb2.DESCRIPTOR.services_by_name["Health"], own_streams=False)
    register(server, reflection.aio.ReflectionServicer((
        *(service.full_name for service in services), health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME)), reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"], own_streams=False)
    quiet_grpc_noise()

    requeued, failed = scheduler.recover()
    if requeued or failed:
        logger.info("recovered from journal: %d tasks requeued, %d failed (no retries left)", requeued, failed)
    await server.start()
    scheduler.federation.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    if metrics is not None:  # (written when ready, as the address: a failed start leaves neither)
        _write_whole(state / "metrics.port", f"{metrics_port}\n")
    _write_whole(state / "address", address + "\n")
    print(f"intertie-gateway listening on {address}", flush=True)
    logger.info("site %s (%s) serving at %s", config.site_id, config.compute_id, address)
    if ready is not None:
        ready.set()

    async def housekeeping() -> None:
        since_expire = 0.0
        while True:
            await asyncio.sleep(RESOURCE_REFRESH_S)
            try:
                scheduler.refresh_resources()
                since_expire += RESOURCE_REFRESH_S
                if since_expire >= EXPIRE_INTERVAL_S:
                    since_expire = 0.0
                    expired = scheduler.expire_results()
                    if expired:
                        logger.info("expired %d finished tasks past their TTL", expired)
            except Exception:
                logger.exception("housekeeping failed")

    async def ledger_checkpoints() -> None:
        tick = min(LEDGER_TICK_S, config.ledger_integrate_s or LEDGER_TICK_S)
        last_checked = time.monotonic()
        deferred_since: float | None = None  # since when recorded usage waits for a quiet moment
        while True:
            await asyncio.sleep(tick)
            try:
                if config.ledger_integrate_s:
                    now = time.monotonic()
                    if not scheduler.book.tasks or (deferred_since is not None
                                                    and now - deferred_since >= LEDGER_MAX_DEFER_S):
                        if journal.ledger.integrate() < INTEGRATE_BATCH:  # (the whole backlog)
                            deferred_since = None
                    elif deferred_since is None and journal.ledger.pending():
                        deferred_since = now
                if time.monotonic() - last_checked >= LEDGER_TICK_S:
                    last_checked = time.monotonic()
                    journal.ledger.checkpoint_if_due()
            except Exception:  # (the disk): the next tick tries again
                logger.exception("usage ledger checkpoint failed")

    async def watch_parent(pid: int) -> None:
        # An embedded gateway stops with the program that started it, however that ends.
        while _alive(pid):
            await asyncio.sleep(PARENT_CHECK_S)
        logger.info("parent process %d is gone", pid)
        stop.set()

    keeper = asyncio.create_task(housekeeping())
    signer = asyncio.create_task(ledger_checkpoints()) if config.ledger else None
    watcher = asyncio.create_task(watch_parent(parent_pid)) if parent_pid else None
    try:
        await stop.wait()
        logger.info("stopping: draining site %s", config.site_id)
        await health_servicer.enter_graceful_shutdown()
        scheduler.drain()
        store.close()  # after drain: tasks waiting for data stay queued rather than fail
        await scheduler.federation.close()
        await server.stop(STOP_GRACE_S)
    finally:
        for job in (keeper, signer, watcher):
            if job is not None:
                job.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await job
        (state / "address").unlink(missing_ok=True)
        if metrics is not None:
            metrics.close()
            (state / "metrics.port").unlink(missing_ok=True)
        store.shutdown()
        runner.shutdown()
        try:  # after the drain's last commit: the stop's checkpoint covers every entry
            if config.ledger:
                journal.ledger.checkpoint_now()
        except Exception:
            logger.exception("usage ledger checkpoint at stop failed (the next start makes it)")
        journal.close()
        logger.info("site %s stopped", config.site_id)


def _checkpoint_time(journal: Journal) -> float | None:
    latest = journal.ledger.latest_checkpoint()
    return None if latest is None else latest.time


def _write_whole(path: Path, text: str) -> None:
    """Writes through a temporary file and a rename: readers never see half an address."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _alive(pid: int) -> bool:
    if os.getppid() != pid:  # re-parented: the parent exited
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
