"""Tests of token alignment (fusion_etl.align.dtw): the compiled DTW against the two references
of tests/align_reference.py (pure Python, and the FuseLLM code's own shape with
`editdistance`), and the offsets sweep on real tokenizations."""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusion_etl.align._dtw_kernel import DIAG, LEFT, UP, dtw_path_indices, dtw_steps
from fusion_etl.align.dtw import (
    _distinct_costs,
    align_tokens,
    bench_alignment,
    dtw_cost_matrix,
)
from tests.align_reference import editdistance_dtw, levenshtein, reference_dtw

if TYPE_CHECKING:
    from fusion_etl.kit.tokenizer_kit import TokenizerKind

AlignPath = list[tuple[int, int]]
Span = tuple[int, int]


def assert_valid_path(path: AlignPath, n: int, m: int) -> None:
    """Starts at (0, 0), ends at (n-1, m-1), unit steps only, so every index is covered."""
    assert path[0] == (0, 0)
    assert path[-1] == (n - 1, m - 1)
    for (i0, j0), (i1, j1) in itertools.pairwise(path):
        assert (i1 - i0, j1 - j0) in {(1, 0), (0, 1), (1, 1)}, (i0, j0, i1, j1)
    assert {i for i, _ in path} == set(range(n))
    assert {j for _, j in path} == set(range(m))


def both_dtw(source: Sequence[str], target: Sequence[str]) -> AlignPath:
    """The fast path, checked equal to both references' before it is returned."""
    fast = align_tokens(source, target, "dtw")
    assert fast == reference_dtw(source, target)
    assert fast == editdistance_dtw(source, target)
    return fast


# --- DTW: hand-worked cases ---------------------------------------------------------------
# In the comments c is the cost matrix (rows = source, columns = target), M the accumulated
# cost without the border, and the backtrace compares diag = M[i-1, j-1], up = M[i-1, j],
# left = M[i, j-1], taking the first minimum in that order.


def test_identical_tokens_align_one_to_one() -> None:
    # c = [[0,1,1],[1,0,1],[1,1,0]]; M = [[0,1,2],[1,0,1],[2,1,0]]; at (2,2) diag=0 wins,
    # at (1,1) diag=0 wins.
    assert both_dtw(["a", "b", "c"], ["a", "b", "c"]) == [(0, 0), (1, 1), (2, 2)]


def test_metaspace_and_byte_level_words_are_equal() -> None:
    # Markers stripped: The/cat/sat on both sides. c = [[0,3,3],[3,0,1],[3,1,0]];
    # M = [[0,3,6],[3,0,1],[6,1,0]]; (2,2): diag=0 < up=1, left=1; (1,1): diag=0.
    path = both_dtw(["▁The", "▁cat", "▁sat"], ["ĠThe", "Ġcat", "Ġsat"])
    assert path == [(0, 0), (1, 1), (2, 2)]


def test_one_source_token_to_two_target_tokens() -> None:
    # hello/world vs hel/lo/world: c = [[2,3,4],[4,4,0]].
    # M row 0 = [2,5,9]; M[1,0] = 4+2 = 6; M[1,1] = 4+min(5,6,2) = 6; M[1,2] = 0+min(9,6,5) = 5.
    # (1,2): diag=M[0,1]=5 < left=6 < up=9 -> (0,1); row 0 -> left -> (0,0).
    path = both_dtw(["▁hello", "▁world"], ["Ġhel", "lo", "Ġworld"])
    assert path == [(0, 0), (0, 1), (1, 2)]


def test_two_source_tokens_to_one_target_token() -> None:
    # The previous case transposed: M = [[2,6],[5,6],[9,5]].
    # (2,1): diag=M[1,0]=5 < up=6 < left=9 -> (1,0); column 0 -> up -> (0,0).
    path = both_dtw(["Ġhel", "lo", "Ġworld"], ["▁hello", "▁world"])
    assert path == [(0, 0), (1, 0), (2, 1)]


