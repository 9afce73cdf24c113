"""The contract every registered backbone adapter must pass (docs/architecture.md, "Adding a backbone").

Each adapter class in :data:`difftune.backbones.BACKBONES` needs a tiny builder in ``BUILDERS``; a new
backbone without one fails :func:`test_every_registered_backbone_has_a_contract_builder`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from conftest import save_pipeline_dir, tiny_dit, tiny_unet, tiny_vae
from difftune.backbones import BACKBONES, Backbone, Conditioning, load_pretrained, save_model
from difftune.backbones.controlnet import CONTROL, ControlNetBackbone
from difftune.backbones.dit import DiTBackbone
from difftune.backbones.stable_diffusion import TextConditionalBackbone
from difftune.backbones.unet import UNetBackbone
from difftune.testing.models import save_sd_pipeline

# adapter class -> writers of a model directory under the given root, one per layout worth checking
BUILDERS: dict[type[Backbone], list[Callable[[Path], Path]]] = {
    DiTBackbone: [
        lambda root: save_pipeline_dir(root, tiny_dit(), "transformer"),
        lambda root: save_pipeline_dir(root, tiny_dit(learn_sigma=False), "transformer"),
        lambda root: save_pipeline_dir(
            root, tiny_dit(in_channels=4, sample_size=2), "transformer", tiny_vae()
        ),
    ],
    UNetBackbone: [lambda root: save_pipeline_dir(root, tiny_unet(), "unet")],
    TextConditionalBackbone: [save_sd_pipeline],
    ControlNetBackbone: [lambda root: save_sd_pipeline(root, controlnet=True)],
}
BANK_PROMPTS = ["a red circle", "a blue square", "", "three digits"]
CASES = [(cls, i) for cls, builders in BUILDERS.items() for i in range(len(builders))]


def test_every_registered_backbone_has_a_contract_builder() -> None:
    assert {adapter for _, adapter in BACKBONES.values()} == set(BUILDERS)


@pytest.fixture(params=CASES, ids=[f"{cls.__name__}-{i}" for cls, i in CASES])
def model_dir(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[type[Backbone], Path]:
    cls, i = request.param
    return cls, BUILDERS[cls][i](tmp_path / "model")


def _load(path: Path) -> Backbone:
    """The backbone of ``path``; a text-conditional one gets bank prompts (its bank conditions)."""
    loaded = load_pretrained(str(path))
    if isinstance(loaded.backbone, TextConditionalBackbone):
        loaded.backbone.set_bank_prompts(BANK_PROMPTS, loaded.prompts.encode(BANK_PROMPTS))
    return loaded.backbone


def _condition(backbone: Backbone, n: int) -> Conditioning:
    """Bank conditions, with a ControlNet's control images (which a bank computes from its samples)."""
    cond = backbone.bank_condition(torch.arange(n))
    if CONTROL not in backbone.condition_names:
        return cond
    side = backbone.sample_shape[1] * backbone.control_downsample
    control = torch.randint(0, 256, (n, 3, side, side), generator=torch.Generator().manual_seed(1))
    return Conditioning({**cond, CONTROL: control.to(torch.uint8)})


def _inputs(backbone: Backbone, n: int = 4) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn((n, *backbone.sample_shape), generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    return x, t, _condition(backbone, n)


def test_loads_as_its_adapter(model_dir) -> None:
    cls, path = model_dir
    assert type(load_pretrained(str(path)).backbone) is cls


def test_forward_shape_follows_the_declared_variance(model_dir) -> None:
    backbone = _load(model_dir[1]).eval()
    x, t, cond = _inputs(backbone)
    backbone.check_condition(cond)
    with torch.no_grad():
        out = backbone(x, t, cond)
    C, H, W = backbone.sample_shape
    assert out.shape == (4, C * (2 if backbone.learns_variance else 1), H, W)
    assert torch.isfinite(out).all()


def test_unconditional_form_and_guidance_drop(model_dir) -> None:
    backbone = _load(model_dir[1]).eval()
    x, t, cond = _inputs(backbone)
    uncond = backbone.drop(cond, torch.ones(4, dtype=torch.bool))
    assert set(backbone.unconditional(4)) == set(cond)
    assert isinstance(uncond, Conditioning) and uncond.batch_size == 4 and set(uncond) == set(cond)
    mask = torch.tensor([True, False, True, False])
    dropped = backbone.drop(cond, mask)
    with torch.no_grad():
        out_dropped, out_cond, out_uncond = (backbone(x, t, c) for c in (dropped, cond, uncond))
    # dropped rows are computed exactly as unconditional ones, kept rows as conditional ones
    assert torch.equal(out_dropped[mask], out_uncond[mask])
    assert torch.equal(out_dropped[~mask], out_cond[~mask])
    # the condition matters, so the check above is not vacuous
    assert not torch.allclose(out_cond, out_uncond)
    # the input bundle is not modified in place
    assert all(torch.equal(cond[k], _condition(backbone, 4)[k]) for k in cond)


def test_bank_condition_is_a_pure_function_of_the_index(model_dir) -> None:
    backbone = _load(model_dir[1])
    whole = backbone.bank_condition(torch.arange(10))
    part = backbone.bank_condition(torch.arange(6, 10))
    assert all(torch.equal(whole.select(slice(6, 10))[k], part[k]) for k in whole)
    json.dumps(backbone.bank_record())  # recorded in the bank's manifest


def test_save_load_round_trip_gives_the_same_outputs(model_dir, tmp_path: Path) -> None:
    loaded = load_pretrained(str(model_dir[1]))
    out = tmp_path / "saved"
    save_model(loaded, out)
    again = load_pretrained(str(out))
    assert type(again.backbone) is type(loaded.backbone)
    assert again.backbone.sample_shape == loaded.backbone.sample_shape
    assert again.backbone.learns_variance is loaded.backbone.learns_variance
    assert again.codec.space == loaded.codec.space
    x, t, cond = _inputs(_load(model_dir[1]))
    with torch.no_grad():
        assert torch.equal(again.backbone.eval()(x, t, cond), loaded.backbone.eval()(x, t, cond))
