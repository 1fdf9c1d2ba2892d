"""Checks of what a site receives for its datasets from the network, before anything
writes, counts or serves it: dataset ids and names, and Arrow IPC streams (a bound on a
schema's fields, a schema that reads back, full validation of every batch).

Arrow data from a client or a peer is not trusted: a bad offset would crash Arrow's writer
or, stored, every reader, so each batch is validated with ``validate(full=True)`` and what
fails is refused as the sender's (INVALID_ARGUMENT), while a failing disk or transport is
not. :class:`DatasetError`, the typed error of every dataset request, is defined here, the
lowest of the dataset modules, so that each of them can raise it; ``intertie_gateway.datasets``
re-exports it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from intertie_gateway.validate import clip

VALID_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class DatasetError(Exception):
    """A dataset request that cannot be served; ``kind`` is an intertie.v1 ErrorKind name."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def first_line(exc: BaseException) -> str:
    return str(exc).split("\n", 1)[0].split(". Detail:", 1)[0][:300]


def batches_of(reader: Any) -> Any:
    """The record batches of a Flight reader (``read_chunk``) or of an iterable; a stream
    that does not decode is the sender's fault (INVALID_ARGUMENT)."""
    if hasattr(reader, "read_chunk"):  # a Flight reader
        while True:
            try:
                chunk = arrow_call(reader.read_chunk, "the uploaded stream")
            except StopIteration:
                return
            if chunk.data is not None:
                yield chunk.data
    else:
        yield from reader


# An uploaded schema is refused past this many fields (each costs memory per batch).
MAX_FIELDS = 10_000


def arrow_call(call: Callable[[], Any], what: str) -> Any:
    """``call()``, with Arrow's complaints about the bytes it decodes made a typed error."""
    try:
        return call()
    except (pa.ArrowException, OSError) as exc:  # pyarrow raises some decoding errors as plain OSError
        if isinstance(exc, flight.FlightError) and not isinstance(exc, flight.FlightServerError):
            raise  # the transport (cancelled, timed out, unavailable): not the data's fault
        raise DatasetError("ERROR_KIND_INVALID_ARGUMENT", f"{what} is not valid Arrow IPC: "
                           f"{clip(first_line(exc))}") from None


def checked_schema(schema: pa.Schema) -> pa.Schema:
    if len(schema) > MAX_FIELDS:
        raise DatasetError("ERROR_KIND_INVALID_ARGUMENT",
                           f"the schema has {len(schema)} fields, over the limit of {MAX_FIELDS}")
    # What DatasetStore._commit stores must read back: a schema that does not round-trip is refused now.
    arrow_call(lambda: pa.ipc.read_schema(schema.serialize()), "the schema")
    return schema


def write_batch(writer: Any, batch: pa.RecordBatch, where: str) -> None:
    """Appends a validated batch; what the file format cannot hold (a dictionary that
    changes between batches) is refused as the sender's, a failing disk is not."""
    try:
        writer.write_batch(batch)
    except pa.ArrowInvalid as exc:
        raise DatasetError("ERROR_KIND_INVALID_ARGUMENT",
                           f"{where} cannot be stored: {clip(first_line(exc))}") from None


def check_batch(batch: pa.RecordBatch, schema: pa.Schema, where: str) -> None:
    """Full validation (offsets, lengths, UTF-8, dictionary indices) of a batch from the
    network, before anything writes, counts or serves it."""
    if not batch.schema.equals(schema):
        raise DatasetError("ERROR_KIND_INVALID_ARGUMENT", f"{where}: its schema differs from the stream's")
    try:
        batch.validate(full=True)
    except pa.ArrowException as exc:
        raise DatasetError("ERROR_KIND_INVALID_ARGUMENT",
                           f"{where} is not valid Arrow data: {clip(first_line(exc))}") from None
