"""The training memory plan: bytes per training worker, from the target's `config.json` alone.

Pure: no torch, no storage, no weights. What each line counts (P = parameters, W = workers,
T = micro_batch x block_size tokens, V = vocabulary, c = bytes of the compute dtype):

- parameters: fp32 master weights, P x 4 (fsdp: / W; with cpu_offload they live in host memory);
- gradients: fp32, P x 4 (fsdp: / W; DDP keeps them in its buckets, `gradient_as_bucket_view`);
- optimizer state: AdamW's two fp32 moments, P x 8 (fsdp: / W; cpu_offload: host memory);
- activations saved for the backward pass, per token and decoder layer (Llama-style): the input
  of each RMSNorm in fp32 plus its two outputs in the compute dtype, q, k, v (after rotary),
  the attention output and the output projection's input, and four intermediate-sized MLP
  tensors (gate, up, act(gate), their product); with activation checkpointing only each layer's
  input is kept, plus one layer's activations while it is recomputed. Counted the way autograd
  saves them for HF transformers 5 models (checked with `torch.autograd.graph.saved_tensors_hooks`);
- logits and loss: T x V x 20 bytes at the start of the backward pass (the logits, their fp32
  copy, and the fp32 gradients and temporaries of log-sum-exp and the two gathers);
- fused-target tensors: the batch (ids, labels, the fused top-k ids and probabilities) and the
  loss's gathered slots;
- fsdp buffers: the root's parameters (embeddings, output head) unsharded in the compute dtype
  for the whole step, and two decoder layers unsharded (the one computing and the prefetched
  one) with their fp32 gradients before the reduce-scatter;
- DDP under bf16 autocast: autocast's cache of bf16 weight copies, P x 2, and the bf16 copies of
  the inputs of every matmul.

The total is the sum: everything above counted as alive at once (a slight overestimate: the
gradients grow while the activations shrink). On GPUs a reserve for the CUDA context and the
allocator's fragmentation is added before comparing with `train.gpu_memory_gib`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fusion_etl.config import TrainConfig
from fusion_etl.model_shape import ModelShape, model_shape

__all__ = ["ACCELERATOR_MEMORY_GIB", "MemoryPlan", "memory_plan", "resolve_strategy"]

GIB = 2**30
DEFAULT_GPU_GIB = 80.0
# Memory of one accelerator of each Ray accelerator type (`train.accelerator_type`).
ACCELERATOR_MEMORY_GIB = {
    "H200": 141.0,
    "H100": 80.0,
    "H20": 96.0,
    "A100-80G": 80.0,
    "A100-40G": 40.0,
    "A100": 40.0,
    "L40S": 48.0,
    "L4": 24.0,
    "A10G": 24.0,
    "A10": 24.0,
    "V100": 16.0,
    "T4": 16.0,
    "B200": 180.0,
}
CUDA_CONTEXT_BYTES = 1 * GIB
FRAGMENTATION = 0.08


def resolve_strategy(tc: TrainConfig) -> str:
    """`fsdp` or `ddp`: `auto` is fsdp with more than one worker."""
    if tc.strategy != "auto":
        return tc.strategy
    return "fsdp" if tc.num_workers > 1 else "ddp"


def _compute_bytes(tc: TrainConfig) -> int:
    # auto means bf16 on GPUs that support it; a plan for a GPU job assumes they do.
    bf16 = tc.precision == "bf16" or (tc.precision == "auto" and tc.use_gpu)
    return 2 if bf16 else 4


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per training worker, by what holds them."""

    strategy: str
    precision: str
    workers: int
    tokens: int
    """Tokens per micro batch (micro_batch x block_size)."""
    parameters: int
    lines: tuple[tuple[str, int], ...]
    """(what, bytes on the device) in print order; their sum is `total`."""
    activations_without_checkpointing: int
    activations_with_checkpointing: int
    reserve: int
    """CUDA context and fragmentation (0 on CPU)."""
    budget: int
    accelerator: str

    @property
    def total(self) -> int:
        return sum(b for _, b in self.lines) + self.reserve

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    def fixes(self) -> list[str]:
        """What would make a plan that does not fit fit, cheapest first."""
        out = []
        if self.strategy == "ddp" and self.workers > 1:
            out.append("train.strategy=fsdp (shards parameters, gradients and optimizer state)")
        elif self.strategy == "ddp":
            out.append("more workers with train.strategy=fsdp (train.num_workers)")
        out.append("a smaller train.micro_batch (raise train.grad_accum to keep the batch)")
        if self.activations_with_checkpointing < self.activations_without_checkpointing:
            out.append("train.activation_checkpointing=true")
        if self.strategy == "fsdp":
            out.append("more workers (train.num_workers)")
            out.append("train.cpu_offload=true (parameters and optimizer state in host memory)")
        if self.precision != "bf16":
            out.append("train.precision=bf16")
        return out

    def render(self) -> str:
        def gib(n: int) -> str:
            return f"{n / GIB:9.2f} GiB"

        rows = [
            f"memory plan per training worker: {self.strategy} on {self.workers} worker(s), "
            f"{self.precision}, {self.parameters / 1e9:.3f}B parameters, "
            f"{self.tokens} tokens per micro batch"
        ]
        rows += [f"  {name:<40}{gib(b)}" for name, b in self.lines]
        if self.reserve:
            rows.append(f"  {'reserve (CUDA context, fragmentation)':<40}{gib(self.reserve)}")
        rows.append(f"  {'total':<40}{gib(self.total)}")
        verdict = "fits" if self.fits else "DOES NOT FIT"
        rows.append(f"  {'budget (' + self.accelerator + ')':<40}{gib(self.budget)}: {verdict}")
        rows.append(
            f"  activations without / with checkpointing: "
            f"{self.activations_without_checkpointing / GIB:.2f} / "
            f"{self.activations_with_checkpointing / GIB:.2f} GiB"
        )
        return "\n".join(rows)


