"""Trains the three tokenizer kinds of the kit with the ``tokenizers`` library.

* ``sentencepiece_bpe`` (Llama-2 style): BPE over Metaspace words (``▁`` marks a word start),
  with byte fallback onto the 256 pieces ``<0x00>``..``<0xFF>``.
* ``byte_level_bpe`` (GPT-NeoX style): BPE over the GPT-2 byte alphabet (``Ġ`` = space,
  ``Ċ`` = newline); every text is representable without fallback.
* ``unigram`` (SentencePiece unigram style): Metaspace words, unigram LM segmentation, byte
  fallback like the first kind.

All three round-trip exactly: ``decode(encode(text)) == text`` for any text, including
leading spaces, newlines, tabs and characters the tokenizer never saw. None adds BOS or EOS
when encoding; callers append EOS themselves.
"""

from __future__ import annotations

import json
import math
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

__all__ = [
    "BYTE_PIECES",
    "SPECIALS",
    "TOKENIZER_KINDS",
    "SpecialTokens",
    "TokenizerKind",
    "detect_kind",
    "train_tokenizer",
]

TokenizerKind = Literal["sentencepiece_bpe", "byte_level_bpe", "unigram"]
TOKENIZER_KINDS: Final[tuple[TokenizerKind, ...]] = (
    "sentencepiece_bpe",
    "byte_level_bpe",
    "unigram",
)

BYTE_PIECES: Final[tuple[str, ...]] = tuple(f"<0x{b:02X}>" for b in range(256))
_SPACE: Final = "▁"


@dataclass(frozen=True)
class SpecialTokens:
    """The special token strings of one tokenizer kind.

    Attributes:
        eos: End of sequence; the pipeline appends it to every document.
        bos: Beginning of sequence (never added automatically).
        unk: Unknown token. Byte fallback means it is never produced for ordinary text.
    """

    eos: str
    bos: str
    unk: str

    def as_list(self) -> list[str]:
        """Returns the distinct strings, unk first (so it gets id 0 where there is one)."""
        return list(dict.fromkeys([self.unk, self.bos, self.eos]))


# Each kind has its own EOS string, so a pipeline that confuses two tokenizers fails loudly.
SPECIALS: Final[dict[TokenizerKind, SpecialTokens]] = {
    "sentencepiece_bpe": SpecialTokens(eos="</s>", bos="<s>", unk="<unk>"),
    "byte_level_bpe": SpecialTokens(eos="<|endoftext|>", bos="<|endoftext|>", unk="<|endoftext|>"),
    "unigram": SpecialTokens(eos="<eos>", bos="<bos>", unk="<unk>"),
}


def _metaspace_pipeline(tok: Tokenizer) -> None:
    """Sets the Llama-2 style normalizer, pre-tokenizer and decoder on ``tok``."""
    # Metaspace on its own skips its dummy prefix when the text already starts with a space, and
    # the decoder's Strip would then eat a real space (" x" -> "x"). Prepending in the
    # normalizer makes the prefix unconditional, like SentencePiece's add_dummy_prefix, so the
    # decoder can always strip exactly one.
    tok.normalizer = normalizers.Prepend(_SPACE)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=_SPACE, prepend_scheme="first", split=True
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace(_SPACE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )


def _top_alphabet(texts: Sequence[str], limit: int) -> list[str]:
    """Returns the ``limit`` most frequent characters, ties broken by code point.

    The trainer's own ``limit_alphabet`` breaks ties in hash-map order, which varies from run to
    run; choosing here keeps the vocabulary a pure function of the text.
    """
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(text.replace(" ", _SPACE))
    counts.pop(_SPACE, None)
    ranked = sorted(counts, key=lambda ch: (-counts[ch], ch))
    return [_SPACE, *ranked[: max(0, limit - 1)]]


def _append_byte_pieces_bpe(tok: Tokenizer) -> Tokenizer:
    state: dict[str, Any] = json.loads(tok.to_str())
    vocab: dict[str, int] = state["model"]["vocab"]
    clash = sorted(set(BYTE_PIECES) & set(vocab))
    if clash:
        # A trained token spelled like a byte piece would decode to that byte, not its text.
        raise ValueError(f"trained vocabulary already holds byte pieces {clash[:3]}")
    # Appended to the model vocabulary, not added as special tokens: added tokens are matched
    # in the raw input, so the literal text "<0x41>" would become byte 0x41.
    for piece in BYTE_PIECES:
        vocab[piece] = len(vocab)
    return Tokenizer.from_str(json.dumps(state))


def _append_byte_pieces_unigram(tok: Tokenizer) -> Tokenizer:
    state: dict[str, Any] = json.loads(tok.to_str())
    vocab: list[list[Any]] = state["model"]["vocab"]
    clash = sorted(set(BYTE_PIECES) & {piece for piece, _ in vocab})
    if clash:
        raise ValueError(f"trained vocabulary already holds byte pieces {clash[:3]}")
    # Unlike BPE, the unigram lattice matches every piece against the input text, so the piece
    # "<0x41>" would also match the literal text "<0x41>" and decode to "A". Two things prevent
    # that: every printable ASCII character is in the vocabulary (the initial alphabet), so
    # such text always has an all-character path, and the byte pieces score far below any
    # such path. Byte fallback itself does not look at scores: it spells an out-of-vocabulary
    # character with these pieces whatever they score.
    floor = min(float(score) for _, score in vocab) - 1000.0
    vocab.extend([piece, floor] for piece in BYTE_PIECES)
    state["model"]["byte_fallback"] = True
    return Tokenizer.from_str(json.dumps(state))


