"""Arrow decoding of network data runs in the data-plane process: a stream that crashes Arrow
stops that process only, and the gateway restarts it on the same port."""

from __future__ import annotations

import base64
import time

import grpc
import pyarrow as pa
import pytest

import intertie

# A DoPut found by bench/fuzz.py: a dictionary-encoded upload whose third FlightData carries a
# body but no IPC header. Arrow 26's C++ Flight reader dereferences a null buffer on it
# (arrow::ipc::Message::Open) before any Python code sees a batch: it kills the process.
CRASHING_PUT = [base64.b64decode(m) for m in (
    "ChgIAhIUeyJuYW1lIjogImZ1enotcHV0In0SkAEQAAAAAAAKAAwABgAFAAgACgAAAAABBAAEAAAAvP///wQAAAABAAAAFAAAABAAGAAIAAYA"
    "BwAMABAAFAAQAAAAAAABBRQAAABAAAAAHAAAAAQAAAAAAAAAAQAAAHYAAAAIAAgAAAAEAAgAAAAMAAAACAAMAAgABwAIAAAAAAAAASAAAAAE"
    "AAQABAAAAAAAAAA=",
    "EqgBFAAAAAAAAAAMABQABgAFAAgADAAMAAAAAAIEABQAAAAYAAAAAAAAAAgACgAAAAQACAAAABAAAAAAAAoAGAAMAAQACAAKAAAATAAAABAA"
    "AAADAAAAAAAAAAAAAAADAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAEAAAAAAAAAAQAAAAAAAAAAMAAAAAAAAAAAAAAAEAAAADAAAAAAAA"
    "AAAAAAAAAAAAwj4YAAAAAAEAAAACAAAAAwAAAHh5egAAAAAA",
    "wj4gOwAAAAAAAAAAAAAAAQAAAAAAAAAAAAAAAgAAAAEAAAA=",
    "EogBFAAAAAAAAAAMABYABgAFAAgADAAMAAAAAAMEABgAAAAQAAAAAAAAAAAACgAYAAwABAAIAAoAAAA8AAAAEAAAAAMAAAAAAAAAAAAAAAIA"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAMAAAAAAAAAAAAAAABAAAAAwAAAAAAAAAAAAAAAAAAAMI+EAAAAAACAAAAAQAAAAAAAAA=",
)]


def negate(x: int) -> int:
    return -x


def test_a_stream_that_crashes_arrow_stops_only_the_data_plane(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    site = gateway_factory(num_cpus=1, site_id="dp").start()
    table = pa.table({"v": pa.array(range(1000), pa.int64())})
    with intertie.connect(site.address) as fed:
        kept = fed.put_dataset(table, name="kept")
        assert fed.submit(negate, 3).result(timeout=60) == -3
        flight_address = fed.sites()[0].flight_address
        with grpc.insecure_channel(flight_address) as channel:
            put = channel.stream_stream("/arrow.flight.protocol.FlightService/DoPut")
            with pytest.raises(grpc.RpcError):  # the process that read it is gone
                for _ in put(iter(CRASHING_PUT), timeout=30):
                    pass
        deadline = time.monotonic() + 60
        while "the data plane of site dp died" not in site.log_tail(200):
            assert site.process is not None and site.process.poll() is None, \
                f"the stream killed the gateway itself:\n{site.log_tail()}"
            assert time.monotonic() < deadline, "the data plane did not crash: is the stream still a crasher?"
            time.sleep(0.1)
        # The site goes on: the gateway, its Ray and its journal never noticed.
        assert site.process.poll() is None
        assert fed.submit(negate, 4).result(timeout=60) == -4
        # The data plane is back on the same port, with what it had stored.
        assert fed.sites()[0].flight_address == flight_address
        while True:
            try:
                assert fed.get_dataset(kept).equals(table)
                break
            except intertie.IntertieError:
                assert time.monotonic() < deadline, "the data plane never came back"
                time.sleep(0.1)
        again = fed.put_dataset(table, name="after")
        assert fed.get_dataset(again).equals(table)