def _layer_activation_bytes(shape: ModelShape, tokens: int, c: int, autocast: bool) -> int:
    """Bytes one decoder layer saves for the backward pass."""
    h, i = shape.hidden, shape.intermediate
    q = shape.heads * shape.head_dim
    kv = shape.kv_heads * shape.head_dim
    if shape.gated_mlp:
        # Two RMSNorms: fp32 input, then the normalised value and the scaled output in c.
        norms = 2 * (4 * h + 2 * c * h)
        mlp = 4 * i * c
    else:
        # Two LayerNorms: input and output; MLP: the up projection and its activation.
        norms = 2 * (4 * h + c * h)
        mlp = 2 * i * c
    attention = (q + kv + kv + q + q) * c + shape.heads * 4  # + log-sum-exp per head
    if autocast:
        # fp32 residual stream; every matmul input is cast to bf16 again (q, k, v, o, gate, up).
        norms = 2 * (4 * h + 8 * h)
        attention += 4 * 2 * h
        mlp += 2 * 2 * h
    return tokens * (norms + attention + mlp)


def memory_plan(
    config: dict[str, Any], tc: TrainConfig, *, top_k: int, lam: float | None = None
) -> MemoryPlan:
    """The plan for training the model `config` describes with `tc` (see the module docstring).

    Args:
        config: the target's `config.json`.
        tc: the train section.
        top_k: entries per fused position.
        lam: defaults to `tc.lam`; at 1 no fused tensors reach the loss.
    """
    shape = model_shape(config)
    strategy = resolve_strategy(tc)
    c = _compute_bytes(tc)
    bf16 = c == 2
    fsdp = strategy == "fsdp"
    world = tc.num_workers
    shard = world if fsdp else 1
    p = shape.parameters
    tokens = tc.micro_batch * tc.block_size
    lam = tc.lam if lam is None else lam
    autocast = bf16 and not fsdp

    per_layer = _layer_activation_bytes(shape, tokens, c, autocast)
    final_norm = tokens * (4 * shape.hidden + 2 * c * shape.hidden)
    full = shape.layers * per_layer + final_norm
    # Checkpointing keeps each layer's input and recomputes one layer at a time.
    layer_input = tokens * shape.hidden * (4 if autocast else c)
    checkpointed = shape.layers * layer_input + per_layer + final_norm
    activations = checkpointed if tc.activation_checkpointing else full

    offload = fsdp and tc.cpu_offload and tc.use_gpu
    lines: list[tuple[str, int]] = [
        ("parameters (fp32)", 0 if offload else p * 4 // shard),
        ("gradients (fp32)", 0 if offload else p * 4 // shard),
        ("optimizer state (AdamW, fp32)", 0 if offload else p * 8 // shard),
        (
            "activations" + (" (checkpointed)" if tc.activation_checkpointing else ""),
            activations,
        ),
        ("logits and loss", tokens * shape.vocab * 20),
        (
            "fused-target tensors",
            tokens * 16 + (tokens * top_k * 28 if lam < 1.0 else 0),
        ),
    ]
    if fsdp:
        lines.append(
            (
                "fsdp unsharded parameters and grads",
                shape.root_parameters * c + 2 * shape.layer_parameters * (c + 4),
            )
        )
    if autocast:
        lines.append(("autocast bf16 weight cache", p * 2))
    accelerator = tc.accelerator_type or ("GPU" if tc.use_gpu else "CPU")
    budget_gib = tc.gpu_memory_gib or ACCELERATOR_MEMORY_GIB.get(
        tc.accelerator_type or "", DEFAULT_GPU_GIB
    )
    subtotal = sum(b for _, b in lines)
    reserve = int(CUDA_CONTEXT_BYTES + FRAGMENTATION * subtotal) if tc.use_gpu else 0
    return MemoryPlan(
        strategy=strategy,
        precision="bf16" if bf16 else "fp32",
        workers=world,
        tokens=tokens,
        parameters=p,
        lines=tuple(lines),
        activations_without_checkpointing=full,
        activations_with_checkpointing=checkpointed,
        reserve=reserve,
        budget=int(budget_gib * GIB),
        accelerator=accelerator,
    )
