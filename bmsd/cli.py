"""The ``bmsd`` command line: run, migrate, create-login, check-config, probe, alerts,
simulate."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from bmsd import __version__
from bmsd.alerts.rules import SEVERITIES
from bmsd.config import Config, DatabaseConfig
from bmsd.config_load import RUN_SECRETS, SYSTEM_CONFIG_PATH, Secret, find_config, load_config
from bmsd.config_text import describe, redact_url
from bmsd.errors import BmsdError, ConfigError, DatabaseError, EditionError


def _config(args: argparse.Namespace, *secrets: Secret) -> Config:
    """Load the configuration, reading only the passwords of *secrets* (the command's)."""
    return load_config(find_config(args.config), secrets=secrets)


def _database(args: argparse.Namespace, configured: DatabaseConfig) -> DatabaseConfig:
    """Return *configured*, or the same with ``--database-url``'s URL (and its login)."""
    if not args.database_url:
        return configured
    if urlsplit(args.database_url).scheme not in ("postgresql", "postgres"):
        raise ConfigError("--database-url: must start with postgresql:// (e.g. postgresql://"
                          f"user@host:5432/bmsd), not {redact_url(args.database_url)}")
    return configured.model_copy(update={"url": args.database_url, "password": None,
                                         "password_file": None})


def _cmd_migrate(args: argparse.Namespace) -> int:
    from bmsd.schema.migrate import migrate

    if args.sql_dir is not None and not args.sql_dir.is_dir():
        raise ConfigError(f"--sql-dir {args.sql_dir}: no such folder; name the folder that"
                          " holds the numbered scripts (default: the sql/ shipped with bmsd)")
    database = _database(args, _config(args, "migrate").migrate_database)
    delay = 1.0
    while True:
        try:
            report = migrate(database, sql_dir=args.sql_dir,
                             skip_community=args.skip_community_features,
                             on_progress=lambda line: print(line, flush=True))
            break
        except DatabaseError as exc:
            if not args.wait_for_database:
                raise
            print(f"bmsd migrate: {exc}; trying again in {delay:.0f} s", file=sys.stderr,
                  flush=True)
            time.sleep(delay)
            delay = min(delay * 2, 30.0)
    for line in report.lines():
        if not line.startswith("applied "):  # already printed as "applying ..."
            print(line)
    if report.applied:
        print(f"applied {len(report.applied)} script(s)")
    if args.demo_data:
        from bmsd.schema.migrate import load_demo_data

        for name in load_demo_data(database, sql_dir=args.sql_dir):
            print(f"loaded demo data sql/demo/{name}")
    return 0


def _cmd_create_login(args: argparse.Namespace) -> int:
    from bmsd.schema.migrate import ensure_login

    try:
        password = args.password_file.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"--password-file {args.password_file}: cannot read it"
                          f" ({exc.strerror})") from None
    if not password:
        raise ConfigError(f"--password-file {args.password_file} is empty")
    database = _database(args, _config(args, "migrate").migrate_database)
    print(ensure_login(database, args.name, args.member_of, password))
    return 0


def _cmd_check_config(args: argparse.Namespace) -> int:
    from bmsd.resources import package_file

    if args.example:
        print(package_file("defaults", "bmsd.toml").read_text(), end="")
        return 0
    path = find_config(args.config)
    config = load_config(path, secrets=RUN_SECRETS)
    if config.alerts.enabled:  # as `bmsd run` loads them: refused here, refused there
        from bmsd.alerts.rules import load_rules

        load_rules(config.alerts.rules_file)
    where = str(path) if path else (
        f"built-in defaults (no --config, $BMSD_CONFIG or {SYSTEM_CONFIG_PATH})")
    print(f"# {where}: configuration is valid ({len(config.routes)} routes);"
          " in effect, secrets redacted:")
    print(describe(config))
    return 0