def test_single_token_sides_have_forced_paths() -> None:
    assert both_dtw(["▁hello"], ["Ġhel", "lo"]) == [(0, 0), (0, 1)]
    assert both_dtw(["Ġhel", "lo"], ["▁hello"]) == [(0, 0), (1, 0)]
    assert both_dtw(["x"], ["x"]) == [(0, 0)]


def test_token_empty_after_stripping_costs_the_other_length() -> None:
    # A lone "▁" strips to "" (the reference's cost breaks on it). Stripped: a,"",b vs a,b.
    # c = [[0,1],[1,1],[1,0]]; M = [[0,1],[1,1],[2,1]] (M[1,1] = 1+min(1,1,0)).
    # (2,1): diag=M[1,0]=1 ties up=M[1,1]=1 -> diag wins -> (1,0); column 0 -> (0,0).
    assert dtw_cost_matrix(["▁"], ["Ġab", "Ġ", ""]).tolist() == [[2, 0, 0]]
    assert both_dtw(["▁a", "▁", "b"], ["Ġa", "Ġb"]) == [(0, 0), (1, 0), (2, 1)]
    # A lone "Ġ" on the target side: c = [[0,1,1],[1,1,0]]; M = [[0,1,2],[1,1,1]].
    # (1,2): diag=M[0,1]=1 ties left=M[1,1]=1 (up=2) -> diag -> (0,1); row 0 -> (0,0).
    assert both_dtw(["▁a", "▁b"], ["Ġa", "Ġ", "b"]) == [(0, 0), (0, 1), (1, 2)]


def test_byte_fallback_pieces_against_one_character() -> None:
    # One target token: the path can only go down.
    assert both_dtw(["<0xE2>", "<0x80>", "<0x94>"], ["—"]) == [(0, 0), (1, 0), (2, 0)]
    # In context ("x — y"): the reference compares the spelling "<0xE2>" (distance 5 to "x",
    # 6 to "—" and "y"), not the byte, so the pieces pair poorly; the offsets method below
    # pairs them with "—". Stripped rows x,"",E2,80,94,y vs columns x,—,y:
    # c = [[0,1,1],[1,1,1],[5,6,6],[5,6,6],[5,6,6],[1,1,0]]
    # M = [[0,1,2],[1,1,2],[6,7,7],[11,12,13],[16,17,18],[17,17,17]]
    # (5,2): diag=M[4,1]=17 ties left=M[5,1]=17 (up=18) -> diag -> (4,1);
    # (4,1): diag=M[3,0]=11 < up=12 < left=16 -> (3,0); then up along column 0.
    source = ["▁x", "▁", "<0xE2>", "<0x80>", "<0x94>", "▁y"]
    path = both_dtw(source, ["x", "Ġ—", "Ġy"])
    assert path == [(0, 0), (1, 0), (2, 0), (3, 0), (4, 1), (5, 2)]


def test_different_eos_strings_pair_at_the_end() -> None:
    # Hi vs Hi = 0; Hi vs <|endoftext|> = 13; </s> vs Hi = 4; </s> vs <|endoftext|> = 11
    # ("<" and ">" kept, "/s" -> "|endoftext|": 2 substitutions, 9 insertions).
    # c = [[0,13],[4,11]]; M = [[0,13],[4,11]]; (1,1): diag=0 -> (0,0).
    assert levenshtein("</s>", "<|endoftext|>") == 11
    assert both_dtw(["▁Hi", "</s>"], ["ĠHi", "<|endoftext|>"]) == [(0, 0), (1, 1)]


