"""``sampling.scheduler_options``: constructor arguments of the sampler, from a config or the command line,
applied where samples are drawn (the bank among them), recorded in the bank's manifest, and refused in
one line when the sampler does not take them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from difftune.backbones import load_pretrained
from difftune.bank import generate_bank
from difftune.config.checks import ConfigError
from difftune.config.sampling import SamplingSpec, add_sampling_args, sampling_spec_from_args
from difftune.errors import UserError
from difftune.sampling.generate import build_scheduler
from test_training import make_cfg

SDE = "bank.sampling.scheduler_options={algorithm_type: sde-dpmsolver++, thresholding: true}"


def test_options_reach_the_scheduler(dit_dir: Path):
    loaded = load_pretrained(str(dit_dir))
    config, shape = loaded.scheduler_config, loaded.backbone.sample_shape
    default = build_scheduler("DPMSolverMultistepScheduler", config, shape)
    options = {"algorithm_type": "sde-dpmsolver++", "thresholding": True}
    stochastic = build_scheduler("DPMSolverMultistepScheduler", config, shape, options)
    assert default.config.algorithm_type == "dpmsolver++" and not default.config.thresholding
    assert stochastic.config.algorithm_type == "sde-dpmsolver++" and stochastic.config.thresholding
    assert (
        stochastic.config.num_train_timesteps == default.config.num_train_timesteps
    )  # the model's config kept


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"algoritm_type": "sde-dpmsolver++"}, "takes no scheduler option"),
        ({"algorithm_type": "nope"}, "refuses"),
    ],
)
def test_options_the_scheduler_does_not_take_are_refused_in_one_line(
    dit_dir: Path, options: dict, message: str
):
    loaded = load_pretrained(str(dit_dir))
    with pytest.raises(UserError, match=message) as err:
        build_scheduler("DPMSolverMultistepScheduler", loaded.scheduler_config, None, options)
    assert "\n" not in str(err.value)


def test_config_key_and_its_checks(dit_dir: Path, tmp_path: Path):
    cfg = make_cfg(dit_dir, tmp_path / "run", tmp_path / "bank", SDE)
    assert cfg.bank.sampling.scheduler_options == {"algorithm_type": "sde-dpmsolver++", "thresholding": True}
    assert "algorithm_type=sde-dpmsolver++" in cfg.bank.sampling.describe()
    with pytest.raises(ConfigError, match="bank.sampling.scheduler_options"):
        make_cfg(dit_dir, tmp_path / "run", tmp_path / "bank", "bank.sampling.scheduler_options=sde")


def test_command_line_flag_reads_each_value_as_yaml():
    parser = argparse.ArgumentParser()
    add_sampling_args(parser)
    args = parser.parse_args(
        ["--scheduler-option", "algorithm_type=sde-dpmsolver++", "--scheduler-option", "thresholding=true"]
    )
    spec = sampling_spec_from_args(args)
    assert spec.scheduler_options == {"algorithm_type": "sde-dpmsolver++", "thresholding": True}
    assert sampling_spec_from_args(parser.parse_args([])) == SamplingSpec()
    with pytest.raises(SystemExit):
        parser.parse_args(["--scheduler-option", "thresholding"])


def test_bank_drawn_with_options_records_them_and_repeats_per_seed(dit_dir: Path, tmp_path: Path):
    loaded = load_pretrained(str(dit_dir))

    def bank(name: str, *extra: str) -> tuple[dict, torch.Tensor]:
        cfg = make_cfg(dit_dir, tmp_path / "run", tmp_path / name, "bank.num_samples=6", *extra).bank
        generate_bank(loaded, cfg, progress=False)
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        return manifest, torch.cat([s["samples"] for s in _shards(tmp_path / name)])

    plain_manifest, plain = bank("plain")
    sde_manifest, sde = bank("sde", SDE)
    _, again = bank("again", SDE)
    assert "scheduler_options" not in plain_manifest
    assert sde_manifest["scheduler_options"] == {"algorithm_type": "sde-dpmsolver++", "thresholding": True}
    assert not torch.allclose(plain, sde)  # the stochastic solver ran
    assert torch.equal(sde, again)  # its noise comes from each sample's seed


def _shards(root: Path) -> list[dict]:
    from safetensors.torch import load_file

    return [load_file(str(path)) for path in sorted(root.glob("*.safetensors"))]
