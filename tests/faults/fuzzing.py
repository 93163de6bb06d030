"""What the fuzzer sends: hypothesis strategies for messages of every source, and their checks.

Messages are generated first (hypothesis, derandomized: the same messages every run), then sent
through one running payler daemon, then checked: each must come out intact (body, headers,
properties compared, with their types) or be dead-lettered with a reason. Generation and I/O
are kept apart so that one daemon serves thousands of messages; a failing message is reported
with what was sent and what came out, rather than shrunk.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pamqp.decode
import pamqp.encode
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from payler import codec
from payler.drivers.brokers.mapping import KAFKA_PREFIX
from payler.drivers.brokers.redis_streams import UNDECODABLE_FIELDS
from tests.assertions import assert_same

SCHEDULING = frozenset({"x-delay", "x-deliver-at", "x-destination"})
#: Messages per hypothesis example: generation is cheap, so examples are lists of messages.
PER_EXAMPLE = 20


def generate(strategy: st.SearchStrategy[Any], count: int, seed: int) -> list[Any]:
    """``count`` values of ``strategy``, the same every run (seeded by ``seed``)."""
    examples: list[Any] = []
    rounds = -(-count // PER_EXAMPLE)

    @hypothesis_seed(seed)
    @settings(
        max_examples=rounds,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(strategy, min_size=PER_EXAMPLE, max_size=PER_EXAMPLE))
    def collect(values: list[Any]) -> None:
        examples.extend(values)

    collect()
    return examples[:count]


def differences(got: Any, expected: Any, what: str) -> str | None:
    """Why ``got`` is not ``expected`` (same values, same types all the way down), or None."""
    try:
        assert_same(got, expected, what)
    except AssertionError as exc:
        return str(exc)[:300]
    return None


def seeded_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def bodies(large_max: int) -> st.SearchStrategy[bytes]:
    """0 bytes, small binary (not UTF-8, mostly), and now and then a large one."""
    large = st.builds(seeded_bytes, st.integers(64 * 1024, large_max), st.integers(0, 2**32))
    return st.integers(0, 19).flatmap(
        lambda pick: large if pick == 0 else st.just(b"") if pick == 1 else st.binary(max_size=2048)
    )


# -- AMQP ------------------------------------------------------------------------------------------

#: Integers at each width pamqp picks (short-short, short, unsigned short, long, unsigned long,
#: long-long) and their edges.
AMQP_INTS = st.one_of(
    st.integers(-128, 127),
    st.integers(-32768, 32767),
    st.integers(32768, 65535),
    st.integers(-(2**31), 2**31 - 1),
    st.integers(2**31, 2**32 - 1),
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([-(2**63), 2**63 - 1, -(2**31), 2**31 - 1, 2**32 - 1, 65535, -128, 127]),
)
AMQP_NAMES = st.text(min_size=1, max_size=24).filter(
    lambda s: len(s.encode()) <= 128 and s not in SCHEDULING and not s.startswith("x-payler")
)
AMQP_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    AMQP_INTS,
    # pamqp sends floats as 32-bit 'f'; RabbitMQ 3.10 closes the connection on an infinity
    st.floats(width=32, allow_nan=False, allow_infinity=False),
    st.integers(0, 4).flatmap(
        lambda places: st.decimals(-(10**4), 10**4, places=places, allow_nan=False)
    ),
    st.text(max_size=64),
    st.binary(max_size=64).map(bytearray),
    st.datetimes(datetime(1970, 1, 2), datetime(2105, 12, 31), timezones=st.just(UTC)).map(
        lambda moment: moment.replace(microsecond=0)
    ),
)
AMQP_VALUES = st.recursive(
    AMQP_LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(AMQP_NAMES, inner, max_size=4),
    max_leaves=8,
)
SHORT = st.text(max_size=40).filter(lambda s: len(s.encode()) <= 255)
AMQP_PROPERTIES = st.fixed_dictionaries(
    {},
    optional={
        "content_type": SHORT,
        "content_encoding": SHORT,
        "correlation_id": SHORT,
        "reply_to": SHORT,
        "type": SHORT,
        "app_id": SHORT,
        "priority": st.integers(0, 255),
        "delivery_mode": st.sampled_from([1, 2]),
        "expiration": st.integers(3600, 10**6),  # seconds: none expires during the test
        "timestamp": st.datetimes(
            datetime(1970, 1, 2), datetime(2105, 12, 31), timezones=st.just(UTC)
        ).map(lambda moment: moment.replace(microsecond=0)),
    },
)
#: payler's default ``max_delay_ms``: 366 days.
MAX_DELAY_MS = 366 * 24 * 3600 * 1000
#: Scheduling headers: none, a valid delay, or one that must be dead-lettered.
BAD_DELAYS: list[Any] = [-5, "soon", 10**15, [], {"ms": 1}, True, "1 s", "-3", 1e30]
AMQP_SCHEDULING = st.one_of(
    st.just({}),
    st.integers(0, 300).map(lambda ms: {"x-delay": ms}),
    st.integers(0, 300).map(lambda ms: {"x-delay": str(ms)}),
    st.sampled_from(BAD_DELAYS).map(lambda bad: {"x-delay": bad}),
)


@dataclass
class AmqpMessage:
    body: bytes
    headers: dict[str, Any]
    properties: dict[str, Any]
    schedule: dict[str, Any]

    @property
    def valid(self) -> bool:
        """Whether payler must deliver it (its scheduling headers are valid)."""
        delay = self.schedule.get("x-delay", 0)
        if isinstance(delay, bool) or not isinstance(delay, int | str):
            return False
        return str(delay).isdigit() and int(delay) <= MAX_DELAY_MS


def amqp_messages(large_max: int) -> st.SearchStrategy[AmqpMessage]:
    huge = st.integers(10_000, 60_000).map(lambda n: {"huge": "h" * n})
    headers = st.tuples(
        st.dictionaries(AMQP_NAMES, AMQP_VALUES, max_size=6),
        st.integers(0, 29).flatmap(lambda pick: huge if pick == 0 else st.just({})),
    ).map(lambda parts: {**parts[0], **parts[1]})
    return st.builds(AmqpMessage, bodies(large_max), headers, AMQP_PROPERTIES, AMQP_SCHEDULING)


def amqp_round_trip(table: dict[str, Any]) -> dict[str, Any]:
    """``table`` as any AMQP client decodes it after the broker (32-bit floats and all)."""
    decoded: dict[str, Any] = pamqp.decode.field_table(pamqp.encode.field_table(table))[1]
    return decoded


def check_amqp(sent: AmqpMessage, got: Any) -> list[str]:
    """What differs between ``sent`` and the message payler delivered (aio-pika's)."""
    problems = []
    if got.body != sent.body:
        problems.append(f"body: {len(got.body)} bytes, not the {len(sent.body)} sent")
    if problem := differences(dict(got.headers or {}), amqp_round_trip(sent.headers), "headers"):
        problems.append(problem)
    for name, sent_value in sent.properties.items():
        have = getattr(got, name)
        if name == "delivery_mode":
            have = int(have)
        if name == "expiration":
            have = round(have) if have is not None else None
        # aio-pika publishes an empty property as none: so does everyone
        wanted = None if sent_value == "" else sent_value
        if have != wanted:
            problems.append(f"property {name}: {have!r}, not {wanted!r}")
    return problems


# -- Kafka -----------------------------------------------------------------------------------------

#: Header names a foreign producer may well use, some of which payler uses itself. (Names
#: starting with ``payler-`` are payler's own namespace, documented as such: a producer's own
#: header so named is read as payler's.)
KAFKA_NAMES = st.one_of(
    st.text(min_size=1, max_size=20).filter(
        # x-payler-* is payler's own on every broker (the tombstone mark `x-payler-null-value`,
        # the dead-letter headers), as in AMQP_NAMES; hypothesis draws names from our source.
        lambda s: s not in SCHEDULING and not s.startswith((KAFKA_PREFIX, "x-payler"))
    ),
    st.sampled_from(["priority", "app-id", "content-type", "message-id", "a,b", "x"]),
)
KAFKA_HEADER_VALUES = st.one_of(
    st.none(), st.binary(max_size=64), st.text(max_size=64).map(str.encode)
)


@dataclass
class KafkaRecord:
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]


