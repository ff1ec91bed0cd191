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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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
    "RunResult",
    "ShardOutput",
    "Stage",
    "StagePlan",
    "WorkItem",
    "log",
    "make_plan",
    "parse_shard_selection",
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


def _commit_by_ref(cfg: PipelineConfig, ref: str, out_url: str, item: WorkItem) -> ShardRecord:
    return commit_shard(cfg, _resolve(ref), out_url, item)


_STARTED = "fusion-etl:started"


def _commit_stream(
    cfg: PipelineConfig, ref: str, out_url: str, item: WorkItem
) -> Iterator[ShardRecord | str]:
    """A shard's commit on a worker, as a stream: first a mark that the attempt has started
    (the time limit runs from here, not from when it was queued, so waiting for a worker or a
    new node never counts), then its record."""
    yield _STARTED
    yield _commit_by_ref(cfg, ref, out_url, item)


def _reraise(exc: Any, item: WorkItem) -> NoReturn:
    """A worker's exception, with the shard named when it is the user's to fix."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, UserError):
        raise type(cause)(f"shard {item.shard}: {cause}") from None
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


def _run_inline(
    cfg: PipelineConfig,
    stage: Stage,
    out_url: str,
    todo: Iterable[WorkItem],
    on_done: Callable[[ShardRecord], None],
) -> None:
    for item in todo:
        on_done(commit_shard(cfg, stage, out_url, item))


def _run_on_ray(
    cfg: PipelineConfig,
    stage: Stage,
    out_url: str,
    todo: Sequence[WorkItem],
    on_done: Callable[[ShardRecord], None],
    *,
    label: str,
    num_cpus: float,
    resources: Mapping[str, float],
) -> None:
    from fusion_etl.ray_utils import init_ray

    ray = init_ray(cfg.ray)
    # A worker that dies (OOM, preemption, a lost node) is retried by Ray; errors in our code
    # are not.
    task = ray.remote(
        num_cpus=num_cpus,
        resources=dict(resources) or None,
        max_retries=max(0, cfg.ray.shard_attempts - 1),
    )(_commit_stream)
    cfg_ref = ray.put(cfg)
    ref_name = stage_ref(stage)
    limit = cfg.ray.max_in_flight or max(2, int(2 * ray.cluster_resources().get("CPU", 1)))
    pending: dict[Any, WorkItem] = {}
    timer = _ShardTimer(cfg, label)
    queue = list(todo)
    try:
        while queue or pending:
            while queue and len(pending) < limit:
                item = queue.pop(0)
                pending[task.remote(cfg_ref, ref_name, out_url, item)] = item
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=timer.wait_s())
            for stream in ready:
                item = pending[stream]
                try:
                    value = ray.get(next(stream))
                except ray.exceptions.RayTaskError as exc:
                    pending.pop(stream)
                    _reraise(exc, item)
                if value == _STARTED:
                    timer.start(stream)
                    continue
                pending.pop(stream)
                timer.started.pop(stream, None)
                on_done(value)
            for stream in timer.expired(pending):
                # A hung task: kill its worker process and hand the shard out again.
                item = pending.pop(stream)
                ray.cancel(stream, force=True)
                timer.give_up_or_log(item.shard, "killed its task")
                queue.insert(0, item)
    except BaseException:
        for other in pending:
            ray.cancel(other)
        raise


class ShardActor:
    """A long-lived worker; stage state (a loaded model) lives in its process caches."""

    def commit(
        self, cfg: PipelineConfig, ref: str, out_url: str, item: WorkItem
    ) -> Iterator[ShardRecord | str]:
        yield from _commit_stream(cfg, ref, out_url, item)


class _ShardTimer:
    """Attempts per shard, and the time limit of each (`ray.shard_timeout_s`)."""

    def __init__(self, cfg: PipelineConfig, label: str) -> None:
        self.limit = cfg.ray.shard_timeout_s
        self.max_attempts = cfg.ray.shard_attempts
        self.label = label
        self.started: dict[Any, float] = {}
        self.attempts: dict[str, int] = {}

    def start(self, ref: Any) -> None:
        self.started[ref] = time.monotonic()

    def wait_s(self) -> float | None:
        """How long `ray.wait` may block before the oldest attempt runs out of time."""
        if self.limit <= 0 or not self.started:
            return None
        return max(0.0, min(self.started.values()) + self.limit - time.monotonic())

    def expired(self, pending: Mapping[Any, Any]) -> list[Any]:
        if self.limit <= 0:
            return []
        now = time.monotonic()
        out = [r for r in pending if now - self.started.get(r, now) >= self.limit]
        for ref in out:
            self.started.pop(ref, None)
        return out

    def give_up_or_log(self, shard: str, action: str, why: str | None = None) -> None:
        """Count a failed attempt at `shard`; raise once it has had all its attempts."""
        n = self.attempts[shard] = self.attempts.get(shard, 0) + 1
        why = why or f"did not finish within ray.shard_timeout_s={self.limit:g} s"
        if n >= self.max_attempts:
            raise UserError(
                f"{self.label}: shard {shard} {why} on each of its {n} attempts (ray.shard_attempts); "
                "if shards legitimately take this long, raise ray.shard_timeout_s"
                if why.startswith("did not finish")
                else f"{self.label}: shard {shard}: {why}, {n} times (ray.shard_attempts)"
            )
        log(
            f"{self.label}: shard {shard} {why}; {action} and retrying (attempt {n + 1} of {self.max_attempts})"
        )


def _run_on_actors(
    cfg: PipelineConfig,
    stage: Stage,
    out_url: str,
    todo: Sequence[WorkItem],
    on_done: Callable[[ShardRecord], None],
    *,
    label: str,
    pool: ActorPool,
) -> None:
    from fusion_etl.ray_utils import init_ray

    ray = init_ray(cfg.ray)
    actor_cls = ray.remote(ShardActor).options(max_restarts=0, **dict(pool.options))
    cfg_ref = ray.put(cfg)
    ref_name = stage_ref(stage)
    actors = [actor_cls.remote() for _ in range(min(pool.size, len(todo)))]
    idle = list(actors)
    queue = list(todo)
    pending: dict[Any, tuple[Any, WorkItem]] = {}
    timer = _ShardTimer(cfg, label)

    def replace(actor: Any) -> None:
        ray.kill(actor)
        actors.remove(actor)
        fresh = actor_cls.remote()
        actors.append(fresh)
        idle.append(fresh)

    try:
        while queue or pending:
            while queue and idle:
                actor, item = idle.pop(0), queue.pop(0)
                pending[actor.commit.remote(cfg_ref, ref_name, out_url, item)] = (actor, item)
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=timer.wait_s())
            for stream in ready:
                actor, item = pending[stream]
                try:
                    value = ray.get(next(stream))
                except ray.exceptions.RayActorError as exc:
                    # The process died (OOM, preemption, a lost node, a crash in native code):
                    # replace it and hand its shard out again. Deterministic shard names make
                    # the retry safe.
                    pending.pop(stream)
                    timer.started.pop(stream, None)
                    replace(actor)
                    timer.give_up_or_log(
                        item.shard, "replaced it", why=f"its actor died ({type(exc).__name__})"
                    )
                    queue.insert(0, item)
                    continue
                except ray.exceptions.RayTaskError as exc:
                    _reraise(exc, item)
                if value == _STARTED:
                    timer.start(stream)
                    continue
                pending.pop(stream)
                timer.started.pop(stream, None)
                on_done(value)
                idle.append(actor)
            for stream in timer.expired(pending):
                # A hung actor (a stuck GPU, a deadlock): kill it, hand its shard out again.
                actor, item = pending.pop(stream)
                replace(actor)
                timer.give_up_or_log(item.shard, "killed its actor")
                queue.insert(0, item)
    finally:
        for actor in actors:
            ray.kill(actor)


def run_stage(
    stage: Stage,
    cfg: PipelineConfig,
    *,
    overwrite: bool = False,
    shards: str | None = None,
) -> RunResult:
    """Run every plan of a stage to completion (or the selected shards), idempotently."""
    storage.configure(cfg.storage)
    results = [
        _run_plan(stage, cfg, plan, overwrite=overwrite, shards=shards) for plan in stage.plan(cfg)
    ]
    return RunResult(
        stage=stage.name,
        total=sum(r.total for r in results),
        skipped=sum(r.skipped for r in results),
        ran=sum(r.ran for r in results),
        complete=all(r.complete for r in results),
        records=tuple(rec for r in results for rec in r.records),
    )


def _run_plan(
    stage: Stage,
    cfg: PipelineConfig,
    plan: StagePlan,
    *,
    overwrite: bool,
    shards: str | None,
) -> RunResult:
    label = (
        plan.output.rstrip("/").split("/")[-1]
        if plan.output.rstrip("/").split("/")[-1] != stage.name
        else stage.name
    )
    label = stage.name if label == stage.name else f"{stage.name}/{label}"
    out_url = plan.output
    names = [it.shard for it in plan.items]
    if len(set(names)) != len(names):
        raise AssertionError(f"{label}: duplicate shard names in plan")  # a bug, not the user's
    with manifest.stage_lease(
        out_url, stage=label, fingerprint=plan.fingerprint, ttl_s=cfg.ray.lease_ttl_s
    ) as lease:
        return _run_leased(
            stage, cfg, plan, label, names, lease, overwrite=overwrite, shards=shards
        )


def _run_leased(
    stage: Stage,
    cfg: PipelineConfig,
    plan: StagePlan,
    label: str,
    names: list[str],
    lease: manifest.StageLease,
    *,
    overwrite: bool,
    shards: str | None,
) -> RunResult:
    out_url = plan.output
    if shards is None and manifest.is_finished(out_url, plan.fingerprint):
        log(
            f"{label}: up to date ({len(names)} shards, fingerprint {plan.fingerprint}); nothing to do"
        )
        return RunResult(label, len(names), len(names), 0, True, ())
    manifest.begin_stage(
        out_url,
        stage=label,
        fingerprint=plan.fingerprint,
        identity=plan.identity,
        config=plan.config,
        overwrite=overwrite,
    )
    done = manifest.done_records(out_url, names)
    selected = set(names) if shards is None else parse_shard_selection(shards, names)
    todo = [it for it in plan.items if it.shard in selected and it.shard not in done]
    records: dict[str, ShardRecord] = dict(done)
    progress = StageProgress(label, len(selected), len(selected & set(done)), out_url)

    def on_done(record: ShardRecord) -> None:
        lease.check()
        records[record.name] = record
        progress.update(record.rows, record.stats.get("tokens", 0))

    try:
        if todo:
            stage.setup(cfg, plan)
        pool = stage.actor_pool(cfg, plan) if todo else None
        if cfg.ray.executor == "inline":
            _run_inline(cfg, stage, out_url, todo, on_done)
        elif pool is not None:
            _run_on_actors(cfg, stage, out_url, todo, on_done, label=label, pool=pool)
        else:
            # CPUs and custom resources per task come from the stage's own config section.
            section = getattr(cfg, stage.name, None)
            _run_on_ray(
                cfg,
                stage,
                out_url,
                todo,
                on_done,
                label=label,
                num_cpus=float(getattr(section, "num_cpus", 0.5)),
                resources=dict(getattr(section, "resources", {})),
            )
    finally:
        progress.close()
    complete = all(n in records for n in names)
    if complete:
        lease.check()
        # Every shard write has returned (we hold all their records): only now the manifest.
        manifest.write_manifest(
            out_url,
            stage=label,
            fingerprint=plan.fingerprint,
            config=plan.config,
            inputs=plan.inputs,
            records=[records[n] for n in names],
        )
    progress.finish(sum(r.rows for r in records.values()), complete=complete)
    return RunResult(
        label,
        len(names),
        len(done),
        len(todo),
        complete,
        tuple(records[n] for n in names if n in records),
    )
