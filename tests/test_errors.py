"""What counts as an outage (retried with backoff) and what as a refusal or a bug."""

from __future__ import annotations

import pytest
from redis import exceptions as redis_errors
from redis._parsers.base import BaseParser

from payler.errors import TransientError, is_transient, transient_on


def reply(text: str) -> redis_errors.RedisError:
    """The exception redis-py raises for the error reply ``-<text>`` (code and message)."""
    error: redis_errors.RedisError = BaseParser.parse_error(text)
    return error


@pytest.mark.parametrize(
    "text",
    [
        "READONLY You can't write against a read only replica.",
        "LOADING Redis is loading the dataset in memory",
        "OOM command not allowed when used memory > 'maxmemory'.",
        "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.",
        "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
        "TRYAGAIN Multiple keys request during rehashing of slot",
        "CLUSTERDOWN The cluster is down",
        "NOREPLICAS Not enough good replicas to write.",
        "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist",
        "UNBLOCKED force unblock from blocking operation, instance state changed",
    ],
)
def test_redis_replies_of_a_server_that_cannot_write_now_are_outages(text: str) -> None:
    # redis-py raises most of these as a class of its own, with the code cut off the message
    # (ReadOnlyError: "You can't write..."): matching the message's head cannot find them.
    assert is_transient(reply(text))


@pytest.mark.parametrize(
    "text",
    [
        "WRONGTYPE Operation against a key holding the wrong kind of value",
        "BUSYGROUP Consumer Group name already exists",
        "ERR The ID specified in XADD is equal or smaller than the target stream top item",
        "NOSCRIPT No matching script. Please use EVAL.",
        "NOPERM this user has no permissions to run the 'xadd' command",
    ],
)
def test_other_redis_replies_are_refusals(text: str) -> None:
    assert not is_transient(reply(text))


def test_lost_connections_are_outages() -> None:
    assert is_transient(redis_errors.ConnectionError("Connection reset by peer"))
    assert is_transient(redis_errors.TimeoutError("Timeout reading from socket"))
    assert is_transient(TransientError("anything a driver wrapped"))
    assert not is_transient(ValueError("a bug"))


async def test_transient_on_wraps_only_the_outages_it_is_told_of() -> None:
    @transient_on((redis_errors.RedisError,), "spool", when=is_transient)
    async def hook(error: Exception) -> None:
        raise error

    with pytest.raises(TransientError, match="spool: You can't write"):
        await hook(reply("READONLY You can't write against a read only replica."))
    with pytest.raises(redis_errors.ResponseError, match="WRONGTYPE"):
        await hook(reply("WRONGTYPE Operation against a key holding the wrong kind of value"))
