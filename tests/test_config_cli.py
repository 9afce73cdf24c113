"""Tests for difftune.config.experiment (load, overrides, validation, YAML round-trip) and difftune.cli (dry runs, errors)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from difftune.cli import main
from difftune.config.experiment import ConfigError, ExperimentConfig, load_config

BIN = Path(sys.executable).parent


def _write(path: Path, raw) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _raw(pretrained: str = "some-org/some-model", **sections) -> dict:
    raw = {
        "model": {"pretrained": pretrained},
        "data": {"source": "digits", "classes": [5, 6, 7], "per_class": 10},
        "objective": {"bank_share": 0.0},
        "train": {"batch_size": 8, "max_steps": 10},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


@pytest.fixture
def cfg_file(tmp_path: Path) -> Path:
    return _write(tmp_path / "exp.yaml", _raw())


# ---------------------------------------------------------------------------------------- config


def test_load_config_values_and_defaults(cfg_file: Path) -> None:
    cfg = load_config(cfg_file)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.model.pretrained == "some-org/some-model"
    assert cfg.data.classes == [5, 6, 7] and cfg.data.per_class == 10
    assert cfg.train.batch_size == 8 and cfg.train.max_steps == 10
    # paper defaults where the file is silent
    assert cfg.objective.target_schedule == "power_up" and cfg.objective.bank_schedule == "power_down"
    assert cfg.objective.bank_weight == 0.1 and cfg.objective.cfg_dropout == 0.1
    assert cfg.train.learning_rate == 1e-4 and cfg.train.ema_decay == 0.9999


def test_overrides_are_parsed_with_yaml_rules(cfg_file: Path, tmp_path: Path) -> None:
    cfg = load_config(
        cfg_file,
        [
            "train.max_steps=123",
            "train.learning_rate=3e-4",
            "objective.realisation=weight",
            "objective.learn_variance=false",
            "data.classes=[1, 2]",
            "data.per_class=null",
            f"bank.path={tmp_path / 'bank'}",
            "objective.bank_share=0.25",
            "model.pretrained=a=b",  # only the first '=' splits
        ],
    )
    assert cfg.train.max_steps == 123
    assert cfg.train.learning_rate == pytest.approx(3e-4)
    assert cfg.objective.realisation == "weight"
    assert cfg.objective.learn_variance is False
    assert cfg.data.classes == [1, 2] and cfg.data.per_class is None
    assert cfg.objective.bank_share == 0.25 and cfg.bank.path == str(tmp_path / "bank")
    assert cfg.model.pretrained == "a=b"
    assert cfg.bank_count == 2  # int(0.25 * 8)
    # later overrides win
    assert load_config(cfg_file, ["train.max_steps=5", "train.max_steps=7"]).train.max_steps == 7


def test_bank_count_is_int_of_share_times_batch() -> None:
    cfg = load_config(
        None, ["model.pretrained=x/y", "data.source=digits", "bank.path=b", "objective.bank_share=0.2"]
    )
    assert cfg.train.batch_size == 32 and cfg.bank_count == 6  # 26 target + 6 bank, as in the authors' code


def test_yaml_round_trip(cfg_file: Path, tmp_path: Path) -> None:
    cfg = load_config(cfg_file, ["objective.realisation=weight", "train.resume=latest", "data.seed=3"])
    out = tmp_path / "saved.yaml"
    cfg.save(out)
    assert not (tmp_path / "saved.yaml.tmp").exists()
    again = load_config(out)
    assert again.to_dict() == cfg.to_dict()
    assert again == cfg
    assert yaml.safe_load(out.read_text()) == cfg.to_dict()


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["objective.bank_share=1.5"], ["objective.bank_share", "[0, 1)"]),
        (["objective.bank_share=-0.1"], ["objective.bank_share"]),
        (["objective.realisation=foo"], ["objective.realisation", "'foo'", "sample", "weight"]),
        (["objective.cfg_dropout=1.0"], ["objective.cfg_dropout"]),
        (["objective.bank_weight=-1"], ["objective.bank_weight", ">= 0"]),
        (["objective.power_up.exponent=-1"], ["objective.power_up.exponent=-1 must be >= 0"]),
        (
            ["objective.target_exponent=-1"],
            ["objective.power_up.exponent=-1 must be >= 0"],
        ),  # an old spelling
        (["train.batch_size=0"], ["train.batch_size", "> 0"]),
        (["train.ema_decay=1.0"], ["train.ema_decay"]),
        (["train.mixed_precision=fp8"], ["train.mixed_precision", "bf16"]),
        (["data.source=imagenet"], ["data.source", "folder", "digits"]),
        (["data.source=folder"], ["data.path"]),
        (["data.per_class=0"], ["data.per_class"]),
        (["model.pretrained="], ["model.pretrained"]),
        (["bank.sampling.guidance_scale=0.5"], ["bank.sampling.guidance_scale=0.5 must be >= 1"]),
        (["bank.guidance_scale=0.5"], ["bank.sampling.guidance_scale=0.5 must be >= 1"]),  # an old spelling
        (["objective.bank_share=0.2"], ["bank.path", "bank_share"]),  # bank share without a bank
        (["train.colour=red"], ["unknown key", "train.colour", "batch_size"]),
        (["training.max_steps=3"], ["section.key", "train"]),
        (["a=b"], ["section.key"]),
        (["train.max_steps"], ["train.max_steps", "section.key=value"]),
    ],
)
def test_invalid_values_raise_config_error(cfg_file: Path, overrides: list[str], words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(cfg_file, overrides)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)


def test_unknown_key_in_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.yaml", _raw(train={"max_stepz": 3}))
    with pytest.raises(ConfigError, match="max_stepz") as info:
        load_config(path)
    assert "'train'" in str(info.value) and "max_steps" in str(info.value)


def test_unknown_section_in_file(tmp_path: Path) -> None:
    raw = _raw()
    raw["optimiser"] = {"lr": 1}
    with pytest.raises(ConfigError, match="unknown config section") as info:
        load_config(_write(tmp_path / "c.yaml", raw))
    assert "optimiser" in str(info.value) and "objective" in str(info.value)


def test_exponent_floats_without_a_dot(tmp_path: Path) -> None:
    # PyYAML's YAML 1.1 rules read 1e-4 as a string; the config loader reads it as a float
    path = _write(tmp_path / "c.yaml", _raw())
    path.write_text(path.read_text() + "  learning_rate: 2e-4\n")  # the last section is train
    cfg = load_config(path, ["train.adam_eps=1E-6", "objective.bank_weight=5e-2"])
    assert (
        cfg.train.learning_rate == 2e-4 and cfg.train.adam_eps == 1e-6 and cfg.objective.bank_weight == 0.05
    )


def test_section_that_is_not_a_mapping(tmp_path: Path) -> None:
    raw = _raw()
    raw["train"] = [1, 2]
    with pytest.raises(ConfigError, match="'train' must be a mapping"):
        load_config(_write(tmp_path / "c.yaml", raw))


def test_wrong_type_in_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train"):
        load_config(_write(tmp_path / "c.yaml", _raw(train={"batch_size": "many"})))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_config(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(info.value)


@pytest.mark.parametrize("text", ["- model\n- data\n", "just a string\n", "42\n"])
def test_non_mapping_yaml(tmp_path: Path, text: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model: {pretrained: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# ------------------------------------------------------------------------------------------- CLI


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("difftune: error:"), err
    return lines[0]


def test_train_dry_run_prints_config_and_plan(dit_dir: Path, tmp_path: Path, capsys) -> None:
    cfg = _write(tmp_path / "c.yaml", _raw(str(dit_dir), train={"output_dir": str(tmp_path / "run")}))
    assert main(["train", "--config", str(cfg), "--dry-run", "--set", "train.max_steps=42"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    out = captured.out
    assert f"model      {dit_dir}" in out
    assert "batch      8 = 8 target + 0 bank" in out
    assert "target power_up(s=1), bank power_down(s=1), realisation sample" in out
    assert "mean(target) + 0.1 * mean(bank)" in out
    assert "steps      42" in out
    assert f"output     {tmp_path / 'run'}" in out
    # the printed YAML is the resolved config
    dumped = yaml.safe_load(out.split("\nmodel      ")[0])
    assert dumped == load_config(cfg, ["train.max_steps=42"]).to_dict()
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.sampling.scheduler=Nope", "train.sampling.scheduler 'Nope' is unknown"),
        ("train.sampling.steps=0", "train.sampling.steps=0 must be a positive integer"),
        ("train.sampling.guidance_scale=0.5", "train.sampling.guidance_scale=0.5 must be >= 1"),
    ],
)
def test_train_dry_run_checks_the_grid_sampling(
    dit_dir: Path, tmp_path: Path, capsys, override: str, message: str
) -> None:
    cfg = _write(tmp_path / "c.yaml", _raw(str(dit_dir), train={"output_dir": str(tmp_path / "run")}))
    assert (
        main(
            ["train", "--config", str(cfg), "--dry-run", "--set", "train.sample_every=10", "--set", override]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


BANK_MANIFEST = {
    "kind": "bank",
    "shape": [1, 8, 8],
    "num_classes": 5,
    "label_rule": "i mod num_classes",
    "num_samples": 12,
    "shard_size": 8,
    "num_shards": 2,
    "source": "the tiny DiT",
    "source_fingerprint": "0123abcd",  # not compared by a dry run: it reads no weights
    "space": "pixel",
}


def test_train_dry_run_with_existing_bank(dit_dir: Path, tmp_path: Path, capsys) -> None:
    bank = tmp_path / "bank"
    bank.mkdir()
    (bank / "manifest.json").write_text(json.dumps(BANK_MANIFEST))
    cfg = _write(
        tmp_path / "c.yaml",
        _raw(str(dit_dir), objective={"bank_share": 0.2}, bank={"path": str(bank)}, train={"batch_size": 32}),
    )
    assert main(["train", "--config", str(cfg), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "batch      32 = 26 target + 6 bank" in out
    assert "DiTTransformer2DModel, samples (1, 8, 8), 5 classes; the target has 3" in out
    assert "bank       12 samples from the tiny DiT" in out and "writable" in out


@pytest.mark.parametrize(
    "problem,message",
    [
        ("bank shape", "holds samples of shape [4, 2, 2] but the model works on [1, 8, 8]"),
        ("bank classes", "was made for num_classes=1000, the model has 5"),
        ("too many classes", "target dataset has 6 classes but the source model has only 5 label rows"),
        ("output is a file", "cannot be created"),
    ],
)
def test_train_dry_run_finds_what_a_run_would_meet_later(
    dit_dir: Path, tmp_path: Path, capsys, problem: str, message: str
) -> None:
    bank = tmp_path / "bank"
    bank.mkdir()
    manifest = dict(BANK_MANIFEST)
    extra = []
    if problem == "bank shape":
        manifest["shape"] = [4, 2, 2]
    elif problem == "bank classes":
        manifest["num_classes"] = 1000
    elif problem == "too many classes":
        extra = ["--set", "data.classes=[0,1,2,3,4,5]"]
    else:
        (tmp_path / "afile").write_text("x")
        extra = ["--set", f"train.output_dir={tmp_path / 'afile' / 'run'}"]
    (bank / "manifest.json").write_text(json.dumps(manifest))
    cfg = _write(
        tmp_path / "c.yaml",
        _raw(str(dit_dir), objective={"bank_share": 0.2}, bank={"path": str(bank)}, train={"batch_size": 32}),
    )
    assert main(["train", "--config", str(cfg), "--dry-run", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_bank_dry_run(dit_dir: Path, tmp_path: Path, capsys) -> None:
    cfg = _write(
        tmp_path / "c.yaml",
        _raw(
            str(dit_dir), bank={"path": str(tmp_path / "bank"), "num_samples": 10, "shard_size": 4, "seed": 5}
        ),
    )
    assert main(["bank", "--config", str(cfg), "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert "would generate 10 samples" in captured.out
    assert "(3 shards;" in captured.out
    assert "seeds 5..14" in captured.out
    assert not (tmp_path / "bank").exists()


def test_sample_dry_run(dit_dir: Path, tmp_path: Path, capsys) -> None:
    out_dir = tmp_path / "samples"
    argv = [
        "sample",
        "--dry-run",
        "--model",
        str(dit_dir),
        "--labels",
        "0,3",
        "--per-label",
        "2",
        "--steps",
        "5",
        "--seed",
        "10",
        "--out",
        str(out_dir),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "would sample 4 images (labels [0, 3] x 2)" in out
    assert "5 steps" in out and "seeds 10..13" in out and "[ema/" not in out
    assert not out_dir.exists()
    # EMA weights are picked when present, unless --no-ema
    (dit_dir / "ema" / "transformer").mkdir(parents=True)
    assert main(argv) == 0
    assert "[ema/transformer]" in capsys.readouterr().out
    assert main([*argv, "--no-ema"]) == 0
    assert "[ema/" not in capsys.readouterr().out


def test_demo_dry_run(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--dry-run", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    text = capsys.readouterr().out
    assert (
        "pre-train" in text and "fine-tune" in text and str(out) in text and str(tmp_path / "cache") in text
    )
    assert not out.exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    "case",
    [
        "missing_config",
        "bad_override",
        "missing_model",
        "missing_bank",
        "missing_data_folder",
        "bank_no_path",
        "bank_bad_scheduler",
    ],
)
def test_config_commands_user_errors(case: str, dit_dir: Path, tmp_path: Path, capsys) -> None:
    raw = _raw(str(dit_dir))
    extra: list[str] = []
    command = "train"
    expect = ""
    if case == "missing_config":
        cfg = tmp_path / "nope.yaml"
        expect = "does not exist"
    else:
        cfg = _write(tmp_path / "c.yaml", raw)
    if case == "bad_override":
        extra, expect = ["--set", "train.nonsense=1"], "unknown key"
    elif case == "missing_model":
        extra, expect = ["--set", f"model.pretrained={tmp_path / 'no-model'}"], "no-model"
    elif case == "missing_bank":
        extra = ["--set", "objective.bank_share=0.2", "--set", f"bank.path={tmp_path / 'no-bank'}"]
        expect = "difftune bank"
    elif case == "missing_data_folder":
        extra = ["--set", "data.source=folder", "--set", f"data.path={tmp_path / 'no-data'}"]
        expect = "data.path"
    elif case == "bank_no_path":
        command, expect = "bank", "bank.path"
    elif case == "bank_bad_scheduler":
        command = "bank"
        extra = ["--set", f"bank.path={tmp_path / 'b'}", "--set", "bank.sampling.scheduler=NoSuchScheduler"]
        expect = "NoSuchScheduler"
    assert main([command, "--config", str(cfg), "--dry-run", *extra]) == 2
    line = _one_error_line(capsys)
    assert expect in line, line


@pytest.mark.parametrize(
    ("extra", "expect"),
    [
        (["--scheduler", "NoSuchScheduler"], "NoSuchScheduler"),
        (["--labels", "0,cat"], "--labels"),
        (["--per-label", "0"], "--per-label"),
        (["--steps", "0"], "--steps"),
        (["--guidance-scale", "0.5"], "--guidance-scale"),
    ],
)
def test_sample_user_errors(extra: list[str], expect: str, dit_dir: Path, capsys) -> None:
    assert main(["sample", "--dry-run", "--model", str(dit_dir), *extra]) == 2
    assert expect in _one_error_line(capsys)


def test_sample_missing_model(tmp_path: Path, capsys) -> None:
    assert main(["sample", "--dry-run", "--model", str(tmp_path / "no-model")]) == 2
    assert "no-model" in _one_error_line(capsys)


def test_no_subcommand_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)


def test_python_m_difftune_help() -> None:
    result = _run([sys.executable, "-m", "difftune", "--help"])
    assert result.returncode == 0, result.stderr
    for command in ("train", "bank", "sample", "demo"):
        assert command in result.stdout


def test_console_script_help() -> None:
    script = BIN / ("difftune.exe" if os.name == "nt" else "difftune")
    assert script.is_file(), f"console script {script} is not installed"
    result = _run([str(script), "--help"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: difftune")
    for command in ("train", "bank", "sample", "demo"):
        assert command in result.stdout


@pytest.mark.parametrize(
    "config",
    # task sequences (continual_*.yaml) run with `difftune continual`: tests/test_continual.py checks them
    [
        p
        for p in sorted((Path(__file__).resolve().parents[1] / "configs" / "paper").glob("*.yaml"))
        if not p.name.startswith("continual_")
    ],
    ids=lambda p: p.name,
)
def test_shipped_configs_validate(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bank").mkdir()
    (tmp_path / "bank" / "manifest.json").write_text("{}")
    (tmp_path / "data" / "a_class").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "a_class" / "0.png")
    row = {"file_name": "a_class/0.png", "text": "x", "conditioning_image": "a_class/0.png"}
    (tmp_path / "data" / "metadata.jsonl").write_text(json.dumps(row) + "\n")  # for the captioned recipes
    sets = ["--set", f"data.path={tmp_path / 'data'}", "--set", f"bank.path={tmp_path / 'bank'}"]
    sets += ["--set", f"train.output_dir={tmp_path / 'run'}"]
    assert main(["train", "--config", str(config), "--dry-run", *sets]) == 0
    assert "target" in capsys.readouterr().out
    cfg = load_config(config)
    if cfg.model.controlnet and not cfg.data.annotator:  # precomputed controls: no bank can match them
        assert main(["bank", "--config", str(config), "--dry-run", *sets]) == 2
        assert "set data.annotator" in capsys.readouterr().err
    else:
        assert main(["bank", "--config", str(config), "--dry-run", *sets]) == 0


PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper"


@pytest.mark.parametrize("config", sorted(PAPER.glob("dit_xl2_*.yaml")), ids=lambda p: p.name)
def test_paper_recipes_hold_the_papers_hyper_parameters(config: Path) -> None:
    cfg = load_config(config)
    assert cfg.model.pretrained == "facebook/DiT-XL-2-256" and cfg.data.resolution == 256
    tc = cfg.train
    assert (tc.batch_size, tc.max_steps, tc.learning_rate, tc.weight_decay, tc.ema_decay) == (
        32,
        24000,
        1e-4,
        0.0,
        0.9999,
    )
    if config.stem.endswith("_plain"):
        assert cfg.objective.target_schedule == "uniform" and cfg.bank_count == 0
    else:
        oc = cfg.objective
        assert (oc.target_schedule, oc.bank_schedule, oc.power_up.exponent, oc.power_down.exponent) == (
            "power_up",
            "power_down",
            1.0,
            1.0,
        )
        assert cfg.bank_count == 6 and oc.bank_weight == 0.1 and oc.realisation == "sample"


def test_eight_datasets_each_with_a_baseline() -> None:
    names = {p.stem for p in PAPER.glob("dit_xl2_*.yaml")}
    datasets = {n for n in names if not n.endswith("_plain")}
    assert len(datasets) == 8 and {f"{n}_plain" for n in datasets} == names - datasets


def test_help_does_not_import_diffusers() -> None:
    # `difftune --help` and every parser are built without diffusers (seconds of imports); commands load it
    code = (
        "import sys, difftune.cli as cli; cli.build_parser(); "
        "print(sorted(m for m in ('diffusers', 'accelerate', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_an_unquoted_no_for_mixed_precision_means_no(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "model: {pretrained: x}\ndata: {source: digits}\nobjective: {bank_share: 0}\ntrain: {mixed_precision: no}\n"
    )
    assert load_config(path).train.mixed_precision == "no"  # YAML 1.1 reads `no` as false
    assert load_config(path, ["train.mixed_precision=no"]).train.mixed_precision == "no"
