"""The command line: ``payler --config-file configuration.yaml`` runs the daemon, as the
original Payler's command did (that command line is a contract); the admin commands
(``payler scheduled ...``, ``payler dead-letters ...``, ``payler send``) sit beside it in one
click group whose default, without a command, is the daemon (:mod:`payler.admin.commands`).

Exit status of the daemon: 0 after a clean stop (SIGINT/SIGTERM), 2 for a configuration or
start-up error (one message, no traceback), 1 for anything unexpected (with its traceback: that
is a bug). Only the CLI installs signal handlers; a second signal stops at once, without the
grace period. The admin commands exit 1 with one line on failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import click

from payler import __version__, config, eventloop, logs
from payler.admin.commands import COMMANDS
from payler.errors import ConfigError, StartupError
from payler.runtime import Runtime

log = logging.getLogger("payler")

EXIT_OK, EXIT_CRASH, EXIT_CONFIG = 0, 1, 2
#: The signals that stop payler cleanly.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@click.group(
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.option(
    "--config-file",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The YAML configuration file (a list of workflows). Without a command: run them.",
)
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    envvar="PAYLER_LOG_LEVEL",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    help="Logging threshold (also PAYLER_LOG_LEVEL).",
)
@click.option(
    "--log-format",
    default="text",
    show_default=True,
    envvar="PAYLER_LOG_FORMAT",
    type=click.Choice(["text", "json"], case_sensitive=False),
    help="text for people, json (one object per line) for machines (also PAYLER_LOG_FORMAT).",
)
@click.option(
    "--log-headers",
    default="",
    envvar="PAYLER_LOG_HEADERS",
    metavar="NAMES",
    help="Comma-separated header names whose values may appear in logs (none by default).",
)
@click.option("--check", is_flag=True, help="Validate the configuration and exit.")
@click.version_option(__version__, prog_name="payler")
@click.pass_context
def main(
    ctx: click.Context,
    config_file: Path | None,
    log_level: str,
    log_format: str,
    log_headers: str,
    check: bool,
) -> None:
    """payler, the payload spooler: take messages from brokers now, deliver them later.

    Run the daemon with --config-file; or operate it with the commands below.
    """
    logs.setup(log_level.upper(), "json" if log_format.lower() == "json" else "text",
               log_headers.split(","))  # fmt: skip
    ctx.obj = {"config_file": config_file}
    if ctx.invoked_subcommand is not None:
        if log_level.upper() != "DEBUG":
            # An admin command opens the spool for one operation: the daemon's start-up line
            # ("opened the spool at ...: N pending") would be noise there; a warning (a new,
            # empty spool where one was expected: a wrong path) is not.
            logging.getLogger("payler.storage").setLevel(logging.WARNING)
        return
    if config_file is None:
        raise click.UsageError("Missing option '--config-file'.")
    try:
        loaded = config.load(config_file)
    except ConfigError as exc:
        _fail(exc)
    if check:
        click.echo(f"{config_file}: OK, {len(loaded.workflows)} workflow(s)")
        sys.exit(EXIT_OK)
    try:
        eventloop.run(_serve(Runtime(loaded)))
    except (ConfigError, StartupError) as exc:
        _fail(exc)
    sys.exit(EXIT_OK)


for _command in COMMANDS:
    main.add_command(_command)


async def _serve(runtime: Runtime) -> None:
    """Run ``runtime`` until a signal stops it.

    The first SIGINT/SIGTERM starts a clean stop; a second one during it cancels what is left
    (stops at once). Every signal after the first, up to the exit, ends in status 0: once the
    runtime is done, the signals are ignored — nothing is left to stop — and never handed back
    to their default action, which would kill the process by the signal (status -15) while
    asyncio closes its loop and Python shuts down.
    """
    stop = asyncio.Event()
    run = asyncio.ensure_future(runtime.run(stop))

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if not stop.is_set():
            log.info("%s received", name)
            stop.set()
        elif not run.done():
            log.warning("second %s: stopping now", name)
            run.cancel()  # the runtime's task, never ours: its cancellation is a clean stop

    with _stop_signals(asyncio.get_running_loop(), on_signal):
        await asyncio.wait([run])
    if not run.cancelled():
        run.result()  # a start-up or configuration error, raised for main() to report
    log.info("payler stopped")


@contextlib.contextmanager
def _stop_signals(
    loop: asyncio.AbstractEventLoop, on_signal: Callable[[int], None]
) -> Iterator[None]:
    """Call ``on_signal(signum)`` in ``loop`` for each SIGINT/SIGTERM; ignore them after.

    Not ``loop.add_signal_handler``: asyncio hands a signal back to its default action when its
    handler is removed or the loop closes, and that default kills the process. Here a signal goes
    straight from handled to ignored. The same mechanism as asyncio's otherwise: the C-level
    handler writes each signal's number to a socket the loop watches, whichever thread the signal
    lands in, so the loop wakes up and the main thread runs the Python-level handler at once.
    """
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    loop.add_reader(wake_r.fileno(), _drain, wake_r)
    previous_fd = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)

    def handler(signum: int, frame: object) -> None:
        loop.call_soon_threadsafe(on_signal, signum)

    try:
        for signum in STOP_SIGNALS:
            signal.signal(signum, handler)
        yield
    finally:
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        signal.set_wakeup_fd(previous_fd)
        loop.remove_reader(wake_r.fileno())
        wake_r.close()
        wake_w.close()


def _drain(sock: socket.socket) -> None:
    """Read what the wake-up socket holds (the numbers of signals already being handled)."""
    with contextlib.suppress(BlockingIOError, InterruptedError):
        while sock.recv(4096):
            pass


def _fail(exc: BaseException) -> NoReturn:
    click.echo(f"payler: error: {exc}", err=True)
    sys.exit(EXIT_CONFIG)
