"""Weight merging (linear, task arithmetic, TIES, SCE), the merge stage, and ensemble scoring."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from fusion_etl.errors import FingerprintMismatchError, UserError
from fusion_etl.evaluation import score_ensemble, score_texts
from fusion_etl.merging import merge_tensor, performance_weights
from fusion_etl.stages.evaluate import EvaluateStage
from fusion_etl.stages.merge import MergeStage
from tests.conftest import kit_config

BASE = torch.tensor([10.0, 20.0, 30.0, 40.0])
TAU1 = torch.tensor([1.0, -2.0, 0.1, 0.0])
TAU2 = torch.tensor([0.5, 3.0, -0.2, 0.0])


def test_linear_and_performance_weights() -> None:
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    assert torch.equal(merge_tensor([a, b], method="linear"), torch.tensor([2.0, 4.0]))
    assert torch.allclose(
        merge_tensor([a, b], method="linear", weights=[3, 1]), torch.tensor([1.5, 3.0])
    )
    w = performance_weights([1.0, 1.5], temperature=0.5)
    assert w[0] == pytest.approx(1 / (1 + math.exp(-1.0)))
    assert sum(w) == pytest.approx(1.0) and w[0] > w[1]
    with pytest.raises(ValueError):
        merge_tensor([a, b], method="linear", weights=[1.0])


def test_task_arithmetic_adds_scaled_weighted_task_vectors() -> None:
    got = merge_tensor([BASE + TAU1, BASE + TAU2], method="task_arithmetic", base=BASE, scale=2.0)
    assert torch.allclose(got, BASE + 2.0 * (TAU1 + TAU2) / 2)
    with pytest.raises(ValueError, match="base"):
        merge_tensor([BASE, BASE], method="ties")


def test_ties_trims_elects_a_sign_and_averages_the_agreeing_entries() -> None:
    got = merge_tensor([BASE + TAU1, BASE + TAU2], method="ties", base=BASE, density=0.5)
    # Kept (top 2 by magnitude): tau1 -> [1, -2, 0, 0], tau2 -> [0.5, 3, 0, 0].
    # Elected sign of the sum [1.5, 1, 0, 0]: +, +. Entry 1: only tau2 (3) agrees.
    assert torch.allclose(got, BASE + torch.tensor([0.75, 3.0, 0.0, 0.0]))


def test_sce_selects_by_variance_weights_by_energy_and_erases_minority_signs() -> None:
    got = merge_tensor([BASE + TAU1, BASE + TAU2], method="sce", base=BASE, select=0.5)
    # Variance across models picks entries 1 and 0; energies 1 + 4 = 5 and 0.25 + 9 = 9.25;
    # the sum's signs are +, +, so tau1's -2 is erased.
    c1, c2 = 5 / 14.25, 9.25 / 14.25
    want = BASE + torch.tensor([c1 * 1.0 + c2 * 0.5, c2 * 3.0, 0.0, 0.0])
    assert torch.allclose(got, want)


def _variant(src: Path, dest: Path, scale: float, seed: int) -> Path:
    """A copy of a model with its weights moved: same architecture and tokenizer."""
    shutil.copytree(src, dest)
    weights = load_file(str(dest / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    moved = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in weights.items()}
    save_file(moved, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


@pytest.fixture(scope="module")
def variants(test_kit: Any, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("variants")
    return [_variant(test_kit.target.path, root / f"v{i}", 0.02, i) for i in range(2)]


def _merge_cfg(kit: Any, run_dir: Path, variants: list[Path], *extra: str) -> Any:
    models = ", ".join(f"{{name: v{i}, path: {p}}}" for i, p in enumerate(variants))
    return kit_config(kit, run_dir, f"merge.models=[{models}]", *extra)


def test_merge_stage_writes_a_loadable_model_and_is_idempotent(
    test_kit: Any, variants: list[Path], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    cfg = _merge_cfg(test_kit, run_dir, variants, "merge.weights=[3, 1]")
    assert MergeStage().run(cfg).ran == 1
    out = run_dir / "merge" / "model"
    merged = load_file(str(out / "model.safetensors"))
    a, b = (load_file(str(p / "model.safetensors")) for p in variants)
    for name, tensor in merged.items():
        assert torch.allclose(tensor, 0.75 * a[name] + 0.25 * b[name], atol=1e-6), name
    model: Any = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert (out / "tokenizer.json").exists()
    assert json.loads((run_dir / "merge" / "result.json").read_text())["weights"] == [3.0, 1.0]
    assert MergeStage().run(cfg).ran == 0
    changed = _merge_cfg(test_kit, run_dir, variants, "merge.method=linear")
    with pytest.raises(FingerprintMismatchError, match=r"merge\.weights"):
        MergeStage().run(changed)
    ties = _merge_cfg(
        test_kit,
        tmp_path / "ties",
        variants,
        "merge.method=ties",
        f"merge.base={{name: base, path: {test_kit.target.path}}}",
    )
    assert MergeStage().run(ties).complete
    assert (tmp_path / "ties" / "merge" / "model" / "model.safetensors").exists()


def test_merge_refuses_models_that_do_not_match(test_kit: Any, tmp_path: Path) -> None:
    cfg = kit_config(
        test_kit,
        tmp_path / "run",
        f"merge.models=[{{name: a, path: {test_kit.target.path}}}, {{name: b, path: {test_kit.sources[1].path}}}]",
    )
    with pytest.raises(UserError, match="one tokenizer"):
        MergeStage().run(cfg)


def test_ensemble_averages_probabilities(
    test_kit: Any, variants: list[Path], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    text = (test_kit.heldout_dir / "prose.jsonl").read_text().splitlines()[0]
    text = json.loads(text)["text"][:400]
    # A model ensembled with itself is the model.
    alone = score_texts(variants[0], [text])
    twice = score_ensemble([variants[0], variants[0]], [0.3, 0.7], [text])
    assert twice.nats == pytest.approx(alone.nats, rel=1e-5) and twice.bytes == alone.bytes
    # Two models: the mixture of their next-token probabilities, computed by hand.
    tok = PreTrainedTokenizerFast.from_pretrained(variants[0])
    ids = [tok.eos_token_id, *tok.backend_tokenizer.encode(text, add_special_tokens=False).ids]
    x = torch.tensor([ids[:-1]])
    probs = []
    for p in variants:
        m: Any = AutoModelForCausalLM.from_pretrained(p)
        with torch.no_grad():
            probs.append(torch.softmax(m(input_ids=x).logits[0].double(), -1))
    mix = 0.25 * probs[0] + 0.75 * probs[1]
    want = -torch.log(mix.gather(-1, torch.tensor(ids[1:]).unsqueeze(-1))).sum()
    got = score_ensemble(variants, [1, 3], [text])
    assert got.nats == pytest.approx(float(want), rel=1e-5)
    with pytest.raises(UserError, match="one tokenizer"):
        score_ensemble([variants[0], test_kit.sources[0].path], [1, 1], [text])


@pytest.mark.slow
def test_evaluate_scores_an_ensemble_with_performance_weights(
    test_kit: Any, variants: list[Path], tmp_path: Path
) -> None:
    members = ", ".join(f"{{name: v{i}, path: {p}}}" for i, p in enumerate(variants))
    cfg = kit_config(
        test_kit,
        tmp_path / "run",
        f"evaluate.models=[{{name: v0, path: {variants[0]}}}]",
        "evaluate.ensembles=[{name: ens, models: ["
        + members
        + f"], weighting: performance, validation: {test_kit.corpus_dir}}}]",
    )
    assert EvaluateStage().run(cfg).complete
    results = json.loads((tmp_path / "run" / "evaluate" / "results.json").read_text())
    assert [r["model"] for r in results["results"]] == ["v0", "ens"]
    assert all(0 < r["average_bits_per_byte"] < 20 for r in results["results"])
