"""The vocabulary map: each source token id -> one target token id.

FuseLLM moves a source model's top-k next-token entries onto the target vocabulary through this
map (reference step 3). The reference compares token strings only and brute-forces |Vs| x |Vt|
edit distances in Python; here tokens are also compared by the bytes they stand for (so
`<0x0A>`, `Ċ` and a newline token agree) and the edit distances run in rapidfuzz's C++ `cdist`
in bounded row chunks.

Rules, applied in order to each source id; the first that applies decides (`how`):

1. **special** (`MATCH_SPECIAL`): a source special token (listed as special, or holding a role)
   maps by role: eos -> eos, bos -> bos, unk -> unk, pad -> pad, roles tried in that order and
   only where the target has the role. A source special with no counterpart maps to the target
   special with the identical string, else to the target unk, else to the target eos. A source
   id without a token string (a hole in the vocabulary) maps to the target unk, else eos.
   The distance is always 0: special tokens stand for no text, so no distance is measured.
2. **exact** (`MATCH_EXACT`): the source token string, with the source's word-start marker
   replaced by the target's (`Ġ` <-> `▁`), equals an ordinary target token string *and* both
   stand for the same bytes. The byte check keeps equal spellings of different text apart: the
   byte-level token `Ã` is the single byte 0xC3, the SentencePiece token `Ã` is the character
   U+00C3; such a pair falls through to rule 3 or 4.
3. **bytes** (`MATCH_BYTES`): an ordinary target token stands for the same bytes
   (`TokenizerView.token_bytes`). Among several, an ordinary piece beats a `<0xXX>` byte piece,
   then the lowest id wins. Distance 0.
4. **mined** (`MATCH_MINED`): the ordinary target token at minimum Levenshtein distance, both
   sides' bytes decoded as latin-1 (one character per byte, so partial UTF-8 tokens compare
   consistently); the first minimum in target id order (the lowest id) wins.

"Ordinary" target tokens are those that are neither special, nor role holders, nor holes:
special tokens stand for no text and never receive a text token.

Pure functions over `TokenizerView`. pyarrow is imported only by `VocabMap.to_arrow` and
`VocabMap.from_arrow`; tokenizers and the kit only by `bench_vocab_map`.
"""

from __future__ import annotations

import re
import sysconfig
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from fusion_etl.align.tokens import TokenizerView, as_view, view_of

if TYPE_CHECKING:
    import pyarrow as pa

    from fusion_etl.kit.tokenizer_kit import TokenizerKind

__all__ = [
    "MATCH_BYTES",
    "MATCH_EXACT",
    "MATCH_MINED",
    "MATCH_NAMES",
    "MATCH_SPECIAL",
    "VocabMap",
    "bench_vocab_map",
    "map_vocab",
]

MATCH_EXACT: Final = 0
"""Equal token strings once word-start markers are unified (and equal bytes)."""
MATCH_BYTES: Final = 1
"""Different strings that stand for the same bytes (`<0x0A>` vs `Ċ`)."""
MATCH_SPECIAL: Final = 2
"""A special token mapped by role or string, or a vocabulary hole mapped to unk/eos."""
MATCH_MINED: Final = 3
"""Nearest target token by byte-level edit distance."""
MATCH_NAMES: Final[tuple[str, ...]] = ("exact", "bytes", "special", "mined")
"""The name of each code, indexed by code: the `how` column of `VocabMap.to_arrow`."""

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# cdist writes uint8 (a quarter of int32's memory per chunk). Distances above the cutoff come
# back as cutoff + 1 = 255 instead of wrapping round; rows whose minimum is 255 are redone in
# int32, so the cap never changes a result.
_U8_CUTOFF: Final = 254