def test_tie_between_up_and_left_goes_up() -> None:
    # a,b,a vs b,a,b: c = [[1,0,1],[0,1,0],[1,0,1]].
    # M row 0 = [1,1,2]; row 1 = [1, 1+min(1,1,1)=2, 0+min(2,2,1)=1];
    # row 2 = [2, 0+min(2,2,1)=1, 1+min(1,1,2)=2].
    # (2,2): diag=M[1,1]=2 > up=M[1,2]=1 == left=M[2,1]=1 -> up -> (1,2);
    # (1,2): diag=M[0,1]=1 < up=2, left=2 -> (0,1); row 0 -> left -> (0,0).
    path = both_dtw(["a", "b", "a"], ["b", "a", "b"])
    assert path == [(0, 0), (0, 1), (1, 2), (2, 2)]


def test_empty_sequences_give_an_empty_path() -> None:
    assert align_tokens([], ["a"]) == []
    assert align_tokens(["a"], []) == []
    assert reference_dtw([], []) == []
    assert align_tokens([], [], "offsets", source_offsets=[], target_offsets=[]) == []


def test_large_costs_accumulate_in_64_bit_arithmetic() -> None:
    # Costs this large would need tokens of ~10^8 characters; scale a small cost table instead.
    # Scaling keeps every comparison, so the path stays the small table's; but the sums pass
    # 2**31, so 32-bit accumulators would wrap and change it.
    source, target = ["a", "b", "ab", "▁", "a"] * 2, ["b", "Ġa", "ba"] * 3
    distinct, rows, cols = _distinct_costs(source, target)
    assert distinct.max() == 2  # so that the scaled costs still fit the int32 input
    big = distinct * np.int32(1_000_000_000)
    assert big.astype(np.int64)[rows].sum() > np.iinfo(np.int32).max
    path = dtw_path_indices(big, rows, cols)
    assert [tuple(p) for p in path.tolist()] == reference_dtw(source, target)


def test_steps_are_the_backtrace_moves_of_the_accumulated_table() -> None:
    # The kernel stores moves, not the table: check them against the table itself.
    # hello/world vs hel/lo/world: c = [[2,3,4],[4,4,0]], M = [[2,5,9],[6,6,5]].
    source, target = ["▁hello", "▁world"], ["Ġhel", "lo", "Ġworld"]
    distinct, rows, cols = _distinct_costs(source, target)
    steps = dtw_steps(distinct, rows, cols)
    # Row 0 only goes left; (1,0) only up; (1,1): diag=2 < up=5, left=6; (1,2): diag=5 <
    # left=6 < up=9.
    assert steps[0, 1:].tolist() == [LEFT, LEFT]
    assert steps[1].tolist() == [UP, DIAG, DIAG]
    # a,b vs a,b,b,b: c = [[0,1,1,1],[1,0,0,0]], M = [[0,1,2,3],[1,0,0,0]]. (1,1): diag=0
    # < up=1 == left=1; (1,2): left=0 < diag=1 < up=2; (1,3): left=0 < diag=2 < up=3.
    steps = dtw_steps(*_distinct_costs(["a", "b"], ["a", "b", "b", "b"]))
    assert steps[1].tolist() == [UP, DIAG, LEFT, LEFT]
    assert both_dtw(["a", "b"], ["a", "b", "b", "b"]) == [(0, 0), (1, 1), (1, 2), (1, 3)]
    # a,b,a vs b,a,b (test_tie_between_up_and_left_goes_up): M = [[1,1,2],[1,2,1],[2,1,2]].
    # (2,2): up=1 ties left=1, both below diag=2: up. (1,1): all three tie at 1: diag.
    steps = dtw_steps(*_distinct_costs(["a", "b", "a"], ["b", "a", "b"]))
    assert steps[2, 2] == UP and steps[1, 1] == DIAG


def test_kernel_checks_its_indices() -> None:
    distinct = np.zeros((2, 2), np.int32)
    with pytest.raises(ValueError, match="outside the"):
        dtw_path_indices(distinct, np.array([0, 2]), np.array([0]))
    with pytest.raises(ValueError, match="at least one token"):
        dtw_path_indices(distinct, np.array([], np.intp), np.array([0]))


