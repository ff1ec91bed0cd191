"""Object-storage faults against the real S3 server (SeaweedFS) on 127.0.0.1.

Bad credentials, a missing bucket, an endpoint that refuses or never answers, a write the
credentials may not make: one `error:` line each, exit 2, naming what to set or check. The
server stopped dead in the middle of prepare, extract and align_fuse writes: bounded retries,
then one storage error; with the server back, the same run finishes identical to a clean one,
and no partial object is ever taken for a shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fusion_etl import storage
from fusion_etl.cli import main
from fusion_etl.config import PipelineConfig, StorageConfig, to_dict
from fusion_etl.errors import StorageError, UserError
from fusion_etl.manifest import SHARDS_DIR, read_manifest
from fusion_etl.runner import Stage, run_stage
from fusion_etl.stages.align_fuse import AlignFuseStage
from fusion_etl.stages.extract import ExtractStage
from fusion_etl.stages.prepare import PrepareStage
from tests.conftest import kit_config
from tests.s3server import (
    ACCESS_KEY,
    READER_ACCESS_KEY,
    READER_SECRET_KEY,
    SECRET_KEY,
    S3Server,
    start_s3_server,
)

pytestmark = pytest.mark.slow

# Fail fast in tests: one retry, short waits.
FAST = (
    "storage.retries=1",
    "storage.retry_wait_s=0.1",
    "storage.connect_timeout_s=1",
    "storage.read_timeout_s=1",
)


@pytest.fixture(autouse=True)
def _default_storage() -> Iterator[None]:
    yield
    storage.configure(StorageConfig())


def _plain(cfg: PipelineConfig) -> dict[str, Any]:
    data = to_dict(cfg)
    assert isinstance(data, dict)
    return {k: v for k, v in data.items() if v is not None}


@pytest.fixture
def make_job(tmp_path: Path, test_kit: Any, s3_server: S3Server) -> Callable[..., Path]:
    """A job YAML whose run_dir is a fresh prefix on the S3 server (overridable)."""
    counter = iter(range(1000))

    def make(*overrides: str) -> Path:
        cfg = kit_config(
            test_kit,
            f"s3://{s3_server.bucket}/cred-{uuid.uuid4().hex[:8]}/run",
            f"storage.endpoint_url={s3_server.endpoint_url}",
            *FAST,
            *overrides,
        )
        path = tmp_path / f"job-{next(counter)}.yaml"
        path.write_text(json.dumps(_plain(cfg)))
        return path

    return make


def _no_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    # Never ask an instance-metadata address: every address in tests stays on 127.0.0.1.
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def _expired_profile(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A profile whose credential_process hands out credentials that expired in 2020."""
    _no_credentials(monkeypatch, tmp_path)
    script = tmp_path / "expired_credentials.py"
    creds = {
        "Version": 1,
        "AccessKeyId": ACCESS_KEY,
        "SecretAccessKey": SECRET_KEY,
        "SessionToken": "old-token",
        "Expiration": "2020-01-01T00:00:00Z",
    }
    script.write_text(f"import json\nprint(json.dumps({creds!r}))\n")
    (tmp_path / "aws-config").write_text(
        f"[profile expired]\ncredential_process = {sys.executable} {script}\n"
    )
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))


def _assert_one_error(err: str, pattern: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), err
    assert "Traceback" not in err
    # Anything else on the console is our own lines (the log file's path, retries).
    assert all(line.startswith(("error: ", "[fusion-etl] ")) for line in lines), err


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers (an endpoint that hangs)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield int(sock.getsockname()[1])
    sock.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


CASES = {
    "no credentials": (
        _no_credentials,
        (),
        r"^error: cannot list s3://\S+/run: no AWS credentials found: set AWS_ACCESS_KEY_ID and "
        r"AWS_SECRET_ACCESS_KEY, or name a profile",
    ),
    "unknown access key": (
        lambda mp, _: mp.setenv("AWS_ACCESS_KEY_ID", "no-such-key"),
        (),
        r"the access key id is not known to http://127\.0\.0\.1:\d+: check AWS_ACCESS_KEY_ID",
    ),
    "wrong secret": (
        lambda mp, _: mp.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value"),
        (),
        r"the secret key does not match the access key id at .*: check AWS_SECRET_ACCESS_KEY",
    ),
    "expired credentials": (
        _expired_profile,
        ("storage.profile=expired",),
        r"the AWS credentials have expired: get fresh ones",
    ),
    "missing bucket": (
        None,
        ("run_dir=s3://no-such-bucket-fe/run",),
        r"cannot list s3://no-such-bucket-fe/run: bucket 'no-such-bucket-fe' does not exist at "
        r"http://127\.0\.0\.1:\d+: create it, or fix the URL",
    ),
    "endpoint refuses": (
        None,
        ("storage.endpoint_url=http://127.0.0.1:{free_port}",),
        r"cannot connect to http://127\.0\.0\.1:\d+: check that the object store is up .*"
        r"storage\.endpoint_url .*\(gave up after 2 attempts",
    ),
    "endpoint hangs": (
        None,
        ("storage.endpoint_url=http://127.0.0.1:{silent_port}",),
        r"http://127\.0\.0\.1:\d+ did not answer within 1 s \(storage\.read_timeout_s\).*"
        r"gave up after 2 attempts",
    ),
}


