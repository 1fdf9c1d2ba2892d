"""Hostile input for every method a site gateway serves: hypothesis strategies, raw senders
and a judge of the answers.

Shared by tests/integration/test_fuzz.py (a few cases per method, in the suite) and
bench/fuzz.py (thousands per method, ``make chaos``). Nothing here validates on the client
side: requests are bytes, sent with a raw gRPC channel (no serializer), so what reaches the
gateway is exactly what a hostile client could send. Every call has a deadline.

The surfaces (``METHODS``, one row per method, built from the service descriptors so that a
new RPC is fuzzed without touching this file):

- every method of intertie.v1 TaskService, SiteService, PeerService and LedgerService, and of the stock
  grpc.health.v1.Health and grpc.reflection.v1alpha.ServerReflection services;
- every Arrow Flight method of the gateway's Flight endpoint, spoken at the gRPC level
  (``/arrow.flight.protocol.FlightService/...``, messages encoded here by hand): DoGet,
  DoPut (hostile descriptors; and valid Arrow IPC streams with corrupted buffers and
  metadata), DoAction per action type, ListFlights, ListActions, GetFlightInfo,
  PollFlightInfo, GetSchema, DoExchange, Handshake.

Inputs for each method (``cases(method)``): (a) random bytes, (b) structurally valid
messages with hostile field values (generic, from the descriptor, and hand-written ones that
reach deeper: near-valid task specs, tickets, descriptors...), (c) mutations of valid
serializations (bit flips, truncation, inserted/deleted bytes), (d) wire-level oddities
(invalid UTF-8 in string fields, wrong wire types, unknown fields, deeply nested groups,
overlong varints, lengths past the end).

An answer (``Outcome.kind``) is one of
  ok         the call succeeded (and, for an upload, the stored data reads back valid);
  typed      a clean status: a client-error gRPC code (``CLEAN_CODES``), or on Flight the
             gateway's convention ``ERROR_KIND_<KIND>: ...`` (pyarrow has no Flight
             exception for INVALID_ARGUMENT, so those travel as UNKNOWN) -- short, no
             traceback, no raw Python exception;
  transport  Arrow Flight's C++ transport refused the request before (or without) any
             gateway code: an UNKNOWN/INTERNAL status without the ". Detail: ..." suffix
             pyarrow's server adds to everything its Python servicer raises -- e.g. INTERNAL
             with no details for an envelope that is not valid protobuf, or "Stream finished
             before first message sent", "Invalid flatbuffers message.", "Expected IPC message
             of type schema but got record batch" for a DoPut without a usable first message.
             A bare pyarrow FlightServerBase answers the same; counted, not failed;
  restart    (Flight) UNAVAILABLE: the data-plane process died on this input (an Arrow C++ crash
             in decoding, which no handler can catch) or was restarting when it came; the gateway
             kept serving and restarted it. Counted and shown, not failed: a client retries it;
  untyped    anything else: UNKNOWN, INTERNAL (the gateway failing on the client's bytes),
             UNAVAILABLE from a live gateway, a traceback or "Python exception" in the
             details, details over MAX_DETAILS_CHARS (or too big for gRPC's metadata limit),
             a per-task error message over that size, acks that do not match the tasks;
  bad-data   an upload was accepted but what is stored does not read back valid, has another
             number of rows, or a recorded size far above what was sent;
  hang       no answer by the deadline;
  crash      the gateway process died.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import math
import pickle
import signal
import sqlite3
import struct
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pyarrow as pa
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import strategies as st

from intertie.v1 import common_pb2, ledger_pb2, peer_pb2, site_pb2, tasks_pb2

REPO = Path(__file__).resolve().parent.parent

# Every call is bounded by this (the test and the bench may pass another).
DEADLINE_S = 10.0
# A status message, or a per-task error message, longer than this is a failure: the gateway
# must not repeat a client's 100 KB id back (gRPC refuses metadata past 8-16 KB, and then the
# typed error never arrives).
MAX_DETAILS_CHARS = 2048
# Client-error codes a hostile request may get.
CLEAN_CODES = frozenset({
    "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "UNIMPLEMENTED",
    "OUT_OF_RANGE", "ALREADY_EXISTS", "PERMISSION_DENIED", "UNAUTHENTICATED",
})
FAILURES = ("crash", "hang", "untyped", "bad-data")
# pyarrow's Flight server appends this to the status of anything its Python servicer raises
# ("Failed" for a FlightServerError, "Python exception: ..." for any other exception); a
# status without it comes from Arrow's C++ transport (which, e.g., answers a DoPut whose first
# message is no FlightData with a descriptor and a schema "Stream finished before first
# message sent", "Invalid flatbuffers message." or "Expected IPC message of type schema but
# got record batch", and an envelope that is not valid protobuf INTERNAL with no details).
PYTHON_DETAIL = ". Detail: "
# Text that means an exception escaped raw (pyarrow adds "Python exception: X" to any
# exception that is not a Flight one) or a traceback travelled to the client.
LEAK_MARKERS = ("Traceback (most recent call last)", "Python exception", 'File "/', "\n  File ")
# A stream's answer is read up to this many messages.
MAX_RESPONSES = 10_000
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20),
                   ("grpc.enable_retries", 0)]
PY = f"{sys.version_info.major}.{sys.version_info.minor}"


# ---------------------------------------------------------------------------- wire format
def varint(n: int) -> bytes:
    """Protobuf varint; a negative number as its 64-bit two's complement (10 bytes), as protobuf does."""
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def tag(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


def ld(number: int, payload: bytes) -> bytes:
    """A length-delimited field (string, bytes, message)."""
    return tag(number, 2) + varint(len(payload)) + payload


def vi(number: int, value: int) -> bytes:
    """A varint field."""
    return tag(number, 0) + varint(value)


# ---------------------------------------------------------------------------- Arrow Flight protocol
def _flight_classes() -> dict[str, Any]:
    """The request and reply messages of arrow.flight.protocol.FlightService (Flight.proto),
    as message classes of a private descriptor pool (pyarrow ships no Python protobufs)."""
    T = descriptor_pb2.FieldDescriptorProto
    f = descriptor_pb2.FileDescriptorProto(name="intertie_fuzz/arrow_flight.proto", package="arrow.flight.protocol",
                                           syntax="proto3")

    def message(name: str, *fields: tuple[Any, ...]) -> Any:
        m = f.message_type.add(name=name)
        for fname, number, ftype, *rest in fields:
            fd = m.field.add(name=fname, number=number, type=ftype,
                             label=T.LABEL_REPEATED if "repeated" in rest else T.LABEL_OPTIONAL)
            for extra in rest:
                if extra.startswith("."):
                    fd.type_name = extra
        return m

    message("HandshakeRequest", ("protocol_version", 1, T.TYPE_UINT64), ("payload", 2, T.TYPE_BYTES))
    message("HandshakeResponse", ("protocol_version", 1, T.TYPE_UINT64), ("payload", 2, T.TYPE_BYTES))
    message("Empty")
    message("ActionType", ("type", 1, T.TYPE_STRING), ("description", 2, T.TYPE_STRING))
    message("Criteria", ("expression", 1, T.TYPE_BYTES))
    message("Action", ("type", 1, T.TYPE_STRING), ("body", 2, T.TYPE_BYTES))
    message("Result", ("body", 1, T.TYPE_BYTES))
    desc = message("FlightDescriptor", ("type", 1, T.TYPE_ENUM, ".arrow.flight.protocol.FlightDescriptor.DescriptorType"),
                   ("cmd", 2, T.TYPE_BYTES), ("path", 3, T.TYPE_STRING, "repeated"))
    enum = desc.enum_type.add(name="DescriptorType")
    for number, name in enumerate(("UNKNOWN", "PATH", "CMD")):
        enum.value.add(name=name, number=number)
    message("Ticket", ("ticket", 1, T.TYPE_BYTES))
    message("FlightData", ("flight_descriptor", 1, T.TYPE_MESSAGE, ".arrow.flight.protocol.FlightDescriptor"),
            ("data_header", 2, T.TYPE_BYTES), ("app_metadata", 3, T.TYPE_BYTES), ("data_body", 1000, T.TYPE_BYTES))
    message("PutResult", ("app_metadata", 1, T.TYPE_BYTES))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return {m.name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"arrow.flight.protocol.{m.name}"))
            for m in f.message_type}


FLIGHT = _flight_classes()
FLIGHT_SERVICE = "/arrow.flight.protocol.FlightService/"
CMD = 2  # FlightDescriptor.DescriptorType


def flight_data(header: bytes = b"", body: bytes = b"", descriptor: bytes | None = None,
                app_metadata: bytes = b"") -> bytes:
    """A FlightData message, by hand: 1 flight_descriptor, 2 data_header (an IPC Message
    flatbuffer), 3 app_metadata, 1000 data_body."""
    out = b""
    if descriptor is not None:
        out += ld(1, descriptor)
    if header:
        out += ld(2, header)
    if app_metadata:
        out += ld(3, app_metadata)
    if body:
        out += ld(1000, body)
    return out


def cmd_descriptor(command: bytes) -> bytes:
    """FlightDescriptor{type=CMD, cmd=command}."""
    return vi(1, CMD) + ld(2, command)


# ---------------------------------------------------------------------------- the methods
@dataclass(frozen=True)
class Method:
    name: str  # the row in reports: "TaskService/Submit", "Flight/DoAction(get)"
    path: str  # the gRPC method path
    request: Any  # the request message class
    client_streaming: bool
    server_streaming: bool
    flight: bool = False
    # A long-lived server stream (Watch): its first message is the answer; the call is then cancelled.
    first_only: bool = False
    action: str = ""  # Flight/DoAction rows: the action type ("" for hostile types)


def _grpc_methods() -> dict[str, Method]:
    out: dict[str, Method] = {}
    for module, service in ((tasks_pb2, "TaskService"), (site_pb2, "SiteService"), (peer_pb2, "PeerService"),
                            (ledger_pb2, "LedgerService"), (health_pb2, "Health"), (reflection_pb2, "ServerReflection")):
        sd = module.DESCRIPTOR.services_by_name[service]
        for md in sd.methods:
            name = f"{service}/{md.name}"
            out[name] = Method(name, f"/{sd.full_name}/{md.name}", message_factory.GetMessageClass(md.input_type),
                               md.client_streaming, md.server_streaming,
                               first_only=md.server_streaming and not md.client_streaming and md.name == "Watch")
    return out


def _flight_methods() -> dict[str, Method]:
    def m(name: str, rpc: str, request: str, cs: bool, ss: bool, action: str = "") -> Method:
        return Method(name, FLIGHT_SERVICE + rpc, FLIGHT[request], cs, ss, flight=True, action=action)

    rows = [
        m("Flight/DoGet", "DoGet", "Ticket", False, True),
        m("Flight/DoPut(descriptor)", "DoPut", "FlightData", True, True),
        m("Flight/DoPut(ipc)", "DoPut", "FlightData", True, True),
        m("Flight/DoAction(get)", "DoAction", "Action", False, True, "get"),
        m("Flight/DoAction(delete)", "DoAction", "Action", False, True, "delete"),
        m("Flight/DoAction(delete-replica)", "DoAction", "Action", False, True, "delete-replica"),
        m("Flight/DoAction(other)", "DoAction", "Action", False, True),
        m("Flight/ListFlights", "ListFlights", "Criteria", False, True),
        m("Flight/ListActions", "ListActions", "Empty", False, True),
        m("Flight/GetFlightInfo", "GetFlightInfo", "FlightDescriptor", False, False),
        m("Flight/PollFlightInfo", "PollFlightInfo", "FlightDescriptor", False, False),
        m("Flight/GetSchema", "GetSchema", "FlightDescriptor", False, False),
        m("Flight/DoExchange", "DoExchange", "FlightData", True, True),
        m("Flight/Handshake", "Handshake", "HandshakeRequest", True, True),
    ]
    return {r.name: r for r in rows}