def kafka_records(large_max: int) -> st.SearchStrategy[KafkaRecord]:
    return st.builds(
        KafkaRecord,
        st.one_of(st.none(), st.binary(max_size=64)),
        st.one_of(st.none(), bodies(large_max)),
        st.lists(st.tuples(KAFKA_NAMES, KAFKA_HEADER_VALUES), max_size=8),
    ).filter(lambda r: r.key is not None or r.value is not None)  # Kafka needs one of them


def grouped(headers: list[tuple[str, bytes | None]]) -> dict[str, list[bytes | None]]:
    """Header values by name, in order: what must survive (the order between names need not)."""
    out: dict[str, list[bytes | None]] = {}
    for name, value in headers:
        out.setdefault(name, []).append(value)
    return out


def check_kafka(sent: KafkaRecord, got: Any, fuzz_header: str) -> list[str]:
    """What differs between ``sent`` and the record payler delivered (aiokafka's)."""
    problems = []
    if got.value != sent.value:
        problems.append(f"value: {_short(got.value)}, not {_short(sent.value)}")
    if got.key != sent.key:
        problems.append(f"key: {got.key!r}, not {sent.key!r}")
    # Names starting with payler- are payler's own namespace (the original publish time, the
    # AMQP properties it read from a producer's plain `message-id`, `priority`...): added, not
    # the producer's. Every header of the producer's must be there, as it was.
    have = grouped(
        [(k, v) for k, v in got.headers if k != fuzz_header and not k.startswith(KAFKA_PREFIX)]
    )
    if have != grouped(sent.headers):
        problems.append(f"headers: {_short(have)}, not {_short(grouped(sent.headers))}")
    return problems


