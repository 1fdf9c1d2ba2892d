"""Site policy: which tenants a site accepts and how much of it each may use.

An operator writes it as a TOML file (``policy_file``), re-read while the gateway runs
(at most once a second, when it changed): a file that does not parse keeps the policy in
force and is logged. ``accept`` names the tenants served: the site's own ("acme"), a
peer's ("acme@alpha"), a whole peer ("*@alpha"), or everyone ("*"). ``[default]`` holds
the limits of every tenant, ``[tenant."NAME"]`` (a name or a pattern as in ``accept``)
those of some::

    accept = ["*"]
    [default]
    max_running = 0        # tasks of one tenant running here at once (0: no limit)
    max_cpus = 0           # CPUs (and max_gpus: GPUs) its running tasks hold at most (0: no limit)
    max_queued = 100000    # unfinished tasks of one tenant here
    max_dataset_bytes = 0  # bytes of datasets one tenant stores here (0: no limit but the site's)
    submit_rate = 0        # tasks per second accepted from one tenant (0: no limit)
    weight = 1.0           # its share of the site when tenants compete (fair share)
    allowed_functions = [] # sha256 digests of the functions it may run ([]: any)
    [tenant."acme@alpha"]
    max_running = 4

Parsing and deciding are pure; :class:`PolicyFile` does the reading.
"""

from __future__ import annotations

import functools
import logging
import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from intertie_gateway.config import ConfigError
from intertie_gateway.fairshare import Entitlement
from intertie_gateway.tenancy import accepted, matches
from intertie_gateway.throttle import log_throttled

logger = logging.getLogger(__name__)

# A policy file is re-read at most this often (and only when it changed).
RELOAD_EVERY_S = 1.0
# Tenants whose limits a policy remembers at most.
MAX_MEMO = 10_000
DEFAULT_MAX_QUEUED = 100_000
MAX_POLICY_BYTES = 1 << 20
_LIMIT_KEYS = {"max_running", "max_cpus", "max_gpus", "max_queued", "max_dataset_bytes", "submit_rate", "weight",
               "allowed_functions"}


class PolicyError(ConfigError):
    """A policy value is wrong; the message names the key."""


@dataclass(frozen=True)
class Limits:
    max_running: int = 0
    max_cpus: float = 0.0
    max_gpus: float = 0.0
    max_queued: int = DEFAULT_MAX_QUEUED
    max_dataset_bytes: int = 0
    submit_rate: float = 0.0
    weight: float = 1.0
    allowed_functions: frozenset[str] = frozenset()

    def allows(self, digest: str) -> bool:
        return not self.allowed_functions or digest in self.allowed_functions

    @functools.cached_property
    def entitlement(self) -> Entitlement:
        """What dispatch enforces of these limits."""
        resources = {name: most for name, most in (("CPU", self.max_cpus), ("GPU", self.max_gpus)) if most}
        return Entitlement(self.max_running, resources, self.weight)


@dataclass(frozen=True)
class Policy:
    accept: tuple[str, ...] = ("*",)
    default: Limits = Limits()
    tenants: Mapping[str, Limits] = field(default_factory=dict)  # name or pattern -> limits
    # Each tenant's limits once looked up (the hot path asks per task; a policy never changes:
    # a reload makes a new one).
    _memo: dict[str, Limits] = field(default_factory=dict, compare=False, repr=False)

    def accepts(self, tenant: str) -> bool:
        return accepted(tenant, self.accept)

    def limits(self, tenant: str) -> Limits:
        """The limits of a tenant: its own entry, else the first pattern that matches it,
        else the defaults."""
        known = self._memo.get(tenant)
        if known is not None:
            return known
        if len(self._memo) >= MAX_MEMO:
            self._memo.clear()
        limits = self._memo[tenant] = self._lookup(tenant)
        return limits

    def _lookup(self, tenant: str) -> Limits:
        own = self.tenants.get(tenant)
        if own is not None:
            return own
        for pattern, limits in self.tenants.items():
            if matches(tenant, pattern):
                return limits
        return self.default

    def why_refused(self, tenant: str, site_id: str) -> str | None:
        """Why this site does not take tasks of ``tenant`` (None: it does)."""
        if self.accepts(tenant):
            return None
        return f"site {site_id!r} does not accept tenant {tenant or 'anonymous'!r} (its policy)"

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> Policy:
        unknown = set(data) - {"accept", "default", "tenant"}
        if unknown:
            raise PolicyError(f"unknown policy key(s) {sorted(unknown)}: expected accept, [default], [tenant.NAME]")
        accept = data.get("accept", ["*"])
        if not isinstance(accept, list) or not all(isinstance(p, str) and p for p in accept):
            raise PolicyError("accept: expected a list of tenant names or patterns, e.g. [\"acme\", \"*@alpha\"]")
        default = _limits(data.get("default", {}), Limits(), "default")
        tenants_table = data.get("tenant", {})
        if not isinstance(tenants_table, dict):
            raise PolicyError("[tenant.NAME]: expected tables of limits per tenant")
        tenants = {name: _limits(values, default, f"tenant.{name}") for name, values in tenants_table.items()}
        return cls(tuple(accept), default, tenants)


