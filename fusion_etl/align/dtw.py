"""Token alignment between two tokenizations of the same text.

Two methods, both returning a monotone path of ``(source_index, target_index)`` pairs:

* ``"dtw"``: FuseLLM's dynamic time warping, path for path. The cell cost is the Levenshtein
  distance of the two token strings with their word-start markers (``Ġ``, ``▁``) removed. The
  FuseLLM reference fills the O(n·m) table with Python loops (2-2.7 µs a cell); here the cost
  matrix comes from ``rapidfuzz`` over the distinct strings only, and the accumulated cost is
  filled one row at a time with numpy (a row's left-to-right dependency is a min-plus prefix
  scan, see `_accumulated_cost`). Integer arithmetic throughout, so ties, and therefore the
  path, are exactly the reference's.
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
        method: ``"dtw"`` reproduces FuseLLM's alignment exactly (O(n·m) time and memory,
            vectorised); ``"offsets"`` pairs tokens by their character spans in O(n + m).
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
        if len(source_tokens) <= len(target_tokens):
            acc = _accumulated_cost(dtw_cost_matrix(source_tokens, target_tokens), consume=True)
        else:
            # The row scan loops over rows, so the shorter side goes down the rows. Edit
            # distance and the recurrence are both symmetric: the table of the swapped problem
            # is this one's, transposed (a view; no copy).
            acc = _accumulated_cost(dtw_cost_matrix(target_tokens, source_tokens), consume=True).T
        return _backtrace(acc)
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
    that token's stripped length, not an error as in the reference.

    Args:
        source_tokens: n token strings.
        target_tokens: m token strings.

    Returns:
        An ``(n, m)`` int32 array.
    """
    src_unique, src_inverse = _distinct_stripped(source_tokens)
    tgt_unique, tgt_inverse = _distinct_stripped(target_tokens)
    # A document repeats a few hundred distinct strings, so scoring only the distinct pairs
    # and gathering is several times cheaper than scoring all n·m cells.
    distinct = cdist(src_unique, tgt_unique, scorer=Levenshtein.distance, dtype=np.int32, workers=1)
    # take() along axis 1 keeps the result row-major; `[:, tgt_inverse]` would not.
    cost: npt.NDArray[np.int32] = distinct[src_inverse].take(tgt_inverse, axis=1)
    return cost


def _distinct_stripped(tokens: Sequence[str]) -> tuple[list[str], npt.NDArray[np.intp]]:
    """The distinct tokens, marker-stripped, in first-seen order, and each token's index.

    Tokens are deduplicated before stripping, so each distinct token is stripped once; two
    that strip to the same string ("a", "▁a") both stay, which only costs a repeated column.
    """
    index: dict[str, int] = {}
    inverse = np.array([index.setdefault(t, len(index)) for t in tokens], dtype=np.intp)
    return [strip_markers(t) for t in index], inverse


