"""`align_fuse`: every source's distributions onto the target's tokens, fused with the target's.

Reads the manifests of `extract/<target>` and every `extract/<source>` (and `prepare`, for the
texts the `offsets` alignment needs), checks that their shards and doc_ids line up, builds or
reuses `vocab_map/<source>.parquet` (source_id, target_id, distance, how), and writes
`align_fuse/part-NNNNN.parquet`, one shard per prepared shard, one CPU Ray task each:

- `doc_id`, `input_ids`: the target's tokens;
- `fused_ids`, `fused_probs`: per target position the fused top-k in the target vocabulary
  (probabilities, not renormalised; padded with id -1 and probability 0), predicting token i+1;
- `source_weights`: per candidate, in the order [target, sources in config order]: at
  sequence level the weights used (MinCE: one-hot), at token level their mean over positions;
- `matched_fraction`: per source in config order, the share of the target's positions that took
  that source's distribution (the rest got a one-hot on the next target token).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fusion_etl import storage
from fusion_etl.config import (
    ModelConfig,
    PipelineConfig,
    fingerprint,
    fingerprint_fields,
)
from fusion_etl.errors import InputDataError, UserError
from fusion_etl.manifest import Manifest, read_manifest
from fusion_etl.runner import ActorPool, ShardOutput, StagePlan, WorkItem, log, make_plan
from fusion_etl.schema import (
    PREPARE,
    VOCAB_MAP,
    align_fuse_schema,
    check_schema,
    extract_schema,
    footer_metadata,
    list_rows,
    open_parquet,
    parquet_bytes,
)
from fusion_etl.tokenization import load_tokenizer, tokenizer_fingerprint

__all__ = ["AlignFuseStage", "vocab_map_url"]

VERSION = 2
VOCAB_MAP_VERSION = 1


def vocab_map_url(cfg: PipelineConfig, source: ModelConfig) -> str:
    return storage.join(cfg.run_dir, "vocab_map", f"{source.name}.parquet")


def _vocab_map_fingerprint(cfg: PipelineConfig, source: ModelConfig) -> str:
    return fingerprint(
        {
            "version": VOCAB_MAP_VERSION,
            "source": tokenizer_fingerprint(source.tokenizer_path),
            "target": tokenizer_fingerprint(cfg.target.tokenizer_path),
        }
    )


@lru_cache(maxsize=16)
def _view(tokenizer_path: str) -> Any:
    """TokenizerView with the special tokens' roles from the tokenizer's own config."""
    from transformers import PreTrainedTokenizerFast

    from fusion_etl.align.tokens import view_of

    local = storage.local_path(tokenizer_path)
    try:
        hf = PreTrainedTokenizerFast.from_pretrained(str(local) if local else tokenizer_path)
    except Exception as exc:
        raise UserError(f"tokenizer at {tokenizer_path} cannot be loaded: {exc}") from None
    return view_of(
        load_tokenizer(tokenizer_path),
        eos_token=hf.eos_token,
        bos_token=hf.bos_token,
        unk_token=hf.unk_token,
        pad_token=hf.pad_token,
    )


@lru_cache(maxsize=16)
def _token_byte_lengths(tokenizer_path: str) -> npt.NDArray[np.int64]:
    """Per token id, the UTF-8 bytes it stands for (specials: 0); for per-byte CE."""
    view = _view(tokenizer_path)
    return np.array([len(view.token_bytes(i)) for i in range(len(view.tokens))], dtype=np.int64)


@lru_cache(maxsize=16)
def _token_keys(tokenizer_path: str) -> npt.NDArray[np.int64]:
    """Per token id, a 63-bit hash of the bytes it stands for (specials: unique negatives)."""
    view = _view(tokenizer_path)
    keys = np.empty(len(view.tokens), dtype=np.int64)
    for i in range(len(view.tokens)):
        b = view.token_bytes(i)
        keys[i] = (
            -1 - i
            if not b
            else int.from_bytes(hashlib.blake2b(b, digest_size=8).digest(), "little") >> 1
        )
    return keys


def build_vocab_map(cfg: PipelineConfig, source_name: str) -> str:
    """Build `vocab_map/<source>.parquet` unless an up-to-date one exists; returns its URL."""
    from fusion_etl.align.vocab import map_vocab

    storage.configure(cfg.storage)
    source = next(m for m in cfg.sources if m.name == source_name)
    url = vocab_map_url(cfg, source)
    fp = _vocab_map_fingerprint(cfg, source)
    if storage.exists(url):
        with storage.open_read(url, compression=None) as fh:
            meta = pq.read_metadata(fh).metadata or {}
        if meta.get(b"fusion_etl.fingerprint") == fp.encode():
            return url
    vm = map_vocab(_view(source.tokenizer_path), _view(cfg.target.tokenizer_path))
    table = vm.to_arrow()
    check_schema(table.schema, VOCAB_MAP, where=f"vocabulary map {url}")
    table = table.cast(VOCAB_MAP)  # the declared schema, non-null fields included
    storage.write_bytes(
        url,
        parquet_bytes(
            table, metadata={"fusion_etl.fingerprint": fp, "fusion_etl.source": source.name}
        ),
    )
    return url


@lru_cache(maxsize=16)
def _load_vocab_map(url: str) -> npt.NDArray[np.int32]:
    with storage.open_read(url, compression=None) as fh:
        table = pq.read_table(fh)
    check_schema(table.schema, VOCAB_MAP, where=f"vocabulary map {url}")
    src = table.column("source_id").to_numpy()
    out = np.zeros(int(src.max()) + 1 if len(src) else 0, dtype=np.int32)
    out[src] = table.column("target_id").to_numpy()
    return out


def _check_extract(pf: pq.ParquetFile, url: str, model: ModelConfig) -> int:
    meta = footer_metadata(pf)
    if "fusion_etl.top_k" not in meta:
        raise InputDataError(
            f"extracted shard {url} has no fusion_etl.* metadata in its footer (not written by "
            "fusion-etl extract, or rewritten without it); rerun extract"
        )
    k = int(meta["fusion_etl.top_k"])
    dtype = meta.get("fusion_etl.logprob_dtype", "float16")
    check_schema(pf.schema_arrow, extract_schema(k, dtype), where=f"extracted shard {url}")
    fp = meta.get("fusion_etl.tokenizer_fingerprint", "")
    if fp != tokenizer_fingerprint(model.tokenizer_path):
        raise InputDataError(
            f"extracted shard {url} was made with another tokenizer than {model.name!r} has now "
            f"({fp} vs {tokenizer_fingerprint(model.tokenizer_path)}); rerun extract"
        )
    return k


class AlignFuseStage:
    """The `align_fuse` stage (see the module docstring)."""

    name = "align_fuse"

    def _upstream(self, cfg: PipelineConfig) -> dict[str, Manifest]:
        # No sources is allowed: the fused distribution is then the target's own (what a
        # CLM-only run, train.lam 1, trains on without reading it).
        out = {}
        for model in cfg.models:
            url = storage.join(cfg.stage_url("extract"), model.name)
            out[model.name] = read_manifest(url, stage="extract")
        names = {m: [s.name for s in man.shards] for m, man in out.items()}
        target_names = names[cfg.target.name]
        for name, shard_names in names.items():
            if shard_names != target_names:
                raise InputDataError(
                    f"extract/{name} has shards {shard_names[:3]}... but extract/{cfg.target.name} has "
                    f"{target_names[:3]}...: the extract outputs come from different prepare runs; rerun extract"
                )
        return out

    def plan(self, cfg: PipelineConfig) -> list[StagePlan]:
        upstream = self._upstream(cfg)
        target = upstream[cfg.target.name]
        return self._plan(
            cfg,
            {m: (man.url, man.fingerprint) for m, man in upstream.items()},
            [s.name for s in target.shards],
        )

    def plan_after(self, cfg: PipelineConfig, extract: list[StagePlan]) -> list[StagePlan]:
        """The plan that extract's `extract` plans lead to, made before any of them has
        finished (pipelined `run all`: a shard starts once every model committed it). Once
        extract has finished it equals `plan`: same items, inputs and fingerprint."""
        if not cfg.sources:
            raise UserError("align_fuse needs at least one source model (sources: [...])")
        by_url = {p.output: p for p in extract}
        upstream = {}
        for model in cfg.models:
            url = storage.join(cfg.stage_url("extract"), model.name)
            upstream[model.name] = (url, by_url[url].fingerprint)
        target = by_url[upstream[cfg.target.name][0]]
        return self._plan(cfg, upstream, [it.shard for it in target.items])

    def _plan(
        self, cfg: PipelineConfig, upstream: dict[str, tuple[str, str]], shards: list[str]
    ) -> list[StagePlan]:
        """The plan from each model's extract (URL, fingerprint) and the shard names."""
        prepare = read_manifest(cfg.stage_url("prepare"), stage="prepare")
        identity = {
            "stage": self.name,
            "version": VERSION,
            "align_fuse": fingerprint_fields(cfg.align_fuse),
            "extract": {m: fp for m, (_, fp) in upstream.items()},
            "sources": [m.name for m in cfg.sources],
            "vocab_maps": {m.name: _vocab_map_fingerprint(cfg, m) for m in cfg.sources},
        }
        items = tuple(
            WorkItem(
                shard=name,
                inputs=tuple(storage.join(upstream[m.name][0], name) for m in cfg.models),
                payload={"prepare": storage.join(prepare.url, name)},
            )
            for name in shards
        )
        return [
            make_plan(
                self.name,
                cfg,
                output=cfg.stage_url(self.name),
                identity=identity,
                inputs={url: fp for url, fp in upstream.values()},
                items=items,
            )
        ]

    def setup(self, cfg: PipelineConfig, plan: StagePlan) -> None:
        """Build the vocabulary maps once, one Ray task per source, before any shard runs."""
        if cfg.ray.executor == "inline":
            for m in cfg.sources:
                build_vocab_map(cfg, m.name)
            return
        from fusion_etl.ray_utils import init_ray

        ray = init_ray(cfg.ray)
        task = ray.remote(
            num_cpus=cfg.align_fuse.num_cpus, resources=dict(cfg.align_fuse.resources) or None
        )(build_vocab_map)
        for url in ray.get([task.remote(cfg, m.name) for m in cfg.sources]):
            log(f"align_fuse: vocabulary map {url}")

    def actor_pool(self, cfg: PipelineConfig, plan: StagePlan) -> ActorPool | None:
        return None

    def process(self, cfg: PipelineConfig, item: WorkItem) -> ShardOutput:
        ac = cfg.align_fuse
        files = [open_parquet(u) for u in item.inputs]
        ks = [
            _check_extract(pf, u, m)
            for pf, u, m in zip(files, item.inputs, cfg.models, strict=True)
        ]
        k_out = ac.top_k or ks[0]
        for model, pf, url in zip(cfg.models[1:], files[1:], item.inputs[1:], strict=True):
            if pf.metadata.num_rows != files[0].metadata.num_rows:
                raise InputDataError(
                    f"{url}: source {model.name!r} has {pf.metadata.num_rows} documents in shard {item.shard}, "
                    f"the target {files[0].metadata.num_rows}; rerun extract for all models from the same prepare output"
                )
        prepared = None
        if ac.align_method == "offsets":
            prepared = open_parquet(str(item.payload["prepare"]))
            check_schema(
                prepared.schema_arrow, PREPARE, where=f"prepared shard {item.payload['prepare']}"
            )
        stats: dict[str, int] = {"tokens": 0}
        metadata = {"fusion_etl.top_k": str(k_out), "fusion_etl.fusion": ac.fusion}
        row_group_tokens: list[int] = []

        def batches() -> Iterator[pa.Table]:
            # Every file is read in the same runs of `row_group_docs` documents, so one run of
            # every model is in memory at a time, whatever the shard's size.
            n = ac.row_group_docs
            readers = [pf.iter_batches(batch_size=n) for pf in files]
            if prepared is not None:
                readers.append(prepared.iter_batches(batch_size=n, columns=["doc_id", "text"]))
            try:
                yield from fused_runs(readers)
            finally:
                for pf in [*files, *([prepared] if prepared is not None else [])]:
                    pf.close()
            metadata["fusion_etl.row_group_tokens"] = json.dumps(row_group_tokens)

        def fused_runs(readers: list[Iterator[pa.RecordBatch]]) -> Iterator[pa.Table]:
            for parts in zip(*readers, strict=True):
                tables = [pa.Table.from_batches([b]) for b in parts[: len(files)]]
                texts = parts[-1].column("text").to_pylist() if prepared is not None else None
                if prepared is not None and parts[-1].column("doc_id").to_pylist() != (
                    tables[0].column("doc_id").to_pylist()
                ):
                    raise InputDataError(
                        f"prepared shard {item.payload['prepare']} does not line up with extract's doc_ids"
                    )
                table = self._fuse_batch(cfg, item, tables, ks, k_out, texts)
                tokens = int(pc.sum(pc.list_value_length(table.column("input_ids"))).as_py() or 0)
                stats["tokens"] += tokens
                row_group_tokens.append(tokens)
                yield table

        return ShardOutput(
            batches=batches(),
            schema=align_fuse_schema(k_out),
            stats=stats,
            metadata=metadata,
        )

    def _fuse_batch(
        self,
        cfg: PipelineConfig,
        item: WorkItem,
        tables: list[pa.Table],
        ks: list[int],
        k_out: int,
        texts: list[str] | None,
    ) -> pa.Table:
        """One run of documents, every model's rows of it in `tables`: the fused table."""
        from fusion_etl.align.dtw import align_tokens
        from fusion_etl.align.fusion import Candidate, boundary_pairs, fuse, transfer

        ac = cfg.align_fuse
        doc_ids = tables[0].column("doc_id").to_pylist()
        for model, t, url in zip(cfg.models[1:], tables[1:], item.inputs[1:], strict=True):
            if t.column("doc_id").to_pylist() != doc_ids:
                raise InputDataError(
                    f"{url}: doc_ids of source {model.name!r} do not line up with the target's in shard {item.shard}; "
                    "rerun extract for all models from the same prepare output"
                )
        views = [_view(m.tokenizer_path) for m in cfg.models]
        keys = [_token_keys(m.tokenizer_path) for m in cfg.models]
        vmaps = [_load_vocab_map(vocab_map_url(cfg, s)) for s in cfg.sources]
        tokens_of = [np.asarray(v.tokens, dtype=object) for v in views]
        ids = [list_rows(t.column("input_ids")) for t in tables]
        top_ids = [list_rows(t.column("topk_ids"), k) for t, k in zip(tables, ks, strict=True)]
        top_lps = [list_rows(t.column("topk_logprobs"), k) for t, k in zip(tables, ks, strict=True)]
        nll = [t.column("nll").to_numpy() for t in tables]
        ntok = [t.column("num_tokens").to_numpy() for t in tables]
        nbytes = tables[0].column("num_bytes").to_numpy()
        target_bytes_len = _token_byte_lengths(cfg.target.tokenizer_path)

        out_ids: list[npt.NDArray[np.int32]] = []
        out_probs: list[npt.NDArray[np.float32]] = []
        weights: list[list[float]] = []
        matched: list[list[float]] = []
        for d in range(len(doc_ids)):
            t_ids = ids[0][d]
            n_t = len(t_ids)
            tgt = Candidate(
                ids=top_ids[0][d].astype(np.int32),
                probs=np.exp(top_lps[0][d].astype(np.float64)).astype(np.float32),
                valid=np.ones(n_t, dtype=bool),
                nll=float(nll[0][d]),
                num_tokens=int(ntok[0][d]),
                num_bytes=int(nbytes[d]),
            )
            cands = [tgt]
            fractions = []
            t_spans: list[tuple[int, int]] | None = None  # the target's spans, once per document
            for s in range(1, len(cfg.models)):
                s_ids = ids[s][d]
                pairs = None
                if ac.align_method == "dtw":
                    path = align_tokens(
                        list(tokens_of[s][s_ids]), list(tokens_of[0][t_ids]), method="dtw"
                    )
                else:
                    assert texts is not None
                    s_spans = _offsets(cfg, cfg.models[s], texts[d], s_ids)
                    if t_spans is None:
                        t_spans = _offsets(cfg, cfg.models[0], texts[d], t_ids)
                    if ac.match == "boundary":
                        path, pairs = [], boundary_pairs(s_spans, t_spans)
                    else:
                        path = align_tokens(
                            list(tokens_of[s][s_ids]),
                            list(tokens_of[0][t_ids]),
                            method="offsets",
                            source_offsets=s_spans,
                            target_offsets=t_spans,
                        )
                c_ids, c_probs, c_matched = transfer(
                    path,
                    source_ids=s_ids,
                    target_ids=t_ids,
                    source_topk_ids=top_ids[s][d],
                    source_topk_logprobs=top_lps[s][d],
                    vocab_map=vmaps[s - 1],
                    source_token_keys=keys[s],
                    target_token_keys=keys[0],
                    pairs=pairs,
                )
                fractions.append(float(c_matched.mean()) if n_t else 0.0)
                cands.append(
                    Candidate(
                        ids=c_ids,
                        probs=c_probs,
                        valid=c_matched,
                        nll=float(nll[s][d]),
                        num_tokens=int(ntok[s][d]),
                        num_bytes=int(nbytes[d]),
                    )
                )
            nxt_bytes = np.zeros(n_t, dtype=np.int64)
            nxt_bytes[:-1] = target_bytes_len[t_ids[1:]]
            fused = fuse(
                cands,
                t_ids,
                method=ac.fusion,
                level=ac.level,
                ce_unit=ac.ce_unit,
                temperature=ac.temperature,
                k=k_out,
                next_token_bytes=nxt_bytes,
            )
            out_ids.append(fused.ids)
            out_probs.append(fused.probs)
            weights.append(fused.weights.tolist())
            matched.append(fractions)

        return _to_table(
            doc_ids, tables[0].column("input_ids"), out_ids, out_probs, weights, matched, k_out
        )


