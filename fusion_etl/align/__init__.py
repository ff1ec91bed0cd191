"""Pure algorithms of FuseLLM's align + fuse step: no I/O, no Ray.

- `align_tokens`: alignment path between two tokenizations of one text (the reference's
  edit-distance DTW, vectorised, or a linear sweep over character spans);
- `map_vocab`: source vocabulary -> target vocabulary (exact, byte-equal, special by role, else
  minimum edit distance);
- `transfer`, `fuse`: a source's top-k onto the target's positions, and MinCE / AvgCE fusion.
"""

from fusion_etl.align.dtw import align_tokens
from fusion_etl.align.fusion import Candidate, Fused, fuse, merge_topk, one_to_one_pairs, transfer
from fusion_etl.align.tokens import TokenizerView, as_view, strip_markers, view_of
from fusion_etl.align.vocab import VocabMap, map_vocab

__all__ = [
    "Candidate",
    "Fused",
    "TokenizerView",
    "VocabMap",
    "align_tokens",
    "as_view",
    "fuse",
    "map_vocab",
    "merge_topk",
    "one_to_one_pairs",
    "strip_markers",
    "transfer",
    "view_of",
]
