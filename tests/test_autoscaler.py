"""The pipeline on a cluster that Ray's real autoscaler grows and shrinks: `cluster/local-fake.yaml`
(the node types of `cluster/aws.yaml`) through the fake multi-node provider, every node a local
raylet, every address 127.0.0.1. The demo pipeline (test kit) goes in as a Ray job; the
autoscaler must launch each group when its stage asks for it and remove idle nodes."""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fusion_etl import storage
from fusion_etl.config import StorageConfig, to_dict
from tests.conftest import kit_config
from tests.raycluster import BIN, RayHead, start_head

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
LOCAL_FAKE = ROOT / "cluster" / "local-fake.yaml"
IPV4 = re.compile(r"(?<![\d.])(\d{1,3}(?:\.\d{1,3}){3})(?![\d.])")
ADDING = re.compile(r"Adding (\d+) node\(s\) of type (\w+)")
TRAIN_REQUEST_EXPIRY_S = 180
REMOVING = re.compile(r"Removing (\d+) nodes of type (\w+) \((\w[\w ]*)\)")


@pytest.fixture
def fake_cluster() -> Iterator[RayHead]:
    head = start_head(
        num_cpus=0, args=["--num-gpus=0"], autoscaling=yaml.safe_load(LOCAL_FAKE.read_text())
    )
    try:
        yield head
    finally:
        head.stop()


def _events(head: RayHead) -> list[tuple[float, str]]:
    """The autoscaler's events (`ray list cluster-events`), as (unix time, message)."""
    from ray.util.state import list_cluster_events

    out = []
    for event in list_cluster_events(
        address=head.address, limit=10_000, raise_on_missing_output=False
    ):
        if event.get("source_type") == "AUTOSCALER":
            out.append((_unix(event["time"]), str(event["message"])))
    return sorted(out)


def _unix(stamp: str) -> float:
    import datetime

    return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S").timestamp()


