"""Tests of the tiny model kit (fusion_etl.kit) on its `test` size (about a second to build)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from fusion_etl.kit import KIT_VERSION, Kit, KitModel, bits_per_byte, build_kit
from fusion_etl.kit.tokenizer_kit import BYTE_PIECES, detect_kind

ROUND_TRIP_SAMPLES = [
    "In the beginning God created the heaven and the earth.",
    "café — naïve 😀\nsecond line\n",
    "  def f(x):\n\treturn x  # two leading spaces, a tab\n",
    " one leading space",
    "trailing spaces   ",
    "\n\nblank lines first",
    "windows\r\nline end",
    "literal byte-piece text <0x41> and <0xFF>",
    "Ωμέγα 漢字 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "e\u0301 combining accent, zero\u200bwidth space",
    "",
]

EXPECTED_EOS = {
    "target": "</s>",
    "src_llama": "</s>",
    "src_neox": "<|endoftext|>",
    "src_gpt2": "<eos>",
}


@dataclass(frozen=True)
class Built:
    kit: Kit
    log: list[str]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    log: list[str] = []
    kit = build_kit(tmp_path_factory.mktemp("kit"), size="test", seed=0, log=log.append)
    return Built(kit=kit, log=log)


@pytest.fixture(scope="module")
def kit(built: Built) -> Kit:
    return built.kit


def _tokenizer(model: KitModel) -> PreTrainedTokenizerFast:
    tokenizer: PreTrainedTokenizerFast = PreTrainedTokenizerFast.from_pretrained(str(model.path))
    return tokenizer


def _tokenizer_json(model: KitModel) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((model.path / "tokenizer.json").read_text("utf-8"))
    return data


def _hashes(root: Path) -> dict[str, str]:
    """Hashes of every weight and tokenizer file under a kit root."""
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        if path.name in ("model.safetensors", "tokenizer.json"):
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _read_jsonl(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


def test_layout_and_log(built: Built) -> None:
    kit = built.kit
    assert [m.name for m in kit.models] == ["target", "src_llama", "src_neox", "src_gpt2"]
    assert kit.target.domain == "mixture"
    assert [m.domain for m in kit.sources] == ["scripture", "code", "prose"]
    record = json.loads((kit.root / "kit.json").read_text("utf-8"))
    assert (record["kit_version"], record["size"], record["seed"]) == (KIT_VERSION, "test", 0)
    assert not list(kit.root.glob(".tmp-*"))
    assert any(line.startswith("tokenizer src_gpt2: unigram") for line in built.log)
    assert any(line.startswith("model target:") and "steps" in line for line in built.log)


def test_models_load_like_hub_models(kit: Kit) -> None:
    for model_info in kit.models:
        model = AutoModelForCausalLM.from_pretrained(str(model_info.path))
        tokenizer = _tokenizer(model_info)
        config = model.config
        assert type(model).__name__ == model_info.architecture
        assert config.architectures == [model_info.architecture]
        assert config.vocab_size == len(tokenizer)
        assert config.hidden_size // config.num_attention_heads == 64  # vLLM CPU attention
        assert config.eos_token_id == tokenizer.eos_token_id
        assert config.bos_token_id == tokenizer.bos_token_id
        assert config.pad_token_id == tokenizer.eos_token_id
        ids = torch.tensor([tokenizer.encode("In the beginning", add_special_tokens=False)])
        with torch.inference_mode():
            logits = model(input_ids=ids).logits
        assert logits.shape == (1, ids.shape[1], len(tokenizer))
        assert torch.isfinite(logits).all()


def test_architectures_and_tokenizer_kinds_differ(kit: Kit) -> None:
    assert len({m.architecture for m in kit.sources}) == 3
    assert len({m.tokenizer_kind for m in kit.sources}) == 3
    for model in kit.models:
        assert detect_kind(_tokenizer_json(model)) == model.tokenizer_kind
    assert kit.target.tokenizer_kind == "sentencepiece_bpe"
    target_vocab = _tokenizer(kit.target).get_vocab()
    llama_vocab = _tokenizer(kit.sources[0]).get_vocab()
    assert len(target_vocab) != len(llama_vocab)
    assert target_vocab != llama_vocab


@pytest.mark.parametrize("name", ["target", "src_llama", "src_gpt2"])
def test_byte_fallback_pieces(kit: Kit, name: str) -> None:
    model = next(m for m in kit.models if m.name == name)
    data = _tokenizer_json(model)
    assert data["model"]["byte_fallback"] is True
    # Pieces of the model vocabulary, not added tokens (those would match literal "<0x41>").
    assert not {t["content"] for t in data["added_tokens"]} & set(BYTE_PIECES)
    tokenizer = _tokenizer(model)
    vocab = tokenizer.get_vocab()
    assert [vocab[p] for p in BYTE_PIECES] == list(range(len(vocab) - 256, len(vocab)))
    assert tokenizer.tokenize("😀")[-4:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert "<0x41>" not in tokenizer.tokenize("<0x41>")


def test_byte_level_has_no_fallback_pieces(kit: Kit) -> None:
    tokenizer = _tokenizer(kit.sources[1])
    assert tokenizer.tokenize(" a\nb") == ["Ġa", "Ċ", "b"]
    assert not set(BYTE_PIECES) & set(tokenizer.get_vocab())


@pytest.mark.parametrize("text", ROUND_TRIP_SAMPLES)
def test_round_trip(kit: Kit, text: str) -> None:
    for model in kit.models:
        tokenizer = _tokenizer(model)
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text, model.name
        # A bare pipeline adds nothing: the kit's users append EOS themselves.
        assert ids == tokenizer(text).input_ids
        assert tokenizer.eos_token_id not in ids


def test_eos_strings(kit: Kit) -> None:
    for model in kit.models:
        tokenizer = _tokenizer(model)
        assert tokenizer.eos_token == EXPECTED_EOS[model.name]
        assert tokenizer.unk_token is not None


def test_corpus_and_heldout(kit: Kit) -> None:
    files = sorted(kit.corpus_dir.glob("part-*.jsonl"))
    assert [f.name for f in files] == [f"part-{k:05d}.jsonl" for k in range(4)]
    rows = [row for f in files for row in _read_jsonl(f)]
    assert all(set(row) == {"text"} for row in rows)
    texts = [row["text"] for row in rows]
    assert 30 <= len(texts) <= 50
    assert texts.count("") == 1
    assert sum(1 for t in texts if t and not t.strip()) == 1
    target = _tokenizer(kit.target)
    longest = max(len(target.encode(t, add_special_tokens=False)) for t in texts)
    assert longest > 1000  # something for a downstream splitter to split

    held = {f.stem: _read_jsonl(f) for f in sorted(kit.heldout_dir.glob("*.jsonl"))}
    assert sorted(held) == ["code", "prose", "scripture"]
    for domain, domain_rows in held.items():
        assert domain_rows
        assert all(row["domain"] == domain and row["text"].strip() for row in domain_rows)
        assert not {row["text"] for row in domain_rows} & set(texts)
    assert any("def " in row["text"] for row in held["code"])


def test_bits_per_byte_is_finite(kit: Kit) -> None:
    rows = _read_jsonl(kit.heldout_dir / "scripture.jsonl")
    bpb = bits_per_byte(kit.sources[0].path, [row["text"] for row in rows] + [""])
    assert math.isfinite(bpb)
    assert 0.0 < bpb < 16.0


def test_second_call_reuses(built: Built) -> None:
    kit = built.kit
    before = {m.name: (m.path / "model.safetensors").stat().st_mtime_ns for m in kit.models}
    log: list[str] = []
    again = build_kit(kit.root, size="test", seed=0, log=log.append)
    assert again == kit
    assert len(log) == 1 and "reusing" in log[0]
    after = {m.name: (m.path / "model.safetensors").stat().st_mtime_ns for m in kit.models}
    assert after == before


def test_same_seed_gives_identical_files(kit: Kit, tmp_path: Path) -> None:
    other = build_kit(tmp_path / "kit", size="test", seed=0)
    hashes = _hashes(other.root)
    assert len(hashes) == 8
    assert hashes == _hashes(kit.root)
    for name in ("corpus", "heldout"):
        for path in sorted((kit.root / name).iterdir()):
            assert path.read_bytes() == (other.root / name / path.name).read_bytes()


def test_killed_build_is_rebuilt_and_other_seed_replaces(kit: Kit, tmp_path: Path) -> None:
    other = build_kit(tmp_path / "kit", size="test", seed=0)
    # A killed build leaves temporary folders and no kit.json: the next call rebuilds.
    (other.root / "kit.json").unlink()
    (other.root / ".tmp-src_neox").mkdir()
    (other.root / ".tmp-src_neox" / "junk").write_text("half-written")
    log: list[str] = []
    build_kit(other.root, size="test", seed=0, log=log.append)
    assert not any("reusing" in line for line in log)
    assert any(line.startswith("built") for line in log)
    assert not list(other.root.glob(".tmp-*"))
    assert _hashes(other.root) == _hashes(kit.root)

    # Another seed is another kit: rebuilt in place, with other weights.
    build_kit(other.root, size="test", seed=1)
    record = json.loads((other.root / "kit.json").read_text("utf-8"))
    assert record["seed"] == 1
    assert _hashes(other.root) != _hashes(kit.root)


def test_build_restores_torch_settings(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    state = torch.get_rng_state()
    build_kit(tmp_path / "kit", size="test", seed=3)
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == deterministic
    assert torch.equal(torch.get_rng_state(), state)


def test_unknown_size_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown kit size"):
        build_kit(tmp_path, size="huge", seed=0)  # type: ignore[arg-type]
