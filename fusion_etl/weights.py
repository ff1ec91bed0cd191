"""Writing and reading `save_pretrained`-style safetensors folders, one tensor at a time.

A folder holds `model.safetensors`, or `model-0000i-of-0000n.safetensors` files with
`model.safetensors.index.json` when the weights exceed one file's limit (as transformers
writes them). Writers plan the files from the tensors' sizes first, so that every file can be
written and published as soon as it is full.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

__all__ = ["INDEX", "index_json", "open_weights", "plan_files"]

INDEX = "model.safetensors.index.json"


def plan_files(named_sizes: Sequence[tuple[str, int]], limit: int) -> list[tuple[str, list[str]]]:
    """(file name, tensor names) per file: tensors in order, a new file when `limit` bytes
    would be exceeded (a tensor larger than the limit gets a file of its own)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, nbytes in named_sizes:
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    if len(groups) == 1:
        return [("model.safetensors", groups[0])]
    n = len(groups)
    return [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


def index_json(weight_map: dict[str, str], total_size: int) -> str:
    """The index transformers reads for a sharded folder."""
    return json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2)


@contextmanager
def open_weights(folder: str) -> Iterator[dict[str, Any]]:
    """name -> a lazily loading handle (`handle.get_tensor(name)`) for every tensor of a local
    safetensors folder (single file or sharded with an index)."""
    from safetensors import safe_open

    index = os.path.join(folder, INDEX)
    if os.path.exists(index):
        with open(index) as fh:
            weight_map: dict[str, str] = json.load(fh)["weight_map"]
        files = sorted(set(weight_map.values()))
    elif os.path.exists(os.path.join(folder, "model.safetensors")):
        files, weight_map = ["model.safetensors"], {}
    else:
        raise FileNotFoundError(f"{folder} has no safetensors weights")
    with ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(os.path.join(folder, f), "pt")) for f in files}
        if not weight_map:
            names = handles["model.safetensors"].keys()  # a safe_open handle, not a dict
            weight_map = dict.fromkeys(names, "model.safetensors")
        yield {name: handles[f] for name, f in weight_map.items()}
