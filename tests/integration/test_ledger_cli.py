"""``intertie-gateway ledger verify`` as an operator runs it: a program reading a state dir,
intact or tampered with, written by a Journal and its ledger here or by a real gateway."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from operator_cli import gateway_cli

import intertie
from intertie_gateway.journal import Journal
from intertie_gateway.ledger import LedgerSettings
from intertie_gateway.lifecycle import State
from intertie_gateway.model import Finished, Started, Usage

BOUND_S = 120.0  # a task on a loaded 2-core machine
SUMMARY = re.compile(r"^ledger of site (\S+): (\d+) entries, (\d+) checkpoints, all verified; "
                     r"last checkpoint at size (\d+), \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC$")


def verify(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "intertie_gateway", "ledger", "verify", "--state-dir", str(state),
                           *args], capture_output=True, text=True, timeout=60)


def write_ledger(state: Path, tasks: int = 30, site: str = "alpha") -> None:
    """A ledger of ``tasks`` entries with checkpoints at 10, 20, 30 (and the rest at the end)."""
    journal = Journal(state / "journal.sqlite", ledger=LedgerSettings(site, state / "ledger.key", every=10))
    ids = [f"t{i}" for i in range(tasks)]
    journal.accept([], [(t, b"spec", b"") for t in ids], now=1.0)
    journal.write([Started(t, 1, site, 2.0) for t in ids])
    for start in range(0, tasks, 10):
        journal.write([Finished(t, State.SUCCEEDED, 1, site, 3.0, b"r", None,
                                usage=Usage("acme", t, 1, "", "succeeded", 2.0, 3.0, 1.0, 0.0, 0.25, 10, 1))
                       for t in ids[start:start + 10]])
    journal.ledger.checkpoint_now()
    journal.close()


def tamper(state: Path, sql: str, *params: object) -> None:
    db = sqlite3.connect(state / "journal.sqlite")
    db.execute(sql, params)
    db.commit()
    db.close()


def test_an_intact_ledger_is_verified_in_one_line(tmp_path: Path) -> None:
    write_ledger(tmp_path)
    line = gateway_cli("ledger", "verify", "--state-dir", str(tmp_path))
    match = SUMMARY.match(line)
    assert match is not None, line
    assert match.groups() == ("alpha", "30", "3", "30")


def test_a_tampered_ledger_fails_naming_the_first_bad_entry_or_checkpoint(tmp_path: Path) -> None:
    write_ledger(tmp_path)
    db = sqlite3.connect(tmp_path / "journal.sqlite")
    entry = db.execute("SELECT entry FROM ledger_entries WHERE idx = 7").fetchone()[0]
    db.close()
    tamper(tmp_path, "UPDATE ledger_entries SET entry = ? WHERE idx = 7",
           entry.replace(b'"cpu_time_s":0.25', b'"cpu_time_s":0.01'))
    done = verify(tmp_path)
    assert done.returncode == 1, done
    assert done.stdout.strip() == ("ledger of site alpha: NOT verified: entry 7 was altered: its bytes do not hash "
                                   "to the stored leaf")
    tamper(tmp_path, "UPDATE ledger_entries SET entry = ? WHERE idx = 7", entry)
    tamper(tmp_path, "DELETE FROM ledger_entries WHERE idx = 21")
    done = verify(tmp_path)
    assert done.returncode == 1 and "entry 21 is missing" in done.stdout, done


def test_a_forged_checkpoint_fails(tmp_path: Path) -> None:
    write_ledger(tmp_path)
    tamper(tmp_path, "UPDATE ledger_checkpoints SET root = ? WHERE size = 20", b"\x00" * 32)
    done = verify(tmp_path)
    assert done.returncode == 1 and "checkpoint at size 20 is forged" in done.stdout, done


def test_a_pinned_public_key_is_what_signatures_are_checked_with(tmp_path: Path) -> None:
    write_ledger(tmp_path / "a")
    write_ledger(tmp_path / "b")
    public = tmp_path / "a.pub"
    done = subprocess.run(["openssl", "pkey", "-in", str(tmp_path / "a" / "ledger.key"), "-pubout", "-out",
                           str(public)], capture_output=True, text=True)
    if done.returncode != 0:  # no openssl here: the private key file works as well
        public = tmp_path / "a" / "ledger.key"
    assert verify(tmp_path / "a", "--public-key", str(public)).returncode == 0
    done = verify(tmp_path / "b", "--public-key", str(public))
    assert done.returncode == 1 and "checkpoint at size 10 is forged" in done.stdout, done


def test_nothing_to_verify_is_said_in_one_line(tmp_path: Path) -> None:
    done = verify(tmp_path / "nowhere")
    assert done.returncode == 2 and done.stderr.startswith("intertie-gateway: no journal at"), done
    Journal(tmp_path / "journal.sqlite").close()
    done = verify(tmp_path)
    assert done.returncode == 2 and "holds no usage ledger" in done.stderr, done
    assert "Traceback" not in done.stderr


def test_a_lost_key_is_replaced_with_new_key(tmp_path: Path) -> None:
    write_ledger(tmp_path)
    (tmp_path / "ledger.key").unlink()
    line = gateway_cli("ledger", "new-key", "--state-dir", str(tmp_path))
    assert "public key" in line
    # The old checkpoints verify with the retired key the ledger records.
    assert SUMMARY.match(gateway_cli("ledger", "verify", "--state-dir", str(tmp_path)))


def quick(x: int) -> int:
    return x * 2


def test_a_real_gateway_ledger_verifies_while_it_runs_and_after_it_stops(
        gateway_factory: Callable[..., Any]) -> None:
    site = gateway_factory(site_id="ledgered").start()
    try:
        fed = intertie.connect(site.address)
        try:
            assert [f.result(timeout=BOUND_S) for f in [fed.submit(quick, i) for i in range(5)]] == [
                0, 2, 4, 6, 8]
        finally:
            fed.close()
        key = site.state_dir / "ledger.key"
        assert key.stat().st_mode & 0o777 == 0o600
        running = verify(site.state_dir)  # a reader beside the running gateway
        assert running.returncode == 0 and running.stdout.startswith("ledger of site ledgered: 5 entries"), running
    finally:
        assert site.stop() == 0
    line = gateway_cli("ledger", "verify", "--state-dir", str(site.state_dir))
    match = SUMMARY.match(line)
    assert match is not None, line
    assert match.group(1) == "ledgered" and match.group(2) == "5" and match.group(4) == "5"  # signed at the stop
