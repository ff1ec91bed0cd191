"""Pipeline configuration: YAML plus dotted overrides into frozen dataclasses.

A job is one YAML file (see `jobs/`). Every value can be overridden on the command line as
`key.sub=value` (the value is parsed as YAML, so `prepare.block_size=512` is an int). Strings may
refer to other values as `${key.sub}`, e.g. `input: ${run_dir}/kit/corpus`.

Fields whose metadata says `fingerprint=False` describe *how* a stage runs (parallelism, CPUs
per task) rather than *what* it produces; they are left out of the stage fingerprint so that
changing them never invalidates finished work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from fusion_etl.errors import ConfigError

__all__ = [
    "AlignFuseConfig",
    "EnsembleConfig",
    "EstimateConfig",
    "EvaluateConfig",
    "ExtractConfig",
    "KitConfig",
    "MergeConfig",
    "ModelConfig",
    "PipelineConfig",
    "PrepareConfig",
    "RayConfig",
    "StorageConfig",
    "TrainConfig",
    "VllmConfig",
    "fingerprint",
    "fingerprint_fields",
    "load_config",
    "parse_config",
    "redact",
    "to_dict",
]

T = TypeVar("T")

_RUNTIME = {"fingerprint": False}
# A field added after runs were made, whose default keeps the old behaviour: left out of the
# fingerprint while at that default, so that those runs stay valid (and are not redone).
_ADDED = {"fingerprint": "unless_default"}


@dataclass(frozen=True)
class StorageConfig:
    """Object-storage options for `s3://` URLs (local paths and `file://` need none).

    Credentials are never part of the config: they come from the usual AWS environment
    variables or config files (`AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, ...).
    """

    endpoint_url: str | None = None
    """S3-compatible endpoint, e.g. `http://127.0.0.1:8333`; default: AWS (or `AWS_ENDPOINT_URL`)."""
    region: str | None = None
    anon: bool = False
    """Anonymous access (public buckets)."""
    profile: str | None = None
    retries: int = 5
    """Retries of an operation that failed for a reason that may pass (connection refused or
    broken, timeout, 5xx, throttling), waiting retry_wait_s, then twice as long each time (at
    most 30 s); then the stage stops with one error naming the URL. 0: no retries."""
    retry_wait_s: float = 1.0
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    """Longest wait for an answer to one request."""


@dataclass(frozen=True)
class RayConfig:
    """Where stages run."""

    address: str | None = None
    """Ray cluster to join (`auto`, `ray://...`); default: `RAY_ADDRESS`, else a local Ray."""
    executor: Literal["ray", "inline"] = "ray"
    """`inline` runs shards one after another in this process (debugging only)."""
    num_cpus: int | None = None
    """CPUs of a local Ray started by this process; default: all."""
    object_store_memory_mb: int = 256
    max_in_flight: int = 0
    """Shards submitted at once; 0: twice the cluster's CPUs."""
    shard_timeout_s: float = 0.0
    """Longest one attempt at one shard may take (on an actor: including its model's load)
    before its task or actor is killed and the shard retried; 0: no limit. A hung GPU worker
    otherwise holds a stage forever."""
    shard_attempts: int = 3
    """Attempts per shard when its worker dies or exceeds shard_timeout_s; then the stage stops."""
    lease_ttl_s: float = 60.0
    """A run holds a lease on each output folder it writes, renewed every ttl/3; a second run
    is refused while it is live. A dead holder's lease expires after this (at once when the
    holder was a process on this host that is gone)."""
    schedule: Literal["pipelined", "concurrent", "staged"] = "pipelined"
    """`staged`: one output folder (one model) at a time, one stage after the other;
    `concurrent`: a stage's folders at once (extract: every model with its own actor pool);
    `pipelined`: also, in `run all`, align_fuse of a shard as soon as every model committed it."""


@dataclass(frozen=True)
class ModelConfig:
    """One model: the target or a source."""

    name: str
    path: str
    """A folder written by `save_pretrained` (local path or URL)."""
    tokenizer: str | None = None
    """Tokenizer folder; default: `path`."""
    backend: Literal["auto", "vllm", "transformers"] = "auto"
    """extract backend for this model; auto: extract.backend (e.g. transformers for an
    architecture the installed vLLM no longer serves)."""

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.path


@dataclass(frozen=True)
class KitConfig:
    """The tiny model kit that `fusion-etl demo` builds when missing."""

    dir: str = "runs/demo/kit"
    size: Literal["demo", "test"] = "demo"
    seed: int = 0


@dataclass(frozen=True)
class PrepareConfig:
    """`prepare`: raw corpus files -> `prepare/part-NNNNN.parquet` (doc_id, text)."""

    input: str = ""
    """A file, a folder (searched recursively) or a glob of .jsonl[.gz], .parquet or .txt files."""
    format: Literal["auto", "jsonl", "parquet", "text"] = "auto"
    """`auto` decides by file suffix; `text` makes one document per file."""
    text_field: str = "text"
    block_size: int = 2048
    """Training block size; documents are cut to at most `block_size - margin` tokens."""
    margin: int = 48
    """Tokens kept free in each block (EOS, and room the reference keeps)."""
    on_invalid_utf8: Literal["error", "skip"] = "error"
    """`skip` drops undecodable lines and counts them in the shard record."""
    shard_docs: int = 4096
    """At most this many input documents per prepared shard (the unit of work downstream)."""
    shard_bytes: int = 4 * 2**20
    """At most about this many bytes of input per shard (4 MiB: minutes of 7B GPU work; see
    `fusion_etl.stages.prepare`); a larger single document gets a shard of its own."""
    num_cpus: float = field(default=0.5, metadata=_RUNTIME)
    """CPUs reserved per shard task (below 1 so that Ray's own read tasks never starve)."""
    resources: dict[str, float] = field(default_factory=dict, hash=False, metadata=_RUNTIME)
    """Custom Ray resources per task, e.g. {cpu_stage: 1} to land on (and scale) the CPU group."""

    @property
    def max_tokens(self) -> int:
        return self.block_size - self.margin


@dataclass(frozen=True)
class VllmConfig:
    """vLLM engine settings for `extract` (backend `vllm`)."""

    tensor_parallel_size: int = 1
    """GPUs per replica; each extract actor reserves this many."""
    gpu_memory_utilization: float = field(default=0.85, metadata=_RUNTIME)
    """Leave headroom: prompt log-probs materialise [tokens, vocab] logits outside vLLM's plan."""
    max_num_batched_tokens: int = field(default=8192, metadata=_RUNTIME)
    max_logprobs: int = 20
    """The engine's cap on k (`extract.top_k` may not exceed it)."""
    cpu_kv_cache_gib: int = field(default=1, metadata=_RUNTIME)
    """KV cache on CPU-only machines (VLLM_CPU_KVCACHE_SPACE)."""


@dataclass(frozen=True)
class ExtractConfig:
    """`extract`: every model scores every prepared shard -> `extract/<model>/part-NNNNN.parquet`."""

    backend: Literal["auto", "vllm", "transformers"] = "auto"
    """`auto`: vllm when the cluster has GPUs, else transformers."""
    top_k: int = 10
    logprob_dtype: Literal["float16", "float32"] = "float16"
    """Stored log-prob precision (computation is always fp32)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Model weights/activations, the same for both backends: auto = float32 on CPU, bfloat16
    on GPU (a GPU without bfloat16 is refused: set float16). The resolved dtype is in the
    fingerprint and in each shard's metadata (`fusion_etl.dtype`)."""
    add_eos: bool = True
    add_bos: bool = False
    max_length: int = 0
    """Longest document in tokens; 0: the model's max_position_embeddings."""
    actors: int = field(default=1, metadata=_RUNTIME)
    """Replicas per model (each its own Ray actor with its own GPUs)."""
    num_gpus: float = field(default=-1, metadata=_RUNTIME)
    """GPUs per actor; -1: vllm.tensor_parallel_size for vllm on a GPU cluster, else 0."""
    num_cpus: float = field(default=0.5, metadata=_RUNTIME)
    accelerator_type: str | None = field(default=None, metadata=_RUNTIME)
    """Ray accelerator type to pin actors to (e.g. `H100`, `A10G`)."""
    resources: dict[str, float] = field(default_factory=dict, hash=False, metadata=_RUNTIME)
    """Custom Ray resources per actor, e.g. {extract_gpu: 1} to land on (and scale) the GPU group."""
    batch_tokens: int = field(default=8192, metadata=_RUNTIME)
    """transformers backend: padded tokens per forward pass."""
    docs_per_call: int = field(default=256, metadata=_RUNTIME)
    """Documents read, scored and written at once: one Parquet row group of an extracted
    shard, so a worker's memory is bounded by this, not by the shard's size."""
    seed: int = 0
    vllm: VllmConfig = VllmConfig()


@dataclass(frozen=True)
class AlignFuseConfig:
    """`align_fuse`: sources' distributions onto the target's tokens, fused."""

    align_method: Literal["dtw", "offsets"] = "dtw"
    """`dtw`: the reference's edit-distance DTW; `offsets`: linear time via character spans."""
    match: Literal["token", "boundary"] = field(default="token", metadata=_ADDED)
    """Which target positions take a source's distribution. `token` (the paper): positions
    aligned 1:1 to a source token with the same bytes. `boundary`: positions whose token ends
    at the same character as a source token, so both predict the next token from the same
    text (needs align_method `offsets`, which reads the character spans). On the demo kit
    boundary matched 72-93% of positions against 41-53%, yet trained no better targets except
    with token-level fusion: the extra positions' next tokens are cut differently (README)."""
    fusion: Literal["min_ce", "avg_ce"] = "min_ce"
    level: Literal["sequence", "token"] = "sequence"
    ce_unit: Literal["token", "byte"] = "token"
    """CE per own token (the reference) or per UTF-8 byte (comparable across tokenizers)."""
    temperature: float = 1.0
    """AvgCE: weights are softmax(-CE / temperature)."""
    top_k: int = 0
    """Entries per fused position; 0: extract.top_k."""
    row_group_docs: int = 128
    """Documents per Parquet row group: the run of documents processed at once (bounded
    memory) and the unit training workers read and shuffle."""
    num_cpus: float = field(default=0.5, metadata=_RUNTIME)
    resources: dict[str, float] = field(default_factory=dict, hash=False, metadata=_RUNTIME)
    """Custom Ray resources per task (see prepare.resources)."""


@dataclass(frozen=True)
class TrainConfig:
    """`train`: continual training of the target on the fused shards (Ray Train)."""

    lam: float = 0.9
    """lambda in  lambda * CLM + (1 - lambda) * fusion; 1.0 is plain continual training."""
    topk_mass: Literal["renormalize", "rest"] = "renormalize"
    """The teacher's mass outside its top-k: rescale the k probabilities to 1 (the reference),
    or keep it as one more category the student must match (`fusion_etl.train.loss`)."""
    block_size: int = 2048
    keep_remainder: bool = True
    """Train each worker's last, partial block (padded and masked) as the reference does, or drop it."""
    micro_batch: int = 1
    """Blocks per worker per forward pass."""
    grad_accum: int = 1
    epochs: int = 1
    lr: float = 1e-5
    min_lr_ratio: float = 0.0
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_ratio: float = 0.008
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 on GPUs that support it, fp32 elsewhere. fsdp: bf16 parameters and compute with
    fp32 gradient reduction and fp32 master weights; ddp: bf16 autocast."""
    seed: int = 0
    """Seeds the data order (with `shuffle`) and everything random in training."""
    shuffle: bool = True
    """Deterministic shuffle of the fused data for `seed`: row groups over the whole dataset,
    documents within windows of `shuffle_window` row groups; off: manifest order."""
    shuffle_window: int = 4
    """Row groups whose documents are shuffled together on a worker (held in memory at once)."""
    strategy: Literal["auto", "fsdp", "ddp"] = "auto"
    """fsdp (PyTorch FSDP2, `fully_shard` on every decoder layer and the root: parameters,
    gradients and optimizer state sharded over the workers) or ddp (every worker holds
    everything); auto: fsdp with more than one worker."""
    activation_checkpointing: bool = field(default=False, metadata=_RUNTIME)
    """Recompute each decoder layer's activations in the backward pass (less memory, ~30% more
    compute; the same results)."""
    cpu_offload: bool = field(default=False, metadata=_RUNTIME)
    """fsdp on GPUs: keep parameters, gradients and optimizer state in host memory."""
    gpu_memory_gib: float = field(default=0.0, metadata=_RUNTIME)
    """Memory of one training accelerator for the memory plan; 0: from accelerator_type, else 80."""
    accelerator_type: str | None = field(default=None, metadata=_RUNTIME)
    """Ray accelerator type of the training GPUs (e.g. `A100-80G`, `H100`): workers are pinned to
    it and the memory plan takes its memory."""
    checkpoint_every: int = field(default=50, metadata=_RUNTIME)
    """Steps between checkpoints (and always after the last step)."""
    log_every: int = field(default=10, metadata=_RUNTIME)
    """Steps between progress lines (loss, tokens/s)."""
    storage_path: str = ""
    """Where Ray Train keeps checkpoints (any fsspec URL); default: <run_dir>/train/ray."""
    run_name: str = "fusion"
    output: str = ""
    """Where the final model goes (save_pretrained + tokenizer); default: <run_dir>/train/model."""
    export_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype of the exported weights; auto: the target checkpoint's own."""
    export_shard_gib: float = field(default=5.0, metadata=_RUNTIME)
    """Largest safetensors file of the export (and the most rank 0 gathers at once)."""
    num_workers: int = field(default=1, metadata=_RUNTIME)
    use_gpu: bool = field(default=False, metadata=_RUNTIME)
    cpus_per_worker: float = field(default=0.5, metadata=_RUNTIME)
    """Below 1 on small machines, so that the driver's own work keeps a CPU."""
    gpus_per_worker: float = field(default=1.0, metadata=_RUNTIME)
    resources: dict[str, float] = field(default_factory=dict, hash=False, metadata=_RUNTIME)
    """Custom Ray resources per training worker, e.g. {train_gpu: 1}."""
    env_vars: dict[str, str] = field(default_factory=dict, hash=False, metadata=_RUNTIME)
    """Environment of the training worker processes (e.g. NCCL_* settings)."""


