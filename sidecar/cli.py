"""`auth-sidecar` command line: run, check-config, config-schema, generate-key, sessions."""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import sys
from collections.abc import Sequence
from typing import Any

from sidecar import __version__
from sidecar.config import Config, load_config
from sidecar.config.schema import config_schema
from sidecar.errors import ConfigError

__all__ = ["main"]

_CONFIG_ENV = "AUTH_SIDECAR_CONFIG"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"auth-sidecar: {exc}", file=sys.stderr)
        return 1
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="auth-sidecar", description="OpenID Connect auth sidecar and reverse proxy."
    )
    parser.add_argument("--version", action="version", version=f"auth-sidecar {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help="run the sidecar")
    _config_option(run)
    run.add_argument("--workers", type=int, help="processes sharing the port (server.workers)")
    run.add_argument("--worker-slot", type=int, help=argparse.SUPPRESS)  # set by the supervisor
    run.set_defaults(func=_run)

    check = commands.add_parser("check-config", help="validate a config file; connects nowhere")
    _config_option(check)
    check.set_defaults(func=_check_config)

    schema = commands.add_parser("config-schema", help="print the config's JSON Schema")
    schema.set_defaults(func=_config_schema)

    demo = commands.add_parser("demo", help="dev IdP + echo app + sidecar on 127.0.0.1")
    demo.add_argument("--port", type=int, default=4180, help="sidecar port (uses the next 3)")
    demo.add_argument(
        "--verbose", action="store_true", help="JSON logs and access lines instead of the story"
    )
    demo.set_defaults(func=_demo)

    key = commands.add_parser("generate-key", help="print a new session encryption key")
    key.set_defaults(func=_generate_key)

    sessions = commands.add_parser(
        "sessions", help="list or end a user's sessions in the store (Redis)"
    )
    actions = sessions.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="print a user's live sessions as JSON")
    listing.add_argument("--sub", required=True, help="the user's subject (sub claim)")
    ending = actions.add_parser("end", help="end a user's sessions, or one session by id")
    which = ending.add_mutually_exclusive_group(required=True)
    which.add_argument("--sub", help="end every session of this subject")
    which.add_argument("--id", help="end the session with this id (as `list` shows it)")
    for action in (listing, ending):
        action.add_argument("--iss", help="the issuer (default: oidc.issuer)")
        _config_option(action)
        action.set_defaults(func=_sessions)
    return parser


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=os.environ.get(_CONFIG_ENV),
        help=f"YAML config file (default: ${_CONFIG_ENV})",
    )


def _load(args: argparse.Namespace) -> Config:
    if not args.config:
        raise ConfigError([f"no config file: pass --config FILE or set {_CONFIG_ENV}"])
    workers = getattr(args, "workers", None)
    overrides = {"server": {"workers": workers}} if workers is not None else None
    return load_config(args.config, overrides=overrides)


def _run(args: argparse.Namespace) -> int:
    from sidecar.logging import configure_logging
    from sidecar.server import run

    config = _load(args)
    configure_logging(config.logging.level)
    run(config, args.config, worker_slot=args.worker_slot)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from sidecar.dev.console import configure_demo_logging
    from sidecar.dev.demo import DemoPortBusy, run_demo
    from sidecar.logging import configure_logging
    from sidecar.server import run_until_done

    if args.verbose:
        configure_logging("info")
    else:
        configure_demo_logging()
    try:
        run_until_done(run_demo(args.port, verbose=args.verbose))
    except DemoPortBusy as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


def _check_config(args: argparse.Namespace) -> int:
    _load(args)
    print(f"{args.config}: configuration is valid")
    return 0


def _config_schema(args: argparse.Namespace) -> int:
    print(json.dumps(config_schema(), indent=2))
    return 0


def _sessions(args: argparse.Namespace) -> int:
    import asyncio

    from sidecar.errors import StoreUnavailable

    config = _load(args)
    if config.session.store != "redis":
        print(
            "auth-sidecar: session.store is memory: its sessions live inside the running "
            "process; use the admin API (docs/operations.md)",
            file=sys.stderr,
        )
        return 1
    try:
        answer = asyncio.run(_session_command(config, args))
    except StoreUnavailable as exc:
        print(f"auth-sidecar: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(answer, indent=2))
    if args.action == "end" and args.id and not answer["ended"]:
        print("auth-sidecar: no live session has this id", file=sys.stderr)
        return 1
    return 0


async def _session_command(config: Config, args: argparse.Namespace) -> dict[str, Any]:
    """What the admin API answers, straight from the store."""
    from sidecar.app import open_sessions
    from sidecar.backend import open_backend
    from sidecar.session import admin

    store = open_backend(config).store
    try:
        sessions = open_sessions(config, store)
        iss = args.iss or config.oidc.issuer
        if args.action == "list":
            return {"sessions": await admin.listing(sessions, iss, args.sub)}
        if args.id is not None:
            return {"ended": await admin.end_one(sessions, args.id)}
        return {"ended": await admin.end_user(sessions, iss, args.sub)}
    finally:
        await store.close()


def _generate_key(args: argparse.Namespace) -> int:
    print(base64.b64encode(secrets.token_bytes(32)).decode())
    return 0
