"""The site's core as membership and the peer links call it, for their unit tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from intertie_gateway.book import Task
from intertie_gateway.model import Failure, Update
from intertie_gateway.ports import PeerPort


class FakeListener:
    """A ``ports.PeerListener`` that records peers going down and lists ``at_peer`` as the
    tasks it has at any peer; ``broken_up`` makes on_peer_up raise (a bug in the core)."""

    site_id = "home"

    def __init__(self, *, broken_up: bool = False) -> None:
        self.at_peer: list[str] = []
        self.downs: list[PeerPort[Task]] = []
        self.broken_up = broken_up

    def tasks_at(self, site_id: str) -> list[str]:
        return self.at_peer

    def function_bytes(self, digest: str) -> bytes | None:
        return b"pickled function"

    def on_forward_acks(self, peer: PeerPort[Task], batch: Sequence[Task], refused: Mapping[str, Failure]) -> None:
        pass

    def on_peer_events(self, peer: PeerPort[Task], events: Sequence[Update]) -> None:
        pass

    def on_reconciled(self, peer: PeerPort[Task], unknown: Sequence[str], unsent: set[str]) -> None:
        pass

    def on_peer_down(self, peer: PeerPort[Task]) -> None:
        self.downs.append(peer)

    def on_peer_up(self, peer: PeerPort[Task]) -> None:
        if self.broken_up:
            raise RuntimeError("a bug in on_peer_up")

    def catalogue_changed(self) -> None:
        pass

    def retry_unplaced(self) -> None:
        pass

    def idle_slots(self) -> int:
        return 0
