"""The extract stage: real tiny models through transformers and vLLM (CPU build) on real Ray."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fusion_etl.config import PipelineConfig, parse_config, to_dict
from fusion_etl.errors import ConfigError, InputDataError, UserError
from fusion_etl.manifest import read_manifest
from fusion_etl.runner import run_stage
from fusion_etl.schema import extract_schema
from fusion_etl.stages.extract import ExtractStage
from fusion_etl.stages.prepare import PrepareStage

pytestmark = pytest.mark.slow

# vLLM and transformers compute the same fp32 log-softmax with different kernels; on the kit's
# models they agree to about 1e-6. Ids may only differ where two candidates are this close.
LOGPROB_ATOL = 1e-5


def _cfg(kit: Any, run_dir: Path, *overrides: str, sources: int = 3) -> PipelineConfig:
    data = {
        "run_dir": str(run_dir),
        "target": {"name": "target", "path": str(kit.target.path)},
        "sources": [{"name": m.name, "path": str(m.path)} for m in kit.sources[:sources]],
        "prepare": {"input": str(kit.corpus_dir), "block_size": 256, "shard_docs": 12},
        "extract": {"dtype": "float32"},
        "ray": {"num_cpus": 2},
    }
    return parse_config(data, list(overrides))


@pytest.fixture(scope="module")
def prepared(ray_local: Any, test_kit: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder whose prepare stage is done (copied by the tests that write into it)."""
    run_dir = tmp_path_factory.mktemp("prepared")
    assert run_stage(PrepareStage(), _cfg(test_kit, run_dir)).complete
    return run_dir


def _fresh(prepared: Path, tmp_path: Path, name: str) -> Path:
    run_dir = tmp_path / name
    shutil.copytree(prepared / "prepare", run_dir / "prepare")
    return run_dir


def _read(run_dir: Path, model: str) -> pa.Table:
    m = read_manifest(str(run_dir / "extract" / model), stage="extract")
    return pa.concat_tables([pq.read_table(u) for u in m.shard_urls()])


def _rows(table: pa.Table, column: str) -> np.ndarray:
    return np.concatenate([np.asarray(x) for x in table.column(column).to_pylist()])


def test_transformers_columns_are_right(prepared: Path, tmp_path: Path, test_kit: Any) -> None:
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    run_dir = _fresh(prepared, tmp_path, "tf")
    cfg = _cfg(test_kit, run_dir, "extract.backend=transformers", "extract.top_k=7")
    result = run_stage(ExtractStage(), cfg)
    assert result.complete and result.ran == result.total == 4 * len(
        read_manifest(str(run_dir / "prepare"), stage="prepare").shards
    )
    texts = dict(
        zip(
            *(
                pa.concat_tables(
                    [
                        pq.read_table(u)
                        for u in read_manifest(
                            str(run_dir / "prepare"), stage="prepare"
                        ).shard_urls()
                    ]
                )
                .column(c)
                .to_pylist()
                for c in ("doc_id", "text")
            ),
            strict=True,
        )
    )
    for model in cfg.models:
        table = _read(run_dir, model.name)
        assert table.schema.remove_metadata() == extract_schema(7, "float16")
        meta = pq.read_metadata(
            read_manifest(str(run_dir / "extract" / model.name), stage="extract").shard_urls()[0]
        ).metadata
        assert (
            meta[b"fusion_etl.model_name"] == model.name.encode()
            and meta[b"fusion_etl.top_k"] == b"7"
        )
        assert (
            meta[b"fusion_etl.logprob_dtype"] == b"float16"
            and b"fusion_etl.tokenizer_fingerprint" in meta
        )
        assert meta[b"fusion_etl.dtype"] == b"float32"
        tok = PreTrainedTokenizerFast.from_pretrained(model.path)
        lm: Any = AutoModelForCausalLM.from_pretrained(model.path, dtype=torch.float32)
        lm.eval()
        for row in table.slice(0, 3).to_pylist():
            ids = row["input_ids"]
            n = len(ids)
            # text + eos, no BOS, real length only
            assert ids == tok(texts[row["doc_id"]], add_special_tokens=False)["input_ids"] + [
                tok.eos_token_id
            ]
            assert (
                row["num_tokens"]
                == n
                == len(row["topk_ids"])
                == len(row["topk_logprobs"])
                == len(row["token_logprobs"]) + 1
            )
            assert row["num_bytes"] == len(texts[row["doc_id"]].encode("utf-8"))
            # An independent computation: the model's own log-softmax, full vocabulary.
            with torch.no_grad():
                ref = torch.log_softmax(lm(torch.tensor([ids])).logits[0].float(), dim=-1)
            ref_top = ref.topk(7, dim=-1)
            got_lp = np.asarray(row["topk_logprobs"], dtype=np.float32)
            np.testing.assert_allclose(
                got_lp, ref_top.values.numpy(), atol=2e-3, rtol=1e-3
            )  # stored as float16
            gaps = np.diff(ref_top.values.numpy(), axis=-1)
            clear = np.concatenate([np.ones((n, 1), bool), gaps < -1e-4], axis=1) & np.concatenate(
                [gaps < -1e-4, np.ones((n, 1), bool)], axis=1
            )
            assert (np.asarray(row["topk_ids"])[clear] == ref_top.indices.numpy()[clear]).all()
            actual = ref[torch.arange(n - 1), torch.tensor(ids[1:])].numpy()
            np.testing.assert_allclose(row["token_logprobs"], actual, atol=1e-5)
            assert row["nll"] == pytest.approx(
                -float(np.sum(np.asarray(row["token_logprobs"], dtype=np.float64))), abs=1e-9
            )
            assert (np.diff(got_lp, axis=-1) <= 0).all()
    # A second run does nothing.
    assert run_stage(ExtractStage(), cfg).ran == 0