def test_a_fresh_process_loads_the_compiled_kernel_from_the_cache() -> None:
    # This process imported the kernel (compiling it if the machine had no cache yet), so a
    # new one, like every Ray worker after the first on a machine, must only load it.
    import subprocess
    import sys

    code = (
        "from fusion_etl.align import _dtw_kernel as k\n"
        "s = [k.dtw_steps.stats, k._walk_back.stats]\n"
        "print(sum(sum(x.cache_hits.values()) for x in s), "
        "sum(sum(x.cache_misses.values()) for x in s))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["2", "0"], out.stdout + out.stderr


def test_unknown_method_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown alignment method"):
        align_tokens(["a"], ["a"], "edit")  # type: ignore[arg-type]


# --- DTW: properties against the reference -------------------------------------------------

# Short strings with many equal distances (so ties are common), markers, tokens that strip to
# "", byte pieces and a multi-byte character.
TOKEN_ALPHABET = ["a", "b", "ab", "ba", "abc", "Ġa", "▁a", "▁", "Ġ", "", "Ġab", "▁ba", "c"]
TOKEN_ALPHABET += ["<0xE2>", "<0x80>", "—", "</s>", "Ġ▁", "aaaa"]
token_lists = st.lists(st.sampled_from(TOKEN_ALPHABET), min_size=1, max_size=30)


@settings(max_examples=200, deadline=None)
@given(source=token_lists, target=token_lists)
def test_dtw_equals_the_reference(source: list[str], target: list[str]) -> None:
    path = align_tokens(source, target, "dtw")
    assert path == reference_dtw(source, target)
    assert path == editdistance_dtw(source, target)
    assert_valid_path(path, len(source), len(target))


@settings(max_examples=50, deadline=None)
@given(
    source=st.lists(st.text(alphabet="abĠ▁", max_size=4), min_size=1, max_size=60),
    target=st.lists(st.text(alphabet="abĠ▁", max_size=4), min_size=1, max_size=8),
)
def test_dtw_equals_the_reference_on_long_thin_tables(source: list[str], target: list[str]) -> None:
    # Tall and wide tables: the kernel's row loop and its column-0 and row-0 borders.
    assert align_tokens(source, target) == reference_dtw(source, target)
    assert align_tokens(target, source) == editdistance_dtw(target, source)


def test_cost_matrix_strips_markers_and_repeats_distinct_strings() -> None:
    source = ["▁ab", "Ġab", "ab", "▁", "<0xE2>"]
    target = ["ab", "Ġb", "▁ab", ""]
    expected = [[levenshtein(s.strip("Ġ▁"), t.strip("Ġ▁")) for t in target] for s in source]
    cost = dtw_cost_matrix(source, target)
    assert cost.dtype.name == "int32"
    assert cost.tolist() == expected


# --- Offsets: hand-worked cases ------------------------------------------------------------


def offsets_path(source: Sequence[Span], target: Sequence[Span]) -> AlignPath:
    """The offsets path with placeholder token strings (the method reads only the spans)."""
    return align_tokens(
        ["s"] * len(source),
        ["t"] * len(target),
        "offsets",
        source_offsets=source,
        target_offsets=target,
    )


def test_offsets_keep_byte_pieces_of_one_character_together() -> None:
    # "x — y": ▁x ▁ <0xE2> <0x80> <0x94> ▁y against x Ġ — Ġy. The three pieces share the
    # span of "—" and all pair with it; each side ends together everywhere else.
    source = [(0, 1), (1, 2), (2, 3), (2, 3), (2, 3), (3, 5)]
    target = [(0, 1), (1, 2), (2, 3), (3, 5)]
    assert offsets_path(source, target) == [(0, 0), (1, 1), (2, 2), (3, 2), (4, 2), (5, 3)]
    # Pieces of a character on both sides pair one to one.
    assert offsets_path([(0, 1)] * 3, [(0, 1)] * 3) == [(0, 0), (1, 1), (2, 2)]


def test_offsets_prepended_metaspace_token() -> None:
    # "The": ▁ (0,1) T (0,1) he (1,3) against T (0,1) he (1,3): the dummy-prefix token shares
    # its span with the first word, so the source advances alone first.
    assert offsets_path([(0, 1), (0, 1), (1, 3)], [(0, 1), (1, 3)]) == [(0, 0), (1, 0), (2, 1)]
    # " hello": ▁ (0,1) ▁he (0,3) llo (3,6) against Ġhe (0,3) llo (3,6).
    source, target = [(0, 1), (0, 3), (3, 6)], [(0, 3), (3, 6)]
    assert offsets_path(source, target) == [(0, 0), (1, 0), (2, 1)]
    # The same with a zero-width dummy prefix.
    assert offsets_path([(0, 0), (0, 3), (3, 6)], target) == [(0, 0), (1, 0), (2, 1)]


def test_offsets_zero_width_eos() -> None:
    # Both sides end with their own EOS at (len, len): the EOS tokens pair with each other.
    assert offsets_path([(0, 2), (2, 2)], [(0, 2), (2, 2)]) == [(0, 0), (1, 1)]
    # Only the source has one: it joins the last target token.
    assert offsets_path([(0, 2), (2, 3), (3, 3)], [(0, 2), (2, 3)]) == [(0, 0), (1, 1), (2, 1)]
    # A longer target token: the EOS still comes last.
    assert offsets_path([(0, 1), (1, 3), (3, 3)], [(0, 3), (3, 3)]) == [
        (0, 0),
        (1, 0),
        (2, 1),
    ]


def test_offsets_overlap_by_whitespace_only() -> None:
    # "a\n\nb": a | \n\nb against a\n | \n | b. The second source token shares only a newline
    # with the first target token; it still spans all three target tokens' text.
    source, target = [(0, 1), (1, 4)], [(0, 2), (2, 3), (3, 4)]
    assert offsets_path(source, target) == [(0, 0), (1, 0), (1, 1), (1, 2)]


def test_offsets_skipped_text_advances_both() -> None:
    # "ab c" where the source drops the space: ab (0,2) c (3,4) against a (0,1) "b " (1,3)
    # c (3,4). After "ab" ends, "c" starts past "b "'s end, so both advance.
    assert offsets_path([(0, 2), (3, 4)], [(0, 1), (1, 3), (3, 4)]) == [(0, 0), (0, 1), (1, 2)]


def test_offsets_skipped_text_with_byte_pieces_on_the_other_side() -> None:
    # Source: a (0,1), then c (2,3), having skipped the text at 1. Target: two byte pieces that
    # both span (0,2) (unigram byte fallback can give pieces a two-character span), then c.
    # The second piece overlaps a, not c, so it pairs with a before both sides move on.
    source, target = [(0, 1), (2, 3)], [(0, 2), (0, 2), (2, 3)]
    assert offsets_path(source, target) == [(0, 0), (0, 1), (1, 2)]
    assert offsets_path(target, source) == [(0, 0), (1, 0), (2, 1)]


def test_offsets_are_required_and_checked() -> None:
    with pytest.raises(ValueError, match="needs source_offsets and target_offsets"):
        align_tokens(["a"], ["a"], "offsets", source_offsets=[(0, 1)])
    with pytest.raises(ValueError, match="target_offsets has 2 spans for 1 target tokens"):
        align_tokens(["a"], ["a"], "offsets", source_offsets=[(0, 1)], target_offsets=[(0, 1)] * 2)


spans = st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20)), min_size=1, max_size=25)