@dataclass(frozen=True)
class EvaluateConfig:
    """`evaluate`: bits per UTF-8 byte and token perplexity of models on held-out text."""

    input: str = ""
    """Held-out jsonl files (fields `text` and `domain`): a file, a folder or a glob."""
    text_field: str = "text"
    domain_field: str = "domain"
    models: tuple[ModelConfig, ...] = ()
    """Models to score; default: the target before training, the trained target, the sources."""
    ensembles: tuple[EnsembleConfig, ...] = ()
    """Ensembles scored after the models (each a row of the results)."""
    max_length: int = 0
    """Window in tokens for long texts; 0: the model's max_position_embeddings."""


@dataclass(frozen=True)
class EstimateConfig:
    """Figures for `fusion-etl plan --estimate` (they change no stage's output).

    Throughput comes from FLOPs: a forward pass costs 2 x parameters FLOPs per token and a
    training step 6 x parameters, at `mfu` of the device's peak and slowed by the measured
    overhead of this pipeline over the bare operation (the benchmarks). A figure measured in a
    finished stage (its shard seconds, tokens, bytes) always replaces the modelled one.
    """

    sample_bytes: int = 8 * 2**20
    """Text read from the corpus (or prepared shards) to estimate documents and tokens."""
    corpus_documents: int = 0
    """Documents in prepare.input, for a corpus that cannot be read from here (0: read it)."""
    corpus_bytes: int = 0
    """UTF-8 bytes of text in prepare.input, with corpus_documents."""
    corpus_files: int = 0
    """Files in prepare.input, with corpus_documents (0: unknown)."""
    bytes_per_token: float = 4.0
    """Text bytes per token for a model whose tokenizer cannot be loaded here (assumed)."""
    parameters: dict[str, float] = field(default_factory=dict, hash=False)
    """Parameters per model name, for a model whose config.json cannot be read here."""
    gpu_flops: float = 312e12
    """Peak dense bf16 FLOP/s of one GPU (A100: 312e12, H100 SXM: 989e12, A10G: 70e12)."""
    extract_gpu_flops: float = 0.0
    """The extract GPUs' peak if they differ (0: gpu_flops)."""
    cpu_flops: float = 1.4e11
    """FLOP/s that one CPU worker really gets on a forward pass (measured here: an 8.3M Llama
    at 8,447 tok/s on 2 cores), used where a stage runs without GPUs."""
    extract_mfu: float = 0.35
    """Share of peak FLOP/s that prefill-only scoring reaches on a GPU (assumed)."""
    extract_overhead: float = 1.15
    """Extraction time over a bare forward pass (`fusion-etl bench extract`: at most 1.15)."""
    tokens_per_s: dict[str, float] = field(default_factory=dict, hash=False)
    """Measured extraction tokens/s of one actor, per model name (replaces the FLOP model)."""
    train_mfu: float = 0.40
    """Share of peak FLOP/s that training reaches (assumed)."""
    train_overhead: float = 1.10
    """Fusion step time over a CLM-only step (`fusion-etl bench train`: 1.08, goal 1.10)."""
    align_fuse_tokens_per_cpu_s: float = 15_000.0
    """Target tokens that align_fuse handles per CPU-second per source (measured on a demo
    shard in a warm worker: 24,844 target tokens, 3 sources, 0.53 s)."""
    align_fuse_bytes_per_token: float = 0.0
    """Stored bytes per fused target token (0: from the fused top-k and the demo's ratio)."""


