"""The training memory plan from config.json alone, and the CLI refusing plans that cannot fit."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from fusion_etl.config import TrainConfig
from fusion_etl.errors import UserError
from fusion_etl.train.memory import GIB, memory_plan

ROOT = Path(__file__).resolve().parent.parent
LLAMA2 = json.loads((ROOT / "jobs/models/llama-2-7b/config.json").read_text())
PAPER = TrainConfig(
    block_size=2048, micro_batch=1, grad_accum=16, precision="bf16", num_workers=8, use_gpu=True
)


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fusion_etl", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_paper_job_fits_with_fsdp_and_not_with_ddp() -> None:
    fsdp = memory_plan(LLAMA2, replace(PAPER, strategy="fsdp"), top_k=10)
    ddp = memory_plan(LLAMA2, replace(PAPER, strategy="ddp"), top_k=10)
    assert fsdp.parameters == 6_738_415_616
    assert fsdp.fits and fsdp.total < 40 * GIB
    assert not ddp.fits and ddp.total > 80 * GIB
    # DDP holds fp32 weights, gradients and AdamW state whole: 16 bytes per parameter.
    sharded = dict(ddp.lines)
    assert (
        sharded["parameters (fp32)"]
        + sharded["gradients (fp32)"]
        + sharded["optimizer state (AdamW, fp32)"]
    ) == 16 * fsdp.parameters
    per_worker = dict(fsdp.lines)
    assert per_worker["optimizer state (AdamW, fp32)"] == 8 * fsdp.parameters // 8
    assert "train.strategy=fsdp (shards parameters, gradients and optimizer state)" in ddp.fixes()


def test_plan_scales_with_the_batch_and_checkpointing_saves_activations() -> None:
    base = memory_plan(LLAMA2, PAPER, top_k=10)
    double = memory_plan(LLAMA2, replace(PAPER, micro_batch=2), top_k=10)
    assert dict(double.lines)["activations"] == 2 * dict(base.lines)["activations"]
    ac = memory_plan(LLAMA2, replace(PAPER, activation_checkpointing=True), top_k=10)
    assert ac.total < base.total
    assert dict(ac.lines)["activations (checkpointed)"] == base.activations_with_checkpointing
    assert base.activations_with_checkpointing < base.activations_without_checkpointing / 5
    offload = memory_plan(LLAMA2, replace(PAPER, cpu_offload=True), top_k=10)
    assert dict(offload.lines)["optimizer state (AdamW, fp32)"] == 0
    assert memory_plan(LLAMA2, replace(PAPER, accelerator_type="A10G"), top_k=10).budget == 24 * GIB
    assert memory_plan(LLAMA2, replace(PAPER, gpu_memory_gib=40), top_k=10).budget == 40 * GIB


def test_an_unknown_architecture_is_a_clear_error() -> None:
    with pytest.raises(UserError, match="model_type 'bert'"):
        memory_plan({"model_type": "bert", "vocab_size": 10}, PAPER, top_k=10)


def test_memory_command_exits_0_when_it_fits_and_2_naming_fixes_when_not(tmp_path: Path) -> None:
    args = ["--config", "jobs/paper_gpu.yaml", "target.path=jobs/models/llama-2-7b"]
    ok = _cli("memory", *args)
    assert ok.returncode == 0, ok.stderr
    assert "fsdp on 8 worker(s), bf16, 6.738B parameters" in ok.stdout
    assert "fits" in ok.stdout and "Traceback" not in ok.stderr
    bad = _cli("memory", *args, "train.strategy=ddp")
    assert bad.returncode == 2
    assert "DOES NOT FIT" in bad.stdout
    assert bad.stderr.startswith("error: train: the memory plan does not fit")
    assert "train.strategy=fsdp" in bad.stderr and "Traceback" not in bad.stderr


def test_run_plan_and_submit_refuse_a_plan_that_cannot_fit_before_any_work(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [
        "--config",
        str(ROOT / "jobs/paper_gpu.yaml"),
        f"target.path={ROOT / 'jobs/models/llama-2-7b'}",
        f"run_dir={run_dir}",
        "train.strategy=ddp",
    ]
    for command in (["run", "all"], ["run", "train"]):
        out = _cli(*command, *args, cwd=tmp_path)
        assert out.returncode == 2, out.stderr
        assert out.stderr.startswith("error: train: the memory plan does not fit")
        assert not run_dir.exists(), "nothing may start before the plan is checked"
    # The cluster address is a closed local port: the plan is refused before it is dialled.
    sub = _cli("submit", "all", *args, "--address", "http://127.0.0.1:9", cwd=tmp_path)
    assert sub.returncode == 2 and "memory plan does not fit" in sub.stderr
    # The job's storage (s3://your-bucket) cannot be reached from here: the plan still shows
    # the memory plan, from the config alone, then names the storage problem.
    planned = _cli("plan", "--stage", "train", *args, "storage.retries=0", cwd=tmp_path)
    assert planned.returncode == 2 and "s3://your-bucket" in planned.stderr, planned.stderr
    assert "memory plan per training worker: ddp on 8 worker(s)" in planned.stdout
    assert "DOES NOT FIT" in planned.stdout
