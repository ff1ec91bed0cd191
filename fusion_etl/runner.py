"""Plan a stage, skip committed shards, run the rest on Ray, commit the manifest.

A stage is any object with a `name`, a `plan(cfg)` that lists its work items and a
`process(cfg, item)` that turns one item into one Arrow table. Everything about storage,
records, retries, progress and the manifest lives here, once.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol

import pyarrow as pa

from fusion_etl import manifest, storage
from fusion_etl.config import PipelineConfig
from fusion_etl.console import StageProgress, log
from fusion_etl.errors import UserError
from fusion_etl.manifest import ShardRecord
from fusion_etl.schema import parquet_bytes, write_parquet

__all__ = [
    "ActorPool",
    "PlanRun",
    "RunResult",
    "ShardOutput",
    "Stage",
    "StagePlan",
    "WorkItem",
    "combine",
    "log",
    "make_plan",
    "parse_shard_selection",
    "run_plans",
    "run_stage",
]


@dataclass(frozen=True)
class WorkItem:
    """One unit of work and of commit: produces exactly the shard `shard`."""

    shard: str
    inputs: tuple[str, ...]
    payload: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StagePlan:
    """What a stage would do for a config."""

    stage: str
    output: str
    fingerprint: str
    identity: Mapping[str, Any]
    """Everything the fingerprint hashes (recorded, and diffed to explain a refusal)."""
    config: Mapping[str, Any]
    """Resolved config to record in `_stage.json` and `_manifest.json`, secrets redacted."""
    inputs: Mapping[str, str]
    """Upstream stage URL -> fingerprint."""
    items: tuple[WorkItem, ...]


def make_plan(
    stage: str,
    cfg: PipelineConfig,
    *,
    output: str,
    identity: Mapping[str, Any],
    inputs: Mapping[str, str],
    items: tuple[WorkItem, ...],
) -> StagePlan:
    """A plan whose fingerprint is the hash of `identity` and whose recorded config is `cfg`
    with secrets redacted."""
    from fusion_etl.config import fingerprint, redact, to_dict

    return StagePlan(
        stage=stage,
        output=output,
        fingerprint=fingerprint(identity),
        identity=identity,
        config=redact(to_dict(cfg)),
        inputs=inputs,
        items=items,
    )


@dataclass(frozen=True)
class ShardOutput:
    """What `process` returns for one item: a whole `table`, or `batches` of `schema` that are
    written one row group at a time (bounded memory). With `batches`, `stats` and `metadata`
    are read only after the last batch, so the generator may fill them in as it goes."""

    table: pa.Table | None = None
    stats: Mapping[str, int] = field(default_factory=dict)
    metadata: Mapping[str, str] = field(default_factory=dict)
    batches: Iterable[pa.Table] | None = None
    schema: pa.Schema | None = None


@dataclass(frozen=True)
class ActorPool:
    """Run a plan's shards on long-lived actors (a model loads once per actor, not per shard)."""

    size: int
    options: Mapping[str, Any]
    """`ray.remote` options: num_cpus, num_gpus, accelerator_type, runtime_env."""


class Stage(Protocol):
    name: str

    def plan(self, cfg: PipelineConfig) -> list[StagePlan]:
        """One plan per output folder (extract: one per model)."""
        ...

    def process(self, cfg: PipelineConfig, item: WorkItem) -> ShardOutput: ...

    def actor_pool(self, cfg: PipelineConfig, plan: StagePlan) -> ActorPool | None:
        """None: plain Ray tasks, one per shard."""
        ...

    def setup(self, cfg: PipelineConfig, plan: StagePlan) -> None:
        """Work shared by all shards of a plan (e.g. vocabulary maps), run once before them."""
        ...


@dataclass(frozen=True)
class RunResult:
    stage: str
    total: int
    skipped: int
    ran: int
    complete: bool
    records: tuple[ShardRecord, ...]


def commit_shard(cfg: PipelineConfig, stage: Stage, out_url: str, item: WorkItem) -> ShardRecord:
    """Process one item, write its shard atomically, then its record. Runs on a worker."""
    storage.configure(cfg.storage)
    started = time.monotonic()
    out = stage.process(cfg, item)
    url = storage.join(out_url, item.shard)
    if out.batches is None:
        assert out.table is not None, f"{stage.name}: process returned neither table nor batches"
        data = parquet_bytes(out.table, metadata={"fusion_etl.stage": stage.name, **out.metadata})
        storage.write_bytes(url, data)
        rows, size, digest = out.table.num_rows, len(data), hashlib.sha256(data).hexdigest()
    else:
        assert out.schema is not None, f"{stage.name}: batches need a schema"
        rows, size, digest = _write_batches(url, out, stage.name)
    record = ShardRecord(
        name=item.shard,
        rows=rows,
        bytes=size,
        sha256=digest,
        seconds=round(time.monotonic() - started, 3),
        inputs=item.inputs,
        stats=dict(out.stats),
    )
    manifest.write_record(out_url, record)
    return record


