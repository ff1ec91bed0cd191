"""Model folders as several stages use them: identity for fingerprints, a local copy to load.

A model is a `save_pretrained` folder (config.json, safetensors weights, tokenizer files) at a
local path or any storage URL.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from fusion_etl import storage
from fusion_etl.config import ModelConfig
from fusion_etl.errors import UserError
from fusion_etl.tokenization import tokenizer_fingerprint

__all__ = ["local_model_dir", "model_identity", "require_local_model", "write_companions"]


def require_local_model(model: ModelConfig) -> str:
    """The local folder of a model, or a clear error (backends load from local disk)."""
    local = storage.local_path(model.path)
    if local is None or not (local / "config.json").exists():
        raise UserError(
            f"model {model.name!r}: {model.path} is not a local folder with config.json "
            "(a save_pretrained folder is needed; copy remote models to local disk first)"
        )
    return str(local)


def model_identity(model: ModelConfig) -> dict[str, Any]:
    """What identifies a model's outputs: its config, weight files (names, sizes), tokenizer."""
    path = require_local_model(model)
    with open(os.path.join(path, "config.json"), "rb") as fh:
        config_hash = hashlib.sha256(fh.read()).hexdigest()[:16]
    weights = sorted(
        (name, os.path.getsize(os.path.join(path, name)))
        for name in os.listdir(path)
        if name.endswith((".safetensors", ".bin", ".pt"))
    )
    return {
        "config": config_hash,
        "weights": weights,
        "tokenizer": tokenizer_fingerprint(model.tokenizer_path),
    }


def local_model_dir(model: ModelConfig, tmp: str) -> str:
    """A local folder for a model that may live on object storage (copied under `tmp`)."""
    local = storage.local_path(model.path)
    if local is not None:
        if not (local / "config.json").exists():
            raise UserError(f"model {model.name!r}: {model.path} is not a folder with config.json")
        return str(local)
    target = Path(tmp) / hashlib.sha256(model.path.encode()).hexdigest()[:12]
    for url in storage.list_files(model.path):
        dest = target / storage.relative_name(model.path, url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(storage.read_bytes(url))
    if not (target / "config.json").exists():
        raise UserError(f"model {model.name!r}: {model.path} is not a folder with config.json")
    return str(target)


def write_companions(
    folder: str, model_path: str, tokenizer_path: str, dtype: str, config: dict[str, Any]
) -> list[str]:
    """Write what accompanies new weights of a model into the local `folder`: its config
    (with `dtype` set), its generation config if it has one, and its tokenizer; returns the
    file names written."""
    from transformers import PreTrainedTokenizerFast

    config = {**config, "dtype": dtype}
    config.pop("torch_dtype", None)
    names = ["config.json"]
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2, sort_keys=True)
    generation = storage.join(model_path, "generation_config.json")
    if storage.exists(generation):
        with open(os.path.join(folder, "generation_config.json"), "wb") as out:
            out.write(storage.read_bytes(generation))
        names.append("generation_config.json")
    tokenizer_dir = os.path.join(folder, ".tokenizer")
    PreTrainedTokenizerFast.from_pretrained(tokenizer_path).save_pretrained(tokenizer_dir)
    for name in sorted(os.listdir(tokenizer_dir)):
        os.replace(os.path.join(tokenizer_dir, name), os.path.join(folder, name))
        names.append(name)
    os.rmdir(tokenizer_dir)
    return names
