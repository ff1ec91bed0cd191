"""`evaluate`: bits per UTF-8 byte and token perplexity of models on held-out text, by domain.

Models default to the target before training, the trained target (`train`'s exported model,
when it exists) and every source; each is scored with its own tokenizer. Bits per byte (total
NLL / ln 2 / UTF-8 bytes) is comparable across tokenizers; token perplexity is not, and is
reported for each model's own reading only. Writes `evaluate/results.json`, `results.md` (a
Markdown table) and `bits_per_byte.png` (a grouped bar chart), then a manifest.
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
from dataclasses import replace
from typing import Any

from fusion_etl import manifest, storage
from fusion_etl.config import (
    EnsembleConfig,
    ModelConfig,
    PipelineConfig,
    fingerprint,
    fingerprint_fields,
    redact,
    to_dict,
)
from fusion_etl.errors import ConfigError
from fusion_etl.evaluation import performance_losses, read_text_sets
from fusion_etl.manifest import ShardRecord
from fusion_etl.merging import performance_weights
from fusion_etl.models import local_model_dir, model_identity
from fusion_etl.runner import RunResult, log
from fusion_etl.stages.train import train_paths

__all__ = ["EvaluateStage", "markdown_table"]

VERSION = 2
FILES = ("results.json", "results.md", "bits_per_byte.png")


def _models(cfg: PipelineConfig) -> list[ModelConfig]:
    if cfg.evaluate.models:
        return list(cfg.evaluate.models)
    out = [replace(cfg.target, name=f"{cfg.target.name} (before)")]
    train_dir, _, model_url = train_paths(cfg)
    if storage.exists(storage.join(train_dir, manifest.SUCCESS)):
        out.append(ModelConfig(name=f"{cfg.target.name} (trained)", path=model_url))
    out.extend(cfg.sources)
    return out


def _read_heldout(cfg: PipelineConfig) -> tuple[dict[str, list[str]], list[list[Any]]]:
    ec = cfg.evaluate
    if not ec.input:
        raise ConfigError(
            "evaluate.input: set it to held-out jsonl files with `text` and `domain` fields"
        )
    return read_text_sets(
        ec.input, text_field=ec.text_field, domain_field=ec.domain_field, what="evaluate.input"
    )


def _member_id(cfg: PipelineConfig, m: ModelConfig) -> list[Any]:
    """What identifies a model to score: its files, or for the trained target (and anything on
    object storage) the train stage's fingerprint."""
    if storage.local_path(m.path) is None or m.path == train_paths(cfg)[2]:
        train_state = manifest.stage_state(cfg.stage_url("train")) or {}
        return [m.name, m.path, train_state.get("fingerprint")]
    return [m.name, model_identity(m)]


def ensemble_weights(ens: EnsembleConfig, paths: list[str]) -> list[float]:
    """The configured weights, uniform ones, or performance weights from validation text."""
    if ens.weights:
        return list(ens.weights)
    if ens.weighting == "uniform":
        return [1.0] * len(paths)
    texts = [t for ts in read_text_sets(ens.validation, what="validation")[0].values() for t in ts]
    return performance_weights(performance_losses(paths, texts), ens.temperature)


def markdown_table(results: list[dict[str, Any]], domains: list[str]) -> str:
    """Bits per byte (lower is better) per model and domain, with the average; the best per
    column in bold; then token perplexity per model."""
    lines = ["| model | " + " | ".join(domains) + " | average |", "|---" * (len(domains) + 2) + "|"]
    best = {d: min(r["domains"][d]["bits_per_byte"] for r in results) for d in domains}
    best_avg = min(r["average_bits_per_byte"] for r in results)
    for r in results:
        cells = []
        for d in domains:
            v = r["domains"][d]["bits_per_byte"]
            cells.append(f"**{v:.4f}**" if v == best[d] else f"{v:.4f}")
        avg = r["average_bits_per_byte"]
        cells.append(f"**{avg:.4f}**" if avg == best_avg else f"{avg:.4f}")
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Token perplexity (each model on its own tokens; not comparable across tokenizers):",
        "",
    ]
    lines += ["| model | " + " | ".join(domains) + " |", "|---" * (len(domains) + 1) + "|"]
    for r in results:
        lines.append(
            f"| {r['model']} | "
            + " | ".join(f"{r['domains'][d]['token_perplexity']:.2f}" for d in domains)
            + " |"
        )
    return "\n".join(lines) + "\n"


