"""Tenants' bearer tokens: made once, kept only as hashes, revoked without a restart.

A token reads ``itk_<id>_<secret>``: the id (12 hex characters) names it in listings and
revocations; the secret (32 random bytes, URL-safe base64) is shown once, when it is made,
and never stored: the store keeps its SHA-256. A fast hash is enough here, unlike for
passwords: a secret of 256 random bits cannot be guessed from its hash.

The store is a JSON file in the gateway's state dir (mode 0600, replaced whole on every
change). A running gateway reads it again when it changes (checked at most once a second),
so ``intertie-gateway token revoke`` takes effect within seconds.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from intertie_gateway.files import write_private
from intertie_gateway.tenancy import TENANT

logger = logging.getLogger(__name__)

PREFIX = "itk_"
# Longest token accepted for checking; anything longer is refused unread (a real one is ~60).
MAX_TOKEN_CHARS = 256
_TOKEN = re.compile(r"^itk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
# The file is looked at again at most this often (revocations reach a running gateway).
RELOAD_EVERY_S = 1.0


def bearer_token(value: str) -> str | None:
    """The token of an ``authorization`` value "Bearer <token>" (read up to a bounded length);
    "" for another scheme."""
    scheme, _, token = value[:MAX_TOKEN_CHARS + 16].partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class TokenError(ValueError):
    """A token that is malformed, unknown or revoked; the message never contains the token."""


@dataclass(frozen=True)
class TokenRecord:
    id: str
    tenant: str
    hash: str  # SHA-256 of the secret, hex
    created_at: float
    revoked_at: float = 0.0

    @property
    def revoked(self) -> bool:
        return self.revoked_at > 0


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class TokenStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._records: dict[str, TokenRecord] = {}
        self._seen: tuple[int, int] | None = None  # (mtime_ns, size) of the file last read
        self._checked_at = 0.0
        self._load()

    # ---------------------------------------------------------------- operators
    def create(self, tenant: str) -> tuple[TokenRecord, str]:
        """A new token for ``tenant``: its record and the token itself (shown once)."""
        if not TENANT.match(tenant):
            raise ValueError(f"tenant {tenant[:80]!r}: use 1-63 lowercase letters, digits, '.', '_' or '-', "
                             "starting with a letter or digit")
        token_id = secrets.token_hex(6)
        secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
        record = TokenRecord(token_id, tenant, _digest(secret), time.time())
        with self._lock:
            self._load_locked()
            self._records[token_id] = record
            self._save_locked()
        return record, f"{PREFIX}{token_id}_{secret}"

    def bootstrap(self, tenant: str, path: Path) -> str:
        """A token for ``tenant`` in the file ``path`` (0600), for the program that started
        this gateway (``intertie.connect()``, ``intertie-gateway local``): the one already
        there if this store still takes it, else a new one."""
        try:
            token = path.read_text().strip()
            if self.check(token) == tenant:
                return token
        except (OSError, TokenError):
            pass
        _, token = self.create(tenant)
        write_private(path, token.encode() + b"\n")
        return token

    def active(self, token_id: str) -> bool:
        """Whether the token of this id is still taken (re-reads the file at most once a second)."""
        with self._lock:
            self._fresh_locked()
            record = self._records.get(token_id)
        return record is not None and not record.revoked

    def records(self) -> list[TokenRecord]:
        with self._lock:
            self._load_locked()
            return sorted(self._records.values(), key=lambda r: r.created_at)

    def revoke(self, token_id: str) -> TokenRecord:
        """Revokes the token of ``token_id`` (or of a whole token given by mistake)."""
        match = _TOKEN.match(token_id)
        if match:
            token_id = match.group(1)
        with self._lock:
            self._load_locked()
            record = self._records.get(token_id)
            if record is None:
                raise TokenError(f"no token {token_id[:20]!r} in {self.path}")
            if not record.revoked:
                record = self._records[token_id] = TokenRecord(record.id, record.tenant, record.hash,
                                                               record.created_at, time.time())
                self._save_locked()
        return record

    # ---------------------------------------------------------------- the gateway
    def check(self, token: str) -> str:
        """The tenant a token belongs to; ``TokenError`` if it is malformed, unknown or revoked."""
        if len(token) > MAX_TOKEN_CHARS:
            raise TokenError(f"token too long ({len(token)} characters)")
        match = _TOKEN.match(token)
        if match is None:
            raise TokenError("malformed token (expected itk_<id>_<secret>)")
        token_id, secret = match.groups()
        with self._lock:
            self._fresh_locked()
            record = self._records.get(token_id)
            if record is None:  # made since the last read? (a stat; the file is read only if it changed)
                self._load_locked()
                record = self._records.get(token_id)
        # The same hashing whether the id is known or not, and a comparison in constant time.
        expected = record.hash if record is not None else "0" * 64
        if not hmac.compare_digest(_digest(secret), expected) or record is None:
            raise TokenError(f"unknown token {token_id}")
        if record.revoked:
            raise TokenError(f"token {token_id} was revoked")
        return record.tenant

    # ---------------------------------------------------------------- the file
    def _load(self) -> None:
        with self._lock:
            self._load_locked()

    def _fresh_locked(self) -> None:
        """Re-reads the file if a second has passed since it was last looked at (and it changed)."""
        now = time.monotonic()
        if now - self._checked_at >= RELOAD_EVERY_S:
            self._checked_at = now
            self._load_locked()

    def _load_locked(self) -> None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._records, self._seen = {}, None
            return
        seen = (stat.st_mtime_ns, stat.st_size)
        if seen == self._seen:
            return
        self._seen = seen  # (a broken version is reported once)
        try:
            raw = json.loads(self.path.read_text())
            records = {r["id"]: TokenRecord(**r) for r in raw.get("tokens", [])}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            logger.error("token file %s is not readable (%s: %s); the tokens read before stay in force",
                         self.path, type(exc).__name__, exc)
            return
        self._records = records

    def _save_locked(self) -> None:
        body = json.dumps({"tokens": [asdict(r) for r in self._records.values()]}, indent=1)
        write_private(self.path, body.encode())
        stat = self.path.stat()
        self._seen = (stat.st_mtime_ns, stat.st_size)
