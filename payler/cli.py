"""The command line: ``payler --config-file configuration.yaml``.

Exit status: 0 after a clean stop (SIGINT/SIGTERM), 2 for a configuration or start-up error (one
message, no traceback), 1 for anything unexpected (with its traceback: that is a bug). Only the
CLI installs signal handlers; a second signal stops at once, without the grace period.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import NoReturn

import click

from payler import __version__, config
from payler.errors import ConfigError, StartupError
from payler.runtime import Runtime

log = logging.getLogger("payler")

EXIT_OK, EXIT_CRASH, EXIT_CONFIG = 0, 1, 2


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config-file",
    "config_file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The YAML configuration file (a list of workflows).",
)
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    envvar="PAYLER_LOG_LEVEL",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    help="Logging threshold (also PAYLER_LOG_LEVEL).",
)
@click.option("--check", is_flag=True, help="Validate the configuration and exit.")
@click.version_option(__version__, prog_name="payler")
def main(config_file: Path, log_level: str, check: bool) -> None:
    """payler, the payload spooler: take messages from brokers now, deliver them later."""
    _setup_logging(log_level.upper())
    try:
        loaded = config.load(config_file)
    except ConfigError as exc:
        _fail(exc)
    if check:
        click.echo(f"{config_file}: OK, {len(loaded.workflows)} workflow(s)")
        sys.exit(EXIT_OK)
    try:
        asyncio.run(_serve(Runtime(loaded)))
    except (ConfigError, StartupError) as exc:
        _fail(exc)
    sys.exit(EXIT_OK)


async def _serve(runtime: Runtime) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second %s: stopping now", signal.Signals(signum).name)
            if main_task is not None:
                main_task.cancel()
            return
        log.info("%s received", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await runtime.run(stop)
    except asyncio.CancelledError:
        if not stop.is_set():
            raise
    log.info("payler stopped")


def _fail(exc: BaseException) -> NoReturn:
    click.echo(f"payler: error: {exc}", err=True)
    sys.exit(EXIT_CONFIG)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # The driver libraries log every failed connection attempt, some with tracebacks; payler
    # reports those failures itself, once and readably. --log-level DEBUG shows them all.
    if level != "DEBUG":
        for noisy in ("aio_pika", "aiormq", "pymongo", "aiosqlite", "aiokafka", "uvicorn"):
            logging.getLogger(noisy).setLevel(logging.CRITICAL)
