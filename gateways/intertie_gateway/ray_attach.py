"""Attaching to an existing Ray cluster, checked before Ray is: a probe of the head's GCS says
within milliseconds whether it is there and whether it wants Ray's token auth, so that a
mistake is one line naming what is missing, not Ray's retries (20 s of warnings) ending in
"Failed to connect" to an address the operator never typed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# A call Ray's GCS answers at once, with an empty request: whether the head is there and
# whether it accepts this process's token.
GCS_PROBE_METHOD = "/ray.rpc.NodeInfoGcsService/GetClusterId"
# The probe's share of the connect timeout (it answers in milliseconds when the head is up).
PROBE_TIMEOUT_S = 5.0
# Ray's own settings of its token auth (ray/_private/authentication): the mode, the token,
# a file holding it, and the file Ray reads by default.
AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_PATH = "~/.ray/auth_token"


class RayConnectError(RuntimeError):
    """Starting or attaching to Ray failed; the message is one line saying what is missing.
    ``stuck``: Ray's own connect is still running (it did not return in time)."""

    def __init__(self, message: str, *, stuck: bool = False) -> None:
        super().__init__(message)
        self.stuck = stuck


def _first_line(text: str, limit: int = 300) -> str:
    line = next((part.strip() for part in str(text).splitlines() if part.strip()), "")
    return line if len(line) <= limit else line[:limit - 3] + "..."


def find_token(token_file: str, environ: Mapping[str, str]) -> tuple[str, str] | None:
    """The token this gateway offers a cluster with token auth, and where it came from: the
    configured file, else where Ray itself looks (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH,
    ~/.ray/auth_token, in that order). None when there is none."""
    if token_file:
        path = Path(token_file).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise RayConnectError(f"--ray-token-file {token_file}: cannot read it ({exc.strerror or exc})") from None
        if not token:
            raise RayConnectError(f"--ray-token-file {token_file} is empty: it should hold the cluster's token "
                                  f"(a copy of the head node's {DEFAULT_TOKEN_PATH})")
        return token, f"--ray-token-file {token_file}"
    if environ.get(TOKEN_ENV, "").strip():
        return environ[TOKEN_ENV].strip(), TOKEN_ENV
    for source, name in ((environ.get(TOKEN_PATH_ENV, ""), TOKEN_PATH_ENV), (DEFAULT_TOKEN_PATH, "")):
        if not source:
            continue
        try:
            token = Path(source).expanduser().read_text().strip()
        except OSError:
            token = ""
        if token:
            return token, f"{name}={source}" if name else source
    return None


def probe_gcs(address: str, token: str | None, timeout_s: float) -> tuple[str, str]:
    """One call to the GCS at ``address``: (status code name, details); ("OK", "") when it
    answered. Never raises for what the network or the server says."""
    import grpc

    channel = grpc.insecure_channel(address)
    try:
        call = channel.unary_unary(GCS_PROBE_METHOD, request_serializer=None, response_deserializer=None)
        metadata = [("authorization", f"Bearer {token}")] if token else None
        call(b"", timeout=timeout_s, metadata=metadata)
        return "OK", ""
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else str(exc)
        return (code.name if code is not None else "UNKNOWN"), details or ""
    finally:
        channel.close()


def _unreachable(address: str, code: str, details: str, timeout_s: float) -> str:
    """The one line for a probe that did not reach a Ray head."""
    host, _, port = address.rpartition(":")
    lowered = details.lower()
    if code == "DEADLINE_EXCEEDED":
        return (f"Ray at {address} did not answer within {timeout_s:g} s (a firewall, or the wrong host or port?)")
    if code == "UNIMPLEMENTED":
        return (f"{address} answers, but not as a Ray head's GCS port ({_first_line(details, 80)}): give the --port "
                "of `ray start --head` (6379 by default)")
    if "connection refused" in lowered:
        return (f"cannot reach Ray at {address}: connection refused (is the head running there? "
                f"`ray start --head --port={port}` on {host})")
    if "domain name not found" in lowered or "dns" in lowered or "resolve" in lowered or "name or service" in lowered:
        return f"cannot reach Ray at {address}: unknown host {host!r}"
    return f"cannot reach Ray at {address} as a Ray head: {code}: {_first_line(details, 200)}"


