"""The seams between the task core (the scheduler) and the federation (membership, peer links).

Each Protocol here is what one side calls on the other, no more, so that neither side
imports the other: ``scheduler`` imports this module, as do ``membership`` and ``peers``
(the link to one peer), and this module imports none of them. ``server``, the composition
root, joins them.

They are generic in the core's task type: a link carries the core's tasks without knowing
more of them than ``ForwardedTask``, and hands the same objects back (acks, a peer down), so
the core gets its own type back without a cast.

What crosses is the core's own vocabulary: a task's spec (``model.TaskSpec``; the link
builds the wire message), refusals as ``Failure``s, a peer's events as ``Update``s. Only
the peers' statuses are handed through as the wire's SiteStatus, untouched, to the two
readers that serve them on (ListSites, and the dataset transfers' addresses); they are typed
loosely here so that the core's seams need no generated code.

``Executor`` and ``Loop`` are what local dispatch needs of Ray and of the event loop.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, Protocol, TypeVar

from intertie_gateway.model import Failure, TaskSpec, Update
from intertie_gateway.placement import SiteView


class ForwardedTask(Protocol):
    """What a peer link reads of a task it sends."""

    @property
    def task_id(self) -> str: ...

    @property
    def spec(self) -> TaskSpec: ...

    @property
    def site(self) -> str:
        """The site the task is placed at now: a link sends it only while that is its peer."""
        ...

    @property
    def state(self) -> int:
        """A journal state: a finished task is not sent."""
        ...


TaskT = TypeVar("TaskT", bound=ForwardedTask)


class PeerPort(Protocol[TaskT]):
    """What the core calls on one peer: where it stands, and its link."""

    @property
    def site_id(self) -> str: ...

    @property
    def up(self) -> bool: ...

    def view(self) -> SiteView | None:
        """The peer as placement sees it, from its last status (None before the first)."""
        ...

    def forward(self, tasks: Sequence[TaskT]) -> None:
        """Queues tasks to be sent; their acks come back through ``PeerListener.on_forward_acks``."""
        ...

    def abandon(self) -> list[TaskT]:
        """The peer went down: takes back what was sent and not acknowledged, or not sent."""
        ...

    async def cancel(self, task_ids: Sequence[str]) -> None: ...


class Federation(Protocol[TaskT]):
    """What the core calls on the set of peers (``membership.Membership``)."""

    def start(self) -> None:
        """Starts the heartbeats (on the running event loop)."""
        ...

    async def close(self) -> None: ...

    def views(self) -> list[SiteView]:
        """Every peer as placement sees it, up or not."""
        ...

    def peer_for(self, site_id: str) -> PeerPort[TaskT] | None:
        """The peer that is ``site_id``, once it has been up."""
        ...

    def catalogue(self) -> list[Any]:
        """The peers as clients see them in ListSites."""
        ...

    def up_statuses(self) -> list[Any]:
        """The last status of each peer that is up; safe to call from other threads (Flight)."""
        ...

    async def verify(self, site_id: str, session_id: str) -> tuple[str, str]:
        """Whether the configured peer ``site_id`` opened a link here with ``session_id``:
        ("ok", ""), ("refused", why) or ("unreachable", why)."""
        ...

    def owns_link(self, site_id: str, session_id: str) -> bool:
        """Whether this site opened a link to ``site_id`` with ``session_id``."""
        ...


class PeerListener(Protocol[TaskT]):
    """What membership and the peer links call on the core: who this site is, what it has
    at a peer, and what happened at one."""

    @property
    def site_id(self) -> str: ...

    def tasks_at(self, site_id: str) -> list[str]:
        """The ids of the unfinished tasks of this home placed at ``site_id`` (a link's Reconcile)."""
        ...

    def function_bytes(self, digest: str) -> bytes | None:
        """A function's pickled bytes, sent once per link and digest."""
        ...

    def on_forward_acks(self, peer: PeerPort[TaskT], batch: Sequence[TaskT], refused: Mapping[str, Failure]) -> None:
        """A peer acknowledged a batch: the tasks in ``refused`` (by id) with a reason, the
        others accepted."""
        ...

    def on_peer_events(self, peer: PeerPort[TaskT], events: Sequence[Update]) -> None:
        """Tasks this home sent to ``peer`` started or finished there."""
        ...

    def on_reconciled(self, peer: PeerPort[TaskT], unknown: Sequence[str], unsent: set[str]) -> None:
        """A peer answered a link's Reconcile: ``unknown`` of the listed tasks it does not
        have; ``unsent`` were listed before they were sent (it cannot have those yet)."""
        ...

    def on_peer_down(self, peer: PeerPort[TaskT]) -> None: ...

    def on_peer_up(self, peer: PeerPort[TaskT]) -> None: ...

    def catalogue_changed(self) -> None:
        """A peer's new status is in: placement should read it."""
        ...

    def retry_unplaced(self) -> None:
        """Once per heartbeat: tasks waiting for a site get another go."""
        ...

    def idle_slots(self) -> int:
        """How many tasks this site would take from busy peers now (0: it is not idle)."""
        ...


class Handle(Protocol):
    def cancel(self) -> None: ...


class Loop(Protocol):
    """The event loop as local dispatch uses it (``asyncio.AbstractEventLoop``)."""

    def call_soon_threadsafe(self, callback: Callable[..., object], *args: Any) -> Any: ...

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> Handle: ...


class Executor(Protocol):
    """This site's Ray as local dispatch uses it (``runner.RayRunner``)."""

    @property
    def pool_size(self) -> int: ...

    def pooled(self, request: Mapping[str, float]) -> bool: ...

    def has_function(self, digest: str) -> bool: ...

    def put_function(self, digest: str, payload: bytes) -> None: ...

    def submit(self, digest: str, name: str, args: bytes, batch: bool, request: Mapping[str, float],
               inputs: dict[str, str] | None = None, *, task_id: str = "", returns_dataset: bool = False,
               tenant: str = "") -> Any:
        """Starts one call; returns it (``runner.Running``: its ``ref`` resolves when it ends)."""
        ...

    def submit_many(self, digest: str, items: list[tuple[str, bytes, bool, str]],
                    request: Mapping[str, float], *, tenants: Sequence[str] = ()) -> Any:
        """Starts one call running several tasks of one function (name, args, batch, task id)."""
        ...

    def outcome(self, running: Any, fut: Future[Any]) -> tuple[str, Any]:
        """("ok", what the worker returned) or (RETRY | PREEMPTED | INTERNAL, the exception)."""
        ...

    def cancel(self, running: Any) -> None: ...


class NoFederation(Federation[TaskT]):
    """The federation of a site without peers: nobody to place at, forward to or hear from."""

    def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def views(self) -> list[SiteView]:
        return []

    def peer_for(self, site_id: str) -> PeerPort[TaskT] | None:
        return None

    def catalogue(self) -> list[Any]:
        return []

    def up_statuses(self) -> list[Any]:
        return []

    async def verify(self, site_id: str, session_id: str) -> tuple[str, str]:
        return "refused", "this site has no peers configured"

    def owns_link(self, site_id: str, session_id: str) -> bool:
        return False
