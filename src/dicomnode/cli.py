"""Command line: parse arguments, load configuration, dispatch, return an exit code.

No business logic lives here. ``main(argv)`` is the entry point of the
``dicomnode`` console script, ``python -m dicomnode`` and ``DICOMnode.py``.
Exit codes (:class:`~dicomnode.status.ExitStatus`): 0 ok, 1 runtime failure,
2 invalid configuration or arguments, 3 start-up failure, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from dicomnode import __version__, config, logsetup, tls
from dicomnode.config import NodeConfig, validate_ae_title
from dicomnode.errors import ConfigError, DicomNodeError
from dicomnode.status import ExitStatus

logger = logging.getLogger("dicomnode.cli")

EPILOG = """commands:
  (none)          run the node: receiver and folder watcher (default)
  check-config    validate the configuration and print the effective values
  echo            C-ECHO a DICOM node
  send            send files or folders to the target now (same order and outcome rules)
  retry-failed    move files parked in <watch_folder>/failed back into the watch folder
  convert         convert Enhanced multi-frame objects to single-frame offline
  status          print the node's summary; exit 0 when healthy, 1 when not
  audit           export ledger events (date range, patient ID, AE) as CSV or JSON
  web-passwd      set a console user's password (stored as a salted scrypt hash)

Without --config, ./config.ini is used if it exists, else the embedded default
(AE DICOMNODE on 127.0.0.1:11112, data under ./dicomnode-data/).

