"""Futures for tasks: standard ``concurrent.futures.Future`` objects with task metadata."""

from __future__ import annotations

import concurrent.futures
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from intertie._submitter import Submitter
    from intertie.spec import PlacementInfo


class TaskFuture(concurrent.futures.Future):  # type: ignore[type-arg]
    """The result of one task. ``wait``/``as_completed`` work as for any future.

    ``task_id`` identifies the task at its home gateway (``fed.future(task_id)``
    gets a new future for it later, also from another client); ``site`` and
    ``attempts`` are filled in when the task finishes.
    """

    def __init__(self, task_id: str, federation: Submitter | None = None) -> None:
        super().__init__()
        self.task_id = task_id
        self.site: str | None = None
        self.attempts = 0
        self._federation = federation
        self._final_placement: PlacementInfo | None = None  # once done, where it ran no longer changes
        # Set once the gateway has answered the Submit that carried this task; a cancel
        # must not overtake it, or the gateway would not yet know the task.
        self._acked = threading.Event()

    @property
    def placement(self) -> PlacementInfo | None:
        """Where the task was placed and why: the chosen site, the candidates with their
        estimated wait, transfer, run time, price and carbon, and the sites rejected.
        Asked of the home gateway while the task is unfinished; kept once it is done."""
        if self._final_placement is not None:
            return self._final_placement
        if self._federation is None:
            return None
        done = self.done()  # asked before the call: a placement read after it finished is final
        placement: PlacementInfo | None = self._federation.task(self.task_id).placement
        if done:
            self._final_placement = placement
        return placement

    def cancel(self) -> bool:
        """Cancels the task at its gateway, whether it is queued or running.

        Returns False when the task had already finished.
        """
        if self.done():
            return self.cancelled()
        if self._federation is None:
            return super().cancel()
        if not self._federation._cancel_task(self):
            return self.cancelled()
        return self._set_cancelled()

    def _set_cancelled(self) -> bool:
        """Moves the future to the standard CANCELLED state (result() raises CancelledError)."""
        return concurrent.futures.Future.cancel(self) or self.cancelled()

    # Resolution from the event stream; a future the user cancelled stays cancelled.
    def _resolve(self, value: Any = None, exc: BaseException | None = None) -> None:
        if self.done():
            return
        try:
            if exc is not None:
                self.set_exception(exc)
            else:
                self.set_result(value)
        except concurrent.futures.InvalidStateError:
            pass

    def __repr__(self) -> str:
        return f"<TaskFuture {self.task_id} {self._state.lower()}{' at ' + self.site if self.site else ''}>"