GRPC_METHODS = _grpc_methods()
FLIGHT_METHODS = _flight_methods()
METHODS = {**GRPC_METHODS, **FLIGHT_METHODS}
GRPC_METHOD_NAMES = list(GRPC_METHODS)
FLIGHT_METHOD_NAMES = list(FLIGHT_METHODS)


# ---------------------------------------------------------------------------- cases and outcomes
@dataclass(frozen=True)
class Case:
    """One hostile request: the messages sent (one for a unary request)."""

    method: str
    messages: tuple[bytes, ...]
    note: str = ""  # which generator made it, and how
    verify_put: bool = False  # a DoPut whose stored result is read back and checked

    @property
    def size(self) -> int:
        return sum(len(m) for m in self.messages)

    @property
    def digest(self) -> str:
        h = hashlib.sha256(self.method.encode())
        for m in self.messages:
            h.update(len(m).to_bytes(8, "little") + m)
        return h.hexdigest()[:16]

    def __repr__(self) -> str:  # what hypothesis prints for a failing example: short
        first = self.messages[0] if self.messages else b""
        return (f"Case({self.method!r}, {len(self.messages)} messages, {self.size} bytes, sha {self.digest}, "
                f"note={self.note[:300]!r}, first={first[:120]!r}{'...' if len(first) > 120 else ''})")

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # hypothesis' printer: the short form too
        printer.text(repr(self))

    def save(self, folder: Path) -> Path:
        """Writes the case whole (for ``bench/fuzz.py --replay``)."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.method.replace('/', '_')}-{self.digest}.case"
        path.write_bytes(pickle.dumps({"method": self.method, "messages": list(self.messages), "note": self.note,
                                       "verify_put": self.verify_put}))
        return path

    @staticmethod
    def load(path: Path) -> Case:
        raw = pickle.loads(Path(path).read_bytes())
        return Case(raw["method"], tuple(raw["messages"]), raw["note"], raw["verify_put"])


@dataclass
class Outcome:
    case: Case
    kind: str  # ok | typed | transport | restart | untyped | bad-data | hang | crash
    code: str = "OK"
    details: str = ""
    why: str = ""
    elapsed: float = 0.0
    saved: Path | None = None

    @property
    def failed(self) -> bool:
        return self.kind in FAILURES

    def report(self) -> str:
        lines = [f"{self.case.method}: {self.kind} ({self.why or self.code})",
                 f"  status {self.code}: {self.details[:400]!r}{'...' if len(self.details) > 400 else ''} "
                 f"({len(self.details)} chars), after {self.elapsed:.2f} s",
                 f"  input: {self.case!r}"]
        if self.saved is not None:
            lines.append(f"  saved whole: {self.saved} (replay: .venv/bin/python bench/fuzz.py --replay {self.saved})")
        return "\n".join(lines)


def _parses(cls: Any, data: bytes) -> Any:
    try:
        return cls.FromString(data)
    except Exception:
        return None


def judge_status(method: Method, case: Case, code: str, details: str) -> tuple[str, str]:
    """(kind, why) of a failed call's status."""
    if code == "DEADLINE_EXCEEDED":
        return "hang", "no answer before the deadline"
    if len(details) > MAX_DETAILS_CHARS:
        return "untyped", f"status details of {len(details)} chars"
    if "metadata size exceeds" in details:
        return "untyped", "the error was too large for gRPC's metadata limit and never arrived"
    for marker in LEAK_MARKERS:
        if marker in details:
            return "untyped", f"a raw exception or traceback in the details ({marker!r})"
    if method.flight:
        if details.startswith("ERROR_KIND_"):
            kind = details.split(":", 1)[0]
            if kind == "ERROR_KIND_INTERNAL":
                return "untyped", "the gateway failed on this input (ERROR_KIND_INTERNAL)"
            return "typed", kind
        if code in CLEAN_CODES:  # Arrow's own: "Client sent UNKNOWN descriptor type", no Handshake...
            return "typed", code
        if code in ("UNKNOWN", "INTERNAL") and PYTHON_DETAIL not in details:
            # pyarrow's server appends ". Detail: ..." to whatever the Python servicer raises:
            # without it, Arrow's C++ layer answered before (or without) any gateway code.
            return "transport", f"Arrow's transport: {details or 'the request did not parse'}"
        if code == "UNAVAILABLE":
            return "restart", "the data plane died on this input or was restarting; the gateway served on"
        return "untyped", f"a Flight error ({code}) without the ERROR_KIND_ prefix"
    if code in CLEAN_CODES:
        return "typed", code
    if code == "UNAVAILABLE":
        return "untyped", "UNAVAILABLE from a gateway that is still running"
    if code == "INTERNAL":
        return "untyped", "INTERNAL: the gateway failed on the client's input"
    return "untyped", f"status {code}"


def _check_acks(acks: Sequence[Any], tasks: int | None) -> str | None:
    if tasks is not None and len(acks) != tasks:
        return f"{len(acks)} acks for {tasks} tasks"
    for ack in acks:
        if len(ack.error.message) > MAX_DETAILS_CHARS:
            return f"a per-task error message of {len(ack.error.message)} chars"
        if any(marker in ack.error.message for marker in LEAK_MARKERS):
            return "a traceback in a per-task error message"
        if len(ack.task_id) > 4 * 1024 and not ack.accepted:
            return f"a refused task's id echoed whole ({len(ack.task_id)} chars)"
    return None


# ---------------------------------------------------------------------------- Arrow IPC
@dataclass(frozen=True)
class IpcMessage:
    """One IPC message of a stream: its flatbuffer metadata and its body."""

    kind: str  # "schema", "dictionary", "record batch"
    header: bytes
    body: bytes


def _u32(b: bytes, o: int) -> int:
    return struct.unpack_from("<I", b, o)[0]


def _i32(b: bytes, o: int) -> int:
    return struct.unpack_from("<i", b, o)[0]


def _field_pos(b: bytes, table: int, index: int) -> int | None:
    """Where field ``index`` of the flatbuffer table at ``table`` is, or None (absent)."""
    vtable = table - _i32(b, table)
    size = struct.unpack_from("<H", b, vtable)[0]
    if 4 + 2 * index >= size:
        return None
    off = struct.unpack_from("<H", b, vtable + 4 + 2 * index)[0]
    return table + off if off else None


@dataclass(frozen=True)
class Layout:
    """Positions, in a record/dictionary batch's metadata, of what corruption patches."""

    length: int | None  # the RecordBatch's length (int64)
    nodes: tuple[int, ...]  # FieldNode structs {length: int64, null_count: int64}
    buffers: tuple[int, ...]  # Buffer structs {offset: int64, length: int64}
    dictionary_id: int | None = None

    def buffer(self, header: bytes, i: int) -> tuple[int, int]:
        return struct.unpack_from("<qq", header, self.buffers[i])


def layout(header: bytes) -> Layout | None:
    """Parses a Message flatbuffer (Message: version, header_type, header, bodyLength; a
    RecordBatch: length, nodes, buffers; a DictionaryBatch: id, data)."""
    b = header
    root = _u32(b, 0)
    type_pos = _field_pos(b, root, 1)
    header_type = b[type_pos] if type_pos is not None else 0
    pos = _field_pos(b, root, 2)
    if pos is None or header_type not in (2, 3):  # DictionaryBatch, RecordBatch
        return None
    table = pos + _u32(b, pos)
    dictionary_id = None
    if header_type == 2:
        id_pos = _field_pos(b, table, 0)
        dictionary_id = struct.unpack_from("<q", b, id_pos)[0] if id_pos is not None else 0
        pos = _field_pos(b, table, 1)
        table = pos + _u32(b, pos)

    def vector(index: int) -> tuple[int, ...]:
        p = _field_pos(b, table, index)
        if p is None:
            return ()
        v = p + _u32(b, p)
        return tuple(v + 4 + 16 * i for i in range(_u32(b, v)))

    return Layout(_field_pos(b, table, 0), vector(1), vector(2), dictionary_id)


def buffer_roles(t: pa.DataType) -> list[tuple[str, int]]:
    """The buffers an IPC record batch carries for a column of type ``t``, in order: (role, bit width)."""
    v = ("validity", 1)
    if pa.types.is_dictionary(t):
        return [v, ("indices", t.index_type.bit_width)]
    if pa.types.is_boolean(t):
        return [v, ("data", 1)]
    if pa.types.is_string(t):
        return [v, ("offsets", 32), ("utf8", 8)]
    if pa.types.is_large_string(t):
        return [v, ("offsets", 64), ("utf8", 8)]
    if pa.types.is_binary(t):
        return [v, ("offsets", 32), ("data", 8)]
    if pa.types.is_large_binary(t):
        return [v, ("offsets", 64), ("data", 8)]
    if pa.types.is_map(t):
        return [v, ("offsets", 32), v, *buffer_roles(t.key_type), *buffer_roles(t.item_type)]
    if pa.types.is_list(t):
        return [v, ("offsets", 32), *buffer_roles(t.value_type)]
    if pa.types.is_large_list(t):
        return [v, ("offsets", 64), *buffer_roles(t.value_type)]
    if pa.types.is_fixed_size_list(t):
        return [v, *buffer_roles(t.value_type)]
    if pa.types.is_struct(t):
        return [v, *(r for i in range(t.num_fields) for r in buffer_roles(t.field(i).type))]
    if pa.types.is_union(t):
        dense = t.mode == "dense"
        children = [r for i in range(t.num_fields) for r in buffer_roles(t.field(i).type)]
        return [("types", 8), *([("union_offsets", 32)] if dense else []), *children]
    if pa.types.is_fixed_size_binary(t) or pa.types.is_decimal(t):
        return [v, ("data", t.byte_width * 8)]
    return [v, ("data", t.bit_width)]


def _dictionary_types(schema: pa.Schema) -> list[pa.DataType]:
    """Value types of the schema's dictionaries, by dictionary id (pyarrow numbers them depth first)."""
    out: list[pa.DataType] = []

    def walk(t: pa.DataType) -> None:
        if pa.types.is_dictionary(t):
            out.append(t.value_type)
            walk(t.value_type)
        elif pa.types.is_map(t):
            walk(t.key_type)
            walk(t.item_type)
        elif hasattr(t, "num_fields") and not pa.types.is_dictionary(t):
            for i in range(t.num_fields):
                walk(t.field(i).type)
        elif hasattr(t, "value_type"):
            walk(t.value_type)

    for f in schema:
        walk(f.type)
    return out


@dataclass(frozen=True)
class BaseStream:
    name: str
    schema: pa.Schema
    batches: tuple[pa.RecordBatch, ...]
    messages: tuple[IpcMessage, ...]

    def roles(self, message: IpcMessage) -> list[tuple[str, int]]:
        lay = layout(message.header)
        if lay is None:
            return []
        if lay.dictionary_id is not None:
            return buffer_roles(_dictionary_types(self.schema)[lay.dictionary_id])
        return [r for f in self.schema for r in buffer_roles(f.type)]

    @property
    def nbytes(self) -> int:
        return sum(len(m.header) + len(m.body) for m in self.messages)


