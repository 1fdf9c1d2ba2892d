"""What a notebook user sees: futures that say how they ended, and a ``connect()`` cell run
again that reuses the embedded site instead of starting another Ray."""

from __future__ import annotations

import os
import time

import pytest

import intertie
from intertie import embedded

BOUND_S = 60.0


def square(x: int) -> int:
    return x * x


def fail(x: int) -> None:
    raise ValueError(f"bad value {x}\nsecond line")


def hold(path: str) -> None:
    while not os.path.exists(path):
        time.sleep(0.01)


def test_a_future_says_how_it_ended(fed: intertie.Federation, tmp_path) -> None:  # type: ignore[no-untyped-def]
    failed = fed.submit(fail, 5)
    with pytest.raises(ValueError):
        failed.result(timeout=BOUND_S)
    assert repr(failed) == f"<TaskFuture {failed.task_id} failed: ValueError: bad value 5 at shared>"

    finished = fed.submit(square, 2)
    finished.result(timeout=BOUND_S)
    assert repr(finished) == f"<TaskFuture {finished.task_id} finished at shared>"

    held = intertie.remote(cpus=0.1)(hold).submit(str(tmp_path / "go"))
    assert repr(held) in (f"<TaskFuture {held.task_id} pending>", f"<TaskFuture {held.task_id} running>",
                          f"<TaskFuture {held.task_id} running at shared>")
    assert held.cancel()
    # (at the site once it has started there: the RUNNING event may or may not have come yet)
    assert repr(held) in (f"<TaskFuture {held.task_id} cancelled>", f"<TaskFuture {held.task_id} cancelled at shared>")


def test_connecting_again_reuses_the_running_embedded_site(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INTERTIE_ADDRESS", raising=False)
    first = intertie.connect(num_cpus=1)
    gateway = None
    try:
        (gateway,) = [g for g in embedded._shared.values() if g.address == first.address]
        started = time.monotonic()
        second = intertie.connect(num_cpus=1)  # the cell run again; `first` is still open
        assert time.monotonic() - started < 5  # no Ray start
        assert second.address == first.address and second.session_id != first.session_id
        first.close()  # the site stays up for the other connection
        assert gateway.alive()
        assert second.submit(square, 6).result(timeout=BOUND_S) == 36
        second.close()  # the last connection: the site stops
        assert not gateway.alive()
        assert gateway not in embedded._shared.values()
    finally:
        first.close()
        if gateway is not None:
            gateway.stop()
