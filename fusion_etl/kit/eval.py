"""Bits per UTF-8 byte: a loss that compares models with different tokenizers."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from fusion_etl.kit._quiet import quiet_transformers
from fusion_etl.kit.models import token_id

__all__ = ["bits_per_byte"]


def bits_per_byte(model_path: str | Path, texts: Iterable[str], *, window: int = 128) -> float:
    """Measures a saved model's loss on texts in bits per UTF-8 byte.

    Token perplexities of models with different tokenizers are not comparable; the total
    information per byte of the same text is. Each text is scored after an EOS token, the way
    documents follow one another in the training stream; the EOS after the text is not scored
    (it is not part of the text's bytes). Texts longer than ``window`` tokens are scored in
    consecutive windows, each conditioned only on its own tokens, so every token is predicted
    exactly once.

    Args:
        model_path: A folder with a model and its tokenizer (``save_pretrained`` layout).
        texts: Texts to score; empty ones are skipped.
        window: Tokens per forward pass; the kit trains on windows of 128.

    Returns:
        Total bits divided by total UTF-8 bytes.

    Raises:
        ValueError: ``window`` below 2, or no non-empty text.
    """
    if window < 2:
        raise ValueError("window must be at least 2")
    with quiet_transformers():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(model_path))
        model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
    model.train(False)
    eos = token_id(tokenizer, str(tokenizer.eos_token))
    total_nats = 0.0
    total_bytes = 0
    with torch.inference_mode():
        for text in texts:
            if not text:
                continue
            # The backend tokenizer: the wrapper warns about texts longer than the context.
            encoded = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
            ids = [eos, *encoded.ids]
            total_bytes += len(text.encode("utf-8"))
            for start in range(0, len(ids) - 1, window):
                chunk = torch.tensor([ids[start : start + window + 1]], dtype=torch.long)
                inputs = chunk[:, :-1]
                logits = model(input_ids=inputs, attention_mask=torch.ones_like(inputs)).logits
                total_nats += float(
                    torch.nn.functional.cross_entropy(
                        logits[0].float(), chunk[0, 1:], reduction="sum"
                    )
                )
    if total_bytes == 0:
        raise ValueError("no non-empty text to score")
    return total_nats / math.log(2) / total_bytes
