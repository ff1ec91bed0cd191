"""The `fusion-etl` command (also `python -m fusion_etl`)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

from fusion_etl import console, manifest, storage
from fusion_etl.config import PipelineConfig, load_config, parse_config, to_dict
from fusion_etl.errors import UserError
from fusion_etl.redaction import scrub

__all__ = ["demo_config", "main"]

_EPILOG = """\
Every stage reads its inputs' manifests and writes <run_dir>/<stage>/part-NNNNN.parquet,
a record per shard, then _manifest.json and _SUCCESS. Rerunning does only what is missing;
a run with a changed configuration is refused unless --overwrite is given.
"""


def demo_config(run_dir: str = "runs/demo", *, size: str = "demo", seed: int = 0) -> dict[str, Any]:
    """The embedded default job: the tiny kit's models, local storage, local Ray.

    `jobs/demo.yaml` holds the same job for `ray job submit` (a test keeps them equal).
    """
    kit = f"{run_dir}/kit"
    return {
        "run_dir": run_dir,
        "kit": {"dir": kit, "size": size, "seed": seed},
        "target": {"name": "target", "path": f"{kit}/target"},
        "sources": [
            {"name": "src_llama", "path": f"{kit}/src_llama"},
            {"name": "src_neox", "path": f"{kit}/src_neox"},
            {"name": "src_gpt2", "path": f"{kit}/src_gpt2"},
        ],
        # Pieces of at most block_size - margin tokens (+ EOS) must fit the kit's context;
        # small shards keep several units of work in a tiny corpus.
        "prepare": {
            "input": f"{kit}/corpus",
            "block_size": 512 if size == "demo" else 256,
            "shard_docs": 64 if size == "demo" else 12,
        },
        # Small row groups: the units the training workers shuffle and share out.
        "align_fuse": {"row_group_docs": 16},
        # Tiny models learn at far larger rates than the paper's 1e-5 for 7B models.
        "train": {
            "block_size": 256,
            "micro_batch": 4,
            "num_workers": 2,
            "lr": 1e-3,
            "warmup_ratio": 0.05,
            "checkpoint_every": 20,
        },
        "evaluate": {"input": f"{kit}/heldout"},
    }


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", required=True, metavar="FILE", help="job YAML (see jobs/)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="override config values, e.g. prepare.block_size=1024 run_dir=s3://bucket/run",
    )


def _add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="show Ray's, the workers' and the libraries' own output (progress bars, warnings) "
        "on the console too; by default it goes to a log file under <run_dir>/_logs/",
    )


def _parser() -> argparse.ArgumentParser:
    from fusion_etl.stages import EXTRA_STAGES, STAGES

    stage_list = ", ".join([*STAGES, *EXTRA_STAGES])
    parser = argparse.ArgumentParser(
        prog="fusion-etl",
        description="Knowledge fusion of LLMs (FuseLLM) as a resumable Ray pipeline over object storage.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run one stage or all of them",
        description=f"Run a stage ({stage_list}) or 'all' of the pipeline's in order ({', '.join(STAGES)}; "
        "merge runs only when named). Committed shards are skipped.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("stage", metavar="STAGE", help=f"one of: {stage_list}, all")
    _add_config_args(run)
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="replace output made with a different configuration; stages whose configuration did not change are kept",
    )
    run.add_argument(
        "--until",
        metavar="STAGE",
        help="with 'all': stop after this stage, e.g. --until align_fuse for the data plane only",
    )
    run.add_argument(
        "--shards",
        metavar="SPEC",
        help="only these shards of a single stage: indices, ranges or names, e.g. 0-3,7; the manifest is written once all shards are done",
    )
    _add_verbose(run)

    plan = sub.add_parser(
        "plan",
        help="show what would run and which shards are done",
        description="For each stage: its output, its fingerprint, and how many shards are committed, to run, or refused because the configuration changed.",
    )
    plan.add_argument(
        "--stage", default="all", metavar="STAGE", help=f"one of: {stage_list}, all (default)"
    )
    plan.add_argument(
        "--estimate",
        action="store_true",
        help="print the job's cost instead: per stage documents, tokens per model, shards, work "
        "units, stored bytes and GPU-/CPU-hours, each marked measured, sampled, given, assumed "
        "or estimated (figures in the config's estimate: section); needs no weights and no GPU",
    )
    _add_config_args(plan)

    status = sub.add_parser(
        "status",
        help="read the manifests: shards done, rows, bytes, time",
        description="Summarise every stage's output under a run directory, from its records and manifest.",
    )
    where = status.add_mutually_exclusive_group(required=True)
    where.add_argument("--run-dir", metavar="URL", help="run directory (local path or s3://...)")
    where.add_argument("--config", "-c", metavar="FILE", help="job YAML whose run_dir to read")
    status.add_argument(
        "overrides", nargs="*", metavar="key.sub=value", help="config overrides (with --config)"
    )

    demo = sub.add_parser(
        "demo",
        help="build the tiny models if missing and run the whole pipeline locally",
        description="Build the tiny model kit (three sources of different architectures and tokenizers, one target) under RUN_DIR/kit once, then run every stage on local Ray with RUN_DIR as storage.",
    )
    demo.add_argument(
        "--run-dir",
        default="runs/demo",
        metavar="DIR",
        help="where the kit and outputs go (default: runs/demo)",
    )
    demo.add_argument(
        "--size",
        choices=["demo", "test"],
        default="demo",
        help="kit size: demo (about 2-3 min to build) or test (seconds)",
    )
    demo.add_argument("--seed", type=int, default=0, help="kit seed (default 0)")
    demo.add_argument(
        "--overwrite", action="store_true", help="redo stages whose configuration changed"
    )
    _add_verbose(demo)
    demo.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")

    memory = sub.add_parser(
        "memory",
        help="the training memory plan per worker; exit 2 if it does not fit",
        description="Print, per training worker, the memory of parameters, gradients, optimizer state, "
        "activations (with and without activation checkpointing), logits and the fused-target tensors "
        "for train.micro_batch x train.block_size tokens, and the total against train.gpu_memory_gib "
        "(default: the memory of train.accelerator_type, else 80 GiB). Needs only the target's "
        "config.json: no storage, no sources, no weights. Exit 0 if the plan fits, 2 (naming the "
        "fixes) if not; `run train`, `run all` and `submit` refuse such a plan before starting.",
    )
    _add_config_args(memory)

    jid = sub.add_parser(
        "job-id",
        help="print the deterministic Ray submission id of a stage and config",
        description="Print the submission id that `fusion-etl submit` uses: the same stage and resolved config always give the same id, so `ray job submit --submission-id` refuses a second submission.",
    )
    jid.add_argument("stage", metavar="STAGE", help=f"one of: {stage_list}, all")
    _add_config_args(jid)
    jid.add_argument("--overwrite", action="store_true", help="the id of the run with --overwrite")

    submit = sub.add_parser(
        "submit",
        help="submit `fusion-etl run STAGE` to a Ray cluster as a job",
        description="Submit `fusion-etl run STAGE --config FILE ...` through the Ray Jobs API with a deterministic submission id. A job with the same id that is pending, running or succeeded is not submitted again; after a failed or stopped one the next attempt gets a numbered id and resumes from what was committed.",
    )
    submit.add_argument("stage", metavar="STAGE", help=f"one of: {stage_list}, all")
    _add_config_args(submit)
    submit.add_argument("--overwrite", action="store_true", help="pass --overwrite to the run")
    submit.add_argument(
        "--address",
        metavar="URL",
        help=f"Ray dashboard address (default: $RAY_ADDRESS, else {'http://127.0.0.1:8265'})",
    )
    submit.add_argument(
        "--runtime-env",
        metavar="FILE",
        default=None,
        help="runtime_env YAML (default: jobs/runtime_env.yaml when present)",
    )
    submit.add_argument(
        "--working-dir", metavar="DIR", default=".", help="code to ship with the job (default: .)"
    )
    submit.add_argument(
        "--wait",
        action="store_true",
        help="follow the job's output until it ends; exit 0 only if it succeeded",
    )
    _add_verbose(submit)

    sub.add_parser(
        "bench",
        help="benchmarks, measured side by side and printed as ratios (fusion-etl bench --help)",
        add_help=False,
    )
    return parser


def _run(
    cfg: PipelineConfig,
    stage: str,
    *,
    overwrite: bool,
    shards: str | None,
    until: str | None = None,
    show_results: bool = True,
) -> int:
    from fusion_etl.pipeline import run_stages, stage_names

    names = stage_names(stage, until)
    if shards is not None and stage == "all":
        raise UserError("--shards needs a single stage, not 'all'")
    if "train" in names:
        from fusion_etl.stages.train import check_memory

        check_memory(cfg)  # before any work: a plan that cannot fit is refused up front
    started = time.monotonic()
    if not run_stages(cfg, names, overwrite=overwrite, shards=shards):
        return 0 if shards is not None else 1
    print(f"done in {time.monotonic() - started:.1f} s: {', '.join(names)} -> {cfg.run_dir}")
    if show_results and "evaluate" in names:
        _print_results(cfg)
    return 0


def _print_results(cfg: PipelineConfig) -> None:
    """The evaluation table, last on the console."""
    url = storage.join(cfg.stage_url("evaluate"), "results.md")
    if storage.exists(url):
        print("\n" + storage.read_bytes(url).decode().rstrip())


def _plan(cfg: PipelineConfig, stage: str) -> int:
    from fusion_etl.pipeline import stage_names
    from fusion_etl.stages import WholeStage, get_stage, is_whole, lookup

    storage.configure(cfg.storage)
    for name in stage_names(stage):
        whole = lookup(name)
        try:
            if is_whole(whole):
                out, fp, _ = cast(WholeStage, whole).describe(cfg)
                _print_plan(name, out, fp, None)
                continue
            plans = get_stage(name).plan(cfg)
        except UserError as exc:
            print(f"{name}: cannot plan yet: {exc}")
            continue
        for plan in plans:
            _print_plan(name, plan.output, plan.fingerprint, [it.shard for it in plan.items])
    return 0


def _estimate(cfg: PipelineConfig, config_path: str, stage: str) -> int:
    from fusion_etl.estimate import Estimate, estimate, render
    from fusion_etl.pipeline import stage_names

    names = stage_names(stage)
    result = estimate(cfg)
    if stage != "all":
        result = Estimate(
            rows=tuple(r for r in result.rows if r.stage in names),
            notes=result.notes,
            assumptions=result.assumptions,
        )
    print(render(result, title=f"cost estimate: {config_path} (run_dir {cfg.run_dir})"))
    return 0


def _print_plan(name: str, out: str, fp: str, shard_names: list[str] | None) -> None:
    """What `run` would do with one output folder; `shard_names` None for a whole-job stage."""
    state = manifest.stage_state(out)
    if state is None:
        verdict = (
            "new: would run" if shard_names is None else f"new: {len(shard_names)} shards to run"
        )
    elif state.get("fingerprint") != fp:
        verdict = "configuration changed: refused without --overwrite (which replaces this output)"
    elif manifest.is_finished(out, fp):
        verdict = "up to date"
    elif shard_names is None:
        verdict = "interrupted: would resume from its last checkpoint"
    else:
        done = manifest.done_records(out, shard_names)
        verdict = f"resume: {len(done)} of {len(shard_names)} shards committed, {len(shard_names) - len(done)} to run"
    holder = manifest.lease_holder(out)
    if holder is not None:
        verdict += f"; now in use by another run ({holder})"
    print(f"{name}: {verdict}\n  output      {out}\n  fingerprint {fp}")


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _status_line(label: str, url: str) -> bool:
    """Print one output folder's state; False if the stage never started there."""
    state = manifest.stage_state(url)
    if state is None:
        return False
    if storage.exists(storage.join(url, manifest.SUCCESS)):
        m = manifest.read_manifest(url, stage=label)
        secs = sum(s.seconds for s in m.shards)
        print(
            f"{label:<20} complete  {len(m.shards)} shards  {m.rows} rows  {_human_bytes(m.bytes)}  "
            f"{secs:.1f} s of shard work  fingerprint {m.fingerprint}"
        )
    else:
        rec_dir = storage.join(url, manifest.SHARDS_DIR)
        n = len([u for u in storage.list_files(rec_dir) if u.endswith(".json")])
        print(
            f"{label:<20} partial   {n} shards committed, no manifest yet  fingerprint {state.get('fingerprint')}"
        )
    return True


