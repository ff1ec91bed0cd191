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
