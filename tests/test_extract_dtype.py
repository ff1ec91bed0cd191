"""`extract.dtype: auto` means one documented dtype for both backends (no Ray, no models)."""

from __future__ import annotations

from typing import Any

import pytest

from fusion_etl.backends.dtypes import AUTO_DTYPE, check_dtype_supported, resolve_dtype
from fusion_etl.config import parse_config
from fusion_etl.errors import UserError
from fusion_etl.stages.extract import resolve_extract_dtype

BASE: dict[str, Any] = {"run_dir": "/tmp/run", "target": {"name": "t", "path": "/m/t"}}


def test_auto_is_float32_on_cpu_and_bfloat16_on_gpu() -> None:
    assert AUTO_DTYPE == {"cpu": "float32", "cuda": "bfloat16"}
    assert resolve_dtype("auto", device="cpu") == "float32"
    assert resolve_dtype("auto", device="cuda") == "bfloat16"
    for explicit in ("float32", "bfloat16", "float16"):
        assert resolve_dtype(explicit, device="cpu") == explicit
        assert resolve_dtype(explicit, device="cuda") == explicit
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8", device="cpu")


@pytest.mark.parametrize("backend", ["transformers", "vllm"])
def test_the_plan_resolves_auto_by_the_actors_device(backend: str) -> None:
    # The same for both backends: an actor without GPUs scores in float32, one with a GPU in
    # bfloat16 (decided from the actor's request, so a CPU-only driver plans it right).
    cpu = parse_config(BASE, [f"extract.backend={backend}", "extract.num_gpus=0"])
    gpu = parse_config(BASE, [f"extract.backend={backend}", "extract.num_gpus=1"])
    assert resolve_extract_dtype(cpu, backend) == "float32"
    assert resolve_extract_dtype(gpu, backend) == "bfloat16"
    explicit = parse_config(BASE, ["extract.dtype=float16", "extract.num_gpus=1"])
    assert resolve_extract_dtype(explicit, backend) == "float16"


def test_inline_runs_resolve_by_this_process_device() -> None:
    import torch

    cfg = parse_config(BASE, ["ray.executor=inline"])
    expected = "bfloat16" if torch.cuda.is_available() else "float32"
    assert resolve_extract_dtype(cfg, "transformers") == expected


def test_bfloat16_is_refused_on_an_old_gpu_faked_capability(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No GPU here: torch's device queries are faked to describe a V100 (compute capability 7.0).
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100-SXM2-16GB")
    with pytest.raises(UserError, match=r"V100.*no bfloat16 support \(extract.dtype auto.*float16"):
        check_dtype_supported("bfloat16", device="cuda", requested="auto")
    check_dtype_supported("float16", device="cuda", requested="float16")
    check_dtype_supported("bfloat16", device="cpu", requested="bfloat16")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    check_dtype_supported("bfloat16", device="cuda", requested="auto")
