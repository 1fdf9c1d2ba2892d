"""Gateway configuration: a frozen dataclass, validated when built; TOML and flags at the edge."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_SITE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
# The object store of an embedded Ray, unless configured.
EMBEDDED_OBJECT_STORE_BYTES = 256 * 1024 * 1024
# Settings of the embedded Ray, and the flags that set them: an attached cluster's nodes
# declare their own resources when they start, so these are refused with --ray ADDRESS.
EMBEDDED_ONLY = {"num_cpus": "--num-cpus", "num_gpus": "--num-gpus", "resources": "--resources",
                 "object_store_memory": "--object-store-memory"}


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key."""


@dataclass(frozen=True)
class GatewayConfig:
    # Where clients reach the gateway; port 0 picks a free one (written to <state_dir>/address).
    listen: str = "127.0.0.1:7070"
    # Journal, function store and the address file live here.
    state_dir: str = "intertie-state"
    site_id: str = "local"
    region: str = "local"
    # "local": an embedded Ray started by the gateway; otherwise the HOST:PORT of an existing
    # cluster's head (the --port of `ray start --head`; the gateway runs on one of its nodes).
    ray: str = "local"
    # Attaching to a cluster with Ray's token auth: a file holding the cluster's token (the
    # head's ~/.ray/auth_token). Unset, the gateway finds one as Ray does (RAY_AUTH_TOKEN,
    # RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token) when the cluster asks for one.
    ray_token_file: str = ""
    # How long attaching to a cluster may take before the gateway gives up and says why.
    ray_connect_timeout_s: float = 15.0
    # Only for the embedded Ray (an attached cluster's nodes declare their own, with `ray
    # start`); None lets Ray detect the machine.
    num_cpus: int | None = None
    num_gpus: int | None = None
    resources: Mapping[str, float] = field(default_factory=dict)
    # Only for the embedded Ray, which would otherwise claim ~30% of memory for its object
    # store; None: EMBEDDED_OBJECT_STORE_BYTES.
    object_store_memory: int | None = None
    # Largest function, argument blob or result accepted (bytes).
    max_payload_bytes: int = 100 * 1024 * 1024
    # fsync every journal commit (power-loss safe). Off, a commit still survives a killed
    # gateway process (SQLite WAL with synchronous=NORMAL), at a fraction of the cost.
    fsync: bool = False
    # Who may call: "token" (a tenant's bearer token from `intertie-gateway token create`,
    # checked once per call) or "none" (anyone who reaches the port: a trusted network only).
    # With peers, "token" needs mutual TLS between them (tls_ca and peer_listen): a peer is
    # known by its certificate.
    auth: str = "token"
    # TLS: this site's certificate chain and key (PEM files, e.g. from `intertie-gateway certs
    # create`), for its gRPC and Flight endpoints. Clients then connect with the CA that signed
    # it (connect(tls_ca=...), INTERTIE_TLS_CA, --tls-ca). Unset: plaintext.
    tls_cert: str = ""
    tls_key: str = ""
    # The federation's CA (PEM): peers must show a certificate it signed (mutual TLS; the
    # certificate's CN is the peer's site id), and this site shows its own to them.
    tls_ca: str = ""
    # Where peers connect (HOST:PORT, mutual TLS), beside ``listen`` where tenants connect with
    # their tokens; the addresses in ``peers`` are the peers' peer_listen addresses.
    peer_listen: str = ""
    # Which tenants this site serves and how much of it each may use (a TOML file, re-read
    # while the gateway runs: see policy.py). Unset: every tenant, default limits.
    policy_file: str = ""
    # Most tasks inside Ray at once, as a multiple of the site's CPUs. The gateway adapts
    # the multiple to observed run times (admission.py): millisecond tasks need a deep
    # pipeline to keep workers busy, minute-long ones get about one per CPU; the rest wait
    # in the gateway's queue, where they can be cancelled cheaply or moved to another site.
    admission_overcommit: float = 32.0
    # Run one-CPU tasks on a pool of long-lived Ray workers (one per CPU) rather than as
    # plain Ray tasks: about half the round trip. Their CPUs are counted by the gateway,
    # not by Ray, so turn it off when other drivers share an attached cluster.
    worker_pool: bool = True
    # Finished tasks (and their results) are kept this long, fetched or not.
    result_ttl_s: float = 7 * 24 * 3600.0
    labels: Mapping[str, str] = field(default_factory=dict)
    # Forward task stdout/stderr from Ray workers into the gateway's log.
    log_to_driver: bool = False
    log_level: str = "INFO"
    # Datasets: where they are stored (any fsspec URL; default <state_dir>/datasets), the
    # Arrow Flight endpoint that serves them (default: the listen host, a free port), and
    # how many bytes of datasets the site keeps at most (0: no limit; replicas not counted).
    data_url: str = ""
    flight_listen: str = ""
    dataset_quota_bytes: int = 0
    # Replicas pulled for tasks that ran here: a cache of at most this many bytes (0: no
    # bound); the least recently used is evicted first.
    replica_cache_bytes: int = 8 << 30
    # A task result that is a pyarrow.Table of at least this many bytes stays at the site
    # as a dataset and the caller gets a DatasetRef (0: only for returns="dataset").
    result_dataset_bytes: int = 64 << 20
    # How long a dataset transfer to this site may stall (no batch arriving) before the
    # tasks waiting for it fail; interrupted transfers are resumed and retried meanwhile.
    pull_timeout_s: float = 120.0
    # Bytes/s this site serves to each dataset transfer (0: no cap): protects its uplink.
    flight_max_rate: float = 0.0
    # Federation: peers' HOST:PORT, how often their status is pulled, and how many missed
    # answers in a row mark a peer down (its unfinished tasks are then placed elsewhere).
    peers: tuple[str, ...] = ()
    heartbeat_s: float = 1.0
    down_after: int = 3
    # Idle sites take queued, not-started tasks from busy peers.
    steal: bool = True
    # Placement: seconds of completion time one currency unit (price label, per CPU-hour)
    # and one gram of CO2e (carbon label, g/kWh) are worth; 0 ignores them.
    price_weight: float = 0.0
    carbon_weight: float = 0.0
    # Bytes/s assumed between this site and a peer, unless set per peer in ``bandwidth``.
    default_bandwidth: float = 100e6
    bandwidth: Mapping[str, float] = field(default_factory=dict)
    # Where Prometheus metrics are served (HOST:PORT, plain HTTP, no auth: loopback or a
    # monitoring network; port 0 picks one, written to <state_dir>/metrics.port). "": off.
    metrics_listen: str = ""
    # The usage ledger signs a checkpoint every this many entries, or this many seconds after
    # the last one when entries came meanwhile (a proof can be had once a checkpoint covers
    # the entry).
    ledger_checkpoint_entries: int = 1000
    ledger_checkpoint_s: float = 10.0
    # A finished attempt's usage is recorded in its commit and appended to the ledger's log by
    # a batch this often (0: in the commit itself, which costs each commit more).
    ledger_integrate_s: float = 0.1
    # Keep the usage ledger (off: no usage records, nothing for tenants or peers to verify;
    # for measuring what it costs, bench/overhead.py).
    ledger: bool = True

    def __post_init__(self) -> None:
        host, sep, port = self.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ConfigError(f"listen: expected HOST:PORT, got {self.listen!r}")
        if not isinstance(self.metrics_listen, str):
            raise ConfigError(f"metrics_listen: expected HOST:PORT, got {self.metrics_listen!r}")
        if self.metrics_listen:
            host, sep, port = self.metrics_listen.rpartition(":")
            if not sep or not host or not port.isdigit() or int(port) > 65535:
                raise ConfigError(f"metrics_listen (--metrics-listen): expected HOST:PORT, got "
                                  f"{self.metrics_listen!r}")
        if not _SITE_ID.match(self.site_id):
            raise ConfigError(f"site_id: letters, digits, '.', '_' and '-' only (1-63), got {self.site_id!r}")
        if not _SITE_ID.match(self.region):
            raise ConfigError(f"region: letters, digits, '.', '_' and '-' only, got {self.region!r}")
        for key in ("num_cpus", "num_gpus"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ConfigError(f"{key}: expected a whole number >= 0, got {value!r}")
        if not isinstance(self.resources, Mapping):
            raise ConfigError("resources: expected a table of resource name -> amount")
        for name, amount in self.resources.items():
            if not isinstance(amount, (int, float)) or isinstance(amount, bool) or amount < 0 \
                    or math.isnan(amount):
                raise ConfigError(f"resources.{name}: expected a number >= 0, got {amount!r}")
        for key in ("dataset_quota_bytes", "replica_cache_bytes", "result_dataset_bytes"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{key}: expected a whole number of bytes >= 0, got {value!r}")
        for key in ("object_store_memory", "max_payload_bytes"):
            value = getattr(self, key)
            if key == "object_store_memory" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{key}: expected a whole number of bytes > 0, got {value!r}")
        self._check_ray()
        if self.max_payload_bytes > 1024 * 1024 * 1024:
            raise ConfigError("max_payload_bytes: at most 1 GiB (a gRPC message limit)")
        if not isinstance(self.admission_overcommit, (int, float)) or self.admission_overcommit < 1:
            raise ConfigError(f"admission_overcommit: expected a number >= 1, got {self.admission_overcommit!r}")
        if not isinstance(self.result_ttl_s, (int, float)) or self.result_ttl_s <= 0:
            raise ConfigError(f"result_ttl_s: expected seconds > 0, got {self.result_ttl_s!r}")
        if not isinstance(self.worker_pool, bool):
            raise ConfigError(f"worker_pool: expected true or false, got {self.worker_pool!r}")
        if not isinstance(self.fsync, bool):
            raise ConfigError(f"fsync: expected true or false, got {self.fsync!r}")
        if not isinstance(self.ledger_integrate_s, (int, float)) or isinstance(self.ledger_integrate_s, bool) \
                or not math.isfinite(self.ledger_integrate_s) or not 0 <= self.ledger_integrate_s <= 60:
            raise ConfigError(f"ledger_integrate_s: expected seconds from 0 to 60, got {self.ledger_integrate_s!r}")
        if not isinstance(self.ledger, bool):
            raise ConfigError(f"ledger: expected true or false, got {self.ledger!r}")
        if self.auth not in ("none", "token"):
            raise ConfigError(f"auth: expected \"none\" or \"token\", got {self.auth!r}")
        self._check_tls()
        if not isinstance(self.labels, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.labels.items()):
            raise ConfigError("labels: expected a table of string -> string")
        if isinstance(self.peers, str) or not all(isinstance(p, str) for p in self.peers):
            raise ConfigError(f"peers: expected a list of HOST:PORT strings, got {self.peers!r}")
        for peer in self.peers:
            host, sep, port = peer.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
                raise ConfigError(f"peers: expected HOST:PORT, got {peer!r}")
        for name in ("heartbeat_s", "price_weight", "carbon_weight", "default_bandwidth", "pull_timeout_s",
                     "flight_max_rate"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
                    or value < 0 or (value == 0 and name in ("heartbeat_s", "default_bandwidth", "pull_timeout_s")):
                raise ConfigError(f"{name}: expected a positive number, got {value!r}")
        if not isinstance(self.ledger_checkpoint_entries, int) or isinstance(self.ledger_checkpoint_entries, bool) \
                or self.ledger_checkpoint_entries < 1:
            raise ConfigError(f"ledger_checkpoint_entries: expected an integer >= 1, got "
                              f"{self.ledger_checkpoint_entries!r}")
        if not isinstance(self.ledger_checkpoint_s, (int, float)) or isinstance(self.ledger_checkpoint_s, bool) \
                or not math.isfinite(self.ledger_checkpoint_s) or self.ledger_checkpoint_s <= 0:
            raise ConfigError(f"ledger_checkpoint_s: expected seconds > 0, got {self.ledger_checkpoint_s!r}")
        if not isinstance(self.down_after, int) or isinstance(self.down_after, bool) or self.down_after < 1:
            raise ConfigError(f"down_after: expected an integer >= 1, got {self.down_after!r}")
        if not isinstance(self.steal, bool):
            raise ConfigError(f"steal: expected true or false, got {self.steal!r}")
        if not isinstance(self.bandwidth, Mapping) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in self.bandwidth.values()):
            raise ConfigError("bandwidth: expected a table of site id -> bytes/s > 0")
        object.__setattr__(self, "peers", tuple(dict.fromkeys(self.peers)))
        object.__setattr__(self, "bandwidth", {k: float(v) for k, v in self.bandwidth.items()})
        object.__setattr__(self, "resources", {k: float(v) for k, v in self.resources.items()})
        object.__setattr__(self, "labels", dict(self.labels))

    def _check_tls(self) -> None:
        for key in ("tls_cert", "tls_key", "tls_ca", "peer_listen"):
            if not isinstance(getattr(self, key), str):
                raise ConfigError(f"{key}: expected a string, got {getattr(self, key)!r}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert and tls_key (--tls-cert, --tls-key) go together: the site's certificate "
                              "and its private key")
        if not isinstance(self.policy_file, str):
            raise ConfigError(f"policy_file: expected a file name, got {self.policy_file!r}")
        for key in ("tls_cert", "tls_key", "tls_ca", "policy_file"):
            path = getattr(self, key)
            if path and not Path(path).expanduser().is_file():
                raise ConfigError(f"{key}: no file {path!r}")
        if self.tls_ca and not self.tls_cert:
            raise ConfigError("tls_ca (--tls-ca) needs tls_cert and tls_key: mutual TLS between peers means this "
                              "site shows a certificate of the federation CA too")
        if self.peer_listen:
            host, sep, port = self.peer_listen.rpartition(":")
            if not sep or not host or not port.isdigit() or int(port) > 65535:
                raise ConfigError(f"peer_listen: expected HOST:PORT, got {self.peer_listen!r}")
            if not self.tls_ca:
                raise ConfigError("peer_listen (--peer-listen) is the mutual-TLS endpoint for peers: it needs the "
                                  "federation CA (--tls-ca) and this site's certificate (--tls-cert, --tls-key)")
        if self.auth == "token" and self.peers and not (self.tls_ca and self.peer_listen):
            raise ConfigError("auth = \"token\" with peers: peers authenticate by mutual TLS; give the federation "
                              "CA and this site's certificate (--tls-ca, --tls-cert, --tls-key) and where peers "
                              "connect (--peer-listen); or run with --auth none on a trusted network")

    @property
    def peers_by_certificate(self) -> bool:
        """Peers must prove who they are with a certificate of the federation CA (mutual TLS),
        not by a claim checked with a call back (the plaintext federation of a trusted network)."""
        return self.auth == "token" or bool(self.tls_ca)

    def _check_ray(self) -> None:
        if not isinstance(self.ray, str):
            raise ConfigError(f"ray: expected 'local' or HOST:PORT, got {self.ray!r}")
        if not isinstance(self.ray_connect_timeout_s, (int, float)) or isinstance(self.ray_connect_timeout_s, bool) \
                or not math.isfinite(self.ray_connect_timeout_s) or self.ray_connect_timeout_s <= 0:
            raise ConfigError(f"ray_connect_timeout_s: expected seconds > 0, got {self.ray_connect_timeout_s!r}")
        if not isinstance(self.ray_token_file, str):
            raise ConfigError(f"ray_token_file: expected a file name, got {self.ray_token_file!r}")
        if self.ray == "local":
            if self.ray_token_file:
                raise ConfigError("ray_token_file (--ray-token-file) is for attaching to a cluster (--ray HOST:PORT); "
                                  "the embedded Ray makes its own token")
            return
        why = ray_address_problem(self.ray)
        if why:
            raise ConfigError(f"ray: {why}")
        given = [f"{key} ({flag})" for key, flag in EMBEDDED_ONLY.items()
                 if getattr(self, key) not in (None, {})]
        if given:
            raise ConfigError(
                f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for the embedded Ray and "
                f"{'does' if len(given) == 1 else 'do'} not apply when attaching to the cluster at {self.ray}: its "
                "nodes declare their own resources (`ray start --num-cpus=N --resources=...` on each node); drop "
                f"{'it' if len(given) == 1 else 'them'}, or use --ray local")

    @property
    def embedded_object_store_bytes(self) -> int:
        return self.object_store_memory or EMBEDDED_OBJECT_STORE_BYTES

    @property
    def compute_id(self) -> str:
        return f"urn:intertie:site:{self.region}:{self.site_id}"

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir).expanduser()

    @classmethod
    def build(cls, file_values: Mapping[str, Any] | None = None,
              overrides: Mapping[str, Any] | None = None) -> GatewayConfig:
        """Config file values, then flag overrides (None means "not given")."""
        known = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in (file_values or {}).items():
            if key not in known:
                raise ConfigError(f"unknown configuration key {key!r}")
            values[key] = value
        for key, value in (overrides or {}).items():
            if value is not None:
                values[key] = value
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(str(exc)) from None


def ray_address_problem(address: str) -> str | None:
    """What is wrong with an address given for an existing Ray cluster (None: a HOST:PORT)."""
    shown = address if address else "an empty address"
    if "://" in address:
        scheme = address.split("://", 1)[0]
        hint = " (that is a Ray Client address; the gateway attaches as a driver)" if scheme == "ray" else ""
        return (f"expected 'local' or the cluster head's HOST:PORT (e.g. 10.0.0.5:6379), got {shown!r}{hint}: "
                "give it without a scheme")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        return (f"expected 'local' or the cluster head's HOST:PORT (e.g. 10.0.0.5:6379, the --port of "
                f"`ray start --head`), got {shown!r}")
    return None


def load_toml(path: str | Path) -> dict[str, Any]:
    """Reads a gateway TOML file: top-level keys, or the same keys under ``[gateway]``;
    ``[federation]`` and ``[placement]`` tables hold the federation keys."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    gateway = data.pop("gateway", {})
    if not isinstance(gateway, dict):
        raise ConfigError("[gateway] must be a table")
    merged = {**data, **gateway}
    for table in ("federation", "placement"):
        section = merged.pop(table, {})
        if not isinstance(section, dict):
            raise ConfigError(f"[{table}] must be a table")
        merged.update(section)
    if isinstance(merged.get("peers"), list):
        merged["peers"] = tuple(merged["peers"])
    return merged


def parse_resources(text: str | None) -> dict[str, float] | None:
    """``--resources '{"bigmem": 2}'``."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--resources: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ConfigError("--resources: expected a JSON object of resource name -> amount")
    return value


def parse_labels(items: list[str] | None) -> dict[str, str] | None:
    if not items:
        return None
    labels = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--label: expected KEY=VALUE, got {item!r}")
        labels[key] = value
    return labels


def parse_bandwidth(items: list[str] | None) -> dict[str, float] | None:
    """``--bandwidth beta=1e9`` (repeatable): bytes/s to a peer site."""
    if not items:
        return None
    table = {}
    for item in items:
        site, sep, value = item.partition("=")
        try:
            table[site] = float(value)
        except ValueError:
            table[site] = -1.0
        if not sep or not site or not table[site] > 0:
            raise ConfigError(f"--bandwidth: expected SITE=BYTES_PER_S (> 0), got {item!r}")
    return table
