"""Credentials never leave the places they come from.

A recognisable fake secret sits in the AWS environment and in an AWS credentials file (the
S3 test server's real credentials, so the run works); every output of a run on S3 is then
searched for it: the console, the log file, `_stage.json`, manifests, shard records, Parquet
shards and their metadata, and the error message of a failing run. The Ray-job side
(job submission metadata, runtime_env, job logs, checkpoints) is searched in
tests/test_jobs.py, after its pipeline has run as Ray jobs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from fusion_etl import storage
from fusion_etl.config import StorageConfig, to_dict
from fusion_etl.errors import UserError
from fusion_etl.jobs import _runtime_env
from fusion_etl.redaction import scrub
from tests.conftest import kit_config
from tests.s3server import ACCESS_KEY, SECRET_KEY

pytestmark = pytest.mark.slow


def assert_no_secret(secret: str, where: str, data: bytes | str) -> None:
    """`secret` does not appear in `data` (as text or as bytes)."""
    blob = data.encode() if isinstance(data, str) else data
    assert secret.encode() not in blob, f"the secret appears in {where}"


def test_scrub_replaces_known_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    creds = tmp_path / "credentials"
    creds.write_text(
        "[p]\naws_access_key_id = AKIDEXAMPLE\naws_secret_access_key = FILE-SECRET-123\n"
    )
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_SESSION_TOKEN", "TOKEN-SECRET-456")
    text = f"key AKIDEXAMPLE, {SECRET_KEY}, FILE-SECRET-123 and TOKEN-SECRET-456"
    assert scrub(text) == "key AKIDEXAMPLE, ***, *** and ***"


def test_runtime_env_with_credentials_is_refused(tmp_path: Path) -> None:
    env = tmp_path / "runtime_env.yaml"
    env.write_text("env_vars:\n  AWS_SECRET_ACCESS_KEY: x\n  PYTHONUNBUFFERED: '1'\n")
    with pytest.raises(UserError, match=r"env_vars AWS_SECRET_ACCESS_KEY look like credentials"):
        _runtime_env(str(env), str(tmp_path))
    env.write_text("env_vars:\n  PYTHONUNBUFFERED: '1'\n")
    assert _runtime_env(str(env), str(tmp_path))["env_vars"] == {"PYTHONUNBUFFERED": "1"}


def _cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fusion_etl", *args],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=cwd,
    )


def test_secret_never_appears_in_any_output(test_kit: Any, s3_server: Any, tmp_path: Path) -> None:
    # The secret in the environment and in a credentials file; the run uses the profile.
    creds = tmp_path / "aws-credentials"
    creds.write_text(
        f"[leakcheck]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
    )
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_SHARED_CREDENTIALS_FILE": str(creds),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    base = f"s3://{s3_server.bucket}/leak-{uuid.uuid4().hex[:8]}"
    cfg = kit_config(
        test_kit,
        f"{base}/run",
        f"storage.endpoint_url={s3_server.endpoint_url}",
        "storage.profile=leakcheck",
    )
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({k: v for k, v in to_dict(cfg).items() if v is not None}))

    outputs: list[tuple[str, str]] = []
    # (One stage is enough here: tests/test_jobs.py searches a whole pipeline's outputs.)
    for args in (["run", "prepare"], ["plan"], ["status"]):
        proc = _cli(*args, "--config", str(job), env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs.append((f"`{' '.join(args)}` output", proc.stdout + proc.stderr))
    # An error message: the run refused for a wrong (and recognisable) secret.
    wrong = "WRONG-SECRET-e0d6a5c1"
    bad_env = {**env, "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}
    bad_env["AWS_SECRET_ACCESS_KEY"] = wrong
    job_env = tmp_path / "job-env.yaml"
    job_env.write_text(job.read_text().replace('"profile": "leakcheck"', '"profile": null'))
    proc = _cli("run", "prepare", "--config", str(job_env), env=bad_env, cwd=tmp_path)
    assert proc.returncode == 2 and "the secret key does not match" in proc.stderr, proc.stderr
    assert_no_secret(wrong, "the error message", proc.stdout + proc.stderr)

    for where, text in outputs:
        assert_no_secret(SECRET_KEY, where, text)
    # Read back with this process's own (environment) credentials: it has no such profile.
    storage.configure(StorageConfig(endpoint_url=s3_server.endpoint_url))
    try:
        objects = storage.list_files(f"{base}/run")
        names = {storage.relative_name(f"{base}/run", u) for u in objects}
        # Everything a run writes is there: stage state, shards, records, manifests, log files.
        assert {"prepare/_stage.json", "prepare/_manifest.json", "prepare/_SUCCESS"} <= names
        assert any(n.startswith("prepare/_shards/") for n in names)
        assert any(n.startswith("_logs/") and n.endswith(".log") for n in names)
        for url in objects:
            assert_no_secret(SECRET_KEY, url, storage.read_bytes(url))
    finally:
        storage.configure(StorageConfig())
