"""Config loading, overrides, validation, redaction and fingerprints."""

from __future__ import annotations

from pathlib import Path

import pytest

from fusion_etl.cli import demo_config
from fusion_etl.config import (
    PipelineConfig,
    fingerprint,
    fingerprint_fields,
    load_config,
    parse_config,
    redact,
)
from fusion_etl.errors import ConfigError

JOBS_DIR = Path(__file__).parent.parent / "jobs"
# Every YAML in jobs/ is a job, except the runtime_env file that job submission uses.
JOBS = sorted(p for p in JOBS_DIR.glob("*.yaml") if p.name != "runtime_env.yaml")
BASE = {"run_dir": "/tmp/run", "target": {"name": "t", "path": "/m/t"}}


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_every_job_yaml_loads(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, PipelineConfig)
    assert cfg.target.name and cfg.run_dir


def test_jobs_folder_is_not_empty() -> None:
    assert {p.name for p in JOBS} >= {"demo.yaml", "paper_gpu.yaml"}


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_every_job_yaml_starts_with_its_submit_command(path: Path) -> None:
    head = "".join(path.read_text().splitlines(keepends=True)[:20])
    assert head.startswith("#") and "ray job submit" in head and "--working-dir ." in head


def test_paper_job_mirrors_the_paper() -> None:
    cfg = load_config(JOBS_DIR / "paper_gpu.yaml")
    assert cfg.extract.top_k == 10 and cfg.train.lam == 0.9 and cfg.train.block_size == 2048
    assert cfg.train.lr == 1e-5 and cfg.train.num_workers == 8 and cfg.train.use_gpu
    assert cfg.prepare.max_tokens == 2000 and len(cfg.sources) == 2
    assert cfg.extract.backend == "vllm" and cfg.extract.num_gpus == 1


def test_runtime_env_file() -> None:
    import yaml

    env = yaml.safe_load((JOBS_DIR / "runtime_env.yaml").read_text())
    assert {".venv", "runs"} <= set(env["excludes"])


def test_demo_yaml_is_the_embedded_demo() -> None:
    root = Path(__file__).parent.parent
    assert load_config(root / "jobs" / "demo.yaml") == parse_config(demo_config("runs/demo"))


def test_overrides_are_parsed_as_yaml_and_nested() -> None:
    cfg = parse_config(
        {**BASE, "sources": [{"name": "a", "path": "/m/a"}]},
        [
            "prepare.block_size=1024",
            "sources.0.path=/elsewhere",
            "storage.anon=true",
            "prepare.input=s3://b/c",
        ],
    )
    assert cfg.prepare.block_size == 1024
    assert cfg.sources[0].path == "/elsewhere"
    assert cfg.storage.anon is True
    assert cfg.prepare.input == "s3://b/c"


def test_exponent_floats_without_a_dot_are_numbers() -> None:
    # PyYAML (YAML 1.1) loads `1e-5` as a string; the config still reads it as a number.
    cfg = parse_config({**BASE, "train": {"lr": "1e-5"}}, ["train.warmup_ratio=8e-3"])
    assert cfg.train.lr == 1e-5 and cfg.train.warmup_ratio == 0.008
    with pytest.raises(ConfigError, match=r"train\.lr: expected a number, got 'fast'"):
        parse_config(BASE, ["train.lr=fast"])


def test_interpolation_follows_overrides() -> None:
    cfg = parse_config(
        {**BASE, "prepare": {"input": "${run_dir}/corpus"}}, ["run_dir=s3://bucket/x"]
    )
    assert cfg.prepare.input == "s3://bucket/x/corpus"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["prepare.format=xml"],
            "prepare.format: 'xml' is not allowed; choose one of 'auto', 'jsonl', 'parquet', 'text'",
        ),
        (["prepare.blocksize=3"], "unknown key 'prepare.blocksize'; allowed keys at prepare:"),
        (["prepare.block_size=big"], "prepare.block_size: expected an integer, got 'big'"),
        (["prepare.margin=4096"], "prepare.margin: must be in [0, block_size)"),
        (["storage.anon=maybe"], "storage.anon: expected true or false"),
        (["sources=[{name: t, path: /x}]"], "model name 't' is used twice"),
        (["target.name=a/b"], "target.name: 'a/b' must use letters"),
        (["noequals"], "expected key.sub=value"),
        (["run_dir=${nowhere}"], "${nowhere}: no such key"),
        (["align_fuse.match=boundary"], "align_fuse.match: `boundary` pairs tokens by their"),
    ],
)
def test_invalid_values_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(BASE, overrides)
    assert message in str(info.value)


def test_missing_required_key() -> None:
    with pytest.raises(ConfigError, match=r"target: missing required key"):
        parse_config({"run_dir": "/x"})


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_dir: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_redact_hides_secrets_and_url_credentials() -> None:
    data = {
        "secret_key": "abc",
        "nested": {"api_token": "t", "path": "s3://AKIA:shh@bucket/x"},
        "name": "ok",
    }
    out = redact(data)
    assert out == {
        "secret_key": "***",
        "nested": {"api_token": "***", "path": "s3://***@bucket/x"},
        "name": "ok",
    }


def test_fingerprint_ignores_how_and_tracks_what() -> None:
    a = parse_config(BASE)
    b = parse_config(BASE, ["prepare.num_cpus=2"])
    c = parse_config(BASE, ["prepare.block_size=1000"])
    fa, fb, fc = (fingerprint(fingerprint_fields(x.prepare)) for x in (a, b, c))
    assert fa == fb
    assert fa != fc
    assert fingerprint({"x": 1, "y": 2}) == fingerprint({"y": 2, "x": 1})


def test_a_field_added_later_is_fingerprinted_only_off_its_default() -> None:
    # align_fuse.match came after runs existed: at its default ("token", the old behaviour) it
    # is not in the fingerprint, so those runs stay valid; set otherwise, it is.
    token = fingerprint_fields(parse_config(BASE).align_fuse)
    boundary = fingerprint_fields(
        parse_config(
            BASE, ["align_fuse.align_method=offsets", "align_fuse.match=boundary"]
        ).align_fuse
    )
    assert "match" not in token
    assert boundary["match"] == "boundary"
    assert {k: v for k, v in boundary.items() if k != "match"} == {
        **token,
        "align_method": "offsets",
    }