def _accumulated_cost(
    cost: npt.NDArray[np.int32], *, consume: bool = False
) -> npt.NDArray[np.int32 | np.int64]:
    """The reference's accumulated cost table without its border: ``M = D[1:, 1:]``.

    With the border gone, row 0 is a running sum and every later row ``i`` satisfies
    ``M[i, j] = min(a[j], M[i, j-1] + c[j])``, where ``a[j] = c[j] + min(M[i-1, j],
    M[i-1, j-1])`` (``a[0] = c[0] + M[i-1, 0]``). Unrolled, with ``S`` the running sum of the
    row's costs, that is ``M[i, j] = S[j] + min over k <= j of (a[k] - S[k])``: one
    ``np.minimum.accumulate``, so a row costs four numpy calls whatever its length.

    The arithmetic is exact integer arithmetic, so equal sums compare equal as they do in the
    reference: int32 when no intermediate value can overflow it (always, for real documents),
    int64 otherwise.

    Args:
        cost: The ``(n, m)`` cell costs. Fastest with ``n <= m`` (one loop step per row).
        consume: Whether `cost` may be overwritten (it saves a copy of the whole table).
    """
    n, m = cost.shape
    # Every entry of M is at most (n + m - 1) * max_cost and every running sum at most
    # m * max_cost, so (n + 2m) * max_cost bounds every magnitude below.
    max_cost = int(cost.max())
    dtype = np.int32 if (n + 2 * m + 1) * max_cost < np.iinfo(np.int32).max else np.int64
    # Row-major, so that each row the loop touches is contiguous.
    offset = np.asarray(cost, dtype=dtype, order="C") if consume else cost.astype(dtype, order="C")
    running = np.cumsum(offset, axis=1, dtype=dtype)
    # a[k] - S[k] = min(M[i-1, k], M[i-1, k-1]) + (c[k] - S[k]); the second term is computed
    # for all rows at once, in place (large fresh arrays cost page faults).
    np.subtract(offset, running, out=offset)
    # Column 0 is a sentinel standing for the reference's +inf border, so that M[i, 0] comes
    # out of the same shifted minimum as every other column; it never wins a minimum, so no
    # arithmetic ever touches it.
    table = np.empty((n, m + 1), dtype=dtype)
    table[:, 0] = np.iinfo(dtype).max
    table[0, 1:] = running[0]
    body, shifted = table[:, 1:], table[:, :-1]  # M[i, j] and M[i, j-1] (sentinel at j=0)
    minimum, prefix_min, add = np.minimum, np.minimum.accumulate, np.add
    # Row views made up front; the loop body is then just the four calls.
    for row, above, above_left, row_offset, row_sum in zip(
        body[1:], body, shifted, offset[1:], running[1:], strict=False
    ):
        minimum(above, above_left, out=row)
        add(row, row_offset, out=row)
        prefix_min(row, out=row)
        add(row, row_sum, out=row)
    acc: npt.NDArray[np.int32 | np.int64] = body
    return acc


def _backtrace(acc: npt.NDArray[np.int32 | np.int64]) -> list[tuple[int, int]]:
    """Walks back from the last cell, preferring diagonal, then up, then left on ties."""
    n, m = acc.shape
    at = acc.item
    i, j = n - 1, m - 1
    path: list[tuple[int, int]] = []
    while i > 0 or j > 0:
        path.append((i, j))
        if i == 0:
            j -= 1
        elif j == 0:
            i -= 1
        else:
            diag, up, left = at(i - 1, j - 1), at(i - 1, j), at(i, j - 1)
            # The first minimum of (diag, up, left), as np.argmin would pick it.
            if diag <= up and diag <= left:
                i -= 1
                j -= 1
            elif up <= left:
                i -= 1
            else:
                j -= 1
    path.append((0, 0))
    path.reverse()
    return path


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
    """Times the reference DTW, the vectorised DTW and the offsets sweep on the same documents.

    Args:
        pairs: One ``(source_tokens, target_tokens, source_offsets, target_offsets)`` per
            document.
        reference: The pure-Python reference, called as ``reference(source_tokens,
            target_tokens)`` (``tests/align_reference.reference_dtw``); a parameter so that
            the package never imports from the tests.
        repeats: The fast methods run over all documents this many times and the best time
            counts, as ``timeit`` does: on a shared machine other work only ever adds time. The
            reference runs once; it takes long enough to average such noise out.

    Returns:
        ``documents``; ``tokens`` (source plus target tokens over all documents);
        ``{reference,dtw,offsets}_seconds``, ``_docs_per_s`` and ``_tokens_per_s``;
        ``dtw_speedup`` and ``offsets_speedup`` over the reference; ``dtw_matches_reference``,
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

    def dtw(pair: AlignmentPair) -> list[tuple[int, int]]:
        return align_tokens(pair[0], pair[1], "dtw")

    def offsets(pair: AlignmentPair) -> list[tuple[int, int]]:
        return align_tokens(
            pair[0], pair[1], "offsets", source_offsets=pair[2], target_offsets=pair[3]
        )

    ref_paths, ref_s = _timed(lambda pair: reference(pair[0], pair[1]), pairs, repeats=1)
    dtw_paths, dtw_s = _timed(dtw, pairs, repeats=repeats)
    off_paths, off_s = _timed(offsets, pairs, repeats=repeats)

    docs = float(len(pairs))
    result: dict[str, float] = {"documents": docs, "tokens": float(tokens)}
    for name, seconds in (("reference", ref_s), ("dtw", dtw_s), ("offsets", off_s)):
        result[f"{name}_seconds"] = seconds
        result[f"{name}_docs_per_s"] = docs / seconds
        result[f"{name}_tokens_per_s"] = tokens / seconds
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
