"""The admin CLI: ``payler scheduled ...``, ``payler dead-letters ...``, ``payler send``.

Each command works directly on the spool and broker the daemon uses (from ``--config-file``,
else the same environment variables; ``--storage-url`` / ``--broker-url`` override them), so no
daemon needs to run, or through a running daemon's API (``--api URL``, with ``--token`` or
``PAYLER_API_TOKEN``). Tables for people, ``--json`` for scripts; on failure, one line on
stderr and exit status 1.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from pydantic import BaseModel

from payler import config
from payler.admin.operations import Admin
from payler.admin.remote import RemoteAdmin
from payler.admin.target import AdminTarget
from payler.admin.times import iso, parse_duration_ms, show_duration
from payler.admin.views import DiscardRequest, Entry, NewMessage, Properties, ReplayRequest
from payler.drivers.brokers import broker_from_url
from payler.errors import InvalidSchedule, PaylerError, is_transient
from payler.isolation import describe
from payler.payload import MessageProperties, Payload
from payler.reasons import REASON_CLASSES
from payler.scheduling import DELAY_HEADER, DELIVER_AT_HEADER, DESTINATION_HEADER, parse_deliver_at
from payler.urls import mask_urls

EXIT_FAILED = 1
F = TypeVar("F", bound=Callable[..., Any])
Operations = Admin | RemoteAdmin


def connection_options(command: F) -> F:
    """The options every admin command takes: where the spool, broker or API is."""
    for option in reversed(
        [
            click.option("--config-file", type=click.Path(dir_okay=False, path_type=Path),
                         help="The daemon's configuration (its spool, broker and queues)."),
            click.option("--storage-url", help="The spool (else from the configuration / "
                         "PAYLER_STORAGE_URL)."),
            click.option("--broker-url",
                         help="The broker (else from the configuration / BROKER_URL)."),
            click.option("--api", "api_url", metavar="URL",
                         help="Work through a running daemon's API (http://host:port)."),
            click.option("--token", envvar="PAYLER_API_TOKEN", help="The API's bearer token "
                         "(also PAYLER_API_TOKEN)."),
            click.option("--json", "as_json", is_flag=True, help="JSON for scripts."),
        ]
    ):  # fmt: skip
        command = option(command)
    return command


def target_of(
    ctx: click.Context, config_file: Path | None, storage_url: str | None, broker_url: str | None
) -> AdminTarget:
    path = config_file or (ctx.obj or {}).get("config_file")
    target = AdminTarget.from_config(config.load(path)) if path else AdminTarget.from_environment()
    if storage_url:
        target = replace(target, storage_url=storage_url)
    if broker_url:
        target = replace(target, broker_url=broker_url)
    return target


def run(step: Callable[[], Awaitable[None]]) -> None:
    """Run an async command; any failure is one line on stderr and exit status 1."""
    try:
        asyncio.run(step())  # type: ignore[arg-type]
    except click.exceptions.Exit:
        raise
    except (PaylerError, ValueError, OSError) as exc:
        fail(str(exc) or describe(exc))
    except Exception as exc:
        if is_transient(exc):
            fail(describe(exc))
        raise


def fail(message: str) -> NoReturn:
    click.echo(f"payler: error: {mask_urls(message)}", err=True)
    sys.exit(EXIT_FAILED)


def operations(ctx: click.Context, /, options: dict[str, Any]) -> Operations:
    if options["api_url"]:
        return RemoteAdmin(options["api_url"], options["token"])
    return Admin(
        target_of(ctx, options["config_file"], options["storage_url"], options["broker_url"])
    )


def who() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def emit(
    value: BaseModel | list[Any] | dict[str, Any], as_json: bool, table: Callable[[], None]
) -> None:
    if as_json:
        data = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
        click.echo(json.dumps(data, ensure_ascii=False, indent=2))
    else:
        table()


def print_table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> None:
    cells = [[str(h) for h in headers]] + [
        ["" if c is None else str(c) for c in row] for row in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for index, row in enumerate(cells):
        line = "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip()
        click.echo(click.style(line, bold=True) if index == 0 and sys.stdout.isatty() else line)


def _short(text: str, width: int = 40) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _entry_rows(items: Sequence[Entry]) -> list[list[object]]:
    return [
        [e.id, e.due_at, e.destination, e.attempts, e.correlation_id or "", _short(e.body, 30)]
        for e in items
    ]


def _due(value: str | None, name: str) -> int | None:
    if value is None:
        return None
    try:
        return parse_deliver_at(value)
    except InvalidSchedule as exc:
        raise click.BadParameter(exc.reason, param_hint=name) from None


def _header(value: str) -> tuple[str, str]:
    name, sep, text = value.partition("=")
    if not sep or not name:
        raise click.BadParameter(f"expected name=value, got {value!r}", param_hint="-H")
    return name, text


# -- payler scheduled ------------------------------------------------------------------------------


@click.group()
def scheduled() -> None:
    """Scheduled (pending) spool entries: list, show, count, cancel, reschedule, deliver."""


@scheduled.command("list")
@click.option("--destination")
@click.option("--due-from", help="ISO 8601 with an offset, or epoch ms.")
@click.option("--due-to", help="ISO 8601 with an offset, or epoch ms.")
@click.option("--message-id")
@click.option("--correlation-id")
@click.option("-H", "--header", "header", help="name=value (scans at most 10,000 entries).")
@click.option("--dead", is_flag=True, help="The dead entries instead of the pending ones.")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--cursor", help="next_cursor of the previous page.")
@connection_options
@click.pass_context
def list_command(ctx: click.Context, /, **options: Any) -> None:
    """List entries in due order."""

    async def step() -> None:
        async with operations(ctx, options) as admin:
            page = await admin.list_entries(
                state="dead" if options["dead"] else "pending",
                destination=options["destination"],
                due_from_ms=_due(options["due_from"], "--due-from"),
                due_to_ms=_due(options["due_to"], "--due-to"),
                message_id=options["message_id"],
                correlation_id=options["correlation_id"],
                header=_header(options["header"]) if options["header"] else None,
                limit=options["limit"],
                cursor=options["cursor"],
            )

        def table() -> None:
            print_table(_entry_rows(page.items), ["ID", "DUE", "DESTINATION", "ATTEMPTS",
                                                   "CORRELATION ID", "BODY"])  # fmt: skip
            if page.scanned is not None:
                click.echo(f"(scanned {page.scanned} entries for the header filter)")
            if page.next_cursor:
                click.echo(f"more: --cursor '{page.next_cursor}'")

        emit(page, options["as_json"], table)

    run(step)


@scheduled.command("show")
@click.argument("entry_id")
@click.option("--body-limit", type=click.IntRange(0), default=64 * 1024, show_default=True)
@connection_options
@click.pass_context
def show_command(ctx: click.Context, /, entry_id: str, body_limit: int, **options: Any) -> None:
    """One entry: body, headers, properties, due time, attempts, last error."""

    async def step() -> None:
        async with operations(ctx, options) as admin:
            entry = await admin.get(entry_id, body_limit)
        if entry is None:
            fail(f"no entry {entry_id!r}")

        def table() -> None:
            for name in ("id", "state", "destination", "due_at", "attempts", "last_error",
                         "source", "message_id", "correlation_id"):  # fmt: skip
                click.echo(f"{name:>15}: {getattr(entry, name)}")
            click.echo(f"{'headers':>15}: {json.dumps(entry.headers, ensure_ascii=False)}")
            props = entry.properties.model_dump(exclude_none=True)
            click.echo(f"{'properties':>15}: {json.dumps(props)}")
            cut = " (cut)" if entry.body_truncated else ""
            click.echo(f"{'body':>15}: {entry.body_bytes} bytes, {entry.body_encoding}{cut}")
            click.echo(entry.body)

        emit(entry, options["as_json"], table)

    run(step)


@scheduled.command("count")
@click.option("--destination")
@connection_options
@click.pass_context
def count_command(ctx: click.Context, /, destination: str | None, **options: Any) -> None:
    """How many entries are pending and dead."""

    async def step() -> None:
        async with operations(ctx, options) as admin:
            counted = await admin.count(destination)
        emit(counted, options["as_json"],
             lambda: click.echo(f"pending: {counted.pending}\ndead: {counted.dead}"))  # fmt: skip

    run(step)


@scheduled.command("cancel")
@click.argument("entry_ids", nargs=-1, required=True)
@connection_options
@click.pass_context
def cancel_command(ctx: click.Context, /, entry_ids: tuple[str, ...], **options: Any) -> None:
    """Cancel entries (delete them from the spool)."""

    async def step() -> None:
        async with operations(ctx, options) as admin:
            done = {i: await admin.cancel(i, who=who()) for i in entry_ids}

        def table() -> None:
            for entry_id, ok in done.items():
                click.echo(f"{'cancelled' if ok else 'not found'}: {entry_id}")

        emit(done, options["as_json"], table)
        if not all(done.values()):
            sys.exit(EXIT_FAILED)

    run(step)


@scheduled.command("reschedule")
@click.argument("entry_id")
@click.option("--delay", help="From now: 500ms, 5s, 10m, 2h.")
@click.option("--deliver-at", help="ISO 8601 with an offset, or epoch ms.")
@connection_options
@click.pass_context
def reschedule_command(
    ctx: click.Context, /, entry_id: str, delay: str | None, deliver_at: str | None, **options: Any
) -> None:
    """Give an entry a new due time."""
    if (delay is None) == (deliver_at is None):
        raise click.UsageError("give --delay or --deliver-at (one of them)")
    delay_ms = None if delay is None else _duration(delay)

    async def step() -> None:
        async with operations(ctx, options) as admin:
            entry = await admin.reschedule(
                entry_id, who=who(), delay_ms=delay_ms, deliver_at=deliver_at
            )
        if entry is None:
            fail(f"no entry {entry_id!r}")
        emit(entry, options["as_json"], lambda: click.echo(f"{entry.id}: due {entry.due_at}"))

    run(step)


@scheduled.command("deliver")
@click.argument("entry_id")
@connection_options
@click.pass_context
def deliver_command(ctx: click.Context, /, entry_id: str, **options: Any) -> None:
    """Make an entry due now (the daemon delivers it at once)."""

    async def step() -> None:
        async with operations(ctx, options) as admin:
            entry = await admin.deliver_now(entry_id, who=who())
        if entry is None:
            fail(f"no entry {entry_id!r}")
        emit(entry, options["as_json"], lambda: click.echo(f"{entry.id}: due now ({entry.due_at})"))

    run(step)


# -- payler dead-letters ---------------------------------------------------------------------------


@click.group("dead-letters")
def dead_letters() -> None:
    """Dead letters, in the spool and on the dead-letter queues: list, replay."""


@dead_letters.command("list")
@click.option("--where", type=click.Choice(["spool", "queue"]))
@click.option("--reason", type=click.Choice(REASON_CLASSES))
@click.option("--destination")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--cursor")
@connection_options
@click.pass_context
def dead_list_command(ctx: click.Context, /, **options: Any) -> None:
    """List dead letters with their reasons (a queue is looked into, not taken from)."""

    async def step() -> None:
        async with operations(ctx, options) as admin:
            page = await admin.dead_letters(
                where=options["where"], reason=options["reason"],
                destination=options["destination"], limit=options["limit"],
                cursor=options["cursor"],
            )  # fmt: skip

        def table() -> None:
            rows = [[d.id, d.where if d.queue is None else f"queue {d.queue}", d.reason_class,
                     d.destination or d.source, _short(d.reason or "", 50)]
                    for d in page.items]  # fmt: skip
            print_table(rows, ["ID", "WHERE", "REASON CLASS", "GOES TO", "REASON"])
            for queue, error in page.queue_errors.items():
                click.echo(f"{queue}: {error}", err=True)
            if page.next_cursor:
                click.echo(f"more: --cursor '{page.next_cursor}'")

        emit(page, options["as_json"], table)

    run(step)


@dead_letters.command("replay")
@click.option("--id", "ids", multiple=True, help="A dead letter's id (repeat for more).")
@click.option("--reason", type=click.Choice(REASON_CLASSES))
@click.option("--destination")
@click.option("--all", "everything", is_flag=True, help="Every dead letter (up to --limit).")
@click.option("--where", type=click.Choice(["spool", "queue"]))
@click.option("--limit", type=click.IntRange(1, 100_000), default=1000, show_default=True)
@connection_options
@click.pass_context
def replay_command(ctx: click.Context, /, ids: tuple[str, ...], everything: bool,
                   **options: Any) -> None:  # fmt: skip
    """Re-inject dead letters to where they were going (each once)."""
    try:
        request = ReplayRequest(
            ids=list(ids) or None, reason_class=options["reason"],
            destination=options["destination"], all=everything, where=options["where"],
            limit=options["limit"],
        )  # fmt: skip
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if not (ids or options["reason"] or options["destination"] or everything):
        raise click.UsageError("select what to replay: --id, --reason, --destination or --all")

    async def step() -> None:
        show = not options["as_json"] and sys.stderr.isatty()
        with click.progressbar(length=request.limit, label="replaying", file=sys.stderr) as bar:
            async with operations(ctx, options) as admin:
                result = await admin.replay(
                    request, who=who(), progress=bar.update if show else None
                )

        def table() -> None:
            click.echo(f"replayed: {result.replayed}")
            for failure in result.failed:
                click.echo(f"failed: {failure.id}: {failure.error}")

        emit(result, options["as_json"], table)
        if result.failed:
            sys.exit(EXIT_FAILED)

    run(step)


@dead_letters.command("discard")
@click.option("--id", "ids", multiple=True, help="A dead letter's id (repeat for more).")
@click.option("--reason", type=click.Choice(REASON_CLASSES))
@click.option("--destination")
@click.option("--all", "everything", is_flag=True, help="Every dead letter (up to --limit).")
@click.option("--where", type=click.Choice(["spool", "queue"]))
@click.option("--limit", type=click.IntRange(1, 100_000), default=1000, show_default=True)
@click.option("--yes", is_flag=True, help="Do not ask first.")
@connection_options
@click.pass_context
def discard_command(ctx: click.Context, /, ids: tuple[str, ...], everything: bool, yes: bool,
                    **options: Any) -> None:  # fmt: skip
    """Delete dead letters for good (from the spool, and off their dead-letter queue)."""
    if not (ids or options["reason"] or options["destination"] or everything):
        raise click.UsageError("select what to discard: --id, --reason, --destination or --all")
    request = DiscardRequest(
        ids=list(ids) or None, reason_class=options["reason"],
        destination=options["destination"], all=everything, where=options["where"],
        limit=options["limit"],
    )  # fmt: skip
    if not yes and sys.stdin.isatty():
        click.confirm("Discard the selected dead letters for good?", abort=True, err=True)

    async def step() -> None:
        async with operations(ctx, options) as admin:
            result = await admin.discard(request, who=who())

        def table() -> None:
            click.echo(f"discarded: {result.discarded}")
            for failure in result.failed:
                click.echo(f"failed: {failure.id}: {failure.error}")

        emit(result, options["as_json"], table)
        if result.failed:
            sys.exit(EXIT_FAILED)

    run(step)


# -- payler send -----------------------------------------------------------------------------------


@click.command("send")
@click.argument("body", required=False)
@click.option("--delay", help="500ms, 5s, 10m, 2h (x-delay).")
@click.option("--deliver-at", help="ISO 8601 with an offset, or epoch ms (x-deliver-at).")
@click.option("--destination", help="Where payler delivers it (x-destination).")
@click.option("-H", "--header", "headers", multiple=True, help="name=value (repeat for more).")
@click.option(
    "--file", "body_file", type=click.File("rb"), help="The body from a file ('-': stdin)."
)
@click.option("--queue", help="payler's input queue (else from the configuration).")
@click.option("--message-id", help="Default: a random one.")
@click.option("--correlation-id")
@click.option("--content-type", default="application/json", show_default=True)
@connection_options
@click.pass_context
def send(ctx: click.Context, /, body: str | None, **options: Any) -> None:
    """Publish a message to payler's input queue, to try payler out.

    The body comes from the argument, --file, or stdin. With --api, the message is scheduled
    through the daemon's API instead (no broker client needed).
    """
    if options["delay"] and options["deliver_at"]:
        raise click.UsageError("give --delay or --deliver-at, not both")
    data = _body(body, options["body_file"])
    headers: dict[str, Any] = dict(_header(h) for h in options["headers"])
    delay_ms = _duration(options["delay"]) if options["delay"] else None
    if delay_ms is not None:
        headers[DELAY_HEADER] = delay_ms
    if options["deliver_at"]:
        _due(options["deliver_at"], "--deliver-at")
        headers[DELIVER_AT_HEADER] = options["deliver_at"]
    message_id = options["message_id"] or uuid.uuid4().hex
    properties = {"message_id": message_id, "correlation_id": options["correlation_id"],
                  "content_type": options["content_type"], "delivery_mode": 2}  # fmt: skip

    async def step() -> None:
        if options["api_url"]:
            remote = RemoteAdmin(options["api_url"], options["token"])
            target = target_of(ctx, options["config_file"], None, None)
            scheduling = (DELAY_HEADER, DELIVER_AT_HEADER)
            message = NewMessage(
                destination=options["destination"] or target.default_destination,
                body=data.decode("utf-8", "surrogateescape"),
                headers={k: v for k, v in headers.items() if k not in scheduling},
                properties=Properties(**properties),
                delay_ms=0 if delay_ms is None and not options["deliver_at"] else delay_ms,
                deliver_at=options["deliver_at"],
            )
            done = await remote.schedule(message, who=who())
            emit(done, options["as_json"],
                 lambda: click.echo(f"scheduled {done.id}, due {done.due_at}"))  # fmt: skip
            return
        target = target_of(
            ctx, options["config_file"], options["storage_url"], options["broker_url"]
        )
        queue = options["queue"] or target.input_queue
        if options["destination"]:
            headers[DESTINATION_HEADER] = options["destination"]
        payload = Payload(
            id=message_id, body=data, headers=headers, properties=MessageProperties(**properties),
            destination=queue, due_ms=0, created_ms=0,
        )  # fmt: skip
        async with broker_from_url(target.broker_url) as broker:
            refused = await broker.send([(payload, headers)])
        if refused:
            fail(f"the broker refused the message: {refused[0].reason}")
        sent = {"queue": queue, "message_id": message_id, "headers": headers}
        emit(sent, options["as_json"],
             lambda: click.echo(f"sent {message_id} to {queue!r} ({_when(headers)})"))  # fmt: skip

    run(step)


def _body(argument: str | None, body_file: Any) -> bytes:
    if body_file is not None:
        data: bytes = body_file.read()
        return data
    if argument == "-" or (argument is None and not sys.stdin.isatty()):
        return sys.stdin.buffer.read()
    if argument is None:
        raise click.UsageError("give a body: an argument, --file, or stdin")
    return argument.encode()


def _duration(text: str) -> int:
    try:
        return parse_duration_ms(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--delay") from None


def _when(headers: dict[str, Any]) -> str:
    if DELIVER_AT_HEADER in headers:
        return f"due at {headers[DELIVER_AT_HEADER]}"
    if DELAY_HEADER in headers:
        delay = headers[DELAY_HEADER]
        if isinstance(delay, int) or (isinstance(delay, str) and delay.isdigit()):
            return f"due in {show_duration(int(delay))}"
        # Not ours to judge here: the daemon decides (and dead-letters it with the reason).
        return f"{DELAY_HEADER}: {delay!r} as given"
    return "no delay header: the workflow's default_delay_ms applies"


COMMANDS = (scheduled, dead_letters, send)

__all__ = ["COMMANDS", "iso"]
