"""Real Ray clusters on 127.0.0.1 for tests: `ray start` processes the test owns.

- `RayCluster`: a head and nodes added and removed by the test. Each node is a
  `ray start --block` in its own session, so a test can remove one node (SIGKILL of every
  process of that session: its raylet and its workers).
- `start_head`: one head with its dashboard (the Jobs API), optionally running Ray's
  autoscaler on the `fake_multinode` provider.

Both use their own ports and temp dir, every address on 127.0.0.1, and a teardown that stops
only the processes they started (never `ray stop`, which stops every Ray on the machine, other
sessions' included).
"""

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

__all__ = ["RayCluster", "RayHead", "free_ports", "start_head"]

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
    """A block of 200 ports below the kernel's ephemeral range, where the free ports above
    (and every other client socket) come from, so the two never overlap."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    return 10000 + secrets.randbelow(max(1, (low - 10200) // 200)) * 200


# `ray start --address` refuses to join a cluster unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1,
# and with it set resolves the 127.0.0.1 in `--address` to the machine's routable address.
# Joining a second node on this machine therefore runs `ray start` with the variable set and
# the resolution pinned to loopback (what it resolves to with the variable unset): every
# address stays on 127.0.0.1.
_JOIN_ON_LOOPBACK = [
    sys.executable,
    "-c",
    "import sys, ray._private.services as s; "
    "s.get_node_ip_address = lambda address=None: '127.0.0.1'; "
    "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; sys.exit(main())",
]


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

    def _launch(self, args: list[str], **env: str) -> subprocess.Popen[bytes]:
        n = len(self.nodes)
        log = open(f"{self.temp_dir}-node{n}.log", "wb")  # noqa: SIM115 - the process owns it
        base = self._worker_base + 100 * n
        node_manager, object_manager, agent_listen, agent_grpc, runtime_env, metrics = free_ports(6)
        cmd = [
            *(_JOIN_ON_LOOPBACK if "--head" not in args else [str(BIN / "ray")]),
            "start", "--block", "--node-ip-address=127.0.0.1",
            f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
            f"--dashboard-agent-listen-port={agent_listen}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
            f"--min-worker-port={base}", f"--max-worker-port={base + 99}",
            "--disable-usage-stats", *args,
        ]  # fmt: skip
        proc = subprocess.Popen(
            cmd,
            env={**self._env(), **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
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
            ],
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1",  # see _JOIN_ON_LOOPBACK
        )
        self.wait_for_nodes(len(self.nodes))
        return proc

    def wait_for_nodes(self, n: int, timeout: float = 180) -> None:
        """Until `n` nodes have registered with the head (as `ray status` lists them)."""
        deadline = time.monotonic() + timeout
        while self.active_nodes() < n:
            for proc in self.nodes:
                if proc.poll() is not None:
                    raise RuntimeError(f"a ray node exited: see {self.temp_dir}-node*.log")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{n} nodes did not join within {timeout} s")
            time.sleep(0.5)

    def active_nodes(self) -> int:
        proc = subprocess.run(
            [str(BIN / "ray"), "status", f"--address={self.address}"],
            capture_output=True,
            text=True,
            env=self._env(),
            timeout=60,
        )
        active = proc.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
        return sum(line.strip().startswith("1 node_") for line in active.splitlines())

    def _members(self, node: subprocess.Popen[bytes]) -> list[tuple[int, str]]:
        """(pid, command line) of every process of `node`: its session (`ray start` runs in a
        session of its own; Ray puts each worker in a process group of its own within it)."""
        out = []
        for p in psutil.process_iter(["cmdline", "pid"]):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getsid(p.info["pid"]) == node.pid:
                    out.append((int(p.info["pid"]), " ".join(p.info["cmdline"] or [])))
        return out

    def busy_workers(self, node: subprocess.Popen[bytes], name: str) -> int:
        """Worker processes of `node` running a task called `name`."""
        return sum(cmd.startswith(f"ray::{name}") for _, cmd in self._members(node))

    def kill_node(self, node: subprocess.Popen[bytes]) -> None:
        """The node is lost: its raylet and every worker on it die at once."""
        for pid, _ in self._members(node):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
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
        # Processes of this cluster only: its nodes' sessions, and anything under its temp dir.
        for p in psutil.process_iter(["cmdline", "pid"]):
            if p.info["pid"] in members or self.temp_dir in " ".join(p.info["cmdline"] or []):
                with contextlib.suppress(psutil.Error):
                    p.kill()


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
            # `ray start --block` does not exit on SIGTERM while its children live (it sat out
            # the whole wait, 30 s, in every test); everything of this cluster is killed below.
            self.proc.wait(timeout=5)
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
