"""SamplingSpec and its argparse helper; the codec's latent-vs-pixel facts."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from difftune.config.sampling import (
    SamplingSpec,
    add_sampling_args,
    given_sampling_flags,
    sampling_spec_from_args,
)


def test_defaults_live_in_one_place() -> None:
    from difftune.config.experiment import BankConfig, TrainConfig, section_from_dict

    spec = SamplingSpec()
    assert (spec.scheduler, spec.steps, spec.guidance_scale, spec.seed) == (
        "DPMSolverMultistepScheduler",
        25,
        1.5,
        0,
    )
    assert BankConfig().sampling == spec
    assert TrainConfig().sampling == spec
    assert section_from_dict("bank", {"sampling": {"seed": 7, "steps": 3}}).sampling == SamplingSpec(
        steps=3, seed=7
    )
    assert spec.seeds(5, 3) == [5, 6, 7] and SamplingSpec(seed=100).seeds(0, 2) == [100, 101]


def test_parser_helper_with_and_without_defaults() -> None:
    parser = argparse.ArgumentParser()
    add_sampling_args(parser, guidance_scale=1.0)
    args = parser.parse_args(["--steps", "7"])
    assert sampling_spec_from_args(args) == SamplingSpec(steps=7, guidance_scale=1.0)

    bare = argparse.ArgumentParser()
    add_sampling_args(bare, with_defaults=False)
    args = bare.parse_args(["--seed", "3"])
    assert given_sampling_flags(args) == ["--seed"]
    assert given_sampling_flags(bare.parse_args([])) == []
    assert sampling_spec_from_args(args) == SamplingSpec(seed=3)
    assert sampling_spec_from_args(bare.parse_args([]), steps=4) == SamplingSpec(steps=4)


@pytest.mark.parametrize("kwargs,match", [({"steps": 0}, "steps"), ({"guidance_scale": 0.5}, "guidance")])
def test_invalid_values_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SamplingSpec(**kwargs)


def test_codec_owns_latent_and_pixel_facts(dit_dir: Path, latent_dit_dir: Path) -> None:
    from difftune.backbones import load_pretrained

    pixel = load_pretrained(str(dit_dir))
    assert pixel.codec.space == "pixel"
    assert pixel.codec.image_size(pixel.backbone.sample_shape) == 8
    assert pixel.codec.image_channels(pixel.backbone.sample_shape) == 1
    assert pixel.codec.identity(8) == "pixel"
    latent = load_pretrained(str(latent_dit_dir))
    assert latent.codec.space == "latent"
    assert latent.codec.image_size(latent.backbone.sample_shape) == 16  # 2x2 latents, 8x downsampling
    assert latent.codec.image_channels(latent.backbone.sample_shape) == 3
    assert latent.codec.identity(16) == f"{latent_dit_dir}:16"  # the target cache key of earlier versions


def test_codec_without_a_source_is_named_by_its_weights() -> None:
    from conftest import tiny_vae
    from difftune.backbones import LatentCodec

    a, b = LatentCodec(tiny_vae(seed=0)), LatentCodec(tiny_vae(seed=1))
    assert a.identity(16) == LatentCodec(tiny_vae(seed=0)).identity(16)  # the same weights, the same cache
    assert a.identity(16) != b.identity(16)  # other weights never share a target cache
    assert a.identity(16) != a.identity(32)
