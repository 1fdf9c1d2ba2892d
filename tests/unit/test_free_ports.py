"""Ports a local federation's sites must know of each other before they start."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from intertie import embedded


def test_ports_are_distinct_free_and_outside_what_the_kernel_hands_out() -> None:
    ports = embedded.free_ports(8)
    assert len(set(ports)) == 8
    proc = Path("/proc/sys/net/ipv4/ip_local_port_range")
    if proc.exists() and not embedded._overlaps_ephemeral(*embedded.PICK_PORTS_FROM):
        first, last = map(int, proc.read_text().split())
        low, high = embedded.PICK_PORTS_FROM
        assert all(low <= p <= high and not first <= p <= last for p in ports)
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # free


def test_a_port_in_use_is_never_picked(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        monkeypatch.setattr(embedded, "PICK_PORTS_FROM", (port, port))  # the only candidate is in use
        monkeypatch.setattr(embedded, "_overlaps_ephemeral", lambda low, high: False)
        with pytest.raises(OSError, match="found only 0 of 1"):
            embedded.free_ports(1)
