"""`merge`: weight merging of same-architecture models into one `save_pretrained` model.

The models in `merge.models` (and `merge.base` for the methods that take task vectors) must
share an architecture and a tokenizer. Tensors are merged one at a time straight from the
safetensors files (`fusion_etl.merging`), so memory holds one tensor per model, and the result
is written in files of at most 5 GiB with the first model's config and tokenizer to
`merge.output` (default `<run_dir>/merge/model`). With `weighting: performance` the weights are
softmax(-bits per byte / temperature) of each model on `merge.validation`.

Idempotent like every stage: `<run_dir>/merge/_stage.json` holds the fingerprint (the merge
settings, every model's identity, the validation files); a finished merge is not repeated; a
changed configuration is refused unless `--overwrite`. Run it on its own
(`fusion-etl run merge`): `all` is the fusion pipeline and does not include it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import ExitStack
from typing import Any

from fusion_etl import manifest, storage
from fusion_etl.config import PipelineConfig, fingerprint, fingerprint_fields, redact, to_dict
from fusion_etl.errors import ConfigError, UserError
from fusion_etl.evaluation import performance_losses, read_text_sets
from fusion_etl.manifest import ShardRecord
from fusion_etl.merging import merge_tensor, performance_weights
from fusion_etl.models import local_model_dir, model_identity, write_companions
from fusion_etl.runner import RunResult, log
from fusion_etl.tokenization import tokenizer_fingerprint
from fusion_etl.weights import INDEX, index_json, open_weights, plan_files

__all__ = ["MergeStage", "merge_output"]

VERSION = 1
SHARD_BYTES = 5 * 2**30
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def merge_output(cfg: PipelineConfig) -> str:
    return cfg.merge.output or storage.join(cfg.stage_url("merge"), "model")


class MergeStage:
    """The `merge` stage (see the module docstring). One job, not sharded."""

    name = "merge"

    def describe(self, cfg: PipelineConfig) -> tuple[str, str, dict[str, Any]]:
        mc = cfg.merge
        if len(mc.models) < 2:
            raise ConfigError("merge.models: list at least two models to merge")
        identity = {
            "stage": self.name,
            "version": VERSION,
            "merge": fingerprint_fields(mc),
            "models": [[m.name, model_identity(m)] for m in mc.models],
            "base": [mc.base.name, model_identity(mc.base)] if mc.base else None,
            "validation": read_text_sets(mc.validation, what="merge.validation")[1]
            if mc.validation and not mc.weights and mc.weighting == "performance"
            else [],
        }
        return cfg.stage_url(self.name), fingerprint(identity), identity

    def run(self, cfg: PipelineConfig, *, overwrite: bool = False) -> RunResult:
        """Run under the output folder's lease: a second run at the same time is refused."""
        storage.configure(cfg.storage)
        out, fp, _ = self.describe(cfg)
        with manifest.stage_lease(out, stage=self.name, fingerprint=fp, ttl_s=cfg.ray.lease_ttl_s):
            return self._run(cfg, overwrite=overwrite)

    def _run(self, cfg: PipelineConfig, *, overwrite: bool) -> RunResult:
        storage.configure(cfg.storage)
        mc = cfg.merge
        out, fp, identity = self.describe(cfg)
        output = merge_output(cfg)
        if manifest.is_finished(out, fp):
            log(f"merge: up to date (fingerprint {fp}); the model is at {output}")
            return RunResult(self.name, 1, 1, 0, True, ())
        members = [*mc.models, *([mc.base] if mc.base else [])]
        if len({tokenizer_fingerprint(m.tokenizer_path) for m in members}) != 1:
            raise UserError("merge: the models (and the base) must share one tokenizer")
        manifest.begin_stage(
            out,
            stage=self.name,
            fingerprint=fp,
            identity=identity,
            config=redact(to_dict(cfg)),
            overwrite=overwrite,
        )
        with tempfile.TemporaryDirectory() as tmp:
            paths = [local_model_dir(m, tmp) for m in mc.models]
            base_path = local_model_dir(mc.base, tmp) if mc.base else None
            if mc.weights:
                weights = list(mc.weights)
            elif mc.weighting == "performance":
                sets = read_text_sets(mc.validation, what="merge.validation")[0]
                losses = performance_losses(paths, [t for ts in sets.values() for t in ts])
                weights = performance_weights(losses, mc.temperature)
            else:
                weights = [1.0] * len(paths)
            log(
                f"merge: {mc.method} of "
                + ", ".join(f"{m.name} ({w:.3f})" for m, w in zip(mc.models, weights, strict=True))
                + (f" against {mc.base.name}" if mc.base else "")
            )
            written = self._write(cfg, paths, base_path, weights, output, tmp)
        records = []
        for name in written:
            data = storage.read_bytes(storage.join(output, name))
            records.append(
                ShardRecord(
                    name=name,
                    rows=0,
                    bytes=len(data),
                    sha256=hashlib.sha256(data).hexdigest(),
                    seconds=0.0,
                )
            )
        storage.write_json(
            storage.join(out, "result.json"),
            {"method": mc.method, "weights": weights, "models": [m.name for m in mc.models]},
        )
        manifest.write_manifest(
            out,
            stage=self.name,
            fingerprint=fp,
            config=redact(to_dict(cfg)),
            inputs={},
            records=records,
        )
        log(f"merge: done; the model is at {output}")
        return RunResult(self.name, 1, 0, 1, True, tuple(records))

    def _write(
        self,
        cfg: PipelineConfig,
        paths: list[str],
        base_path: str | None,
        weights: list[float],
        output: str,
        tmp: str,
    ) -> list[str]:
        import torch
        from safetensors.torch import save_file

        mc = cfg.merge
        with open(os.path.join(paths[0], "config.json")) as fh:
            config = json.load(fh)
        dtype_name = (
            mc.dtype
            if mc.dtype != "auto"
            else str(config.get("dtype") or config.get("torch_dtype") or "float32")
        )
        if dtype_name not in _BYTES:
            dtype_name = "float32"
        dtype = getattr(torch, dtype_name)
        staging = os.path.join(tmp, "out")
        os.makedirs(staging)
        written: list[str] = []

        def publish(name: str) -> None:
            storage.put_file(os.path.join(staging, name), storage.join(output, name))
            os.unlink(os.path.join(staging, name))
            written.append(name)

        with ExitStack() as stack:
            handles = [stack.enter_context(open_weights(p)) for p in paths]
            base = stack.enter_context(open_weights(base_path)) if base_path else None
            first = handles[0]
            names = list(first)
            for p, h in zip(paths, handles, strict=True):
                if set(h) != set(names):
                    raise UserError(f"merge: {p} does not have the same tensors as {paths[0]}")
            if base is not None and set(base) != set(names):
                raise UserError(f"merge: the base {base_path} has other tensors than the models")
            sizes = []
            for name in names:
                numel = 1
                for d in first[name].get_slice(name).get_shape():
                    numel *= int(d)
                sizes.append((name, numel * _BYTES[dtype_name]))
            weight_map: dict[str, str] = {}
            total = 0
            plan = plan_files(sizes, SHARD_BYTES)
            for file_name, group in plan:
                tensors = {}
                for name in group:
                    parts = [h[name].get_tensor(name) for h in handles]
                    if not parts[0].is_floating_point():
                        merged = parts[0]  # integer buffers are not averaged
                    else:
                        merged = merge_tensor(
                            parts,
                            method=mc.method,
                            weights=weights,
                            base=base[name].get_tensor(name) if base is not None else None,
                            scale=mc.scale,
                            density=mc.density,
                            select=mc.select,
                        ).to(dtype)
                    tensors[name] = merged.contiguous()
                    total += tensors[name].numel() * tensors[name].element_size()
                    weight_map[name] = file_name
                save_file(tensors, os.path.join(staging, file_name), metadata={"format": "pt"})
                del tensors
                publish(file_name)
            if len(plan) > 1:
                with open(os.path.join(staging, INDEX), "w") as fh:
                    fh.write(index_json(weight_map, total))
                publish(INDEX)
        first_model = cfg.merge.models[0]
        for name in write_companions(
            staging, paths[0], first_model.tokenizer_path, dtype_name, config
        ):
            publish(name)
        return sorted(written)
