"""The Ray Train (V2) loop: runs on every worker.

Data. The stage hands every worker the same unit table (the row groups of the fused shards) and
every worker derives the same epoch plans from it (`fusion_etl.train.data.plan_epochs`): worker
r reads only its own units, in the seeded order, packs them into blocks, and trains step s of an
epoch on its local blocks [s * A * B, (s + 1) * A * B) (A = gradient accumulation, B = micro
batch). A resumed run starts each worker's stream at exactly the first block of its next step,
so no block is trained twice or skipped, whatever happened to the processes in between.

Model. FSDP2 or DDP (`fusion_etl.train.parallel`), sharded checkpoints every
`checkpoint_every` steps (`fusion_etl.train.checkpoint`), and at the end a streamed
safetensors export of the final weights.
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
from fusion_etl.train.data import Block, EpochPlan, Unit, plan_epochs, worker_blocks
from fusion_etl.train.loss import fusion_loss
from fusion_etl.train.memstat import local_bytes, peak_rss_bytes, reset_peak_rss, rss_bytes

__all__ = ["epoch_plans", "lr_factor", "train_loop"]


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


def epoch_plans(cfg: PipelineConfig, units: list[Unit]) -> list[EpochPlan]:
    """The epoch plans of a config (the stage and every worker compute the same ones)."""
    tc = cfg.train
    return plan_epochs(
        units,
        world=tc.num_workers,
        epochs=tc.epochs,
        seed=tc.seed,
        shuffle=tc.shuffle,
        block_size=tc.block_size,
        keep_remainder=tc.keep_remainder,
        blocks_per_step=tc.grad_accum * tc.micro_batch,
    )


def _stack(blocks: list[Block], device: Any) -> dict[str, Any]:
    import torch

    return {
        "input_ids": torch.from_numpy(np.stack([b.input_ids for b in blocks])).to(device),
        "labels": torch.from_numpy(np.stack([b.labels for b in blocks])).to(device),
        "fused_ids": torch.from_numpy(np.stack([b.fused_ids for b in blocks])).to(device),
        "fused_probs": torch.from_numpy(np.stack([b.fused_probs for b in blocks])).to(device),
    }


class _Progress:
    """Loss and throughput since the last report, and the progress line rank 0 prints."""

    def __init__(self, total_steps: int, world: int) -> None:
        self.total_steps = total_steps
        self.world = world
        self.reset()

    def reset(self) -> None:
        self.sums = {"loss": 0.0, "clm": 0.0, "fusion": 0.0}
        self.steps = 0
        self.tokens = 0
        self.started = time.monotonic()

    def add(self, loss: float, clm: float, fusion: float, tokens: int) -> None:
        self.sums["loss"] += loss
        self.sums["clm"] += clm
        self.sums["fusion"] += fusion
        self.tokens += tokens

    def metrics(self, step: int, epoch: int, lr: float) -> dict[str, Any]:
        n = max(self.steps, 1)
        clm = self.sums["clm"] / n
        seconds = max(time.monotonic() - self.started, 1e-9)
        return {
            "step": step,
            "epoch": epoch,
            "loss": self.sums["loss"] / n,
            "clm_loss": clm,
            "fusion_loss": self.sums["fusion"] / n,
            "clm_perplexity": math.exp(min(clm, 50.0)),
            "lr": lr,
            "tokens": self.tokens,
            # Every worker trains as many tokens per step (padding aside): the cluster's rate.
            "tokens_per_s": self.tokens * self.world / seconds,
        }

    def line(self, m: dict[str, Any]) -> str:
        return (
            f"[fusion-etl] train: step {m['step']}/{self.total_steps} loss {m['loss']:.4f} "
            f"clm {m['clm_loss']:.4f} (ppl {m['clm_perplexity']:.2f}) fusion {m['fusion_loss']:.4f} "
            f"lr {m['lr']:.2e} {m['tokens_per_s']:,.0f} tokens/s"
        )


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train entry point; `config` holds the pipeline config, the unit table, the shard
    URLs and where the model goes."""
    import ray.train
    import ray.train.torch
    import torch
    from ray.train import Checkpoint
    from transformers import AutoModelForCausalLM

    from fusion_etl import storage
    from fusion_etl.train.checkpoint import export_model, load_checkpoint
    from fusion_etl.train.memory import resolve_strategy
    from fusion_etl.train.parallel import wrap_model
    from fusion_etl.train.reader import UnitReader

    cfg: PipelineConfig = config["cfg"]
    tc = cfg.train
    storage.configure(cfg.storage)
    units: list[Unit] = config["units"]
    plans = epoch_plans(cfg, units)
    total_steps = sum(p.steps for p in plans)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    np.random.seed(tc.seed)
    device = ray.train.torch.get_device()
    bf16 = tc.precision == "bf16" or (
        tc.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    strategy = resolve_strategy(tc)

    model: Any = AutoModelForCausalLM.from_pretrained(config["model_path"], dtype=torch.float32)
    model.config.use_cache = False
    par = wrap_model(
        model,
        strategy=strategy,
        world=world,
        device=device,
        bf16=bf16,
        cpu_offload=tc.cpu_offload and device.type == "cuda",
        activation_checkpointing=tc.activation_checkpointing,
    )
    params = list(par.model.parameters())
    # Peak memory is measured from here: the libraries' code is loaded and the parameters this
    # worker holds are known, so what the measurement adds up is the training state the memory
    # plan counts (parameters, gradients, optimizer state, activations, logits, buffers).
    held = local_bytes(params)
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
        measured, baseline = True, 0
    else:
        measured = reset_peak_rss()
        baseline = rss_bytes() - held
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": tc.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
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
        url = storage.join(config["checkpoint_url"], os.path.basename(checkpoint.path))
        start_step = load_checkpoint(url, model=par.model, optimizer=optimizer, scheduler=scheduler)
        if rank == 0:
            print(
                f"[fusion-etl] train: resumed from checkpoint at step {start_step} of {total_steps}",
                flush=True,
            )

    reader = UnitReader(config["shard_urls"])
    per_step = tc.grad_accum * tc.micro_batch
    progress = _Progress(total_steps, world)
    # This worker's losses per step trained by this run (rank 0's are reported).
    curve: list[float] = []
    clm_curve: list[float] = []
    step = start_step
    done_before = 0
    for plan in plans:
        if step >= done_before + plan.steps:
            done_before += plan.steps
            continue
        in_epoch = step - done_before
        blocks: Iterator[Block] = worker_blocks(
            plan,
            rank,
            units,
            reader,
            seed=tc.seed,
            shuffle=tc.shuffle,
            window=tc.shuffle_window,
            block_size=tc.block_size,
            keep_remainder=tc.keep_remainder,
            start_block=in_epoch * per_step,
        )
        for _ in range(in_epoch, plan.steps):
            par.model.train()
            optimizer.zero_grad(set_to_none=True)
            loss = clm = fusion = 0.0
            tokens = 0
            for micro in range(tc.grad_accum):
                batch = _stack([next(blocks) for _ in range(tc.micro_batch)], device)
                # Gradients are synchronised once per step, on its last micro-batch.
                with (
                    par.gradient_sync(micro == tc.grad_accum - 1),
                    torch.autocast(device_type=device.type, dtype=torch.bfloat16)
                    if par.autocast_bf16
                    else nullcontext(),
                ):
                    logits = par.model(input_ids=batch["input_ids"]).logits
                    parts = fusion_loss(
                        logits,
                        batch["labels"],
                        batch["fused_ids"],
                        batch["fused_probs"],
                        tc.lam,
                        topk_mass=tc.topk_mass,
                    )
                    (parts.total / tc.grad_accum).backward()
                loss += float(parts.total.detach()) / tc.grad_accum
                clm += float(parts.clm) / tc.grad_accum
                fusion += float(parts.fusion) / tc.grad_accum
                tokens += parts.tokens
                del logits, parts, batch
            torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            progress.steps += 1
            progress.add(loss, clm, fusion, tokens)
            curve.append(loss)
            clm_curve.append(clm)
            last = step == total_steps
            lr = float(scheduler.get_last_lr()[0])
            if rank == 0 and (step % tc.log_every == 0 or last):
                print(progress.line(progress.metrics(step, plan.epoch, lr)), flush=True)
            if step % tc.checkpoint_every == 0 or last:
                metrics = progress.metrics(step, plan.epoch, lr)
                if last:
                    metrics["loss_curve"] = curve
                    metrics["clm_curve"] = clm_curve
                    metrics.update(
                        _gathered(
                            world,
                            bytes_read=reader.bytes_read[0],
                            peak_memory=(
                                int(torch.cuda.max_memory_allocated(device))
                                if on_gpu
                                else peak_rss_bytes() - baseline
                            )
                            if measured
                            else -1,
                        )
                    )
                _report(metrics, step, rank, par.model, optimizer, scheduler, Checkpoint, ray.train)
                progress.reset()
        done_before += plan.steps
    reader.close()
    export_model(par.module, cfg, config["output"], rank=rank)


def _gathered(world: int, **values: int) -> dict[str, list[int]]:
    """Each value of every rank, as lists indexed by rank (rank 0 reports them)."""
    import torch.distributed as dist

    mine = dict(values)
    if world == 1 or not dist.is_initialized():
        return {f"{k}_per_worker": [v] for k, v in mine.items()}
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, mine)
    return {f"{k}_per_worker": [int(d[k]) for d in everyone] for k in mine}


def _report(
    metrics: dict[str, Any],
    step: int,
    rank: int,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    checkpoint_cls: Any,
    train: Any,
) -> None:
    """A sharded checkpoint from every rank (Ray Train merges the directories) and the
    metrics (rank 0's are kept)."""
    from fusion_etl.train.checkpoint import save_checkpoint

    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(
            d, model=model, optimizer=optimizer, scheduler=scheduler, step=step, rank=rank
        )
        train.report(
            metrics,
            checkpoint=checkpoint_cls.from_directory(d),
            checkpoint_dir_name=f"step_{step:08d}",
        )