# -- Redis streams ---------------------------------------------------------------------------------

#: JSON that a producer may put in ``headers`` / ``properties``: payler's own traps among it.
NASTY_JSON = [
    b'{"a": "\\ud83d"}',  # JavaScript's JSON.stringify of an emoji cut in half
    b'{"__table__": 1}',
    b'{"__datetime__": 5}',
    b'{"__bytes__": 5}',
    b'{"__decimal__": "x"}',
    b"[" * 5000 + b"]" * 5000,
    b'{"a": ' * 3000 + b"1" + b"}" * 3000,
    b"not json",
    b"\xff\xfe",
    b'"a string"',
    b"[1, 2]",
    b'{"a": NaN}',  # not JSON, but what Python's json writes: payler reads it in headers
    b'{"a": 1e400}',  # an infinity: the same (as properties, "a" is no property: unreadable)
    b"",
]
#: Those payler reads all the same, as Python's json does: non-finite floats.
READABLE_NASTY = frozenset({b'{"a": NaN}', b'{"a": 1e400}'})
#: One of them (by index: hypothesis would show the long ones in every strategy's repr).
NASTY = st.integers(0, len(NASTY_JSON) - 1).map(NASTY_JSON.__getitem__)
JSON_VALUES = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=40),
    ),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=10,
)
STREAM_PROPERTIES = st.fixed_dictionaries(
    {},
    optional={
        "content_type": st.text(max_size=30),
        "correlation_id": st.text(max_size=30),
        "message_id": st.text(max_size=30),
        "priority": st.integers(0, 255),
        "app_id": st.text(max_size=30),
    },
)
#: Field names a producer may send besides payler's own (``body``, ``key``, ...): text (a
#: header name is text); their values are any bytes.
STREAM_FIELD_NAMES = (
    st.text(min_size=1, max_size=16)
    .map(str.encode)
    .filter(lambda name: name not in {b"body", b"key", b"headers", b"properties"})
)


