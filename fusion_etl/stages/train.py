"""`train`: continual training of the target on the fused shards with Ray Train (V2).

Reads the `align_fuse` manifest and the row-group table of its shards (footers only), checks
the memory plan (`fusion_etl.train.memory`) before anything starts, and runs a `TorchTrainer`
of `train.num_workers` workers (FSDP2 or DDP, `train.strategy`) that read their own parts of
the fused data in a seeded order (`fusion_etl.train.reader`), checkpoint sharded state to
`train.storage_path` (any fsspec URL, `s3://` included) every `train.checkpoint_every` steps,
and export the final model as safetensors plus the target's tokenizer to `train.output`.

Idempotent like every stage: `<run_dir>/train/_stage.json` holds the fingerprint; a finished
run is not repeated; an interrupted one resumes from its last checkpoint (same run name and
storage path) at the exact data position; a changed configuration is refused unless
`--overwrite`, which also deletes the old checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from typing import Any

from fusion_etl import manifest, storage
from fusion_etl.config import PipelineConfig, fingerprint, fingerprint_fields, redact, to_dict
from fusion_etl.errors import UserError
from fusion_etl.manifest import ShardRecord, read_manifest
from fusion_etl.models import model_identity
from fusion_etl.runner import RunResult, log
from fusion_etl.train.memory import MemoryPlan, memory_plan, resolve_strategy

__all__ = ["TrainStage", "check_memory", "train_memory_plan", "train_paths"]

VERSION = 2


def train_paths(cfg: PipelineConfig) -> tuple[str, str, str]:
    """(stage folder, checkpoint storage path, model output URL)."""
    out = cfg.stage_url("train")
    return (
        out,
        cfg.train.storage_path or storage.join(out, "ray"),
        cfg.train.output or storage.join(out, "model"),
    )


def train_memory_plan(cfg: PipelineConfig) -> MemoryPlan:
    """The memory plan of the train stage, from the target's config.json alone."""
    url = storage.join(cfg.target.path, "config.json")
    if not storage.exists(url):
        raise UserError(f"target {cfg.target.name!r}: no config.json at {cfg.target.path}")
    config = storage.read_json(url)
    k = cfg.align_fuse.top_k or cfg.extract.top_k
    return memory_plan(config, cfg.train, top_k=k)


def check_memory(cfg: PipelineConfig, *, breakdown: bool = True) -> MemoryPlan:
    """The memory plan, or a `UserError` naming the fixes if it does not fit (with the plan's
    breakdown unless the caller printed it already)."""
    plan = train_memory_plan(cfg)
    if not plan.fits:
        raise UserError(
            f"train: the memory plan does not fit: {plan.total / 2**30:.1f} GiB per worker needed, "
            f"{plan.budget / 2**30:.1f} GiB available ({plan.accelerator}); fixes: "
            + "; ".join(plan.fixes())
            + (f"\n{plan.render()}" if breakdown else "")
        )
    return plan


def _arrow_filesystem(url: str) -> tuple[Any, str]:
    """A pyarrow filesystem and path for a URL, going through this project's fsspec settings
    (so `s3://` endpoints and credentials are the same everywhere)."""
    local = storage.local_path(url)
    if local is not None:
        return None, str(local)
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(url)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def _absolute(cfg: PipelineConfig) -> PipelineConfig:
    """The config with local relative paths made absolute: Ray Train workers run in a working
    directory of their own."""

    def fix(url: str) -> str:
        local = storage.local_path(url) if url else None
        return str(local) if local is not None else url

    target = replace(
        cfg.target,
        path=fix(cfg.target.path),
        tokenizer=fix(cfg.target.tokenizer) if cfg.target.tokenizer else None,
    )
    train = replace(
        cfg.train, storage_path=fix(cfg.train.storage_path), output=fix(cfg.train.output)
    )
    return replace(cfg, run_dir=fix(cfg.run_dir), target=target, train=train)


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


