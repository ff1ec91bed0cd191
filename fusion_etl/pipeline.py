"""Several stages in order (`fusion-etl run all`), overlapping where `ray.schedule` allows.

With `ray.schedule: pipelined` (the default) on Ray, extract and align_fuse run as one
schedule: every model's extract plan and the align_fuse plan are opened together, and
align_fuse of `part-N` starts as soon as every model has committed its `part-N`. Each stage
keeps its contract unchanged: its own `_stage.json`, records, a manifest written once its own
last shard has returned, fingerprints (align_fuse's is computed from extract's plans, which give
the same fingerprints as extract's manifests) and resume. prepare runs before them (extract
reads its manifest), train after align_fuse's manifest, evaluate last.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from fusion_etl import storage
from fusion_etl.config import PipelineConfig
from fusion_etl.errors import UserError
from fusion_etl.runner import RunResult, combine, run_plans, run_stage

__all__ = ["run_stages", "stage_names"]


def stage_names(stage: str, until: str | None = None) -> list[str]:
    """`all` -> every stage in order (up to and including `until`); a name -> that stage."""
    from fusion_etl.stages import STAGES, lookup

    if until is not None:
        lookup(until)
        if stage != "all":
            raise UserError("--until goes with 'all' (run all --until align_fuse)")
    if stage == "all":
        names = list(STAGES)
        return names[: names.index(until) + 1] if until is not None else names
    lookup(stage)
    return [stage]


def run_stages(
    cfg: PipelineConfig, names: Sequence[str], *, overwrite: bool, shards: str | None = None
) -> bool:
    """Run the named stages in order; False when one stops incomplete (the rest do not run)."""
    from fusion_etl.stages import WholeStage, get_stage, is_whole, lookup

    if shards is not None and len(names) > 1:
        raise UserError("--shards needs a single stage, not 'all'")
    i = 0
    while i < len(names):
        name = names[i]
        if (
            name == "extract"
            and list(names[i + 1 : i + 2]) == ["align_fuse"]
            and cfg.ray.schedule == "pipelined"
            and cfg.ray.executor == "ray"
        ):
            results: list[RunResult] = list(extract_and_align(cfg, overwrite=overwrite))
            i += 2
        else:
            whole = lookup(name)
            if is_whole(whole):
                if shards is not None:
                    raise UserError(f"--shards does not apply to {name!r}, which is not sharded")
                results = [cast(WholeStage, whole).run(cfg, overwrite=overwrite)]
            else:
                results = [run_stage(get_stage(name), cfg, overwrite=overwrite, shards=shards)]
            i += 1
        if not all(r.complete for r in results):
            return False
    return True


def extract_and_align(cfg: PipelineConfig, *, overwrite: bool) -> tuple[RunResult, RunResult]:
    """extract (every model at once) and align_fuse as one pipelined schedule."""
    from fusion_etl.stages.align_fuse import AlignFuseStage
    from fusion_etl.stages.extract import ExtractStage

    storage.configure(cfg.storage)
    extract, align = ExtractStage(), AlignFuseStage()
    extract_plans = extract.plan(cfg)
    align_plans = align.plan_after(cfg, extract_plans)
    n = len(extract_plans)
    results = run_plans(
        cfg,
        [(extract, p) for p in extract_plans] + [(align, p) for p in align_plans],
        overwrite=overwrite,
        after={n + j: list(range(n)) for j in range(len(align_plans))},
    )
    return combine(extract.name, results[:n]), combine(align.name, results[n:])
