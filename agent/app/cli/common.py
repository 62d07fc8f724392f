"""What the command modules share: exit codes, the sub-command parser with its config option,
logging, serving until a signal, tables and times."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TextIO

from energy_agent import __version__
from energy_agent.core.errors import ConfigError

if TYPE_CHECKING:  # the config model (pydantic, drivers) loads only when a command reads a config
    from energy_agent.app.config import Loaded

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
"""A configuration or usage error (argparse exits with 2 on a bad command line too)."""

CONFIG_ENV = "ENERGY_AGENT_CONFIG"
"""The config file of every command that reads one, when ``-c/--config`` is not given."""

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class Command(argparse.ArgumentParser):
    """The parser of one sub-command.

    ``needs_config``: the command has ``-c/--config FILE``, whose default is
    ``$ENERGY_AGENT_CONFIG`` (read when the parser is built); after parsing, one of them must
    name a file, otherwise a usage error naming both.
    ``define``: adds the command's arguments on first use, for commands whose arguments live in a
    module that is slow to import (the simulators, cryptography), so that other commands never
    load it.
    """

    def __init__(self, *args: Any, needs_config: bool = False,
                 define: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.needs_config = needs_config
        self._define = define
        if needs_config:
            self.add_argument("-c", "--config", metavar="FILE", default=os.environ.get(CONFIG_ENV) or None,
                              help=f"plant config file (default: ${CONFIG_ENV})")

    def define(self) -> None:
        """Add the arguments that ``define`` describes, once (parsing and help call it)."""
        if self._define is not None:
            define, self._define = self._define, None
            define(self)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self.define()
        parsed, rest = super().parse_known_args(args, namespace)
        if self.needs_config and not parsed.config:
            self.error(f"no config file: give -c/--config FILE or set {CONFIG_ENV}")
        return parsed, rest

    def format_usage(self) -> str:
        self.define()
        return super().format_usage()

    def format_help(self) -> str:
        self.define()
        return super().format_help()


def global_options(default: Any) -> argparse.ArgumentParser:
    """The options accepted before the command and after it: the top-level parser has them with
    their real default (``None``), each command with ``argparse.SUPPRESS``, so that a command
    line without them after the command keeps the value given before it."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("global options (before or after the command)")
    group.add_argument("--log-level", choices=LOG_LEVELS, default=default,
                       help="log to stderr from this level (default: run and bridge take the config's "
                            "log_level, simulate INFO, every other command WARNING)")
    group.add_argument("--log-format", choices=["text", "json"], default=default,
                       help="text lines (default) or one JSON object per line (journald, Loki); times are UTC")
    group.add_argument("--version", action="version", version=f"energy-agent {__version__}",
                       help="print the version and exit")
    return parent


def add_command(commands: Any, name: str, func: Callable[[argparse.Namespace], int], help: str, *,
                log_level: str | None = "WARNING", **kwargs: Any) -> Command:
    """A sub-command of ``commands`` (the top-level parser's sub-parsers) that runs ``func(args)``.

    ``log_level``: the level when ``--log-level`` is not given; None when the command sets up
    logging itself (run and bridge take the level from their config). ``kwargs`` go to
    :class:`Command` (``needs_config``, ``define``, ``description``)."""
    kwargs.setdefault("description", help[:1].upper() + help[1:] + ".")
    parser = commands.add_parser(name, help=help, parents=[global_options(argparse.SUPPRESS)], **kwargs)
    parser.set_defaults(func=func, default_log_level=log_level)
    return parser


def load_config(path: str) -> Loaded:
    """Read and validate a config file; ConfigError names what is wrong."""
    from energy_agent.app import config

    return config.load(path)


def setup_logging(level: str, fmt: str | None = None) -> None:
    """Log to stderr at ``level`` in ``fmt`` (text or json; energy_agent.app.logs)."""
    from energy_agent.app import logs

    logs.setup(level, fmt or "text")


def serve(main: Callable[[asyncio.Event], Coroutine[Any, Any, Any]]) -> int:
    """Run ``main(stop)`` until SIGINT/SIGTERM sets ``stop``; its int result is the exit code."""

    async def runner() -> Any:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await main(stop)

    result = asyncio.run(runner())
    return result if isinstance(result, int) else EXIT_OK


def print_table(rows: list[dict], columns: tuple[str, ...] | list[str], out: TextIO | None = None) -> None:
    """``rows`` as left-aligned columns under a header line."""
    out = out or sys.stdout
    widths = {c: max([len(c)] + [len(str(r[c])) for r in rows]) for c in columns}
    out.write("  ".join(c.ljust(widths[c]) for c in columns) + "\n")
    for r in rows:
        out.write("  ".join(str(r[c]).ljust(widths[c]) for c in columns) + "\n")


def epoch(text: str | None, option: str) -> float | None:
    """An ISO 8601 date or time (naive = UTC) given to ``option`` as epoch seconds; None if not given."""
    if not text:
        return None
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConfigError(f"{option}: {text!r} is not an ISO 8601 date or time") from exc
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()
