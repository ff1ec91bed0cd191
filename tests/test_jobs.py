"""The pipeline as Ray jobs: a real `ray start --head` on 127.0.0.1, the Jobs API, S3 storage."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fusion_etl import storage
from fusion_etl.config import StorageConfig, to_dict
from tests.conftest import kit_config
from tests.raycluster import start_head

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


# Temp dir of each head started here (its Ray session logs are searched for secrets).
HEAD_TEMP_DIRS: dict[str, str] = {}


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """`ray start --head --block` with its own ports and temp dir; stopped (only it) afterwards."""
    head = start_head()
    HEAD_TEMP_DIRS[head.address] = head.temp_dir
    try:
        yield head.address
    finally:
        head.stop()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "fusion-etl"), *args], capture_output=True, text=True, timeout=900, cwd=ROOT
    )


def _snapshot(run_url: str) -> dict[str, dict[str, str]]:
    """stage -> {file: sha256} of everything under the run folder."""
    out: dict[str, dict[str, str]] = {}
    for url in storage.list_files(run_url):
        rel = storage.relative_name(run_url, url)
        stage = rel.split("/", 1)[0]
        out.setdefault(stage, {})[rel] = hashlib.sha256(storage.read_bytes(url)).hexdigest()
    return out


def test_pipeline_as_ray_jobs_with_single_stage_reruns(
    ray_head: str, test_kit: Any, s3_server: Any, tmp_path: Path
) -> None:
    from ray.job_submission import JobSubmissionClient

    opts = StorageConfig(endpoint_url=s3_server.endpoint_url)
    storage.configure(opts)
    base = f"s3://{s3_server.bucket}/jobs-{uuid.uuid4().hex[:8]}"
    for path in sorted(Path(test_kit.corpus_dir).rglob("*.jsonl")):
        storage.write_bytes(f"{base}/corpus/{path.name}", path.read_bytes())
    cfg = kit_config(
        test_kit,
        f"{base}/run",
        f"storage.endpoint_url={s3_server.endpoint_url}",
        f"prepare.input={base}/corpus",
        "train.checkpoint_every=1000",
    )
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({k: v for k, v in to_dict(cfg).items() if v is not None}))
    run_url = f"{base}/run"
    client = JobSubmissionClient(ray_head)
    try:
        first = _cli("submit", "all", "--config", str(job), "--address", ray_head, "--wait")
        assert first.returncode == 0, first.stdout + first.stderr
        sid = first.stdout.split("submitted ", 1)[1].split(":", 1)[0]
        assert sid == _cli("job-id", "all", "--config", str(job)).stdout.strip()
        assert str(client.get_job_status(sid)).endswith("SUCCEEDED")
        logs = subprocess.run(
            [str(BIN / "ray"), "job", "logs", sid, "--address", ray_head],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert logs.returncode == 0 and "[fusion-etl] align_fuse: committed" in logs.stdout
        assert "[fusion-etl] train: done" in logs.stdout
        before = _snapshot(run_url)
        assert set(before) >= {"prepare", "extract", "vocab_map", "align_fuse", "train", "evaluate"}
        assert all(
            f"{s}/_SUCCESS" in before[s] for s in ("prepare", "align_fuse", "train", "evaluate")
        )

        # The same stage and config again: refused, not run twice.
        jobs_before = len(client.list_jobs())
        again = _cli("submit", "all", "--config", str(job), "--address", ray_head)
        assert again.returncode == 0 and "already submitted and is SUCCEEDED" in again.stdout
        assert len(client.list_jobs()) == jobs_before

        # One stage alone, another fusion method: only align_fuse changes.
        one = _cli(
            "submit",
            "align_fuse",
            "--config",
            str(job),
            "align_fuse.fusion=avg_ce",
            "--overwrite",
            "--address",
            ray_head,
            "--wait",
        )
        assert one.returncode == 0, one.stdout + one.stderr
        after_one = _snapshot(run_url)
        for stage in ("prepare", "extract", "vocab_map", "train", "evaluate"):
            assert after_one[stage] == before[stage], stage
        assert after_one["align_fuse"] != before["align_fuse"]

        # Then the pipeline with that change: the stages downstream of align_fuse are redone,
        # everything upstream (and align_fuse itself) is kept.
        rest = _cli(
            "submit",
            "all",
            "--config",
            str(job),
            "align_fuse.fusion=avg_ce",
            "--overwrite",
            "--address",
            ray_head,
            "--wait",
        )
        assert rest.returncode == 0, rest.stdout + rest.stderr
        after_all = _snapshot(run_url)
        for stage in ("prepare", "extract", "vocab_map", "align_fuse"):
            assert after_all[stage] == after_one[stage], stage
        for stage in ("train", "evaluate"):
            assert after_all[stage] != after_one[stage], stage

        # The console of `submit --wait` (the job's own output, followed) and `ray job logs`:
        # fusion-etl's lines only; Ray's and the workers' went to the job's log file, which
        # was copied to <run_dir>/_logs/.
        # Ray's prefix of a line it forwards from a worker: `(pid=1)`, `(commit_stream pid=1)`.
        forwarded = re.compile(r"\((?:[\w.]+ )?pid=\d+")
        for text in (first.stdout + first.stderr, logs.stdout):
            assert "[fusion-etl] align_fuse: committed" in text
            assert not forwarded.search(text), forwarded.search(text)
            for noise in ("Loading weights", "Failed to query", "Running Dataset"):
                assert noise not in text, noise
        assert "[fusion-etl] train: step" in first.stdout + first.stderr
        job_logs = [u for u in storage.list_files(f"{run_url}/_logs") if u.endswith(".log")]
        assert job_logs and any(forwarded.search(storage.read_bytes(u).decode()) for u in job_logs)

        # The secret of the credentials every node used appears in no output: not in the
        # objects written (stage state, manifests, records, shards, checkpoints, the model,
        # log files), not in the jobs' submission metadata or runtime_env, not in their logs,
        # not in Ray's own session logs, not on the console.
        from tests.s3server import SECRET_KEY
        from tests.test_secrets import assert_no_secret

        assert any("/train/ray/" in u for u in storage.list_files(run_url))  # checkpoints
        for url in storage.list_files(base):
            assert_no_secret(SECRET_KEY, url, storage.read_bytes(url))
        for info in client.list_jobs():
            assert_no_secret(SECRET_KEY, f"job {info.submission_id}", repr(info))
            if info.submission_id:
                job_log = client.get_job_logs(info.submission_id)
                assert_no_secret(SECRET_KEY, f"logs of {info.submission_id}", job_log)
        for name, proc in {"first": first, "again": again, "one": one, "rest": rest}.items():
            assert_no_secret(SECRET_KEY, f"console of {name}", proc.stdout + proc.stderr)
        # (Its logs, not runtime_resources/: the job's shipped code, tests/ with the test
        # server's credentials included, is no output.)
        for path in Path(HEAD_TEMP_DIRS[ray_head]).glob("session_*/logs/**/*"):
            if path.is_file() and not path.is_symlink():
                assert_no_secret(SECRET_KEY, str(path), path.read_bytes())
    finally:
        storage.configure(StorageConfig())