def _cmd_probe(args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request

    metrics = _config(args).metrics  # no password needed: the address only
    # A wildcard listen address is asked on loopback.
    wildcard = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104
    host = wildcard.get(metrics.host, metrics.host)
    url = f"http://{f'[{host}]' if ':' in host else host}:{metrics.port}/{args.endpoint}"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout_s) as response:
            print(f"{url}: {response.status} {response.read().decode(errors='replace')}")
            return 0
    except urllib.error.HTTPError as exc:
        print(f"bmsd probe: {url}: {exc.code} {exc.read().decode(errors='replace')}",
              file=sys.stderr)
    except OSError as exc:
        print(f"bmsd probe: {url}: no answer ({getattr(exc, 'reason', exc)}); is bmsd running"
              " with this configuration?", file=sys.stderr)
    return 1


def _cmd_run(args: argparse.Namespace) -> int:
    import structlog

    from bmsd.ingest.daemon import run
    from bmsd.logs import configure_logging

    path = find_config(args.config)
    config = load_config(path, secrets=RUN_SECRETS)
    configure_logging(config.log_format, config.log_level)
    structlog.get_logger("bmsd").info(
        "config_loaded", path=str(path) if path else "built-in defaults", version=__version__)
    return run(config)


def _cmd_simulate(args: argparse.Namespace) -> int:
    import json
    from datetime import datetime

    from bmsd.simulate.plan import Options
    from bmsd.simulate.publish import format_summary, run

    if args.messages is None and args.duration_s is None:
        raise ConfigError("say when to stop: --messages N or --duration-s S")
    options = Options(
        sites=args.sites, devices_per_site=args.devices_per_site, messages=args.messages,
        duration_s=args.duration_s, rate=args.rate, realtime=args.realtime,
        per_message=args.per_message, qos=args.qos, seed=args.seed,
        start=datetime.fromisoformat(args.start) if args.start else None,
        malformed=args.malformed, duplicates=args.duplicates, out_of_order=args.out_of_order,
        late=args.late, alerts=args.alerts, backfill_s=args.backfill_s,
        sparkplug=args.sparkplug)
    url = args.mqtt_url
    if url is None:
        mqtt = _config(args, "mqtt").mqtt
        url = mqtt.url
        parts = urlsplit(url)
        if mqtt.password is not None and parts.username and parts.password is None:
            # The password of [mqtt] password_file, as bmsd run would use it.
            secret = quote(mqtt.password.get_secret_value(), safe="")
            url = parts._replace(netloc=f"{parts.username}:{secret}@{parts.netloc.split('@')[-1]}"
                                 ).geturl()
    summary = run(url, options, client_id=args.client_id,
                  progress=sys.stderr if sys.stderr.isatty() or args.progress else None)
    print(format_summary(summary))
    if args.summary_json:
        args.summary_json.write_text(json.dumps(summary.as_dict(), indent=2) + "\n")
    return 0 if summary.errors == 0 else 1


_LIST_ALERTS = """
    SELECT a.id, a.severity, a.rule_code, s.slug, d.slug, a.status, a.triggered_at, a.message
      FROM alerts a JOIN devices d ON d.id = a.device_id JOIN sites s ON s.id = a.site_id
     WHERE a.status <> 'resolved'
       AND (%(site)s::text IS NULL OR s.slug = %(site)s)
       AND (%(severity)s::text IS NULL OR a.severity = %(severity)s)
     ORDER BY array_position(%(most_severe_first)s::text[], a.severity),
              a.triggered_at
"""


