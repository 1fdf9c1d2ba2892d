"""The peer side of a pull (:meth:`~intertie_gateway.datasets.DatasetStore.pull` copies a
dataset from the sites that hold it): a watchdog that cancels a stream on which nothing
arrives, since a peer that hangs sends no error, the check of a holder's answer about the
dataset (its name, row count and owner), which is network data like the batches.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from intertie_gateway.arrow_checks import VALID_NAME, DatasetError

logger = logging.getLogger(__name__)


class Watchdog:
    """Cancels a transfer's stream when no batch has arrived for ``stall_s`` or the store is
    closing: a peer that hangs (half-open connection, frozen process) sends no error."""

    def __init__(self, stall_s: float, closing: threading.Event) -> None:
        self.reader: Any = None
        self._stall_s = stall_s
        self._last = time.monotonic()
        self._done = threading.Event()
        self._closing = closing
        threading.Thread(target=self._run, name="intertie-pull-watch", daemon=True).start()

    def progress(self) -> None:
        self._last = time.monotonic()

    def stop(self) -> None:
        self._done.set()

    def _run(self) -> None:
        while not self._done.wait(min(1.0, self._stall_s / 4)):
            reader = self.reader
            if reader is not None and (self._closing.is_set() or time.monotonic() - self._last > self._stall_s):
                logger.warning("a dataset transfer stalled for %.0f s (or the site is stopping): cancelling it",
                               time.monotonic() - self._last)
                quietly(reader.cancel)
                self._last = time.monotonic()


def peer_meta(body: bytes, dataset_id: str) -> tuple[str, int, str]:
    """(name, rows, owner) from a holder's answer to ``get``; anything else is invalid data."""
    try:
        meta = json.loads(body)
    except (ValueError, RecursionError):
        meta = None
    if not isinstance(meta, dict) or meta.get("id") != dataset_id or not isinstance(meta.get("num_rows"), int) \
            or meta["num_rows"] < 0 or not isinstance(meta.get("owner", ""), str):
        raise DatasetError("ERROR_KIND_INVALID_ARGUMENT", "its metadata of the dataset is not valid")
    name = meta.get("name")
    return (name if isinstance(name, str) and VALID_NAME.match(name) else dataset_id), meta["num_rows"], \
        meta.get("owner", "")


def quietly(call: Callable[[], object]) -> None:
    """Closes or cancels something that may already be broken."""
    try:
        call()
    except Exception as exc:
        logger.debug("%r: %s", call, exc)
