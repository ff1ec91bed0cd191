"""Submitting stages as Ray jobs, with a deterministic submission id per (stage, config).

The same stage with the same resolved configuration always gets the same id, so submitting it
again while it runs, or after it succeeded, is refused by the cluster instead of running twice.
After a failed or stopped job, a new attempt gets the next numbered id (it resumes from the
shards and checkpoints the failed one committed).
"""

from __future__ import annotations

import os
import re
import shlex
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from fusion_etl.config import PipelineConfig, fingerprint, to_dict
from fusion_etl.errors import UserError

__all__ = ["job_id", "submit"]

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
_SECRET_VAR = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|API_KEY", re.I)
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def job_id(stage: str, cfg: PipelineConfig, *, overwrite: bool = False) -> str:
    """`fusion-etl-<stage>-<hash of the resolved config>`: valid as a Ray submission id."""
    digest = fingerprint({"stage": stage, "config": to_dict(cfg), "overwrite": overwrite})
    return f"fusion-etl-{stage.replace('_', '-')}-{digest}"


def _runtime_env(path: str | None, working_dir: str) -> dict[str, Any]:
    env: dict[str, Any] = {}
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise UserError(f"--runtime-env {path}: cannot be read: {exc}") from None
        if not isinstance(loaded, dict):
            raise UserError(f"--runtime-env {path}: expected a mapping")
        secret = sorted(k for k in dict(loaded.get("env_vars") or {}) if _SECRET_VAR.search(str(k)))
        if secret:
            # A job's runtime_env is stored with the job and shown by the dashboard and the
            # Jobs API to anyone who can reach the cluster.
            raise UserError(
                f"--runtime-env {path}: env_vars {', '.join(secret)} look like credentials; a "
                "job's runtime_env is visible to everyone who can reach the cluster. Give the "
                "cluster's nodes their credentials instead (an instance role or service "
                "account, or the environment of `ray start`)."
            )
        env.update(loaded)
    env["working_dir"] = working_dir
    return env


def submit(
    stage: str,
    cfg: PipelineConfig,
    *,
    config_path: str,
    overrides: Sequence[str],
    overwrite: bool,
    address: str | None,
    runtime_env_path: str | None,
    working_dir: str,
    wait: bool,
    verbose: bool = False,
) -> int:
    """Submit `fusion-etl run <stage>` as a Ray job; with `wait`, print its output (the job's
    console: fusion-etl's own lines; Ray's and the workers' go to its log file unless
    `verbose`) until it ends. Returns a process exit code."""
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    try:
        client = JobSubmissionClient(address)
    except Exception as exc:
        raise UserError(
            f"no Ray cluster answers at {address} ({exc}); start one or pass --address"
        ) from None
    base = job_id(stage, cfg, overwrite=overwrite)
    existing = {j.submission_id: str(j.status) for j in client.list_jobs() if j.submission_id}
    sid = base
    attempt = 1
    while sid in existing:
        status = existing[sid].rsplit(".", 1)[-1]
        if status not in {"FAILED", "STOPPED"}:
            print(
                f"{sid} was already submitted and is {status}: not submitting it again (ray job logs {sid})"
            )
            return 0
        attempt += 1
        sid = f"{base}-{attempt}"
    entrypoint = shlex.join(
        [
            "fusion-etl",
            "run",
            stage,
            "--config",
            config_path,
            *overrides,
            *(["--overwrite"] if overwrite else []),
            *(["--verbose"] if verbose else []),
        ]
    )
    client.submit_job(
        entrypoint=entrypoint,
        submission_id=sid,
        runtime_env=_runtime_env(runtime_env_path, working_dir),
    )
    print(
        f"submitted {sid}: {entrypoint}\n  follow it: ray job logs --follow {sid}   status: ray job status {sid}"
    )
    if not wait:
        return 0
    _follow(client, sid)
    status = ""
    while status not in TERMINAL:
        status = str(client.get_job_status(sid)).rsplit(".", 1)[-1]
        if status not in TERMINAL:
            time.sleep(1)
    print(f"{sid}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def _follow(client: Any, sid: str) -> None:
    """Print the job's output as it comes, until the job ends."""
    import asyncio
    import sys

    async def tail() -> None:
        async for chunk in client.tail_job_logs(sid):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except Exception as exc:  # an older server, a dropped connection: the status still counts
        print(f"could not follow the job's output ({type(exc).__name__}); see ray job logs {sid}")