@dataclass(frozen=True)
class MergeConfig:
    """`merge`: weight merging of same-architecture models into one `save_pretrained` model
    (run on its own: `fusion-etl run merge`; `all` does not include it)."""

    method: Literal["linear", "task_arithmetic", "ties", "sce"] = "linear"
    """See `fusion_etl.merging`: averaging, task arithmetic, TIES, or FuseChat's SCE."""
    models: tuple[ModelConfig, ...] = ()
    base: ModelConfig | None = None
    """The model the task vectors are taken against (task_arithmetic, ties, sce)."""
    weights: tuple[float, ...] = ()
    """One per model; empty: from `weighting`."""
    weighting: Literal["uniform", "performance"] = "uniform"
    """performance: softmax(-bits per byte / temperature) of each model on `validation`."""
    validation: str = ""
    """jsonl files (field `text`) for performance weights; never the evaluation's held-out text."""
    temperature: float = 0.1
    scale: float = 1.0
    """Multiplies the merged task vector."""
    density: float = 0.2
    """ties: fraction of each task vector kept."""
    select: float = 0.1
    """sce: fraction of elements selected by their variance across the models."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype of the merged weights; auto: the first model's."""
    output: str = ""
    """Where the merged model goes; default: <run_dir>/merge/model."""


@dataclass(frozen=True)
class EnsembleConfig:
    """Several models with one tokenizer scored as one: next-token probabilities averaged."""

    name: str
    models: tuple[ModelConfig, ...]
    weights: tuple[float, ...] = ()
    """One per model; empty: from `weighting`."""
    weighting: Literal["uniform", "performance"] = "uniform"
    validation: str = ""
    """jsonl files (field `text`) for performance weights; never the held-out text."""
    temperature: float = 0.1


