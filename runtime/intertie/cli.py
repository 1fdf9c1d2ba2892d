"""``intertie``: the user's command line (address from --address or INTERTIE_ADDRESS)."""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from collections.abc import Sequence
from typing import NoReturn

from intertie.display import fmt_age, fmt_bytes, fmt_labels, fmt_seconds, parse_bytes, resource_items
from intertie.errors import IntertieError, LedgerVerificationError, TaskNotFoundError
from intertie.spec import score_table


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table, columns as wide as their widest cell."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _when(ts: float) -> str:
    if not ts:
        return "-"
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ts))} ({fmt_age(ts)})"


def _resources(res: dict[str, float]) -> str:
    """ "CPU=2 memory=3.8GiB bigmem=1": one word per resource."""
    return " ".join(f"{key}={amount.replace(' ', '')}" for key, amount in resource_items(res))


def cmd_sites(fed, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    rows = []
    for s in fed.sites():
        rows.append((s.site_id, s.state, s.address, s.arch, s.python_version,
                     _resources(s.resources_total), _resources(s.resources_free),
                     ",".join(s.accelerators) or "-", s.queued, s.running, f"{s.throughput:.1f}/s",
                     fmt_labels(s.labels) or "-", s.compute_id or "-"))
    print(table(("SITE", "STATE", "ADDRESS", "ARCH", "PYTHON", "TOTAL", "FREE", "ACCEL", "QUEUED", "RUNNING",
                 "THROUGHPUT", "LABELS", "COMPUTE ID"), rows))
    return 0


def _placement_rows(p, verb: str = "placed on") -> list[str]:  # type: ignore[no-untyped-def]
    when = f" ({fmt_age(p.decided_at)})" if p.decided_at and verb == "placed on" else ""
    lines = [p.headline(verb) + when]
    if p.candidates:
        lines.append(table(*score_table(p.candidates)))
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
    if info.error_text:
        print(f"\nerror: {info.error_text}")
    return 0


def _quote_options(args: argparse.Namespace) -> dict[str, object]:
    """The task options a quote asks about; bad values end the command before it connects."""
    from intertie.remote import make_options

    opts = dict(cpus=args.cpus, gpus=args.gpus, accelerator=args.accelerator, arch=args.arch, site=args.site,
                labels=dict(args.label or []))
    try:
        make_options(**opts)
    except (TypeError, ValueError) as exc:
        _usage_error(f"intertie quote: error: {exc}")
    return opts


def cmd_quote(fed, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    if args.bytes > fed.max_payload_bytes:
        # Every task's arguments pass through the home gateway, which refuses them at submit;
        # and the quote would build arguments of that size in memory to measure them.
        print(f"no site can run it: arguments of {fmt_bytes(args.bytes)} are over the payload limit of the "
              f"home gateway {fed.site_id} ({fmt_bytes(fed.max_payload_bytes)}), which every task's "
              f"arguments pass through")
        return 1
    quote = fed.quote(len, b"x" * args.bytes, **args.options)
    print("\n".join(_placement_rows(quote.placement, "would place on")))
    return 0 if quote else 1


def cmd_task(fed, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    info = fed.task(args.task_id)
    ran = info.ran_for()
    rows = [("task", info.task_id), ("name", info.name), ("state", info.state), ("site", info.site or "-"),
            ("attempts", f"{info.attempts} (max_retries {info.max_retries})"),
            ("resources", _resources(info.resources.as_ray()) or "-"),
            ("submitted", _when(info.submitted_at)), ("started", _when(info.started_at)),
            ("finished", _when(info.finished_at)), ("ran", fmt_seconds(ran) if ran is not None else "-")]
    if info.error_text:
        rows.append(("error", info.error_text))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}")
    if info.history:
        print()
        print(table(("ATTEMPT", "SITE", "STARTED", "ENDED", "OUTCOME"),
                    [(a.attempt, a.site, _when(a.started_at), _when(a.ended_at), a.outcome) for a in info.history]))
    return 0


def cmd_cancel(fed, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    if args.all_mine:
        mine = fed.cancel_all(tenant=True)
        for task_id in mine:
            print(f"{task_id}  cancelled")
        print(f"cancelled {len(mine)} unfinished task(s) of your tenant at {fed.address}", file=sys.stderr)
        if not args.task_ids:
            return 0
    task_ids = list(dict.fromkeys(args.task_ids))  # once each, in the order given
    cancelled = set(fed.cancel(task_ids))
    failed = 0
    for task_id in task_ids:
        if task_id in cancelled:
            print(f"{task_id}  cancelled")
            continue
        failed += 1
        try:
            why = f"already {fed.task(task_id).state}"
        except TaskNotFoundError:
            why = f"no such task at {fed.address}"
        print(f"{task_id}  not cancelled: {why}")
    if failed and len(task_ids) > 1:
        print(f"cancelled {len(task_ids) - failed} of {len(task_ids)} task(s)", file=sys.stderr)
    return 1 if failed else 0


class _Progress:
    """One line on stderr, rewritten as batches go by."""

    def __init__(self, verb: str) -> None:
        self.verb = verb
        self.started = time.monotonic()

    def __call__(self, rows: int, nbytes: int) -> None:
        rate = nbytes / max(time.monotonic() - self.started, 1e-6)
        print(f"\r{self.verb} {rows:,} rows, {fmt_bytes(nbytes)} ({fmt_bytes(rate)}/s)", end="",
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
        ref = fed.put_dataset(args.source, name=args.name, site=args.site, progress=progress, replace=args.replace)
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


def _figure(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def cmd_usage(fed, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    if args.action == "verify":
        try:
            print(fed.verify_usage())
        except LedgerVerificationError as exc:
            print(f"site {fed.site_id}: NOT verified: {exc}")
            return 1
        return 0
    data = fed.usage(since=args.since, by=args.by)
    if args.by:
        print(table((args.by.upper(), "ATTEMPTS", "CPU-S RESERVED", "GPU-S RESERVED", "CPU TIME S", "WALL S", "BYTES",
                     "COST"),
                    [(r[args.by] or "-", r["attempts"], _figure(r["cpu_s_reserved"]), _figure(r["gpu_s_reserved"]),
                      _figure(r["cpu_time_s"]), _figure(r["wall_s"]), fmt_bytes(r["bytes"] or 0), _figure(r["cost"], 4))
                     for r in data.to_pylist()]))
        return 0
    rows = data.to_pylist()
    print(table(("TASK", "FUNCTION", "ATTEMPT", "OUTCOME", "ENDED", "WALL S", "CPUS", "GPUS", "CPU-S RESERVED",
                 "CPU TIME S", "COST"),
                [(r["task_id"], r["function"] or "-", r["attempt"], r["outcome"],
                  r["ended_at"].astimezone().strftime("%Y-%m-%d %H:%M:%S") if r["ended_at"] else "-",
                  _figure(r["wall_s"]), _figure(r["cpus"], 1), _figure(r["gpus"], 1), _figure(r["cpu_s_reserved"]),
                  _figure(r["cpu_time_s"]), _figure(r["cost"], 4)) for r in rows]))
    reserved = sum(r["cpu_s_reserved"] or 0.0 for r in rows)
    cost = sum(r["cost"] or 0.0 for r in rows)
    print(f"{len(rows)} attempt(s) at site {fed.site_id}: {reserved:,.2f} CPU-seconds reserved, cost {cost:,.4f} "
          "(signed entries; `intertie usage verify` checks them)", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------- arguments

def _usage_error(message: str) -> NoReturn:
    print(message, file=sys.stderr)
    raise SystemExit(2)


class ShortErrorParser(argparse.ArgumentParser):
    """Mistakes in the arguments are one line and a pointer to --help, not a usage dump
    (its subparsers are of this class too)."""

    def error(self, message: str) -> NoReturn:
        _usage_error(f"{self.prog}: error: {message}\n(see '{self.prog} --help')")


def byte_size(text: str) -> int:
    """An argparse type: a size in bytes with an optional unit (4096, 1e8, 512MB, 10GiB)."""
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def key_value(text: str) -> tuple[str, str]:
    """An argparse type: KEY=VALUE (a label the task's site must carry)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def since_date(text: str) -> datetime.datetime:
    """An argparse type: a date or a date and time, ISO 8601 (local time unless it names a zone)."""
    try:
        return datetime.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS], got {text!r}") \
            from None


def _parser() -> argparse.ArgumentParser:
    from intertie import __version__

    # --address is accepted before or after the subcommand: the subcommands' copy leaves
    # the namespace alone unless given (SUPPRESS), so the top-level default stands.
    address = ShortErrorParser(add_help=False)
    address.add_argument("--address", default=argparse.SUPPRESS,
                         help="home gateway HOST:PORT (default: $INTERTIE_ADDRESS)")
    address.add_argument("--token", default=argparse.SUPPRESS,
                         help="your tenant's token, for a gateway run with --auth token (default: $INTERTIE_TOKEN)")
    address.add_argument("--tls-ca", default=argparse.SUPPRESS, metavar="PEM",
                         help="the CA certificate of a gateway serving TLS (default: $INTERTIE_TLS_CA)")
    parser = ShortErrorParser(prog="intertie", description="Use an Intertie federation.")
    parser.add_argument("--address", default=os.environ.get("INTERTIE_ADDRESS"),
                        help="home gateway HOST:PORT (default: $INTERTIE_ADDRESS)")
    parser.add_argument("--token", default=None,
                        help="your tenant's token, for a gateway run with --auth token (default: $INTERTIE_TOKEN)")
    parser.add_argument("--tls-ca", default=None, metavar="PEM",
                        help="the CA certificate of a gateway serving TLS (default: $INTERTIE_TLS_CA)")
    parser.add_argument("--version", action="version",
                        version=f"intertie {__version__} (Python {sys.version.split()[0]})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("sites", parents=[address], help="the sites, their resources and load")
    task = sub.add_parser("task", parents=[address], help="state, site, attempts and error of one task")
    task.add_argument("task_id")
    explain = sub.add_parser("explain", parents=[address],
                             help="why a task was placed where it was, and every move")
    explain.add_argument("task_id")
    cancel = sub.add_parser("cancel", parents=[address], help="cancel queued or running tasks by id")
    cancel.add_argument("task_ids", nargs="*", metavar="TASK_ID")
    cancel.add_argument("--all-mine", action="store_true",
                        help="every unfinished task of your tenant whose home is this gateway, whichever "
                             "client submitted it (a gateway with token auth)")
    datasets = sub.add_parser("datasets", parents=[address], help="datasets of the federation: ls, put, get, rm")
    dsub = datasets.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action in ("ls", "put", "get", "rm"):
        p = dsub.add_parser(action, parents=[address])
        p.add_argument("--site", help="only this site (ls: default every site of the federation)" if action == "ls"
                       else "the site (default: the home gateway's)")
        if action == "put":
            p.add_argument("source", help="a Parquet, Arrow IPC or CSV file (path or fsspec URL)")
            p.add_argument("--name", help="unique at the site (default: the file's name without its suffix)")
            p.add_argument("--replace", action="store_true", help="replace the dataset that has the name")
        elif action == "get":
            p.add_argument("dataset", help="id or name")
            p.add_argument("output", help="file to write (.parquet, else Arrow IPC)")
        elif action == "rm":
            p.add_argument("dataset", help="id or name")
    quote = sub.add_parser("quote", parents=[address],
                           help="rank the sites for a task shape without running anything")
    quote.add_argument("--cpus", type=float, default=1.0)
    quote.add_argument("--gpus", type=float, default=0.0)
    quote.add_argument("--accelerator")
    quote.add_argument("--arch")
    quote.add_argument("--site")
    quote.add_argument("--label", action="append", type=key_value, metavar="KEY=VALUE",
                       help="a label the site must carry (repeatable)")
    quote.add_argument("--bytes", type=byte_size, default=0, metavar="SIZE",
                       help="size of the task's arguments: bytes, or with a unit (512MB, 10GiB)")
    usage = sub.add_parser("usage", parents=[address],
                           help="your attempts at the home site from its usage ledger; verify: check them")
    usage.add_argument("action", nargs="?", choices=["verify"],
                       help="check your entries, the site's signature and that its ledger extends what you "
                            "verified before")
    usage.add_argument("--since", type=since_date, metavar="DATE", help="only attempts that ended then or later")
    usage.add_argument("--by", choices=["site", "function", "day"], help="totals per site, function or day (UTC)")
    return parser


COMMANDS = {"sites": cmd_sites, "task": cmd_task, "explain": cmd_explain, "quote": cmd_quote,
            "cancel": cmd_cancel, "datasets": cmd_datasets, "usage": cmd_usage}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "cancel":
        if not args.task_ids and not args.all_mine:
            parser.error("cancel: give one or more TASK_IDs")
    if args.command == "quote":
        args.options = _quote_options(args)
    if not args.address:
        print("intertie: no gateway address: pass --address HOST:PORT or set INTERTIE_ADDRESS", file=sys.stderr)
        return 2
    from intertie.client import Federation

    try:
        with Federation(args.address, connect_timeout=10, token=args.token, tls_ca=args.tls_ca) as fed:
            return COMMANDS[args.command](fed, args)
    except IntertieError as exc:
        print(f"intertie: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("intertie: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