@pytest.mark.parametrize("command", ["run", "plan"])
@pytest.mark.parametrize("case", list(CASES))
def test_storage_mistakes_are_one_line_each(
    case: str,
    command: str,
    make_job: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    silent_port: int,
) -> None:
    env, overrides, pattern = CASES[case]
    job = make_job(*(o.format(free_port=_free_port(), silent_port=silent_port) for o in overrides))
    if env is not None:
        env(monkeypatch, tmp_path)
    args = ["run", "prepare"] if command == "run" else ["plan"]
    started = time.monotonic()
    assert main([*args, "--config", str(job)]) == 2
    _assert_one_error(capsys.readouterr().err, pattern)
    assert time.monotonic() - started < 60  # bounded: no endless retries


def test_s3_input_without_credentials(
    make_job: Callable[..., Path],
    s3_server: S3Server,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    job = make_job(
        f"run_dir={tmp_path / 'local-run'}", f"prepare.input=s3://{s3_server.bucket}/corpus"
    )
    _no_credentials(monkeypatch, tmp_path)
    assert main(["run", "prepare", "--config", str(job)]) == 2
    _assert_one_error(
        capsys.readouterr().err, r"cannot list s3://\S+/corpus: no AWS credentials found"
    )


def test_write_permission_denied(
    make_job: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    job = make_job()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", READER_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", READER_SECRET_KEY)
    # Reading is allowed: plan works.
    assert main(["plan", "--stage", "prepare", "--config", str(job)]) == 0
    assert "prepare: new: 4 shards to run" in capsys.readouterr().out
    assert main(["run", "prepare", "--config", str(job)]) == 2
    _assert_one_error(
        capsys.readouterr().err,
        r"cannot write s3://\S+/run/_leases/prepare\.json: access denied: these credentials may "
        r"not write here \(s3:PutObject",
    )


def test_missing_credentials_from_a_real_process(
    make_job: Callable[..., Path], tmp_path: Path
) -> None:
    job = make_job()
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("AWS_") or k == "AWS_DEFAULT_REGION"
    }
    env.update(
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "fusion_etl", "run", "prepare", "--config", str(job)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 2
    _assert_one_error(proc.stderr, r"no AWS credentials found: set AWS_ACCESS_KEY_ID")
    assert proc.stdout == ""


# --------------------------------------------------------------------------------------------
# The server stopped dead in the middle of writes.


@pytest.fixture(scope="module")
def flaky_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A server of this module's own: it is killed and started again."""
    server = start_s3_server(tmp_path_factory.mktemp("flaky-seaweedfs"))
    yield server
    server.stop()


def _kill_when(
    server: S3Server, records_url: str, at_least: int
) -> tuple[threading.Thread, list[int]]:
    """Kill the server as soon as `at_least` shard records exist (a watcher thread)."""
    seen: list[int] = []

    def watch() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                n = len(storage.list_files(records_url))
            except UserError:
                n = 0
            if n >= at_least:
                server.kill()
                seen.append(n)
                return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, seen


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _reference(folder: Path) -> dict[str, tuple[int, str]]:
    m = read_manifest(str(folder), stage="reference")
    return {s.name: (s.rows, s.sha256) for s in m.shards}


def _outage_then_resume(
    server: S3Server, stage: Stage, cfg: PipelineConfig, out: str, reference: Path
) -> float:
    """Run `stage` until its first shard is committed, kill the server, expect one storage
    error; start the server again, rerun, compare with `reference`. Returns the seconds from
    the kill to the error."""
    want = _reference(reference)
    watcher, seen = _kill_when(server, storage.join(out, SHARDS_DIR), at_least=1)
    with pytest.raises(StorageError) as info:
        run_stage(stage, cfg)
    failed_at = time.monotonic()
    watcher.join()
    assert seen, "the server was never stopped"
    message = str(info.value)
    assert re.search(
        rf"cannot (read|write|list|delete) s3://{server.bucket}/\S+: cannot connect to "
        rf"{re.escape(server.endpoint_url)}: check that the object store is up .*\(gave up after 3 "
        r"attempts",
        message,
    ), message
    server.start()
    # Whatever reached the store is whole: every shard object is a complete, correct shard.
    present = {
        storage.relative_name(out, u): _sha(storage.read_bytes(u))
        for u in storage.list_files(out)
        if u.endswith(".parquet")
    }
    assert set(present) < set(want), "the outage came too late: every shard was written"
    assert all(present[name] == want[name][1] for name in present), (present, want)
    # The same run again: it resumes and ends identical to a clean run.
    result = run_stage(stage, cfg)
    assert result.complete and result.skipped >= 1
    got = read_manifest(out, stage="resumed")
    assert {s.name: (s.rows, s.sha256) for s in got.shards} == want
    assert {
        s.name: _sha(storage.read_bytes(u))
        for s, u in zip(got.shards, got.shard_urls(), strict=True)
    } == {name: sha for name, (_, sha) in want.items()}
    return failed_at


def test_server_stopped_mid_write_then_same_run_finishes_identical(
    ray_local: Any,
    test_kit: Any,
    flaky_s3: S3Server,
    extracted_run: Path,
    fused_run: Path,
) -> None:
    base = f"s3://{flaky_s3.bucket}/outage-{uuid.uuid4().hex[:8]}"
    settings = (
        f"storage.endpoint_url={flaky_s3.endpoint_url}",
        "storage.retries=2",
        "storage.retry_wait_s=0.2",
        "storage.connect_timeout_s=1",
        "storage.read_timeout_s=2",
        "ray.max_in_flight=1",  # one shard at a time: the outage lands between commits
    )
    cfg = kit_config(test_kit, f"{base}/run", *settings)
    storage.configure(cfg.storage)
    try:
        _outage_then_resume(
            flaky_s3, PrepareStage(), cfg, cfg.stage_url("prepare"), extracted_run / "prepare"
        )
        # extract: the target alone; the sources' outputs are copied in below (the same bytes a
        # run would write: the reference is byte-identical to it).
        target_only = kit_config(test_kit, cfg.run_dir, *settings, "sources=[]")
        _outage_then_resume(
            flaky_s3,
            ExtractStage(),
            target_only,
            storage.join(cfg.stage_url("extract"), "target"),
            extracted_run / "extract" / "target",
        )
        for model in cfg.sources:
            local = extracted_run / "extract" / model.name
            for path in sorted(p for p in local.rglob("*") if p.is_file()):
                rel = path.relative_to(local).as_posix()
                storage.write_bytes(
                    storage.join(cfg.stage_url("extract"), model.name, rel), path.read_bytes()
                )
        _outage_then_resume(
            flaky_s3, AlignFuseStage(), cfg, cfg.stage_url("align_fuse"), fused_run / "align_fuse"
        )
    finally:
        storage.configure(StorageConfig())


def test_short_outage_is_ridden_out_by_retries(
    ray_local: Any,
    test_kit: Any,
    flaky_s3: S3Server,
    extracted_run: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    base = f"s3://{flaky_s3.bucket}/blip-{uuid.uuid4().hex[:8]}"
    cfg = kit_config(
        test_kit,
        f"{base}/run",
        f"storage.endpoint_url={flaky_s3.endpoint_url}",
        "storage.retries=6",
        "storage.retry_wait_s=0.5",
        "ray.max_in_flight=1",
    )
    storage.configure(cfg.storage)
    try:
        out = cfg.stage_url("prepare")
        watcher, seen = _kill_when(flaky_s3, storage.join(out, SHARDS_DIR), at_least=1)

        def restart_soon() -> None:
            watcher.join()
            time.sleep(2.0)  # down for about 3 s (with the start-up): within the retry budget
            flaky_s3.start()

        restarter = threading.Thread(target=restart_soon)
        restarter.start()
        result = run_stage(PrepareStage(), cfg)
        restarter.join()
        assert seen and result.complete
        assert "failed (connection refused); retry 1 of 6" in capfd.readouterr().err
        got = read_manifest(out, stage="prepare")
        assert {s.name: s.sha256 for s in got.shards} == {
            n: sha for n, (_, sha) in _reference(extracted_run / "prepare").items()
        }
    finally:
        storage.configure(StorageConfig())