def _cmd_alerts(args: argparse.Namespace) -> int:
    import psycopg
    from psycopg.rows import dict_row

    from bmsd.database import connect

    if args.action == "ack" and (args.id is None or not args.by):
        raise ConfigError("usage: bmsd alerts ack ID --by NAME")  # before any connection
    database = _database(args, _config(args, "database").database)
    try:
        with connect(database, "bmsd-alerts") as conn:
            if args.action == "ack":
                try:
                    row = conn.cursor(row_factory=dict_row).execute(
                        "SELECT id, rule_code, status FROM acknowledge_alert(%s, %s)",
                        (args.id, args.by)).fetchone()
                except psycopg.errors.RaiseException as exc:
                    print(f"bmsd alerts: {exc.diag.message_primary}", file=sys.stderr)
                    return 1
                if row is None:  # the function raises rather than return nothing
                    raise DatabaseError(f"acknowledge_alert({args.id}) returned no row")
                print(f"alert {row['id']} ({row['rule_code']}) {row['status']} by {args.by}")
                return 0
            rows = conn.execute(_LIST_ALERTS, {
                "site": args.site, "severity": args.severity,
                "most_severe_first": list(reversed(SEVERITIES))}).fetchall()
    except psycopg.Error as exc:
        raise DatabaseError(f"the database failed: {exc}".strip()) from exc
    if not rows:
        print("no unresolved alerts")
        return 0
    print(f"{'ID':>6}  {'SEVERITY':8}  {'CODE':26}  {'SITE/DEVICE':28}  {'STATUS':12}  SINCE")
    for id_, severity, code, site, device, status, since, message in rows:
        print(f"{id_:>6}  {severity:8}  {code:26}  {site + '/' + device:28}  {status:12}"
              f"  {since:%Y-%m-%d %H:%M:%S%z}\n        {message}")
    return 0


_Argument = tuple[tuple[str, ...], dict[str, Any]]
_DATABASE_URL: _Argument = (("--database-url",),
                            {"help": "default: BMSD_DATABASE_URL, then the config file"})
_SHARES = (("malformed", "bad payloads"), ("duplicates", "messages sent twice"),
           ("out-of-order", "messages sent after their successor"),
           ("late", "extra readings an hour old"),
           ("alerts", "readings past an alert threshold"))