@settings(max_examples=200, deadline=None)
@given(source=spans, target=spans)
def test_offsets_path_is_valid_for_any_spans(source: list[Span], target: list[Span]) -> None:
    # Even nonsense spans (unsorted, end before start) must give a valid path.
    assert_valid_path(offsets_path(source, target), len(source), len(target))


# --- Offsets: properties on real tokenizations ---------------------------------------------

KINDS: tuple[TokenizerKind, ...] = ("sentencepiece_bpe", "byte_level_bpe", "unigram")


@functools.cache
def kit_tokenizer(kind: TokenizerKind) -> Any:
    """A small tokenizer of one kit kind (a fraction of a second to train), once per run.

    A cache rather than a fixture: hypothesis prints a failing example's arguments, and a
    tokenizer's repr is its whole vocabulary.
    """
    from fusion_etl.kit.tokenizer_kit import train_tokenizer

    corpus = Path(__file__).parent.parent / "fusion_etl" / "kit" / "corpus" / "scripture.txt"
    texts = corpus.read_text(encoding="utf-8")[:20_000].split("\n\n")
    vocab_size = 350 if kind == "byte_level_bpe" else 400
    return train_tokenizer(kind, texts, vocab_size=vocab_size).backend_tokenizer


# Letters, runs of spaces, newlines, tabs, 2-, 3- and 4-byte UTF-8 (byte fallback splits them
# into pieces sharing one span), and a combining accent.
texts = st.text(alphabet="abc xyz  \n\t—é日🙂\u0301.", max_size=60)


