"""Configurations and a small, deterministic training loop for the kit's causal LMs.

Only architectures that vLLM 0.32 serves are used (Llama, GPT-NeoX, GPT-2; it dropped MPT after
0.28), and every shape keeps a head dimension of 64 because vLLM's CPU attention rejects
smaller ones (16 fails). The three differ where it matters for fusion: rotary vs learned
positions, RMSNorm vs LayerNorm, SiLU-gated vs GELU MLPs, parallel vs sequential residuals.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np
import numpy.typing as npt
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "ModelShape",
    "TrainResult",
    "TrainSettings",
    "make_model",
    "token_id",
    "token_stream",
    "train_causal_lm",
]

Architecture = Literal["LlamaForCausalLM", "GPTNeoXForCausalLM", "GPT2LMHeadModel"]
ARCHITECTURES: Final[tuple[Architecture, ...]] = (
    "LlamaForCausalLM",
    "GPTNeoXForCausalLM",
    "GPT2LMHeadModel",
)


@dataclass(frozen=True)
class ModelShape:
    """Width and depth of a kit model.

    Attributes:
        hidden: Model width; ``hidden // heads`` must be 64 for vLLM's CPU attention.
        heads: Attention heads.
        layers: Transformer blocks.
        max_positions: Longest sequence the model accepts (its context).
    """

    hidden: int
    heads: int
    layers: int
    max_positions: int

    def __post_init__(self) -> None:
        if self.hidden % self.heads or self.hidden // self.heads != 64:
            raise ValueError(f"head_dim must be 64, got hidden {self.hidden} / {self.heads}")


@dataclass(frozen=True)
class TrainSettings:
    """Budget and optimiser settings of one training run.

    Attributes:
        steps: Optimiser steps.
        batch_size: Windows per step.
        context: Tokens per window (the model also sees the token that follows).
        lr: Peak learning rate of AdamW.
        seed: Seeds the initial weights and the window sampling.
    """

    steps: int
    batch_size: int
    context: int
    lr: float
    seed: int


@dataclass(frozen=True)
class TrainResult:
    """What one training run did.

    Attributes:
        steps: Optimiser steps taken.
        tokens: Tokens predicted in all.
        first_loss: Mean loss of the first few steps (nats per token).
        last_loss: Mean loss of the last few steps (nats per token).
        seconds: Wall time.
    """

    steps: int
    tokens: int
    first_loss: float
    last_loss: float
    seconds: float


def token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    """Returns the id of one token string.

    Args:
        tokenizer: Any fast tokenizer.
        token: A token that is in its vocabulary.

    Returns:
        The id.

    Raises:
        ValueError: ``token`` is not in the vocabulary.
    """
    found = tokenizer.backend_tokenizer.token_to_id(token)
    if found is None:
        raise ValueError(f"{token!r} is not in the vocabulary")
    return int(found)


def _make_config(
    architecture: Architecture, shape: ModelShape, tokenizer: PreTrainedTokenizerFast
) -> PretrainedConfig:
    vocab = len(tokenizer)
    bos = token_id(tokenizer, str(tokenizer.bos_token))
    eos = token_id(tokenizer, str(tokenizer.eos_token))
    pad = eos  # the kit tokenizers have no pad token of their own
    config: PretrainedConfig
    if architecture == "LlamaForCausalLM":
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=shape.hidden,
            num_attention_heads=shape.heads,
            num_key_value_heads=shape.heads,
            num_hidden_layers=shape.layers,
            intermediate_size=4 * shape.hidden,
            max_position_embeddings=shape.max_positions,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=pad,
        )
    elif architecture == "GPTNeoXForCausalLM":
        config = GPTNeoXConfig(
            vocab_size=vocab,
            hidden_size=shape.hidden,
            num_attention_heads=shape.heads,
            num_hidden_layers=shape.layers,
            intermediate_size=4 * shape.hidden,
            max_position_embeddings=shape.max_positions,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=pad,
        )
    elif architecture == "GPT2LMHeadModel":
        config = GPT2Config(
            vocab_size=vocab,
            n_embd=shape.hidden,
            n_head=shape.heads,
            n_layer=shape.layers,
            n_positions=shape.max_positions,
            # GPT-2 defaults to 0.1 dropout everywhere; the other kit models use none, and
            # a few hundred steps on a tiny model gain nothing from it.
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=pad,
        )
    else:
        raise ValueError(f"unknown architecture {architecture!r}")
    config.architectures = [architecture]
    return config


_MODEL_CLASSES: Final[dict[Architecture, type[PreTrainedModel]]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "GPTNeoXForCausalLM": GPTNeoXForCausalLM,
    "GPT2LMHeadModel": GPT2LMHeadModel,
}


def make_model(
    architecture: Architecture,
    shape: ModelShape,
    tokenizer: PreTrainedTokenizerFast,
    *,
    seed: int,
) -> PreTrainedModel:
    """Builds a randomly initialised fp32 model whose vocabulary matches ``tokenizer``.

    Args:
        architecture: One of :data:`ARCHITECTURES`.
        shape: Width, heads, depth, context.
        tokenizer: Gives the vocabulary size and the bos/eos/pad ids.
        seed: Seeds the initial weights (the caller's torch RNG state is left alone).

    Returns:
        The model in training mode.
    """
    config = _make_config(architecture, shape, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # fp32: torch's default dtype, which the kit never changes.
        model = _MODEL_CLASSES[architecture](config)
    model.train()
    return model


def token_stream(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str]) -> npt.NDArray[np.int64]:
    """Tokenizes documents into one stream, each document followed by EOS.

    Args:
        tokenizer: A kit tokenizer (adds no BOS/EOS itself).
        texts: Documents.

    Returns:
        A 1-D int64 array.
    """
    eos = token_id(tokenizer, str(tokenizer.eos_token))
    encoded = tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False)
    pieces = [np.asarray([*enc.ids, eos], dtype=np.int64) for enc in encoded]
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def _lr_factor(step: int, steps: int) -> float:
    """Linear warm-up over 10% of the steps, then cosine decay to 10% of the peak."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_causal_lm(
    model: PreTrainedModel,
    streams: Sequence[npt.NDArray[np.int64]],
    settings: TrainSettings,
    *,
    log: Callable[[str], None] | None = None,
    name: str = "model",
) -> TrainResult:
    """Trains ``model`` on random windows of token streams with AdamW.

    Each window comes from a stream chosen uniformly, so several streams make an equal-weight
    mixture whatever their lengths. The run is deterministic for a given seed and thread
    count; the caller fixes the thread count.

    Args:
        model: The model, trained in place.
        streams: Token streams (see :func:`token_stream`), each longer than one window.
        settings: Budget and optimiser settings.
        log: Receives a line about every quarter of the run.
        name: Used in log lines.

    Returns:
        Losses and timing.

    Raises:
        ValueError: A stream is too short for one window.
    """
    span = settings.context + 1
    for k, stream in enumerate(streams):
        if len(stream) <= span:
            raise ValueError(f"{name}: stream {k} has {len(stream)} tokens, needs over {span}")
    data = [torch.from_numpy(stream) for stream in streams]
    rng = np.random.default_rng(settings.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.01
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, settings.steps)
    )
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    for step in range(settings.steps):
        which = rng.integers(len(data), size=settings.batch_size)
        rows = []
        for k in which:
            offset = int(rng.integers(len(data[k]) - span + 1))
            rows.append(data[k][offset : offset + span])
        batch = torch.stack(rows)
        inputs = batch[:, :-1]
        # An explicit all-ones mask: pad = eos and every window holds EOS tokens, which would
        # otherwise make transformers warn that the batch may be padded (it never is).
        logits = model(input_ids=inputs, attention_mask=torch.ones_like(inputs)).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if log is not None and (step + 1) % max(1, settings.steps // 4) == 0:
            log(f"{name}: step {step + 1}/{settings.steps} loss {losses[-1]:.3f}")
    model.train(False)
    window = max(1, min(10, settings.steps // 5))
    return TrainResult(
        steps=settings.steps,
        tokens=settings.steps * settings.batch_size * settings.context,
        first_loss=float(np.mean(losses[:window])),
        last_loss=float(np.mean(losses[-window:])),
        seconds=time.perf_counter() - start,
    )
