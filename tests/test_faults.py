"""Faults on a real local Ray: hung shards, leases and two runs on one run_dir."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from fusion_etl import manifest, storage
from fusion_etl.config import PipelineConfig, parse_config
from fusion_etl.errors import LeaseHeldError, UserError
from fusion_etl.manifest import read_manifest
from fusion_etl.runner import run_stage
from fusion_etl.stages.prepare import PrepareStage
from fusion_etl.testing import (
    HANGING_SHARD,
    TestHangForeverOnTasksStage,
    TestHangOnceOnActorsStage,
    TestHangOnceOnTasksStage,
)
from tests.conftest import kit_config


def _bare_cfg(run_dir: Path, *overrides: str) -> PipelineConfig:
    data = {"run_dir": str(run_dir), "target": {"name": "t", "path": str(run_dir / "none")}}
    return parse_config(data, ["ray.num_cpus=2", *overrides])


# --------------------------------------------------------------------------------------------
# A hung shard.


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage", [TestHangOnceOnTasksStage(), TestHangOnceOnActorsStage()], ids=["tasks", "actors"]
)
def test_hung_shard_is_killed_and_retried(
    ray_local: Any, tmp_path: Path, capfd: pytest.CaptureFixture[str], stage: Any
) -> None:
    cfg = _bare_cfg(tmp_path, "ray.shard_timeout_s=4")
    started = time.monotonic()
    result = run_stage(stage, cfg)
    elapsed = time.monotonic() - started
    assert result.complete and result.ran == 4
    err = capfd.readouterr().err
    kind = "actor" if stage.actors else "task"
    assert re.search(
        rf"\[fusion-etl\] test_hang: shard {HANGING_SHARD} did not finish within "
        rf"ray\.shard_timeout_s=4 s; killed its {kind} and retrying \(attempt 2 of 3\)",
        err,
    ), err[-2000:]
    assert elapsed >= 4
    # It hung once (one marker) and the retry wrote it; every shard holds its own row.
    assert len(storage.list_files(str(tmp_path / "_test_hang"))) == 1
    m = read_manifest(cfg.stage_url("test_hang"), stage="test_hang")
    assert [pq.read_table(u).column("index").to_pylist() for u in m.shard_urls()] == [
        [0],
        [1],
        [2],
        [3],
    ]


@pytest.mark.slow
def test_shard_that_always_hangs_stops_the_stage_after_its_attempts(
    ray_local: Any, tmp_path: Path
) -> None:
    cfg = _bare_cfg(tmp_path, "ray.shard_timeout_s=2", "ray.shard_attempts=2")
    with pytest.raises(
        UserError,
        match=rf"test_hang: shard {HANGING_SHARD} did not finish within ray\.shard_timeout_s=2 s "
        r"on each of its 2 attempts \(ray\.shard_attempts\); .*raise ray\.shard_timeout_s",
    ):
        run_stage(TestHangForeverOnTasksStage(), cfg)
    assert len(storage.list_files(str(tmp_path / "_test_hang"))) == 2
    assert not storage.exists(storage.join(cfg.stage_url("test_hang"), manifest.SUCCESS))


# --------------------------------------------------------------------------------------------
# The lease, on a temp folder and on the S3 server.


def test_lease_refuses_a_second_holder_and_is_released(storage_root: tuple[str, Any]) -> None:
    root, _ = storage_root
    out = storage.join(root, "stage")
    with manifest.stage_lease(out, stage="demo", fingerprint="f1", ttl_s=30) as lease:
        assert manifest.lease_holder(out) is not None
        with pytest.raises(
            LeaseHeldError,
            match=rf"demo: {re.escape(out)} is in use by another fusion-etl run \(pid {os.getpid()} "
            rf"on {re.escape(socket.gethostname())}, .*its lease expires in \d+ s\)",
        ):
            manifest.acquire_lease(out, stage="demo", fingerprint="f2", ttl_s=30)
        lease.check()
    assert manifest.lease_holder(out) is None
    assert not storage.exists(manifest.lease_url(out))
    # The lease lives beside the folder: replacing the folder (--overwrite) keeps it.
    assert manifest.lease_url(out) == storage.join(root, "_leases", "stage.json")
    with (
        pytest.raises(RuntimeError, match="boom"),
        manifest.stage_lease(out, stage="demo", fingerprint="f1", ttl_s=30),
    ):
        raise RuntimeError("boom")
    assert not storage.exists(manifest.lease_url(out))  # released on error too


def _foreign_lease(url: str, **fields: Any) -> None:
    now = time.time()
    record = {"holder": "someone-else", "host": "other-host", "pid": 1, "acquired": now - 5}
    storage.write_json(url, {**record, **fields})


def test_lease_of_a_dead_holder_expires(
    storage_root: tuple[str, Any], capfd: pytest.CaptureFixture[str]
) -> None:
    root, _ = storage_root
    out = storage.join(root, "stage")
    url = manifest.lease_url(out)
    # Another host, still within its time to live: refused, with how long to wait.
    _foreign_lease(url, expires=time.time() + 40)
    with pytest.raises(LeaseHeldError, match=r"pid 1 on other-host, .*expires in [34]\d s"):
        manifest.acquire_lease(out, stage="demo", fingerprint="f", ttl_s=30)
    # Expired: taken over.
    _foreign_lease(url, expires=time.time() - 1)
    manifest.acquire_lease(out, stage="demo", fingerprint="f", ttl_s=30).release()
    assert "taking over the lease of a run that is gone (it expired)" in capfd.readouterr().err
    # This host, a process that no longer exists: taken over at once, however long its ttl.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _foreign_lease(url, host=socket.gethostname(), pid=gone.pid, expires=time.time() + 600)
    manifest.acquire_lease(out, stage="demo", fingerprint="f", ttl_s=30).release()
    assert f"its process {gone.pid} on this host is gone" in capfd.readouterr().err


def test_lease_is_renewed_and_a_lost_lease_stops_its_holder(storage_root: tuple[str, Any]) -> None:
    root, _ = storage_root
    out = storage.join(root, "stage")
    url = manifest.lease_url(out)
    lease = manifest.acquire_lease(out, stage="demo", fingerprint="f", ttl_s=0.9)
    try:
        first = storage.read_json(url)["expires"]
        time.sleep(1.5)  # several renewals (every ttl/3), and longer than the ttl itself
        assert storage.read_json(url)["expires"] > first + 0.5
        lease.check()  # still ours
        # Someone takes it over (a clock far off, a store without conditional writes): the
        # next renewal notices, and the holder stops before it writes anything more.
        _foreign_lease(url, expires=time.time() + 60)
        time.sleep(0.8)
        with pytest.raises(LeaseHeldError, match=r"lost the lease .*another run took it over"):
            lease.check()
    finally:
        lease.release()
    assert storage.read_json(url)["holder"] == "someone-else"  # not ours to delete


def test_racing_acquirers_get_one_lease(storage_root: tuple[str, Any]) -> None:
    root, _ = storage_root
    for round_ in range(6):
        out = storage.join(root, f"stage{round_}")
        won: list[Any] = []
        refused: list[Exception] = []
        barrier = threading.Barrier(3)

        def take(
            out: str = out,
            barrier: threading.Barrier = barrier,
            won: list[Any] = won,
            refused: list[Exception] = refused,
        ) -> None:
            barrier.wait()
            try:
                won.append(manifest.acquire_lease(out, stage="demo", fingerprint="f", ttl_s=30))
            except LeaseHeldError as exc:
                refused.append(exc)

        threads = [threading.Thread(target=take) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1 and len(refused) == 2, (won, refused)
        won[0].release()


# --------------------------------------------------------------------------------------------
# Two runs on one run_dir, through the real runner.


def _corpus(test_kit: Any, tmp_path: Path, files: int = 30) -> Path:
    """Many small input files: a prepare run that takes a while, one shard at a time."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = [
        json.loads(line)["text"]
        for p in sorted(Path(test_kit.corpus_dir).glob("*.jsonl"))
        for line in p.read_text().splitlines()
    ]
    for i in range(files):
        lines = [json.dumps({"text": docs[(i * 7 + j) % len(docs)]}) for j in range(10)]
        (corpus / f"f{i:03d}.jsonl").write_text("\n".join(lines) + "\n")
    return corpus