def encode(tokenizer: Any, text: str, eos: str | None) -> tuple[list[str], list[Span]]:
    encoding = tokenizer.encode(text, add_special_tokens=False)
    tokens, offsets = list(encoding.tokens), [tuple(o) for o in encoding.offsets]
    if eos is not None:
        # The pipeline appends EOS itself; a zero-width span at the end, as tokenizers gives
        # special tokens.
        tokens.append(eos)
        offsets.append((len(text), len(text)))
    return tokens, offsets


def check_offsets_alignment(
    source: tuple[list[str], list[Span]], target: tuple[list[str], list[Span]]
) -> AlignPath:
    (s_tokens, s_offsets), (t_tokens, t_offsets) = source, target
    path = align_tokens(
        s_tokens, t_tokens, "offsets", source_offsets=s_offsets, target_offsets=t_offsets
    )
    if not s_tokens or not t_tokens:
        assert path == []
        return path
    assert_valid_path(path, len(s_tokens), len(t_tokens))
    if s_offsets == t_offsets:
        assert path == [(k, k) for k in range(len(s_tokens))]
    # Every token with text pairs with at least one token of the other side whose text
    # overlaps its own.
    for side in (0, 1):
        own, other = (s_offsets, t_offsets) if side == 0 else (t_offsets, s_offsets)
        partners: dict[int, list[int]] = {}
        for pair in path:
            partners.setdefault(pair[side], []).append(pair[1 - side])
        for k, (start, end) in enumerate(own):
            if end > start and any(b > a for a, b in other):
                assert any(max(start, other[p][0]) < min(end, other[p][1]) for p in partners[k]), (
                    side,
                    k,
                    own[k],
                    [other[p] for p in partners[k]],
                )
    return path


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=texts,
    source_kind=st.sampled_from(KINDS),
    target_kind=st.sampled_from(KINDS),
    eos=st.booleans(),
)
def test_offsets_path_on_real_tokenizations(
    text: str,
    source_kind: TokenizerKind,
    target_kind: TokenizerKind,
    eos: bool,
) -> None:
    source = encode(kit_tokenizer(source_kind), text, "</s>" if eos else None)
    target = encode(kit_tokenizer(target_kind), text, "<eos>" if eos else None)
    check_offsets_alignment(source, target)


@settings(max_examples=50, deadline=None)
@given(text=texts, kind=st.sampled_from(KINDS))
def test_offsets_path_is_diagonal_for_identical_splits(text: str, kind: TokenizerKind) -> None:
    tokens, offsets = encode(kit_tokenizer(kind), text, "</s>")
    path = align_tokens(tokens, tokens, "offsets", source_offsets=offsets, target_offsets=offsets)
    assert path == [(k, k) for k in range(len(tokens))]