def _status(run_dir: str) -> int:
    from fusion_etl.stages import STAGES

    found = False
    for name in STAGES:
        url = storage.join(run_dir, name)
        if _status_line(name, url):
            found = True
            continue
        # Stages with one output per model (extract/<model>/).
        subs = sorted(
            {
                u.rsplit("/", 2)[-2]
                for u in storage.glob(storage.join(url, "*", manifest.STAGE_FILE))
            }
        )
        for sub in subs:
            found = _status_line(f"{name}/{sub}", storage.join(url, sub)) or found
        if not subs:
            print(f"{name:<20} not started")
    if not found:
        print(f"nothing under {run_dir} yet")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from fusion_etl.kit import build_kit

    cfg = parse_config(demo_config(args.run_dir, size=args.size, seed=args.seed), args.overrides)
    assert cfg.kit is not None
    started = time.monotonic()
    print(f"tiny model kit: {cfg.kit.dir} ({cfg.kit.size}, seed {cfg.kit.seed})", flush=True)
    build_kit(
        cfg.kit.dir,
        size=cfg.kit.size,
        seed=cfg.kit.seed,
        log=lambda m: print(f"  kit: {m}", flush=True),
    )
    print(f"kit ready in {time.monotonic() - started:.1f} s", flush=True)
    code = _run(cfg, "all", overwrite=args.overwrite, shards=None, show_results=False)
    if code == 0:
        _status(cfg.run_dir)
        _print_results(cfg)
    return code


