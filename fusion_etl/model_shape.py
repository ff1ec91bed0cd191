"""The shape of a causal LM from its Hugging Face `config.json`: parameters, widths, depth.

Pure: a dict in, numbers out; no torch, no weights. Used by the training memory plan and the
cost estimate, which must work from a config alone (a 7B model's weights need not be on the
machine that plans its job).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fusion_etl.errors import UserError

__all__ = ["SUPPORTED_MODEL_TYPES", "ModelShape", "model_shape", "parameter_count"]

SUPPORTED_MODEL_TYPES = ("gpt2", "gpt_neox", "llama", "mistral", "mpt", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelShape:
    """What the memory plan needs to know about a model."""

    family: str
    """`llama` (Llama, Mistral, Qwen2: gated MLP, RMSNorm), `gpt_neox`, `gpt2` or `mpt`."""
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    parameters: int
    """Every parameter once (tied embeddings counted once)."""
    layer_parameters: int
    """Parameters of one decoder layer."""
    gated_mlp: bool

    @property
    def root_parameters(self) -> int:
        """Parameters outside the decoder layers (embeddings, final norm, output head)."""
        return self.parameters - self.layers * self.layer_parameters


def _get(config: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if config.get(name) is not None:
            return config[name]
    if default is None:
        raise UserError(f"config.json has none of {', '.join(names)}: cannot size the model")
    return default


def model_shape(config: Mapping[str, Any]) -> ModelShape:
    """The shape of the model a `config.json` describes.

    Raises:
        UserError: an architecture this function does not know, or a config without its sizes.
    """
    model_type = str(config.get("model_type", ""))
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"config.json model_type {model_type!r} is not one the memory plan knows "
            f"({', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    vocab = int(_get(config, "vocab_size"))
    if model_type in {"llama", "mistral", "qwen2", "qwen3"}:
        h = int(_get(config, "hidden_size"))
        a = int(_get(config, "num_attention_heads"))
        kv = int(_get(config, "num_key_value_heads", default=a))
        hd = int(_get(config, "head_dim", default=h // a))
        i = int(_get(config, "intermediate_size"))
        n = int(_get(config, "num_hidden_layers"))
        tied = bool(config.get("tie_word_embeddings", False))
        attn = h * a * hd + 2 * h * kv * hd + a * hd * h
        if model_type == "qwen2" or config.get("attention_bias"):
            attn += a * hd + 2 * kv * hd + (h if config.get("attention_bias") else 0)
        if model_type == "qwen3":
            attn += 2 * hd  # q_norm and k_norm
        mlp = 3 * h * i + (2 * i + h if config.get("mlp_bias") else 0)
        layer = attn + mlp + 2 * h
        root = vocab * h * (1 if tied else 2) + h
        return ModelShape(
            "llama", h, i, n, a, kv, hd, vocab, tied, root + n * layer, layer, gated_mlp=True
        )
    if model_type == "gpt_neox":
        h = int(_get(config, "hidden_size"))
        a = int(_get(config, "num_attention_heads"))
        i = int(_get(config, "intermediate_size", default=4 * h))
        n = int(_get(config, "num_hidden_layers"))
        tied = bool(config.get("tie_word_embeddings", False))
        bias = bool(config.get("attention_bias", True))
        layer = 3 * h * h + h * h + 2 * h * i + 4 * h
        layer += (3 * h + h) if bias else 0
        layer += i + h  # MLP biases
        root = vocab * h * (1 if tied else 2) + 2 * h
        return ModelShape(
            "gpt_neox", h, i, n, a, a, h // a, vocab, tied, root + n * layer, layer, False
        )
    if model_type == "gpt2":
        h = int(_get(config, "n_embd", "hidden_size"))
        a = int(_get(config, "n_head", "num_attention_heads"))
        n = int(_get(config, "n_layer", "num_hidden_layers"))
        i = int(config.get("n_inner") or 4 * h)
        positions = int(_get(config, "n_positions", "max_position_embeddings", default=1024))
        layer = (3 * h * h + 3 * h) + (h * h + h) + (h * i + i) + (i * h + h) + 4 * h
        tied = config.get("tie_word_embeddings") is not False  # GPT-2 ties unless told not to
        root = vocab * h * (1 if tied else 2) + positions * h + 2 * h
        return ModelShape(
            "gpt2", h, i, n, a, a, h // a, vocab, tied, root + n * layer, layer, False
        )
    if model_type == "mpt":
        h = int(_get(config, "d_model"))
        a = int(_get(config, "n_heads"))
        n = int(_get(config, "n_layers"))
        i = int(float(_get(config, "expansion_ratio", default=4)) * h)
        bias = not bool(config.get("no_bias", True))
        layer = 3 * h * h + h * h + 2 * h * i + (2 * h if not bias else 4 * h)
        if bias:
            layer += 3 * h + h + i + h
        tied = config.get("tie_word_embeddings") is not False  # MPT ties unless told not to
        root = vocab * h * (1 if tied else 2) + h
        return ModelShape("mpt", h, i, n, a, a, h // a, vocab, tied, root + n * layer, layer, False)
    raise UserError(
        f"config.json model_type {model_type!r} is not one the memory plan knows "
        "(llama, mistral, qwen2, qwen3, gpt_neox, gpt2, mpt)"
    )


def parameter_count(config: Mapping[str, Any]) -> int:
    """Every parameter of the model a `config.json` describes, tied embeddings once: what
    ``sum(p.numel() for p in model.parameters())`` gives for the model transformers builds."""
    return model_shape(config).parameters
