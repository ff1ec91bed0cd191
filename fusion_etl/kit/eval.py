"""Bits per UTF-8 byte: a loss that compares models with different tokenizers."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from fusion_etl.evaluation import score_texts
from fusion_etl.kit._quiet import quiet_transformers

__all__ = ["bits_per_byte"]


def bits_per_byte(model_path: str | Path, texts: Iterable[str], *, window: int = 128) -> float:
    """A saved model's loss on texts in bits per UTF-8 byte (see `fusion_etl.evaluation`).

    Args:
        model_path: A folder with a model and its tokenizer (``save_pretrained`` layout).
        texts: Texts to score; empty ones are skipped.
        window: Tokens per forward pass; the kit trains on windows of 128.

    Raises:
        ValueError: ``window`` below 2, or no non-empty text.
    """
    if window < 2:
        raise ValueError("window must be at least 2")
    with quiet_transformers():
        score = score_texts(model_path, texts, window=window)
    if score.bytes == 0:
        raise ValueError("no non-empty text to score")
    return score.bits_per_byte
