"""`fusion-etl bench pipeline`: the data plane of `run all` on the demo (prepare, extract,
align_fuse; train has its own bench) under each `ray.schedule`, side by side, with identical
outputs checked; and the peak memory of an extract worker on a prepared shard 1x and 10x the
demo's, read and written in runs vs held whole.

Schedules (each a fresh `fusion-etl run all --until align_fuse` process with its own local Ray,
the same settings otherwise):
  staged      one model after the other, then align_fuse (what the runner did before);
  concurrent  every model's extract at once, each with its own actor, then align_fuse;
  pipelined   also align_fuse of a shard as soon as every model has committed it.
All three use a quarter CPU per extract actor and align_fuse task, so that four models'
actors leave room for align_fuse on a small machine (on a cluster they use separate groups).

Memory: an extract worker's code (`runner.commit_shard` of `ExtractStage`) in a fresh process
per measurement, on the target model; peak RSS after loading the model and after the shard.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fusion_etl.bench.common import bench_kit, kit_args

__all__ = ["add_parser", "bench_pipeline"]

SCHEDULES = ("staged", "concurrent", "pipelined")


def _job(kit: Any, args: argparse.Namespace, out: Path) -> Path:
    """The demo job over the bench's kit, as a YAML file."""
    from fusion_etl.cli import demo_config

    data = demo_config(str(out / "run"), size=args.size)
    data.pop("kit")
    data["target"]["path"] = str(kit.target.path)
    for source, model in zip(data["sources"], kit.sources, strict=True):
        source["path"] = str(model.path)
    data["prepare"]["input"] = str(kit.corpus_dir)
    data["evaluate"]["input"] = str(kit.heldout_dir)
    data["extract"] = {"backend": "transformers", "num_cpus": 0.25}
    data["align_fuse"] = {"num_cpus": 0.25}
    path = out / "job.yaml"
    path.write_text(json.dumps(data, indent=1))
    return path


def _checksums(run_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path in sorted(run_dir.glob("**/_manifest.json")):
        data = json.loads(path.read_text())
        out[str(path.parent.relative_to(run_dir))] = (
            data["fingerprint"],
            [(s["name"], s["sha256"]) for s in data["shards"]],
        )
    for path in sorted((run_dir / "vocab_map").glob("*.parquet")):
        out[f"vocab_map/{path.name}"] = path.read_bytes()
    return out


def _span(run_dir: Path) -> float:
    """Seconds from the first extract folder claimed to align_fuse's manifest."""
    started = min(
        json.loads(p.read_text())["started"] for p in run_dir.glob("extract/*/_stage.json")
    )
    done = json.loads((run_dir / "align_fuse" / "_manifest.json").read_text())["created"]
    return float(done - started)


def _schedules(job: Path, out: Path, repeats: int) -> dict[str, list[tuple[float, float]]]:
    times: dict[str, list[tuple[float, float]]] = {s: [] for s in SCHEDULES}
    sums: dict[str, Any] = {}
    for r in range(repeats):
        order = SCHEDULES if r % 2 == 0 else tuple(reversed(SCHEDULES))
        for schedule in order:
            run_dir = out / f"{schedule}-{r}"
            shutil.rmtree(run_dir, ignore_errors=True)
            started = time.perf_counter()
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "fusion_etl",
                    "run",
                    "all",
                    "--until",
                    "align_fuse",
                    "--config",
                    str(job),
                    f"run_dir={run_dir}",
                    f"ray.schedule={schedule}",
                ],
                capture_output=True,
                text=True,
            )
            wall = time.perf_counter() - started
            if proc.returncode != 0:
                raise RuntimeError(f"{schedule}: run failed\n{proc.stderr[-3000:]}")
            times[schedule].append((wall, _span(run_dir)))
            sums[f"{schedule}-{r}"] = _checksums(run_dir)
            print(f"  {schedule} (repeat {r + 1}): {wall:.1f} s", flush=True)
    first = next(iter(sums.values()))
    identical = all(s == first for s in sums.values())
    print(f"  outputs identical across schedules and repeats: {'yes' if identical else 'NO'}")
    if not identical:
        raise RuntimeError("the schedules wrote different outputs")
    return times