def _shard_bytes(run_dir: Path) -> dict[str, bytes]:
    m = read_manifest(str(run_dir / "prepare"), stage="prepare")
    return {s.name: (run_dir / "prepare" / s.name).read_bytes() for s in m.shards}


@pytest.mark.slow
def test_two_runs_on_one_run_dir(ray_local: Any, test_kit: Any, tmp_path: Path) -> None:
    corpus = _corpus(test_kit, tmp_path)
    common = (f"prepare.input={corpus}", "ray.max_in_flight=1")
    reference = kit_config(test_kit, tmp_path / "reference", *common)
    assert run_stage(PrepareStage(), reference).complete

    # Two identical runs started at once: one runs, the other is refused by the lease; the
    # result is the same as one clean run (byte-identical shards, one manifest).
    run_dir = tmp_path / "shared"
    cfg = kit_config(test_kit, run_dir, *common)
    outcomes: list[Any] = []
    barrier = threading.Barrier(2)

    def run() -> None:
        barrier.wait()
        try:
            outcomes.append(run_stage(PrepareStage(), cfg))
        except LeaseHeldError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    refused = [o for o in outcomes if isinstance(o, LeaseHeldError)]
    finished = [o for o in outcomes if not isinstance(o, Exception)]
    assert len(refused) == 1 and len(finished) == 1, outcomes
    assert "prepare: " in str(refused[0]) and "is in use by another fusion-etl run" in str(
        refused[0]
    )
    assert finished[0].complete
    assert _shard_bytes(run_dir) == _shard_bytes(tmp_path / "reference")
    assert sorted(p.name for p in (run_dir / "prepare" / "_shards").iterdir()) == sorted(
        f"{n.rsplit('.', 1)[0]}.json" for n in _shard_bytes(run_dir)
    )

    # A run with another configuration, even with --overwrite, while the first one runs: refused,
    # and the first one's output is untouched.
    changed = kit_config(test_kit, run_dir, *common, "prepare.block_size=200")
    storage.remove(str(run_dir / "prepare"))
    first: list[Any] = []
    runner = threading.Thread(target=lambda: first.append(run_stage(PrepareStage(), cfg)))
    runner.start()
    deadline = time.monotonic() + 120
    while manifest.lease_holder(str(run_dir / "prepare")) is None:
        assert time.monotonic() < deadline and runner.is_alive(), "the first run never started"
        time.sleep(0.05)
    with pytest.raises(LeaseHeldError, match="is in use by another fusion-etl run"):
        run_stage(PrepareStage(), changed, overwrite=True)
    runner.join()
    assert first[0].complete
    assert _shard_bytes(run_dir) == _shard_bytes(tmp_path / "reference")
    # Once it is done, the other configuration replaces it (with --overwrite, as always).
    assert run_stage(PrepareStage(), changed, overwrite=True).complete
    assert read_manifest(str(run_dir / "prepare"), stage="prepare").fingerprint != (
        read_manifest(str(tmp_path / "reference" / "prepare"), stage="prepare").fingerprint
    )


