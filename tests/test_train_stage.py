"""The train and evaluate stages with a real Ray Train run (two CPU workers)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from fusion_etl import storage
from fusion_etl.config import StorageConfig, to_dict
from fusion_etl.manifest import read_manifest
from fusion_etl.stages.evaluate import EvaluateStage
from fusion_etl.stages.train import TrainStage
from tests.conftest import kit_config

pytestmark = pytest.mark.slow


def _download(url: str, dest: Path) -> Path:
    for u in storage.list_files(url):
        target = dest / storage.relative_name(url, u)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(storage.read_bytes(u))
    return dest


@pytest.fixture(scope="module")
def s3_trained(
    fused_run: Path, test_kit: Any, s3_server: Any, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """A 2-worker run with checkpoints and the exported model on the S3 server."""
    base = f"s3://{s3_server.bucket}/train-{uuid.uuid4().hex[:8]}"
    run_dir = tmp_path_factory.mktemp("train_s3") / "run"
    shutil.copytree(fused_run, run_dir)
    cfg = kit_config(
        test_kit,
        run_dir,
        f"storage.endpoint_url={s3_server.endpoint_url}",
        f"train.storage_path={base}/ckpt",
        f"train.output={base}/model",
    )
    storage.configure(cfg.storage)
    result = TrainStage().run(cfg)
    local = _download(f"{base}/model", tmp_path_factory.mktemp("model_from_s3"))
    files = storage.list_files(f"{base}/ckpt/{cfg.train.run_name}")
    checkpoints = sorted({u.split("/")[-2] for u in files if "/step_" in u})
    last = [u.rsplit("/", 1)[-1] for u in files if f"/{checkpoints[-1]}/" in u]
    out = {
        "cfg": cfg,
        "result": result,
        "model_dir": local,
        "checkpoints": checkpoints,
        "last_checkpoint_files": sorted(last),
        "run_dir": run_dir,
    }
    storage.configure(StorageConfig())
    return out


def test_two_workers_train_checkpoint_and_export_to_s3(
    s3_trained: dict[str, Any], test_kit: Any
) -> None:
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    cfg = s3_trained["cfg"]
    assert s3_trained["result"].complete
    result_json = json.loads((s3_trained["run_dir"] / "train" / "result.json").read_text())
    steps = result_json["steps"]
    assert steps >= 10
    metrics = result_json["metrics"]
    assert metrics["step"] == steps
    assert {"loss", "clm_loss", "fusion_loss", "clm_perplexity", "lr"} <= set(metrics)
    assert metrics["clm_perplexity"] == pytest.approx(2.718281828 ** metrics["clm_loss"], rel=1e-6)
    assert metrics["loss"] == pytest.approx(
        0.9 * metrics["clm_loss"] + 0.1 * metrics["fusion_loss"], rel=1e-6
    )
    # Checkpoints every 5 steps, the newest two kept, the last one at the final step.
    assert s3_trained["checkpoints"][-1] == f"step_{steps:08d}"
    assert len(s3_trained["checkpoints"]) == 2
    # Sharded (FSDP, the default at two workers): one file per rank, DCP's metadata, and the
    # step/scheduler state; no single whole-state file.
    assert result_json["strategy"] == "fsdp"
    assert s3_trained["last_checkpoint_files"] == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "trainer_state.pt",
    ]
    model_dir = s3_trained["model_dir"]
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    original: Any = AutoModelForCausalLM.from_pretrained(test_kit.target.path)
    assert tok.eos_token == PreTrainedTokenizerFast.from_pretrained(test_kit.target.path).eos_token
    changed = [
        n for n, p in model.state_dict().items() if not torch.equal(p, original.state_dict()[n])
    ]
    assert changed, "training must change the weights"
    m = read_manifest(str(s3_trained["run_dir"] / "train"), stage="train")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {s.name for s in m.shards}

    # A second run is up to date and trains nothing.
    storage.configure(cfg.storage)
    try:
        assert TrainStage().run(cfg).ran == 0
    finally:
        storage.configure(StorageConfig())


def test_killed_training_resumes_at_its_checkpoint_and_matches(
    s3_trained: dict[str, Any], fused_run: Path, test_kit: Any, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(fused_run, run_dir)
    cfg = kit_config(test_kit, run_dir)
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({k: v for k, v in to_dict(cfg).items() if v is not None}))
    cmd = [sys.executable, "-m", "fusion_etl", "run", "train", "--config", str(job)]
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    ckpt_root = run_dir / "train" / "ray" / cfg.train.run_name
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list(ckpt_root.glob("step_*/trainer_state.pt")):
        if proc.poll() is not None:
            pytest.fail(
                f"training ended before a checkpoint: {(tmp_path / 'first.log').read_text()[-3000:]}"
            )
        time.sleep(0.2)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "train" / "_SUCCESS").exists(), "training finished before the kill"

    resumed = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    found = re.search(
        r"resumed from checkpoint at step (\d+) of (\d+)", resumed.stdout + resumed.stderr
    )
    assert found, "the resubmitted run must resume, not start at step 0"
    step, total = int(found.group(1)), int(found.group(2))
    assert 5 <= step < total and step % 5 == 0
    # The same data, in the same order, from the same state: the same weights as the run on S3
    # that was never interrupted (no block trained twice or skipped).
    got = load_file(str(run_dir / "train" / "model" / "model.safetensors"))
    want = load_file(str(s3_trained["model_dir"] / "model.safetensors"))
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_evaluate_reports_bits_per_byte(s3_trained: dict[str, Any], test_kit: Any) -> None:
    cfg = s3_trained["cfg"]
    storage.configure(cfg.storage)
    try:
        result = EvaluateStage().run(cfg)
    finally:
        storage.configure(StorageConfig())
    assert result.complete
    out = s3_trained["run_dir"] / "evaluate"
    data = json.loads((out / "results.json").read_text())
    names = [r["model"] for r in data["results"]]
    assert names == ["target (before)", "target (trained)", *[m.name for m in test_kit.sources]]
    assert data["domains"] == sorted({"code", "prose", "scripture"})
    for r in data["results"]:
        for d in data["domains"]:
            v = r["domains"][d]
            assert v["bits_per_byte"] == pytest.approx(v["nats"] / 0.6931471805599453 / v["bytes"])
            assert 0 < v["bits_per_byte"] < 20
    table = (out / "results.md").read_text()
    assert table.startswith("| model | code | prose | scripture | average |")
    assert (out / "bits_per_byte.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_another_seed_trains_another_model(
    s3_trained: dict[str, Any], fused_run: Path, test_kit: Any, tmp_path: Path
) -> None:
    """Seed 0 twice gives the same weights (the resumed run above equals the uninterrupted
    one); seed 1 reads the data in another order and gives other weights."""
    run_dir = tmp_path / "run"
    shutil.copytree(fused_run, run_dir)
    cfg = kit_config(test_kit, run_dir, "train.seed=1")
    assert TrainStage().run(cfg).complete
    other = load_file(str(run_dir / "train" / "model" / "model.safetensors"))
    seed0 = load_file(str(s3_trained["model_dir"] / "model.safetensors"))
    assert other.keys() == seed0.keys()
    assert any(not torch.equal(other[n], seed0[n]) for n in seed0)