@dataclass(frozen=True)
class VocabMap:
    """A source -> target token id map with how each entry was found.

    Attributes:
        target_id: Target id of each source id.
        distance: Edit distance of the chosen match (0 unless `how` is `MATCH_MINED`).
        how: The rule that chose it, one of the `MATCH_*` codes.
    """

    target_id: npt.NDArray[np.int32]
    distance: npt.NDArray[np.int32]
    how: npt.NDArray[np.int8]

    def __post_init__(self) -> None:
        n = len(self.target_id)
        if len(self.distance) != n or len(self.how) != n:
            raise ValueError(
                f"VocabMap columns differ in length: {n}, {len(self.distance)}, {len(self.how)}"
            )

    def __len__(self) -> int:
        return len(self.target_id)

    def __call__(self, ids: npt.NDArray[np.integer]) -> npt.NDArray[np.int32]:
        """Maps source ids (any shape) to target ids (same shape).

        Raises:
            ValueError: An id is negative or beyond the source vocabulary; numpy would
                otherwise wrap negative ids round silently.
        """
        arr = np.asarray(ids)
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= len(self.target_id)):
            raise ValueError(
                f"source ids must lie in [0, {len(self.target_id)}); "
                f"got {int(arr.min())}..{int(arr.max())}"
            )
        return self.target_id[arr]

    def counts(self) -> dict[str, int]:
        """How many source ids each rule decided, by rule name."""
        per_code = np.bincount(self.how.astype(np.int64), minlength=len(MATCH_NAMES))
        return {name: int(per_code[code]) for code, name in enumerate(MATCH_NAMES)}

    def to_arrow(self) -> pa.Table:
        """The map as a table: source_id, target_id, distance (int32) and how (string)."""
        import pyarrow as pa

        names = np.asarray(MATCH_NAMES, dtype=object)[self.how.astype(np.int64)]
        return pa.table(
            {
                "source_id": pa.array(np.arange(len(self), dtype=np.int32)),
                "target_id": pa.array(self.target_id, type=pa.int32()),
                "distance": pa.array(self.distance, type=pa.int32()),
                "how": pa.array(names, type=pa.string()),
            }
        )

    @classmethod
    def from_arrow(cls, table: pa.Table) -> VocabMap:
        """Reads a table written by `to_arrow` (rows in any order).

        Raises:
            ValueError: A column is missing, the source ids are not exactly 0..n-1, or a `how`
                value is unknown.
        """
        missing = {"source_id", "target_id", "distance", "how"} - set(table.column_names)
        if missing:
            raise ValueError(f"vocabulary map table lacks columns {sorted(missing)}")
        source_id = np.asarray(table.column("source_id").to_numpy(), dtype=np.int64)
        order = np.argsort(source_id, kind="stable")
        if not np.array_equal(source_id[order], np.arange(len(source_id))):
            raise ValueError("vocabulary map source ids must be exactly 0..n-1, once each")
        code_of = {name: code for code, name in enumerate(MATCH_NAMES)}
        hows = table.column("how").to_pylist()
        unknown = {h for h in hows if h not in code_of}
        if unknown:
            raise ValueError(f"unknown vocabulary map 'how' values {sorted(map(str, unknown))}")
        how = np.fromiter((code_of[h] for h in hows), dtype=np.int8, count=len(hows))
        return cls(
            target_id=np.asarray(table.column("target_id").to_numpy(), dtype=np.int32)[order],
            distance=np.asarray(table.column("distance").to_numpy(), dtype=np.int32)[order],
            how=how[order],
        )


def _role_ids(view: TokenizerView) -> list[int | None]:
    """Role ids in the order roles are matched: eos, bos, unk, pad."""
    return [view.eos_id, view.bos_id, view.unk_id, view.pad_id]


def _specials_of(view: TokenizerView) -> frozenset[int]:
    """Ids listed as special plus the role holders: a role token may not be marked special."""
    return view.special_ids | {i for i in _role_ids(view) if i is not None}


def _special_target(
    source: TokenizerView, target: TokenizerView, source_id: int, fallback: int | None
) -> int:
    """Rule 1 for one source special token (or hole)."""
    if source.tokens[source_id]:
        for s_role, t_role in zip(_role_ids(source), _role_ids(target), strict=True):
            if s_role == source_id and t_role is not None:
                return t_role
        text = source.tokens[source_id]
        # Lowest target special id with the same spelling; strings are unique in a vocabulary,
        # so this is the one, if any.
        for tid in sorted(_specials_of(target)):
            if target.tokens[tid] == text:
                return tid
    if fallback is None:
        raise ValueError("the target has neither an unk nor an eos token to map specials onto")
    return fallback


