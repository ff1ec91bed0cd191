"""Run the remaining shards of one or several plans on Ray at once, each plan with its own
workers, and commit each plan as soon as its last shard has returned.

The runner (`fusion_etl.runner`) decides what a plan still has to do and owns the commit
protocol; this module only hands work out and takes results back:

- each plan gets its own pool of long-lived actors (`Stage.actor_pool`, e.g. one model per
  actor in extract) or plain Ray tasks with its stage's CPUs and custom resources, so every
  plan's demand is visible to Ray (and to an autoscaler) from the start, and no plan waits on
  another's workers;
- a plan may wait for others (`after`): its shard `part-N` is handed out only once every one of
  them has committed its own `part-N` (shard names are derived from the input shard's name),
  which is how align_fuse starts a shard as soon as every model has extracted it;
- a plan's `setup` runs in a thread, so building e.g. vocabulary maps overlaps the other
  plans' shards; the plan's own shards wait for it;
- an actor is released as soon as its plan has nothing left to hand out, so a finished model's
  GPUs go back to the cluster while other models still work;
- a worker that dies (OOM, preemption, a lost node) or overruns `ray.shard_timeout_s` (a hung
  GPU) is killed and its shard handed out again, up to `ray.shard_attempts` times: shard
  names are deterministic and a shard becomes visible only once complete, so a retry is safe.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fusion_etl.config import PipelineConfig
from fusion_etl.errors import UserError
from fusion_etl.manifest import ShardRecord
from fusion_etl.runner import STARTED, WorkItem, commit_stream, log, reraise, stage_ref

if TYPE_CHECKING:
    from fusion_etl.runner import PlanRun

__all__ = ["ShardActor", "run_concurrently"]


class ShardActor:
    """A long-lived worker; stage state (a loaded model) lives in its process caches."""

    def commit(
        self, cfg: PipelineConfig, ref: str, out_url: str, item: WorkItem
    ) -> Iterator[ShardRecord | str]:
        yield from commit_stream(cfg, ref, out_url, item)


class Gate:
    """Which of a plan's items may be handed out: those whose shard every upstream plan has
    committed (pure bookkeeping, no Ray)."""

    def __init__(self, items: Sequence[WorkItem], upstream: Sequence[set[str]]) -> None:
        self.waiting = list(items)
        self.upstream = upstream
        """Per upstream plan, the names of its committed shards (updated by the caller)."""

    def release(self) -> list[WorkItem]:
        """The waiting items that may run now, in plan order; they stop waiting."""
        ready: list[WorkItem] = []
        waiting: list[WorkItem] = []
        for it in self.waiting:
            (ready if all(it.shard in up for up in self.upstream) else waiting).append(it)
        self.waiting = waiting
        return ready


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


class _Dispatch:
    """One plan's shards on Ray: its own actor pool, or plain tasks."""

    def __init__(self, ray: Any, cfg: PipelineConfig, cfg_ref: Any, run: PlanRun) -> None:
        self.ray = ray
        self.run = run
        self.label = run.label
        self.committed: set[str] = set(run.committed)
        self.gate = Gate(run.todo, [])
        self.queue: list[WorkItem] = []
        self.pending: dict[Any, tuple[Any, WorkItem]] = {}
        self.timer = _ShardTimer(cfg, run.label)
        self.setup: concurrent.futures.Future[None] | None = None
        self._cfg_ref = cfg_ref
        self._out = run.plan.output
        self._stage = stage_ref(run.stage)
        pool = run.stage.actor_pool(cfg, run.plan) if run.todo else None
        self.pool = pool
        self.actors: list[Any] = []
        self.idle: list[Any] = []
        if pool is not None:
            self._actor_cls = ray.remote(ShardActor).options(max_restarts=0, **dict(pool.options))
            self.limit = pool.size
        else:
            # CPUs and custom resources per task come from the stage's own config section.
            section = getattr(cfg, run.stage.name, None)
            self._task = ray.remote(
                num_cpus=float(getattr(section, "num_cpus", 0.5)),
                resources=dict(getattr(section, "resources", {})) or None,
                # A worker that dies (OOM, preemption, a lost node) is retried by Ray; errors
                # in our code are not.
                max_retries=max(0, cfg.ray.shard_attempts - 1),
            )(commit_stream)
            self._fixed_limit = cfg.ray.max_in_flight
            self._limit_at = -1.0
            self.limit = 2

    @property
    def busy(self) -> bool:
        return bool(self.gate.waiting or self.queue or self.pending)

    def release(self) -> None:
        if self.setup is not None and not self.setup.done():
            return
        self.queue.extend(self.gate.release())

    def _task_limit(self) -> int:
        """Shards in flight: `ray.max_in_flight`, else twice the CPUs the cluster has now,
        looked up again every few seconds: an autoscaled cluster grows as the demand this
        shows it is met, and then shows it more."""
        if self._fixed_limit:
            return self._fixed_limit
        now = time.monotonic()
        if now - self._limit_at > 5.0:
            self._limit_at = now
            self.limit = max(2, int(2 * self.ray.cluster_resources().get("CPU", 0)))
        return self.limit

    def submit(self) -> None:
        if self.pool is None:
            limit = self._task_limit() if self.queue else self.limit
            while self.queue and len(self.pending) < limit:
                item = self.queue.pop(0)
                ref = self._task.remote(self._cfg_ref, self._stage, self._out, item)
                self.pending[ref] = (None, item)
            return
        # Actors start when there is work for them, never more than there are shards left.
        room = min(self.limit, len(self.queue) + len(self.gate.waiting)) - len(self.actors)
        for _ in range(min(room, len(self.queue) - len(self.idle))):
            actor = self._actor_cls.remote()
            self.actors.append(actor)
            self.idle.append(actor)
        while self.queue and self.idle:
            actor, item = self.idle.pop(0), self.queue.pop(0)
            ref = actor.commit.remote(self._cfg_ref, self._stage, self._out, item)
            self.pending[ref] = (actor, item)

    def complete(self, ref: Any) -> None:
        """Take what a pending shard's stream yielded: its start mark, its record, or its end."""
        ray = self.ray
        actor, item = self.pending[ref]
        try:
            value = ray.get(next(ref))
        except ray.exceptions.RayActorError as exc:
            if actor is None:
                raise
            # The process died (OOM, preemption, a lost node, a crash in native code): replace
            # it and hand its shard out again.
            self.pending.pop(ref)
            self.timer.started.pop(ref, None)
            self._drop(actor)
            self.timer.give_up_or_log(
                item.shard, "replaced it", why=f"its actor died ({type(exc).__name__})"
            )
            self.queue.insert(0, item)
            return
        except ray.exceptions.RayTaskError as exc:
            self.pending.pop(ref)
            reraise(exc, self.label, item)
        if value == STARTED:
            self.timer.start(ref)
            return
        self.pending.pop(ref)
        self.timer.started.pop(ref, None)
        record: ShardRecord = value
        self.committed.add(record.name)
        self.run.on_done(record)
        if actor is not None:
            if self.queue or self.gate.waiting:
                self.idle.append(actor)
            else:
                # Nothing left to hand out: give the actor's resources (a GPU) back now.
                self._drop(actor)

    def expire(self) -> None:
        """Kill the workers of shards that overran `ray.shard_timeout_s`; hand them out again."""
        for ref in self.timer.expired(self.pending):
            actor, item = self.pending.pop(ref)
            if actor is None:
                self.ray.cancel(ref, force=True)
                self.timer.give_up_or_log(item.shard, "killed its task")
            else:
                # A hung actor (a stuck GPU, a deadlock): kill it, a fresh one takes the shard.
                self._drop(actor)
                self.timer.give_up_or_log(item.shard, "killed its actor")
            self.queue.insert(0, item)

    def _drop(self, actor: Any) -> None:
        if actor in self.actors:
            self.actors.remove(actor)
        if actor in self.idle:
            self.idle.remove(actor)
        self.ray.kill(actor)

    def shutdown(self) -> None:
        if self.pool is None:
            for ref in self.pending:
                self.ray.cancel(ref)
        for actor in self.actors:
            self.ray.kill(actor)  # ends its running shard too
        self.actors, self.idle = [], []


