"""`train`: continual training of the target on the fused shards with Ray Train (V2).

Reads the `align_fuse` manifest, feeds its shards through Ray Data to a `TorchTrainer`
(`train.num_workers` workers), checkpoints to `train.storage_path` (any fsspec URL, `s3://`
included) every `train.checkpoint_every` steps, and exports the final model with
`save_pretrained` plus the target's tokenizer to `train.output`.

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
from fusion_etl.runner import RunResult, log
from fusion_etl.stages.extract import model_identity
from fusion_etl.train.data import count_blocks

__all__ = ["TrainStage", "train_paths"]

VERSION = 1
COLUMNS = ["input_ids", "fused_ids", "fused_probs"]


def train_paths(cfg: PipelineConfig) -> tuple[str, str, str]:
    """(stage folder, checkpoint storage path, model output URL)."""
    out = cfg.stage_url("train")
    return (
        out,
        cfg.train.storage_path or storage.join(out, "ray"),
        cfg.train.output or storage.join(out, "model"),
    )


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
        }
        return cfg.stage_url(self.name), fingerprint(identity), identity

    def run(self, cfg: PipelineConfig, *, overwrite: bool = False) -> RunResult:
        from fusion_etl.ray_utils import init_ray

        storage.configure(cfg.storage)
        cfg = _absolute(cfg)
        tc = cfg.train
        upstream = read_manifest(cfg.stage_url("align_fuse"), stage="align_fuse")
        out, fp, identity = self.describe(cfg)
        out, ckpt_url, output = train_paths(cfg)
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

        total_tokens = sum(s.stats.get("tokens", 0) for s in upstream.shards)
        n_blocks = count_blocks(total_tokens, tc.block_size, tc.keep_remainder)
        per_step = tc.num_workers * tc.grad_accum * tc.micro_batch
        steps_per_epoch = n_blocks // per_step
        if steps_per_epoch == 0:
            raise UserError(
                f"train: {total_tokens} tokens make {n_blocks} blocks of {tc.block_size}, fewer than one step needs "
                f"({per_step} = num_workers x grad_accum x micro_batch); lower train.block_size or the batch"
            )
        unused = n_blocks - steps_per_epoch * per_step
        log(
            f"train: {total_tokens} tokens -> {n_blocks} blocks of {tc.block_size}; {steps_per_epoch} steps per epoch "
            f"x {tc.epochs} epochs on {tc.num_workers} workers; lambda {tc.lam}"
            + (
                f"; the last {unused} blocks do not fill a step and are not trained"
                if unused
                else ""
            )
        )

        init_ray(cfg.ray)
        import ray.data
        from ray.train import CheckpointConfig, DataConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        from fusion_etl.train.loop import train_loop

        data_fs, _ = _arrow_filesystem(upstream.url)
        files = [_arrow_filesystem(u)[1] for u in upstream.shard_urls()]
        ds = ray.data.read_parquet(files, filesystem=data_fs, columns=COLUMNS, shuffle=None)
        ckpt_fs, ckpt_path = _arrow_filesystem(ckpt_url)
        resources: dict[str, float] = {"CPU": tc.cpus_per_worker}
        if tc.use_gpu:
            resources["GPU"] = tc.gpus_per_worker
        resources.update(tc.resources)
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={
                "cfg": cfg,
                "steps_per_epoch": steps_per_epoch,
                "model_path": cfg.target.path,
                "output": output,
            },
            scaling_config=ScalingConfig(
                num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker=resources
            ),
            run_config=RunConfig(
                name=tc.run_name,
                storage_path=ckpt_path,
                storage_filesystem=ckpt_fs,
                checkpoint_config=CheckpointConfig(num_to_keep=2),
            ),
            datasets={"train": ds},
            # Not split: every worker reads the same ordered stream and takes its own blocks.
            dataset_config=DataConfig(
                datasets_to_split=[],
                execution_options=ray.data.ExecutionOptions(preserve_order=True),
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
        storage.write_json(
            storage.join(out, "result.json"),
            {
                "metrics": metrics,
                "steps": steps_per_epoch * tc.epochs,
                "output": output,
                "seconds": time.monotonic() - started,
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
            f"train: done, {steps_per_epoch * tc.epochs} steps; final {json.dumps({k: metrics.get(k) for k in ('loss', 'clm_loss', 'fusion_loss', 'clm_perplexity')})}; model at {output}"
        )
        return RunResult(self.name, 1, 0, 1, True, tuple(records))