def test_offsets_path_is_diagonal_where_two_tokenizers_agree() -> None:
    # Common words come out whole from both Metaspace tokenizers; each appends its own EOS.
    text = " the earth and the earth"
    bpe = encode(kit_tokenizer("sentencepiece_bpe"), text, "</s>")
    unigram = encode(kit_tokenizer("unigram"), text, "<eos>")
    if bpe[1] != unigram[1]:
        pytest.skip(f"the kit's tokenizers now split differently: {bpe[0]} vs {unigram[0]}")
    assert bpe[0][:-1] == unigram[0][:-1]
    path = check_offsets_alignment(bpe, unigram)
    assert path == [(k, k) for k in range(len(bpe[0]))]
    # The DTW agrees here too: every diagonal cell costs 0 except the EOS pair.
    assert align_tokens(bpe[0], unigram[0]) == path


# --- Golden comparison on the kit's corpus --------------------------------------------------

MAX_TOKENS = 300


def capped_text(text: str, tokenizers: Sequence[Any]) -> str:
    """The longest prefix of `text`, cut at a token end, that no tokenizer splits into more
    than about MAX_TOKENS tokens (so the pure-Python reference stays fast)."""
    cut = len(text)
    for tokenizer in tokenizers:
        offsets = tokenizer.encode(text, add_special_tokens=False).offsets
        if len(offsets) > MAX_TOKENS:
            cut = min(cut, offsets[MAX_TOKENS - 1][1])
    return text[:cut]


def eos_of(model_path: Path) -> str:
    config = json.loads((model_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    return str(config["eos_token"])


@pytest.mark.slow
def test_dtw_equals_the_reference_on_the_kit_corpus(test_kit: Any) -> None:
    from fusion_etl.tokenization import load_tokenizer

    documents = [
        json.loads(line)["text"]
        for part in sorted(Path(test_kit.corpus_dir).glob("*.jsonl"))
        for line in part.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    target_tok = load_tokenizer(str(test_kit.target.path))
    target_eos = eos_of(test_kit.target.path)
    compared = 0
    for source_model in test_kit.sources:
        source_tok = load_tokenizer(str(source_model.path))
        source_eos = eos_of(source_model.path)
        for k, document in enumerate(documents[:30]):
            text = capped_text(document, [source_tok, target_tok])
            # Every other document ends with each side's EOS, as the pipeline appends it.
            with_eos = k % 2 == 0
            source = encode(source_tok, text, source_eos if with_eos else None)
            target = encode(target_tok, text, target_eos if with_eos else None)
            path = align_tokens(source[0], target[0], "dtw")
            assert path == reference_dtw(source[0], target[0]), (source_model.name, k)
            assert path == editdistance_dtw(source[0], target[0]), (source_model.name, k)
            check_offsets_alignment(source, target)
            compared += bool(source[0] and target[0])
    assert compared >= 60


def test_bench_alignment_reports_every_figure() -> None:
    text_pairs = [
        (["▁a", "▁b"], ["Ġa", "Ġb"], [(0, 1), (1, 3)], [(0, 1), (1, 3)]),
        (["▁", "a"], ["a"], [(0, 1), (0, 1)], [(0, 1)]),
    ]
    result = bench_alignment(text_pairs, editdistance_dtw, repeats=2)
    assert result["documents"] == 2
    assert result["tokens"] == 7
    assert result["cells"] == 2 * 2 + 2 * 1
    assert result["dtw_matches_reference"] == 1.0
    assert result["reference_us_per_cell"] > 0 and result["dtw_ns_per_cell"] > 0
    for name in ("reference", "dtw", "offsets"):
        assert result[f"{name}_docs_per_s"] > 0
        assert result[f"{name}_tokens_per_s"] > 0
    assert 0.0 <= result["offsets_pairs_in_reference"] <= 1.0
    with pytest.raises(ValueError, match="at least one document"):
        bench_alignment([], reference_dtw)