def ipc_messages(schema: pa.Schema, batches: Sequence[pa.RecordBatch]) -> tuple[IpcMessage, ...]:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
    kinds = {"schema": "schema", "dictionary batch": "dictionary", "record batch": "record batch"}
    return tuple(IpcMessage(kinds.get(m.type, m.type), m.metadata.to_pybytes(),
                            m.body.to_pybytes() if m.body is not None else b"")
                 for m in pa.ipc.MessageReader.open_stream(sink.getvalue()))


@functools.cache
def base_streams() -> dict[str, BaseStream]:
    """Small valid streams, one per kind of column whose buffers can lie (offsets, validity,
    UTF-8, dictionary indices, union type ids), two batches each."""
    n = 6
    union = pa.UnionArray.from_dense(pa.array([0, 1, 0, 1, 1, 0], pa.int8()), pa.array([0, 0, 1, 1, 2, 2], pa.int32()),
                                     [pa.array([1, 2, 3], pa.int32()), pa.array(["a", "bb", None])], ["i", "s"])
    columns: dict[str, pa.Array] = {
        "list<int32>": pa.array([[1, 2, 3], [], None, [4], [5, 6], [7]], pa.list_(pa.int32())),
        "large_list<int64>": pa.array([[1], None, [2, 3], [], [4, 5, 6], [7]], pa.large_list(pa.int64())),
        "string": pa.array(["alpha", None, "", "βγ", "delta", "e"]),
        "large_string": pa.array(["a", "bb", None, "ccc", "", "dddd"], pa.large_string()),
        "binary": pa.array([b"\x00", None, b"ab", b"", b"cde", b"f"], pa.binary()),
        "large_binary": pa.array([b"1", b"22", b"", None, b"333", b"4"], pa.large_binary()),
        "dictionary<int32,string>": pa.array(["x", "y", None, "x", "z", "y"]).dictionary_encode(),
        "struct": pa.array([{"a": 1, "b": "p", "c": [1, 2]}, None, {"a": 3, "b": "qq", "c": []},
                            {"a": None, "b": None, "c": None}, {"a": 5, "b": "r", "c": [3]},
                            {"a": 6, "b": "", "c": [4, 5]}],
                           pa.struct([("a", pa.int32()), ("b", pa.string()), ("c", pa.list_(pa.int8()))])),
        "map<string,int32>": pa.array([[("k", 1)], None, [], [("a", 2), ("b", 3)], [("c", 4)], [("d", None)]],
                                      pa.map_(pa.string(), pa.int32())),
        "fixed_size_list<int16,3>": pa.array([[1, 2, 3], None, [4, 5, 6], [7, 8, 9], [0, 0, 0], [1, 1, 1]],
                                             pa.list_(pa.int16(), 3)),
        "list<list<string>>": pa.array([[["a"], ["b", "c"]], None, [], [[]], [["d", None]], [["e"]]],
                                       pa.list_(pa.list_(pa.string()))),
        "dense_union": union,
        "primitives": pa.array([{"i": 1, "f": 0.5, "b": True}, {"i": None, "f": None, "b": None},
                                {"i": 3, "f": -1.0, "b": False}, {"i": 4, "f": 2.0, "b": True},
                                {"i": 5, "f": math.inf, "b": False}, {"i": 6, "f": 0.0, "b": True}],
                               pa.struct([("i", pa.int64()), ("f", pa.float64()), ("b", pa.bool_())])),
    }
    out: dict[str, BaseStream] = {}
    for name, array in columns.items():
        assert len(array) == n
        table = pa.table({"v": array})
        out[name] = _base(name, table)
    out["mixed"] = _base("mixed", pa.table({name.split("<")[0]: array for name, array in columns.items()
                                            if name not in ("dense_union",)}))
    return out


def _base(name: str, table: pa.Table) -> BaseStream:
    batches = tuple(table.to_batches(max_chunksize=3))
    stream = BaseStream(name, table.schema, batches, ipc_messages(table.schema, batches))
    for message in stream.messages:  # the role map must match what pyarrow wrote
        lay = layout(message.header)
        if lay is not None and len(lay.buffers) != len(stream.roles(message)):
            raise AssertionError(f"base stream {name}: {len(lay.buffers)} buffers in a {message.kind}, "
                                 f"{len(stream.roles(message))} expected")
    return stream


def put_messages(messages: Sequence[IpcMessage], command: bytes = b'{"name": "fuzz-put"}',
                 descriptor: bytes | None = None) -> tuple[bytes, ...]:
    """A DoPut request stream: the descriptor rides on the first FlightData (with the schema)."""
    first = descriptor if descriptor is not None else cmd_descriptor(command)
    if not messages:
        return (flight_data(descriptor=first),)
    return tuple(flight_data(m.header, m.body, first if i == 0 else None) for i, m in enumerate(messages))


# --- corruption of valid streams
OFFSET_HOWS = ("past_end", "far_past", "max", "negative", "min", "backwards", "huge_step")
NODE_HOWS = ("+1", "x1000", "-1", "2^31", "2^62", "0")
BUFFER_HOWS = ("past_body", "at_body_end", "-8", "2^62", "misaligned", "zero", "x2", "-1")
IPC_OPS = ("offset", "offset", "offset", "validity", "utf8", "indices", "union", "node_length", "node_nulls",
           "buffer_offset", "buffer_length", "batch_length", "body_bytes", "body_truncate", "header_flip",
           "header_truncate", "schema_flip", "drop", "dup", "swap", "foreign", "body_on_schema")
STREAM_OPS = ("schema_flip", "drop", "dup", "swap", "foreign", "body_on_schema")


def _clamp(value: int, bits: int) -> int:
    lim = (1 << (bits - 1)) - 1
    return max(-lim - 1, min(lim, value))


def corrupt(base: BaseStream, target: int, ops: Sequence[tuple[Any, ...]]) -> tuple[list[IpcMessage], str]:
    """Applies ``ops`` to message ``target`` (mod the batches) of a valid stream; returns the
    stream and what was done. An op that does not apply (no such buffer, a region already cut
    off) is skipped; truncations are applied after the patches."""
    messages = list(base.messages)
    batch_indices = [i for i, m in enumerate(messages) if m.kind != "schema"]
    index = batch_indices[target % len(batch_indices)]
    message = messages[index]
    roles = base.roles(message)
    lay = layout(message.header)
    assert lay is not None
    header, body = bytearray(message.header), bytearray(message.body)
    done: list[str] = []

    def buffers_with(*wanted: str) -> list[int]:
        return [i for i, (role, _) in enumerate(roles) if role in wanted and lay.buffer(message.header, i)[1] > 0]

    def int64(pos: int, value: int | None = None) -> int:
        """Reads (and with ``value``, writes) an int64 of the header."""
        cur = struct.unpack_from("<q", header, pos)[0]
        if value is not None:
            struct.pack_into("<q", header, pos, value)
        return int(cur)

    def patch(kind: str, a: int, b: int, c: int) -> str | None:
        if kind in ("offset", "indices", "union"):
            wanted = {"offset": ("offsets",), "indices": ("indices",), "union": ("types", "union_offsets")}[kind]
            candidates = buffers_with(*wanted)
            if not candidates:
                return None
            i = candidates[a % len(candidates)]
            offset, length = lay.buffer(message.header, i)
            bits = roles[i][1]
            size = bits // 8
            count = length // size
            if count == 0 or offset + length > len(body):
                return None
            elem = (count - 1, 0, b % count)[c % 3]
            fmt = {8: "<b", 32: "<i", 64: "<q"}[bits]
            pos = offset + elem * size
            cur = struct.unpack_from(fmt, body, pos)[0]
            prev = struct.unpack_from(fmt, body, pos - size)[0] if elem else 0
            if kind == "offset" or roles[i][0] == "union_offsets":
                how = OFFSET_HOWS[b % len(OFFSET_HOWS)]
                value = {"past_end": cur + 1, "far_past": cur + 1000, "max": (1 << (bits - 1)) - 1, "negative": -1,
                         "min": -(1 << (bits - 1)), "backwards": prev - 1, "huge_step": cur + (1 << 20)}[how]
            else:  # dictionary indices, union type ids
                how = ("big", "negative", "max", "one_past")[b % 4]
                value = {"big": 100, "negative": -1, "max": (1 << (bits - 1)) - 1, "one_past": cur + 3}[how]
            value = _clamp(value, bits)
            struct.pack_into(fmt, body, pos, value)
            return f"{kind}(buffer {i} {roles[i][0]}, element {elem}/{count}: {cur} -> {value})"
        if kind in ("validity", "utf8"):
            candidates = buffers_with("validity") if kind == "validity" else buffers_with("utf8")
            if not candidates:
                return None
            i = candidates[a % len(candidates)]
            offset, length = lay.buffer(message.header, i)
            if offset + length > len(body):
                return None
            pos = offset + b % length
            if kind == "validity":
                mode = c % 3
                if mode == 0:
                    body[pos] ^= 1 << (b % 8)
                else:
                    body[offset:offset + length] = (b"\x00" if mode == 1 else b"\xff") * length
                return f"validity(buffer {i}, {('flip a bit', 'all null', 'all valid')[mode]})"
            bad = (b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\x80")[c % 4]
            body[pos:pos + len(bad)] = bad[:max(0, offset + length - pos)]
            return f"utf8(buffer {i}, byte {pos - offset}: {bad!r})"
        if kind in ("node_length", "node_nulls", "batch_length"):
            if kind == "batch_length":
                if lay.length is None:
                    return None
                pos, what = lay.length, "batch_length"
            else:
                if not lay.nodes:
                    return None
                pos = lay.nodes[a % len(lay.nodes)] + (0 if kind == "node_length" else 8)
                what = f"{kind}(node {a % len(lay.nodes)})"
            cur = int64(pos)
            how = NODE_HOWS[b % len(NODE_HOWS)]
            value = {"+1": cur + 1, "x1000": cur * 1000 + 1, "-1": -1, "2^31": 1 << 31, "2^62": 1 << 62, "0": 0}[how]
            int64(pos, _clamp(value, 64))
            return f"{what}: {cur} -> {_clamp(value, 64)}"
        if kind in ("buffer_offset", "buffer_length"):
            if not lay.buffers:
                return None
            i = a % len(lay.buffers)
            pos = lay.buffers[i] + (0 if kind == "buffer_offset" else 8)
            cur = int64(pos)
            how = BUFFER_HOWS[b % len(BUFFER_HOWS)]
            value = {"past_body": len(body) + 64, "at_body_end": len(body), "-8": -8, "2^62": 1 << 62,
                     "misaligned": cur + 1, "zero": 0, "x2": cur * 2 + 8, "-1": -1}[how]
            int64(pos, _clamp(value, 64))
            return f"{kind}(buffer {i} {roles[i][0] if i < len(roles) else '?'}: {cur} -> {value})"
        if kind == "body_bytes":
            if not body:
                return None
            pos = a % len(body)
            body[pos:pos + 4] = struct.pack("<I", (b << 16 | c) & 0xFFFFFFFF)[:len(body) - pos]
            return f"body_bytes(at {pos})"
        if kind == "header_flip":
            pos = a % len(header)
            header[pos] ^= 1 << (b % 8)
            return f"header_flip(byte {pos} bit {b % 8})"
        if kind == "body_truncate":
            keep = a % (len(body) + 1)
            del body[keep:]
            return f"body_truncate(to {keep})"
        if kind == "header_truncate":
            keep = a % len(header)
            del header[keep:]
            return f"header_truncate(to {keep})"
        return None

    stream_ops = [op for op in ops if op[0] in STREAM_OPS]
    patches = [op for op in ops if op[0] not in STREAM_OPS]
    patches = [op for op in patches if not op[0].endswith("_truncate")] + \
        [op for op in patches if op[0].endswith("_truncate")]
    for op in patches:
        try:
            what = patch(*op)
        except (struct.error, IndexError, ZeroDivisionError):
            what = f"{op[0]}(does not apply)"
        if what:
            done.append(what)
    messages[index] = IpcMessage(message.kind, bytes(header), bytes(body))
    for kind, a, b, c in stream_ops:
        if kind == "schema_flip" and messages[0].header:
            schema = bytearray(messages[0].header)
            pos = a % len(schema)
            schema[pos] ^= 1 << (b % 8)
            messages[0] = IpcMessage("schema", bytes(schema), messages[0].body)
            done.append(f"schema_flip(byte {pos} bit {b % 8})")
        elif kind == "drop" and len(messages) > 1:
            i = a % len(messages)
            done.append(f"drop(message {i}: {messages[i].kind})")
            del messages[i]
        elif kind == "dup" and messages:
            i = a % len(messages)
            messages.insert(i, messages[i])
            done.append(f"dup(message {i}: {messages[i].kind})")
        elif kind == "swap" and len(messages) > 1:
            i, j = a % len(messages), b % len(messages)
            messages[i], messages[j] = messages[j], messages[i]
            done.append(f"swap({i}, {j})")
        elif kind == "foreign":
            others = sorted(base_streams())
            other = base_streams()[others[a % len(others)]]
            extra = [m for m in other.messages if m.kind != "schema"]
            messages.append(extra[b % len(extra)])
            done.append(f"foreign({other.name} {extra[b % len(extra)].kind})")
        elif kind == "body_on_schema" and messages:
            messages[0] = IpcMessage(messages[0].kind, messages[0].header, bytes([b % 256]) * (1 + c * 64))
            done.append("body_on_schema")
    return messages, f"{base.name} message {index}: " + (", ".join(done) or "no-op")


# ---------------------------------------------------------------------------- primitive strategies
SIZES = (0, 1, 63, 64, 65, 127, 128, 129, 256, 257, 1000, 4096, 4097, 65_536, 100_000)
MANY = (1000, 10_000, 100_001)
MANY_BYTES = 8 << 20  # what a "many items" request may weigh
CHUNKS = ("a", "0", "é", "🙂", "\x00", "/", "../", "%s", "\u202e", "-", " ", "\n", "{", "\"", "'")
INTERESTING_TEXT = ("", " ", "\x00", "..", "../../etc/passwd", "/", "%s%s%n", "'; DROP TABLE tasks;--", "null",
                    "undefined", "\u202eevil", "🙂", "\ufeff", "quote", "shared", "fuzz", "test",
                    "peer:fuzz:secret", "3.11", "3.12", "x86_64", "T4", "CPU", "GPU", "memory", "NaN", "-1", "1e309",
                    "intertie.v1.TaskService", "grpc.health.v1.Health", "fuzz-base", "fuzz-base-name")


def _repeat(unit: Any, n: int) -> Any:
    return unit * n


def valid_ids() -> st.SearchStrategy[str]:
    return st.one_of(st.uuids().map(lambda u: u.hex), st.from_regex(r"[A-Za-z0-9._:-]{1,128}", fullmatch=True))


def small_text() -> st.SearchStrategy[str]:
    return st.one_of(st.text(max_size=8), st.sampled_from(INTERESTING_TEXT[:20]))


def hostile_text(max_size: int = 100_000) -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(max_size=24),
        st.sampled_from(INTERESTING_TEXT),
        st.builds(_repeat, st.sampled_from(CHUNKS), st.sampled_from([s for s in SIZES if s <= max_size])),
        valid_ids(),
    )


