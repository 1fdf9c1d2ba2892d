"""How users read Intertie's values: short reprs (ids shortened, times as ages, numbers
rounded with units), sizes with units parsed, and small HTML tables for Jupyter, every shown
value passed through ``html.escape``. The value types (``intertie.spec``) and the CLI print
with these helpers.
"""

from __future__ import annotations

import dataclasses
import html
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

REPR_LIMIT = 200  # characters at most in a value type's repr


def clip(text: str, limit: int) -> str:
    """``text`` on one line, cut to ``limit`` characters (ending in "...") when longer."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:max(limit - 3, 0)] + "..."


def short_id(value: str, length: int = 8) -> str:
    """A long id's first characters, as git shortens hashes; short ids stay whole."""
    return value if len(value) <= length + 4 else value[:length]


def short_name(name: str) -> str:
    """A task name without its module: "pkg.mod.double" -> "double"."""
    if " " in name:
        return name  # a name the user gave, not a function's
    return name.rpartition(".")[2] or name


def fmt_number(value: float) -> str:
    """A number rounded for reading: 2, 1.5, 0.333, 12.3, 1234."""
    if not math.isfinite(value):
        return str(value)
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def _decimals(value: float, digits: int) -> str:
    text = f"{value:.{digits}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def fmt_seconds(seconds: float) -> str:
    """A duration for reading: "0 s", "12 ms", "1.25 s", "42.5 s", "3.5 min", "2.1 h", "3 d"."""
    if not math.isfinite(seconds):
        return str(seconds)
    sign, s = ("-" if seconds < 0 else ""), abs(seconds)
    if s == 0:
        return "0 s"
    if s < 0.9995:
        return f"{sign}{fmt_number(s * 1000)} ms"
    scales = (("s", 1, 2 if s < 10 else 1, 60), ("min", 60, 1, 60), ("h", 3600, 1, 24), ("d", 86400, 1, math.inf))
    # The first unit in which the rounded figure stays under the next unit: 59.99 s is "1 min".
    unit, text = next((u, t) for u, size, digits, limit in scales
                      if float(t := _decimals(s / size, digits)) < limit)
    return f"{sign}{text} {unit}"


def fmt_age(timestamp: float, now: float | None = None) -> str:
    """A wall-clock time (seconds since the epoch) as its distance from now: "3 s ago",
    "in 2 min", "just now"; "-" for 0, which the wire uses for "never"."""
    if not timestamp:
        return "-"
    delta = (time.time() if now is None else now) - timestamp
    s = abs(delta)
    if s < 1:
        return "just now"
    scales = (("s", 1, 60), ("min", 60, 60), ("h", 3600, 24), ("d", 86400, math.inf))
    text = next(f"{round(s / size)} {unit}" for unit, size, limit in scales if round(s / size) < limit)
    return f"{text} ago" if delta > 0 else f"in {text}"


def fmt_bytes(count: float) -> str:
    """A byte count for reading: "512 B", "1.5 KiB", "12.3 MiB", "4 GiB"."""
    if abs(count) < 1024:
        return f"{count:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        count /= 1024
        if abs(count) < 1024 or unit == "PiB":
            break
    return f"{fmt_number(count)} {unit}"


_BYTE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
               "t": 10**12, "tb": 10**12, "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20,
               "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40}
_BYTE_SIZE = re.compile(r"\s*((?:\d[\d_]*)?\.?\d[\d_]*(?:[eE][+-]?\d+)?)\s*([A-Za-z]*)\s*")


def parse_bytes(value: str | int | float) -> int:
    """A size in bytes from "4096", "1e8", "512MB" (10**6 bytes each), "10GiB" (2**30 each),
    "1.5 GB", "64Mi"; units are case-insensitive. Raises ValueError naming the value."""
    example = "(e.g. 4096, 1e8, 512MB, 10GiB)"
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"a size in bytes must be a number or a string {example}, got {type(value).__name__}")
    if isinstance(value, str):
        match = _BYTE_SIZE.fullmatch(value)
        unit = _BYTE_UNITS.get(match.group(2).lower()) if match else None
        if match is None or unit is None:
            raise ValueError(f"{value!r} is not a size in bytes {example}")
        amount = float(match.group(1)) * unit
    else:
        amount, unit = float(value), 1
    if not math.isfinite(amount) or amount < 0:
        raise ValueError(f"a size in bytes must be finite and >= 0, got {value!r}")
    if unit == 1 and amount != int(amount):
        raise ValueError(f"a size in bytes must be a whole number, got {value!r}")
    return int(round(amount))