def _limits(values: Any, base: Limits, where: str) -> Limits:
    if not isinstance(values, dict):
        raise PolicyError(f"[{where}]: expected a table of limits")
    unknown = set(values) - _LIMIT_KEYS
    if unknown:
        raise PolicyError(f"[{where}]: unknown key(s) {sorted(unknown)}; expected {sorted(_LIMIT_KEYS)}")
    changes: dict[str, Any] = {}
    for key in ("max_running", "max_queued", "max_dataset_bytes"):
        if key in values:
            value = values[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise PolicyError(f"[{where}] {key}: expected a whole number >= 0, got {value!r}")
            changes[key] = value
    for key in ("submit_rate", "weight", "max_cpus", "max_gpus"):
        if key in values:
            value = values[key]
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
                    or value < 0 or (key == "weight" and value == 0):
                raise PolicyError(f"[{where}] {key}: expected a number {'> 0' if key == 'weight' else '>= 0'}, "
                                  f"got {value!r}")
            changes[key] = float(value)
    if "allowed_functions" in values:
        digests = values["allowed_functions"]
        if not isinstance(digests, list) or not all(isinstance(d, str) and len(d) == 64 for d in digests):
            raise PolicyError(f"[{where}] allowed_functions: expected a list of sha256 hex digests")
        changes["allowed_functions"] = frozenset(d.lower() for d in digests)
    return replace(base, **changes)


class PolicyFile:
    """The policy in force, from ``path`` ("" : accept everyone, default limits). A broken
    file at start is an error; later, the last good policy stays in force."""

    def __init__(self, path: str, clock: Callable[[], float]) -> None:
        self.path = Path(path).expanduser() if path else None
        self._clock = clock
        self._seen: tuple[int, int] | None = None
        self._checked_at = -math.inf
        self.policy = Policy()
        if self.path is not None:
            self.policy = self._read()
            self._checked_at = clock()

    def current(self) -> Policy:
        now = self._clock()
        if self.path is not None and now - self._checked_at >= RELOAD_EVERY_S:
            self._checked_at = now
            try:
                stat = self.path.stat()
                if (stat.st_mtime_ns, stat.st_size) != self._seen:
                    self._seen = (stat.st_mtime_ns, stat.st_size)  # a broken version is reported once
                    self.policy = self._read()
                    logger.info("policy reloaded from %s", self.path)
            except (OSError, PolicyError) as exc:
                log_throttled(logger, "policy-file", "policy file %s: %s; the previous policy stays in force",
                              self.path, exc, level=logging.ERROR)
        return self.policy

    def _read(self) -> Policy:
        assert self.path is not None
        try:
            stat = self.path.stat()
            if stat.st_size > MAX_POLICY_BYTES:
                raise PolicyError(f"{self.path} is {stat.st_size} bytes, over {MAX_POLICY_BYTES}")
            data = tomllib.loads(self.path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise PolicyError(f"{self.path}: {str(exc)[:300]}") from None
        except OSError as exc:
            raise PolicyError(f"{self.path}: {exc.strerror}") from None
        policy = Policy.parse(data)
        self._seen = (stat.st_mtime_ns, stat.st_size)
        return policy


# Tenants whose submission rate is tracked at most (the least recently seen is forgotten).
MAX_RATED_TENANTS = 100_000


class SubmitRates:
    """A token bucket per tenant: ``rate`` tasks per second, in bursts of up to one second's
    worth (at least one task). Pure (clock injected)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, when)

    def take(self, tenant: str, rate: float) -> bool:
        """Whether one more task of ``tenant`` is within ``rate`` (0: no limit)."""
        if rate <= 0:
            return True
        now = self._clock()
        burst = max(rate, 1.0)
        tokens, when = self._buckets.pop(tenant, (burst, now))
        tokens = min(burst, tokens + (now - when) * rate)
        ok = tokens >= 1.0
        self._buckets[tenant] = (tokens - 1.0 if ok else tokens, now)  # re-inserted last: oldest first
        while len(self._buckets) > MAX_RATED_TENANTS:
            del self._buckets[next(iter(self._buckets))]
        return ok
