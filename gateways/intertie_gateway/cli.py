"""``intertie-gateway``: run a site gateway; its tokens, certificates and usage ledger."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time

from intertie.cli import ShortErrorParser, byte_size
from intertie_gateway.config import (
    ConfigError,
    GatewayConfig,
    load_toml,
    parse_bandwidth,
    parse_labels,
    parse_resources,
)


def _version() -> str:
    """Intertie's, Python's and Ray's versions (Ray's from its metadata: importing it takes ~1 s)."""
    from importlib import metadata

    from intertie import __version__

    try:
        ray = metadata.version("ray")
    except metadata.PackageNotFoundError:
        ray = "not installed"
    return f"intertie-gateway {__version__} (Python {sys.version.split()[0]}, Ray {ray})"


def _parser() -> argparse.ArgumentParser:
    parser = ShortErrorParser(prog="intertie-gateway", description="Run an Intertie site gateway.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ShortErrorParser)
    run = sub.add_parser("run", help="run one site gateway in front of a Ray cluster")
    local = sub.add_parser("local", help="run N peered sites on loopback, each with its own embedded Ray")
    certs = sub.add_parser("certs", help="a local certificate authority and site certificates (tests, demos)")
    csub = certs.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=ShortErrorParser)
    create = csub.add_parser("create", help="make the CA (unless DIR has one) and a certificate per --site")
    create.add_argument("--dir", required=True, metavar="DIR", help="where ca.pem, ca.key, SITE.pem, SITE.key go")
    create.add_argument("--site", action="append", default=[], metavar="SITE_ID", help="a site (repeatable)")
    create.add_argument("--host", action="append", default=[], metavar="NAME|IP",
                        help="an address the sites serve on (repeatable; default localhost and 127.0.0.1)")
    token = sub.add_parser("token", help="tenants' bearer tokens of a site: create, list, revoke")
    tsub = token.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=ShortErrorParser)
    for action, what in (("create", "make a token for a tenant; it is printed once, as the last line"),
                         ("list", "the site's tokens (ids and tenants; never the secrets)"),
                         ("revoke", "revoke a token (a running gateway stops taking it within seconds)")):
        p = tsub.add_parser(action, help=what)
        p.add_argument("--state-dir", metavar="DIR", default="intertie-state",
                       help="the gateway's state dir (default ./intertie-state)")
        if action == "create":
            p.add_argument("--tenant", required=True, metavar="NAME")
        elif action == "revoke":
            p.add_argument("token_id", metavar="ID", help="the token's id (from list), or the token itself")
    ledger = sub.add_parser("ledger", help="the site's usage ledger: verify it; replace a lost signing key")
    lsub = ledger.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=ShortErrorParser)
    verify = lsub.add_parser("verify", help="check the ledger of a state dir: its entries, tree and signed "
                                            "checkpoints (read-only; the gateway may be running)")
    verify.add_argument("--public-key", action="append", default=[], metavar="PEM",
                        help="check the checkpoints' signatures with this public key (repeatable; default: the "
                             "state dir's ledger.key, and keys it replaced)")
    new_key = lsub.add_parser("new-key", help="a new signing key for a site whose ledger.key is lost (gateway "
                                              "stopped; see the README)")
    for p in (verify, new_key):
        p.add_argument("--state-dir", metavar="DIR", default="intertie-state",
                       help="the gateway's state dir (default ./intertie-state)")
    local.add_argument("--sites", type=int, default=3, metavar="N")
    local.add_argument("--state-dir", metavar="DIR", help="parent of the sites' state dirs (default: a temp dir)")
    local.add_argument("--heartbeat", type=float, default=0.5, metavar="SECONDS")
    run.add_argument("--config", metavar="FILE", help="TOML config file; flags override it")
    run.add_argument("--listen", metavar="HOST:PORT", help="address to serve on; port 0 picks a free one")
    run.add_argument("--state-dir", metavar="DIR", help="journal and address file (default ./intertie-state)")
    run.add_argument("--site-id", metavar="NAME")
    run.add_argument("--region", metavar="NAME")
    run.add_argument("--ray", metavar="local|HOST:PORT",
                     help="'local' (an embedded Ray, the default) or the head of a running cluster (the --port of "
                          "`ray start --head`, 6379 by default); the gateway must run on one of its nodes")
    run.add_argument("--ray-token-file", metavar="FILE",
                     help="the cluster's token, for a cluster with Ray's token auth (a copy of the head's "
                          "~/.ray/auth_token; default: where Ray looks, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)")
    run.add_argument("--ray-connect-timeout", type=float, metavar="SECONDS",
                     help="how long attaching to the cluster may take (default 15)")
    run.add_argument("--num-cpus", type=int, metavar="N", help="CPUs of the embedded Ray (not with --ray HOST:PORT)")
    run.add_argument("--num-gpus", type=int, metavar="N", help="GPUs of the embedded Ray (not with --ray HOST:PORT)")
    run.add_argument("--resources", metavar="JSON",
                     help='custom resources of the embedded Ray, e.g. \'{"bigmem": 2}\' (not with --ray HOST:PORT)')
    run.add_argument("--object-store-memory", type=byte_size, metavar="BYTES",
                     help="object store of the embedded Ray (default 256MiB; not with --ray HOST:PORT)")
    run.add_argument("--max-payload-bytes", type=byte_size, metavar="BYTES")
    run.add_argument("--label", action="append", metavar="KEY=VALUE", help="operator label (repeatable)")
    run.add_argument("--fsync", action="store_true", default=None, help="fsync every journal commit")
    run.add_argument("--no-ledger", dest="ledger", action="store_false", default=None,
                     help="keep no usage ledger (nothing to verify or settle; for measuring its cost)")
    run.add_argument("--auth", choices=("none", "token"),
                     help="'token' (the default): callers need a tenant's token (intertie-gateway token create); "
                          "'none': anyone who reaches the port may run code here (a trusted network only)")
    run.add_argument("--bootstrap-token", metavar="FILE",
                     help="at start, write a token of tenant 'local' to FILE (0600) for the program that starts "
                          "the gateway (intertie.connect(), intertie-gateway local); kept across restarts")
    run.add_argument("--tls-cert", metavar="PEM", help="this site's certificate: serve gRPC and Flight over TLS")
    run.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    run.add_argument("--tls-ca", metavar="PEM",
                     help="the federation CA: peers must show a certificate it signed (mutual TLS)")
    run.add_argument("--peer-listen", metavar="HOST:PORT",
                     help="where peers connect, with mutual TLS (needs --tls-ca; --peer gives peers' such addresses)")
    run.add_argument("--policy", metavar="TOML",
                     help="which tenants this site serves and their limits (re-read while running; see the README)")
    run.add_argument("--no-worker-pool", dest="worker_pool", action="store_false", default=None,
                     help="run every task as a plain Ray task (for clusters shared with other drivers)")
    run.add_argument("--data-url", metavar="URL", help="where datasets are stored (fsspec URL; default <state-dir>/datasets)")
    run.add_argument("--flight-listen", metavar="HOST:PORT", help="Arrow Flight endpoint for datasets (default: a free port)")
    run.add_argument("--dataset-quota", type=byte_size, metavar="BYTES",
                     help="most bytes of datasets kept (default: no limit)")
    run.add_argument("--replica-cache", type=byte_size, metavar="BYTES",
                     help="most bytes of replicas pulled from other sites (default 8 GiB; 0: no bound)")
    run.add_argument("--result-dataset-bytes", type=byte_size, metavar="BYTES",
                     help="a Table result this large stays at the site as a dataset (default 64 MiB; 0: never)")
    run.add_argument("--pull-timeout", type=float, metavar="SECONDS",
                     help="how long a transfer of a task's data may stall before the task fails (default 120)")
    run.add_argument("--flight-max-rate", type=float, metavar="BYTES_PER_S",
                     help="cap on the rate each dataset transfer is served at (default: none)")
    run.add_argument("--bandwidth", action="append", metavar="SITE=BYTES_PER_S",
                     help="link bandwidth to a peer site, for placement (repeatable)")
    run.add_argument("--default-bandwidth", type=float, metavar="BYTES_PER_S",
                     help="link bandwidth assumed to peers not given by --bandwidth (default 100e6)")
    run.add_argument("--peer", action="append", metavar="HOST:PORT", help="a peer gateway (repeatable)")
    run.add_argument("--heartbeat", type=float, metavar="SECONDS", help="how often peers' status is pulled")
    run.add_argument("--no-steal", dest="steal", action="store_false", default=None,
                     help="never take queued tasks from busy peers")
    run.add_argument("--metrics-listen", metavar="HOST:PORT",
                     help="serve Prometheus metrics over plain HTTP, without auth, at HOST:PORT (port 0 picks one, "
                          "written to <state-dir>/metrics.port); default: off")
    run.add_argument("--log-level", metavar="LEVEL")
    run.add_argument("--parent-pid", type=int, metavar="PID",
                     help="stop when this process (the program that started the gateway) exits")
    return parser


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    file_values = load_toml(args.config) if args.config else {}
    overrides = {
        "listen": args.listen, "state_dir": args.state_dir, "site_id": args.site_id, "region": args.region,
        "ray": args.ray, "ray_token_file": args.ray_token_file, "ray_connect_timeout_s": args.ray_connect_timeout,
        "num_cpus": args.num_cpus, "num_gpus": args.num_gpus,
        "resources": parse_resources(args.resources), "object_store_memory": args.object_store_memory,
        "max_payload_bytes": args.max_payload_bytes, "labels": parse_labels(args.label), "fsync": args.fsync, "ledger": args.ledger, "auth": args.auth,
        "worker_pool": args.worker_pool, "tls_cert": args.tls_cert, "tls_key": args.tls_key, "tls_ca": args.tls_ca,
        "peer_listen": args.peer_listen, "policy_file": args.policy,
        "peers": tuple(args.peer) if args.peer else None, "heartbeat_s": args.heartbeat, "steal": args.steal,
        "log_level": args.log_level, "data_url": args.data_url, "flight_listen": args.flight_listen,
        "dataset_quota_bytes": args.dataset_quota, "replica_cache_bytes": args.replica_cache,
        "result_dataset_bytes": args.result_dataset_bytes, "pull_timeout_s": args.pull_timeout,
        "flight_max_rate": args.flight_max_rate, "bandwidth": parse_bandwidth(args.bandwidth),
        "default_bandwidth": args.default_bandwidth, "metrics_listen": args.metrics_listen,
    }
    return GatewayConfig.build(file_values, overrides)


def run_local(args: argparse.Namespace) -> int:
    """``intertie-gateway local --sites N``: a federation on loopback until Ctrl-C."""
    import signal
    import threading

    from intertie.embedded import LocalFederation

    print(f"starting {args.sites} sites (each with its own Ray; this takes a while)...", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with LocalFederation(args.sites, base_dir=args.state_dir, heartbeat_s=args.heartbeat) as fed:
        for gateway in fed.gateways:
            print(f"{gateway.site_id:10} {gateway.address}   (state {gateway.state_dir})", flush=True)
        first = fed.gateways[0]
        print(f"\nexport INTERTIE_ADDRESS={first.address}", flush=True)
        print(f"export INTERTIE_TOKEN={first.token}   # tenant 'local' of site {first.site_id}", flush=True)
        print(f"export INTERTIE_TLS_CA={fed.tls_ca}", flush=True)
        print("Ctrl-C stops every site.", flush=True)
        stop.wait()
        print("stopping...", flush=True)
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from pathlib import Path

    from intertie_gateway.tokens import TokenError, TokenStore

    store = TokenStore(Path(args.state_dir) / "tokens.json")
    try:
        if args.action == "create":
            record, token = store.create(args.tenant)
            print(f"token {record.id} for tenant {record.tenant} (kept at the site only as a hash; "
                  "shown this once):", file=sys.stderr)
            print(token)
        elif args.action == "list":
            for record in store.records():
                state = f"revoked {time.strftime('%Y-%m-%d %H:%M', time.localtime(record.revoked_at))}" \
                    if record.revoked else "active"
                made = time.strftime("%Y-%m-%d %H:%M", time.localtime(record.created_at))
                print(f"{record.id}  {record.tenant:20}  created {made}  {state}")
        else:
            record = store.revoke(args.token_id)
            print(f"revoked token {record.id} of tenant {record.tenant}")
    except (TokenError, ValueError) as exc:
        print(f"intertie-gateway: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from pathlib import Path

    from intertie_gateway import certs

    directory = Path(args.dir)
    ca = certs.Issued(directory / "ca.pem", directory / "ca.key")
    if not (ca.cert.exists() and ca.key.exists()):
        ca = certs.create_ca(directory)
        print(f"created the CA {ca.cert} (keep {ca.key} secret)")
    try:
        for site in args.site:
            issued = certs.create_site(ca, directory, site, args.host or ["localhost", "127.0.0.1"])
            print(f"created {issued.cert} and {issued.key} for site {site}")
    except ValueError as exc:
        print(f"intertie-gateway: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_ledger(args: argparse.Namespace) -> int:
    """``ledger verify``: 0 and a summary when intact, 1 and the first problem when not, 2 when
    there is nothing to check. ``ledger new-key``: 0 and the new public key."""
    import base64
    import sqlite3
    from pathlib import Path

    from intertie_gateway import ledger, ledger_check

    state = Path(args.state_dir)
    try:
        if args.action == "new-key":
            public = ledger.replace_key(state)
            print(f"made {state / 'ledger.key'}; its public key (raw, base64), for your verifiers: "
                  f"{base64.b64encode(public).decode()}")
            return 0
        db = ledger_check.open_readonly(state / "journal.sqlite")
        try:
            if args.public_key:
                keys = [ledger.read_public_key(Path(k)) for k in args.public_key]
            else:
                current, retired = ledger.recorded_keys(db)
                key_file = state / "ledger.key"
                if key_file.exists():
                    current = ledger.read_public_key(key_file)
                elif current is not None:
                    print(f"intertie-gateway: {key_file} is missing; checking with the public key the ledger "
                          "records", file=sys.stderr)
                keys = [k for k in (current, *retired) if k is not None]
            try:
                verified = ledger_check.verify(db, keys)
            except ledger.Tampered as exc:
                site = db.execute("SELECT value FROM meta WHERE key = 'ledger_site'").fetchone()[0]
                print(f"ledger of site {site}: NOT verified: {exc}")
                return 1
        finally:
            db.close()
    except (ledger.LedgerError, sqlite3.Error, OSError, ValueError) as exc:
        print(f"intertie-gateway: {exc}", file=sys.stderr)
        return 2
    last = verified.last
    when = "no checkpoint yet" if last is None else \
        f"last checkpoint at size {last.size}, {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(last.time))}"
    print(f"ledger of site {verified.site}: {verified.entries} entries, {verified.checkpoints} checkpoints, "
          f"all verified; {when}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "ledger":
        return cmd_ledger(args)
    if args.command == "token":
        return cmd_token(args)
    if args.command == "certs":
        return cmd_certs(args)
    if args.command == "local":
        if args.sites < 1:
            print("intertie-gateway: --sites must be at least 1", file=sys.stderr)
            return 2
        return run_local(args)
    try:
        config = config_from_args(args)
        if config.policy_file:
            from intertie_gateway.policy import PolicyFile

            PolicyFile(config.policy_file, clock=time.monotonic)  # a broken policy stops the start
    except ConfigError as exc:
        print(f"intertie-gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.bootstrap_token:
        if config.auth != "token":
            print("intertie-gateway: configuration error: --bootstrap-token is for --auth token", file=sys.stderr)
            return 2
        from pathlib import Path

        from intertie_gateway.tokens import TokenStore

        TokenStore(config.state_path / "tokens.json").bootstrap("local", Path(args.bootstrap_token))
    from intertie_gateway.ledger import LedgerError
    from intertie_gateway.ray_attach import RayConnectError
    from intertie_gateway.server import serve

    try:
        asyncio.run(serve(config, parent_pid=args.parent_pid))
    except RayConnectError as exc:
        print(f"intertie-gateway: {exc}", file=sys.stderr, flush=True)
        if exc.stuck:  # Ray's connect still runs in a thread, and its exit handlers would wait for it
            logging.shutdown()
            os._exit(1)
        return 1
    except (OSError, LedgerError) as exc:
        print(f"intertie-gateway: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