def _offsets(
    cfg: PipelineConfig, model: ModelConfig, text: str, expected: npt.NDArray[np.integer]
) -> list[tuple[int, int]]:
    """Character spans of the model's tokens of `text`, with zero-width spans for the BOS/EOS
    that extract added, checked against the tokens extract stored."""
    enc = load_tokenizer(model.tokenizer_path).encode(text, add_special_tokens=False)
    lead = 1 if cfg.extract.add_bos else 0
    trail = 1 if cfg.extract.add_eos else 0
    n = len(enc.ids)
    if len(expected) != lead + n + trail or not np.array_equal(
        np.asarray(expected[lead : lead + n]), np.asarray(enc.ids)
    ):
        raise InputDataError(
            f"the tokens of {model.name!r} in extract do not match its tokenizer on the prepared text; rerun extract"
        )
    spans = [(int(a), int(b)) for a, b in enc.offsets]
    return [(0, 0)] * lead + spans + [(len(text), len(text))] * trail


def _to_table(
    doc_ids: list[str],
    input_ids: pa.ChunkedArray,
    fused_ids: list[npt.NDArray[np.int32]],
    fused_probs: list[npt.NDArray[np.float32]],
    weights: list[list[float]],
    matched: list[list[float]],
    k: int,
) -> pa.Table:
    lengths = np.array([len(x) for x in fused_ids], dtype=np.int64)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32), pa.int32())
    flat_ids = np.concatenate(fused_ids).reshape(-1) if fused_ids else np.zeros(0, np.int32)
    flat_probs = np.concatenate(fused_probs).reshape(-1) if fused_probs else np.zeros(0, np.float32)
    return pa.table(
        {
            "doc_id": pa.array(doc_ids, pa.string()),
            "input_ids": input_ids.combine_chunks()
            if isinstance(input_ids, pa.ChunkedArray)
            else input_ids,
            "fused_ids": pa.ListArray.from_arrays(
                offsets, pa.FixedSizeListArray.from_arrays(pa.array(flat_ids, pa.int32()), k)
            ),
            "fused_probs": pa.ListArray.from_arrays(
                offsets, pa.FixedSizeListArray.from_arrays(pa.array(flat_probs, pa.float32()), k)
            ),
            "source_weights": pa.array(weights, pa.list_(pa.float32())),
            "matched_fraction": pa.array(matched, pa.list_(pa.float32())),
        },
        schema=align_fuse_schema(k),
    )
