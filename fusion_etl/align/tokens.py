"""What each token of a vocabulary stands for, whatever the tokenizer kind.

Byte-level BPE (GPT-2/NeoX style) spells bytes with printable stand-ins (`Ġ` is a space, `Ċ` a
newline); SentencePiece-style vocabularies write a space as `▁` and unknown bytes as `<0x0A>`.
Mapping every token to the bytes it stands for makes `Ġfoo`, `▁foo` and ` foo` equal and
`<0x0A>`, `Ċ` and a newline equal: the basis for matching vocabularies and aligning tokens.
Pure functions: no I/O, no Ray.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

__all__ = [
    "BYTE_LEVEL_MARKER",
    "METASPACE_MARKER",
    "TokenizerView",
    "as_view",
    "byte_level_decoder",
    "strip_markers",
    "view_of",
]

BYTE_LEVEL_MARKER = "Ġ"
METASPACE_MARKER = "▁"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")

TokenizerKind = Literal["byte_level", "metaspace", "plain"]


@cache
def byte_level_decoder() -> dict[str, int]:
    """The GPT-2 byte-to-unicode table, inverted: stand-in character -> byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def strip_markers(token: str) -> str:
    """A token string without word-start markers (`Ġ`, `▁`): the reference DTW's cost input."""
    return token.replace(BYTE_LEVEL_MARKER, "").replace(METASPACE_MARKER, "")


@dataclass(frozen=True)
class TokenizerView:
    """A vocabulary seen as strings and as the bytes each token stands for."""

    kind: TokenizerKind
    tokens: tuple[str, ...]
    """Token string of each id (ids without a token are "")."""
    special_ids: frozenset[int]
    eos_id: int | None = None
    bos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None

    @property
    def marker(self) -> str | None:
        return {"byte_level": BYTE_LEVEL_MARKER, "metaspace": METASPACE_MARKER}.get(self.kind)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes token `token_id` stands for; special tokens stand for nothing (b"")."""
        if token_id in self.special_ids:
            return b""
        return token_to_bytes(self.tokens[token_id], self.kind)

    def all_token_bytes(self) -> list[bytes]:
        return [self.token_bytes(i) for i in range(len(self.tokens))]


def token_to_bytes(token: str, kind: TokenizerKind) -> bytes:
    """The bytes a (non-special) token string stands for under a tokenizer kind."""
    if kind == "byte_level":
        table = byte_level_decoder()
        if all(c in table for c in token):
            return bytes(table[c] for c in token)
        return token.encode("utf-8")
    if kind == "metaspace":
        m = _BYTE_PIECE.fullmatch(token)
        if m:
            return bytes([int(m.group(1), 16)])
        return token.replace(METASPACE_MARKER, " ").encode("utf-8")
    return token.encode("utf-8")


def _kind_of(spec: dict[str, Any]) -> TokenizerKind:
    """ByteLevel, Metaspace or the `▁` marker in the pre-tokenizer, decoder or normalizer decides."""
    # ensure_ascii=False: escaped JSON spells "▁" as \u2581, which would never match below.
    blob = json.dumps(
        [spec.get("pre_tokenizer"), spec.get("decoder"), spec.get("normalizer")], ensure_ascii=False
    )
    if '"ByteLevel"' in blob:
        return "byte_level"
    if '"Metaspace"' in blob or METASPACE_MARKER in blob:
        return "metaspace"
    return "plain"


def view_of(
    tokenizer: Any,
    *,
    eos_token: str | None = None,
    bos_token: str | None = None,
    unk_token: str | None = None,
    pad_token: str | None = None,
) -> TokenizerView:
    """A `TokenizerView` of a `tokenizers.Tokenizer` (or anything with `to_str()` and
    `get_vocab()`), with the special tokens' roles given by name."""
    spec = json.loads(tokenizer.to_str())
    vocab: dict[str, int] = tokenizer.get_vocab(with_added_tokens=True)
    size = max(vocab.values()) + 1 if vocab else 0
    tokens = [""] * size
    for tok, idx in vocab.items():
        tokens[idx] = tok
    special = frozenset(int(t["id"]) for t in spec.get("added_tokens", []) if t.get("special"))

    def role(name: str | None) -> int | None:
        return vocab.get(name) if name is not None else None

    return TokenizerView(
        kind=_kind_of(spec),
        tokens=tuple(tokens),
        special_ids=special,
        eos_id=role(eos_token),
        bos_id=role(bos_token),
        unk_id=role(unk_token),
        pad_id=role(pad_token),
    )


def as_view(tokenizer: Any) -> TokenizerView:
    """A `TokenizerView` of a view, a transformers fast tokenizer (special-token roles taken
    from it) or a bare `tokenizers.Tokenizer` (no roles)."""
    if isinstance(tokenizer, TokenizerView):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return view_of(
            backend,
            eos_token=tokenizer.eos_token,
            bos_token=tokenizer.bos_token,
            unk_token=tokenizer.unk_token,
            pad_token=tokenizer.pad_token,
        )
    return view_of(tokenizer)
