"""The Ray Train (V2) loop: runs on every worker.

Data position. Every worker reads the fused shards in manifest order (Ray Data, not split) and
packs the same sequence of blocks; worker r trains global blocks g with g % world == r, and step
s uses local blocks [s * A * B, (s + 1) * A * B) (A = gradient accumulation, B = micro batch).
A resumed run skips exactly the blocks of the steps in its checkpoint, so no block is trained
twice or skipped, whatever happened to the processes in between.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
import time
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import numpy as np

from fusion_etl.config import PipelineConfig
from fusion_etl.schema import list_rows
from fusion_etl.train.data import Block, pack_blocks
from fusion_etl.train.loss import fusion_loss

__all__ = ["export_model", "lr_factor", "train_loop"]

CHECKPOINT_FILE = "state.pt"


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    if schedule == "linear":
        return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _docs(shard: Any) -> Iterator[tuple[Any, Any, Any]]:
    """(input_ids, fused_ids, fused_probs) per document from a Ray Data iterator, in order."""
    for batch in shard.iter_batches(batch_size=64, batch_format="pyarrow", prefetch_batches=1):
        k = batch.schema.field("fused_ids").type.value_type.list_size
        yield from zip(
            list_rows(batch.column("input_ids")),
            list_rows(batch.column("fused_ids"), k),
            list_rows(batch.column("fused_probs"), k),
            strict=True,
        )


def _local_blocks(shard: Any, cfg: PipelineConfig, rank: int, world: int) -> Iterator[Block]:
    tc = cfg.train
    for g, block in enumerate(
        pack_blocks(_docs(shard), tc.block_size, keep_remainder=tc.keep_remainder)
    ):
        if g % world == rank:
            yield block


def _stack(blocks: list[Block], device: Any) -> dict[str, Any]:
    import torch

    return {
        "input_ids": torch.from_numpy(np.stack([b.input_ids for b in blocks])).to(device),
        "labels": torch.from_numpy(np.stack([b.labels for b in blocks])).to(device),
        "fused_ids": torch.from_numpy(np.stack([b.fused_ids for b in blocks])).to(device),
        "fused_probs": torch.from_numpy(np.stack([b.fused_probs for b in blocks])).to(device),
    }


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train entry point; `config` holds the pipeline config and the plan's numbers."""
    import ray.train
    import ray.train.torch
    import torch
    from ray.train import Checkpoint
    from transformers import AutoModelForCausalLM

    cfg: PipelineConfig = config["cfg"]
    tc = cfg.train
    steps_per_epoch: int = config["steps_per_epoch"]
    total_steps = steps_per_epoch * tc.epochs
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    np.random.seed(tc.seed)
    device = ray.train.torch.get_device()
    use_bf16 = tc.precision == "bf16" or (
        tc.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )

    model: Any = AutoModelForCausalLM.from_pretrained(config["model_path"], dtype=torch.float32)
    model.config.use_cache = False
    model = ray.train.torch.prepare_model(model)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": tc.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=tc.lr,
        betas=(tc.beta1, tc.beta2),
    )
    warmup = round(tc.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, tc.schedule, tc.min_lr_ratio)
    )
    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(
                os.path.join(d, CHECKPOINT_FILE), map_location="cpu", weights_only=False
            )
        unwrapped = model.module if hasattr(model, "module") else model
        unwrapped.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step = int(state["step"])
        torch.set_rng_state(state["torch_rng"])
        if rank == 0:
            print(
                f"[fusion-etl] train: resumed from checkpoint at step {start_step} of {total_steps}",
                flush=True,
            )

    per_step = tc.grad_accum * tc.micro_batch
    shard = ray.train.get_dataset_shard("train")
    step = start_step
    window: dict[str, float] = {"loss": 0.0, "clm": 0.0, "fusion": 0.0, "n": 0.0, "tokens": 0.0}
    started = time.monotonic()
    while step < total_steps:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        blocks = _local_blocks(shard, cfg, rank, world)
        skipped = 0
        # Skip the blocks of the steps this epoch already trained (after a resume).
        while skipped < in_epoch * per_step:
            next(blocks)
            skipped += 1
        for _ in range(in_epoch, steps_per_epoch):
            model.train()
            optimizer.zero_grad(set_to_none=True)
            for micro in range(tc.grad_accum):
                batch = _stack([next(blocks) for _ in range(tc.micro_batch)], device)
                # Gradients are synchronised once per step, on its last micro-batch.
                sync = micro == tc.grad_accum - 1 or not hasattr(model, "no_sync")
                context = model.no_sync() if not sync else nullcontext()
                with (
                    context,
                    torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16),
                ):
                    logits = model(input_ids=batch["input_ids"]).logits
                    parts = fusion_loss(
                        logits, batch["labels"], batch["fused_ids"], batch["fused_probs"], tc.lam
                    )
                    (parts.total / tc.grad_accum).backward()
                window["loss"] += float(parts.total.detach()) / tc.grad_accum
                window["clm"] += float(parts.clm) / tc.grad_accum
                window["fusion"] += float(parts.fusion) / tc.grad_accum
                window["tokens"] += parts.tokens
            window["n"] += 1
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            last = step == total_steps
            if step % tc.checkpoint_every == 0 or last:
                _report(
                    window,
                    step,
                    epoch,
                    total_steps,
                    scheduler,
                    started,
                    rank,
                    model,
                    optimizer,
                    Checkpoint,
                    ray.train,
                )
                window = {"loss": 0.0, "clm": 0.0, "fusion": 0.0, "n": 0.0, "tokens": 0.0}
            if last:
                break
    if rank == 0:
        unwrapped = model.module if hasattr(model, "module") else model
        export_model(unwrapped, cfg, config["output"])