def _shards(job: Path, out: Path, factor: int) -> tuple[Path, Path]:
    """The demo's first prepared shard, and that shard `factor` times over (its documents again
    with new ids: the same mix of lengths, so only the shard's size differs)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fusion_etl.schema import PREPARE, write_parquet

    run_dir = out / "prepared"
    if not (run_dir / "prepare" / "_SUCCESS").exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "fusion_etl",
                "run",
                "prepare",
                "--config",
                str(job),
                f"run_dir={run_dir}",
                "ray.executor=inline",
            ],
            check=True,
            capture_output=True,
        )
    one = pq.read_table(sorted((run_dir / "prepare").glob("part-*.parquet"))[0]).cast(PREPARE)
    ids = one.column("doc_id").to_pylist()
    big = pa.concat_tables(
        [
            one.set_column(0, "doc_id", pa.array([f"x{r}/{d}" for d in ids], pa.string()))
            for r in range(factor)
        ]
    ).cast(PREPARE)
    folder = out / "memory"
    folder.mkdir(parents=True, exist_ok=True)
    paths = (folder / "shard-1x.parquet", folder / f"shard-{factor}x.parquet")
    for path, table in zip(paths, (one, big), strict=True):
        write_parquet(
            str(path),
            PREPARE,
            (table.slice(i, 1024) for i in range(0, table.num_rows, 1024)),
            lambda: {},
        )
    return paths


def _worker(spec_path: str) -> None:
    """One measurement in this fresh process: load the model, then commit one shard."""
    from fusion_etl import storage
    from fusion_etl.config import load_config
    from fusion_etl.models import require_local_model
    from fusion_etl.runner import WorkItem, commit_shard
    from fusion_etl.stages.extract import ExtractStage, _scorer

    spec = json.loads(Path(spec_path).read_text())
    cfg = load_config(spec["job"], [f"extract.docs_per_call={spec['docs_per_call']}"])
    storage.configure(cfg.storage)
    import torch

    from fusion_etl.backends.dtypes import resolve_dtype

    # What extract's driver resolves for an actor on this device (it plans it, the worker
    # checks it).
    dtype = resolve_dtype(cfg.extract.dtype, device="cuda" if torch.cuda.is_available() else "cpu")
    _scorer(require_local_model(cfg.target), "transformers", cfg.extract, dtype)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    item = WorkItem(
        shard="part-00000.parquet",
        inputs=(spec["shard"],),
        payload={"model": cfg.target.name, "backend": "transformers", "dtype": dtype},
    )
    record = commit_shard(cfg, ExtractStage(), spec["out"], item)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"loaded": loaded, "peak": peak, "rows": record.rows, **record.stats}))


def _measure(job: Path, shard: Path, docs_per_call: int, out: Path) -> dict[str, float]:
    folder = out / "memory" / f"{shard.stem}-{docs_per_call}"
    shutil.rmtree(folder, ignore_errors=True)
    spec = folder / "spec.json"
    folder.mkdir(parents=True)
    spec.write_text(
        json.dumps(
            {
                "job": str(job),
                "shard": str(shard),
                "docs_per_call": docs_per_call,
                "out": str(folder / "extract"),
            }
        )
    )
    proc = subprocess.run(
        [sys.executable, "-m", "fusion_etl.bench.pipeline", "_worker", str(spec)],
        capture_output=True,
        text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker failed\n{proc.stderr[-3000:]}")
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def bench_pipeline(args: argparse.Namespace) -> int:
    kit = bench_kit(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    job = _job(kit, args, out)
    if args.part in ("all", "schedules"):
        _print_schedules(job, out, args)
    if args.part in ("all", "memory"):
        _print_memory(job, out, args)
    return 0


def _print_schedules(job: Path, out: Path, args: argparse.Namespace) -> None:
    print(f"data plane of `run all` on the {args.size} kit ({args.repeats} repeat(s) each)")
    times = _schedules(job, out, args.repeats)
    base_wall = statistics.median(w for w, _ in times["staged"])
    base_span = statistics.median(s for _, s in times["staged"])
    print("\n| schedule | wall s (process) | vs staged | extract→align_fuse s | vs staged |")
    print("|---|---|---|---|---|")
    for schedule in SCHEDULES:
        wall = statistics.median(w for w, _ in times[schedule])
        span = statistics.median(s for _, s in times[schedule])
        print(
            f"| {schedule} | {wall:.1f} | {wall / base_wall:.2f}x | {span:.1f} | {span / base_span:.2f}x |"
        )


def _print_memory(job: Path, out: Path, args: argparse.Namespace) -> None:
    factor = args.factor
    small, big = _shards(job, out, factor)
    print(f"\npeak memory of an extract worker (target model), runs of {args.run_docs} documents")
    print("vs the whole shard in one run")
    print("\n| shard | documents | tokens | runs of | peak MiB | above model load MiB |")
    print("|---|---|---|---|---|---|")
    above: dict[tuple[str, str], float] = {}
    for label, shard in (("1x", small), (f"{factor}x", big)):
        import pyarrow.parquet as pq

        rows = pq.ParquetFile(shard).metadata.num_rows
        for mode, dpc in (("streamed", args.run_docs), ("whole", 10**9)):
            m = _measure(job, shard, dpc, out)
            above[(label, mode)] = m["peak"] - m["loaded"]
            runs = f"{args.run_docs} docs" if mode == "streamed" else "whole shard"
            print(
                f"| {label} | {rows} | {int(m['tokens'])} | {runs} | {m['peak']:.0f} | "
                f"{m['peak'] - m['loaded']:.0f} |",
                flush=True,
            )
    for mode in ("streamed", "whole"):
        grow = above[(f"{factor}x", mode)] - above[("1x", mode)]
        print(f"{mode}: {factor}x shard holds {grow:+.0f} MiB more than the 1x shard")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "pipeline",
        help="run all (to align_fuse) staged vs every model at once vs pipelined; extract worker memory vs shard size",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    kit_args(p)
    p.add_argument(
        "--out", default="runs/bench/pipeline", help="work folder (default runs/bench/pipeline)"
    )
    p.add_argument(
        "--repeats", type=int, default=1, help="runs per schedule, median reported (default 1)"
    )
    p.add_argument(
        "--factor", type=int, default=10, help="size of the large shard in demo shards (default 10)"
    )
    p.add_argument(
        "--run-docs",
        type=int,
        default=32,
        help="documents per run in the streamed measurement (default 32)",
    )
    p.add_argument(
        "--part",
        choices=["all", "schedules", "memory"],
        default="all",
        help="both measurements (default), or only the schedules or the worker memory",
    )
    p.set_defaults(run=bench_pipeline)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_worker":
        _worker(sys.argv[2])
