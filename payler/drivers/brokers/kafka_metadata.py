"""What payler asks a Kafka cluster about itself: its id, and the ids and state of topics.

aiokafka reads metadata up to version 5, which has the cluster id but not the topic ids
(Kafka 2.8 added them, in Metadata v10). A topic's id tells a topic from another of the same name
created after it was deleted — whose offsets start again at 0 — so it belongs in a record's spool
id. :func:`describe_topics` sends one Metadata request at the highest version both sides know
(v12 down to v10 with topic ids, else aiokafka's own v5 down to v0) and reads, per topic, whether
it exists and its id.

This speaks the Kafka protocol through aiokafka's request builder (``aiokafka.protocol``), which
is not aiokafka's documented API: :func:`describe_topics` raises :class:`MetadataUnsupported` for
anything unexpected, and callers fall back (no topic id; aiokafka's own lookups), while an
outage raises :class:`MetadataUnavailable`.
"""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from aiokafka import errors as kafka_errors  # type: ignore[import-untyped]  # no type hints
from aiokafka.protocol.abstract import AbstractType  # type: ignore[import-untyped]
from aiokafka.protocol.api import (  # type: ignore[import-untyped]
    Request,
    RequestStruct,
    Response,
)
from aiokafka.protocol.metadata import (  # type: ignore[import-untyped]
    MetadataRequest_v0,
    MetadataRequest_v1,
    MetadataRequest_v2,
    MetadataRequest_v3,
    MetadataRequest_v4,
    MetadataRequest_v5,
)
from aiokafka.protocol.types import (  # type: ignore[import-untyped]
    Boolean,
    CompactArray,
    CompactString,
    Int16,
    Int32,
    Schema,
    TaggedFields,
)

#: The all-zero topic id: "no id" in the Kafka protocol.
_NO_TOPIC_ID = bytes(16)


class MetadataUnavailable(Exception):
    """The cluster could not be asked: unreachable, or no answer in time (an outage)."""


class MetadataUnsupported(Exception):
    """The request could not be made or its answer not read: not an outage (aiokafka changed,
    or the broker answered unlike Kafka); the caller does without."""


@dataclass(frozen=True, slots=True)
class TopicState:
    """What the cluster says of one topic: an error class (``NoError`` when it is there) and
    its topic id in Kafka's own notation (URL-safe base64, no padding), where it has one."""

    error: type[kafka_errors.KafkaError]
    topic_id: str | None = None

    @property
    def exists(self) -> bool:
        return self.error is kafka_errors.NoError

    @property
    def missing(self) -> bool:
        return self.error is kafka_errors.UnknownTopicOrPartitionError


@dataclass(frozen=True, slots=True)
class ClusterDescription:
    """The cluster's id (``None`` from brokers older than Metadata v2) and the topics asked for."""

    cluster_id: str | None
    topics: dict[str, TopicState]


async def describe_topics(
    client: Any, topics: list[str], *, timeout_s: float, auto_create: bool = False
) -> ClusterDescription:
    """Ask one broker of ``client`` (aiokafka's ``AIOKafkaClient``) about ``topics``.

    ``auto_create``: whether a broker with ``auto.create.topics.enable`` may create a missing
    topic on this request (as a producer's own lookup does). Raises
    :class:`MetadataUnavailable` when no answer came within ``timeout_s``, and
    :class:`MetadataUnsupported` when the request cannot be made or its answer read.
    """
    try:
        async with asyncio.timeout(timeout_s):
            node_id = client.get_random_node()
            if node_id is None:
                await client.force_metadata_update()
                node_id = client.get_random_node()
            if node_id is None:
                raise MetadataUnavailable("no Kafka broker is known")
            response = await client.send(node_id, _Metadata(topics, auto_create))
        return _read(response)
    except MetadataUnavailable:
        raise
    except TimeoutError:
        raise MetadataUnavailable(f"no answer to a metadata request in {timeout_s:g} s") from None
    except (kafka_errors.KafkaError, OSError) as exc:  # a broker unreachable, or not ready
        if isinstance(exc, kafka_errors.IncompatibleBrokerVersion):
            raise MetadataUnsupported(f"the broker cannot answer: {exc!r}") from exc
        raise MetadataUnavailable(f"the metadata request failed: {exc!r}") from exc
    except Exception as exc:  # aiokafka's internals changed, or an answer unlike Kafka's
        raise MetadataUnsupported(f"the metadata request failed: {exc!r}") from exc


def _read(response: Any) -> ClusterDescription:
    version = response.API_VERSION
    topics: dict[str, TopicState] = {}
    for topic in response.topics:
        if version >= 10:
            code, name, raw_id = topic[0], topic[1], topic[2]
        else:
            code, name, raw_id = topic[0], topic[1], None
        topic_id = None
        if raw_id and raw_id != _NO_TOPIC_ID:
            topic_id = base64.urlsafe_b64encode(raw_id).decode("ascii").rstrip("=")
        topics[name] = TopicState(kafka_errors.for_code(code), topic_id)
    cluster_id = response.cluster_id if version >= 2 else None
    return ClusterDescription(cluster_id or None, topics)


