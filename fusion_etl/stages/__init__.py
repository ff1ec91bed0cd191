"""The pipeline's stages, in order. A stage not listed here does not exist yet."""

from __future__ import annotations

from fusion_etl.errors import UserError
from fusion_etl.runner import Stage
from fusion_etl.stages.align_fuse import AlignFuseStage
from fusion_etl.stages.extract import ExtractStage
from fusion_etl.stages.prepare import PrepareStage

__all__ = ["STAGES", "get_stage"]

STAGES: dict[str, Stage] = {
    "prepare": PrepareStage(),
    "extract": ExtractStage(),
    "align_fuse": AlignFuseStage(),
}


def get_stage(name: str) -> Stage:
    try:
        return STAGES[name]
    except KeyError:
        raise UserError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}, or 'all'") from None