@dataclass(frozen=True)
class PipelineConfig:
    """A whole fusion run."""

    run_dir: str
    """Root URL of every stage's output: `<run_dir>/<stage>/...`."""
    target: ModelConfig
    sources: tuple[ModelConfig, ...] = ()
    prepare: PrepareConfig = PrepareConfig()
    extract: ExtractConfig = ExtractConfig()
    align_fuse: AlignFuseConfig = AlignFuseConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    merge: MergeConfig = MergeConfig()
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()
    kit: KitConfig | None = None
    estimate: EstimateConfig = EstimateConfig()

    @property
    def models(self) -> tuple[ModelConfig, ...]:
        """The target first, then the sources."""
        return (self.target, *self.sources)

    def stage_url(self, stage: str) -> str:
        return f"{self.run_dir.rstrip('/')}/{stage}"


# --------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with errors that name the key.


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: a value is required ({_type_name(tp)})")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(
            errors[0] if len(errors) == 1 else f"{key}: expected {_type_name(tp)}, got {value!r}"
        )
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(
                f"{key}: {value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}"
            )
        return value
    if origin is dict:
        key_tp, value_tp = get_args(tp)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {
            _convert(k, key_tp, key): _convert(v, value_tp, f"{key}.{k}") for k, v in value.items()
        }
    if origin is tuple:
        (item_tp, _ellipsis) = get_args(tp)
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML reads YAML 1.1, where `1e-5` (no dot) is a string; YAML 1.2 and every user
            # read it as a number.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")  # a bug here, not the user's