def test_vllm_and_transformers_agree_under_dtype_auto(
    prepared: Path, tmp_path: Path, test_kit: Any
) -> None:
    # `auto` on both: left to itself vLLM's auto downcasts these float32 checkpoints to
    # bfloat16 on a CPU (top-k ids then differ at 6-11% of slots); it must mean float32 for both.
    common = ("extract.dtype=auto", "extract.logprob_dtype=float32", "extract.top_k=10")
    tf_dir = _fresh(prepared, tmp_path, "tf")
    vl_dir = _fresh(prepared, tmp_path, "vllm")
    tf_cfg = _cfg(test_kit, tf_dir, "extract.backend=transformers", *common)
    vl_cfg = _cfg(test_kit, vl_dir, "extract.backend=vllm", *common)
    for cfg in (tf_cfg, vl_cfg):
        assert {plan.identity["dtype"] for plan in ExtractStage().plan(cfg)} == {"float32"}
    assert run_stage(ExtractStage(), tf_cfg).complete
    assert run_stage(ExtractStage(), vl_cfg).complete
    for model in tf_cfg.models:
        a, b = _read(tf_dir, model.name), _read(vl_dir, model.name)
        for run_dir, backend in ((tf_dir, b"transformers"), (vl_dir, b"vllm")):
            meta = pq.read_metadata(
                read_manifest(str(run_dir / "extract" / model.name), stage="extract").shard_urls()[
                    0
                ]
            ).metadata
            assert meta[b"fusion_etl.backend"] == backend
            assert meta[b"fusion_etl.dtype"] == b"float32"
        assert a.column("doc_id").equals(b.column("doc_id"))
        assert a.column("input_ids").equals(b.column("input_ids"))
        a_lp, b_lp = _rows(a, "topk_logprobs"), _rows(b, "topk_logprobs")
        np.testing.assert_allclose(b_lp, a_lp, atol=LOGPROB_ATOL, rtol=0)
        np.testing.assert_allclose(
            _rows(b, "token_logprobs"), _rows(a, "token_logprobs"), atol=LOGPROB_ATOL, rtol=0
        )
        np.testing.assert_allclose(
            b.column("nll").to_numpy(), a.column("nll").to_numpy(), rtol=1e-5
        )
        a_ids, b_ids = _rows(a, "topk_ids"), _rows(b, "topk_ids")
        # Ids must agree, except where the two backends order an exact tie differently (also a
        # tie between slot k and the unseen k+1-th). Check those against the model's full
        # log-softmax: vLLM's id must have transformers' log-prob at that slot.
        bad_rows, bad_slots = np.nonzero(a_ids != b_ids)
        assert len(bad_rows) <= 0.001 * a_ids.size, f"{model.name}: {len(bad_rows)} differing ids"
        if len(bad_rows):
            full = _full_logprobs(model.path, a)
            for r, c in zip(bad_rows.tolist(), bad_slots.tolist(), strict=True):
                assert abs(full[r, b_ids[r, c]] - a_lp[r, c]) <= LOGPROB_ATOL, (model.name, r, c)


def _full_logprobs(path: str, table: pa.Table) -> np.ndarray:
    """[sum n_d, V] log-softmax of the model over every document of `table` (small models)."""
    import torch
    from transformers import AutoModelForCausalLM

    lm: Any = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    lm.eval()
    rows = []
    with torch.no_grad():
        for ids in table.column("input_ids").to_pylist():
            rows.append(
                torch.log_softmax(lm(torch.tensor([ids])).logits[0].float(), dim=-1).numpy()
            )
    return np.concatenate(rows)