def hostile_bytes(max_size: int = 100_000) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=32),
        st.builds(_repeat, st.sampled_from([b"\x00", b"\xff", b"a", b"\x80", b"{"]),
                  st.sampled_from([s for s in SIZES if s <= max_size])),
        hostile_text(max_size).map(lambda s: s.encode()),
    )


def hostile_int(bits: int, signed: bool) -> st.SearchStrategy[int]:
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    edges = sorted({v for v in (0, 1, -1, 2, 100, 10_000, 100_001, lo, hi, lo + 1, hi - 1, 1 << 31, (1 << 31) - 1,
                                -(1 << 31), 1 << 32, 1 << 53, (1 << 53) + 1) if lo <= v <= hi})
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi))


SPECIAL_FLOATS = (0.0, -0.0, 1.0, -1.0, 0.5, math.nan, -math.nan, math.inf, -math.inf, 5e-324, -5e-324,
                  1.7976931348623157e308, -1.7976931348623157e308, 1e-300, 1e300, 2.0 ** 53, 2.0 ** 63, 2.0 ** 64)


def hostile_double() -> st.SearchStrategy[float]:
    return st.one_of(st.sampled_from(SPECIAL_FLOATS), st.floats())


def hostile_float32() -> st.SearchStrategy[float]:
    return st.one_of(st.sampled_from((0.0, -0.0, 1.0, -1.0, math.nan, math.inf, -math.inf, 3.4e38, -3.4e38, 1e-45)),
                     st.floats(width=32))


# ---------------------------------------------------------------------------- messages from descriptors
_INT_TYPES = {
    FieldDescriptor.TYPE_INT32: (32, True), FieldDescriptor.TYPE_SINT32: (32, True),
    FieldDescriptor.TYPE_SFIXED32: (32, True), FieldDescriptor.TYPE_INT64: (64, True),
    FieldDescriptor.TYPE_SINT64: (64, True), FieldDescriptor.TYPE_SFIXED64: (64, True),
    FieldDescriptor.TYPE_UINT32: (32, False), FieldDescriptor.TYPE_FIXED32: (32, False),
    FieldDescriptor.TYPE_UINT64: (64, False), FieldDescriptor.TYPE_FIXED64: (64, False),
}
MAX_DEPTH = 5


def _is_map(f: FieldDescriptor) -> bool:
    return f.type == FieldDescriptor.TYPE_MESSAGE and f.message_type.GetOptions().map_entry


def _single(f: FieldDescriptor, depth: int, small: bool) -> st.SearchStrategy[Any] | None:
    t = f.type
    if t == FieldDescriptor.TYPE_STRING:
        return small_text() if small else hostile_text()
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=8) if small else hostile_bytes()
    if t in _INT_TYPES:
        return hostile_int(*_INT_TYPES[t])
    if t == FieldDescriptor.TYPE_DOUBLE:
        return hostile_double()
    if t == FieldDescriptor.TYPE_FLOAT:
        return hostile_float32()
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in f.enum_type.values]
        return st.one_of(st.sampled_from(known), hostile_int(32, True))
    if t == FieldDescriptor.TYPE_MESSAGE:
        return None if depth >= MAX_DEPTH else message_values(f.message_type, depth + 1, small)
    return None


def _field(f: FieldDescriptor, depth: int, small: bool) -> st.SearchStrategy[Any] | None:
    if _is_map(f):
        kf, vf = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
        keys, values = _single(kf, depth, small), _single(vf, depth, small)
        unit = _single(vf, depth, True)
        if keys is None or values is None or unit is None:
            return None
        few = st.dictionaries(keys, values, max_size=4)
        if small or kf.type != FieldDescriptor.TYPE_STRING:
            return few
        return st.one_of(few, st.builds(lambda v, n: {f"k{i}": v for i in range(n)}, unit, st.sampled_from(MANY)))
    one = _single(f, depth, small)
    if one is None:
        return None
    if not f.is_repeated:
        return one
    few = st.lists(one, max_size=4)
    unit = _single(f, depth, True)
    if small or unit is None:
        return few
    counts = MANY if f.type != FieldDescriptor.TYPE_MESSAGE else (100, 1000, 10_000)
    return st.one_of(few, st.builds(lambda x, n: [x] * n, unit, st.sampled_from(counts)))


@functools.cache
def message_values(desc: Descriptor, depth: int = 0, small: bool = False) -> st.SearchStrategy[dict[str, Any]]:
    """Field values for a message of type ``desc``: any subset of its fields, each hostile."""
    fields = {}
    for f in desc.fields:
        s = _field(f, depth, small)
        if s is not None:
            fields[f.name] = s
    return st.fixed_dictionaries({}, optional=fields)


def fill(msg: Any, values: dict[str, Any]) -> Any:
    """Sets ``values`` on ``msg`` (what the protobuf library refuses to hold is left out)."""
    for name, value in values.items():
        f = msg.DESCRIPTOR.fields_by_name[name]
        try:
            if _is_map(f):
                target = getattr(msg, name)
                nested = f.message_type.fields_by_name["value"].type == FieldDescriptor.TYPE_MESSAGE
                for k, v in value.items():
                    if nested:
                        fill(target[k], v)
                    else:
                        target[k] = v
            elif f.is_repeated:
                target = getattr(msg, name)
                if f.type == FieldDescriptor.TYPE_MESSAGE:
                    for v in value:
                        fill(target.add(), v)
                else:
                    target.extend(value)
            elif f.type == FieldDescriptor.TYPE_MESSAGE:
                getattr(msg, name).SetInParent()
                fill(getattr(msg, name), value)
            else:
                setattr(msg, name, value)
        except (ValueError, TypeError, OverflowError):
            pass
    return msg


def generic_messages(cls: Any) -> st.SearchStrategy[bytes]:
    """(b) structurally valid messages of ``cls`` with hostile values, serialized."""
    return message_values(cls.DESCRIPTOR).map(lambda v: fill(cls(), v).SerializeToString())


def random_bytes() -> st.SearchStrategy[bytes]:
    """(a)"""
    return st.one_of(st.binary(max_size=64), st.binary(min_size=64, max_size=2048),
                     st.sampled_from([b"", b"\xff\xfe\x00garbage\x12\x34", b"\x0a\xff\xff\xff\xff\x0f", b"\x08" * 11]))


MUTATIONS = ("flip", "flip", "byte", "truncate", "insert", "delete", "dup", "varint")


def mutate(data: bytes, ops: Sequence[tuple[str, int, int]]) -> bytes:
    """(c) bit flips, byte writes, truncation, insertions, deletions, duplications, overlong varints."""
    b = bytearray(data)
    for kind, where, value in ops:
        pos = where % (len(b) + 1)
        if kind == "flip" and b:
            b[min(pos, len(b) - 1)] ^= 1 << (value % 8)
        elif kind == "byte" and b:
            b[min(pos, len(b) - 1)] = value % 256
        elif kind == "truncate":
            del b[pos:]
        elif kind == "insert":
            b[pos:pos] = bytes([value % 256]) * (1 + value % 7)
        elif kind == "delete":
            del b[pos:pos + 1 + value % 16]
        elif kind == "dup":
            b[pos:pos] = b[pos:pos + 1 + value % 32]
        elif kind == "varint":
            b[pos:pos] = b"\xff" * (1 + value % 11)
    return bytes(b)


def mutation_ops() -> st.SearchStrategy[list[tuple[str, int, int]]]:
    return st.lists(st.tuples(st.sampled_from(MUTATIONS), st.integers(0, 1 << 20), st.integers(0, 255)),
                    min_size=1, max_size=4)


QUIRKS = ("bad_utf8", "wrong_wire", "unknown_field", "deep_group", "huge_field_number", "field_zero",
          "bad_wire_type", "overlong_varint", "length_past_end", "negative_length", "end_group_alone")