# --------------------------------------------------------------------------------------------
# The driver killed (SIGKILL) in the middle of extract, align_fuse and evaluate.


def _job_file(cfg: PipelineConfig, path: Path) -> Path:
    from fusion_etl.config import to_dict

    data = to_dict(cfg)
    path.write_text(json.dumps({k: v for k, v in data.items() if v is not None}))
    return path


def _popen(*args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "fusion_etl", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the kill takes its local Ray down too
    )


def _kill_group(proc: subprocess.Popen[str]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _settled(count: Any) -> int:
    """`count()` once it has not changed for 3 s: a worker busy when the driver died may still
    finish its shard (atomically) until Ray's reaper ends it."""
    last, since = -1, time.monotonic()
    while time.monotonic() - since < 3.0:
        now = int(count())
        if now != last:
            last, since = now, time.monotonic()
        time.sleep(0.1)
    return last


def _records(folder: Path) -> list[tuple[str, int, str]]:
    m = read_manifest(str(folder), stage="x")
    return [(s.name, s.rows, s.sha256) for s in m.shards]


def _doc_ids(folder: Path) -> list[str]:
    m = read_manifest(str(folder), stage="x")
    return [
        d
        for u in m.shard_urls()
        for d in pq.read_table(u, columns=["doc_id"]).column(0).to_pylist()
    ]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["extract", "align_fuse"])
