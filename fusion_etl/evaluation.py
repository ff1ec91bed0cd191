"""Scoring saved models on text: total NLL, tokens and UTF-8 bytes; ensembles; text sets.

Token perplexity is not comparable across tokenizers; bits per UTF-8 byte (total NLL / ln 2 /
bytes of the same text) is. Each text is scored after an EOS token, the way documents follow
each other in the training stream; the EOS after the text is not scored (it is not part of the
text's bytes). Texts longer than the window are scored in consecutive windows, so every token is
predicted exactly once. An ensemble of models that share one tokenizer is scored the same way,
with each next-token distribution the weighted average of its members' probabilities.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusion_etl import storage
from fusion_etl.errors import InputDataError, UserError

__all__ = [
    "TextScore",
    "performance_losses",
    "read_text_sets",
    "score_ensemble",
    "score_texts",
]


@dataclass(frozen=True)
class TextScore:
    nats: float
    tokens: int
    """Predicted tokens (the text's own tokens)."""
    bytes: int

    @property
    def bits_per_byte(self) -> float:
        return self.nats / math.log(2) / max(self.bytes, 1)

    @property
    def token_perplexity(self) -> float:
        return math.exp(self.nats / max(self.tokens, 1))

    def __add__(self, other: TextScore) -> TextScore:
        return TextScore(
            self.nats + other.nats, self.tokens + other.tokens, self.bytes + other.bytes
        )


def read_text_sets(
    url: str, *, text_field: str = "text", domain_field: str = "domain", what: str = "input"
) -> tuple[dict[str, list[str]], list[list[Any]]]:
    """Texts of the jsonl files at `url` grouped by their domain field (`all` where missing),
    domains sorted, and [relative name, size] of each file (for fingerprints)."""
    files = [u for u in storage.list_files(url) if u.endswith((".jsonl", ".jsonl.gz"))]
    if not files:
        raise UserError(f"{what}: no .jsonl files at {url}")
    by_domain: dict[str, list[str]] = defaultdict(list)
    for file_url in files:
        with storage.open_read(file_url) as fh:
            for n, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise InputDataError(
                        f"{file_url} line {n}: not valid JSON in UTF-8 ({exc})"
                    ) from None
                if not isinstance(row, dict) or text_field not in row:
                    raise InputDataError(f"{file_url} line {n}: no {text_field!r} field")
                by_domain[str(row.get(domain_field, "all"))].append(str(row[text_field]))
    return dict(sorted(by_domain.items())), [
        [storage.relative_name(url, u), storage.size(u)] for u in files
    ]


def _window(model: Any, window: int) -> int:
    if window <= 0:
        window = int(
            getattr(model.config, "max_position_embeddings", 0)
            or getattr(model.config, "n_positions", 0)
            or 1024
        )
    if window < 2:
        raise ValueError("window must be at least 2")
    return window


def score_ensemble(
    model_paths: Sequence[str | Path],
    weights: Sequence[float],
    texts: Iterable[str],
    *,
    window: int = 0,
) -> TextScore:
    """Total NLL of an ensemble on texts: at every position the members' next-token
    probabilities averaged with `weights` (normalised). The members must share a tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from fusion_etl.tokenization import tokenizer_fingerprint

    if len(model_paths) != len(weights) or not model_paths:
        raise ValueError("one weight per ensemble member")
    prints = {tokenizer_fingerprint(str(p)) for p in model_paths}
    if len(prints) != 1:
        raise UserError(
            "an ensemble averages next-token probabilities, so its members need one tokenizer; "
            f"these have {len(prints)} different ones: {', '.join(map(str, model_paths))}"
        )
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    log_w = torch.log(w / w.sum()).float()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(model_paths[0]))
    models: list[Any] = [
        AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32) for p in model_paths
    ]
    for m in models:
        m.train(False)
    window = min(_window(m, window) for m in models)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"{model_paths[0]}: the tokenizer has no EOS token to start texts with")
    nats, tokens, n_bytes = 0.0, 0, 0
    with torch.inference_mode():
        for text in texts:
            if not text:
                continue
            ids = [eos, *tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids]
            n_bytes += len(text.encode("utf-8"))
            tokens += len(ids) - 1
            for start in range(0, len(ids) - 1, window):
                chunk = torch.tensor([ids[start : start + window + 1]], dtype=torch.long)
                inputs = chunk[:, :-1]
                # log sum_i w_i p_i(v), from each member's log-softmax, without leaving log space.
                mixed = torch.logsumexp(
                    torch.stack(
                        [
                            torch.log_softmax(m(input_ids=inputs).logits[0].float(), dim=-1) + lw
                            for m, lw in zip(models, log_w, strict=True)
                        ]
                    ),
                    dim=0,
                )
                nats -= float(mixed.gather(-1, chunk[0, 1:].unsqueeze(-1)).sum())
    return TextScore(nats=nats, tokens=tokens, bytes=n_bytes)


def performance_losses(model_paths: Sequence[str | Path], texts: Sequence[str]) -> list[float]:
    """Bits per byte of each model on `texts` (validation text for performance weights)."""
    return [score_texts(p, texts).bits_per_byte for p in model_paths]


def score_texts(
    model_path: str | Path, texts: Iterable[str], *, window: int = 0, model: Any = None
) -> TextScore:
    """Total NLL of a saved model (its own tokenizer) on texts; empty texts are skipped.

    Args:
        model_path: a `save_pretrained` folder with the model and its tokenizer.
        texts: the texts.
        window: tokens per forward pass; 0: the model's max_position_embeddings.
        model: an already loaded model for `model_path` (optional).
    """
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(model_path))
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
    model.train(False)
    device = next(model.parameters()).device
    window = _window(model, window)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"{model_path}: the tokenizer has no EOS token to start texts with")
    nats = 0.0
    tokens = 0
    n_bytes = 0
    with torch.inference_mode():
        for text in texts:
            if not text:
                continue
            ids = [eos, *tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids]
            n_bytes += len(text.encode("utf-8"))
            tokens += len(ids) - 1
            for start in range(0, len(ids) - 1, window):
                chunk = torch.tensor(
                    [ids[start : start + window + 1]], dtype=torch.long, device=device
                )
                inputs = chunk[:, :-1]
                logits = model(input_ids=inputs, attention_mask=torch.ones_like(inputs)).logits
                nats += float(
                    torch.nn.functional.cross_entropy(
                        logits[0].float(), chunk[0, 1:], reduction="sum"
                    )
                )
    return TextScore(nats=nats, tokens=tokens, bytes=n_bytes)