def prepare_attach(address: str, token_file: str, timeout_s: float,
                   environ: MutableMapping[str, str] = os.environ) -> str:
    """Checks that a Ray head answers at ``address`` and what auth it wants, and sets Ray's
    environment for ``ray.init`` to match: token auth on, with the token found (see
    ``find_token``), when the cluster asks for one. Returns how it authenticates (for the
    log); raises RayConnectError naming what is missing."""
    probe_s = min(PROBE_TIMEOUT_S, timeout_s)
    code, details = probe_gcs(address, None, probe_s)
    mode = environ.get(AUTH_MODE_ENV, "").strip().lower()
    if code == "OK":
        if mode == "token" and find_token(token_file, environ) is None:
            environ[AUTH_MODE_ENV] = "disabled"  # Ray would refuse to start without a token it does not need
        return "no auth (the cluster does not use token auth)"
    if code != "UNAUTHENTICATED":
        raise RayConnectError(_unreachable(address, code, details, probe_s))
    if mode == "disabled":
        raise RayConnectError(f"Ray at {address} requires token auth, but RAY_AUTH_MODE=disabled is set here: "
                              "unset it, and pass --ray-token-file FILE with the cluster's token")
    found = find_token(token_file, environ)
    if found is None:
        raise RayConnectError(
            f"Ray at {address} requires token auth (its nodes run with RAY_AUTH_MODE=token) and no token was found "
            f"here: pass --ray-token-file FILE (a copy of the head node's {DEFAULT_TOKEN_PATH}), or set "
            f"{TOKEN_PATH_ENV} or {TOKEN_ENV}")
    token, source = found
    code, details = probe_gcs(address, token, probe_s)
    if code == "UNAUTHENTICATED":
        raise RayConnectError(f"Ray at {address} requires token auth and refused the token from {source}: it is "
                              f"not this cluster's token (the head's is in its {DEFAULT_TOKEN_PATH}, or where its "
                              f"{TOKEN_PATH_ENV} points)")
    if code != "OK":
        raise RayConnectError(_unreachable(address, code, details, probe_s))
    environ[AUTH_MODE_ENV] = "token"
    if token_file:  # Ray reads RAY_AUTH_TOKEN before the file: the configured file wins
        environ[TOKEN_PATH_ENV] = str(Path(token_file).expanduser())
        environ.pop(TOKEN_ENV, None)
    _refresh_ray_auth()
    return f"token auth, token from {source}"


def _refresh_ray_auth() -> None:
    """Ray caches its auth mode and token on first use: a process that used Ray before
    (tests) reads them again. Private API; a Ray without it has not cached anything."""
    with contextlib.suppress(Exception):
        from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


class _DropRecords(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def init_within(ray: Any, kwargs: dict[str, Any], timeout_s: float, address: str) -> None:
    """``ray.init`` with a bound: a driver whose node has no raylet of the cluster waits
    for one for 30 s, and Ray's retries log a warning a second meanwhile."""
    failure: list[BaseException] = []

    def attach() -> None:
        try:
            ray.init(**kwargs)
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)

    # Ray says it sets no SIGTERM handler off the main thread: the gateway sets its own.
    quiet = _DropRecords("SIGTERM handler is not set")
    ray_logger = logging.getLogger("ray._private.worker")
    ray_logger.addFilter(quiet)
    thread = threading.Thread(target=attach, name="ray-attach", daemon=True)
    thread.start()
    thread.join(max(timeout_s, 0.1))
    ray_logger.removeFilter(quiet)
    if thread.is_alive():
        raise RayConnectError(
            f"Ray at {address} answered, but attaching did not finish within {timeout_s:g} s: the gateway must run "
            f"on a node of the cluster (run `ray start --address={address}` on this machine first), or raise "
            "--ray-connect-timeout", stuck=True)
    if failure:
        exc = failure[0]
        raise RayConnectError(f"attaching to Ray at {address} failed: {type(exc).__name__}: "
                              f"{_first_line(str(exc))}") from exc