def _counts(events: list[tuple[float, str]], pattern: re.Pattern[str]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for _, message in events:
        for match in pattern.finditer(message):
            counts[match.group(2)] += int(match.group(1))
    return counts


def _checksums(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        k: (m["fingerprint"], [(s["name"], s["rows"], s["sha256"]) for s in m["shards"]])
        for k, m in manifests.items()
    }


def _manifests(read: Any, stages: list[str]) -> dict[str, dict[str, Any]]:
    return {stage: json.loads(read(f"{stage}/_manifest.json")) for stage in stages}


@pytest.mark.timeout(1800)  # about 8 minutes on 2 quiet cores, several of them waiting
def test_autoscaler_launches_each_group_on_demand_and_removes_idle_nodes(
    fake_cluster: RayHead, fused_run: Path, test_kit: Any, s3_server: Any, tmp_path: Path
) -> None:
    head = fake_cluster
    storage.configure(StorageConfig(endpoint_url=s3_server.endpoint_url))
    base = f"s3://{s3_server.bucket}/autoscale-{uuid.uuid4().hex[:8]}"
    # The corpus and the models stay where the local run read them (every fake node shares
    # this disk), so that even the fingerprints must be the local run's; outputs go to S3.
    # The paper job's requests, scaled to the fake nodes: each stage asks for its group's
    # custom resource; extract actors ask for a (declared, not real) GPU and run on CPU.
    cfg = kit_config(
        test_kit,
        f"{base}/run",
        f"storage.endpoint_url={s3_server.endpoint_url}",
        "prepare.resources={cpu_stage: 1}",
        "extract.resources={extract_gpu: 1}",
        "extract.num_gpus=1",
        "align_fuse.resources={cpu_stage: 1}",
        "train.resources={train_gpu: 1}",
        "train.checkpoint_every=1000",
    )
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({k: v for k, v in to_dict(cfg).items() if v is not None}))
    idle_timeout = 60 * float(yaml.safe_load(LOCAL_FAKE.read_text())["idle_timeout_minutes"])
    try:
        started = time.time()
        # Without a working dir: the code is installed in the environment every fake node
        # runs (as the launcher installs it on every real node), and on one shared disk each
        # node's runtime-env agent would unpack a job package over the others' running copy.
        sid = subprocess.run(
            [str(BIN / "fusion-etl"), "job-id", "all", "--config", str(job)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        # Submitted without following the logs (`ray job submit` tails them over a websocket
        # that a loaded machine may drop), then polled until the job ends.
        subprocess.run(
            [
                str(BIN / "ray"),
                "job",
                "submit",
                "--no-wait",
                "--address",
                head.address,
                "--submission-id",
                sid,
                "--",
                "fusion-etl",
                "run",
                "all",
                "--config",
                str(job),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
            check=True,
        )
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(head.address)
        deadline = time.time() + 1500
        while client.get_job_status(sid) not in {
            JobStatus.SUCCEEDED,
            JobStatus.FAILED,
            JobStatus.STOPPED,
        }:
            assert time.time() < deadline, "the job did not end within 25 minutes"
            time.sleep(2)
        ended = time.time()
        assert client.get_job_status(sid) == JobStatus.SUCCEEDED, client.get_job_logs(sid)[-5000:]

        # The same data as a local run (fused_run: the same config on the test's own Ray).
        stages = ["prepare", "align_fuse", *(f"extract/{m.name}" for m in cfg.models)]
        on_cluster = _manifests(lambda rel: storage.read_bytes(f"{base}/run/{rel}"), stages)
        local = _manifests(lambda rel: (fused_run / rel).read_bytes(), stages)
        assert _checksums(on_cluster) == _checksums(local)
        for m in cfg.sources:
            assert (
                storage.read_bytes(f"{base}/run/vocab_map/{m.name}.parquet")
                == (fused_run / "vocab_map" / f"{m.name}.parquet").read_bytes()
            )
        for stage in ("train", "evaluate"):
            assert storage.exists(f"{base}/run/{stage}/_SUCCESS"), stage

        # Every group was launched on demand, and every node went once idle. Ray Train keeps
        # asking the autoscaler for its workers' resources until its request expires (180 s
        # after the last renewal, ray.train.v2 AUTOSCALING_REQUESTS_EXPIRE_TIME_S): the
        # training node may only go idle after that.
        deadline = time.time() + TRAIN_REQUEST_EXPIRY_S + idle_timeout + 60
        while True:
            events = _events(head)
            launched, removed = _counts(events, ADDING), _counts(events, REMOVING)
            if (removed == launched and launched) or time.time() > deadline:
                break
            time.sleep(2)
        report = "\n".join(f"  {t - started:7.1f} s  {m}" for t, m in events)
        print(f"\njob {ended - started:.1f} s; autoscaler events since submission:\n{report}")
        Path(head.temp_dir + ".events.txt").write_text(f"job {ended - started:.1f} s\n{report}\n")
        assert set(launched) == {"cpu", "gpu_extract", "gpu_train"}, report
        assert removed == launched, report
        # Each node went because it was idle; the only other reason allowed is the
        # autoscaler taking back a node it launched over a group's max_workers in a race.
        idle: Counter[str] = Counter()
        for _, msg in events:
            for m in REMOVING.finditer(msg):
                assert m.group(3) in {"idle", "max_workers_per_type"}, report
                idle[m.group(2)] += int(m.group(1)) if m.group(3) == "idle" else 0
        assert set(idle) == set(launched) and min(idle.values()) >= 1, report
        first = {
            kind: min(t for t, msg in events if f"of type {kind}" in msg and "Adding" in msg)
            for kind in launched
        }
        # On demand: the CPU group for prepare first, the GPUs for extract next, training last.
        assert first["cpu"] <= first["gpu_extract"] <= first["gpu_train"], report

        # Every address the autoscaler wrote down is this machine's loopback.
        logs = Path(head.temp_dir, "session_latest", "logs")
        text = "".join(p.read_text(errors="replace") for p in logs.glob("monitor*"))
        assert "Adding 1 node(s) of type gpu_train" in text
        assert set(IPV4.findall(text)) <= {"127.0.0.1"}, set(IPV4.findall(text))
    finally:
        storage.configure(StorageConfig())