def _train_sentencepiece_bpe(
    texts: Sequence[str], vocab_size: int, specials: SpecialTokens, limit_alphabet: int
) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=specials.unk, byte_fallback=True, fuse_unk=True))
    _metaspace_pipeline(tok)
    alphabet = _top_alphabet(texts, limit_alphabet)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(BYTE_PIECES),
        special_tokens=specials.as_list(),
        initial_alphabet=alphabet,
        # Equal to the pinned alphabet: everything else is dropped and falls back to bytes.
        limit_alphabet=len(alphabet),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return _append_byte_pieces_bpe(tok)


def _train_byte_level_bpe(
    texts: Sequence[str], vocab_size: int, specials: SpecialTokens
) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials.as_list(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _train_unigram(texts: Sequence[str], vocab_size: int, specials: SpecialTokens) -> Tokenizer:
    tok = Tokenizer(models.Unigram())
    _metaspace_pipeline(tok)
    ascii_alphabet = [_SPACE, "\n", "\t", *string.ascii_letters, *string.digits]
    ascii_alphabet += list(string.punctuation)
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size - len(BYTE_PIECES),
        special_tokens=specials.as_list(),
        unk_token=specials.unk,
        initial_alphabet=ascii_alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return _append_byte_pieces_unigram(_canonical_unigram(tok, texts, specials))


def _canonical_unigram(tok: Tokenizer, texts: Sequence[str], specials: SpecialTokens) -> Tokenizer:
    """Re-derives a trained unigram model's scores and order deterministically.

    The unigram trainer returns the same pieces from run to run but not the same model: it walks
    hash maps (randomly seeded per process) when it sums expected counts, gives the characters
    it must keep tie-breaking scores in that order, and lists them first in that order. So the
    ids and scores change between identical runs. Here the pieces are kept, the text is
    segmented once with the trained scores (small score noise does not change a segmentation),
    and each piece is scored by its smoothed frequency in that segmentation, one step of Viterbi
    training. Ids follow (specials, then by count, then by spelling), a pure function of the
    text.
    """
    state: dict[str, Any] = json.loads(tok.to_str())
    trained: dict[str, float] = {piece: float(score) for piece, score in state["model"]["vocab"]}
    fixed = specials.as_list()
    pieces = sorted(piece for piece in trained if piece not in fixed)
    provisional = [[piece, 0.0] for piece in fixed] + [[piece, trained[piece]] for piece in pieces]
    state["model"]["vocab"] = provisional
    state["model"]["unk_id"] = fixed.index(specials.unk)
    segmenter = Tokenizer.from_str(json.dumps(state))
    counts: Counter[int] = Counter()
    for encoding in segmenter.encode_batch(list(texts), add_special_tokens=False):
        counts.update(encoding.ids)
    count_of = {piece: counts[len(fixed) + i] for i, piece in enumerate(pieces)}
    ranked = sorted(pieces, key=lambda piece: (-count_of[piece], piece))
    total = sum(count_of.values()) + len(ranked)
    state["model"]["vocab"] = [[piece, 0.0] for piece in fixed] + [
        [piece, math.log((count_of[piece] + 1) / total)] for piece in ranked
    ]
    return Tokenizer.from_str(json.dumps(state))


def train_tokenizer(
    kind: TokenizerKind,
    texts: Sequence[str],
    *,
    vocab_size: int,
    limit_alphabet: int = 120,
    model_max_length: int = 512,
) -> PreTrainedTokenizerFast:
    """Trains a tokenizer of one kind and wraps it for ``save_pretrained``.

    Args:
        kind: Which tokenizer kind.
        texts: Training documents. Unigram training is slow: keep these to about 1 MB.
        vocab_size: Total vocabulary size, the 256 byte pieces of the Metaspace kinds included.
        limit_alphabet: ``sentencepiece_bpe`` only: how many distinct characters to keep; the
            rest are spelled with byte pieces.
        model_max_length: Recorded in the tokenizer config (the model's context).

    Returns:
        The wrapped tokenizer with eos, bos, unk (and pad = eos) set.

    Raises:
        ValueError: Unknown kind, or a vocabulary too small for the kind.
    """
    specials = SPECIALS[kind]
    if kind != "byte_level_bpe" and vocab_size <= len(BYTE_PIECES) + 64:
        raise ValueError(f"{kind} needs vocab_size above {len(BYTE_PIECES) + 64}")
    if kind == "sentencepiece_bpe":
        tok = _train_sentencepiece_bpe(texts, vocab_size, specials, limit_alphabet)
    elif kind == "byte_level_bpe":
        tok = _train_byte_level_bpe(texts, vocab_size, specials)
    elif kind == "unigram":
        tok = _train_unigram(texts, vocab_size, specials)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=specials.eos,
        bos_token=specials.bos,
        unk_token=specials.unk,
        pad_token=specials.eos,
        model_max_length=model_max_length,
    )


def detect_kind(tokenizer_json: dict[str, Any]) -> TokenizerKind:
    """Tells the kind of a saved tokenizer from its ``tokenizer.json`` content.

    Args:
        tokenizer_json: The parsed ``tokenizer.json``.

    Returns:
        The kind.

    Raises:
        ValueError: The file matches none of the kit's kinds.
    """
    model_type = tokenizer_json["model"]["type"]
    pre = tokenizer_json.get("pre_tokenizer") or {}
    pre_type = pre.get("type")
    if model_type == "BPE" and pre_type == "ByteLevel":
        return "byte_level_bpe"
    if model_type == "BPE" and pre_type == "Metaspace" and tokenizer_json["model"]["byte_fallback"]:
        return "sentencepiece_bpe"
    if model_type == "Unigram" and pre_type == "Metaspace":
        return "unigram"
    raise ValueError(f"not a kit tokenizer: model {model_type}, pre-tokenizer {pre_type}")
