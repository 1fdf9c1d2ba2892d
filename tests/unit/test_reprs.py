"""What users read of the value types: short reprs, Jupyter tables, the formatting helpers."""

from __future__ import annotations

import re
import time

import pytest

from intertie.display import REPR_LIMIT, Listing, fmt_age, fmt_bytes, fmt_number, fmt_seconds, parse_bytes
from intertie.spec import (
    AttemptInfo,
    PlacementInfo,
    Quote,
    Resources,
    SiteScore,
    SiteStatus,
    TaskInfo,
    TaskOptions,
)

NOW = time.time()
TASK_ID = "0123456789abcdef0123456789abcdef"
# An epoch time (10 digits) or a float printed at full precision.
RAW_NUMBER = re.compile(r"\d{9,}|\d\.\d{4,}")


@pytest.fixture(autouse=True)
def _frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ages are measured from NOW, however long the test takes."""
    monkeypatch.setattr(time, "time", lambda: NOW)


def site(site_id: str = "shared", **changes: object) -> SiteStatus:
    values: dict[str, object] = dict(
        site_id=site_id, compute_id=f"urn:intertie:site:local:{site_id}", address="127.0.0.1:41234", state="up",
        arch="x86_64", python_version="3.11",
        resources_total={"CPU": 2.0, "memory": 4.123456789e9, "bigmem": 1.0, "accelerator_type:A100": 1.0},
        resources_free={"CPU": 1.4999999999, "memory": 1.2e9, "bigmem": 1.0}, queued=3, running=2,
        throughput=12.345678901234, labels={"region": "test"}, max_payload_bytes=4 << 20, version="0.1.0",
        accelerators=("A100",), mean_run_s=0.123456789, last_seen=NOW - 3.2, rtt_s=0.0012345)
    values.update(changes)
    return SiteStatus(**values)  # type: ignore[arg-type]


SCORES = (SiteScore("b", 0.1234567, 0.2, 1.000001, 0.0, 0.0, 1.3234567),
          SiteScore("a", 3.2, 0.0, 1.0, 0.0, 0.0, 4.2), SiteScore("c", 30.0, 0.0, 1.0, 0.0, 0.0, 31.0),
          SiteScore("d", 300.0, 0.0, 1.0, 0.0, 0.0, 301.0))


def placement(site_id: str | None = "b", scores: tuple[SiteScore, ...] = SCORES) -> PlacementInfo:
    return PlacementInfo(site_id, "lowest estimated completion", scores, (("e", "needs GPU=1"),), 2,
                         len(scores), NOW - 5.1)


def task(**changes: object) -> TaskInfo:
    values: dict[str, object] = dict(
        task_id=TASK_ID, name="tests.unit.test_reprs.double", state="FAILED", site="b", attempts=2,
        max_retries=3, error="bad input", error_kind="remote", submitted_at=NOW - 100.3, started_at=NOW - 10.25,
        finished_at=NOW - 8.5, resources=Resources(cpus=2), history=(AttemptInfo(1, "a", NOW - 20, NOW - 15, "site a went down"),),
        placements=(placement(),), home="a", error_type="builtins.ValueError")
    values.update(changes)
    return TaskInfo(**values)  # type: ignore[arg-type]


def all_values() -> list[object]:
    return [site(), SCORES[0], placement(), placement(None, ()), Quote(placement()), Quote(placement(None, ())),
            task(), task(state="QUEUED", started_at=0.0, finished_at=0.0, error="", error_kind="", error_type="",
                         attempts=0),
            task().history[0]]


@pytest.mark.parametrize("value", all_values(), ids=lambda v: type(v).__name__)
def test_reprs_are_short_and_hold_no_raw_numbers(value: object) -> None:
    text = repr(value)
    assert len(text) <= REPR_LIMIT, text
    assert "\n" not in text
    assert not RAW_NUMBER.search(text), text
    assert text.startswith(f"<{type(value).__name__} ") and text.endswith(">")


def test_site_status_repr_reads_as_a_sentence() -> None:
    text = repr(site())
    assert text.startswith("<SiteStatus shared up at 127.0.0.1:41234;")
    assert "CPU 1.5/2" in text and "memory 1.12 GiB/3.84 GiB" in text and "bigmem 1/1" in text
    assert "accelerator_type" not in text and "A100" in text
    assert "3 queued, 2 running, 12.3 tasks/s" in text
    assert "region=test" in text and "seen 3 s ago" in text
    assert "seen" not in repr(site(last_seen=0.0))  # the home site: heard from now, no age


def test_reprs_stay_short_however_much_a_site_publishes() -> None:
    big = site(site_id="s" * 300, resources_total={f"res{i}": float(i) for i in range(200)},
               resources_free={f"res{i}": i / 3 for i in range(200)}, labels={f"k{i}": "v" * 50 for i in range(50)},
               accelerators=tuple(f"acc{i}" for i in range(50)))
    assert len(repr(big)) <= REPR_LIMIT
    assert len(repr(task(name="n" * 1000, error="e" * 10_000))) <= REPR_LIMIT


def test_task_info_repr_shortens_the_id_and_names_the_exception() -> None:
    text = repr(task())
    assert TASK_ID not in text and TASK_ID[:8] in text
    assert "double FAILED at b (home a)" in text and "tests.unit" not in text
    assert "2 attempts" in text and "ran 1.75 s" in text and "finished 8 s ago" in text
    assert text.endswith("; ValueError: bad input>")
    queued = repr(task(state="QUEUED", site="", home="", started_at=0.0, finished_at=0.0, error="", error_kind="",
                       error_type="", attempts=0))
    assert queued == f"<TaskInfo {TASK_ID[:8]} double QUEUED, submitted 2 min ago>"


def test_error_text_names_the_exception_type_or_the_kind() -> None:
    assert task().error_text == "ValueError: bad input"
    assert task(error_type="mypkg.errors.Oops").error_text == "mypkg.errors.Oops: bad input"
    assert task(error_kind="timeout", error_type="", error="ran longer than 5 s").error_text == \
        "[timeout] ran longer than 5 s"
    assert task(error="", error_kind="", error_type="").error_text == ""


def test_placement_and_quote_say_what_they_are() -> None:
    decided = repr(placement())
    assert decided.startswith("<PlacementInfo placed on b: lowest estimated completion;")
    assert "ranked b 1.32 s, a 4.2 s, c 31 s (+1 more)" in decided
    assert "2 rejected (e: needs GPU=1)" in decided and "decided 5 s ago" in decided
    quote = repr(Quote(placement()))
    assert quote.startswith("<Quote would place on b:") and "placed on" not in quote.replace("would place on", "")
    assert repr(Quote(placement(None, ()))).startswith("<Quote no site can run it: ")


def test_price_and_carbon_appear_only_when_some_site_has_them() -> None:
    html = placement()._repr_html_()
    assert "PRICE" not in html and "CARBON" not in html and "0.000000" not in html
    priced = placement(scores=(SiteScore("b", 0.1, 0.0, 1.0, 0.0123456789, 12.3456789, 1.1), SCORES[1]))
    html = priced._repr_html_()
    assert "<th" in html and "PRICE" in html and "CARBON" in html
    assert "0.0123" in html and "12.3 g" in html and "0.0123456789" not in html
    assert "price 0.0123, carbon 12.3 g" in repr(priced.candidates[0])
    assert "price" not in repr(SCORES[0])


def test_html_escapes_everything_users_and_sites_control() -> None:
    evil = "<script>alert('x')</script>&"
    hostile = site(site_id=evil, labels={evil: evil}, resources_total={"CPU": 1.0, evil: 1.0},
                   resources_free={"CPU": 1.0, evil: 1.0})
    bad_task = task(name=evil, error=evil, site=evil, history=(AttemptInfo(1, evil, NOW, NOW, evil),))
    bad_placement = PlacementInfo(evil, evil, (SiteScore(evil, 1, 1, 1, 1, 1, 1),), ((evil, evil),), 1, 1, NOW)
    for value in (hostile, Listing([hostile, site()]), bad_task, bad_placement, Quote(bad_placement),
                  bad_placement.candidates[0]):
        html = value._repr_html_()  # type: ignore[attr-defined]
        assert "<script>" not in html and "alert('x')" not in html, type(value).__name__
        assert "&lt;script&gt;" in html


def test_a_list_of_sites_is_one_table() -> None:
    sites = Listing([site("a"), site("b"), site("c")])
    assert sites == [site("a"), site("b"), site("c")] and isinstance(sites, list)
    html = sites._repr_html_()
    assert html is not None and html.count("<table>") == 1 and html.count("<tr>") == 4  # header + 3 sites
    assert "1.5/2" in html and "3 s ago" in html
    assert repr(sites).count("\n") == 2 and repr(sites).startswith("[<SiteStatus a up")
    assert repr(Listing()) == "[]" and "(none)" in (Listing()._repr_html_() or "")
    assert Listing([1, 2])._repr_html_() is None  # not value types: Jupyter shows the repr
    assert Listing([site(), task()])._repr_html_() is None  # mixed: no one table fits


class Row:
    """A value type of another module (a dataset ref, say) that tables itself without subclassing."""

    _table_headers = ("NAME", "SIZE")

    def __init__(self, name: str, size: int) -> None:
        self.name, self.size = name, size

    def _table_row(self) -> tuple[str, ...]:
        return (self.name, fmt_bytes(self.size))


def test_any_class_with_a_table_row_lists_as_one_table() -> None:
    html = Listing([Row("a<b", 1536), Row("c", 4 << 30)])._repr_html_() or ""
    assert html.count("<tr>") == 3 and "a&lt;b" in html and "1.5 KiB" in html and "4 GiB" in html


def test_task_table_keeps_the_full_id_in_a_tooltip() -> None:
    html = task()._repr_html_()
    assert f'title="{TASK_ID}">{TASK_ID[:8]}<' in html
    assert "ValueError: bad input" in html and "moves" in html and "site a went down" in html
    assert not RAW_NUMBER.search(re.sub(r'title="[^"]*"', "", html))


def test_input_types_repr_only_what_differs_from_the_defaults() -> None:
    assert repr(Resources()) == "Resources()"
    assert repr(TaskOptions().replace(cpus=2, max_retries=0)) == "TaskOptions(resources=Resources(cpus=2), max_retries=0)"
    opts = TaskOptions().replace(memory=2**30, labels={"region": "eu"}, timeout=5.0)
    assert eval(repr(opts)) == opts  # still valid Python


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0 s"), (0.0004, "0.4 ms"), (0.1234567, "123 ms"), (0.9996, "1 s"), (1.23456, "1.23 s"), (42.54, "42.5 s"),
    (59.99, "1 min"), (125, "2.1 min"), (7200, "2 h"), (86399, "1 d"), (-3, "-3 s"), (float("inf"), "inf")])
def test_fmt_seconds(seconds: float, text: str) -> None:
    assert fmt_seconds(seconds) == text


@pytest.mark.parametrize(("delta", "text"), [
    (0.4, "just now"), (3.2, "3 s ago"), (59.6, "1 min ago"), (7300, "2 h ago"), (3 * 86400, "3 d ago"),
    (-125, "in 2 min")])
def test_fmt_age(delta: float, text: str) -> None:
    assert fmt_age(NOW - delta, NOW) == text
    assert fmt_age(0.0) == "-"


def test_fmt_numbers_and_bytes() -> None:
    assert [fmt_number(x) for x in (2.0, 1.5, 1 / 3, 12.3456, 1234.5678, 0.0)] == ["2", "1.5", "0.333", "12.3", "1235", "0"]
    assert [fmt_bytes(x) for x in (0, 1023, 1536, 4 << 30, 12.3456 * 2**20)] == \
        ["0 B", "1023 B", "1.5 KiB", "4 GiB", "12.3 MiB"]


@pytest.mark.parametrize(("text", "count"), [
    ("4096", 4096), ("1e8", 100_000_000), ("512MB", 512_000_000), ("10GiB", 10 * 2**30), (" 1.5 gb", 1_500_000_000),
    ("64Mi", 64 * 2**20), ("1_000", 1000), ("2k", 2000), ("0", 0), (4096, 4096), (1e8, 100_000_000)])
def test_parse_bytes_accepts_units(text: str | int | float, count: int) -> None:
    assert parse_bytes(text) == count


@pytest.mark.parametrize("text", ["10 GiBs", "-1", "abc", "1.5", "nan", "inf", "", "1e400", "GiB", True, -5])
def test_parse_bytes_refuses_with_the_value_named(text: object) -> None:
    with pytest.raises(ValueError) as info:
        parse_bytes(text)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)
    if isinstance(text, str) and text:
        assert repr(text) in str(info.value)
