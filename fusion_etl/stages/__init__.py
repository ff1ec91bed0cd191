"""The pipeline's stages, in order. A stage not listed here does not exist yet."""

from __future__ import annotations

from typing import Any, Protocol, cast

from fusion_etl.config import PipelineConfig
from fusion_etl.errors import UserError
from fusion_etl.runner import RunResult, Stage
from fusion_etl.stages.align_fuse import AlignFuseStage
from fusion_etl.stages.evaluate import EvaluateStage
from fusion_etl.stages.extract import ExtractStage
from fusion_etl.stages.merge import MergeStage
from fusion_etl.stages.prepare import PrepareStage
from fusion_etl.stages.train import TrainStage

__all__ = ["EXTRA_STAGES", "STAGES", "WholeStage", "get_stage", "is_whole", "lookup"]


class WholeStage(Protocol):
    """A stage that is one job rather than shards (train): it runs and commits itself."""

    name: str

    def describe(self, cfg: PipelineConfig) -> tuple[str, str, dict[str, Any]]: ...

    def run(self, cfg: PipelineConfig, *, overwrite: bool = False) -> RunResult: ...


STAGES: dict[str, Stage | WholeStage] = {
    "prepare": PrepareStage(),
    "extract": ExtractStage(),
    "align_fuse": AlignFuseStage(),
    "train": TrainStage(),
    "evaluate": EvaluateStage(),
}
"""The fusion pipeline, in order: what `all` runs."""

EXTRA_STAGES: dict[str, Stage | WholeStage] = {"merge": MergeStage()}
"""Stages run only when named (baselines and follow-ups of the pipeline)."""


def lookup(name: str) -> Stage | WholeStage:
    """The stage called `name`, or a clear error listing the stages."""
    found = STAGES.get(name) or EXTRA_STAGES.get(name)
    if found is None:
        raise UserError(
            f"unknown stage {name!r}; stages: {', '.join([*STAGES, *EXTRA_STAGES])}, or 'all'"
        )
    return found


def is_whole(stage: Stage | WholeStage) -> bool:
    """A stage that runs and commits itself as one job (train, evaluate, merge)."""
    return isinstance(stage, TrainStage | EvaluateStage | MergeStage)


def get_stage(name: str) -> Stage:
    """A sharded stage (what Ray workers look up by name)."""
    stage = lookup(name)
    if is_whole(stage):
        raise UserError(f"stage {name!r} is not sharded")
    return cast(Stage, stage)