def _is_memory(name: str) -> bool:
    return name == "memory" or name.endswith("_memory")


def resource_items(amounts: Mapping[str, float], total: Mapping[str, float] | None = None) -> list[tuple[str, str]]:
    """Ray resources for reading, CPU, GPU and memory first: [("CPU", "2"), ("memory", "4 GiB")];
    with ``total``, each as free/total: ("CPU", "1.5/2"), ("memory", "1 GiB/4 GiB").
    Accelerator-type markers are left out (SiteStatus.accelerators names them)."""
    names = total if total is not None else amounts
    first = [k for k in ("CPU", "GPU", "memory") if k in names]
    keys = first + sorted(k for k in names if k not in first and not k.startswith("accelerator_type:"))

    def amount(key: str) -> str:
        show = fmt_bytes if _is_memory(key) else fmt_number
        return show(amounts.get(key, 0.0)) + ("" if total is None else f"/{show(total[key])}")

    return [(key, amount(key)) for key in keys]


def fmt_resources(amounts: Mapping[str, float], total: Mapping[str, float] | None = None) -> str:
    """ "CPU 1.5/2, memory 1 GiB/4 GiB, bigmem 1/1" (see :func:`resource_items`)."""
    return ", ".join(f"{key} {amount}" for key, amount in resource_items(amounts, total))


def fmt_labels(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


Cell = str | tuple[str, str]  # the text shown, or (the text shown, the full text as a tooltip)


def html_table(headers: Sequence[str], rows: Iterable[Sequence[Cell]], caption: str = "") -> str:
    """A small HTML table for Jupyter; every header, cell and tooltip is escaped."""
    def cell(tag: str, value: Cell) -> str:
        shown, full = value if isinstance(value, tuple) else (value, "")
        title = f' title="{html.escape(full)}"' if full and full != shown else ""
        return f'<{tag} style="text-align:left"{title}>{html.escape(shown)}</{tag}>'

    head = "".join(cell("th", h) for h in headers)
    body = "".join("<tr>" + "".join(cell("td", c) for c in row) + "</tr>" for row in rows)
    top = f'<caption style="text-align:left">{html.escape(caption)}</caption>' if caption else ""
    return f"<table>{top}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class Tabled:
    """A value type shown in Jupyter as a table row; a :class:`Listing` of them is one table."""

    _table_headers: ClassVar[tuple[str, ...]] = ()

    def _table_row(self) -> tuple[Cell, ...]:
        raise NotImplementedError

    def _repr_html_(self) -> str:
        return html_table(self._table_headers, [self._table_row()])


_T = TypeVar("_T")


class Listing(list[_T]):
    """A list of value types (``fed.sites()``) that Jupyter shows as one table and the
    console one item a line; otherwise an ordinary list. The items' class gives the table:
    ``_table_headers`` and ``_table_row()`` (as :class:`Tabled` has them)."""

    def _repr_html_(self) -> str | None:
        kinds = {type(item) for item in self}
        if not kinds:
            return "<p><i>(none)</i></p>"
        kind = kinds.pop()
        if kinds or not hasattr(kind, "_table_headers") or not hasattr(kind, "_table_row"):
            return None  # Jupyter then shows the plain repr
        return html_table(kind._table_headers, [item._table_row() for item in self])  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        return "[" + ",\n ".join(repr(item) for item in self) + "]"


def short_repr(obj: Any) -> str:
    """A dataclass's repr with only the fields that differ from their defaults (still valid Python)."""
    shown = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        if value != default:
            shown.append(f"{f.name}={value!r}")
    return f"{type(obj).__name__}({', '.join(shown)})"
