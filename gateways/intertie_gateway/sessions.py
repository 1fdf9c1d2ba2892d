"""Client sessions: where a task's events go. One server stream per session."""

from __future__ import annotations

import asyncio
import logging

from intertie.v1 import tasks_pb2
from intertie_gateway.convert import update_to_event
from intertie_gateway.model import Update

logger = logging.getLogger(__name__)


class Session:
    __slots__ = ("session_id", "progress", "peer", "events", "replies", "wakeup", "closed", "failure", "failure_kind",
                 "reconciling", "scope")

    def __init__(self, session_id: str, progress: bool, peer: str = "") -> None:
        self.session_id = session_id
        self.progress = progress
        self.peer = peer  # the site whose verified link this is; "" for a client
        self.events: list[tasks_pb2.TaskEvent] = []
        self.replies: list[tasks_pb2.ServerMessage] = []  # acks and reconcile answers, in order (Connect)
        self.wakeup = asyncio.Event()
        self.closed = False
        self.failure: str | None = None  # why a Connect stream must end with an error
        self.failure_kind = ""  # its ErrorKind name: INVALID_ARGUMENT (the client's fault) or INTERNAL
        self.reconciling: list[str] = []  # task ids of a Reconcile that has more parts coming
        self.scope = ""  # a tenant's session: what its task ids are filed under (tenancy.scope)

    def push(self, event: tasks_pb2.TaskEvent) -> None:
        self.events.append(event)
        self.wakeup.set()

    def push_reply(self, reply: tasks_pb2.ServerMessage) -> None:
        self.replies.append(reply)
        self.wakeup.set()

    def take_replies(self) -> list[tasks_pb2.ServerMessage]:
        replies, self.replies = self.replies, []
        return replies

    def take(self) -> list[tasks_pb2.TaskEvent]:
        self.wakeup.clear()
        events, self.events = self.events, []
        return events


class SessionHub:
    """Sessions with an open stream. Events for a session without one are not buffered:
    the client resubscribes when it reconnects and gets the journaled state then."""

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}

    def open(self, session_id: str, progress: bool, peer: str = "") -> Session:
        old = self._sessions.get(session_id)
        if old is not None:
            old.closed = True
            old.wakeup.set()
        session = Session(session_id, progress, peer)
        self._sessions[session_id] = session
        return session

    def close(self, session: Session) -> None:
        session.closed = True
        if self._sessions.get(session.session_id) is session:
            del self._sessions[session.session_id]

    def push(self, session_ids: set[str] | None, event: tasks_pb2.TaskEvent, *, progress: bool = False) -> None:
        if not session_ids:
            return
        for sid in session_ids:
            session = self._sessions.get(sid)
            if session is not None and (not progress or session.progress):
                session.push(event)

    def tell(self, session_ids: set[str] | None, update: Update, *, progress: bool = False) -> None:
        """The core's update, as the event the sessions' streams carry (built only if one is open)."""
        if session_ids and any(sid in self._sessions for sid in session_ids):
            self.push(session_ids, update_to_event(update), progress=progress)

    def __len__(self) -> int:
        return len(self._sessions)