def _remote_urls(cfg: PipelineConfig) -> list[str]:
    """The object-storage URLs of a config (run_dir, inputs, models, checkpoints)."""
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, str) and value.lower().startswith(("s3://", "s3a://")):
            found.append(value)

    walk(to_dict(cfg))
    return list(dict.fromkeys(found))


def _check_storage(cfg: PipelineConfig) -> None:
    """Before any work: every object-storage URL of the config can be reached and listed
    with the configured credentials (one request each), else one error naming what to fix."""
    storage.configure(cfg.storage)
    for url in _remote_urls(cfg):
        storage.check_access(url)


def _log_file(run_dir: str, command: str) -> tuple[Path, str | None]:
    """(local log file, URL to copy it to at the end or None): `<run_dir>/_logs/...`."""
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{command}-{os.getpid()}.log"
    local = storage.local_path(run_dir)
    if local is not None:
        return local / "_logs" / name, None
    spool = Path(tempfile.gettempdir()) / "fusion-etl-logs" / name
    return spool, storage.join(run_dir, "_logs", name)


def _ray_running() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


class _InternalError(Exception):
    """A bug (not the user's mistake): its traceback is in the log file."""


def _routed(run_dir: str, command: str, verbose: bool, body: Callable[[], int]) -> int:
    """Run `body` with the console routed (see `console`): ours on the console, the rest in
    the log file, whose path is printed once."""
    path, upload = _log_file(run_dir, command)
    ray_before = _ray_running()
    try:
        with console.routed_output(path, verbose=verbose):
            where = f"{path} (copied to {upload} at the end)" if upload else str(path)
            console.log(f"log: {where}" + ("" if verbose else "; --verbose shows it here too"))
            try:
                return body()
            except (UserError, KeyboardInterrupt):
                raise
            except Exception as exc:
                traceback.print_exc()  # into the log file
                raise _InternalError(f"{type(exc).__name__}: {exc}; details in {path}") from None
            finally:
                if not ray_before and _ray_running():
                    # Ray forwards workers' lines until it stops: stop it while they still go
                    # to the log file (it would stop at exit anyway).
                    import ray

                    ray.shutdown()
    finally:
        if upload is not None and path.exists():
            with contextlib.suppress(UserError):
                storage.put_file(path, upload)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    root = logging.getLogger()
    if not root.handlers:
        # Library warnings (botocore's, ...) never reach the console as stray lines; `run`
        # sends them to its log file (see console.routed_output).
        root.addHandler(logging.NullHandler())
    if argv[:1] == ["bench"]:
        from fusion_etl.bench import main as bench_main

        return bench_main(argv[1:])
    parser = _parser()
    # Overrides may stand anywhere after the subcommand (`run prepare -c job.yaml a.b=1`);
    # argparse alone binds the positional list before the options and would reject them.
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*getattr(args, "overrides", []), *extra]
    try:
        if args.command == "demo":
            return _routed(args.run_dir, "demo", args.verbose, lambda: _demo(args))
        if args.command == "status":
            if args.run_dir:
                storage.check_access(args.run_dir)
                return _status(args.run_dir)
            cfg = load_config(args.config, args.overrides)
            _check_storage(cfg)
            return _status(cfg.run_dir)
        cfg = load_config(args.config, args.overrides)
        if args.command == "memory":
            from fusion_etl.stages.train import check_memory, train_memory_plan

            print(train_memory_plan(cfg).render())
            check_memory(cfg, breakdown=False)
            return 0
        if args.command in ("job-id", "submit"):
            from fusion_etl.jobs import job_id, submit
            from fusion_etl.pipeline import stage_names

            stage_names(args.stage)
            if args.command == "job-id":
                print(job_id(args.stage, cfg, overwrite=args.overwrite))
                return 0
            if args.stage in ("train", "all"):
                from fusion_etl.stages.train import check_memory

                check_memory(cfg)
            runtime_env = args.runtime_env
            if runtime_env is None and os.path.exists(
                os.path.join(args.working_dir, "jobs", "runtime_env.yaml")
            ):
                runtime_env = os.path.join(args.working_dir, "jobs", "runtime_env.yaml")
            return _routed(
                cfg.run_dir,
                f"submit-{args.stage}",
                args.verbose,
                lambda: submit(
                    args.stage,
                    cfg,
                    config_path=args.config,
                    overrides=args.overrides,
                    overwrite=args.overwrite,
                    address=args.address,
                    runtime_env_path=runtime_env,
                    working_dir=os.path.abspath(args.working_dir),
                    wait=args.wait,
                    verbose=args.verbose,
                ),
            )
        if args.command == "run":
            from fusion_etl.pipeline import stage_names

            if args.shards is not None and args.stage == "all":
                raise UserError("--shards needs a single stage, not 'all'")
            if "train" in stage_names(args.stage, args.until):
                from fusion_etl.stages.train import check_memory

                check_memory(cfg)  # from the config alone: before storage is even dialled
            _check_storage(cfg)
            return _routed(
                cfg.run_dir,
                f"run-{args.stage}",
                args.verbose,
                lambda: _run(
                    cfg, args.stage, overwrite=args.overwrite, shards=args.shards, until=args.until
                ),
            )
        if args.command == "plan":
            if args.estimate:
                # An estimate works from the config alone where storage cannot be reached.
                storage.configure(cfg.storage)
                return _estimate(cfg, args.config, args.stage)
            from fusion_etl.pipeline import stage_names
            from fusion_etl.stages.train import train_memory_plan

            if "train" in stage_names(args.stage):
                # From the config alone: shown even where storage cannot be reached.
                print(train_memory_plan(cfg).render(), flush=True)
            _check_storage(cfg)
            return _plan(cfg, args.stage)
    except UserError as exc:
        # One line, whatever a library put in the message.
        print(scrub("error: " + " ".join(str(exc).split())), file=sys.stderr)
        return 2
    except _InternalError as exc:
        print(scrub(f"error: internal error (a bug, please report it): {exc}"), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "interrupted: committed shards are kept; run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
