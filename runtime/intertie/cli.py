"""``intertie``: the user's command line (address from --address or INTERTIE_ADDRESS)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from intertie.errors import IntertieError


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table, columns as wide as their widest cell."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _amount(name: str, value: float) -> str:
    if name == "memory" or name.endswith("memory"):
        return f"{value / 2**30:.1f}GiB"
    return f"{value:g}"


def _resources(res: dict[str, float]) -> str:
    order = ["CPU", "GPU", "memory"]
    keys = [k for k in order if k in res] + sorted(k for k in res if k not in order)
    return " ".join(f"{k}={_amount(k, res[k])}" for k in keys)


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def cmd_sites(fed, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    rows = []
    for s in fed.sites():
        rows.append((s.site_id, s.state, s.address, s.arch, s.python_version, _resources(dict(s.resources_total)),
                     _resources(dict(s.resources_free)), s.queued, s.running, f"{s.throughput:.1f}/s",
                     ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) or "-"))
    print(table(("SITE", "STATE", "ADDRESS", "ARCH", "PYTHON", "TOTAL", "FREE", "QUEUED", "RUNNING",
                 "THROUGHPUT", "LABELS"), rows))
    return 0


def cmd_task(fed, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    info = fed.task(args.task_id)
    rows = [("task", info.task_id), ("name", info.name), ("state", info.state), ("site", info.site or "-"),
            ("attempts", f"{info.attempts} (max_retries {info.max_retries})"),
            ("resources", _resources(info.resources.as_ray()) or "-"),
            ("submitted", _when(info.submitted_at)), ("started", _when(info.started_at)),
            ("finished", _when(info.finished_at))]
    if info.error:
        rows.append(("error", f"[{info.error_kind}] {info.error}"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}")
    if info.history:
        print()
        print(table(("ATTEMPT", "SITE", "STARTED", "ENDED", "OUTCOME"),
                    [(a.attempt, a.site, _when(a.started_at), _when(a.ended_at), a.outcome) for a in info.history]))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="intertie", description="Use an Intertie federation.")
    parser.add_argument("--address", default=os.environ.get("INTERTIE_ADDRESS"),
                        help="home gateway HOST:PORT (default: $INTERTIE_ADDRESS)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("sites", help="the sites, their resources and load")
    task = sub.add_parser("task", help="state, site, attempts and error of one task")
    task.add_argument("task_id")
    args = parser.parse_args(argv)
    if not args.address:
        print("intertie: no gateway address: pass --address HOST:PORT or set INTERTIE_ADDRESS", file=sys.stderr)
        return 2
    from intertie.client import Federation

    try:
        with Federation(args.address, connect_timeout=10) as fed:
            return {"sites": cmd_sites, "task": cmd_task}[args.command](fed, args)
    except IntertieError as exc:
        print(f"intertie: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