@st.composite
def wire_quirks(draw: st.DrawFn, desc: Descriptor) -> bytes:
    """(d) valid-looking fields that protobuf parsers must refuse or skip."""
    fields = list(desc.fields)
    strings = [f for f in fields if f.type == FieldDescriptor.TYPE_STRING
               or (f.type == FieldDescriptor.TYPE_MESSAGE and any(g.type == FieldDescriptor.TYPE_STRING
                                                                   for g in f.message_type.fields))]
    parts = []
    for quirk in draw(st.lists(st.sampled_from(QUIRKS), min_size=1, max_size=3)):
        number = draw(st.sampled_from([f.number for f in fields])) if fields else draw(st.integers(1, 20))
        if quirk == "bad_utf8" and strings:
            f = draw(st.sampled_from(strings))
            bad = draw(st.sampled_from([b"\xff\xfe", b"\xc0\x80", b"\xed\xa0\x80", b"a\x80", b"\xf4\x90\x80\x80"]))
            if f.type == FieldDescriptor.TYPE_STRING:
                parts.append(ld(f.number, bad))
            else:  # a string inside a message field
                inner = next(g for g in f.message_type.fields if g.type == FieldDescriptor.TYPE_STRING)
                parts.append(ld(f.number, ld(inner.number, bad)))
        elif quirk in ("wrong_wire", "bad_utf8"):
            parts.append(vi(number, 1) if draw(st.booleans()) else ld(number, b"\x01\x02"))
            parts.append(tag(number, 5) + b"\x00\x00\x80\x7f")
        elif quirk == "unknown_field":
            n = draw(st.integers(1000, (1 << 29) - 1))
            parts.append(ld(n, draw(st.binary(max_size=64))) if draw(st.booleans()) else vi(n, draw(st.integers(0, 1 << 63))))
        elif quirk == "deep_group":
            depth = draw(st.sampled_from([50, 99, 100, 101, 1000, 100_000]))
            parts.append(tag(number, 3) * depth + tag(number, 4) * depth)
        elif quirk == "huge_field_number":
            parts.append(vi((1 << 29) - 1, 1))
        elif quirk == "field_zero":
            parts.append(b"\x00\x01")
        elif quirk == "bad_wire_type":
            parts.append(bytes([(number << 3 | draw(st.sampled_from([6, 7]))) & 0x7F]) + b"\x01")
        elif quirk == "overlong_varint":
            parts.append(tag(number, 0) + b"\xff" * draw(st.sampled_from([9, 10, 11, 20])) + b"\x01")
        elif quirk == "length_past_end":
            parts.append(tag(number, 2) + varint(draw(st.sampled_from([1000, 1 << 31, (1 << 32) + 5]))) + b"abc")
        elif quirk == "negative_length":
            parts.append(tag(number, 2) + varint(-1) + b"abc")
        elif quirk == "end_group_alone":
            parts.append(tag(number, 4))
    return b"".join(parts)


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of ``choices``, each drawn with its weight (``st.one_of`` merges equal branches, so
    repeating one does not weigh it)."""
    total = sum(w for w, _ in choices)

    @st.composite
    def pick(draw: st.DrawFn) -> Any:
        i = draw(st.integers(0, total - 1))
        for w, strategy in choices:
            if i < w:
                return draw(strategy)
            i -= w
        raise AssertionError("unreachable")

    return pick()


def request_bytes(cls: Any, semantic: st.SearchStrategy[bytes] | None = None) -> st.SearchStrategy[tuple[bytes, str]]:
    """One request of type ``cls``, by (a)-(d), with a note saying which; near-valid ones (when
    the method has them) weigh most, since they reach furthest into the gateway."""
    valid = generic_messages(cls) if semantic is None else weighted((1, generic_messages(cls)), (2, semantic))
    branches = [
        (2, random_bytes().map(lambda b: (b, "random bytes"))),
        (2, generic_messages(cls).map(lambda b: (b, "hostile values"))),
        (3, st.builds(lambda b, ops: (mutate(b, ops), f"mutated {ops}"), valid, mutation_ops())),
        (2, st.builds(lambda b, q: (b + q, "wire quirks"), st.one_of(st.just(b""), valid), wire_quirks(cls.DESCRIPTOR))),
    ]
    if semantic is not None:
        branches.append((6, semantic.map(lambda b: (b, "near-valid"))))
    return weighted(*branches)


# ---------------------------------------------------------------------------- near-valid requests (gRPC)
FN_PAYLOAD = pickle.dumps(len)  # builtins.len, pickled by reference: a real function the workers can load
FN_DIGEST = hashlib.sha256(FN_PAYLOAD).hexdigest()
HEX64 = st.from_regex(r"[0-9a-f]{64}", fullmatch=True)


def _function(payload: bytes, name: str, digest: str | None) -> tasks_pb2.Function:
    return tasks_pb2.Function(digest=digest if digest is not None else hashlib.sha256(payload).hexdigest(),
                              payload=payload, name=name)


def functions() -> st.SearchStrategy[tasks_pb2.Function]:
    return st.one_of(
        st.builds(_function, st.just(FN_PAYLOAD), st.just("builtins.len"), st.none()),
        st.builds(_function, hostile_bytes(), hostile_text(), st.none()),  # matching digest, garbage payload
        st.builds(_function, hostile_bytes(), hostile_text(), st.one_of(HEX64, hostile_text())),  # mismatched digest
    )


def dataset_inputs(small: bool = False) -> st.SearchStrategy[tasks_pb2.DatasetInput]:
    text = small_text() if small else hostile_text()
    return st.builds(tasks_pb2.DatasetInput, id=st.one_of(valid_ids(), text), site=st.one_of(st.just("fuzz"), text),
                     num_bytes=hostile_int(64, True))


def _set(spec: tasks_pb2.TaskSpec, path: str, value: Any) -> tasks_pb2.TaskSpec:
    *parents, leaf = path.split(".")
    target = spec
    for p in parents:
        target = getattr(target, p)
    current = getattr(target, leaf)
    try:
        if hasattr(current, "update") and isinstance(value, dict):
            current.clear()
            current.update(value)
        elif hasattr(current, "extend"):
            del current[:]
            current.extend(value)
        else:
            setattr(target, leaf, value)
    except (ValueError, TypeError, OverflowError):
        pass
    return spec


def _many_dict(value: Any, n: int) -> dict[str, Any]:
    return {f"k{i}": value for i in range(n)}


SPEC_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "task_id": hostile_text(),
    "function_digest": st.one_of(HEX64, hostile_text(), HEX64.map(str.upper), st.just(FN_DIGEST[:63])),
    "args": hostile_bytes(),
    "resources.cpus": hostile_double(),
    "resources.gpus": hostile_double(),
    "resources.memory_bytes": hostile_int(64, True),
    "resources.custom": st.one_of(st.dictionaries(hostile_text(4096), hostile_double(), max_size=4),
                                  st.builds(_many_dict, st.just(1.0), st.sampled_from(MANY[:2]))),
    "max_retries": hostile_int(32, True),
    "timeout_s": hostile_double(),
    "batch": st.booleans(),
    "python_version": hostile_text(),
    "name": hostile_text(),
    "constraints.accelerator": hostile_text(),
    "constraints.arch": hostile_text(),
    "constraints.site": hostile_text(),
    "constraints.labels": st.one_of(st.dictionaries(hostile_text(4096), hostile_text(4096), max_size=4),
                                    st.builds(_many_dict, st.just("v"), st.sampled_from(MANY[:2]))),
    "home": hostile_text().filter(bool),  # a client setting home: refused
    "inputs": st.one_of(st.lists(dataset_inputs(), max_size=4),
                        st.builds(lambda x, n: [x] * n, dataset_inputs(small=True), st.sampled_from((1000, 1001, 10_000)))),
    "returns_dataset": st.booleans(),
}


@st.composite
def task_specs(draw: st.DrawFn, digests: Sequence[str] = (FN_DIGEST,)) -> tasks_pb2.TaskSpec:
    """A valid spec (that a site with one CPU runs) with 0-3 fields made hostile."""
    spec = tasks_pb2.TaskSpec(task_id=draw(valid_ids()), function_digest=draw(st.sampled_from(list(digests))),
                              args=draw(st.binary(max_size=16)), python_version=draw(st.sampled_from([PY, ""])),
                              resources=common_pb2.ResourceRequest(cpus=draw(st.sampled_from([0.0, 0.5, 1.0]))),
                              max_retries=draw(st.integers(0, 2)), timeout_s=draw(st.sampled_from([0.0, 5.0])),
                              name="fuzz")
    for path in draw(st.lists(st.sampled_from(sorted(SPEC_FIELDS)), max_size=3, unique=True)):
        _set(spec, path, draw(SPEC_FIELDS[path]))
    return spec


@st.composite
def submit_requests(draw: st.DrawFn) -> tasks_pb2.SubmitRequest:
    fns = draw(st.lists(functions(), max_size=3))
    digests = [f.digest for f in fns if f.digest] + [FN_DIGEST]
    if draw(st.integers(0, 9)) == 0:  # many tasks (about 8 MB at most)
        spec = draw(task_specs(digests))
        count = min(draw(st.sampled_from((100, 1000, 10_000))), max(1, MANY_BYTES // max(1, spec.ByteSize())))
        tasks = [spec] * count
    else:
        tasks = draw(st.lists(task_specs(digests), max_size=4))
    if draw(st.booleans()):
        fns.append(_function(FN_PAYLOAD, "builtins.len", None))
    session = draw(st.one_of(st.just(""), st.uuids().map(lambda u: u.hex), hostile_text()))
    return tasks_pb2.SubmitRequest(functions=fns, tasks=tasks, session_id=session)


def _ids() -> st.SearchStrategy[list[str]]:
    return st.one_of(st.lists(st.one_of(valid_ids(), hostile_text()), max_size=5),
                     st.builds(lambda x, n: [x] * n, small_text(), st.sampled_from((1000, 100_000, 100_001))))


def _session() -> st.SearchStrategy[str]:
    return st.one_of(st.uuids().map(lambda u: u.hex), hostile_text(),
                     st.builds(_repeat, st.just("s"), st.sampled_from((255, 256, 257))))


def _watch(session: str, progress: bool, peer: str) -> tasks_pb2.WatchRequest:
    return tasks_pb2.WatchRequest(session_id=session, progress=progress, peer_site=peer)


def watch_requests() -> st.SearchStrategy[tasks_pb2.WatchRequest]:
    peer = weighted((4, st.just("")), (1, hostile_text()))
    return st.builds(_watch, _session(), st.booleans(), peer)


def _ser(s: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    return s.map(lambda m: m.SerializeToString())


def _client_message(kind: str, value: Any) -> tasks_pb2.ClientMessage:
    if kind == "open":
        return tasks_pb2.ClientMessage(open=value)
    if kind == "submit":
        return tasks_pb2.ClientMessage(submit=tasks_pb2.SubmitBatch(seq=value[0], request=value[1]))
    if kind == "reconcile":
        return tasks_pb2.ClientMessage(reconcile=tasks_pb2.Reconcile(task_ids=value[0], more=value[1]))
    return tasks_pb2.ClientMessage()


def _reflection(kind: str, value: Any, host: str) -> reflection_pb2.ServerReflectionRequest:
    req = reflection_pb2.ServerReflectionRequest(host=host)
    if kind == "extension":
        req.file_containing_extension.containing_type = value[0]
        req.file_containing_extension.extension_number = value[1]
    else:
        setattr(req, kind, value)
    return req


SYMBOLS = ("intertie.v1.TaskService", "intertie.v1.TaskService.Submit", "intertie.v1.TaskSpec", "grpc.health.v1.Health",
           "intertie.v1.TaskSpec.home", "intertie.v1.ErrorKind", "", ".", "..", "intertie", "intertie.v1.",
           "google.protobuf.Any", "grpc.reflection.v1alpha.ServerReflection")
FILES = ("intertie/v1/tasks.proto", "intertie/v1/common.proto", "grpc/health/v1/health.proto", "", "../../etc/passwd",
         "google/protobuf/descriptor.proto")


def reflection_requests() -> st.SearchStrategy[reflection_pb2.ServerReflectionRequest]:
    name = st.one_of(st.sampled_from(SYMBOLS), hostile_text())
    return st.one_of(
        st.builds(_reflection, st.just("file_containing_symbol"), name, hostile_text()),
        st.builds(_reflection, st.just("file_by_filename"), st.one_of(st.sampled_from(FILES), hostile_text()),
                  small_text()),
        st.builds(_reflection, st.just("all_extension_numbers_of_type"), name, small_text()),
        st.builds(_reflection, st.just("list_services"), hostile_text(), small_text()),
        st.builds(_reflection, st.just("extension"), st.tuples(name, hostile_int(32, True)), small_text()),
    )


def _semantic_grpc() -> dict[str, st.SearchStrategy[bytes]]:
    text, ids = hostile_text(), _ids()
    return {
        "TaskService/Submit": _ser(submit_requests()),
        "TaskService/Watch": _ser(watch_requests()),
        "TaskService/Subscribe": _ser(st.builds(tasks_pb2.SubscribeRequest, session_id=_session(), task_ids=ids)),
        "TaskService/GetTask": _ser(st.builds(tasks_pb2.GetTaskRequest, task_id=st.one_of(valid_ids(), text))),
        "TaskService/Cancel": _ser(st.builds(tasks_pb2.CancelRequest, task_ids=ids)),
        "TaskService/Quote": _ser(st.builds(tasks_pb2.QuoteRequest, task=task_specs([FN_DIGEST, "0" * 64]),
                                            args_bytes=hostile_int(64, True))),
        "LedgerService/GetCheckpoint": _ser(st.builds(ledger_pb2.GetCheckpointRequest, size=hostile_int(64, False))),
        "LedgerService/ListEntries": _ser(st.builds(ledger_pb2.ListEntriesRequest, size=hostile_int(64, False),
                                                    start=hostile_int(64, False), max_entries=hostile_int(32, False),
                                                    since=hostile_double())),
        "LedgerService/GetConsistencyProof": _ser(st.builds(ledger_pb2.ConsistencyProofRequest,
                                                            size1=hostile_int(64, False), size2=hostile_int(64, False))),
        "PeerService/Steal": _ser(st.builds(peer_pb2.StealRequest, site_id=text, max_tasks=hostile_int(32, True))),
        "PeerService/VerifyLink": _ser(st.builds(peer_pb2.VerifyLinkRequest, site_id=text, session_id=_session())),
        "Health/Check": _ser(st.builds(health_pb2.HealthCheckRequest, service=st.one_of(st.sampled_from(SYMBOLS), text))),
        "Health/Watch": _ser(st.builds(health_pb2.HealthCheckRequest, service=st.one_of(st.sampled_from(SYMBOLS), text))),
        "ServerReflection/ServerReflectionInfo": _ser(reflection_requests()),
    }


# ---------------------------------------------------------------------------- near-valid requests (Flight)
BASE_ID = "fuzz-base"  # a dataset the site holds while it is fuzzed (``ensure_base_dataset``)
BASE_NAME = "fuzz-base-name"


def _deep_json(depth: int, shape: str, wrap: bool) -> bytes:
    opener, closer = {"list": ("[", "]"), "object": ('{"a":', "}"), "mixed": ('[{"a":', "}]")}[shape]
    inner = opener * depth + "1" + closer * depth
    return (('{"id":' + inner + "}") if wrap else inner).encode()


def json_values() -> st.SearchStrategy[Any]:
    leaves = st.one_of(st.none(), st.booleans(), hostile_int(64, True), st.integers(), hostile_double(), small_text(),
                       st.sampled_from([BASE_ID, BASE_NAME, 10 ** 30, -(10 ** 30)]))
    return st.recursive(leaves, lambda c: st.lists(c, max_size=3) | st.dictionaries(small_text(), c, max_size=3),
                        max_leaves=8)


def _json(obj: Any) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()


def json_requests(keys: Sequence[str]) -> st.SearchStrategy[bytes]:
    """A JSON text where the gateway expects a small JSON object with ``keys``."""
    value = st.one_of(json_values(), hostile_text(), st.sampled_from([BASE_ID, BASE_NAME]))
    return st.one_of(
        st.fixed_dictionaries({}, optional={k: value for k in keys}).map(_json),
        st.dictionaries(small_text(), json_values(), max_size=4).map(_json),
        json_values().map(_json),
        st.builds(_deep_json, st.sampled_from([10, 100, 500, 1000, 3000, 100_000]),
                  st.sampled_from(["list", "object", "mixed"]), st.booleans()),
        st.sampled_from([b"{", b"{}", b"[]", b"null", b'{"id":', b'{"id": 1e999}', b'{"id": NaN}', b'{"id": "\\ud800"}',
                         b'\xef\xbb\xbf{"id": "x"}', b'{"id": "fuzz-base", "from_batch": 1e999}',
                         b'{"id": "fuzz-base", "from_batch": true}', b'{"id":"a","id":{"x":1}}']),
        st.builds(_big_number, st.sampled_from([4300, 4301, 5000, 100_000]), st.sampled_from(["bare", "id", "from_batch"])),
    )


def _big_number(digits: int, where: str) -> bytes:
    """A JSON number past Python's int-parsing limit (4300 digits)."""
    number = b"9" * digits
    return {"bare": number, "id": b'{"id": "' + number + b'"}',
            "from_batch": b'{"id": "fuzz-base", "from_batch": ' + number + b"}"}[where]


