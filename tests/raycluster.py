"""A real `ray start --head --block` for tests: its own ports and temp dir, every address on
127.0.0.1, and a teardown that stops only the processes it started (never `ray stop`, which
stops every Ray on the machine, other sessions' included)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml

__all__ = ["RayHead", "free_ports", "start_head"]

BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    """n distinct free ports (all sockets held open until all are chosen)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _worker_port_base() -> int:
    """A block of 100 ports below the kernel's ephemeral range, where the free ports above
    (and every other client socket) come from, so the two never overlap."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    return 10000 + secrets.randbelow(max(1, (low - 10100) // 100)) * 100


@dataclass
class RayHead:
    proc: subprocess.Popen[bytes]
    temp_dir: str
    gcs_port: int
    address: str
    """The dashboard (Jobs API) URL."""
    log_path: str

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def processes(self) -> list[psutil.Process]:
        """Every live process of this cluster: the head's descendants, and anything started
        under its temp dir (raylets of nodes the autoscaler added, their workers)."""
        found: dict[int, psutil.Process] = {}
        try:
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                found[p.pid] = p
        except psutil.NoSuchProcess:
            pass
        for p in psutil.process_iter(["cmdline"]):
            if self.temp_dir in " ".join(p.info["cmdline"] or []):
                found[p.pid] = p
        return list(found.values())

    def stop(self) -> None:
        mine = self.processes()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        for p in mine + self.processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()


def start_head(
    *,
    num_cpus: int = 2,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    autoscaling: Mapping[str, Any] | None = None,
) -> RayHead:
    """Start a head and wait for its dashboard; `args` and `env` are added to its own.

    With `autoscaling` (a cluster-launcher config of the `fake_multinode` provider), the head
    runs Ray's autoscaler on it, pointed at this head's GCS port, and the nodes it launches are
    local raylet processes under this head's temp dir.
    """
    temp_dir = f"/tmp/fe-{secrets.token_hex(3)}"  # short: Ray's socket paths must stay short
    ports = free_ports(9)
    (
        gcs,
        dashboard,
        client,
        node_manager,
        object_manager,
        agent_listen,
        agent_grpc,
        runtime_env,
        metrics,
    ) = ports
    worker_base = _worker_port_base()
    full_env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        **(env or {}),
    }
    full_env.pop("RAY_ADDRESS", None)
    extra = list(args)
    if autoscaling is not None:
        config = json.loads(json.dumps(autoscaling))
        config["provider"]["gcs_address"] = f"127.0.0.1:{gcs}"
        config_path = f"{temp_dir}.autoscaler.yaml"
        Path(config_path).write_text(yaml.safe_dump(config))
        extra.append(f"--autoscaling-config={config_path}")
        full_env.update({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block",
        "--node-ip-address=127.0.0.1", f"--port={gcs}", f"--num-cpus={num_cpus}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}", f"--node-manager-port={node_manager}",
        f"--object-manager-port={object_manager}", f"--dashboard-agent-listen-port={agent_listen}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
        f"--metrics-export-port={metrics}", f"--min-worker-port={worker_base}",
        f"--max-worker-port={worker_base + 99}", f"--temp-dir={temp_dir}", "--object-store-memory=268435456",
        "--disable-usage-stats", *extra,
    ]  # fmt: skip
    log_path = f"{temp_dir}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    head = RayHead(proc, temp_dir, gcs, f"http://127.0.0.1:{dashboard}", log_path)
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{head.address}/api/version", timeout=2)
            return head
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                head.stop()
                raise RuntimeError(
                    f"ray start failed: {Path(log_path).read_text()[-3000:]}"
                ) from None
            time.sleep(0.5)
