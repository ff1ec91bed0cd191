"""Token alignment between two tokenizations of the same text.

Two methods, both returning a monotone path of ``(source_index, target_index)`` pairs:

* ``"dtw"``: FuseLLM's dynamic time warping, path for path. The cell cost is the Levenshtein
  distance of the two token strings with their word-start markers (``Ġ``, ``▁``) removed. The
  FuseLLM reference fills an O(n·m) numpy table in Python loops with one ``editdistance.eval``
  per cell (1.4-1.8 µs a cell here). Here the edit distances come from ``rapidfuzz`` over the
  distinct marker-stripped strings only, and the recurrence and backtrace run as one compiled
  pass (`fusion_etl.align._dtw_kernel`, numba) that gathers each cell's cost from that small
  table and keeps one byte per cell: the backtrace's move. Integer arithmetic throughout, so
  ties, and therefore the path, are exactly the reference's.
* ``"offsets"``: a linear two-pointer sweep over the tokens' character spans in the shared
  text. Not in the reference; it needs the offsets a tokenizer returns with its tokens.

Pure functions: no I/O, no Ray.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt
from rapidfuzz.distance import Levenshtein
from rapidfuzz.process import cdist

from fusion_etl.align.tokens import strip_markers

__all__ = ["AlignMethod", "AlignmentPair", "align_tokens", "bench_alignment", "dtw_cost_matrix"]

AlignMethod = Literal["dtw", "offsets"]
Span = tuple[int, int]


def align_tokens(
    source_tokens: Sequence[str],
    target_tokens: Sequence[str],
    method: AlignMethod = "dtw",
    *,
    source_offsets: Sequence[Span] | None = None,
    target_offsets: Sequence[Span] | None = None,
) -> list[tuple[int, int]]:
    """Aligns the source tokens of a text to the target tokens of the same text.

    Args:
        source_tokens: Token strings of the source tokenization.
        target_tokens: Token strings of the target tokenization.
        method: ``"dtw"`` reproduces FuseLLM's alignment exactly (O(n·m) time, n·m bytes of
            memory, compiled); ``"offsets"`` pairs tokens by their character spans in O(n + m).
        source_offsets: ``(start, end)`` character span of each source token in the text, as
            ``tokenizers.Encoding.offsets`` gives it. Required for ``"offsets"``, ignored
            by ``"dtw"``.
        target_offsets: The same for the target tokens.

    Returns:
        The path as ``(source_index, target_index)`` pairs. It starts at ``(0, 0)``, ends at
        ``(n - 1, m - 1)``, every step is ``(1, 0)``, ``(0, 1)`` or ``(1, 1)``, so it covers
        every index of both sequences. Empty when either sequence is empty: there is nothing
        to pair.

    Raises:
        ValueError: Unknown method; for ``"offsets"``, missing offsets or offsets whose
            length differs from their tokens'.
    """
    if method == "dtw":
        if not source_tokens or not target_tokens:
            return []
        # Imported here: numba loads (or, once per machine, compiles) the kernel, which only
        # the processes that align need.
        from fusion_etl.align._dtw_kernel import dtw_path_indices

        distinct, rows, cols = _distinct_costs(source_tokens, target_tokens)
        path = dtw_path_indices(distinct, rows, cols)
        return list(zip(path[:, 0].tolist(), path[:, 1].tolist(), strict=True))
    if method == "offsets":
        if source_offsets is None or target_offsets is None:
            raise ValueError('method="offsets" needs source_offsets and target_offsets')
        for side, tokens, offsets in (
            ("source", source_tokens, source_offsets),
            ("target", target_tokens, target_offsets),
        ):
            if len(offsets) != len(tokens):
                raise ValueError(
                    f"{side}_offsets has {len(offsets)} spans for {len(tokens)} {side} tokens"
                )
        if not source_tokens or not target_tokens:
            return []
        return _sweep_offsets(source_offsets, target_offsets)
    raise ValueError(f"unknown alignment method {method!r}; expected 'dtw' or 'offsets'")


def dtw_cost_matrix(
    source_tokens: Sequence[str], target_tokens: Sequence[str]
) -> npt.NDArray[np.int32]:
    """The DTW cell costs: Levenshtein distance of every source/target pair, markers stripped.

    A token that is only a marker (a lone ``▁``) strips to ``""``; its distance to a token is
    that token's stripped length. The DTW itself never builds this table (it gathers from the
    distinct pairs' costs); it is here to inspect and test the costs.

    Args:
        source_tokens: n token strings.
        target_tokens: m token strings.

    Returns:
        An ``(n, m)`` int32 array.
    """
    distinct, rows, cols = _distinct_costs(source_tokens, target_tokens)
    # take() along axis 1 keeps the result row-major; `[:, cols]` would not.
    cost: npt.NDArray[np.int32] = distinct[rows].take(cols, axis=1)
    return cost


def _distinct_costs(
    source_tokens: Sequence[str], target_tokens: Sequence[str]
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """Edit distances of the distinct stripped strings, and each token's row or column.

    A document repeats a few hundred distinct strings, so scoring only the distinct pairs is
    several times cheaper than scoring all n·m cells.
    """
    src_unique, rows = _distinct_stripped(source_tokens)
    tgt_unique, cols = _distinct_stripped(target_tokens)
    distinct = cdist(src_unique, tgt_unique, scorer=Levenshtein.distance, dtype=np.int32, workers=1)
    return np.ascontiguousarray(distinct, dtype=np.int32), rows, cols


def _distinct_stripped(tokens: Sequence[str]) -> tuple[list[str], npt.NDArray[np.intp]]:
    """The distinct marker-stripped strings in first-seen order, and each token's index.

    Tokens are deduplicated before stripping, so each distinct token is stripped once, and the
    stripped strings again, so that tokens that differ only by a marker ("a", "▁a") share one
    row of the cost table.
    """
    stripped = {token: strip_markers(token) for token in dict.fromkeys(tokens)}
    index = {text: k for k, text in enumerate(dict.fromkeys(stripped.values()))}
    position = {token: index[text] for token, text in stripped.items()}
    inverse = np.fromiter(map(position.__getitem__, tokens), dtype=np.intp, count=len(tokens))
    return list(index), inverse


def _sweep_offsets(source: Sequence[Span], target: Sequence[Span]) -> list[tuple[int, int]]:
    """Pairs tokens by character span: advance whichever token ends first, both on a tie.

    Special cases, each from a real tokenizer:

    * Equal ends, but the next token on one side ends there too: that side advances alone.
      This keeps the byte pieces of one character (``<0xE2>``, ``<0x80>``, ``<0x94>`` all
      spanning the same character) paired with the other side's token for that character, and
      keeps SentencePiece's prepended ``▁`` (span ``(0, 1)``, like the word after it) or a
      zero-width token (an EOS at ``(len, len)``) from dragging the other side ahead. When
      both sides have such tokens they pair off diagonally, but a zero-width one waits for
      the other side's tokens with text (unigram byte pieces can all span two characters and
      so still end where the source's EOS sits).
    * One side ends first, but its next token starts at or after the other side's end (the
      tokenizer skipped text, e.g. whitespace): nothing more overlaps the other side's token,
      so both advance, unless the other side's next token ends where its current one does.

    Only ends and starts are compared, so spans that overlap by a space only (``▁word`` and
    ``Ġword`` include it, a bare ``word`` does not) need nothing special. Any spans at all give
    a valid path; sensible spans give a sensible one.
    """
    n, m = len(source), len(target)
    i = j = 0
    path = [(0, 0)]
    while i < n - 1 or j < m - 1:
        if i == n - 1:
            j += 1
        elif j == m - 1:
            i += 1
        else:
            s_end, t_end = source[i][1], target[j][1]
            if s_end < t_end:
                if source[i + 1][0] < t_end:
                    i += 1
                elif target[j + 1][1] <= t_end:
                    j += 1  # the target's own next token (a byte piece) still ends here
                else:
                    i += 1
                    j += 1
            elif t_end < s_end:
                if target[j + 1][0] < s_end:
                    j += 1
                elif source[i + 1][1] <= s_end:
                    i += 1
                else:
                    i += 1
                    j += 1
            else:
                s_next, t_next = source[i + 1], target[j + 1]
                s_stays, t_stays = s_next[1] <= s_end, t_next[1] <= t_end
                if s_stays and t_stays:
                    # Both have more tokens ending here: pair them off, except that a
                    # zero-width token (an EOS) waits until the other side's text is done.
                    s_stays = s_next[0] < s_next[1] or t_next[0] >= t_next[1]
                    t_stays = t_next[0] < t_next[1] or s_next[0] >= s_next[1]
                if s_stays == t_stays:
                    i += 1
                    j += 1
                elif s_stays:
                    i += 1
                else:
                    j += 1
        path.append((i, j))
    return path


AlignmentPair = tuple[list[str], list[str], list[Span], list[Span]]
"""One document for `bench_alignment`: source tokens, target tokens, their offsets."""


def bench_alignment(
    pairs: list[AlignmentPair],
    reference: Callable[..., list[tuple[int, int]]],
    *,
    repeats: int = 3,
) -> dict[str, float]:
    """Times the reference DTW, the compiled DTW and the offsets sweep on the same documents.

    Args:
        pairs: One ``(source_tokens, target_tokens, source_offsets, target_offsets)`` per
            document.
        reference: The reference, called as ``reference(source_tokens, target_tokens)``: the
            FuseLLM code's shape (``tests/align_reference.editdistance_dtw``); a parameter so
            that the package never imports from the tests.
        repeats: The fast methods run over all documents this many times and the best time
            counts, as ``timeit`` does: on a shared machine other work only ever adds time. The
            reference runs once; it takes long enough to average such noise out.

    Returns:
        ``documents``; ``tokens`` (source plus target tokens over all documents); ``cells``
        (the DTW tables' cells, n·m summed); ``{reference,dtw,offsets}_seconds``,
        ``_docs_per_s`` and ``_tokens_per_s``; ``reference_us_per_cell`` and
        ``dtw_ns_per_cell``; ``dtw_speedup`` and ``offsets_speedup`` over the reference;
        ``dtw_matches_reference``,
        the fraction of documents whose dtw path equals the reference's exactly (expect 1);
        and, for information, ``offsets_matches_reference`` (the same fraction for the offsets
        path, a different method) and ``offsets_pairs_in_reference`` (the fraction of the
        offsets paths' pairs that the reference paths also hold).

    Raises:
        ValueError: No documents, or ``repeats`` below 1.
    """
    if not pairs:
        raise ValueError("bench_alignment needs at least one document")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    tokens = sum(len(src) + len(tgt) for src, tgt, _, _ in pairs)
    cells = sum(len(src) * len(tgt) for src, tgt, _, _ in pairs)

    def dtw(pair: AlignmentPair) -> list[tuple[int, int]]:
        return align_tokens(pair[0], pair[1], "dtw")

    def offsets(pair: AlignmentPair) -> list[tuple[int, int]]:
        return align_tokens(
            pair[0], pair[1], "offsets", source_offsets=pair[2], target_offsets=pair[3]
        )

    # Untimed: the first call in a process loads the compiled kernel (bench align reports that
    # cost on its own).
    dtw(pairs[0])
    ref_paths, ref_s = _timed(lambda pair: reference(pair[0], pair[1]), pairs, repeats=1)
    dtw_paths, dtw_s = _timed(dtw, pairs, repeats=repeats)
    off_paths, off_s = _timed(offsets, pairs, repeats=repeats)

    docs = float(len(pairs))
    result: dict[str, float] = {"documents": docs, "tokens": float(tokens), "cells": float(cells)}
    for name, seconds in (("reference", ref_s), ("dtw", dtw_s), ("offsets", off_s)):
        result[f"{name}_seconds"] = seconds
        result[f"{name}_docs_per_s"] = docs / seconds
        result[f"{name}_tokens_per_s"] = tokens / seconds
    result["reference_us_per_cell"] = ref_s / max(1, cells) * 1e6
    result["dtw_ns_per_cell"] = dtw_s / max(1, cells) * 1e9
    result["dtw_speedup"] = ref_s / dtw_s
    result["offsets_speedup"] = ref_s / off_s
    result["dtw_matches_reference"] = _same_fraction(dtw_paths, ref_paths)
    result["offsets_matches_reference"] = _same_fraction(off_paths, ref_paths)
    shared = sum(len(set(off) & set(ref)) for off, ref in zip(off_paths, ref_paths, strict=True))
    result["offsets_pairs_in_reference"] = shared / max(1, sum(map(len, off_paths)))
    return result


def _timed(
    align: Callable[[AlignmentPair], list[tuple[int, int]]],
    pairs: list[AlignmentPair],
    *,
    repeats: int,
) -> tuple[list[list[tuple[int, int]]], float]:
    """The paths of one pass over `pairs`, and the best wall time of `repeats` passes."""
    best = float("inf")
    paths: list[list[tuple[int, int]]] = []
    for _ in range(repeats):
        start = time.perf_counter()
        paths = [align(pair) for pair in pairs]
        best = min(best, time.perf_counter() - start)
    # A zero clock difference on a trivially small input must not divide by zero.
    return paths, max(best, 1e-9)


def _same_fraction(paths: list[list[tuple[int, int]]], refs: list[list[tuple[int, int]]]) -> float:
    return sum(a == b for a, b in zip(paths, refs, strict=True)) / len(refs)