class TrainStage:
    """The `train` stage (see the module docstring). Not sharded: one Ray Train run."""

    name = "train"

    def describe(self, cfg: PipelineConfig) -> tuple[str, str, dict[str, Any]]:
        """(output folder, fingerprint, identity) without running anything."""
        upstream = read_manifest(cfg.stage_url("align_fuse"), stage="align_fuse")
        identity = {
            "stage": self.name,
            "version": VERSION,
            "train": fingerprint_fields(cfg.train),
            "align_fuse": upstream.fingerprint,
            "model": model_identity(cfg.target),
            "num_workers": cfg.train.num_workers,  # the data layout and the batch depend on it
            "strategy": resolve_strategy(cfg.train),
        }
        return cfg.stage_url(self.name), fingerprint(identity), identity

    def run(self, cfg: PipelineConfig, *, overwrite: bool = False) -> RunResult:
        """Run under the output folder's lease: a second run at the same time is refused."""
        storage.configure(cfg.storage)
        out, fp, _ = self.describe(_absolute(cfg))
        with manifest.stage_lease(out, stage=self.name, fingerprint=fp, ttl_s=cfg.ray.lease_ttl_s):
            return self._run(cfg, overwrite=overwrite)

    def _run(self, cfg: PipelineConfig, *, overwrite: bool) -> RunResult:
        from fusion_etl.ray_utils import init_ray

        storage.configure(cfg.storage)
        cfg = _absolute(cfg)
        tc = cfg.train
        upstream = read_manifest(cfg.stage_url("align_fuse"), stage="align_fuse")
        out, fp, identity = self.describe(cfg)
        out, ckpt_url, output = train_paths(cfg)
        mem = check_memory(cfg)
        state = manifest.stage_state(out)
        if manifest.is_finished(out, fp):
            log(f"train: up to date (fingerprint {fp}); the model is at {output}")
            return RunResult(self.name, 1, 1, 0, True, ())
        if overwrite and state is not None and state.get("fingerprint") != fp:
            # Old checkpoints would otherwise be resumed by the new run.
            storage.remove(storage.join(ckpt_url, tc.run_name))
            storage.remove(output)
        manifest.begin_stage(
            out,
            stage=self.name,
            fingerprint=fp,
            identity=identity,
            config=redact(to_dict(cfg)),
            overwrite=overwrite,
        )

        from fusion_etl.train.loop import epoch_plans
        from fusion_etl.train.reader import unit_table

        shard_urls = upstream.shard_urls()
        units = unit_table(shard_urls)
        plans = epoch_plans(cfg, units)
        total_steps = sum(p.steps for p in plans)
        total_tokens = sum(u.tokens for u in units)
        per_step = tc.num_workers * tc.grad_accum * tc.micro_batch
        if total_steps == 0:
            raise UserError(
                f"train: {total_tokens} tokens in {len(units)} row groups give every one of {tc.num_workers} workers "
                f"fewer blocks of {tc.block_size} than one step needs ({tc.grad_accum * tc.micro_batch} = "
                "grad_accum x micro_batch each); lower train.block_size, the batch or the workers"
            )
        unused = sum(p.unused_blocks for p in plans)
        log(
            f"train: {total_tokens} tokens in {len(units)} row groups; {total_steps} steps "
            f"({', '.join(str(p.steps) for p in plans)} per epoch) of {per_step} blocks of {tc.block_size} "
            f"on {tc.num_workers} workers ({mem.strategy}, {mem.precision}); lambda {tc.lam}; "
            f"data {'shuffled with seed ' + str(tc.seed) if tc.shuffle else 'in manifest order'}"
            + (
                f"; {unused} blocks do not fill a step on every worker and are not trained"
                if unused
                else ""
            )
        )

        init_ray(cfg.ray)
        from ray.train import CheckpointConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        from fusion_etl.train.loop import train_loop

        ckpt_fs, ckpt_path = _arrow_filesystem(ckpt_url)
        resources: dict[str, float] = {"CPU": tc.cpus_per_worker}
        if tc.use_gpu:
            resources["GPU"] = tc.gpus_per_worker
        resources.update(tc.resources)
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={
                "cfg": cfg,
                "units": units,
                "shard_urls": shard_urls,
                "model_path": cfg.target.path,
                "output": output,
                "checkpoint_url": storage.join(ckpt_url, tc.run_name),
            },
            scaling_config=ScalingConfig(
                num_workers=tc.num_workers,
                use_gpu=tc.use_gpu,
                resources_per_worker=resources,
                accelerator_type=tc.accelerator_type,
            ),
            run_config=RunConfig(
                name=tc.run_name,
                storage_path=ckpt_path,
                storage_filesystem=ckpt_fs,
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                # Ray Train V2 RunConfig (mypy sees the V1 class ray.train re-exports).
                worker_runtime_env={"env_vars": dict(tc.env_vars)} if tc.env_vars else None,  # type: ignore[call-arg]
            ),
        )
        started = time.monotonic()
        result = trainer.fit()
        if result.error is not None:
            raise result.error
        metrics = dict(result.metrics or {})
        records = []
        for url in storage.list_files(output):
            data = storage.read_bytes(url)
            records.append(
                ShardRecord(
                    name=storage.relative_name(output, url),
                    rows=0,
                    bytes=len(data),
                    sha256=hashlib.sha256(data).hexdigest(),
                    seconds=0.0,
                )
            )
        read = [int(b) for b in metrics.get("bytes_read_per_worker", [])]
        peaks = [int(b) for b in metrics.get("peak_memory_per_worker", [])]
        fused_bytes = upstream.bytes
        if read:
            log(
                f"train: fused data read per worker: {', '.join(_mib(b) for b in read)} "
                f"(all fused shards {_mib(fused_bytes)}, 1/{tc.num_workers} of it {_mib(fused_bytes / tc.num_workers)})"
            )
        if peaks and min(peaks) >= 0:
            log(
                f"train: peak memory per worker above its start: {', '.join(_mib(b) for b in peaks)} "
                f"(plan: {_mib(mem.total - mem.reserve)})"
            )
        storage.write_json(
            storage.join(out, "result.json"),
            {
                "metrics": metrics,
                "steps": total_steps,
                "output": output,
                "seconds": time.monotonic() - started,
                "strategy": mem.strategy,
                "bytes_read_per_worker": read,
                "fused_bytes": fused_bytes,
                "peak_memory_per_worker": peaks,
                "memory_plan": {name: b for name, b in mem.lines},
                "memory_plan_total": mem.total - mem.reserve,
            },
        )
        manifest.write_manifest(
            out,
            stage=self.name,
            fingerprint=fp,
            config=redact(to_dict(cfg)),
            inputs={upstream.url: upstream.fingerprint},
            records=records,
        )
        log(
            f"train: done, {total_steps} steps; final {json.dumps({k: metrics.get(k) for k in ('loss', 'clm_loss', 'fusion_loss', 'clm_perplexity')})}; model at {output}"
        )
        return RunResult(self.name, 1, 0, 1, True, tuple(records))
