"""Sharded checkpoints (`torch.distributed.checkpoint`) and the streamed model export.

Checkpoint. Every rank writes its own shard of the model and optimizer state
(`__<rank>_0.distcp`) into a local directory; rank 0 also writes the DCP `.metadata` and
`trainer_state.pt` (step, scheduler, RNG). Every rank reports its directory to Ray Train, which
merges them into one checkpoint directory under `train.storage_path` (any URL) and keeps the
newest two. On resume each rank reads only the byte ranges of its own shard straight from
storage (fsspec, `s3://` included); with another number of workers DCP reshards.

Export. The final model becomes `save_pretrained`-style safetensors files (sharded at
`train.export_shard_gib`, with `model.safetensors.index.json` when there is more than one),
plus the target's config and tokenizer. Parameters are gathered one at a time (FSDP: a
collective on every rank) and rank 0 writes each file as soon as it is full and uploads it, so
no process ever holds more than one file's worth of full weights beside its own shard.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from fusion_etl import storage
from fusion_etl.config import PipelineConfig
from fusion_etl.models import write_companions
from fusion_etl.weights import INDEX, index_json, plan_files

__all__ = ["export_model", "load_checkpoint", "save_checkpoint"]

TRAINER_STATE = "trainer_state.pt"
_DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}


def save_checkpoint(
    directory: str, *, model: Any, optimizer: Any, scheduler: Any, step: int, rank: int
) -> None:
    """Write this rank's shard of the training state into `directory` (local)."""
    import torch
    from torch.distributed.checkpoint.filesystem import FileSystemWriter
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.checkpoint.state_dict_saver import save

    model_state, optim_state = get_state_dict(model, optimizer)
    save(
        {"model": model_state, "optimizer": optim_state},
        storage_writer=FileSystemWriter(directory),
    )
    if rank == 0:
        torch.save(
            {"scheduler": scheduler.state_dict(), "step": step, "torch_rng": torch.get_rng_state()},
            os.path.join(directory, TRAINER_STATE),
        )


def load_checkpoint(url: str, *, model: Any, optimizer: Any, scheduler: Any) -> int:
    """Restore the state saved at `url` (a checkpoint directory on any storage); returns the
    step it was taken after."""
    import io

    import torch
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.checkpoint.state_dict_loader import load
    from torch.distributed.checkpoint.storage import StorageReader

    model_state, optim_state = get_state_dict(model, optimizer)
    local = storage.local_path(url)
    reader: StorageReader
    if local is not None:
        reader = FileSystemReader(str(local))
    else:
        # torch 2.13 no longer re-exports its fsspec reader at the package level.
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        reader = FsspecReader(url, **storage.fsspec_options(url))
    load({"model": model_state, "optimizer": optim_state}, storage_reader=reader)
    # load() fills the given state dicts in place.
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    trainer = torch.load(
        io.BytesIO(storage.read_bytes(storage.join(url, TRAINER_STATE))),
        map_location="cpu",
        weights_only=False,
    )
    scheduler.load_state_dict(trainer["scheduler"])
    torch.set_rng_state(trainer["torch_rng"])
    return int(trainer["step"])


def _export_dtype(cfg: PipelineConfig, model_config: dict[str, Any]) -> str:
    if cfg.train.export_dtype != "auto":
        return cfg.train.export_dtype
    own = str(model_config.get("dtype") or model_config.get("torch_dtype") or "float32")
    return own if own in _DTYPES else "float32"


def export_model(module: Any, cfg: PipelineConfig, output: str, *, rank: int) -> list[str]:
    """Write the trained model to `output` (any URL); call on every rank (see the module
    docstring). Returns the file names written (rank 0; [] elsewhere)."""
    import torch
    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor

    storage.configure(cfg.storage)
    model_config = json.loads(storage.read_bytes(storage.join(cfg.target.path, "config.json")))
    dtype_name = _export_dtype(cfg, model_config)
    dtype = getattr(torch, dtype_name)
    state = module.state_dict()
    # Tied weights appear under several names; keep the first (as save_pretrained does).
    seen: set[int] = set()
    names = []
    for name, tensor in state.items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        names.append(name)
    plan = plan_files(
        [(name, state[name].numel() * _DTYPES[dtype_name]) for name in names],
        int(cfg.train.export_shard_gib * 2**30),
    )
    written: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:

        def publish(name: str) -> None:
            storage.put_file(os.path.join(tmp, name), storage.join(output, name))
            os.unlink(os.path.join(tmp, name))
            written.append(name)

        weight_map: dict[str, str] = {}
        total = 0
        for file_name, group in plan:
            tensors: dict[str, Any] = {}
            for name in group:
                tensor = state[name]
                if isinstance(tensor, DTensor):
                    tensor = tensor.full_tensor()  # a collective: every rank, same order
                if rank == 0:
                    tensors[name] = tensor.detach().to("cpu", dtype).contiguous()
                    total += tensors[name].numel() * _DTYPES[dtype_name]
                    weight_map[name] = file_name
                del tensor
            if rank == 0:
                save_file(tensors, os.path.join(tmp, file_name), metadata={"format": "pt"})
                del tensors
                publish(file_name)
        if rank != 0:
            return []
        if len(plan) > 1:
            with open(os.path.join(tmp, INDEX), "w") as fh:
                fh.write(index_json(weight_map, total))
            publish(INDEX)
        for name in write_companions(
            tmp, cfg.target.path, cfg.target.tokenizer_path, dtype_name, model_config
        ):
            publish(name)
    return sorted(written)