def map_vocab(
    source: TokenizerView | Any,
    target: TokenizerView | Any,
    *,
    workers: int = -1,
    chunk: int = 1024,
) -> VocabMap:
    """Maps every source token id to a target token id (rules in the module docstring).

    Deterministic: the result depends only on the two views, not on `workers` or `chunk`.

    Args:
        source: The source tokenizer: a `TokenizerView`, a transformers fast tokenizer or a
            `tokenizers.Tokenizer` (see `tokens.as_view`).
        target: The target tokenizer, likewise.
        workers: Threads for rapidfuzz's `cdist` (-1: all cores).
        chunk: Source tokens per `cdist` call; memory is about `chunk` x |Vt| bytes.

    Returns:
        The map, one entry per source id.

    Raises:
        ValueError: `chunk` < 1, the target has no ordinary token to mine, or a special or hole
            needs a fallback and the target has neither unk nor eos.
    """
    source, target = as_view(source), as_view(target)
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    n_source = len(source.tokens)
    target_id = np.full(n_source, -1, dtype=np.int32)
    distance = np.zeros(n_source, dtype=np.int32)
    how = np.zeros(n_source, dtype=np.int8)
    fallback = target.unk_id if target.unk_id is not None else target.eos_id

    t_special = _specials_of(target)
    ordinary = [i for i, tok in enumerate(target.tokens) if tok and i not in t_special]
    t_bytes = {i: target.token_bytes(i) for i in ordinary}
    by_string = {target.tokens[i]: i for i in ordinary}
    by_bytes: dict[bytes, int] = {}
    for i in ordinary:  # id order, so the first kept of equals is the lowest id
        seen = by_bytes.get(t_bytes[i])
        if seen is None or (_is_byte_piece(target, seen) and not _is_byte_piece(target, i)):
            by_bytes[t_bytes[i]] = i

    s_special = _specials_of(source)
    swap = (
        (source.marker, target.marker)
        if source.marker is not None and target.marker is not None
        else None
    )
    mined: list[int] = []
    for sid, tok in enumerate(source.tokens):
        if sid in s_special or not tok:
            target_id[sid] = _special_target(source, target, sid, fallback)
            how[sid] = MATCH_SPECIAL
            continue
        sb = source.token_bytes(sid)
        same_string = by_string.get(tok.replace(*swap) if swap else tok)
        same_bytes = by_bytes.get(sb)
        if same_string is not None and t_bytes[same_string] == sb:
            target_id[sid], how[sid] = same_string, MATCH_EXACT
        elif same_bytes is not None:
            target_id[sid], how[sid] = same_bytes, MATCH_BYTES
        else:
            mined.append(sid)

    if mined:
        if not ordinary:
            raise ValueError("the target vocabulary has no ordinary token to map onto")
        queries = [source.token_bytes(sid).decode("latin-1") for sid in mined]
        choices = [t_bytes[i].decode("latin-1") for i in ordinary]
        best, best_dist = _nearest(queries, choices, workers=workers, chunk=chunk)
        rows = np.asarray(mined, dtype=np.int64)
        target_id[rows] = np.asarray(ordinary, dtype=np.int32)[best]
        distance[rows] = best_dist
        how[rows] = MATCH_MINED
    return VocabMap(target_id=target_id, distance=distance, how=how)


def _is_byte_piece(view: TokenizerView, token_id: int) -> bool:
    # Only Metaspace views read `<0xXX>` as a byte (see tokens.token_to_bytes).
    return view.kind == "metaspace" and _BYTE_PIECE.fullmatch(view.tokens[token_id]) is not None


def _nearest(
    queries: Sequence[str], choices: Sequence[str], *, workers: int, chunk: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int32]]:
    """Index and distance of the first nearest choice of each query, `chunk` rows at a time."""
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein

    best = np.empty(len(queries), dtype=np.int64)
    best_dist = np.empty(len(queries), dtype=np.int32)
    for start in range(0, len(queries), chunk):
        block = queries[start : start + chunk]
        scores = process.cdist(
            block,
            choices,
            scorer=Levenshtein.distance,
            dtype=np.uint8,
            score_cutoff=_U8_CUTOFF,
            workers=workers,
        )
        # argmin returns the first minimum: the lowest target id among ties.
        arg = scores.argmin(axis=1)
        low = scores[np.arange(len(block)), arg].astype(np.int32)
        for row in np.flatnonzero(low > _U8_CUTOFF):
            # Every choice is over the cap for this (very long) token: redo it uncapped.
            full = process.cdist(
                [block[row]], choices, scorer=Levenshtein.distance, dtype=np.int32, workers=1
            )[0]
            arg[row] = int(full.argmin())
            low[row] = full[arg[row]]
        best[start : start + len(block)] = arg
        best_dist[start : start + len(block)] = low
    return best, best_dist