def test_a_shard_is_written_in_runs_equal_to_one_run(
    prepared: Path, tmp_path: Path, test_kit: Any
) -> None:
    # batch_tokens=1: one document per forward pass, so how documents are grouped into runs
    # cannot change a single bit of the scores; only the memory held at once differs.
    common = ("extract.backend=transformers", "extract.batch_tokens=1")
    runs_dir, one_dir = _fresh(prepared, tmp_path, "runs"), _fresh(prepared, tmp_path, "one")
    assert run_stage(
        ExtractStage(), _cfg(test_kit, runs_dir, *common, "extract.docs_per_call=7", sources=0)
    ).complete
    assert run_stage(
        ExtractStage(), _cfg(test_kit, one_dir, *common, "extract.docs_per_call=100000", sources=0)
    ).complete
    shards = read_manifest(str(runs_dir / "extract" / "target"), stage="extract").shard_urls()
    for url in shards:
        runs, one = pq.ParquetFile(url), pq.ParquetFile(url.replace("/runs/", "/one/"))
        assert runs.metadata.num_rows == one.metadata.num_rows > 7
        assert runs.metadata.num_row_groups == -(-runs.metadata.num_rows // 7)
        assert one.metadata.num_row_groups == 1
        assert runs.read().equals(one.read())


def test_bad_input_is_reported_before_work(prepared: Path, tmp_path: Path, test_kit: Any) -> None:
    with pytest.raises(ConfigError, match=r"extract\.top_k: must be at least 1"):
        _cfg(test_kit, tmp_path, "extract.top_k=0")
    with pytest.raises(
        ConfigError, match=r"extract\.top_k: 21 exceeds the vLLM engine's max_logprobs \(20\)"
    ):
        _cfg(test_kit, tmp_path, "extract.top_k=21")
    assert (
        _cfg(test_kit, tmp_path, "extract.top_k=21", "extract.backend=transformers").extract.top_k
        == 21
    )

    run_dir = _fresh(prepared, tmp_path, "bad")
    with pytest.raises(
        UserError, match=r"model 'src_llama': .*nowhere is not a local folder with config.json"
    ):
        run_stage(ExtractStage(), _cfg(test_kit, run_dir, f"sources.0.path={tmp_path / 'nowhere'}"))

    broken = tmp_path / "broken_model"
    shutil.copytree(test_kit.target.path, broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(
        UserError, match=r"model at .*broken_model cannot be loaded with the transformers backend"
    ):
        run_stage(
            ExtractStage(),
            _cfg(
                test_kit,
                run_dir,
                f"target.path={broken}",
                "extract.backend=transformers",
                sources=0,
            ),
        )

    with pytest.raises(
        InputDataError,
        match=r"more than its maximum length 8; rerun prepare with prepare.block_size",
    ):
        run_stage(
            ExtractStage(),
            _cfg(
                test_kit,
                _fresh(prepared, tmp_path, "long"),
                "extract.max_length=8",
                "extract.backend=transformers",
                sources=0,
            ),
        )

    wrong = _fresh(prepared, tmp_path, "schema")
    shard = wrong / "prepare" / "part-00000.parquet"
    pq.write_table(pa.table({"doc_id": ["a"], "body": ["x"]}), shard)
    with pytest.raises(
        Exception, match=r"prepared shard .*part-00000\.parquet: column 'text' is missing"
    ):
        run_stage(ExtractStage(), _cfg(test_kit, wrong, "extract.backend=transformers", sources=0))


def test_dead_actor_is_replaced_and_its_shard_retried(
    prepared: Path, tmp_path: Path, test_kit: Any
) -> None:
    import psutil

    run_dir = _fresh(prepared, tmp_path, "crash")
    # Small calls make every shard take a while, so there is time to kill the actor mid-run.
    cfg = _cfg(
        test_kit, run_dir, "extract.backend=transformers", "extract.docs_per_call=1", sources=0
    )
    killed: list[int] = []

    def kill_first_actor() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            for proc in psutil.process_iter(["pid", "cmdline"]):
                cmd = " ".join(proc.info["cmdline"] or [])
                if cmd.startswith("ray::ShardActor.commit"):
                    proc.kill()
                    killed.append(proc.info["pid"])
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_first_actor)
    killer.start()
    result = run_stage(ExtractStage(), cfg)
    killer.join()
    assert killed, "no busy ShardActor process was found to kill"
    assert result.complete
    reference = _fresh(prepared, tmp_path, "clean")
    run_stage(
        ExtractStage(),
        _cfg(
            test_kit,
            reference,
            "extract.backend=transformers",
            "extract.docs_per_call=1",
            sources=0,
        ),
    )
    assert _read(run_dir, "target").equals(_read(reference, "target"))


def test_config_roundtrip_keeps_extract_section(test_kit: Any, tmp_path: Path) -> None:
    cfg = _cfg(test_kit, tmp_path, "extract.vllm.max_num_batched_tokens=4096")
    again = parse_config({k: v for k, v in to_dict(cfg).items() if v is not None})
    assert again.extract == cfg.extract and again.extract.vllm.max_num_batched_tokens == 4096