@dataclass
class StreamEntry:
    """A producer's entry: payler's fields (each optional) and fields of its own."""

    body: bytes | None
    key: bytes | None
    headers: bytes | None
    properties: bytes | None
    extra: dict[bytes, bytes] = field(default_factory=dict)

    def fields(self, fuzz_field: bytes, fuzz_id: str) -> dict[bytes, bytes]:
        fields = {fuzz_field: fuzz_id.encode(), **self.extra}
        for name in ("body", "key", "headers", "properties"):
            value = getattr(self, name)
            if value is not None:
                fields[name.encode()] = value
        return fields

    @property
    def readable(self) -> bool:
        """Whether its ``headers`` and ``properties`` are valid: its metadata can be kept."""
        for text, which in ((self.headers, "headers"), (self.properties, "properties")):
            if text is None:
                continue
            if text in NASTY_JSON and (which == "properties" or text not in READABLE_NASTY):
                return False
            try:
                if not isinstance(json.loads(text), dict):
                    return False
            except (ValueError, RecursionError):
                return False
        return True

    @property
    def valid(self) -> bool:
        """Whether payler must deliver it: readable, and no scheduling header of its own (a
        generated ``x-delay`` is most likely invalid)."""
        if not self.readable:
            return False
        headers = json.loads(self.headers) if self.headers else {}
        return not SCHEDULING & headers.keys()


def stream_entries(large_max: int) -> st.SearchStrategy[StreamEntry]:
    json_text = st.one_of(
        st.dictionaries(st.text(max_size=12), JSON_VALUES, max_size=5).map(
            lambda value: codec.dumps(value).encode()
        ),
        NASTY,
    )
    return st.builds(
        StreamEntry,
        st.one_of(st.none(), bodies(large_max)),
        st.one_of(st.none(), st.binary(max_size=32)),
        st.one_of(st.none(), json_text, json_text),
        st.one_of(st.none(), STREAM_PROPERTIES.map(lambda p: json.dumps(p).encode()), NASTY),
        st.dictionaries(STREAM_FIELD_NAMES, st.binary(max_size=32), max_size=3),
    )


def check_stream(
    sent: StreamEntry, got: dict[bytes, bytes], fuzz_field: bytes, read: Callable[..., Any]
) -> list[str]:
    """What differs between ``sent`` and the entry payler delivered (its raw fields).

    ``read`` is payler's own reading of stream fields (``from_stream_fields``): an entry is
    intact when it reads back as the producer's body, key, headers (its own fields as headers:
    text where they are UTF-8, bytes where not) and properties.
    """
    problems = []
    body, key, headers, properties = read(got)
    if body != (sent.body or b""):
        problems.append(f"body: {_short(body)}, not {_short(sent.body)}")
    if not sent.readable:
        # Metadata payler cannot read: kept raw (its fields in the undecodable-fields header),
        # never dropped without a word.
        if UNDECODABLE_FIELDS not in headers:
            kept = sorted(headers)[:5]
            problems.append(f"unreadable metadata dropped: headers {kept}, no raw fields kept")
        return problems
    if key != sent.key:
        problems.append(f"key: {key!r}, not {sent.key!r}")
    expected = codec.loads(sent.headers) if sent.headers else {}
    for name, value in sent.extra.items():
        expected.setdefault(name.decode(), _text(value))
    headers.pop(fuzz_field.decode(), None)
    if problem := differences(headers, expected, "headers"):
        problems.append(problem)
    if sent.properties:
        wanted = json.loads(sent.properties)
        have = properties.model_dump(exclude_none=True)
        have.pop("timestamp_ms", None)  # the entry id's time: added, fine
        if have != wanted:
            problems.append(f"properties: {have}, not {wanted}")
    return problems


def _text(raw: bytes) -> str | bytes:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."