def export_model(model: Any, cfg: PipelineConfig, output: str) -> list[str]:
    """save_pretrained the model with the target's tokenizer, then upload every file to
    `output` (any storage URL); returns the uploaded file names."""
    from transformers import PreTrainedTokenizerFast

    from fusion_etl import storage

    storage.configure(cfg.storage)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(cfg.target.tokenizer_path)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        tokenizer.save_pretrained(d)
        names = sorted(os.listdir(d))
        for name in names:
            with open(os.path.join(d, name), "rb") as fh:
                storage.write_bytes(storage.join(output, name), fh.read())
    return names


def _report(
    window: dict[str, float],
    step: int,
    epoch: int,
    total_steps: int,
    scheduler: Any,
    started: float,
    rank: int,
    model: Any,
    optimizer: Any,
    checkpoint_cls: Any,
    train: Any,
) -> None:
    import torch

    n = max(window["n"], 1.0)
    clm = window["clm"] / n
    metrics = {
        "step": step,
        "epoch": epoch,
        "loss": window["loss"] / n,
        "clm_loss": clm,
        "fusion_loss": window["fusion"] / n,
        "clm_perplexity": math.exp(min(clm, 50.0)),
        "lr": scheduler.get_last_lr()[0],
        "tokens": window["tokens"],
        "seconds": time.monotonic() - started,
    }
    if rank == 0:
        print(
            f"[fusion-etl] train: step {step}/{total_steps} loss {metrics['loss']:.4f} "
            f"clm {clm:.4f} (ppl {metrics['clm_perplexity']:.2f}) fusion {metrics['fusion_loss']:.4f} "
            f"lr {metrics['lr']:.2e}",
            flush=True,
        )
        unwrapped = model.module if hasattr(model, "module") else model
        with tempfile.TemporaryDirectory() as d:
            torch.save(
                {
                    "model": unwrapped.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "step": step,
                    "torch_rng": torch.get_rng_state(),
                },
                os.path.join(d, CHECKPOINT_FILE),
            )
            train.report(
                metrics,
                checkpoint=checkpoint_cls.from_directory(d),
                checkpoint_dir_name=f"step_{step:08d}",
            )
    else:
        train.report(metrics)
