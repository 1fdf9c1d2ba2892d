"""Stand-ins for what the task core's pure parts are given: a clock, Ray, an event loop
that runs callbacks at once. No asyncio, no Ray, no journal."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from intertie_gateway.book import Task, TaskBook
from intertie_gateway.estimates import Estimates
from intertie_gateway.model import TaskSpec, Update
from intertie_gateway.runner import Running

DIGEST = "d" * 64


def spec(task_id: str, **fields: Any) -> TaskSpec:
    return TaskSpec(task_id=task_id, function_digest=fields.pop("function_digest", DIGEST),
                    args=fields.pop("args", b"args"), **fields)


@dataclass
class Clock:
    now: float = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass
class BookWorld:
    """A book and what it told the outside."""

    book: TaskBook
    clock: Clock
    released: list[Task] = field(default_factory=list)
    started: list[tuple[set[str], Update]] = field(default_factory=list)
    turns: int = 0  # how often the book said a turn has journal changes


def book_world(*, federated: bool = False, site_id: str = "here",
               release: Callable[[Task], None] | None = None, price_per_cpu_hour: float = 0.0) -> BookWorld:
    clock = Clock()
    world: BookWorld

    def changed() -> None:
        world.turns += 1

    released: list[Task] = []
    started: list[tuple[set[str], Update]] = []
    book = TaskBook(site_id, federated=federated, estimates=Estimates(), release=release or released.append,
                    changed=changed,
                    progress=lambda sessions, update: started.append((sessions, update)), clock=clock,
                    price_per_cpu_hour=price_per_cpu_hour)
    world = BookWorld(book, clock, released, started)
    return world


class FakeRef:
    def __init__(self) -> None:
        self.result: Future[Any] = Future()

    def future(self) -> Future[Any]:
        return self.result


class FakeRunner:
    """Ray as the core sees it: every call is recorded and resolved by the test."""

    def __init__(self, pool_size: int = 0) -> None:
        self.pool_size = pool_size
        self.functions: set[str] = set()
        self.started: list[tuple[list[str], Running]] = []
        self.cancelled: list[Running] = []

    def total_resources(self) -> dict[str, float]:
        return {"CPU": 2.0}

    def largest_node(self) -> dict[str, float]:
        return self.total_resources()  # one node

    def pooled(self, request: object) -> bool:
        return self.pool_size > 0

    def has_function(self, digest: str) -> bool:
        return digest in self.functions

    def put_function(self, digest: str, payload: bytes) -> None:
        self.functions.add(digest)

    def submit(self, digest: str, name: str, args: bytes, batch: bool, request: object, inputs: object = None,
               **kwargs: object) -> Running:
        running = Running(FakeRef())
        self.started.append(([str(kwargs.get("task_id", ""))], running))
        return running

    def submit_many(self, digest: str, items: list[tuple[str, bytes, bool, str]], request: object,
                    **kwargs: object) -> Running:
        running = Running(FakeRef())
        self.started.append(([item[3] for item in items], running))
        return running

    def cancel(self, running: Running) -> None:
        # As ray.cancel: the call's ref fails, for every task that shares it.
        self.cancelled.append(running)
        if not running.ref.result.done():
            running.ref.result.set_exception(RuntimeError("TaskCancelledError"))

    def outcome(self, running: Running, fut: Future[Any]) -> tuple[str, Any]:
        try:
            return "ok", fut.result()
        except Exception as exc:
            return "internal", exc


def ok(result: bytes, run_s: float = 0.001, cpu_s: float = 0.0, kept: int = 0) -> tuple[Any, ...]:
    """A worker's outcome (``worker.Outcome``) of a call that returned ``result``: it ran
    ``run_s``, used ``cpu_s`` of CPU and stored ``kept`` bytes of tables at the site."""
    return (True, result, 0, "", "", "", b"", run_s, cpu_s, kept)


def failed(message: str, kind: int = 1, run_s: float = 0.001, cpu_s: float = 0.0) -> tuple[Any, ...]:
    """A worker's outcome of a call whose function raised."""
    return (False, b"", kind, "builtins.ValueError", message, "", b"", run_s, cpu_s, 0)


class Timer:
    def __init__(self, delay: float, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        self.delay, self.fn, self.args, self.cancelled = delay, fn, args, False

    def cancel(self) -> None:
        self.cancelled = True

    def fire(self) -> None:
        assert not self.cancelled
        self.fn(*self.args)


class InlineLoop:
    """An event loop as dispatch uses it: callbacks from Ray's threads wait until the test
    runs them (``run``), as they wait for the loop's next turn; timers until it fires them."""

    def __init__(self) -> None:
        self.timers: list[Timer] = []
        self.ready: list[tuple[Callable[..., None], tuple[Any, ...]]] = []

    def call_soon_threadsafe(self, fn: Callable[..., None], *args: Any) -> None:
        self.ready.append((fn, args))

    def run(self) -> None:
        while self.ready:
            fn, args = self.ready.pop(0)
            fn(*args)

    def call_later(self, delay: float, fn: Callable[..., None], *args: Any) -> Timer:
        timer = Timer(delay, fn, args)
        self.timers.append(timer)
        return timer
