"""Log lines about bad input, counted and rate-limited.

Anyone who can reach a port can send garbage; a log line with a traceback per garbage
request lets them fill the operator's disk and bury what matters. The first occurrence of
a kind in each interval is logged in full, the rest are counted and summed up once the
interval has passed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

# One full line per kind of complaint in this many seconds; the rest are counted.
INTERVAL_S = 60.0

# What grpcio logs, with a traceback, when a servicer raises: for a request it could not
# deserialize (stock services registered without lenient parsing) that is the client's
# garbage and the traceback is dropped; for anything else (a bug of ours) the first one per
# interval keeps its traceback. Either way they are counted and rate-limited.
GRPC_LOGGERS = ("grpc._cython.cygrpc", "grpc._server", "grpc.aio._server", "grpc._common")
_GRPC_SERVICER_ERRORS = ("raised by servicer method", "Exception calling application",
                         "Exception deserializing request", "Exception serializing message")
_GARBAGE = ("DecodeError", "deserializing request", "Failed to deserialize")


class Throttle:
    """Counts occurrences per kind; says when one is due for a full log line."""

    def __init__(self, interval_s: float = INTERVAL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._since: dict[str, float] = {}  # kind -> start of its interval
        self._suppressed: dict[str, int] = {}
        self.total: dict[str, int] = {}

    def admit(self, kind: str) -> tuple[bool, int]:
        """(log this one in full?, how many of this kind were suppressed since the last full one)."""
        now = self._clock()
        with self._lock:
            self.total[kind] = self.total.get(kind, 0) + 1
            start = self._since.get(kind)
            if start is None or now - start >= self.interval_s:
                self._since[kind] = now
                return True, self._suppressed.pop(kind, 0)
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return False, 0


_throttle = Throttle()


def log_throttled(logger: logging.Logger, kind: str, message: str, *args: object, level: int = logging.WARNING,
                  exc_info: bool = False) -> None:
    """Logs at most once per kind per interval (with the traceback when asked); the
    occurrences in between are counted into the next line."""
    full, suppressed = _throttle.admit(kind)
    if not full:
        return
    if suppressed:
        message += " (and %d more like it in the last %.0f s)"
        args = (*args, suppressed, _throttle.interval_s)
    logger.log(level, message, *args, exc_info=exc_info)


class GrpcNoiseFilter(logging.Filter):
    """Turns grpcio's traceback per failed request into a counted, rate-limited line."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if not any(marker in text for marker in _GRPC_SERVICER_ERRORS):
            return True
        garbage = any(marker in text for marker in _GARBAGE)
        full, suppressed = _throttle.admit(("grpc-garbage:" if garbage else "grpc-error:") + text[:60])
        if not full:
            return False
        first = text.splitlines()[0][:300]
        record.msg = f"{first} ({suppressed} more like it suppressed in the last {_throttle.interval_s:.0f} s)"
        record.args = ()
        if garbage:  # the client's bytes: their traceback says nothing about the gateway
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def quiet_grpc_noise() -> None:
    """Installs the filter on grpcio's loggers (idempotent)."""
    for name in GRPC_LOGGERS:
        log = logging.getLogger(name)
        if not any(isinstance(f, GrpcNoiseFilter) for f in log.filters):
            log.addFilter(GrpcNoiseFilter())