def tickets() -> st.SearchStrategy[bytes]:
    """The ticket bytes of a DoGet."""
    from_batch = st.one_of(hostile_int(64, True), st.integers(), hostile_double(), json_values())
    return st.one_of(
        json_requests(("id", "from_batch")),
        st.builds(lambda i, k: _json({"id": i, "from_batch": k}), st.sampled_from([BASE_ID, BASE_NAME]), from_batch),
        st.sampled_from([BASE_ID.encode(), BASE_NAME.encode()]),
        hostile_bytes(1_000_000),
        hostile_text().map(lambda s: ("{" + s).encode()),
    )


def action_bodies() -> st.SearchStrategy[bytes]:
    return st.one_of(st.sampled_from([BASE_ID.encode(), BASE_NAME.encode(), b"", b"\xff\xfe"]), hostile_bytes(1_000_000),
                     json_requests(("id", "name")))


def descriptors(command: st.SearchStrategy[bytes] | None = None) -> st.SearchStrategy[bytes]:
    """FlightDescriptor bytes (CMD with a hostile command, PATH, UNKNOWN, hostile type numbers)."""
    command = command if command is not None else json_requests(("name", "id"))
    path = st.lists(hostile_text(), max_size=4)
    return weighted(
        (3, command.map(cmd_descriptor)),
        (1, st.builds(lambda t, c, p: fill(FLIGHT["FlightDescriptor"](), {"type": t, "cmd": c, "path": p}).SerializeToString(),
                  st.one_of(st.sampled_from([0, 1, 2]), hostile_int(32, True)), command, path)),
        (1, generic_messages(FLIGHT["FlightDescriptor"])),
    )


def _action(kind: str, body: bytes) -> bytes:
    return ld(1, kind.encode("utf-8", "surrogatepass")) + ld(2, body)


def _put_with_descriptor(descriptor: bytes, base: str) -> tuple[bytes, ...]:
    return put_messages(base_streams()[base].messages, descriptor=descriptor)


def _put_commands() -> st.SearchStrategy[bytes]:
    name = st.one_of(st.just("fuzz-put"), hostile_text())
    ident = st.one_of(valid_ids(), hostile_text(), json_values())
    return st.one_of(json_requests(("name", "id")),
                     st.builds(lambda n, i: _json({"name": n, "id": i}), name, ident),
                     st.builds(lambda n: _json({"name": n}), name))


IPC_OP = st.tuples(st.sampled_from(IPC_OPS), st.integers(0, 1 << 16), st.integers(0, 1 << 16), st.integers(0, 255))


@st.composite
def corrupted_puts(draw: st.DrawFn) -> Case:
    bases = base_streams()
    base = bases[draw(st.sampled_from(sorted(bases)))]
    messages, note = corrupt(base, draw(st.integers(0, 15)), draw(st.lists(IPC_OP, min_size=1, max_size=3)))
    return Case("Flight/DoPut(ipc)", put_messages(messages), note, verify_put=True)


@st.composite
def descriptor_puts(draw: st.DrawFn) -> Case:
    base = draw(st.sampled_from(["primitives", "string", "list<int32>"]))
    descriptor = draw(descriptors(_put_commands()))
    return Case("Flight/DoPut(descriptor)", _put_with_descriptor(descriptor, base),
                f"descriptor {descriptor[:200]!r} + a valid {base} stream", verify_put=True)


def _flight_data_messages() -> st.SearchStrategy[bytes]:
    return st.one_of(generic_messages(FLIGHT["FlightData"]), random_bytes(),
                     st.builds(flight_data, st.binary(max_size=64), st.binary(max_size=64), descriptors()))


def _semantic_flight() -> dict[str, st.SearchStrategy[bytes]]:
    out = {
        "Flight/DoGet": tickets().map(lambda t: ld(1, t)),
        "Flight/DoAction(other)": st.builds(_action, hostile_text(), action_bodies()),
        "Flight/ListFlights": st.one_of(hostile_bytes(), json_requests(("name",))).map(lambda e: ld(1, e)),
        "Flight/GetFlightInfo": descriptors(),
        "Flight/PollFlightInfo": descriptors(),
        "Flight/GetSchema": descriptors(),
    }
    for kind in ("get", "delete", "delete-replica"):
        out[f"Flight/DoAction({kind})"] = action_bodies().map(functools.partial(_action, kind))
    return out


# ---------------------------------------------------------------------------- cases per method
def _single_cases(name: str, semantic: st.SearchStrategy[bytes] | None) -> st.SearchStrategy[Case]:
    m = METHODS[name]
    return request_bytes(m.request, semantic).map(lambda bn: Case(name, (bn[0],), bn[1]))


def _stream_cases(name: str, one: st.SearchStrategy[tuple[bytes, str]]) -> st.SearchStrategy[Case]:
    return st.lists(one, min_size=1, max_size=4).map(
        lambda ms: Case(name, tuple(b for b, _ in ms), "; ".join(n for _, n in ms)))


@st.composite
def connect_cases(draw: st.DrawFn) -> Case:
    name = "TaskService/Connect"
    opening = _ser(watch_requests().map(lambda w: tasks_pb2.ClientMessage(open=w)))
    first = draw(weighted((4, opening), (1, request_bytes(tasks_pb2.ClientMessage).map(lambda bn: bn[0]))))
    submit = _ser(st.builds(_client_message, st.just("submit"), st.tuples(hostile_int(64, False), submit_requests())))
    later = weighted(
        (8, submit),
        (1, _ser(st.builds(_client_message, st.just("reconcile"), st.tuples(_ids(), st.booleans())))),
        (1, _ser(st.builds(_client_message, st.just("open"), watch_requests()))),
        (1, _ser(st.just(tasks_pb2.ClientMessage()))),
        (1, request_bytes(tasks_pb2.ClientMessage).map(lambda bn: bn[0])),
    )
    rest = draw(st.lists(later, max_size=3))
    return Case(name, (first, *rest), f"open + {len(rest)} messages")


