"""Hostile input never kills a site: a few fuzz cases per RPC and per Flight method, against
a real gateway. (bench/fuzz.py, ``make chaos``, sends thousands per method.)

Every gRPC method of every service the gateway serves, and every Arrow Flight method of its
dataset endpoint, gets random bytes, valid messages with hostile values, mutated
serializations and wire-level oddities (tests/fuzzing.py), sent raw so nothing on the client
side validates them. After each case: the gateway still runs and answers GetStatus; the answer
was OK or a clean typed status (never UNKNOWN or INTERNAL from the gateway, no traceback or
raw Python exception in it, no details over a few KB, no per-task error repeating a huge id);
nothing hung past its deadline; an upload the gateway accepted is stored valid, with its
rows, at a sane size. At the end: the journal passes ``PRAGMA integrity_check`` and the log
holds a handful of tracebacks, not one per garbage request.

Deterministic (derandomized hypothesis, no database, no shrinking: a case that kills the
gateway would poison every shrink step). A failing case is printed and saved whole under the
site's state dir; ``.venv/bin/python bench/fuzz.py --replay FILE`` sends it again.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fuzzing  # noqa: E402

# Cases per method (plus the hand-picked ones of fuzzing.known_cases); the corrupted-upload
# row gets twice as many.
EXAMPLES = int(os.environ.get("INTERTIE_FUZZ_EXAMPLES", "50"))
DEADLINE_S = 10.0
# Tracebacks the gateway may log over the whole module (it logs the first of each kind per
# minute in full and counts the rest).
MAX_TRACEBACKS = 10
GARBAGE_BURST = 20


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[fuzzing.Site]:
    """A gateway of its own (a crash here must not take the suite's shared site down): one
    CPU, the suite's small object store."""
    s = fuzzing.Site.start(tmp_path_factory.mktemp("fuzz-site"), site_id="fuzz", num_cpus=1, deadline_s=DEADLINE_S)
    try:
        yield s
    finally:
        s.close()


def _fuzz(site: fuzzing.Site, method: str, examples: int) -> None:
    site.ensure()  # an earlier test may have left it dead: start it again on the same state
    if method.startswith("Flight/"):
        base = fuzzing.ensure_base_dataset(site)  # what tickets and actions refer to
        assert base.kind == "ok", base.report()
    sent: list[int] = [0]

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], report_multiple_bugs=False, print_blob=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.large_base_example, HealthCheck.filter_too_much])
    @given(fuzzing.cases(method))
    def run(case: fuzzing.Case) -> None:
        sent[0] += 1
        outcome = site.send(case)
        dead = site.dead()
        assert dead is None, f"the gateway is down after this input ({dead}):\n{outcome.report()}"
        assert outcome.kind in ("ok", "typed", "transport"), outcome.report()

    for case in reversed(fuzzing.known_cases(method)):  # the last one applied runs first
        run = example(case)(run)
    run()
    assert sent[0] >= examples


@pytest.mark.parametrize("method", fuzzing.GRPC_METHOD_NAMES)
def test_grpc_method_survives_hostile_input(site: fuzzing.Site, method: str) -> None:
    _fuzz(site, method, EXAMPLES)


def test_raw_doput_encoder_stores_and_serves_uncorrupted_streams(site: fuzzing.Site) -> None:
    """The hand-encoded DoPut of the corruption cases is right: every uncorrupted base stream
    (lists, strings, binaries, dictionaries, structs, maps, unions...) is stored equal to what
    was sent, and DoGet serves it back equal."""
    site.ensure()
    problems = fuzzing.check_encoder(site)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("method", fuzzing.FLIGHT_METHOD_NAMES)
def test_flight_method_survives_hostile_input(site: fuzzing.Site, method: str) -> None:
    _fuzz(site, method, 2 * EXAMPLES if method == "Flight/DoPut(ipc)" else EXAMPLES)


def test_journal_and_log_after_fuzzing(site: fuzzing.Site) -> None:
    """After everything above and a burst of GARBAGE_BURST garbage requests per method (the
    tests above stop at their first failure, so this one sends its own): the journal is
    sound, and the log has not grown a traceback per garbage request."""
    site.ensure()
    for method in fuzzing.METHODS:
        for case in fuzzing.garbage_cases(method, GARBAGE_BURST):
            outcome = site.send(case)
            assert outcome.kind != "crash", outcome.report()
    assert site.dead() is None
    assert fuzzing.journal_integrity(site.state_dir) == "ok"
    tracebacks = fuzzing.traceback_lines(site.log_path)
    assert tracebacks <= MAX_TRACEBACKS, (
        f"{tracebacks} tracebacks in {site.log_path} (at most {MAX_TRACEBACKS}) after "
        f"{GARBAGE_BURST * len(fuzzing.METHODS)} garbage requests and the fuzzing: tracebacks per garbage request")
