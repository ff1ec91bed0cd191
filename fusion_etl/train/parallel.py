"""Wrapping the target for data-parallel training: FSDP2 or DDP, mixed precision, checkpointing.

FSDP2 (`torch.distributed.fsdp.fully_shard`) shards every decoder layer (the model's
`_no_split_modules` classes) and then the root, so each worker keeps 1/world of the fp32
parameters, gradients and optimizer state and gathers one layer at a time for compute. With
bf16 the parameters are gathered and computed in bf16 while gradients are reduced in fp32 into
the fp32 shards (`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`). DDP keeps a
full copy per worker and its gradients in its communication buckets
(`gradient_as_bucket_view`, no second copy). Runs on CPU with gloo as on GPUs with NCCL.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

__all__ = ["Parallel", "wrap_model"]


@dataclass
class Parallel:
    """A wrapped model and how to step it."""

    model: Any
    """What to call forward on (the FSDP module, the DDP wrapper or the bare model)."""
    module: Any
    """The model itself (its config, its state dict keys)."""
    strategy: str
    autocast_bf16: bool
    """DDP in bf16: forward and loss under `torch.autocast` (FSDP casts by itself)."""

    def gradient_sync(self, sync: bool) -> AbstractContextManager[Any]:
        """Context for one micro-batch: synchronise gradients only on a step's last one."""
        if self.strategy == "fsdp":
            self.model.set_requires_gradient_sync(sync)
            return nullcontext()
        if not sync and hasattr(self.model, "no_sync"):
            ctx: AbstractContextManager[Any] = self.model.no_sync()
            return ctx
        return nullcontext()


def _layer_classes(model: Any) -> set[str]:
    names = set(getattr(model, "_no_split_modules", None) or ())
    if not names:
        raise ValueError(
            f"{type(model).__name__} does not name its decoder layers (_no_split_modules): "
            "train it with train.strategy=ddp"
        )
    return names


def wrap_model(
    model: Any,
    *,
    strategy: str,
    world: int,
    device: Any,
    bf16: bool,
    cpu_offload: bool,
    activation_checkpointing: bool,
) -> Parallel:
    """Move `model` to `device` and wrap it for `strategy` (`fsdp` or `ddp`) over `world`
    workers (the process group must exist when world > 1)."""
    import torch

    if activation_checkpointing:
        # Non-reentrant checkpointing: composes with FSDP2's hooks (the recomputed forward
        # gathers the layer again) and with DDP.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import (
            CPUOffloadPolicy,
            MixedPrecisionPolicy,
            OffloadPolicy,
            fully_shard,
        )

        if not cpu_offload:
            model = model.to(device)
        mesh = init_device_mesh(device.type, (world,))
        mp = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if bf16
            else MixedPrecisionPolicy()
        )
        offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
        layers = _layer_classes(model)
        for sub in model.modules():
            if type(sub).__name__ in layers:
                fully_shard(sub, mesh=mesh, mp_policy=mp, offload_policy=offload)
        fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload)
        return Parallel(model=model, module=model, strategy="fsdp", autocast_bf16=False)
    model = model.to(device)
    wrapped = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            gradient_as_bucket_view=True,
        )
    return Parallel(model=wrapped, module=model, strategy="ddp", autocast_bf16=bf16)
