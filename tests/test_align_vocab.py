"""Tests of the vocabulary map (fusion_etl.align.vocab) on hand-built and kit tokenizers."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

from fusion_etl.align.tokens import TokenizerView, view_of
from fusion_etl.align.vocab import (
    MATCH_BYTES,
    MATCH_EXACT,
    MATCH_MINED,
    MATCH_NAMES,
    MATCH_SPECIAL,
    VocabMap,
    map_vocab,
)

# A GPT-NeoX-style byte-level vocabulary; id 11 is left out on purpose (a hole).
NEOX_VOCAB = {
    "Ġthe": 1,
    "Ċ": 2,
    "the": 3,
    "Ã": 4,  # the single byte 0xC3 (half of "é"), not the character U+00C3
    "ĉ": 5,  # a tab
    "Ġcat": 6,
    "Ġkitten": 7,
    "Ġdog": 12,
}
NEOX_SPECIALS = {"<|endoftext|>": 0, "<|im_start|>": 8, "<s>": 9, "<|pad|>": 10}

# A Llama-style Metaspace vocabulary with byte pieces.
LLAMA_VOCAB = {
    "<unk>": 0,
    "<s>": 1,
    "</s>": 2,
    "<pad>": 3,
    "<0x09>": 4,
    "<0x0A>": 5,
    "<0xC3>": 6,
    "▁the": 7,
    "the": 8,
    "Ã": 9,  # the character U+00C3, bytes c3 83
    "\t": 10,
    "▁cut": 11,
    "▁ca": 12,
    "▁sitting": 13,
    "▁dog": 14,
    "▁": 15,
}
LLAMA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def _byte_level_tokenizer() -> Tokenizer:
    vocab = {**NEOX_VOCAB, **NEOX_SPECIALS}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(NEOX_SPECIALS))
    return tok


def _metaspace_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(vocab=dict(LLAMA_VOCAB), merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.add_special_tokens(LLAMA_SPECIALS)
    return tok


@pytest.fixture(scope="module")
def neox() -> TokenizerView:
    # One string holds eos, bos and unk, as in GPT-NeoX; <s> is special without a role here.
    return view_of(
        _byte_level_tokenizer(),
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|pad|>",
    )


@pytest.fixture(scope="module")
def llama() -> TokenizerView:
    return view_of(
        _metaspace_tokenizer(),
        eos_token="</s>",
        bos_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )


def levenshtein(a: bytes, b: bytes) -> int:
    """Plain dynamic-programming edit distance, the reference for the C++ one."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def brute_nearest(source: TokenizerView, target: TokenizerView, source_id: int) -> tuple[int, int]:
    """First-minimum nearest ordinary target token by a Python loop over the whole vocabulary."""
    roles = {target.eos_id, target.bos_id, target.unk_id, target.pad_id}
    query = source.token_bytes(source_id)
    best, best_dist = -1, -1
    for tid, tok in enumerate(target.tokens):
        if not tok or tid in target.special_ids or tid in roles:
            continue
        d = levenshtein(query, target.token_bytes(tid))
        if best < 0 or d < best_dist:
            best, best_dist = tid, d
    return best, best_dist


def _entry(vmap: VocabMap, source_id: int) -> tuple[int, int, str]:
    return (
        int(vmap.target_id[source_id]),
        int(vmap.distance[source_id]),
        MATCH_NAMES[vmap.how[source_id]],
    )


def test_views_are_what_the_tests_assume(neox: TokenizerView, llama: TokenizerView) -> None:
    assert neox.kind == "byte_level" and llama.kind == "metaspace"
    assert neox.tokens[11] == ""  # the hole
    assert neox.token_bytes(4) == b"\xc3" and llama.token_bytes(9) == "Ã".encode()