def _build(cls: type[T], data: Any, prefix: str) -> T:
    where = prefix or "the top level"
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        name = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(
            f"unknown key {name!r}; allowed keys at {where}: {', '.join(sorted(fields))}"
        )
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: missing required key")
    obj = cls(**kwargs)
    _validate(obj, prefix)
    return obj


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _validate(obj: Any, prefix: str) -> None:
    def fail(name: str, msg: str) -> None:
        raise ConfigError(f"{prefix + '.' if prefix else ''}{name}: {msg}")

    if isinstance(obj, StorageConfig):
        if obj.retries < 0:
            fail("retries", f"must be 0 or more, got {obj.retries}")
        for name in ("retry_wait_s", "connect_timeout_s", "read_timeout_s"):
            if getattr(obj, name) <= 0:
                fail(name, f"must be positive, got {getattr(obj, name)}")
    if isinstance(obj, RayConfig):
        if obj.shard_timeout_s < 0:
            fail("shard_timeout_s", f"must be 0 (no limit) or positive, got {obj.shard_timeout_s}")
        if obj.shard_attempts < 1:
            fail("shard_attempts", f"must be at least 1, got {obj.shard_attempts}")
        if obj.lease_ttl_s <= 0:
            fail("lease_ttl_s", f"must be positive, got {obj.lease_ttl_s}")
    if isinstance(obj, PrepareConfig):
        if obj.block_size < 2:
            fail("block_size", f"must be at least 2, got {obj.block_size}")
        if not 0 <= obj.margin < obj.block_size:
            fail("margin", f"must be in [0, block_size), got {obj.margin}")
        if obj.num_cpus <= 0:
            fail("num_cpus", f"must be positive, got {obj.num_cpus}")
        for name in ("shard_docs", "shard_bytes"):
            if getattr(obj, name) < 1:
                fail(name, f"must be at least 1, got {getattr(obj, name)}")
    if isinstance(obj, ExtractConfig):
        if obj.top_k < 1:
            fail("top_k", f"must be at least 1, got {obj.top_k}")
        if obj.backend != "transformers" and obj.top_k > obj.vllm.max_logprobs:
            fail(
                "top_k",
                f"{obj.top_k} exceeds the vLLM engine's max_logprobs ({obj.vllm.max_logprobs}); "
                "lower top_k or raise extract.vllm.max_logprobs",
            )
        if obj.actors < 1:
            fail("actors", f"must be at least 1, got {obj.actors}")
        if obj.docs_per_call < 1:
            fail("docs_per_call", f"must be at least 1, got {obj.docs_per_call}")
        if obj.num_cpus <= 0:
            fail("num_cpus", f"must be positive, got {obj.num_cpus}")
    if isinstance(obj, AlignFuseConfig):
        if obj.temperature <= 0:
            fail("temperature", f"must be positive, got {obj.temperature}")
        if obj.top_k < 0:
            fail("top_k", f"must be 0 (extract.top_k) or positive, got {obj.top_k}")
        if obj.row_group_docs < 1:
            fail("row_group_docs", f"must be at least 1, got {obj.row_group_docs}")
        if obj.match == "boundary" and obj.align_method != "offsets":
            fail(
                "match",
                "`boundary` pairs tokens by their character spans: set align_method: offsets",
            )
    if isinstance(obj, TrainConfig):
        if not 0.0 <= obj.lam <= 1.0:
            fail("lam", f"must be in [0, 1], got {obj.lam}")
        for name in (
            "block_size",
            "micro_batch",
            "grad_accum",
            "epochs",
            "num_workers",
            "checkpoint_every",
            "log_every",
            "shuffle_window",
        ):
            if getattr(obj, name) < 1:
                fail(name, f"must be at least 1, got {getattr(obj, name)}")
        if obj.block_size < 2:
            fail("block_size", f"must be at least 2, got {obj.block_size}")
        if obj.lr <= 0:
            fail("lr", f"must be positive, got {obj.lr}")
        if not 0.0 <= obj.warmup_ratio < 1.0:
            fail("warmup_ratio", f"must be in [0, 1), got {obj.warmup_ratio}")
        if not _SAFE_NAME.fullmatch(obj.run_name):
            fail(
                "run_name",
                f"{obj.run_name!r} must use letters, digits, '_', '-' or '.' and start with a "
                "letter or digit (it names a folder)",
            )
        if obj.gpu_memory_gib < 0:
            fail(
                "gpu_memory_gib",
                f"must be 0 (from accelerator_type) or positive, got {obj.gpu_memory_gib}",
            )
        if obj.export_shard_gib <= 0:
            fail("export_shard_gib", f"must be positive, got {obj.export_shard_gib}")
        if obj.cpu_offload and obj.strategy == "ddp":
            fail("cpu_offload", "needs train.strategy fsdp (or auto with more than one worker)")
    if isinstance(obj, MergeConfig | EnsembleConfig):
        if obj.weights and len(obj.weights) != len(obj.models):
            fail("weights", f"{len(obj.weights)} weights for {len(obj.models)} models")
        if any(w < 0 for w in obj.weights) or (obj.weights and sum(obj.weights) <= 0):
            fail("weights", "must be non-negative and not all zero")
        if obj.temperature <= 0:
            fail("temperature", f"must be positive, got {obj.temperature}")
        if obj.weighting == "performance" and not obj.weights and not obj.validation:
            fail("validation", "performance weighting needs validation text (jsonl with `text`)")
    if isinstance(obj, MergeConfig):
        if obj.method != "linear" and obj.models and obj.base is None:
            fail("base", f"method {obj.method!r} takes task vectors against a base model: set it")
        if not 0 < obj.density <= 1:
            fail("density", f"must be in (0, 1], got {obj.density}")
        if not 0 < obj.select <= 1:
            fail("select", f"must be in (0, 1], got {obj.select}")
    if isinstance(obj, EnsembleConfig):
        if len(obj.models) < 2:
            fail("models", "an ensemble needs at least two models")
        if not re.fullmatch(r"[A-Za-z0-9_.:+ ()-]+", obj.name):
            fail("name", f"{obj.name!r}: letters, digits, spaces and _.:+-() only")
    if isinstance(obj, EstimateConfig):
        for name in (
            "sample_bytes",
            "bytes_per_token",
            "gpu_flops",
            "cpu_flops",
            "extract_mfu",
            "extract_overhead",
            "train_mfu",
            "train_overhead",
            "align_fuse_tokens_per_cpu_s",
        ):
            if getattr(obj, name) <= 0:
                fail(name, f"must be positive, got {getattr(obj, name)}")
        for name in ("extract_mfu", "train_mfu"):
            if getattr(obj, name) > 1:
                fail(name, f"is a fraction of peak FLOP/s, at most 1; got {getattr(obj, name)}")
        if (obj.corpus_documents > 0) != (obj.corpus_bytes > 0):
            fail("corpus_documents", "set both corpus_documents and corpus_bytes, or neither")
    if isinstance(obj, ModelConfig) and not _SAFE_NAME.fullmatch(obj.name):
        # It names folders (extract/<name>/, vocab_map/<name>.parquet): '..' or a leading '.'
        # or '_' could point outside the run or onto fusion-etl's own `_shards`, `_leases`.
        fail(
            "name",
            f"{obj.name!r} must use letters, digits, '_', '-' or '.' and start with a letter "
            "or digit (it names a folder)",
        )
    if isinstance(obj, PipelineConfig):
        names = [m.name for m in obj.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(
                f"sources: model name {dupes[0]!r} is used twice; names must be unique"
            )
        if not obj.run_dir:
            fail("run_dir", "must not be empty")


# --------------------------------------------------------------------------------------------
# YAML, overrides, interpolation.


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(
                    f"override {dotted!r}: {'.'.join(parts[: i + 1])} is not a list index"
                )
            node = node[int(part)]
            continue
        if not isinstance(node.get(part), dict | list):
            node[part] = {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override {dotted!r}: {last!r} is not an index of that list")
        node[int(last)] = value
    else:
        node[last] = value


def _lookup(data: Any, dotted: str) -> Any:
    node = data
    for part in dotted.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise ConfigError(f"${{{dotted}}}: no such key to interpolate")
    return node


_REF = re.compile(r"\$\{([A-Za-z0-9_.]+)\}")


def _interpolate(data: Any, root: Any, depth: int = 0) -> Any:
    if depth > 10:
        raise ConfigError("${...} references nest more than 10 deep (a cycle?)")
    if isinstance(data, str):
        if not _REF.search(data):
            return data
        out = _REF.sub(lambda m: str(_lookup(root, m.group(1))), data)
        return _interpolate(out, root, depth + 1)
    if isinstance(data, dict):
        return {k: _interpolate(v, root, depth) for k, v in data.items()}
    if isinstance(data, list):
        return [_interpolate(v, root, depth) for v in data]
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: what is wrong, and where."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(exc).split())


def parse_config(data: Mapping[str, Any], overrides: Sequence[str] = ()) -> PipelineConfig:
    """Build a `PipelineConfig` from plain data and `key.sub=value` overrides."""
    merged: dict[str, Any] = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"override {item!r}: value is not valid YAML ({_yaml_problem(exc)})"
            ) from None
        _set_dotted(merged, key.strip(), value)
    return _build(PipelineConfig, _interpolate(merged, merged), "")


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> PipelineConfig:
    """Read a job YAML (a local file) and apply overrides."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {str(p)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(p)!r} cannot be read: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"config file {str(p)!r} is not valid YAML: {_yaml_problem(exc)}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r}: expected a mapping at the top level")
    return parse_config(data, overrides)


# --------------------------------------------------------------------------------------------
# Plain data, redaction, fingerprints.


def to_dict(obj: Any) -> Any:
    """Plain JSON-able data of a config object."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    return obj


def fingerprint_fields(obj: Any) -> Any:
    """Like `to_dict`, without the fields that only say how a stage runs."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.name: fingerprint_fields(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if f.metadata.get("fingerprint", True) is True
            or (
                f.metadata.get("fingerprint") == "unless_default"
                and getattr(obj, f.name) != f.default
            )
        }
    if isinstance(obj, tuple | list):
        return [fingerprint_fields(v) for v in obj]
    return obj


_SECRET_KEY = re.compile(r"secret|password|passwd|token|credential|access_key|api_key", re.I)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.I)


def redact(data: Any) -> Any:
    """Copy of plain data with secret-looking keys and URL credentials replaced."""
    if isinstance(data, Mapping):
        return {
            k: "***" if _SECRET_KEY.search(str(k)) and v is not None else redact(v)
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [redact(v) for v in data]
    if isinstance(data, str):
        return _URL_USERINFO.sub(r"\g<scheme>***@", data)
    return data


def fingerprint(data: Any) -> str:
    """A stable hash of plain data (key order does not matter)."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