exit codes: 0 ok, 1 failure, 2 bad configuration or arguments, 3 could not start,
130 interrupted."""


def _ae_arg(value: str) -> str:
    try:
        return validate_ae_title(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid AE title {value!r}: 1-16 characters, no backslash or control characters"
        ) from None


def _port_arg(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {value!r}: a whole number from 1 to 65535")
    return port


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser (top level runs the node; sub-commands as in EPILOG)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="configuration file (default: ./config.ini, else the embedded default)",
    )
    common.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="debug logging (like [Logging] verbose = true)",
    )

    parser = argparse.ArgumentParser(
        prog="dicomnode",
        description="DICOM node: trusted C-STORE receiver and ordered folder forwarder.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"dicomnode {__version__}")
    parser.add_argument(
        "--watch-folder", type=Path, metavar="PATH", help="override [FolderWatcher] watch_folder"
    )
    parser.add_argument("--no-receiver", action="store_true", help="do not run the DICOM receiver")
    parser.add_argument("--no-watcher", action="store_true", help="do not run the folder watcher")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    sub.add_parser(
        "check-config", parents=[common], help="validate and print the effective configuration"
    )

    echo = sub.add_parser("echo", parents=[common], help="C-ECHO a DICOM node")
    echo.add_argument("host", nargs="?")
    echo.add_argument("port", nargs="?", type=_port_arg)
    echo.add_argument(
        "--destination",
        metavar="NAME",
        help="echo a configured destination (default = [FolderWatcher] target_*) "
        "with its AE titles and TLS setting, instead of HOST PORT",
    )
    echo.add_argument(
        "--aet", type=_ae_arg, help="our calling AE title (default: [General] ae_title)"
    )
    echo.add_argument("--call", type=_ae_arg, help="called AE title (default ANY-SCP)")
    echo.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")

    send = sub.add_parser("send", parents=[common], help="send files/folders to the target now")
    send.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    send.add_argument("--host", help="target host (default: [FolderWatcher] target_ip)")
    send.add_argument("--port", type=_port_arg, help="target port (default: target_port)")
    send.add_argument("--call", type=_ae_arg, help="target AE title (default: target_aet)")
    send.add_argument("--aet", type=_ae_arg, help="our calling AE title (default: calling_aet)")
    send.add_argument(
        "--destination",
        metavar="NAME",
        help="send to a configured destination (its address, AE titles and TLS setting); "
        "routes are not applied and duplicates are not skipped",
    )

    sub.add_parser(
        "retry-failed", parents=[common], help="move parked files back into the watch folder"
    )

    convert = sub.add_parser(
        "convert", parents=[common], help="convert Enhanced multi-frame files offline"
    )
    convert.add_argument("inputs", nargs="+", type=Path, metavar="IN")
    convert.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")

    sub.add_parser("status", parents=[common], help="summary and health (exit 0 healthy, 1 not)")

    audit = sub.add_parser("audit", parents=[common], help="export ledger events")
    audit.add_argument("--since", metavar="DATE", help="first day (YYYY-MM-DD) or ISO date-time")
    audit.add_argument(
        "--until", metavar="DATE", help="last day (YYYY-MM-DD, inclusive) or ISO time"
    )
    audit.add_argument("--patient-id", default="", help="only events of this patient ID")
    audit.add_argument("--ae", default="", help="only events of this calling AE title")
    audit.add_argument(
        "--kind", action="append", default=[], help="only this event kind (repeatable)"
    )
    audit.add_argument("--format", choices=("csv", "json"), default="csv")
    audit.add_argument("--output", type=Path, metavar="FILE", help="write here instead of stdout")

    passwd = sub.add_parser(
        "web-passwd", parents=[common], help="set a console user's password (salted hash)"
    )
    passwd.add_argument("user")
    passwd.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )
    return parser


def _load(args: argparse.Namespace) -> NodeConfig:
    path = config.find_config(getattr(args, "config", None), Path.cwd())
    cfg = config.load(path)
    if getattr(args, "watch_folder", None) is not None:
        cfg = cfg.with_watch_folder(args.watch_folder.resolve())
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad usage, 0 on --help
        return int(exc.code or 0)
    try:
        cfg = _load(args)
    except ConfigError as exc:
        print(f"dicomnode: configuration error: {exc}", file=sys.stderr)
        return int(ExitStatus.CONFIG_ERROR)
    logsetup.configure(cfg.logging, verbose=bool(getattr(args, "verbose", False)))
    try:
        return _dispatch(args, cfg)
    except KeyboardInterrupt:
        print("dicomnode: interrupted", file=sys.stderr)
        return int(ExitStatus.INTERRUPTED)
    except ConfigError as exc:
        print(f"dicomnode: configuration error: {exc}", file=sys.stderr)
        return int(ExitStatus.CONFIG_ERROR)


def _dispatch(args: argparse.Namespace, cfg: NodeConfig) -> int:
    command = args.command
    if command == "check-config":
        print("\n".join(config.describe(cfg)))
        return int(ExitStatus.OK)
    if command == "echo":
        return _echo(args, cfg)
    if command == "send":
        return _send(args, cfg)
    if command == "retry-failed":
        from dicomnode.forwarder import retry_failed

        with _ledger(cfg):
            return int(retry_failed(cfg.forwarder))
    if command == "status":
        from dicomnode.web.report import status_report

        healthy, lines = status_report(cfg)
        print("\n".join(lines))
        return int(ExitStatus.OK if healthy else ExitStatus.FAILURE)
    if command == "audit":
        return _audit(args, cfg)
    if command == "web-passwd":
        return _web_passwd(args, cfg)
    if command == "convert":
        from dicomnode.convert.worker import convert_paths

        return int(convert_paths(args.inputs, args.out, cfg.tools, cfg.receiver.folder_layout))
    return _run(args, cfg)


@contextlib.contextmanager
def _ledger(cfg: NodeConfig) -> Iterator[None]:
    """Record the events of a one-shot command (``send``, ``retry-failed``) in the ledger.

    Only where a node already keeps its ledger: a one-shot command creates none.
    """
    if not cfg.ledger.enabled or not cfg.ledger_path.is_file():
        yield
        return
    from dicomnode.ledger.handler import LedgerHandler
    from dicomnode.ledger.writer import LedgerWriter

    writer = LedgerWriter(cfg.ledger_path, 0)
    writer.start()
    handler = LedgerHandler(writer)
    logging.getLogger("dicomnode").addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger("dicomnode").removeHandler(handler)
        writer.stop()


def _audit(args: argparse.Namespace, cfg: NodeConfig) -> int:
    from dicomnode.ledger.export import export, parse_day
    from dicomnode.ledger.schema import LedgerUnavailable, open_reader

    try:
        since = parse_day(args.since) if args.since else None
        until = parse_day(args.until, end=True) if args.until else None
    except ValueError as exc:
        print(f"dicomnode: audit: bad date: {exc}", file=sys.stderr)
        return int(ExitStatus.CONFIG_ERROR)
    try:
        conn = open_reader(cfg.ledger_path)
    except LedgerUnavailable as exc:
        print(f"dicomnode: audit: {exc}", file=sys.stderr)
        return int(ExitStatus.FAILURE)
    try:
        if args.output is not None:
            with args.output.open("w", encoding="utf-8", newline="") as out:
                count = export(
                    conn, out, args.format, since, until, args.patient_id, args.ae, args.kind
                )
        else:
            count = export(
                conn, sys.stdout, args.format, since, until, args.patient_id, args.ae, args.kind
            )
    finally:
        conn.close()
    print(f"dicomnode: audit: {count} event(s)", file=sys.stderr)
    return int(ExitStatus.OK)


def _web_passwd(args: argparse.Namespace, cfg: NodeConfig) -> int:
    import getpass

    from dicomnode.web.auth import set_password

    if args.password_stdin or not sys.stdin.isatty():
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"New console password for {args.user}: ")
        if getpass.getpass("Again: ") != password:
            print("dicomnode: web-passwd: the passwords differ", file=sys.stderr)
            return int(ExitStatus.FAILURE)
    try:
        set_password(cfg.web_credentials, args.user, password)
    except ValueError as exc:
        print(f"dicomnode: web-passwd: {exc}", file=sys.stderr)
        return int(ExitStatus.CONFIG_ERROR)
    except OSError as exc:
        print(f"dicomnode: web-passwd: cannot write {cfg.web_credentials}: {exc}", file=sys.stderr)
        return int(ExitStatus.FAILURE)
    print(f"console password of {args.user} stored (salted scrypt hash) in {cfg.web_credentials}")
    return int(ExitStatus.OK)


def _echo(args: argparse.Namespace, cfg: NodeConfig) -> int:
    from dataclasses import replace

    from dicomnode.verify import echo

    if args.destination is not None:
        dest = cfg.forwarder.destination(args.destination) or next(
            (d for d in cfg.destinations if d.name == args.destination), None
        )
        if dest is None:
            known = sorted(
                {d.name for d in cfg.forwarder.all_destinations()}
                | {d.name for d in cfg.destinations}
            )
            print(
                f"dicomnode: echo: no destination {args.destination!r} "
                f"(configured: {', '.join(known) or 'none'})",
                file=sys.stderr,
            )
            return int(ExitStatus.CONFIG_ERROR)
        if args.host is not None:
            print("dicomnode: echo: give --destination or HOST PORT, not both", file=sys.stderr)
            return int(ExitStatus.CONFIG_ERROR)
        context = tls.client_context(replace(cfg.tls, enabled=True)) if dest.tls else None
        result = echo(
            dest.host,
            dest.port,
            args.call or dest.ae_title,
            args.aet or dest.calling_aet or cfg.forwarder.calling_aet,
            args.timeout,
            context,
        )
        print(f"{result.message} (destination {dest.name})")
        return int(ExitStatus.OK if result.ok else ExitStatus.FAILURE)
    if args.host is None or args.port is None:
        print("dicomnode: echo needs HOST PORT or --destination NAME", file=sys.stderr)
        return int(ExitStatus.CONFIG_ERROR)
    result = echo(
        args.host,
        args.port,
        args.call or "ANY-SCP",
        args.aet or cfg.receiver.ae_title,
        args.timeout,
        tls.client_context(cfg.tls),
    )
    print(result.message)
    return int(ExitStatus.OK if result.ok else ExitStatus.FAILURE)


def _send(args: argparse.Namespace, cfg: NodeConfig) -> int:
    from dataclasses import replace

    from dicomnode.forwarder import send_paths

    fw = cfg.forwarder
    context = tls.client_context(cfg.tls)
    if args.destination is not None:
        dest = fw.destination(args.destination) or next(
            (d for d in cfg.destinations if d.name == args.destination), None
        )
        if dest is None:
            print(f"dicomnode: send: no destination {args.destination!r}", file=sys.stderr)
            return int(ExitStatus.CONFIG_ERROR)
        fw = fw.for_destination(dest)
        context = tls.client_context(replace(cfg.tls, enabled=True)) if dest.tls else None
    fw = replace(
        fw,
        target_ip=args.host or fw.target_ip,
        target_port=args.port or fw.target_port,
        target_aet=args.call or fw.target_aet,
        calling_aet=args.aet or fw.calling_aet,
    )
    if not fw.has_target:
        print(
            "dicomnode: send needs a target: --host and --call, or target_ip/target_aet in "
            "[FolderWatcher]",
            file=sys.stderr,
        )
        return int(ExitStatus.CONFIG_ERROR)
    with _ledger(cfg):
        return int(
            send_paths(
                args.paths,
                fw,
                progress=sys.stderr.isatty(),
                ssl_context=context,
            )
        )


def _run(args: argparse.Namespace, cfg: NodeConfig) -> int:
    from dicomnode import service  # the node itself; one-shot commands do not load it

    options = service.RunOptions(receiver=not args.no_receiver, forwarder=not args.no_watcher)
    if not options.receiver and not options.forwarder:
        print(
            "dicomnode: --no-receiver and --no-watcher together leave nothing to run",
            file=sys.stderr,
        )
        return int(ExitStatus.CONFIG_ERROR)
    service.set_window_title(cfg.window_title)
    for line in service.summary_lines(cfg, options):
        print(line, flush=True)
    rc = cfg.receiver
    watch = cfg.forwarder.watch_folder
    if (
        options.receiver
        and options.forwarder
        and rc.errors_dir.resolve().is_relative_to(watch.resolve())
    ):
        logger.warning(
            "%s lies inside the watch folder %s: objects the receiver could not store would be "
            "forwarded; keep destination_dir outside the watch folder and map AEs into it",
            rc.errors_dir,
            watch,
        )
    if options.receiver and rc.trusts_any_ae and not service.is_loopback(rc.server_ip):
        logger.warning(
            "trusted_ae_titles = * on %s: ANY calling AE title may store objects", rc.server_ip
        )
    try:
        service.run(cfg, options)
    except ConfigError as exc:
        print(f"dicomnode: configuration error: {exc}", file=sys.stderr)
        return int(ExitStatus.CONFIG_ERROR)
    except DicomNodeError as exc:
        print(f"dicomnode: cannot start: {exc}", file=sys.stderr)
        return int(ExitStatus.STARTUP_ERROR)
    except OSError as exc:
        where = f"{rc.server_ip}:{rc.receive_port}"
        print(
            f"dicomnode: cannot start: cannot listen on {where}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return int(ExitStatus.STARTUP_ERROR)
    return int(ExitStatus.OK)
