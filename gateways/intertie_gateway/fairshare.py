"""The queue of tasks to run here, one lane per tenant, served by weighted dominant-resource
fair share (as Armada and HTCondor do): the next task comes from the tenant whose running
tasks hold the smallest share of the site, divided by its weight. A tenant that floods the
site waits behind its own tasks, not in front of everyone else's. Pure.

A lane keeps tasks that left QUEUED until they reach its head (they are skipped there), as
the single queue did.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar


@dataclass(frozen=True)
class Entitlement:
    """What a tenant may hold of the site, from its policy: most tasks running at once (0: no
    limit), most of each resource its running tasks hold (Ray's names: "CPU", "GPU"), and its
    weight in the fair share."""

    max_running: int = 0
    max_resources: Mapping[str, float] = field(default_factory=dict)
    weight: float = 1.0

    def admits(self, running: int, used: Mapping[str, float] | None, request: Mapping[str, float]) -> bool:
        """Whether one more task with ``request`` stays within it."""
        if self.max_running and running >= self.max_running:
            return False
        for resource, most in self.max_resources.items():
            if (used.get(resource, 0.0) if used else 0.0) + request.get(resource, 0.0) > most + 1e-9:
                return False
        return True


UNLIMITED = Entitlement()


class Queued(Protocol):
    @property
    def tenant(self) -> str: ...


T = TypeVar("T", bound=Queued)


class FairQueue(Generic[T]):
    def __init__(self) -> None:
        self.lanes: dict[str, deque[T]] = {}
        self._size = 0  # entries, stale ones included (as len() of a deque was)

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[T]:
        for lane in list(self.lanes.values()):
            yield from lane

    def append(self, task: T) -> None:
        self._lane(task.tenant).append(task)
        self._size += 1

    def appendleft(self, task: T) -> None:
        self._lane(task.tenant).appendleft(task)
        self._size += 1

    def _lane(self, tenant: str) -> deque[T]:
        lane = self.lanes.get(tenant)
        if lane is None:
            lane = self.lanes[tenant] = deque()
        return lane

    def popleft(self, tenant: str) -> T:
        self._size -= 1
        return self.lanes[tenant].popleft()

    def remove(self, tenant: str, index: int) -> T:
        lane = self.lanes[tenant]
        task = lane[index]
        del lane[index]
        self._size -= 1
        return task

    def keep(self, wanted: Callable[[T], bool]) -> None:
        """Drops the entries ``wanted`` says no to."""
        for tenant, lane in list(self.lanes.items()):
            kept = deque(t for t in lane if wanted(t))
            self._size -= len(lane) - len(kept)
            self.lanes[tenant] = kept

    def prune(self, live: Callable[[T], bool]) -> None:
        """Drops stale heads and empty lanes."""
        for tenant, lane in list(self.lanes.items()):
            while lane and not live(lane[0]):
                lane.popleft()
                self._size -= 1
            if not lane:
                del self.lanes[tenant]

    def order(self, share: Callable[[str], float]) -> list[str]:
        """The tenants with queued tasks, the one to serve first first: the smallest
        weighted share, ties in order of arrival of their lanes."""
        if len(self.lanes) <= 1:
            return list(self.lanes)
        return sorted(self.lanes, key=share)


def dominant_share(used: Mapping[str, float], total: Mapping[str, float], weight: float) -> float:
    """The largest fraction of any resource of the site that a tenant's running tasks hold,
    divided by the tenant's weight."""
    share = 0.0
    for resource, amount in used.items():
        capacity = total.get(resource, 0.0)
        if capacity > 0 and amount > 0:
            share = max(share, amount / capacity)
    return share / weight

