"""Dataset transfers between two real gateways when the holder dies mid-transfer.

The holder serves at most 8 MB/s per transfer (an operator's uplink cap), so a 24 MB
pull takes about three seconds: long enough to kill the holder in the middle of it.
"""

from __future__ import annotations

import time

import pyarrow as pa
import pytest

import intertie
from intertie.embedded import free_ports

PULL_STALL_S = 30


def column_sum(table: pa.Table, column: str) -> int:
    import pyarrow.compute as pc

    return pc.sum(table.column(column)).as_py()


def wait_for(condition, message: str, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.05)


def test_holder_killed_mid_transfer(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    holder_port, holder_flight, puller_port = free_ports(3)
    common = ["--heartbeat", "0.3"]
    holder = gateway_factory(*common, "--listen", f"127.0.0.1:{holder_port}",
                             "--flight-listen", f"127.0.0.1:{holder_flight}", "--flight-max-rate", "8e6",
                             "--peer", f"127.0.0.1:{puller_port}", site_id="holder", num_cpus=1).start()
    puller = gateway_factory(*common, "--listen", f"127.0.0.1:{puller_port}", "--pull-timeout", str(PULL_STALL_S),
                             "--peer", f"127.0.0.1:{holder_port}", site_id="puller", num_cpus=1).start()
    total = sum(range(3_000_000))
    with intertie.connect(puller.address) as fed:
        def holder_state() -> str:
            return {s.site_id: s.state for s in fed.sites()}.get("holder", "")

        wait_for(lambda: holder_state() == "up", "the holder never came up")
        big = fed.put_dataset(pa.table({"v": pa.array(range(3_000_000), pa.int64())}), site="holder")  # 24 MB
        other = fed.put_dataset(pa.table({"v": pa.array(range(1000), pa.int64())}), site="holder")
        at_puller = intertie.remote(site="puller")(column_sum)

        # Kill the holder while the puller has part of the data, then bring it back: the
        # transfer resumes where it stopped and the waiting task runs.
        fut = at_puller.submit(big, "v")
        part = puller.state_dir / "datasets" / f"{big.id}.arrow.part"
        wait_for(lambda: part.exists() and part.stat().st_size > 4 << 20, "the transfer never started")
        holder.kill()
        assert not fut.done()
        holder.start()
        assert fut.result(timeout=120) == total and fut.site == "puller"
        resumed = [line for line in puller.log_tail(400).splitlines() if "resuming the transfer" in line]
        assert resumed and f"dataset {big.id} at batch " in resumed[0]
        assert int(resumed[0].rsplit("at batch ", 1)[1].split()[0]) > 0  # not from the start
        replica = {r.id: r for r in fed.datasets(site="puller")}[big.id]
        assert replica.origin == "holder" and replica.num_rows == 3_000_000 and not part.exists()

        # The puller stopped cleanly mid-transfer: it stops promptly, the waiting task stays
        # queued in its journal, and after the restart the data is fetched and the task runs.
        third = fed.put_dataset(pa.table({"v": pa.array(range(3_000_000), pa.int64())}), site="holder")
        waiting = at_puller.submit(third, "v")
        part = puller.state_dir / "datasets" / f"{third.id}.arrow.part"
        wait_for(lambda: part.exists() and part.stat().st_size > 4 << 20, "the second transfer never started")
        stopping = time.monotonic()
        assert puller.stop() == 0 and time.monotonic() - stopping < 15
        puller.start()
        assert waiting.result(timeout=120) == total and waiting.attempts == 1  # the stop cost no attempt

        # The holder gone for good and no replica anywhere: the task fails with a clear error.
        holder.kill()
        wait_for(lambda: holder_state() == "down", "the holder was never marked down")
        lost = at_puller.submit(other, "v")
        with pytest.raises(intertie.SiteFailureError, match=f"dataset {other.id} could not be fetched"):
            lost.result(timeout=PULL_STALL_S + 60)
        assert other.id not in {r.id for r in fed.datasets(site="puller")}
        assert at_puller.submit(big, "v").result(timeout=60) == total  # the replica still serves