@functools.cache
def cases(name: str) -> st.SearchStrategy[Case]:
    """Hostile requests for the method ``name`` (a key of METHODS)."""
    strategy = _cases(name)
    return st.deferred(lambda: strategy)  # a short repr in hypothesis' reports


def _cases(name: str) -> st.SearchStrategy[Case]:
    m = METHODS[name]
    if name == "TaskService/Connect":
        return weighted((3, connect_cases()), (1, _stream_cases(name, request_bytes(m.request))))
    if name == "ServerReflection/ServerReflectionInfo":
        return _stream_cases(name, request_bytes(m.request, _semantic_grpc()[name]))
    if name == "Flight/DoPut(ipc)":
        return weighted((6, corrupted_puts()), (1, _stream_cases(name, request_bytes(m.request, _flight_data_messages()))))
    if name == "Flight/DoPut(descriptor)":
        return weighted((4, descriptor_puts()), (1, _stream_cases(name, request_bytes(m.request, _flight_data_messages()))))
    if name == "Flight/DoExchange":
        return weighted(
            (2, st.builds(lambda d, b: Case(name, _put_with_descriptor(d, b), "descriptor + a valid stream"),
                          descriptors(), st.sampled_from(["primitives", "string"]))),
            (1, _stream_cases(name, request_bytes(m.request, _flight_data_messages()))))
    if m.client_streaming:
        return _stream_cases(name, request_bytes(m.request))
    semantic = {**_semantic_grpc(), **_semantic_flight()}.get(name)
    return _single_cases(name, semantic)


def garbage_cases(name: str, count: int) -> list[Case]:
    """``count`` requests of pseudo-random bytes (the same every run), for a burst."""
    out = []
    for i in range(count):
        data = hashlib.sha256(f"{name}/{i}".encode()).digest() * (1 + i % 3)
        out.append(Case(name, (b"\xff" + data,), f"garbage burst {i}"))
    return out


def known_cases(name: str) -> list[Case]:
    """Hand-picked inputs each method is always tested with: the defects found so far."""
    garbage = b"\xff\xfe\x00garbage\x12\x34"
    huge = "k" * 100_000
    m = METHODS[name]
    out: list[Case] = [Case(name, (garbage,), "known: garbage bytes")]
    if name == "TaskService/GetTask":
        out.append(Case(name, (tasks_pb2.GetTaskRequest(task_id=huge).SerializeToString(),), "known: a 100 KB task id"))
    elif name == "TaskService/Submit":
        fn = _function(FN_PAYLOAD, "builtins.len", None)
        bad = tasks_pb2.TaskSpec(task_id=huge, function_digest=FN_DIGEST)
        home = tasks_pb2.TaskSpec(task_id="fuzz-home", function_digest=FN_DIGEST, home="elsewhere", python_version=PY)
        out.append(Case(name, (tasks_pb2.SubmitRequest(functions=[fn], tasks=[bad, home]).SerializeToString(),),
                        "known: a 100 KB task id, a client setting home"))
        # Placement errors that quote what the client asked for, whole.
        echoes = [tasks_pb2.TaskSpec(**{"task_id": f"fuzz-echo-{i}", "function_digest": FN_DIGEST, "python_version": PY,
                                        **kw})
                  for i, kw in enumerate([{"python_version": huge},
                                          {"resources": common_pb2.ResourceRequest(custom={huge: 1.0})},
                                          {"constraints": common_pb2.Constraints(labels={huge: "v"})},
                                          {"constraints": common_pb2.Constraints(labels={"k": huge})}])]
        out.append(Case(name, (tasks_pb2.SubmitRequest(functions=[fn], tasks=echoes).SerializeToString(),),
                        "known: a 100 KB python_version, custom resource name, label key, label value"))
    elif name == "TaskService/Quote":
        quote = tasks_pb2.QuoteRequest(task=tasks_pb2.TaskSpec(resources=common_pb2.ResourceRequest(custom={huge: 1.0})))
        out.append(Case(name, (quote.SerializeToString(),), "known: a 100 KB custom resource name"))
    elif name == "TaskService/Connect":
        opening = tasks_pb2.ClientMessage(open=tasks_pb2.WatchRequest(session_id="fuzz-known")).SerializeToString()
        out.append(Case(name, (opening, garbage), "known: garbage after the open"))
    elif name == "TaskService/Cancel":
        out.append(Case(name, (tasks_pb2.CancelRequest(task_ids=[huge]).SerializeToString(),), "known: a 100 KB id"))
    elif name == "Flight/DoGet":
        for ticket, note in ((_deep_json(100_000, "list", True)[:4096], "deep JSON within 4 KB"),
                             (_deep_json(100_000, "list", True), "100 000 levels of JSON"),
                             (b'{"id": 5}', "a non-string id"), (b'{"id": ["x"]}', "a list id"),
                             (b'{"id": "fuzz-base", "from_batch": -1}', "a negative from_batch"),
                             (b'{"id": "fuzz-base", "from_batch": 1e999}', "an infinite from_batch"),
                             (b'{"id": "fuzz-base", "from_batch": ' + str(10 ** 30).encode() + b"}", "a huge from_batch"),
                             (huge.encode(), "a 100 KB key")):
            out.append(Case(name, (ld(1, ticket),), f"known: {note}"))
    elif name.startswith("Flight/DoAction"):
        kind = m.action or "x" * 100_000
        out.append(Case(name, (_action(kind, huge.encode()),), "known: a 100 KB key"))
        out.append(Case(name, (_action(kind, b"\xff\xfe"),), "known: a body that is not UTF-8"))
    elif name == "Flight/DoPut(ipc)":
        # A list whose last offset points one past its values was stored as is (and read back
        # out of bounds); a child array of length -1 SIGABRTed the gateway in Arrow's slicing
        # ("Check failed: (off) <= (length) Slice offset (0) greater than array length (-1)").
        for base, ops in (("fixed_size_list<int16,3>", [("node_length", 1, 2, 0)]),
                          ("primitives", [("batch_length", 0, 0, 0)]),  # pyarrow raises a plain OSError
                          ("list<int32>", [("node_length", 1, 2, 0)]),
                          ("list<int32>", [("offset", 0, 0, 0)]), ("string", [("offset", 0, 0, 0)]),
                          ("large_list<int64>", [("offset", 0, 1, 0)]), ("list<int32>", [("offset", 0, 2, 0)]),
                          ("dictionary<int32,string>", [("indices", 0, 0, 0)]), ("string", [("utf8", 0, 0, 0)])):
            messages, note = corrupt(base_streams()[base], 0 if ops[0][0] in ("node_length", "batch_length") else 1, ops)
            out.append(Case(name, put_messages(messages), f"known: {note}", verify_put=True))
    elif name == "Flight/DoPut(descriptor)":
        out.append(Case(name, (flight_data(descriptor=cmd_descriptor(b"{}")),), "known: a descriptor and no data"))
        for command in (_deep_json(100_000, "list", True), b'{"name": 5}', b'{"id": ["x"]}',
                        _json({"name": "ok", "id": "../../escape"}), _json({"name": huge})):
            out.append(Case(name, _put_with_descriptor(cmd_descriptor(command), "primitives"),
                            f"known: descriptor {command[:60]!r}", verify_put=True))
    if m.client_streaming and name != "TaskService/Connect":
        out[0] = Case(name, (garbage,), "known: garbage bytes")
    return out


# ---------------------------------------------------------------------------- sending and judging
def _ipc_stream(frames: Sequence[Any]) -> bytes:
    """An IPC stream from FlightData frames (as a Flight client reassembles one)."""
    out = bytearray()
    for frame in frames:
        header = frame.data_header
        pad = (-(len(header) + 8)) % 8
        out += b"\xff\xff\xff\xff" + struct.pack("<i", len(header) + pad) + header + b"\x00" * pad + frame.data_body
    return bytes(out + b"\xff\xff\xff\xff\x00\x00\x00\x00")


@dataclass
class _ConnectPlan:
    """What the gateway owes a Connect stream: the open message, one ack per submit batch,
    and an error status if a message is not a submit (or the open is bad)."""

    acks: int
    error: bool
    tasks: list[int] = field(default_factory=list)


def _connect_plan(case: Case) -> _ConnectPlan:
    msgs = [_parses(tasks_pb2.ClientMessage, m) for m in case.messages]
    first = msgs[0]
    if first is None or first.WhichOneof("kind") != "open" or not 0 < len(first.open.session_id) <= 256 \
            or first.open.peer_site:
        return _ConnectPlan(0, True)
    plan = _ConnectPlan(0, False)
    for msg in msgs[1:]:
        if msg is None or msg.WhichOneof("kind") != "submit":
            plan.error = True
            break
        plan.acks += 1
        plan.tasks.append(len(msg.submit.request.tasks))
    return plan