# --- benchmark -------------------------------------------------------------------------------

_BENCH_VERSION: Final = 1


def _bench_texts() -> list[str]:
    """Offline training text: the standard library's .py files plus the kit's scripture."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    scripture = Path(__file__).resolve().parent.parent / "kit" / "corpus" / "scripture.txt"
    texts.append(scripture.read_text(encoding="utf-8"))
    return texts


def _bench_path(workdir: Path, kind: TokenizerKind, size: int) -> Path:
    return workdir / f"vocab-bench-v{_BENCH_VERSION}-{kind}-{size}.json"


def _bench_view(workdir: Path, kind: TokenizerKind, size: int) -> TokenizerView:
    """The view of a cached bench tokenizer (see `bench_vocab_map`)."""
    from tokenizers import Tokenizer

    from fusion_etl.kit.tokenizer_kit import SPECIALS

    sp = SPECIALS[kind]
    tok = Tokenizer.from_file(str(_bench_path(workdir, kind, size)))
    return view_of(tok, eos_token=sp.eos, bos_token=sp.bos, unk_token=sp.unk, pad_token=sp.eos)


def bench_vocab_map(
    workdir: Path, *, source_size: int = 32000, target_size: int = 50000
) -> dict[str, float]:
    """Times `map_vocab` between two realistic vocabularies.

    The source is a Llama-style Metaspace BPE with byte-fallback pieces, the target a
    GPT-NeoX-style byte-level BPE, both trained with the kit's `train_tokenizer` on the standard
    library's .py files plus the kit's scripture text (about 35 MB), and cached in `workdir`:
    training takes a few minutes the first time only.

    Args:
        workdir: Folder for the cached tokenizers.
        source_size: Requested source vocabulary size.
        target_size: Requested target vocabulary size.

    Returns:
        `seconds` (the `map_vocab` call), `train_seconds` (0 when cached), the achieved
        `source_size`/`target_size`, `mined_mean_distance`, and one `how_<rule>` count per rule.
    """
    from fusion_etl.kit.tokenizer_kit import train_tokenizer

    workdir.mkdir(parents=True, exist_ok=True)
    plan: tuple[tuple[TokenizerKind, int], ...] = (
        ("sentencepiece_bpe", source_size),
        ("byte_level_bpe", target_size),
    )
    t0 = time.perf_counter()
    texts: list[str] | None = None
    for kind, size in plan:
        path = _bench_path(workdir, kind, size)
        if path.exists():
            continue
        texts = texts if texts is not None else _bench_texts()
        # A Llama-like alphabet: characters beyond the 250 most frequent go to byte pieces.
        wrapped = train_tokenizer(kind, texts, vocab_size=size, limit_alphabet=250)
        tmp = path.with_suffix(".tmp")
        wrapped.backend_tokenizer.save(str(tmp))
        tmp.replace(path)  # a half-written file never looks cached
    train_seconds = time.perf_counter() - t0 if texts is not None else 0.0
    source, target = (_bench_view(workdir, kind, size) for kind, size in plan)
    t1 = time.perf_counter()
    vmap = map_vocab(source, target)
    seconds = time.perf_counter() - t1
    mined = vmap.how == MATCH_MINED
    result: dict[str, float] = {
        "seconds": seconds,
        "train_seconds": train_seconds,
        "source_size": float(len(source.tokens)),
        "target_size": float(len(target.tokens)),
        "mined_mean_distance": float(vmap.distance[mined].mean()) if mined.any() else 0.0,
    }
    result.update({f"how_{name}": float(n) for name, n in vmap.counts().items()})
    return result
