"""Builds the tiny model kit: three specialised source LMs, a target LM, and their texts.

Layout under the kit root::

    kit.json            written last; its presence with matching (size, seed, version) = done
    corpus/part-NNNNN.jsonl   {"text": ...} mixed domains, for the pipeline
    heldout/<domain>.jsonl    {"text": ..., "domain": ...} never trained on
    target/ src_llama/ src_neox/ src_gpt2/   save_pretrained folders (model + tokenizer)
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import tokenizers
import torch
import transformers

from fusion_etl.kit._quiet import quiet_transformers
from fusion_etl.kit.corpus import (
    DOMAINS,
    Domain,
    DomainPools,
    cut_documents,
    domain_units,
    split_pools,
    sub_seed,
    write_corpus,
    write_heldout,
)
from fusion_etl.kit.models import (
    Architecture,
    ModelShape,
    TrainSettings,
    make_model,
    token_stream,
    train_causal_lm,
)
from fusion_etl.kit.tokenizer_kit import TokenizerKind, train_tokenizer

__all__ = ["KIT_VERSION", "Kit", "KitModel", "KitSize", "build_kit", "kit_pools"]

# Bump whenever a change alters what a build produces, so old kits are rebuilt, not reused.
KIT_VERSION: Final = 2

KitSize = Literal["demo", "test"]

_MANIFEST: Final = "kit.json"
_CORPUS_DIR: Final = "corpus"
_HELDOUT_DIR: Final = "heldout"
# Thread count is part of the result: float sums are split differently with more threads.
_THREADS: Final = 2
# Unigram training time grows quickly with text size.
_TOKENIZER_TEXT_CHARS: Final = 1_000_000


@dataclass(frozen=True)
class KitModel:
    """One model of the kit.

    Attributes:
        name: ``"target"``, ``"src_llama"``, ``"src_neox"`` or ``"src_gpt2"``.
        path: Folder with ``config.json``, ``model.safetensors`` and the tokenizer files.
        architecture: The transformers class name, e.g. ``"LlamaForCausalLM"``.
        tokenizer_kind: ``"sentencepiece_bpe"``, ``"byte_level_bpe"`` or ``"unigram"``.
        domain: The domain it was trained on; ``"mixture"`` for the target.
    """

    name: str
    path: Path
    architecture: str
    tokenizer_kind: str
    domain: str


@dataclass(frozen=True)
class Kit:
    """A built kit.

    Attributes:
        root: The kit folder.
        target: The model to fuse into.
        sources: The source models (``src_llama``, ``src_neox``, ``src_gpt2``).
        corpus_dir: Folder of ``part-NNNNN.jsonl`` files with ``{"text": ...}`` rows, mixed
            domains, drawn from the documents the models trained on, including one empty and
            one whitespace-only document on purpose.
        heldout_dir: Folder of ``<domain>.jsonl`` files with ``{"text": ..., "domain": ...}``
            rows that no model trained on and the corpus does not contain.
    """

    root: Path
    target: KitModel
    sources: tuple[KitModel, ...]
    corpus_dir: Path
    heldout_dir: Path

    @property
    def models(self) -> tuple[KitModel, ...]:
        """The target followed by the sources."""
        return (self.target, *self.sources)


@dataclass(frozen=True)
class _ModelPlan:
    name: str
    architecture: Architecture
    tokenizer_kind: TokenizerKind
    domain: Domain | Literal["mixture"]


_PLANS: Final[tuple[_ModelPlan, ...]] = (
    _ModelPlan("src_llama", "LlamaForCausalLM", "sentencepiece_bpe", "scripture"),
    _ModelPlan("src_neox", "GPTNeoXForCausalLM", "byte_level_bpe", "code"),
    _ModelPlan("src_gpt2", "GPT2LMHeadModel", "unigram", "prose"),
    _ModelPlan("target", "LlamaForCausalLM", "sentencepiece_bpe", "mixture"),
)


@dataclass(frozen=True)
class _SizeSpec:
    shape: ModelShape
    vocab: dict[str, int]  # per model name, byte pieces included
    limit_alphabet: int
    unit_chars: dict[Domain, int | None]  # head of each file/topic/book kept
    mixture_chars_per_domain: int  # target tokenizer text per domain, for balance
    context: int
    batch_size: int
    source_steps: int
    target_steps: int
    lr: float
    heldout_per_domain: int
    corpus_per_domain: int
    long_per_domain: int
    corpus_files: int


_SIZES: Final[dict[KitSize, _SizeSpec]] = {
    "demo": _SizeSpec(
        shape=ModelShape(hidden=128, heads=2, layers=2, max_positions=512),
        # Target and src_llama share a tokenizer kind but not a vocabulary.
        vocab={"target": 3256, "src_llama": 2256, "src_neox": 3000, "src_gpt2": 2756},
        limit_alphabet=120,
        unit_chars={"code": 24_000, "scripture": None, "prose": None},
        mixture_chars_per_domain=400_000,
        context=128,
        batch_size=16,
        source_steps=240,
        target_steps=80,
        lr=3e-3,
        heldout_per_domain=12,
        corpus_per_domain=100,
        long_per_domain=3,
        corpus_files=8,
    ),
    "test": _SizeSpec(
        shape=ModelShape(hidden=64, heads=1, layers=1, max_positions=256),
        vocab={"target": 600, "src_llama": 520, "src_neox": 400, "src_gpt2": 500},
        limit_alphabet=90,
        unit_chars={"code": 6_000, "scripture": 40_000, "prose": 3_000},
        mixture_chars_per_domain=100_000,
        context=64,
        batch_size=8,
        source_steps=20,
        target_steps=7,
        lr=3e-3,
        heldout_per_domain=3,
        corpus_per_domain=12,
        long_per_domain=1,
        corpus_files=4,
    ),
}


def _expected_models(root: Path) -> list[KitModel]:
    return [
        KitModel(
            name=plan.name,
            path=root / plan.name,
            architecture=plan.architecture,
            tokenizer_kind=plan.tokenizer_kind,
            domain=plan.domain,
        )
        for plan in _PLANS
    ]


def _kit_at(root: Path) -> Kit:
    models = {model.name: model for model in _expected_models(root)}
    return Kit(
        root=root,
        target=models["target"],
        sources=tuple(models[name] for name in ("src_llama", "src_neox", "src_gpt2")),
        corpus_dir=root / _CORPUS_DIR,
        heldout_dir=root / _HELDOUT_DIR,
    )


def _is_built(root: Path, size: KitSize, seed: int) -> bool:
    try:
        record = json.loads((root / _MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if (record.get("kit_version"), record.get("size"), record.get("seed")) != (
        KIT_VERSION,
        size,
        seed,
    ):
        return False
    # kit.json is written last, so this only catches folders removed by hand afterwards.
    needed = ("config.json", "model.safetensors", "tokenizer.json")
    return all((m.path / f).is_file() for m in _expected_models(root) for f in needed)


@contextmanager
def _deterministic_torch(threads: int) -> Iterator[None]:
    """Fixes torch's thread count and deterministic mode, restoring the caller's afterwards."""
    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
        torch.set_num_threads(prev_threads)


def _fresh_tmp(root: Path, name: str) -> Path:
    tmp = root / f".tmp-{name}"
    if tmp.exists():  # left by a killed build
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def _commit(tmp: Path, dest: Path) -> None:
    """Moves a finished folder into place (a rename: never half-visible)."""
    if dest.exists():  # from an older build with other settings
        shutil.rmtree(dest)
    tmp.rename(dest)


def _head_texts(texts: Sequence[str], max_chars: int) -> list[str]:
    out: list[str] = []
    total = 0
    for text in texts:
        if total >= max_chars:
            break
        out.append(text)
        total += len(text)
    return out


def _count_params(model: torch.nn.Module) -> int:
    # Tied embeddings appear once in parameters(), as they do on disk.
    return sum(p.numel() for p in model.parameters())


def build_kit(
    root: str | Path,
    *,
    size: KitSize = "demo",
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> Kit:
    """Builds the kit under ``root``, or returns the one already there.

    A kit counts as built when ``root/kit.json`` records the same size, seed and
    :data:`KIT_VERSION`. Each part is written to a temporary folder and renamed into place,
    and ``kit.json`` is written last, so a killed build is never taken for a finished one;
    the next call rebuilds it. Two processes must not build the same root at once.

    The result is a pure function of (size, seed, Python standard library, library versions):
    torch runs with 2 threads and deterministic algorithms during the build (the caller's
    settings and RNG state are restored), and every random choice uses its own seeded
    generator.

    Args:
        root: Kit folder; created if missing.
        size: ``"demo"`` (width 128; about 70 s on 2 quiet cores, up to 3 minutes when they are
            shared) or ``"test"`` (width 64, about a second, for unit tests).
        seed: Seeds the documents, tokenizers' inputs, initial weights and training windows.
        log: Receives one line per step.

    Returns:
        The kit.

    Raises:
        ValueError: Unknown size.
    """
    if size not in _SIZES:
        raise ValueError(f"unknown kit size {size!r}; expected one of {sorted(_SIZES)}")
    root = Path(root)
    say: Callable[[str], None] = log if log is not None else (lambda _line: None)
    if _is_built(root, size, seed):
        say(f"reusing {root} ({size}, seed {seed}, version {KIT_VERSION})")
        return _kit_at(root)
    root.mkdir(parents=True, exist_ok=True)
    # A stale record must not vouch for the folders this build is about to replace.
    (root / _MANIFEST).unlink(missing_ok=True)
    spec = _SIZES[size]
    start = time.perf_counter()
    with _deterministic_torch(_THREADS), quiet_transformers():
        pools = _build_texts(root, spec, seed, say)
        records = [_build_model(root, plan, spec, pools, seed, say) for plan in _PLANS]
    seconds = time.perf_counter() - start
    manifest: dict[str, Any] = {
        "kit_version": KIT_VERSION,
        "size": size,
        "seed": seed,
        "models": records,
        "corpus_dir": _CORPUS_DIR,
        "heldout_dir": _HELDOUT_DIR,
        "build_seconds": round(seconds, 1),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
    }
    tmp_manifest = root / f".tmp-{_MANIFEST}"
    tmp_manifest.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp_manifest, root / _MANIFEST)
    say(f"built {size} kit (seed {seed}) in {seconds:.1f} s at {root}")
    return _kit_at(root)


def _pools(spec: _SizeSpec, seed: int) -> dict[Domain, DomainPools]:
    pools: dict[Domain, DomainPools] = {}
    for domain in DOMAINS:
        units = domain_units(domain, max_chars_per_unit=spec.unit_chars[domain])
        docs = cut_documents(units, domain=domain, seed=seed)
        pools[domain] = split_pools(docs, n_heldout=spec.heldout_per_domain, seed=seed)
    return pools


def kit_pools(size: KitSize, seed: int) -> dict[Domain, DomainPools]:
    """The documents a kit of this size and seed was built from, per domain: its training
    pool (every model of the kit trained on it; the corpus is a sample of it) and its held-out
    pool (no model trained on it; written to `heldout/`)."""
    return _pools(_SIZES[size], seed)


def _build_texts(
    root: Path, spec: _SizeSpec, seed: int, say: Callable[[str], None]
) -> dict[Domain, DomainPools]:
    t0 = time.perf_counter()
    pools = _pools(spec, seed)
    tmp_corpus = _fresh_tmp(root, _CORPUS_DIR)
    rows = write_corpus(
        tmp_corpus,
        list(pools.values()),
        docs_per_domain=spec.corpus_per_domain,
        long_per_domain=spec.long_per_domain,
        n_files=spec.corpus_files,
        seed=seed,
    )
    tmp_heldout = _fresh_tmp(root, _HELDOUT_DIR)
    held = write_heldout(tmp_heldout, list(pools.values()))
    _commit(tmp_corpus, root / _CORPUS_DIR)
    _commit(tmp_heldout, root / _HELDOUT_DIR)
    sizes = ", ".join(
        f"{d} {len(p.train)} docs/{sum(len(x.text) for x in p.train) // 1000} KB"
        for d, p in pools.items()
    )
    say(
        f"texts: {sizes}; corpus {rows} rows, heldout {held} rows "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    return pools


def _build_model(
    root: Path,
    plan: _ModelPlan,
    spec: _SizeSpec,
    pools: dict[Domain, DomainPools],
    seed: int,
    say: Callable[[str], None],
) -> dict[str, Any]:
    domains: list[Domain] = list(DOMAINS) if plan.domain == "mixture" else [plan.domain]
    per_domain = [[doc.text for doc in pools[d].train] for d in domains]
    if plan.domain == "mixture":
        tok_texts = [
            t for texts in per_domain for t in _head_texts(texts, spec.mixture_chars_per_domain)
        ]
    else:
        tok_texts = _head_texts(per_domain[0], _TOKENIZER_TEXT_CHARS)

    t0 = time.perf_counter()
    tokenizer = train_tokenizer(
        plan.tokenizer_kind,
        tok_texts,
        vocab_size=spec.vocab[plan.name],
        limit_alphabet=spec.limit_alphabet,
        model_max_length=spec.shape.max_positions,
    )
    say(
        f"tokenizer {plan.name}: {plan.tokenizer_kind}, vocab {len(tokenizer)}, "
        f"{sum(len(t) for t in tok_texts) // 1000} KB of text, {time.perf_counter() - t0:.1f} s"
    )

    streams = [token_stream(tokenizer, texts) for texts in per_domain]
    model = make_model(
        plan.architecture, spec.shape, tokenizer, seed=sub_seed(seed, f"init:{plan.name}")
    )
    steps = spec.target_steps if plan.name == "target" else spec.source_steps
    result = train_causal_lm(
        model,
        streams,
        TrainSettings(
            steps=steps,
            batch_size=spec.batch_size,
            context=spec.context,
            lr=spec.lr,
            seed=sub_seed(seed, f"train:{plan.name}"),
        ),
        name=plan.name,
    )
    params = _count_params(model)
    say(
        f"model {plan.name}: {plan.architecture} {params / 1e6:.2f}M params on {plan.domain}, "
        f"{result.steps} steps, loss {result.first_loss:.2f} -> {result.last_loss:.2f}, "
        f"{result.seconds:.1f} s"
    )

    tmp = _fresh_tmp(root, plan.name)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _commit(tmp, root / plan.name)
    return {
        "name": plan.name,
        "path": plan.name,
        "architecture": plan.architecture,
        "tokenizer_kind": plan.tokenizer_kind,
        "domain": plan.domain,
        "vocab_size": len(tokenizer),
        "parameters": params,
        "train_steps": result.steps,
        "train_tokens": result.tokens,
        "first_loss": round(result.first_loss, 4),
        "last_loss": round(result.last_loss, 4),
        "train_seconds": round(result.seconds, 1),
    }