def test_killed_driver_resumes_to_identical_output(
    stage: str, extracted_run: Path, fused_run: Path, test_kit: Any, tmp_path: Path
) -> None:
    import shutil

    run_dir = tmp_path / "run"
    upstream = ["prepare"] if stage == "extract" else ["prepare", "extract"]
    for name in upstream:
        shutil.copytree(extracted_run / name, run_dir / name)
    # One shard in flight at a time, so the kill lands between commits.
    job = _job_file(kit_config(test_kit, run_dir, "ray.max_in_flight=1"), tmp_path / "job.yaml")
    reference = extracted_run if stage == "extract" else fused_run
    folders = (
        [Path("extract") / m for m in ("target", "src_llama", "src_neox", "src_gpt2")]
        if stage == "extract"
        else [Path("align_fuse")]
    )
    first = run_dir / folders[0] / "_shards"

    proc = _popen("run", stage, "--config", str(job), cwd=tmp_path)
    deadline = time.monotonic() + 600
    while not (first.exists() and any(first.iterdir())):
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert time.monotonic() < deadline, "no shard was committed in time"
        time.sleep(0.02)
    _kill_group(proc)
    committed = _settled(
        lambda: sum(
            len(list((run_dir / f / "_shards").glob("*.json")))
            for f in folders
            if (run_dir / f / "_shards").exists()
        )
    )
    total = sum(len(_records(reference / f)) for f in folders)
    assert not (run_dir / folders[-1] / "_SUCCESS").exists(), "the run finished before the kill"
    assert 1 <= committed < total

    resumed = subprocess.run(
        [sys.executable, "-m", "fusion_etl", "run", stage, "--config", str(job)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "already committed" in resumed.stderr
    for folder in folders:
        assert _records(run_dir / folder) == _records(reference / folder), folder
        ids = _doc_ids(run_dir / folder)
        assert ids == _doc_ids(reference / folder) and len(ids) == len(set(ids)), folder


@pytest.mark.slow
def test_killed_evaluate_resumes_to_identical_results(test_kit: Any, tmp_path: Path) -> None:
    from fusion_etl.stages.evaluate import EvaluateStage

    reference = kit_config(test_kit, tmp_path / "reference")
    assert EvaluateStage().run(reference).complete
    run_dir = tmp_path / "run"
    job = _job_file(kit_config(test_kit, run_dir), tmp_path / "job.yaml")
    proc = _popen("run", "evaluate", "--config", str(job), cwd=tmp_path)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:  # the first model's result: the stage is half-way
        seen.append(line)
        if line.startswith("[fusion-etl] evaluate: target (before):"):
            break
    else:
        raise AssertionError("evaluate never reported a model: " + "".join(seen)[-2000:])
    _kill_group(proc)
    assert (run_dir / "evaluate" / "_stage.json").exists()
    assert not (run_dir / "evaluate" / "_SUCCESS").exists(), "it finished before the kill"

    resumed = subprocess.run(
        [sys.executable, "-m", "fusion_etl", "run", "evaluate", "--config", str(job)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _records(run_dir / "evaluate") == _records(tmp_path / "reference" / "evaluate")
    results = json.loads((run_dir / "evaluate" / "results.json").read_text())["results"]
    names = [r["model"] for r in results]
    assert names == ["target (before)", "src_llama", "src_neox", "src_gpt2"]  # none twice


# --------------------------------------------------------------------------------------------
# A worker node lost under load.


@pytest.mark.slow
def test_lost_worker_node_mid_stage_run_still_succeeds(test_kit: Any, tmp_path: Path) -> None:
    from tests.raycluster import RayCluster

    corpus = _corpus(test_kit, tmp_path, files=24)
    reference = kit_config(
        test_kit, tmp_path / "reference", f"prepare.input={corpus}", "ray.executor=inline"
    )
    assert run_stage(PrepareStage(), reference).complete

    cluster = RayCluster()
    try:
        cluster.start_head(num_cpus=1)
        node = cluster.add_node(num_cpus=2)
        run_dir = tmp_path / "run"
        job = _job_file(
            kit_config(
                test_kit,
                run_dir,
                f"prepare.input={corpus}",
                f"ray.address={cluster.address}",
                "ray.max_in_flight=6",
            ),
            tmp_path / "job.yaml",
        )
        proc = _popen("run", "prepare", "--config", str(job), cwd=tmp_path)
        records = run_dir / "prepare" / "_shards"
        deadline = time.monotonic() + 600
        # Under load: some shards committed and the second node busy with others.
        while not (
            records.exists()
            and len(list(records.iterdir())) >= 3
            and cluster.busy_workers(node, "commit_stream") >= 1
        ):
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "the second node never got work"
            time.sleep(0.02)
        at_loss = len(list(records.iterdir()))
        cluster.kill_node(node)
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, out[-3000:]
        assert at_loss < 24
        assert _shard_bytes(run_dir) == _shard_bytes(tmp_path / "reference")
        ids = [
            d
            for s in sorted((run_dir / "prepare").glob("part-*.parquet"))
            for d in pq.read_table(s, columns=["doc_id"]).column(0).to_pylist()
        ]
        assert len(ids) == len(set(ids)) == read_manifest(str(run_dir / "prepare"), stage="p").rows
    finally:
        cluster.shutdown()


# --------------------------------------------------------------------------------------------
# Nothing a user names can write outside the run prefix.


@pytest.mark.parametrize(
    "override",
    [
        "target.name=..",
        "sources=[{name: ../../elsewhere, path: /m}]",
        "sources=[{name: .hidden, path: /m}]",
        "sources=[{name: _leases, path: /m}]",
        "evaluate.models=[{name: .., path: /m}]",
        "train.run_name=..",
    ],
)
def test_names_cannot_point_outside_the_run(override: str, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"must use letters, digits.*start with a letter or digit"):
        _bare_cfg(tmp_path, override)


def test_derived_paths_stay_below_their_base(tmp_path: Path) -> None:
    base = str(tmp_path / "run")
    for bad in ("..", "../x", "a/../../b", "./x"):
        with pytest.raises(UserError, match=r"a path segment may not be '\.' or '\.\.'"):
            storage.join(base, "extract", bad)
    assert storage.join(base, "extract", "src.v2") == f"{base}/extract/src.v2"
    from fusion_etl.runner import parse_shard_selection

    with pytest.raises(UserError, match="neither a shard name nor an index"):
        parse_shard_selection("../../etc/passwd", ["part-00000.parquet"])
