"""A causal LM's parameter count from its Hugging Face `config.json`, without its weights.

Counts what transformers builds for the config (every weight and bias, norms included, a tied
output embedding once), for the architectures FuseLLM-style jobs use: Llama, Mistral, Qwen2
(grouped-query attention, optional biases), GPT-NeoX, GPT-2 and MPT. The cost estimate
(`fusion-etl plan --estimate`) turns it into FLOPs; a memory planner can turn it into bytes.

Pure functions: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["SUPPORTED_MODEL_TYPES", "parameter_count"]


def _int(config: Mapping[str, Any], *keys: str, default: int | None = None) -> int:
    """The first of `keys` that the config sets (a value of None counts as unset)."""
    for key in keys:
        value = config.get(key)
        if value is not None:
            return int(value)
    if default is None:
        raise ValueError(f"config.json has none of {', '.join(keys)}")
    return default


def _tied(config: Mapping[str, Any], default: bool) -> bool:
    value = config.get("tie_word_embeddings")
    return default if value is None else bool(value)


def _llama_like(config: Mapping[str, Any], *, qkv_bias: bool, o_bias: bool) -> int:
    """Llama, Mistral, Qwen2: RMSNorm (weight only), q/k/v/o projections with grouped-query
    attention, a gated MLP (gate, up, down)."""
    hidden = _int(config, "hidden_size")
    heads = _int(config, "num_attention_heads")
    kv_heads = _int(config, "num_key_value_heads", default=heads)
    head_dim = _int(config, "head_dim", default=hidden // heads)
    inter = _int(config, "intermediate_size")
    vocab = _int(config, "vocab_size")
    layers = _int(config, "num_hidden_layers")
    mlp_bias = bool(config.get("mlp_bias", False))
    q, kv = heads * head_dim, kv_heads * head_dim
    attention = hidden * q + 2 * hidden * kv + q * hidden
    if qkv_bias:
        attention += q + 2 * kv
    if o_bias:
        attention += hidden
    mlp = 3 * hidden * inter + (2 * inter + hidden if mlp_bias else 0)
    layer = attention + mlp + 2 * hidden  # two RMSNorm weights
    embeddings = vocab * hidden * (1 if _tied(config, False) else 2)
    return layers * layer + hidden + embeddings


def _llama(config: Mapping[str, Any]) -> int:
    bias = bool(config.get("attention_bias", False))
    return _llama_like(config, qkv_bias=bias, o_bias=bias)


def _qwen2(config: Mapping[str, Any]) -> int:
    # Qwen2's q, k and v projections always carry a bias; its output projection never does.
    return _llama_like(config, qkv_bias=True, o_bias=False)


def _gpt_neox(config: Mapping[str, Any]) -> int:
    """GPT-NeoX: fused query_key_value, LayerNorms with bias, a plain MLP, untied by default."""
    hidden = _int(config, "hidden_size")
    inter = _int(config, "intermediate_size")
    vocab = _int(config, "vocab_size")
    layers = _int(config, "num_hidden_layers")
    bias = bool(config.get("attention_bias", True))
    attention = 3 * hidden * hidden + hidden * hidden + (4 * hidden if bias else 0)
    mlp = 2 * hidden * inter + inter + hidden
    layer = attention + mlp + 2 * 2 * hidden  # two LayerNorms, weight and bias
    embeddings = vocab * hidden * (1 if _tied(config, False) else 2)
    return layers * layer + 2 * hidden + embeddings


def _gpt2(config: Mapping[str, Any]) -> int:
    """GPT-2: learned positions, Conv1D projections with bias, output tied to the input."""
    hidden = _int(config, "n_embd", "hidden_size")
    inter = _int(config, "n_inner", default=4 * hidden)
    vocab = _int(config, "vocab_size")
    layers = _int(config, "n_layer", "num_hidden_layers")
    positions = _int(config, "n_positions", "max_position_embeddings", default=1024)
    attention = hidden * 3 * hidden + 3 * hidden + hidden * hidden + hidden
    mlp = 2 * hidden * inter + inter + hidden
    layer = attention + mlp + 2 * 2 * hidden
    embeddings = vocab * hidden * (1 if _tied(config, True) else 2) + positions * hidden
    return layers * layer + 2 * hidden + embeddings


def _mpt(config: Mapping[str, Any]) -> int:
    """MPT as transformers builds it: no biases anywhere (LayerNorms weight only), ALiBi
    always (transformers has no learned position table for MPT), output tied to the input."""
    hidden = _int(config, "d_model", "hidden_size")
    layers = _int(config, "n_layers", "num_hidden_layers")
    vocab = _int(config, "vocab_size")
    ratio = _int(config, "expansion_ratio", default=4)
    attention = 3 * hidden * hidden + hidden * hidden
    mlp = 2 * hidden * ratio * hidden
    layer = attention + mlp + 2 * hidden
    embeddings = vocab * hidden * (1 if _tied(config, True) else 2)
    return layers * layer + hidden + embeddings


_COUNTERS: dict[str, Callable[[Mapping[str, Any]], int]] = {
    "llama": _llama,
    "mistral": _llama,
    "qwen2": _qwen2,
    "gpt_neox": _gpt_neox,
    "gpt2": _gpt2,
    "mpt": _mpt,
}

SUPPORTED_MODEL_TYPES = tuple(sorted(_COUNTERS))


def parameter_count(config: Mapping[str, Any]) -> int:
    """Parameters of the model a `config.json` describes, tied embeddings counted once.

    Args:
        config: The parsed `config.json` (its `model_type` picks the architecture).

    Returns:
        The number of parameters, as ``sum(p.numel() for p in model.parameters())`` gives it
        for the model transformers builds from this config.

    Raises:
        ValueError: An unknown `model_type`, or a config without a size it needs.
    """
    model_type = str(config.get("model_type", ""))
    counter = _COUNTERS.get(model_type)
    if counter is None:
        raise ValueError(
            f"model_type {model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return counter(config)
