"""Scoring saved models on text: total NLL, tokens and UTF-8 bytes.

Token perplexity is not comparable across tokenizers; bits per UTF-8 byte (total NLL / ln 2 /
bytes of the same text) is. Each text is scored after an EOS token, the way documents follow
each other in the training stream; the EOS after the text is not scored (it is not part of the
text's bytes). Texts longer than the window are scored in consecutive windows, so every token is
predicted exactly once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["TextScore", "score_texts"]


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
    if window <= 0:
        window = int(
            getattr(model.config, "max_position_embeddings", 0)
            or getattr(model.config, "n_positions", 0)
            or 1024
        )
    if window < 2:
        raise ValueError("window must be at least 2")
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