def test_byte_level_to_metaspace(neox: TokenizerView, llama: TokenizerView) -> None:
    vmap = map_vocab(neox, llama, chunk=1)
    expected = {
        0: (2, 0, "special"),  # eos (also bos, unk) -> eos: <|endoftext|> -> </s>
        1: (7, 0, "exact"),  # Ġthe -> ▁the
        2: (5, 0, "bytes"),  # Ċ -> <0x0A>
        3: (8, 0, "exact"),  # the -> the
        # Byte 0xC3 -> the byte piece, although "Ã" (U+00C3) is spelled the same.
        4: (6, 0, "bytes"),
        # A tab: the ordinary piece "\t" beats the byte piece <0x09> of lower id.
        5: (10, 0, "bytes"),
        # " cat": "▁cut" and "▁ca" are both at distance 1; the lower id wins.
        6: (11, 1, "mined"),
        7: (13, 3, "mined"),  # " kitten" -> " sitting", the textbook distance 3
        8: (0, 0, "special"),  # <|im_start|>: no role, no such string -> unk
        9: (1, 0, "special"),  # <s>: no role in the source, same string in the target
        10: (3, 0, "special"),  # pad -> pad
        11: (0, 0, "special"),  # a hole -> unk
        12: (14, 0, "exact"),  # Ġdog -> ▁dog
    }
    assert {sid: _entry(vmap, sid) for sid in range(len(neox.tokens))} == expected
    for sid in np.flatnonzero(vmap.how == MATCH_MINED):
        assert brute_nearest(neox, llama, int(sid)) == _entry(vmap, int(sid))[:2]


def test_metaspace_to_byte_level(neox: TokenizerView, llama: TokenizerView) -> None:
    vmap = map_vocab(llama, neox)
    assert _entry(vmap, 2) == (0, 0, "special")  # </s> -> <|endoftext|>
    assert _entry(vmap, 0) == (0, 0, "special")  # <unk> -> the unk role, the same string
    assert _entry(vmap, 3) == (10, 0, "special")  # <pad> -> <|pad|>
    assert _entry(vmap, 1) == (0, 0, "special")  # <s> -> bos role: <|endoftext|>, not "<s>"
    assert _entry(vmap, 5) == (2, 0, "bytes")  # <0x0A> -> Ċ
    assert _entry(vmap, 6) == (4, 0, "bytes")  # <0xC3> -> Ã (the byte)
    assert _entry(vmap, 4) == (5, 0, "bytes")  # <0x09> -> ĉ
    assert _entry(vmap, 7) == (1, 0, "exact")  # ▁the -> Ġthe
    # U+00C3 is c3 83: "Ã" has the same spelling but is one byte short of it.
    assert _entry(vmap, 9) == (4, 1, "mined")
    assert _entry(vmap, 15) == (*brute_nearest(llama, neox, 15), "mined")


