"""A real multi-node Ray cluster on 127.0.0.1 for tests: `ray start` processes the test owns.

Each node is a `ray start --block` in its own process group, so a test can remove one node
(SIGKILL of that group: its raylet and its workers) and tear down exactly what it started,
never another session's Ray.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

__all__ = ["RayCluster", "free_ports"]

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
    """A block of 200 ports below the kernel's ephemeral range (where free ports come from)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    return 10000 + secrets.randbelow(max(1, (low - 10200) // 200)) * 200


@dataclass
class RayCluster:
    """Start with `start_head`, add nodes with `add_node`, remove one with `kill_node`."""

    temp_dir: str = field(default_factory=lambda: f"/tmp/fe-{secrets.token_hex(3)}")
    nodes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    gcs_port: int = 0
    _worker_base: int = field(default_factory=_worker_port_base)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def _env(self) -> dict[str, str]:
        env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            # Notice a lost node within seconds, not the default half minute.
            "RAY_health_check_initial_delay_ms": "1000",
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_timeout_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
        }
        env.pop("RAY_ADDRESS", None)
        return env

    def _launch(self, args: list[str]) -> subprocess.Popen[bytes]:
        n = len(self.nodes)
        log = open(f"{self.temp_dir}-node{n}.log", "wb")  # noqa: SIM115 - the process owns it
        base = self._worker_base + 100 * n
        node_manager, object_manager, agent_listen, agent_grpc, runtime_env, metrics = free_ports(6)
        cmd = [
            str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1",
            f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
            f"--dashboard-agent-listen-port={agent_listen}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
            f"--min-worker-port={base}", f"--max-worker-port={base + 99}",
            "--disable-usage-stats", *args,
        ]  # fmt: skip
        proc = subprocess.Popen(
            cmd, env=self._env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.nodes.append(proc)
        return proc

    def start_head(self, num_cpus: float) -> None:
        (self.gcs_port,) = free_ports(1)
        self._launch(
            [
                "--head",
                f"--port={self.gcs_port}",
                f"--num-cpus={num_cpus}",
                "--include-dashboard=false",
                f"--temp-dir={self.temp_dir}",
                "--object-store-memory=134217728",
            ]
        )
        self.wait_for_nodes(1)

    def add_node(self, num_cpus: float) -> subprocess.Popen[bytes]:
        proc = self._launch(
            [
                f"--address={self.address}",
                f"--num-cpus={num_cpus}",
                "--object-store-memory=134217728",
            ]
        )
        self.wait_for_nodes(len(self.nodes))
        return proc

    def wait_for_nodes(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self._raylets() < n:
            for proc in self.nodes:
                if proc.poll() is not None:
                    raise RuntimeError(f"a ray node exited: see {self.temp_dir}-node*.log")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{n} raylets did not start within {timeout} s")
            time.sleep(0.5)

    def _members(self, node: subprocess.Popen[bytes]) -> list[tuple[int, str]]:
        """(pid, command line) of every process in `node`'s process group."""
        try:
            pgid = os.getpgid(node.pid)
        except ProcessLookupError:
            return []
        out = []
        for p in psutil.process_iter(["cmdline", "pid"]):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getpgid(p.info["pid"]) == pgid:
                    out.append((int(p.info["pid"]), " ".join(p.info["cmdline"] or [])))
        return out

    def _raylets(self) -> int:
        return sum(
            any("raylet" in cmd and "--node_manager_port" in cmd for _, cmd in self._members(n))
            for n in self.nodes
        )

    def busy_workers(self, node: subprocess.Popen[bytes], name: str) -> int:
        """Worker processes of `node` running a task called `name`."""
        return sum(cmd.startswith(f"ray::{name}") for _, cmd in self._members(node))

    def kill_node(self, node: subprocess.Popen[bytes]) -> None:
        """The node is lost: its raylet and every worker on it die at once."""
        os.killpg(node.pid, signal.SIGKILL)
        node.wait()

    def shutdown(self) -> None:
        members = [pid for node in self.nodes for pid, _ in self._members(node)]
        for proc in reversed(self.nodes):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.nodes:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        # Processes of this cluster only: its nodes' groups, and anything under its temp dir.
        for p in psutil.process_iter(["cmdline", "pid"]):
            if p.info["pid"] in members or self.temp_dir in " ".join(p.info["cmdline"] or []):
                with contextlib.suppress(psutil.Error):
                    p.kill()
