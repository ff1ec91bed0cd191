"""Shared fixtures: a real local Ray, a real S3 server on 127.0.0.1, the tiny model kit."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.s3server import ACCESS_KEY, SECRET_KEY, S3Server, start_s3_server

# Before Ray starts: its workers inherit this environment, and nothing set later reaches them.
# The credentials are the test server's own; no test ever talks to real AWS.
os.environ["AWS_ACCESS_KEY_ID"] = ACCESS_KEY
os.environ["AWS_SECRET_ACCESS_KEY"] = SECRET_KEY
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
os.environ.pop("AWS_PROFILE", None)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def ray_local() -> Iterator[Any]:
    """One local Ray for the whole session (about 4 s to start)."""
    from fusion_etl.config import RayConfig
    from fusion_etl.ray_utils import init_ray

    ray = init_ray(RayConfig(num_cpus=2, object_store_memory_mb=256))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = start_s3_server(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


@pytest.fixture(params=["local", "s3"])
def storage_root(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Any]]:
    """(root URL, StorageConfig) for a fresh empty place: a temp folder, or a prefix on S3."""
    from fusion_etl import storage
    from fusion_etl.config import StorageConfig

    if request.param == "local":
        options = StorageConfig()
        root = str(tmp_path / "store")
    else:
        server: S3Server = request.getfixturevalue("s3_server")
        options = StorageConfig(endpoint_url=server.endpoint_url)
        root = f"s3://{server.bucket}/{uuid.uuid4().hex[:12]}"
    storage.configure(options)
    yield root, options
    storage.configure(StorageConfig())


@pytest.fixture(scope="session")
def test_kit(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tiny model kit in its `test` size (seconds to build)."""
    from fusion_etl.kit import build_kit

    return build_kit(tmp_path_factory.mktemp("kit"), size="test", seed=0)


def kit_config(kit: Any, run_dir: Path | str, *overrides: str) -> Any:
    """A pipeline config over the test kit: its target and sources, small blocks, transformers."""
    from fusion_etl.config import parse_config

    data = {
        "run_dir": str(run_dir),
        "target": {"name": "target", "path": str(kit.target.path)},
        "sources": [{"name": m.name, "path": str(m.path)} for m in kit.sources],
        # 38 documents in 4 files: 4 shards, some spanning two files, some files split.
        "prepare": {"input": str(kit.corpus_dir), "block_size": 256, "shard_docs": 12},
        "extract": {"backend": "transformers", "dtype": "float32", "top_k": 5},
        "align_fuse": {"row_group_docs": 16},
        "train": {
            "block_size": 64,
            "micro_batch": 4,
            "num_workers": 2,
            "lr": 1e-3,
            "warmup_ratio": 0.1,
            "checkpoint_every": 5,
        },
        "evaluate": {"input": str(kit.heldout_dir)},
        "ray": {"num_cpus": 2},
    }
    return parse_config(data, list(overrides))


@pytest.fixture(scope="session")
def extracted_run(ray_local: Any, test_kit: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder with prepare and extract done on the test kit (copy it before writing),
    staged: one model after the other, the reference that other schedules must equal."""
    from fusion_etl.runner import run_stage
    from fusion_etl.stages.extract import ExtractStage
    from fusion_etl.stages.prepare import PrepareStage

    run_dir = tmp_path_factory.mktemp("extracted")
    cfg = kit_config(test_kit, run_dir, "ray.schedule=staged")
    assert run_stage(PrepareStage(), cfg).complete
    assert run_stage(ExtractStage(), cfg).complete
    return run_dir


@pytest.fixture(scope="session")
def fused_run(extracted_run: Path, test_kit: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder with prepare, extract and align_fuse done (copy it before writing)."""
    import shutil

    from fusion_etl.runner import run_stage
    from fusion_etl.stages.align_fuse import AlignFuseStage

    run_dir = tmp_path_factory.mktemp("fused") / "run"
    for stage in ("prepare", "extract"):
        shutil.copytree(extracted_run / stage, run_dir / stage)
    assert run_stage(
        AlignFuseStage(), kit_config(test_kit, run_dir, "ray.schedule=staged")
    ).complete
    return run_dir
