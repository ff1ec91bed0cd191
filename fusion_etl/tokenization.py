"""Loading tokenizers by URL, and their fingerprints."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

from fusion_etl import storage
from fusion_etl.errors import UserError

__all__ = ["load_tokenizer", "offsets_encoder", "tokenizer_fingerprint"]


def _tokenizer_json(url: str) -> bytes | None:
    target = storage.join(url, "tokenizer.json")
    return storage.read_bytes(target) if storage.exists(target) else None


@lru_cache(maxsize=32)
def load_tokenizer(url: str) -> Any:
    """The `tokenizers.Tokenizer` of a model folder (its `tokenizer.json`), cached per process.

    Counting and alignment use the bare tokenizer: it adds no BOS/EOS, which the stages add
    themselves where the method asks for them.
    """
    from tokenizers import Tokenizer

    blob = _tokenizer_json(url)
    if blob is not None:
        try:
            return Tokenizer.from_str(blob.decode("utf-8"))
        except Exception as exc:
            raise UserError(f"tokenizer at {url} cannot be loaded: {exc}") from None
    local = storage.local_path(url)
    if local is None or not local.exists():
        raise UserError(f"no tokenizer found at {url} (expected a folder with tokenizer.json)")
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(local), use_fast=True).backend_tokenizer
    except Exception as exc:
        raise UserError(f"tokenizer at {url} cannot be loaded: {exc}") from None


@lru_cache(maxsize=32)
def tokenizer_fingerprint(url: str) -> str:
    """Hash of the tokenizer's definition: equal hashes tokenize equally."""
    blob = _tokenizer_json(url)
    if blob is None:
        blob = load_tokenizer(url).to_str().encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def offsets_encoder(tokenizer: Any) -> Callable[[str], Sequence[tuple[int, int]]]:
    """text -> character (start, end) of each token, without special tokens."""

    def encode(text: str) -> Sequence[tuple[int, int]]:
        offsets: Sequence[tuple[int, int]] = tokenizer.encode(
            text, add_special_tokens=False
        ).offsets
        return offsets

    return encode
