"""Kafka for the fault scenarios: topics read in the background from their beginning."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any


class KafkaCollector:
    """Reads topics from their beginning in the background: every record, by topic."""

    def __init__(self, bootstrap: str, topics: list[str]) -> None:
        from aiokafka import AIOKafkaConsumer  # noqa: PLC0415 - only Kafka tests need it

        self.records: dict[str, list[Any]] = defaultdict(list)
        self.consumer = AIOKafkaConsumer(
            *topics, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
            metadata_max_age_ms=500, max_partition_fetch_bytes=16 * 1024 * 1024,
            fetch_max_bytes=64 * 1024 * 1024,
        )  # fmt: skip
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> KafkaCollector:
        await self.consumer.start()
        self.task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        while True:
            batches = await self.consumer.getmany(timeout_ms=200)
            for tp, batch in batches.items():
                self.records[tp.topic].extend(batch)

    async def __aexit__(self, *_: object) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.consumer.stop()