class Site:
    """A gateway under fuzzing: its channels, and (when this process started it) its process."""

    def __init__(self, proc: Any = None, address: str = "", deadline_s: float = DEADLINE_S,
                 failures_dir: Path | None = None) -> None:
        self.proc = proc
        self.address = address or proc.address
        self.deadline_s = deadline_s
        self.failures_dir = failures_dir or (proc.state_dir / "fuzz-failures" if proc is not None else None)
        self.restarts = 0
        self.channel: grpc.Channel | None = None
        self.flight_channel: grpc.Channel | None = None
        self.flight_address = ""
        self._connect()

    @classmethod
    def start(cls, state_dir: Path, *args: str, site_id: str = "fuzz", num_cpus: int = 1,
              deadline_s: float = DEADLINE_S) -> Site:
        proc = gateway_process_class()(Path(state_dir), *args, site_id=site_id, num_cpus=num_cpus)
        proc.start()
        try:
            return cls(proc, deadline_s=deadline_s)
        except BaseException:
            proc.stop()
            raise

    @property
    def state_dir(self) -> Path:
        return Path(self.proc.state_dir)

    @property
    def log_path(self) -> Path:
        return Path(self.proc.log_path)

    def _connect(self) -> None:
        self.close_channels()
        if self.proc is not None:
            self.address = self.proc.address
        self.channel = grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        status = self.status()
        self.flight_address = status.flight_address
        self.flight_channel = grpc.insecure_channel(self.flight_address, options=CHANNEL_OPTIONS)

    def status(self, timeout: float | None = None) -> site_pb2.SiteStatus:
        assert self.channel is not None
        call = self.channel.unary_unary("/intertie.v1.SiteService/GetStatus")
        return site_pb2.SiteStatus.FromString(call(b"", timeout=timeout or self.deadline_s))

    def exited(self) -> str | None:
        """Why the process is gone, or None while it runs."""
        if self.proc is None or self.proc.process is None:
            return None
        code = self.proc.process.poll()
        if code is None:
            return None
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exited with status {code}"

    def dead(self) -> str | None:
        """None if the gateway runs and answers GetStatus; else why not."""
        gone = self.exited()
        if gone is not None:
            return gone
        try:
            self.status()
        except grpc.RpcError as exc:
            gone = self.exited()
            return gone or f"GetStatus failed: {exc.code().name}: {(exc.details() or '')[:200]}"
        return None

    def ensure(self) -> None:
        """Restarts the gateway if it is dead (same state dir, so its journal is recovered)."""
        if self.dead() is not None:
            self.restart()

    def restart(self) -> None:
        if self.proc is None:
            raise RuntimeError(f"the gateway at {self.address} is down and was not started here")
        self.close_channels()
        self.proc.kill()  # its process group: the embedded Ray too
        self.proc.start()
        self.restarts += 1
        self._connect()

    def close_channels(self) -> None:
        for ch in (self.channel, self.flight_channel):
            if ch is not None:
                ch.close()
        self.channel = self.flight_channel = None

    def close(self) -> None:
        self.close_channels()
        if self.proc is not None:
            self.proc.stop()

    # -------------------------------------------------------------- calls
    def call(self, method: Method, messages: Sequence[bytes], plan: _ConnectPlan | None = None
             ) -> tuple[str, str, list[bytes], float]:
        """(status code, details, responses, seconds) of one raw call."""
        ch = self.flight_channel if method.flight else self.channel
        assert ch is not None
        responses: list[bytes] = []
        started = time.monotonic()
        try:
            if not method.client_streaming and not method.server_streaming:
                responses.append(ch.unary_unary(method.path)(messages[0], timeout=self.deadline_s))
            else:
                if method.client_streaming:
                    call = ch.stream_stream(method.path)(iter(messages), timeout=self.deadline_s)
                else:
                    call = ch.unary_stream(method.path)(messages[0], timeout=self.deadline_s)
                acks = 0
                for response in call:
                    responses.append(response)
                    done = method.first_only or len(responses) >= MAX_RESPONSES
                    if plan is not None:
                        msg = _parses(tasks_pb2.ServerMessage, response)
                        if msg is not None and msg.WhichOneof("kind") == "ack":
                            acks += 1
                        done = done or (not plan.error and acks >= plan.acks)
                    if done:
                        call.cancel()
                        break
            return "OK", "", responses, time.monotonic() - started
        except grpc.RpcError as exc:
            code = exc.code()
            return code.name if code is not None else "UNKNOWN", exc.details() or "", responses, \
                time.monotonic() - started

    def send(self, case: Case) -> Outcome:
        """Sends ``case`` and judges the answer (a dead gateway afterwards makes it a crash)."""
        method = METHODS[case.method]
        plan = _connect_plan(case) if case.method == "TaskService/Connect" else None
        code, details, responses, elapsed = self.call(method, case.messages, plan)
        if code == "OK":
            kind, why = "ok", ""
            problem = self._check_answer(method, case, responses, plan)
            if problem is not None:
                kind, why = problem
        else:
            kind, why = judge_status(method, case, code, details)
            if kind == "hang" and plan is not None and plan.error and responses:
                why = ("the session stream carried a message the gateway must refuse (not a submit batch, "
                       "or a peer claim it cannot verify) and got no error before the deadline")
        if kind == "ok" and elapsed > self.deadline_s + 2:
            kind, why = "hang", f"answered after {elapsed:.1f} s, past the {self.deadline_s:.0f} s deadline"
        if kind != "ok" or code != "OK":
            gone = self.exited()
            if gone is None and code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
                time.sleep(0.2)  # a crash under way: give the process a moment to be reaped
                gone = self.exited()
            if gone is not None:
                kind, why = "crash", f"the gateway {gone}"
        outcome = Outcome(case, kind, code, details, why, elapsed)
        if outcome.failed and self.failures_dir is not None:
            try:
                outcome.saved = case.save(self.failures_dir)
            except OSError:
                pass
        return outcome

    def _check_answer(self, method: Method, case: Case, responses: list[bytes],
                      plan: _ConnectPlan | None) -> tuple[str, str] | None:
        if method.name == "TaskService/Submit":
            request = _parses(tasks_pb2.SubmitRequest, case.messages[0])
            reply = _parses(tasks_pb2.SubmitResponse, responses[0])
            if reply is None:
                return "untyped", "the reply does not parse"
            why = _check_acks(reply.acks, len(request.tasks) if request is not None else None)
            return ("untyped", why) if why else None
        if method.name == "TaskService/Quote":
            placement = _parses(tasks_pb2.Placement, responses[0])
            if placement is None:
                return "untyped", "the reply does not parse"
            longest = max([len(placement.reason), *(len(r.reason) for r in placement.rejected)])
            if longest > MAX_DETAILS_CHARS:
                return "untyped", f"a placement reason of {longest} chars"
            return None
        if plan is not None:
            batches = iter(plan.tasks)
            for raw in responses:
                msg = _parses(tasks_pb2.ServerMessage, raw)
                if msg is None:
                    return "untyped", "a reply that does not parse"
                if msg.WhichOneof("kind") == "ack":
                    why = _check_acks(msg.ack.acks, next(batches, None))
                    if why:
                        return "untyped", why
            if plan.error:
                return "untyped", "the stream carried a message that is not a submit batch, and no error came"
            return None
        if case.verify_put:
            return self.verify_put(case, responses)
        return None

    def verify_put(self, case: Case, responses: list[bytes]) -> tuple[str, str] | None:
        """An accepted upload must read back valid, with its recorded rows, at a sane size."""
        results = [_parses(FLIGHT["PutResult"], r) for r in responses]
        if len(results) != 1 or results[0] is None:
            return "bad-data", f"{len(responses)} put results"
        try:
            meta = json.loads(results[0].app_metadata)
            dataset_id = meta["id"]
        except (ValueError, KeyError, TypeError):
            return "bad-data", f"the put result is not dataset metadata: {results[0].app_metadata[:200]!r}"
        problem = self._read_back(dataset_id, meta, case)
        if dataset_id not in (BASE_ID,):
            self.call(FLIGHT_METHODS["Flight/DoAction(delete)"], [_action("delete", dataset_id.encode())])
        return ("bad-data", problem) if problem else None

    def stored_batches(self, dataset_id: str) -> list[pa.RecordBatch]:
        """A dataset's batches as stored: the site's own file when this process started the
        site (what its workers memory-map), else over Flight (DoGet). Raises on anything
        that does not read."""
        if self.proc is not None:
            path = self.state_dir / "datasets" / f"{dataset_id}.arrow"
            reader = pa.ipc.open_file(pa.memory_map(str(path)))
            return [reader.get_batch(i) for i in range(reader.num_record_batches)]
        return self.served_batches(dataset_id)

    def served_batches(self, dataset_id: str) -> list[pa.RecordBatch]:
        """A dataset's batches as DoGet serves them."""
        code, details, frames, _ = self.call(FLIGHT_METHODS["Flight/DoGet"], [ld(1, _json({"id": dataset_id}))])
        if code != "OK":
            raise RuntimeError(f"DoGet answered {code}: {details[:300]}")
        reader = pa.ipc.open_stream(pa.py_buffer(_ipc_stream([FLIGHT["FlightData"].FromString(f) for f in frames])))
        return list(reader)

    def _read_back(self, dataset_id: str, meta: dict[str, Any], case: Case) -> str | None:
        try:
            rows = 0
            for batch in self.stored_batches(dataset_id):
                batch.validate(full=True)
                rows += batch.num_rows
        except Exception as exc:
            return f"the stored dataset is not valid Arrow: {type(exc).__name__}: {str(exc)[:300]}"
        if rows != meta.get("num_rows"):
            return f"{rows} rows stored, {meta.get('num_rows')} recorded"
        sent = case.size
        if not isinstance(meta.get("num_bytes"), int) or not 0 <= meta["num_bytes"] <= 2 * sent + 65_536:
            return f"recorded size {meta.get('num_bytes')} bytes for an upload of {sent} bytes"
        return None


# ---------------------------------------------------------------------------- the site's data and state
def ensure_base_dataset(site: Site) -> Outcome:
    """Stores the dataset tickets and actions refer to (id BASE_ID, name BASE_NAME)."""
    messages = put_messages(base_streams()["primitives"].messages,
                            command=_json({"name": BASE_NAME, "id": BASE_ID}))
    return site.send(Case("Flight/DoPut(ipc)", messages, "the base dataset", verify_put=True))


def check_encoder(site: Site) -> list[str]:
    """Each uncorrupted base stream, sent by the raw DoPut encoder, is stored equal to what
    was sent, and DoGet serves it back equal. Problems, if any."""
    problems = []
    for name, base in base_streams().items():
        dataset_id = "fuzz-check-" + "".join(c if c.isalnum() else "." for c in name)
        expected = pa.Table.from_batches(base.batches)
        messages = put_messages(base.messages, command=_json({"name": "fuzz-check", "id": dataset_id}))
        code, details, _, _ = site.call(FLIGHT_METHODS["Flight/DoPut(ipc)"], messages)
        if code != "OK":
            problems.append(f"{name}: the uncorrupted stream was refused: {code}: {details[:300]}")
            continue
        for what, read in (("stored", site.stored_batches), ("served by DoGet", site.served_batches)):
            try:
                table = pa.Table.from_batches(read(dataset_id), schema=expected.schema)
                if not table.equals(expected):
                    problems.append(f"{name}: {what} differs from what was sent")
            except Exception as exc:
                problems.append(f"{name}: {what}: {type(exc).__name__}: {str(exc)[:300]}")
        site.call(FLIGHT_METHODS["Flight/DoAction(delete)"], [_action("delete", dataset_id.encode())])
    return problems


def journal_integrity(state_dir: Path) -> str:
    """``PRAGMA integrity_check`` of the site's journal, opened read-only ("ok" when sound)."""
    path = Path(state_dir) / "journal.sqlite"
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return "; ".join(str(row[0]) for row in con.execute("PRAGMA integrity_check").fetchall())
    finally:
        con.close()


def traceback_lines(log_path: Path) -> int:
    try:
        text = Path(log_path).read_text(errors="replace")
    except OSError:
        return 0
    return sum(1 for line in text.splitlines() if "Traceback (most recent call last)" in line)


@functools.cache
def gateway_process_class() -> Any:
    """tests/conftest.py's GatewayProcess (loaded by path: the bench has no pytest rootdir)."""
    spec = importlib.util.spec_from_file_location("_intertie_tests_conftest", REPO / "tests" / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.GatewayProcess


def summarize(outcomes: Sequence[Outcome]) -> dict[str, int]:
    counts = {k: 0 for k in ("ok", "typed", "transport", *FAILURES)}
    for o in outcomes:
        counts[o.kind] = counts.get(o.kind, 0) + 1
    return counts


def iter_methods(selected: Sequence[str] = ()) -> Iterator[str]:
    for name in METHODS:
        if not selected or any(s in name for s in selected):
            yield name


__all__ = ["BASE_ID", "CLEAN_CODES", "Case", "DEADLINE_S", "FLIGHT_METHOD_NAMES", "GRPC_METHOD_NAMES", "MAX_DETAILS_CHARS",
           "METHODS", "Outcome", "Site", "base_streams", "cases", "check_encoder", "corrupt", "ensure_base_dataset",
           "journal_integrity", "known_cases", "put_messages", "summarize", "traceback_lines"]



def drive(strategy: st.SearchStrategy[Case], examples: int, each: Callable[[Case], None], seed: int = 0) -> None:
    """Calls ``each`` on ``examples`` inputs drawn from ``strategy`` (hypothesis does the
    drawing, seeded; nothing is shrunk: ``each`` records, it does not raise)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as seeded

    @seeded(seed)
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
    @given(strategy)
    def run(case: Case) -> None:
        each(case)

    run()
