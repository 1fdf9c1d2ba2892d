"""Fault injection for tests and chaos benches: a TCP proxy whose link can be cut, frozen or slowed.

A :class:`FaultProxy` listens on ``127.0.0.1:<port chosen by the OS>`` and forwards every
connection it accepts to ``target`` (a client in front of its gateway, or a gateway in front
of a peer). It runs an asyncio loop on its own thread; every control is a synchronous call
that returns once the loop has applied it.

* ``cut()`` resets every open connection (RST to both ends, as a crashed middlebox or a
  dropped NAT entry would) and keeps accepting new ones; ``cut_every(seconds)`` does that
  periodically in the background; ``drop_every(n)`` drops every n-th forwarded chunk and
  resets the connection that carried it (dropping bytes inside a TCP stream without a reset
  would only corrupt the HTTP/2 framing, which is another fault).
* ``stall()`` freezes the connections open at that moment (``new_connections=True``: also
  those accepted later): nothing is forwarded in either direction, no FIN and no RST is
  passed on, the sockets stay open. Bytes that arrive meanwhile are held, as a link that
  recovers before TCP gives up would deliver them; ``resume()`` forwards them. The proxy
  keeps reading while frozen, so it sees an endpoint give up on the connection
  (``events`` kind ``"eof"``/``"reset"``) without passing that on.
* ``delay(seconds)`` holds every chunk that long before forwarding it (latency, pipelined).
* ``refuse(True)`` resets new connections at once (the far side unreachable).
* ``close()`` stops the listener, resets what is open and joins the thread. The proxy is a
  context manager, and :func:`fault_proxy` is a pytest fixture making proxies that are
  closed when the test ends, also when it fails.

Counters: ``connections`` (accepted), ``active``, ``cuts`` (cut operations that hit at least
one connection), ``connections_cut``, ``chunks`` and ``bytes`` forwarded, ``held`` (chunks
waiting behind a stall; ``held_total`` ever held), ``drops``. ``events`` is a list of :class:`ProxyEvent` with monotonic times.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

CHUNK_BYTES = 64 * 1024
# How long a synchronous control waits for the proxy's loop to apply it.
CONTROL_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ProxyEvent:
    at: float  # time.monotonic()
    kind: str  # accept, refused, upstream_failed, cut, drop, eof, reset, closed, stall, resume
    conn: int  # connection number (0 for proxy-wide events)
    side: str = ""  # "client" (the connecting end) or "upstream" (the target), where it applies
    detail: str = ""


def _split(address: str | tuple[str, int]) -> tuple[str, int]:
    if isinstance(address, tuple):
        return address
    host, _, port = address.rpartition(":")
    return host or "127.0.0.1", int(port)


def _reset(writer: asyncio.StreamWriter | None) -> None:
    """Closes a connection with a RST (SO_LINGER 0), not a FIN."""
    if writer is None:
        return
    transport = writer.transport
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


@dataclass(eq=False)
class _Conn:
    number: int
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    flowing: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    closed: bool = False
    finished: int = 0  # directions that have delivered their end


class FaultProxy:
    """A TCP proxy on loopback in front of ``target`` ("host:port"), with injectable faults."""

    def __init__(self, target: str | tuple[str, int] | None = None, *, name: str = "proxy",
                 host: str = "127.0.0.1") -> None:
        self.name = name
        self.target = target  # may be set (or changed) later; used for each new connection
        self.connections = 0
        self.connections_cut = 0
        self.cuts = 0
        self.chunks = 0
        self.bytes = 0
        self.held = 0
        self.held_total = 0
        self.drops = 0
        self.events: list[ProxyEvent] = []
        self._conns: dict[int, _Conn] = {}
        self._stall_new = False
        self._delay = 0.0
        self._drop_every = 0
        self._drop_count = 0
        self._refuse = False
        self._cutter: asyncio.Task[None] | None = None
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"fault-proxy-{name}", daemon=True)
        self._thread.start()
        try:
            self._server = self._call(asyncio.start_server(self._handle, host, 0, limit=CHUNK_BYTES))
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(CONTROL_TIMEOUT_S)
            raise
        self.host, self.port = self._server.sockets[0].getsockname()[:2]

    # ------------------------------------------------------------------ public
    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def active(self) -> int:
        return len(self._conns)

    def cut(self) -> int:
        """Resets every open connection (both ends get a RST); new ones are still accepted.
        Returns how many connections were cut."""
        return self._call(self._cut_all("cut"))

    def cut_every(self, seconds: float | None) -> None:
        """Cuts every ``seconds`` in the background until ``cut_every(None)`` (or close)."""
        self._call(self._set_cutter(seconds))

    def drop_every(self, n: int) -> None:
        """Drops every n-th chunk forwarded from now on (counted over the whole proxy, both
        directions) and resets the connection that carried it; 0 turns it off."""
        self._drop_every = max(0, int(n))
        self._drop_count = 0

    def stall(self, *, new_connections: bool = False) -> int:
        """Freezes the open connections (and, with ``new_connections``, those accepted until
        :meth:`resume`): no byte, FIN or RST passes either way; sockets stay open.
        Returns how many connections were frozen."""
        return self._call(self._stall(new_connections))

    def resume(self) -> None:
        """Unfreezes every connection; bytes held meanwhile are forwarded in order."""
        self._call(self._resume())

    def delay(self, seconds: float) -> None:
        """Holds each chunk ``seconds`` before forwarding it, in each direction (a round
        trip gains twice that); chunks stay in order and pipelined. 0 turns it off."""
        self._delay = max(0.0, float(seconds))

    def refuse(self, on: bool = True) -> None:
        """Resets new connections as soon as they are accepted (the far side unreachable)."""
        self._refuse = on

    def stats(self) -> dict[str, int]:
        return {"connections": self.connections, "active": self.active, "cuts": self.cuts,
                "connections_cut": self.connections_cut, "chunks": self.chunks, "bytes": self.bytes,
                "held": self.held, "held_total": self.held_total, "drops": self.drops}

    def events_of(self, kind: str, since: float = 0.0) -> list[ProxyEvent]:
        return [e for e in list(self.events) if e.kind == kind and e.at >= since]

    def wait_until(self, condition: Callable[[], bool], reason: str, timeout: float = 60.0,
                   poll: float = 0.05) -> float:
        """Waits for ``condition``; AssertionError naming ``reason`` after ``timeout`` s.
        Returns the seconds waited."""
        return wait_until(condition, reason, timeout=timeout, poll=poll)

    def close(self) -> None:
        """Stops listening, resets every connection, stops the background cutter and the thread."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                self._call(self._shutdown())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(CONTROL_TIMEOUT_S)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<FaultProxy {self.name} {self.address} -> {self.target} {self.stats()}>"

    # ------------------------------------------------------------------ loop side
    def _call(self, coro: Any) -> Any:
        if self._closed and not self._thread.is_alive():
            coro.close()
            raise RuntimeError(f"proxy {self.name} is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(CONTROL_TIMEOUT_S)

    def _event(self, kind: str, conn: int = 0, side: str = "", detail: str = "") -> None:
        self.events.append(ProxyEvent(time.monotonic(), kind, conn, side, detail))

    async def _handle(self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        conn = _Conn(number, client)
        self._event("accept", number)
        if self._refuse or self._closed or self.target is None:
            self._event("refused", number)
            _reset(client)
            return
        try:
            host, port = _split(self.target)
            upstream_reader, conn.upstream = await asyncio.open_connection(host, port, limit=CHUNK_BYTES)
        except OSError as exc:
            self._event("upstream_failed", number, "upstream", str(exc))
            _reset(client)
            return
        if self._closed:
            _reset(conn.upstream)
            _reset(client)
            return
        if not self._stall_new:
            conn.flowing.set()
        for sock_writer in (client, conn.upstream):
            sock = sock_writer.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._conns[number] = conn
        queues: tuple[asyncio.Queue[tuple[float, bytes | None, str]], ...] = (asyncio.Queue(), asyncio.Queue())
        conn.tasks = [
            asyncio.create_task(self._read(conn, client_reader, queues[0], "client")),
            asyncio.create_task(self._write(conn, queues[0], conn.upstream)),
            asyncio.create_task(self._read(conn, upstream_reader, queues[1], "upstream")),
            asyncio.create_task(self._write(conn, queues[1], client)),
        ]

    async def _read(self, conn: _Conn, reader: asyncio.StreamReader,
                    queue: asyncio.Queue[tuple[float, bytes | None, str]], side: str) -> None:
        """Reads one direction, also while frozen (the bytes are held in the queue)."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    data = await reader.read(CHUNK_BYTES)
                except (ConnectionError, OSError) as exc:
                    self._event("reset", conn.number, side, type(exc).__name__)
                    queue.put_nowait((loop.time() + self._delay, None, "reset"))
                    return
                if not data:
                    self._event("eof", conn.number, side)
                    queue.put_nowait((loop.time() + self._delay, None, "eof"))
                    return
                held = not conn.flowing.is_set()
                if held:
                    self.held += 1
                    self.held_total += 1
                queue.put_nowait((loop.time() + self._delay, data, "held" if held else ""))
        except asyncio.CancelledError:
            pass

    async def _write(self, conn: _Conn, queue: asyncio.Queue[tuple[float, bytes | None, str]],
                     dest: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                due, data, how = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not conn.flowing.is_set():
                    await conn.flowing.wait()
                if how == "held":
                    self.held = max(0, self.held - 1)
                if data is None:  # that end closed: pass it on as it came, and finish
                    if how == "reset":
                        self._finish(conn, reset=True)
                        return
                    conn.finished += 1
                    with contextlib.suppress(OSError, RuntimeError):
                        if dest.can_write_eof():
                            dest.write_eof()
                    if conn.finished >= 2:
                        self._finish(conn, reset=False)
                    return
                self.chunks += 1
                self._drop_count += 1
                if self._drop_every and self._drop_count % self._drop_every == 0:
                    self._event("drop", conn.number, detail=f"chunk {self.chunks}, {len(data)} bytes")
                    self.drops += 1
                    self.connections_cut += 1
                    self._finish(conn, reset=True)
                    return
                self.bytes += len(data)
                dest.write(data)
                await dest.drain()
        except (ConnectionError, OSError) as exc:
            self._event("reset", conn.number, detail=f"writing: {type(exc).__name__}")
            self._finish(conn, reset=True)
        except asyncio.CancelledError:
            pass

    def _finish(self, conn: _Conn, *, reset: bool) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._conns.pop(conn.number, None)
        for writer in (conn.client, conn.upstream):
            if writer is None:
                continue
            if reset:
                _reset(writer)
            else:
                with contextlib.suppress(Exception):
                    writer.close()
        current = asyncio.current_task()
        for task in conn.tasks:
            if task is not current:
                task.cancel()
        self._event("closed", conn.number, detail="reset" if reset else "fin")

    async def _cut_all(self, why: str) -> int:
        conns = list(self._conns.values())
        for conn in conns:
            self._event(why, conn.number)
            self._finish(conn, reset=True)
        if conns:
            self.cuts += 1
            self.connections_cut += len(conns)
        return len(conns)

    async def _set_cutter(self, seconds: float | None) -> None:
        if self._cutter is not None:
            self._cutter.cancel()
            self._cutter = None
        if seconds:
            async def every() -> None:
                while True:
                    await asyncio.sleep(seconds)
                    await self._cut_all("cut")

            self._cutter = asyncio.create_task(every())

    async def _stall(self, new_connections: bool) -> int:
        self._stall_new = new_connections
        for conn in self._conns.values():
            conn.flowing.clear()
        self._event("stall", detail=f"{len(self._conns)} connections, new ones {'too' if new_connections else 'not'}")
        return len(self._conns)

    async def _resume(self) -> None:
        self._stall_new = False
        for conn in self._conns.values():
            conn.flowing.set()
        self.held = 0  # what was held is on its way (or dropped with a connection that closed)
        self._event("resume")

    async def _shutdown(self) -> None:
        await self._set_cutter(None)
        self._server.close()
        await self._cut_all("close")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2.0)
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)


def wait_until(condition: Callable[[], bool], reason: str, *, timeout: float = 60.0, poll: float = 0.05) -> float:
    """A bounded condition wait: returns the seconds waited, or fails with ``reason``."""
    started = time.monotonic()
    deadline = started + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{reason} (waited {timeout:.0f} s)")
        time.sleep(poll)
    return time.monotonic() - started


class DeliveryTap:
    """Counts the terminal task events a client receives on its session stream, per task.

    The client resolves a future on the first terminal event and drops later ones, so the
    user never sees a result twice; a count above 1 is a duplicate on the wire (e.g. an
    event sent on the new stream and again in answer to the resubscription after a
    reconnect), harmless but worth measuring. Wraps the private event handler of the
    client's session.
    """

    def __init__(self, fed: Any) -> None:
        from intertie.v1 import tasks_pb2

        terminal = (tasks_pb2.TASK_STATE_SUCCEEDED, tasks_pb2.TASK_STATE_FAILED, tasks_pb2.TASK_STATE_CANCELLED)
        self.counts: collections.Counter[str] = collections.Counter()
        session = fed._session
        original = session._on_events

        def on_events(events: Any) -> None:
            events = list(events)
            for event in events:
                if event.state in terminal:
                    self.counts[event.task_id] += 1
            original(events)

        session._on_events = on_events

    def duplicates(self, task_ids: Any = None) -> int:
        ids = self.counts if task_ids is None else task_ids
        return sum(max(0, self.counts.get(t, 0) - 1) for t in ids)


def executions(path: Any) -> collections.Counter[str]:
    """Completed executions per key in a side file of ``key ...`` lines (one per execution)."""
    counts: collections.Counter[str] = collections.Counter()
    try:
        with open(path) as f:
            for line in f:
                if line.strip():
                    counts[line.split()[0]] += 1
    except FileNotFoundError:
        pass
    return counts


@contextlib.contextmanager
def proxies() -> Iterator[Callable[..., FaultProxy]]:
    """Makes proxies (``make(target, name=...)``) that are all closed on exit."""
    made: list[FaultProxy] = []

    def make(target: str | tuple[str, int] | None = None, **kwargs: Any) -> FaultProxy:
        proxy = FaultProxy(target, **kwargs)
        made.append(proxy)
        return proxy

    try:
        yield make
    finally:
        for proxy in made:
            proxy.close()


try:
    import pytest
except ImportError:  # bench scripts import this module without pytest
    pass
else:
    @pytest.fixture
    def fault_proxy() -> Iterator[Callable[..., FaultProxy]]:
        """``fault_proxy(target)`` -> a :class:`FaultProxy`, closed when the test ends."""
        with proxies() as make:
            yield make
