"""Starting or joining Ray with settings that work on small machines and on clusters."""

from __future__ import annotations

import os
from typing import Any

from fusion_etl.config import RayConfig

__all__ = ["init_ray"]


def init_ray(cfg: RayConfig) -> Any:
    """Join the configured cluster (or `RAY_ADDRESS`), else start a local Ray; returns `ray`."""
    # These must be set before `import ray`: environment set after ray.init never reaches the
    # workers. Without the first, a local Ray binds every interface and advertises the
    # machine's routable address.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if not address:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    if ray.is_initialized():
        return ray
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(
            num_cpus=cfg.num_cpus,
            include_dashboard=False,
            object_store_memory=cfg.object_store_memory_mb * 2**20,
            log_to_driver=True,
        )
    return ray
