"""A task's lifecycle at a gateway, written down: its phases, the moves between them, and
what clients see of each. Pure: no I/O, only the standard library.

A task accepted from a client (this gateway is its *home*) is placed by the home: here or
at a peer. A task forwarded by a peer lives at this gateway as a local one, and the peer is
its home. ::

    NEW ──► UNPLACED ──► QUEUED ──► RUNNING ──► SUCCEEDED / FAILED / CANCELLED
              │  ▲  ▲      │  ▲        │
              │  │  │      ▼  │        │ retry (spent) or preempted (free)
              │  │  │    FETCHING      ▼
              │  │  └──────────────── QUEUED (not federated, or forwarded here)
              │  └── WAITING_SITE (only sites that are down could run it)
              ▼
          FORWARDING ──► AT_PEER ──► RUNNING_AT_PEER ──► finished (the peer's event)
              └───────────┴──────────────┴──► UNPLACED again (refused, lost, peer down)

    HELD: a forwarded task found in the journal at a restart, not run until its home
    confirms it (then QUEUED) or takes it back (DROPPED: forgotten, no event).

``ALLOWED`` is the whole table; ``book.TaskBook.move`` is the one function that changes a
task's phase, and refuses any other move.
"""

from __future__ import annotations

import enum


class State(enum.IntEnum):
    """The five public states, numbered as the wire's TaskState (the journal stores them)."""

    QUEUED = 1
    RUNNING = 2
    SUCCEEDED = 3
    FAILED = 4
    CANCELLED = 5


TERMINAL_STATES = frozenset({State.SUCCEEDED, State.FAILED, State.CANCELLED})


class Phase(enum.Enum):
    NEW = "new"                          # built from a spec or a journal row, not yet in the book
    UNPLACED = "unplaced"                # a home task waiting for a placement decision
    WAITING_SITE = "waiting for a site"  # only sites that are down now could run it
    QUEUED = "queued"                    # in this site's queue, to run here
    FETCHING = "fetching inputs"         # its dataset arguments are on their way here
    FORWARDING = "forwarding"            # sent (or to be sent) to a peer, not yet acknowledged
    AT_PEER = "at a peer"                # a peer journaled it and will run it
    HELD = "held"                        # recovered here, waiting for its home to confirm it
    RUNNING = "running"                  # in Ray at this site
    RUNNING_AT_PEER = "running at a peer"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    DROPPED = "dropped"                  # its home took it back: forgotten here, no event

    @property
    def state(self) -> State:
        return _STATE[self]

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({Phase.SUCCEEDED, Phase.FAILED, Phase.CANCELLED, Phase.DROPPED})
# Phases in which an attempt is under way (here or at a peer): leaving one for a waiting
# phase ends the attempt, spent or refunded.
ACTIVE = frozenset({Phase.FORWARDING, Phase.AT_PEER, Phase.RUNNING, Phase.RUNNING_AT_PEER})
# Phases of a task that this gateway runs itself (local or forwarded here) and has not started.
WAITING_HERE = frozenset({Phase.QUEUED, Phase.FETCHING, Phase.HELD})

_STATE = {
    Phase.NEW: State.QUEUED, Phase.UNPLACED: State.QUEUED, Phase.WAITING_SITE: State.QUEUED,
    Phase.QUEUED: State.QUEUED, Phase.FETCHING: State.QUEUED, Phase.FORWARDING: State.QUEUED,
    Phase.AT_PEER: State.QUEUED, Phase.HELD: State.QUEUED,
    Phase.RUNNING: State.RUNNING, Phase.RUNNING_AT_PEER: State.RUNNING,
    Phase.SUCCEEDED: State.SUCCEEDED, Phase.FAILED: State.FAILED, Phase.CANCELLED: State.CANCELLED,
    Phase.DROPPED: State.CANCELLED,
}

_P = Phase
_FINISH = (_P.SUCCEEDED, _P.FAILED, _P.CANCELLED)
ALLOWED: dict[Phase, frozenset[Phase]] = {
    # Accepted (home: unplaced when federated, else queued; forwarded here: queued), or
    # restored from the journal where its row says it was.
    _P.NEW: frozenset({_P.UNPLACED, _P.QUEUED, _P.HELD, _P.FORWARDING, _P.RUNNING}),
    _P.UNPLACED: frozenset({_P.QUEUED, _P.FORWARDING, _P.WAITING_SITE, _P.FAILED, _P.CANCELLED}),
    _P.WAITING_SITE: frozenset({_P.UNPLACED, _P.CANCELLED}),
    # QUEUED -> FORWARDING: an idle peer took it (stealing). -> FAILED: it could not start.
    _P.QUEUED: frozenset({_P.RUNNING, _P.FETCHING, _P.FORWARDING, _P.FAILED, _P.CANCELLED, _P.DROPPED}),
    _P.FETCHING: frozenset({_P.QUEUED, _P.FAILED, _P.CANCELLED, _P.DROPPED}),
    # A peer may report a task before its ack arrives (a resend after a restart).
    _P.FORWARDING: frozenset({_P.AT_PEER, _P.RUNNING_AT_PEER, _P.UNPLACED, *_FINISH}),
    _P.AT_PEER: frozenset({_P.RUNNING_AT_PEER, _P.UNPLACED, *_FINISH}),
    _P.RUNNING_AT_PEER: frozenset({_P.UNPLACED, *_FINISH}),
    # Confirmed by its home: queued (or, if it was running, retried or failed).
    _P.HELD: frozenset({_P.QUEUED, _P.FAILED, _P.CANCELLED, _P.DROPPED}),
    # -> QUEUED / UNPLACED: retried (spent), preempted or drained (free).
    _P.RUNNING: frozenset({_P.QUEUED, _P.UNPLACED, *_FINISH, _P.DROPPED}),
    _P.SUCCEEDED: frozenset(), _P.FAILED: frozenset(), _P.CANCELLED: frozenset(), _P.DROPPED: frozenset(),
}


class IllegalMove(RuntimeError):
    """A move the table does not allow: a bug in the gateway, never the client's doing."""


def check(task_id: str, frm: Phase, to: Phase) -> None:
    if to not in ALLOWED[frm]:
        raise IllegalMove(f"task {task_id[:64]}: {frm.value} -> {to.value} is not a move of the lifecycle")