def run_concurrently(
    cfg: PipelineConfig,
    runs: Sequence[PlanRun],
    *,
    after: Mapping[int, Sequence[int]] | None = None,
    on_finished: Callable[[PlanRun], object] | None = None,
) -> None:
    """Run every plan's remaining shards at once, on Ray.

    Args:
        cfg: the pipeline config (shipped to every worker once).
        runs: the opened plans (`runner.PlanRun`), each with its items still to do.
        after: run index -> indices of the runs whose same-named shard it needs committed.
        on_finished: called (on this thread) as soon as a run's last shard has returned.
    """
    from fusion_etl.ray_utils import init_ray

    ray = init_ray(cfg.ray)
    cfg_ref = ray.put(cfg)
    jobs = [_Dispatch(ray, cfg, cfg_ref, run) for run in runs]
    for i, deps in (after or {}).items():
        jobs[i].gate.upstream = [jobs[j].committed for j in deps]
    threads = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(jobs)))
    for job in jobs:
        if job.busy:
            job.setup = threads.submit(job.run.stage.setup, cfg, job.run.plan)
    finished = [False] * len(jobs)

    def retire() -> None:
        for i, job in enumerate(jobs):
            if not finished[i] and not job.busy:
                finished[i] = True
                job.shutdown()
                if on_finished is not None:
                    on_finished(job.run)

    try:
        retire()
        while not all(finished):
            for job in jobs:
                if job.setup is not None and job.setup.done():
                    job.setup.result()  # raises what setup raised
                job.release()
                job.submit()
            owner = {ref: job for job in jobs for ref in job.pending}
            setups = [j.setup for j in jobs if j.setup is not None and not j.setup.done()]
            if not owner:
                if not setups:
                    stuck = {j.label: [it.shard for it in j.gate.waiting] for j in jobs if j.busy}
                    raise AssertionError(f"scheduler: shards wait on nothing: {stuck}")
                concurrent.futures.wait(setups, return_when=concurrent.futures.FIRST_COMPLETED)
                continue
            # While a setup runs, wake up now and then to release the shards it holds back; with
            # a time limit, when the oldest running shard would run out of time.
            waits = [w for w in (j.timer.wait_s() for j in jobs) if w is not None]
            if setups:
                waits.append(0.5)
            ready, _ = ray.wait(list(owner), num_returns=1, timeout=min(waits) if waits else None)
            for ref in ready:
                owner[ref].complete(ref)
            for job in jobs:
                job.expire()
            retire()
    finally:
        for job in jobs:
            job.shutdown()
        threads.shutdown(wait=False, cancel_futures=True)