# -- Metadata v10 to v12: the versions with topic ids -------------------------------------------


class _Uuid(AbstractType):  # type: ignore[misc]  # aiokafka is untyped
    """Kafka's UUID: 16 raw bytes."""

    @classmethod
    def encode(cls, value: bytes | None) -> bytes:
        return value or _NO_TOPIC_ID

    @classmethod
    def decode(cls, data: BytesIO) -> bytes:
        value: bytes = data.read(16)
        if len(value) != 16:
            raise ValueError("buffer underrun decoding a UUID")
        return value

    @classmethod
    def repr(cls, value: bytes) -> str:
        return value.hex()


_BROKERS = CompactArray(
    ("node_id", Int32),
    ("host", CompactString("utf-8")),
    ("port", Int32),
    ("rack", CompactString("utf-8")),
    ("tags", TaggedFields),
)
_TOPICS = CompactArray(
    ("error_code", Int16),
    ("name", CompactString("utf-8")),
    ("topic_id", _Uuid),
    ("is_internal", Boolean),
    (
        "partitions",
        CompactArray(
            ("error_code", Int16),
            ("partition_index", Int32),
            ("leader_id", Int32),
            ("leader_epoch", Int32),
            ("replica_nodes", CompactArray(Int32)),
            ("isr_nodes", CompactArray(Int32)),
            ("offline_replicas", CompactArray(Int32)),
            ("tags", TaggedFields),
        ),
    ),
    ("topic_authorized_operations", Int32),
    ("tags", TaggedFields),
)
_REQUESTED = CompactArray(
    ("topic_id", _Uuid), ("name", CompactString("utf-8")), ("tags", TaggedFields)
)


class _MetadataResponse_v10(Response):  # type: ignore[misc]
    API_KEY = 3
    API_VERSION = 10
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("brokers", _BROKERS),
        ("cluster_id", CompactString("utf-8")),
        ("controller_id", Int32),
        ("topics", _TOPICS),
        ("cluster_authorized_operations", Int32),
        ("tags", TaggedFields),
    )


class _MetadataResponse_v11(Response):  # type: ignore[misc]
    API_KEY = 3
    API_VERSION = 11
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("brokers", _BROKERS),
        ("cluster_id", CompactString("utf-8")),
        ("controller_id", Int32),
        ("topics", _TOPICS),
        ("tags", TaggedFields),
    )


class _MetadataResponse_v12(Response):  # type: ignore[misc]
    API_KEY = 3
    API_VERSION = 12
    SCHEMA = _MetadataResponse_v11.SCHEMA


class _MetadataRequest_v10(RequestStruct):  # type: ignore[misc]
    FLEXIBLE_VERSION = True
    API_KEY = 3
    API_VERSION = 10
    RESPONSE_TYPE = _MetadataResponse_v10
    SCHEMA = Schema(
        ("topics", _REQUESTED),
        ("allow_auto_topic_creation", Boolean),
        ("include_cluster_authorized_operations", Boolean),
        ("include_topic_authorized_operations", Boolean),
        ("tags", TaggedFields),
    )


class _MetadataRequest_v11(RequestStruct):  # type: ignore[misc]
    FLEXIBLE_VERSION = True
    API_KEY = 3
    API_VERSION = 11
    RESPONSE_TYPE = _MetadataResponse_v11
    SCHEMA = Schema(
        ("topics", _REQUESTED),
        ("allow_auto_topic_creation", Boolean),
        ("include_topic_authorized_operations", Boolean),
        ("tags", TaggedFields),
    )


class _MetadataRequest_v12(RequestStruct):  # type: ignore[misc]
    FLEXIBLE_VERSION = True
    API_KEY = 3
    API_VERSION = 12
    RESPONSE_TYPE = _MetadataResponse_v12
    SCHEMA = _MetadataRequest_v11.SCHEMA


class _Metadata(
    Request[  # type: ignore[misc]
        MetadataRequest_v0
        | MetadataRequest_v1
        | MetadataRequest_v2
        | MetadataRequest_v3
        | MetadataRequest_v4
        | MetadataRequest_v5
        | _MetadataRequest_v10
        | _MetadataRequest_v11
        | _MetadataRequest_v12
    ]
):
    """A Metadata request for some topics, at the highest version the broker and we know."""

    API_KEY = 3

    def __init__(self, topics: list[str], auto_create: bool) -> None:
        self._topics = topics
        self._auto_create = auto_create

    def build(self, request_struct_class: type[Any]) -> Any:
        version = request_struct_class.API_VERSION
        named: list[tuple[None, str, dict[int, bytes]]] = [(None, n, {}) for n in self._topics]
        if version >= 11:
            return request_struct_class(named, self._auto_create, False, {})
        if version == 10:
            return request_struct_class(named, self._auto_create, False, False, {})
        if version >= 4:
            return request_struct_class(self._topics, self._auto_create)
        return request_struct_class(self._topics)