#: Every command: name, what it does, the function that does it, its arguments.
COMMANDS: tuple[tuple[str, str, Callable[[argparse.Namespace], int], tuple[_Argument, ...]],
                ...] = (
    ("migrate", "Apply the schema scripts of sql/ to the database.", _cmd_migrate, (
        _DATABASE_URL,
        (("--sql-dir",), {"type": Path, "help": "default: the sql/ beside bmsd"}),
        (("--skip-community-features",), {
            "action": "store_true",
            "help": "on TimescaleDB's Apache-only edition, apply everything but the continuous"
                    " aggregates and policies, and record those as skipped"}),
        (("--wait-for-database",), {
            "action": "store_true",
            "help": "while the database cannot be reached, keep trying (with backoff) instead"
                    " of exiting 1; for bmsd-migrate.service"}),
        (("--demo-data",), {
            "action": "store_true",
            "help": "also load the demo plants, devices, tariffs and carbon factors of"
                    " sql/demo/ (never for a production database)"}),
    )),
    ("create-login", "Create (or update) a login role for bmsd or Grafana, with its password"
                     " from a file; run after migrate.", _cmd_create_login, (
        (("name",), {"help": "the login role, e.g. bmsd_app or grafana"}),
        (("--member-of",), {"required": True, "choices": ["bmsd_ingest", "bmsd_reader"],
                            "help": "bmsd_ingest for the daemon, bmsd_reader for dashboards"}),
        (("--password-file",), {"type": Path, "required": True}),
        (("--database-url",), {"help": "a role that may create roles; default: [migrate]'s"
                                       " login at [database]'s host"}),
    )),
    ("check-config", "Validate the configuration and print it, secrets redacted; exit 2 if"
                     " it is wrong.", _cmd_check_config, (
        (("--example",), {"action": "store_true", "help": "print the shipped example"
                                                          " configuration (every key, its"
                                                          " default)"}),
    )),
    ("run", "Run the ingest daemon: MQTT telemetry into TimescaleDB.", _cmd_run, ()),
    ("probe", "Ask the bmsd running with this configuration whether it is ready (its"
              " [metrics] addr): exit 0 if so, 1 if not (a HEALTHCHECK, a probe).", _cmd_probe, (
        (("endpoint",), {"nargs": "?", "choices": ["readyz", "healthz"], "default": "readyz"}),
        (("--timeout-s",), {"type": float, "default": 4.0}),
    )),
    ("alerts", "List unresolved alerts, or acknowledge one: bmsd alerts ack ID --by NAME.",
     _cmd_alerts, (
        (("action",), {"nargs": "?", "choices": ["list", "ack"], "default": "list"}),
        (("id",), {"nargs": "?", "type": int, "help": "with ack: the alert's id"}),
        (("--by",), {"help": "with ack: who acknowledges"}),
        (("--site",), {"help": "only this site (slug)"}),
        (("--severity",), {"choices": SEVERITIES}),
        _DATABASE_URL,
    )),
    ("simulate", "Publish realistic field-gateway telemetry over MQTT.", _cmd_simulate, (
        (("--mqtt-url",), {"help": "default: BMSD_MQTT_URL, then the config file"}),
        (("--client-id",), {"default": "bmsd-simulator"}),
        (("--sites",), {"type": int, "default": 2,
                        "help": "even-numbered: battery sites; odd: factories (default 2)"}),
        (("--devices-per-site",), {"type": int, "default": 6}),
        (("--messages",), {"type": int, "help": "stop after this many messages"}),
        (("--duration-s",), {"type": float, "help": "stop after this many seconds"}),
        (("--rate",), {"type": float, "help": "messages per second in all (default: as fast"
                                              " as the broker takes them)"}),
        (("--backfill-s",), {"type": float, "default": 0.0, "metavar": "S",
                             "help": "with --realtime: first publish the last S seconds of"
                                     " history as fast as the broker takes it (dashboards"
                                     " then have data at once)"}),
        (("--realtime",), {"action": "store_true", "help": "publish at the devices' own"
                                                           " intervals (compressor 1 s, ...)"}),
        (("--per-message",), {"type": int, "default": 1, "help": "readings per message"}),
        (("--qos",), {"type": int, "choices": [0, 1, 2], "default": 1}),
        (("--seed",), {"type": int, "default": 1, "help": "same seed, same data"}),
        (("--start",), {"help": "first timestamp (ISO 8601); default: the run ends now"}),
        *(((f"--{name}",), {"type": float, "default": 0.0, "metavar": "SHARE",
                            "help": f"share (0-1) of {what}"}) for name, what in _SHARES),
        (("--sparkplug",), {"type": float, "nargs": "?", "const": 1.0, "default": 0.0,
                            "metavar": "SHARE",
                            "help": "the battery sites (a share 0-1 of them; alone: all) are"
                                    " Sparkplug B edge nodes of group demo (docs/sparkplug.md)"}),
        (("--summary-json",), {"type": Path, "help": "also write the summary here as JSON"}),
        (("--progress",), {"action": "store_true",
                           "help": "progress line even without a TTY"}),
    )),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bmsd", description="Battery and energy telemetry from MQTT into TimescaleDB.")
    parser.add_argument("--version", action="version", version=f"bmsd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, what, action, arguments in COMMANDS:
        command = sub.add_parser(name, help=what, description=what)
        command.add_argument("--config", type=Path, default=None,
                             help="TOML configuration (default: $BMSD_CONFIG, else"
                                  f" {SYSTEM_CONFIG_PATH} if present, else built-in defaults)")
        for flags, options in arguments:
            command.add_argument(*flags, **options)
        command.set_defaults(func=action)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    args = build_parser().parse_args(argv)
    return exit_code(args.command, lambda: int(args.func(args)))


def exit_code(command: str, action: Callable[[], int]) -> int:
    """Run *action*; turn what it raises into one line on stderr and its exit code
    (README, "Exit codes")."""
    try:
        return action()
    except EditionError as exc:
        print(f"bmsd {command}: {exc}", file=sys.stderr)
        return 3
    except ConfigError as exc:
        print(f"bmsd {command}: {exc}", file=sys.stderr)
        return 2
    except BmsdError as exc:
        print(f"bmsd {command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: what was asked for, not a crash (128 + SIGINT)
        print(f"bmsd {command}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a server down or a file gone, past the commands' own checks
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"bmsd {command}: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except Exception as exc:
        if os.environ.get("BMSD_TRACEBACK"):
            raise
        # A database error no command expected, or a bug: one line, and how to see more.
        print(f"bmsd {command}: {type(exc).__module__}.{type(exc).__qualname__}: {exc};"
              " run again with BMSD_TRACEBACK=1 for the traceback (and report it if it is"
              " bmsd's bug)", file=sys.stderr)
        return 70  # EX_SOFTWARE
