"""Stages for fault tests only: a shard that hangs, run through the real runner on real Ray.

They live in the package because Ray workers import stages by module and class name (a class
defined in a test module is not importable in a worker). Nothing in the pipeline uses them.
"""

from __future__ import annotations

import time
from typing import Any

import pyarrow as pa

from fusion_etl import storage
from fusion_etl.config import PipelineConfig
from fusion_etl.runner import ActorPool, ShardOutput, StagePlan, WorkItem, make_plan

__all__ = [
    "TestHangForeverOnTasksStage",
    "TestHangOnceOnActorsStage",
    "TestHangOnceOnTasksStage",
]

HANGING_SHARD = "part-00001.parquet"
SHARDS = 4


class _TestHangingStage:
    """Four one-row shards; HANGING_SHARD sleeps forever on its first `hang_attempts`
    attempts (each attempt leaves a marker in `<run_dir>/_test_hang/`, so a later one knows)."""

    name = "test_hang"
    hang_attempts = 1
    actors = 0
    """0: one Ray task per shard; n: a pool of n actors."""

    def plan(self, cfg: PipelineConfig) -> list[StagePlan]:
        items = tuple(
            WorkItem(shard=f"part-{i:05d}.parquet", inputs=(), payload={"index": i})
            for i in range(SHARDS)
        )
        identity: dict[str, Any] = {"stage": self.name, "shards": SHARDS}
        return [
            make_plan(
                self.name,
                cfg,
                output=cfg.stage_url(self.name),
                identity=identity,
                inputs={},
                items=items,
            )
        ]

    def setup(self, cfg: PipelineConfig, plan: StagePlan) -> None:
        return None

    def actor_pool(self, cfg: PipelineConfig, plan: StagePlan) -> ActorPool | None:
        return ActorPool(size=self.actors, options={"num_cpus": 0.25}) if self.actors else None

    def process(self, cfg: PipelineConfig, item: WorkItem) -> ShardOutput:
        if item.shard == HANGING_SHARD:
            markers = storage.join(cfg.run_dir, "_test_hang")
            attempt = len(storage.list_files(markers))
            if attempt < self.hang_attempts:
                storage.write_bytes(storage.join(markers, f"attempt-{attempt}"), b"")
                while True:  # a worker that stops making progress, as a stuck GPU does
                    time.sleep(3600)
        return ShardOutput(table=pa.table({"index": [int(item.payload["index"])]}))


class TestHangOnceOnTasksStage(_TestHangingStage):
    __test__ = False  # not a pytest test class


class TestHangOnceOnActorsStage(_TestHangingStage):
    __test__ = False
    actors = 2


class TestHangForeverOnTasksStage(_TestHangingStage):
    __test__ = False
    hang_attempts = 1_000_000
