"""The ``bmsd`` command line: migrate, check-config, run, demo."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from bmsd.config import DEFAULT_CONFIG_PATH, Config, load_config
from bmsd.errors import BmsdError, ConfigError, EditionError


def _config(args: argparse.Namespace) -> Config:
    path: Path | None = args.config
    if path is None and DEFAULT_CONFIG_PATH.exists():
        path = DEFAULT_CONFIG_PATH
    return load_config(path)


def _cmd_migrate(args: argparse.Namespace) -> int:
    from bmsd.migrate import migrate

    url = args.database_url or _config(args).database.url
    report = migrate(url, sql_dir=args.sql_dir, skip_community=args.skip_community_features,
                     on_progress=lambda line: print(line, flush=True))
    for line in report.lines():
        if not line.startswith("applied "):  # already printed as "applying ..."
            print(line)
    if report.applied:
        print(f"applied {len(report.applied)} script(s)")
    return 0


def _cmd_check_config(args: argparse.Namespace) -> int:
    config = _config(args)
    where = args.config or (DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else "defaults")
    print(f"{where}: configuration is valid ({len(config.routes)} routes)")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from bmsd.daemon import run
    from bmsd.logs import configure_logging

    config = _config(args)
    configure_logging(config.log_format, config.log_level)
    return run(config)


def _cmd_demo(args: argparse.Namespace) -> int:
    from bmsd.demo import run_demo

    return run_demo(state_dir=args.state_dir, duration_s=args.duration_s,
                    config_path=args.config or DEFAULT_CONFIG_PATH)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bmsd", description="Battery and energy telemetry from MQTT into TimescaleDB."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--config", type=Path, default=None,
                       help=f"TOML configuration (default: {DEFAULT_CONFIG_PATH} if present)")
        return p

    p = add("migrate", "Apply the schema scripts of sql/ to the database.")
    p.add_argument("--database-url", help="default: BMSD_DATABASE_URL, then the config file")
    p.add_argument("--sql-dir", type=Path, default=None, help="default: the sql/ beside bmsd")
    p.add_argument("--skip-community-features", action="store_true",
                   help="on TimescaleDB's Apache-only edition, apply everything but the"
                        " continuous aggregates and policies, and record those as skipped")
    p.set_defaults(func=_cmd_migrate)

    p = add("check-config", "Validate a configuration file; exit 2 if it is wrong.")
    p.set_defaults(func=_cmd_check_config)

    p = add("run", "Run the ingest daemon: MQTT telemetry into TimescaleDB.")
    p.set_defaults(func=_cmd_run)

    p = add("demo", "Start a local TimescaleDB and Mosquitto, apply the schema, run bmsd.")
    p.add_argument("--state-dir", type=Path, default=Path(".state"),
                   help="where the local servers keep their data (default: .state)")
    p.add_argument("--duration-s", type=float, default=None,
                   help="stop after this many seconds (default: run until Ctrl-C)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except EditionError as exc:
        print(f"bmsd {args.command}: {exc}", file=sys.stderr)
        return 3
    except ConfigError as exc:
        print(f"bmsd {args.command}: {exc}", file=sys.stderr)
        return 2
    except BmsdError as exc:
        print(f"bmsd {args.command}: {exc}", file=sys.stderr)
        return 1