def test_llama2_style_tokenizer_json_maps_like_metaspace(neox: TokenizerView) -> None:
    tok = Tokenizer(models.BPE(vocab={"▁the": 0, "<0x0A>": 1}, merges=[], byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    vmap = map_vocab(view_of(tok), neox)
    assert [_entry(vmap, 0), _entry(vmap, 1)] == [(1, 0, "exact"), (2, 0, "bytes")]


def test_bytes_ties_go_to_the_lowest_id() -> None:
    # A byte-level vocabulary with a newline twice: Ċ and a literal "\n" added as a token.
    target = TokenizerView(
        kind="byte_level", tokens=("<eos>", "x", "\n", "Ċ"), special_ids=frozenset({0}), eos_id=0
    )
    source = TokenizerView(
        kind="metaspace", tokens=("</s>", "<0x0A>"), special_ids=frozenset({0}), eos_id=0
    )
    vmap = map_vocab(source, target)
    assert _entry(vmap, 1) == (2, 0, "bytes")
    assert _entry(vmap, 0) == (0, 0, "special")


def test_byte_piece_loses_to_an_ordinary_piece_of_higher_id() -> None:
    target = TokenizerView(
        kind="metaspace",
        tokens=("<unk>", "<0x0A>", "<0x0a>", "a", "\n"),
        special_ids=frozenset({0}),
        unk_id=0,
    )
    source = TokenizerView(kind="byte_level", tokens=("Ċ", "ċ"), special_ids=frozenset())
    vmap = map_vocab(source, target)
    assert _entry(vmap, 0) == (4, 0, "bytes")
    # Only byte pieces stand for 0x0B... none here, so it is mined: <0x0A> (id 1) first.
    assert _entry(vmap, 1) == (1, 1, "mined")


def test_specials_fall_back_to_eos_without_unk() -> None:
    target = TokenizerView(
        kind="plain", tokens=("a", "[END]", "", "b"), special_ids=frozenset({1}), eos_id=1
    )
    source = TokenizerView(
        kind="plain", tokens=("[CLS]", "", "b", "[SEP]"), special_ids=frozenset({0, 3}), eos_id=3
    )
    vmap = map_vocab(source, target)
    assert [_entry(vmap, i) for i in range(4)] == [
        (1, 0, "special"),  # no role, no such string, no unk: eos
        (1, 0, "special"),  # hole
        (3, 0, "exact"),
        (1, 0, "special"),  # eos
    ]
    # The target hole (id 2, bytes b"") is never a candidate, though nearest to anything short.
    assert 2 not in set(vmap.target_id.tolist())


def test_no_fallback_is_an_error() -> None:
    target = TokenizerView(kind="plain", tokens=("a",), special_ids=frozenset())
    source = TokenizerView(kind="plain", tokens=("<s>",), special_ids=frozenset({0}), bos_id=0)
    with pytest.raises(ValueError, match="neither an unk nor an eos"):
        map_vocab(source, target)
    with pytest.raises(ValueError, match="chunk"):
        map_vocab(target, target, chunk=0)


def test_long_tokens_beyond_the_uint8_cap() -> None:
    target = TokenizerView(kind="plain", tokens=("bbb", "ab", "z" * 400), special_ids=frozenset())
    source = TokenizerView(kind="plain", tokens=("a" * 300, "b" * 290), special_ids=frozenset())
    vmap = map_vocab(source, target)
    assert _entry(vmap, 0) == (1, 299, "mined")
    assert _entry(vmap, 1) == (0, 287, "mined")


_ALPHABET = st.text(alphabet="ab c\u00e9", min_size=1, max_size=6)


@settings(max_examples=40, deadline=None)
@given(
    source_tokens=st.lists(_ALPHABET, min_size=1, max_size=12, unique=True),
    target_tokens=st.lists(_ALPHABET, min_size=1, max_size=25, unique=True),
    chunk=st.integers(min_value=1, max_value=5),
)
def test_matches_a_brute_force_reference(
    source_tokens: list[str], target_tokens: list[str], chunk: int
) -> None:
    source = TokenizerView(kind="plain", tokens=tuple(source_tokens), special_ids=frozenset())
    target = TokenizerView(kind="plain", tokens=tuple(target_tokens), special_ids=frozenset())
    vmap = map_vocab(source, target, chunk=chunk, workers=1)
    for sid, tok in enumerate(source_tokens):
        if tok in target_tokens:
            assert _entry(vmap, sid) == (target_tokens.index(tok), 0, "exact")
        else:
            assert _entry(vmap, sid) == (*brute_nearest(source, target, sid), "mined")


def test_arrow_round_trip_and_lookup(neox: TokenizerView, llama: TokenizerView) -> None:
    vmap = map_vocab(neox, llama)
    table = vmap.to_arrow()
    assert table.schema == pa.schema(
        [
            ("source_id", pa.int32()),
            ("target_id", pa.int32()),
            ("distance", pa.int32()),
            ("how", pa.string()),
        ]
    )
    assert set(table.column("how").to_pylist()) == {"exact", "bytes", "mined", "special"}
    back = VocabMap.from_arrow(table.take(pa.array(np.arange(len(vmap))[::-1])))
    for name in ("target_id", "distance", "how"):
        np.testing.assert_array_equal(getattr(back, name), getattr(vmap, name))
        assert getattr(back, name).dtype == getattr(vmap, name).dtype

    ids = np.array([[1, 2, 0], [12, 12, 7]], dtype=np.int64)
    np.testing.assert_array_equal(vmap(ids), [[7, 5, 2], [14, 14, 13]])
    assert vmap(ids).dtype == np.int32
    assert vmap(np.array([], dtype=np.int32)).shape == (0,)
    with pytest.raises(ValueError, match="source ids"):
        vmap(np.array([-1]))
    with pytest.raises(ValueError, match="source ids"):
        vmap(np.array([len(vmap)]))
    assert vmap.counts() == {"exact": 3, "bytes": 3, "special": 5, "mined": 2}


def test_from_arrow_rejects_bad_tables() -> None:
    good = pa.table(
        {
            "source_id": pa.array([0, 1], pa.int32()),
            "target_id": pa.array([3, 4], pa.int32()),
            "distance": pa.array([0, 2], pa.int32()),
            "how": ["exact", "mined"],
        }
    )
    assert VocabMap.from_arrow(good).how.tolist() == [MATCH_EXACT, MATCH_MINED]
    with pytest.raises(ValueError, match="lacks columns"):
        VocabMap.from_arrow(good.drop_columns(["distance"]))
    with pytest.raises(ValueError, match=r"0\.\.n-1"):
        VocabMap.from_arrow(good.set_column(0, "source_id", pa.array([0, 2], pa.int32())))
    with pytest.raises(ValueError, match="unknown"):
        VocabMap.from_arrow(good.set_column(3, "how", pa.array(["exact", "fuzzy"])))


# --- the kit's real tokenizers -----------------------------------------------------------------


def _kit_view(path: Any) -> TokenizerView:
    from transformers import PreTrainedTokenizerFast

    from fusion_etl.tokenization import load_tokenizer

    wrapped = PreTrainedTokenizerFast.from_pretrained(str(path))
    return view_of(
        load_tokenizer(str(path)),
        eos_token=wrapped.eos_token,
        bos_token=wrapped.bos_token,
        unk_token=wrapped.unk_token,
        pad_token=wrapped.pad_token,
    )


@pytest.mark.slow
def test_kit_sources_to_target(test_kit: Any) -> None:
    target = _kit_view(test_kit.target.path)
    rng = random.Random(0)
    for model in test_kit.sources:
        source = _kit_view(model.path)
        vmap = map_vocab(source, target)
        assert len(vmap) == len(source.tokens)
        assert ((vmap.target_id >= 0) & (vmap.target_id < len(target.tokens))).all()
        assert source.eos_id is not None and target.eos_id is not None
        assert vmap.target_id[source.eos_id] == target.eos_id
        assert vmap.how[source.eos_id] == MATCH_SPECIAL
        for sid in np.flatnonzero(np.isin(vmap.how, [MATCH_EXACT, MATCH_BYTES])):
            assert source.token_bytes(int(sid)) == target.token_bytes(int(vmap.target_id[sid]))
            assert vmap.distance[sid] == 0
        mined = np.flatnonzero(vmap.how == MATCH_MINED).tolist()
        assert mined, model.name
        for sid in rng.sample(mined, min(200, len(mined))):
            assert brute_nearest(source, target, sid) == _entry(vmap, sid)[:2], (model.name, sid)
        # Neither threads nor chunking change the result.
        other = map_vocab(source, target, workers=1, chunk=7)
        np.testing.assert_array_equal(other.target_id, vmap.target_id)
        np.testing.assert_array_equal(other.distance, vmap.distance)


@pytest.mark.slow
def test_kit_vocabulary_maps_onto_itself(test_kit: Any) -> None:
    for model in test_kit.models:
        view = _kit_view(model.path)
        vmap = map_vocab(view, view)
        np.testing.assert_array_equal(vmap.target_id, np.arange(len(view.tokens)))
        assert set(vmap.how.tolist()) <= {MATCH_EXACT, MATCH_SPECIAL}
