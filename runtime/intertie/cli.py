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
        rows.append((s.site_id, s.state, s.address, s.arch, s.python_version,
                     _resources(_public(s.resources_total)), _resources(_public(s.resources_free)),
                     ",".join(s.accelerators) or "-", s.queued, s.running, f"{s.throughput:.1f}/s",
                     ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) or "-", s.compute_id or "-"))
    print(table(("SITE", "STATE", "ADDRESS", "ARCH", "PYTHON", "TOTAL", "FREE", "ACCEL", "QUEUED", "RUNNING",
                 "THROUGHPUT", "LABELS", "COMPUTE ID"), rows))
    return 0


def _public(res: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in dict(res).items() if not k.startswith("accelerator_type:")}


def _placement_rows(p) -> list[str]:  # type: ignore[no-untyped-def]
    lines = [f"placed on {p.site or '(none)'} at {_when(p.decided_at)}: {p.reason}"]
    if p.candidates:
        lines.append(table(("CANDIDATE", "WAIT", "TRANSFER", "RUN", "PRICE", "CARBON", "TOTAL"),
                           [(c.site, f"{c.wait_s:.3f}s", f"{c.transfer_s:.3f}s", f"{c.run_s:.3f}s",
                             f"{c.price:.6f}", f"{c.carbon_g:.3f}g", f"{c.total:.3f}s") for c in p.candidates]))
    if p.rejected:
        lines.append(f"rejected {p.rejected_count} site(s):")
        lines.extend(f"  {site}: {why}" for site, why in p.rejected)
    return lines


def cmd_explain(fed, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    info = fed.task(args.task_id)
    print(f"task {info.task_id} ({info.name}): {info.state} at {info.site or '-'}, home {info.home or '-'}, "
          f"{info.attempts} attempt(s)")
    if not info.placements:
        print(f"placed on {info.site or '-'}: the home site had no peers to compare")
    for i, p in enumerate(info.placements, 1):
        print(f"\ndecision {i}:")
        print("\n".join(_placement_rows(p)))
    if info.history:
        print("\nmoves:")
        print(table(("ATTEMPT", "SITE", "ENDED", "WHY IT MOVED"),
                    [(a.attempt, a.site, _when(a.ended_at), a.outcome) for a in info.history]))
    if info.error:
        print(f"\nerror: [{info.error_kind}] {info.error}")
    return 0


def cmd_quote(fed, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    from intertie.remote import make_options

    labels = dict(item.split("=", 1) for item in args.label or [])
    opts = dict(cpus=args.cpus, gpus=args.gpus, accelerator=args.accelerator, arch=args.arch, site=args.site,
                labels=labels)
    make_options(**opts)  # type errors surface here, before the call
    quote = fed.quote(len, b"x" * args.bytes, **opts)
    print("\n".join(_placement_rows(quote.placement)))
    return 0 if quote else 1


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


class _Progress:
    """One line on stderr, rewritten as batches go by."""

    def __init__(self, verb: str) -> None:
        self.verb = verb
        self.started = time.monotonic()

    def __call__(self, rows: int, nbytes: int) -> None:
        rate = nbytes / max(time.monotonic() - self.started, 1e-6) / 2**20
        print(f"\r{self.verb} {rows:,} rows, {nbytes / 2**20:,.1f} MiB ({rate:,.1f} MiB/s)", end="",
              file=sys.stderr, flush=True)

    def done(self) -> None:
        print(file=sys.stderr)


def cmd_datasets(fed, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    if args.action == "ls":
        refs = fed.datasets(site=args.site)
        print(table(("NAME", "ID", "SITE", "COPY", "ROWS", "BYTES", "COLUMNS"),
                    [(r.name, r.id, r.site, f"replica of {r.origin}" if r.origin else "original", f"{r.num_rows:,}",
                      f"{r.num_bytes:,}", ",".join(r.schema.names)) for r in refs]))
    elif args.action == "put":
        progress = _Progress("uploaded")
        ref = fed.put_dataset(args.source, name=args.name, site=args.site, progress=progress)
        progress.done()
        print(f"{ref.name} {ref.id} at {ref.site}: {ref.num_rows:,} rows, {ref.num_bytes:,} bytes")
    elif args.action == "get":
        import pyarrow as pa

        progress = _Progress("downloaded")
        data = fed.get_dataset(args.dataset, site=args.site, progress=progress)
        progress.done()
        if args.output.endswith((".parquet", ".pq")):
            import pyarrow.parquet as pq

            pq.write_table(data, args.output)
        else:
            with pa.OSFile(args.output, "wb") as fh, pa.ipc.new_file(fh, data.schema) as writer:
                writer.write_table(data)
        print(f"wrote {data.num_rows:,} rows to {args.output}")
    elif args.action == "rm":
        ref = fed.delete_dataset(args.dataset, site=args.site)
        print(f"deleted {ref.name} ({ref.id}) at {ref.site}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="intertie", description="Use an Intertie federation.")
    parser.add_argument("--address", default=os.environ.get("INTERTIE_ADDRESS"),
                        help="home gateway HOST:PORT (default: $INTERTIE_ADDRESS)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("sites", help="the sites, their resources and load")
    task = sub.add_parser("task", help="state, site, attempts and error of one task")
    task.add_argument("task_id")
    explain = sub.add_parser("explain", help="why a task was placed where it was, and every move")
    explain.add_argument("task_id")
    datasets = sub.add_parser("datasets", help="datasets at a site: ls, put, get, rm")
    dsub = datasets.add_subparsers(dest="action", required=True)
    for action in ("ls", "put", "get", "rm"):
        p = dsub.add_parser(action)
        p.add_argument("--site", help="the site (default: the home gateway's)")
        if action == "put":
            p.add_argument("source", help="a Parquet, Arrow IPC or CSV file (path or fsspec URL)")
            p.add_argument("--name")
        elif action == "get":
            p.add_argument("dataset", help="id or name")
            p.add_argument("output", help="file to write (.parquet, else Arrow IPC)")
        elif action == "rm":
            p.add_argument("dataset", help="id or name")
    quote = sub.add_parser("quote", help="rank the sites for a task shape without running anything")
    quote.add_argument("--cpus", type=float, default=1.0)
    quote.add_argument("--gpus", type=float, default=0.0)
    quote.add_argument("--accelerator")
    quote.add_argument("--arch")
    quote.add_argument("--site")
    quote.add_argument("--label", action="append", metavar="KEY=VALUE")
    quote.add_argument("--bytes", type=int, default=0, help="size of the task's arguments")
    args = parser.parse_args(argv)
    if not args.address:
        print("intertie: no gateway address: pass --address HOST:PORT or set INTERTIE_ADDRESS", file=sys.stderr)
        return 2
    from intertie.client import Federation

    try:
        with Federation(args.address, connect_timeout=10) as fed:
            commands = {"sites": cmd_sites, "task": cmd_task, "explain": cmd_explain, "quote": cmd_quote,
                        "datasets": cmd_datasets}
            return commands[args.command](fed, args)
    except IntertieError as exc:
        print(f"intertie: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