def _chart(results: list[dict[str, Any]], domains: list[str]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(domains), 4.2), dpi=120)
    width = 0.8 / max(len(results), 1)
    for i, r in enumerate(results):
        xs = [j + (i - (len(results) - 1) / 2) * width for j in range(len(domains))]
        ax.bar(xs, [r["domains"][d]["bits_per_byte"] for d in domains], width, label=r["model"])
    ax.set_xticks(range(len(domains)), domains)
    ax.set_ylabel("bits per UTF-8 byte (lower is better)")
    ax.set_title("Held-out loss by domain")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


class EvaluateStage:
    """The `evaluate` stage (see the module docstring). One job, not sharded."""

    name = "evaluate"

    def describe(self, cfg: PipelineConfig) -> tuple[str, str, dict[str, Any]]:
        _, files = _read_heldout(cfg)
        identity = {
            "stage": self.name,
            "version": VERSION,
            "evaluate": fingerprint_fields(cfg.evaluate),
            "models": [_member_id(cfg, m) for m in _models(cfg)],
            "ensembles": [
                [
                    e.name,
                    [_member_id(cfg, m) for m in e.models],
                    read_text_sets(e.validation, what="validation")[1] if e.validation else [],
                ]
                for e in cfg.evaluate.ensembles
            ],
            "input_files": files,
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
        out, fp, identity = self.describe(cfg)
        if manifest.is_finished(out, fp):
            log(f"evaluate: up to date (fingerprint {fp})")
            return RunResult(self.name, 1, 1, 0, True, ())
        manifest.begin_stage(
            out,
            stage=self.name,
            fingerprint=fp,
            identity=identity,
            config=redact(to_dict(cfg)),
            overwrite=overwrite,
        )
        domains, _ = _read_heldout(cfg)
        from fusion_etl.evaluation import TextScore, score_ensemble, score_texts

        results = []
        with tempfile.TemporaryDirectory() as tmp:
            rows: list[tuple[str, str, Any]] = []
            for model in _models(cfg):
                path = local_model_dir(model, tmp)
                rows.append(
                    (
                        model.name,
                        model.path,
                        lambda texts, p=path: score_texts(p, texts, window=cfg.evaluate.max_length),
                    )
                )
            for ens in cfg.evaluate.ensembles:
                paths = [local_model_dir(m, tmp) for m in ens.models]
                weights = ensemble_weights(ens, paths)
                log(
                    f"evaluate: ensemble {ens.name}: "
                    + ", ".join(
                        f"{m.name} {w:.3f}" for m, w in zip(ens.models, weights, strict=True)
                    )
                )
                rows.append(
                    (
                        ens.name,
                        " + ".join(m.path for m in ens.models),
                        lambda texts, p=paths, w=weights: score_ensemble(
                            p, w, texts, window=cfg.evaluate.max_length
                        ),
                    )
                )
            for name, where, scorer in rows:
                per_domain = {}
                total = None
                for domain, texts in domains.items():
                    score: TextScore = scorer(texts)
                    per_domain[domain] = {
                        "bits_per_byte": score.bits_per_byte,
                        "token_perplexity": score.token_perplexity,
                        "nats": score.nats,
                        "tokens": score.tokens,
                        "bytes": score.bytes,
                    }
                    total = score if total is None else total + score
                avg = sum(v["bits_per_byte"] for v in per_domain.values()) / len(per_domain)
                results.append(
                    {
                        "model": name,
                        "path": where,
                        "domains": per_domain,
                        "average_bits_per_byte": avg,
                    }
                )
                log(
                    f"evaluate: {name}: "
                    + ", ".join(f"{d} {v['bits_per_byte']:.3f}" for d, v in per_domain.items())
                    + " bits/byte"
                )
        names = list(domains)
        blobs = {
            "results.json": json.dumps({"domains": names, "results": results}, indent=2).encode(),
            "results.md": markdown_table(results, names).encode(),
            "bits_per_byte.png": _chart(results, names),
        }
        records = []
        for name in FILES:
            storage.write_bytes(storage.join(out, name), blobs[name])
            records.append(
                ShardRecord(
                    name,
                    rows=len(results),
                    bytes=len(blobs[name]),
                    sha256=hashlib.sha256(blobs[name]).hexdigest(),
                    seconds=0.0,
                )
            )
        manifest.write_manifest(
            out,
            stage=self.name,
            fingerprint=fp,
            config=redact(to_dict(cfg)),
            inputs={},
            records=records,
        )
        print(blobs["results.md"].decode())
        return RunResult(self.name, 1, 0, 1, True, tuple(records))