def _write_batches(url: str, out: ShardOutput, stage_name: str) -> tuple[int, int, str]:
    """Stream `out.batches` into a local temporary Parquet file, then publish it atomically as
    one object; returns (rows, bytes, sha256)."""
    import tempfile

    assert out.batches is not None and out.schema is not None
    local = storage.local_path(url)
    # Spool next to the destination when it is local (the final rename stays on one disk).
    spool_dir = str(local.parent) if local is not None else None
    if local is not None:
        local.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".spool-", suffix=".parquet", dir=spool_dir)
    os.close(fd)
    try:
        rows = write_parquet(
            tmp,
            out.schema,
            out.batches,
            lambda: {"fusion_etl.stage": stage_name, **out.metadata},
        )
        digest = hashlib.sha256()
        with open(tmp, "rb") as fh:
            while chunk := fh.read(1 << 24):
                digest.update(chunk)
        size = os.path.getsize(tmp)
        storage.put_file(tmp, url)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return rows, size, digest.hexdigest()


def stage_ref(stage: Stage) -> str:
    """How a worker finds the stage: `module:Class` (stages are stateless, built with no
    arguments), so stage objects need not pickle and any importable stage can run."""
    cls = type(stage)
    return f"{cls.__module__}:{cls.__qualname__}"


def _resolve(ref: str) -> Stage:
    import importlib

    module, _, name = ref.partition(":")
    stage: Stage = getattr(importlib.import_module(module), name)()
    return stage


STARTED = "fusion-etl:started"


def commit_stream(
    cfg: PipelineConfig, ref: str, out_url: str, item: WorkItem
) -> Iterator[ShardRecord | str]:
    """A shard's commit on a worker, as a stream: first a mark that the attempt has started
    (the time limit runs from here, not from when it was queued, so waiting for a worker or a
    new node never counts), then its record."""
    yield STARTED
    yield commit_shard(cfg, _resolve(ref), out_url, item)


def reraise(exc: Any, label: str, item: WorkItem) -> NoReturn:
    """A worker's exception, with the shard named when it is the user's to fix."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, UserError):
        raise type(cause)(f"{label}: shard {item.shard}: {cause}") from None
    raise exc


def parse_shard_selection(spec: str, names: Sequence[str]) -> set[str]:
    """`0-3,7,part-00009.parquet` -> shard names; indices refer to the plan's order."""
    chosen: set[str] = set()
    for raw in spec.split(","):
        part = raw.strip()
        if not part:
            continue
        if part in names:
            chosen.add(part)
            continue
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                idx = list(range(lo, hi + 1))
            else:
                idx = [int(part)]
        except ValueError:
            raise UserError(
                f"--shards: {part!r} is neither a shard name nor an index or range like 0-3"
            ) from None
        for i in idx:
            if not 0 <= i < len(names):
                raise UserError(
                    f"--shards: index {i} is out of range; this stage has {len(names)} shards (0-{len(names) - 1})"
                )
            chosen.add(names[i])
    return chosen


class PlanRun:
    """One plan being run: opened (its output folder's lease taken, done shards found,
    progress shown), then fed records as shards return, then closed (the manifest, once every
    shard has returned; the lease given back)."""

    def __init__(
        self,
        stage: Stage,
        cfg: PipelineConfig,
        plan: StagePlan,
        *,
        overwrite: bool,
        shards: str | None,
    ) -> None:
        self.stage = stage
        self.plan = plan
        last = plan.output.rstrip("/").split("/")[-1]
        self.label = stage.name if last == stage.name else f"{stage.name}/{last}"
        self.names = [it.shard for it in plan.items]
        if len(set(self.names)) != len(self.names):
            # A bug, not the user's.
            raise AssertionError(f"{self.label}: duplicate shard names in plan")
        self.todo: list[WorkItem] = []
        self.done: dict[str, ShardRecord] = {}
        self.records: dict[str, ShardRecord] = {}
        self.committed: set[str] = set()
        """Shards committed before this run (all of them when the plan is up to date)."""
        self.result: RunResult | None = None
        self._progress: StageProgress | None = None
        # Every write of this run (shards, records, manifest) happens under the lease: a second
        # run on the same folder is refused instead of interleaving with this one.
        self._lease: manifest.StageLease | None = manifest.acquire_lease(
            plan.output, stage=self.label, fingerprint=plan.fingerprint, ttl_s=cfg.ray.lease_ttl_s
        )
        try:
            self._open(overwrite=overwrite, shards=shards)
        except BaseException:
            self._release()
            raise

    def _open(self, *, overwrite: bool, shards: str | None) -> None:
        plan = self.plan
        if shards is None and manifest.is_finished(plan.output, plan.fingerprint):
            log(
                f"{self.label}: up to date ({len(self.names)} shards, fingerprint {plan.fingerprint}); nothing to do"
            )
            self.committed = set(self.names)
            self.result = RunResult(self.label, len(self.names), len(self.names), 0, True, ())
            self._release()
            return
        manifest.begin_stage(
            plan.output,
            stage=self.label,
            fingerprint=plan.fingerprint,
            identity=plan.identity,
            config=plan.config,
            overwrite=overwrite,
        )
        self.done = manifest.done_records(plan.output, self.names)
        self.committed = set(self.done)
        selected = set(self.names) if shards is None else parse_shard_selection(shards, self.names)
        self.todo = [it for it in plan.items if it.shard in selected and it.shard not in self.done]
        self.records = dict(self.done)
        self._progress = StageProgress(
            self.label, len(selected), len(selected & set(self.done)), plan.output
        )

    def _release(self) -> None:
        if self._lease is not None:
            self._lease.release()
            self._lease = None

    def on_done(self, record: ShardRecord) -> None:
        if self._lease is not None:
            self._lease.check()
        self.records[record.name] = record
        if self._progress is not None:
            self._progress.update(record.rows, record.stats.get("tokens", 0))

    def close(self) -> RunResult:
        """Write the manifest if every shard has returned; idempotent."""
        if self.result is not None:
            return self.result
        plan, names, records = self.plan, self.names, self.records
        complete = all(n in records for n in names)
        try:
            if self._progress is not None:
                self._progress.close()
            if complete:
                if self._lease is not None:
                    self._lease.check()
                # Every shard write has returned (we hold all their records): only now the
                # manifest.
                manifest.write_manifest(
                    plan.output,
                    stage=self.label,
                    fingerprint=plan.fingerprint,
                    config=plan.config,
                    inputs=plan.inputs,
                    records=[records[n] for n in names],
                )
            if self._progress is not None:
                self._progress.finish(sum(r.rows for r in records.values()), complete=complete)
        finally:
            self._release()
        self.result = RunResult(
            self.label,
            len(names),
            len(self.done),
            len(self.todo),
            complete,
            tuple(records[n] for n in names if n in records),
        )
        return self.result

    def abort(self) -> None:
        """Stop showing progress after a failure; committed shards stay, no manifest."""
        if self.result is None and self._progress is not None:
            self._progress.close()
        self._release()


def run_plans(
    cfg: PipelineConfig,
    plans: Sequence[tuple[Stage, StagePlan]],
    *,
    overwrite: bool = False,
    shards: str | None = None,
    after: Mapping[int, Sequence[int]] | None = None,
) -> list[RunResult]:
    """Run several plans at once (`fusion_etl.scheduler`), each committed as soon as its last
    shard has returned; `after[i]` lists the plans whose same-named shard plan i needs first.
    With the inline executor, one after another in the given order."""
    runs: list[PlanRun] = []
    try:
        for stage, plan in plans:
            runs.append(PlanRun(stage, cfg, plan, overwrite=overwrite, shards=shards))
        if cfg.ray.executor == "inline":
            for run in runs:
                if run.todo:
                    run.stage.setup(cfg, run.plan)
                for item in run.todo:
                    run.on_done(commit_shard(cfg, run.stage, run.plan.output, item))
                run.close()
        else:
            from fusion_etl.scheduler import run_concurrently

            run_concurrently(cfg, runs, after=after, on_finished=PlanRun.close)
    except BaseException:
        for run in runs:
            run.abort()
        raise
    return [run.close() for run in runs]


def run_stage(
    stage: Stage,
    cfg: PipelineConfig,
    *,
    overwrite: bool = False,
    shards: str | None = None,
) -> RunResult:
    """Run every plan of a stage to completion (or the selected shards), idempotently: all at
    once, unless `ray.schedule` is `staged` (then one plan after the other)."""
    storage.configure(cfg.storage)
    plans = [(stage, plan) for plan in stage.plan(cfg)]
    if cfg.ray.schedule == "staged":
        results = [
            r for p in plans for r in run_plans(cfg, [p], overwrite=overwrite, shards=shards)
        ]
    else:
        results = run_plans(cfg, plans, overwrite=overwrite, shards=shards)
    return combine(stage.name, results)


def combine(stage: str, results: Sequence[RunResult]) -> RunResult:
    """One result for a stage of several plans."""
    return RunResult(
        stage=stage,
        total=sum(r.total for r in results),
        skipped=sum(r.skipped for r in results),
        ran=sum(r.ran for r in results),
        complete=all(r.complete for r in results),
        records=tuple(rec for r in results for rec in r.records),
    )
