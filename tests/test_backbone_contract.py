"""The contract every registered model family and its backbone adapter must pass (docs/architecture.md,
"The family seam").

Each family in :data:`difftune.backbones.FAMILIES` needs tiny builders in ``BUILDERS`` and a sampling
request in ``REQUESTS``; a new family without them fails
:func:`test_every_registered_family_has_a_contract_builder`, and one that leaves a hook unimplemented
is refused when it registers (:func:`test_a_family_missing_a_hook_is_refused`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import save_pipeline_dir, tiny_dit, tiny_unet, tiny_vae
from difftune.backbones import (
    FAMILIES,
    Conditioning,
    ConditionRequest,
    load_pretrained,
    register_family,
    save_model,
)
from difftune.backbones.class_family import ClassFamily
from difftune.backbones.dit import DiTBackbone
from difftune.backbones.family import HOOKS, BankInputs, ModelFamily, PreflightFacts, missing_hooks, narrows
from difftune.backbones.loading import LoadedModel
from difftune.errors import UserError
from difftune.testing.controlnet import (
    save_flux_controlnet_pipeline,
    save_sd3_controlnet_pipeline,
    save_sdxl_controlnet_pipeline,
)
from difftune.testing.flux import save_flux_pipeline
from difftune.testing.models import save_sd_pipeline, save_sdxl_pipeline
from difftune.testing.sd3 import save_sd3_pipeline

# family name -> writers of a model directory under the given root, one per layout worth checking
BUILDERS: dict[str, list[Callable[[Path], Path]]] = {
    "dit": [
        lambda root: save_pipeline_dir(root, tiny_dit(), "transformer"),
        lambda root: save_pipeline_dir(root, tiny_dit(learn_sigma=False), "transformer"),
        lambda root: save_pipeline_dir(
            root, tiny_dit(in_channels=4, sample_size=2), "transformer", tiny_vae()
        ),
    ],
    "unet": [lambda root: save_pipeline_dir(root, tiny_unet(), "unet")],
    "stable_diffusion": [save_sd_pipeline],
    "stable_diffusion_xl": [save_sdxl_pipeline],
    "stable_diffusion_3": [save_sd3_pipeline],
    "flux": [save_flux_pipeline, lambda root: save_flux_pipeline(root, guidance_embeds=False)],
    "controlnet": [lambda root: save_sd_pipeline(root, controlnet=True)],
    "sdxl_controlnet": [lambda root: save_sdxl_controlnet_pipeline(root, controlnet=True)],
    "sd3_controlnet": [lambda root: save_sd3_controlnet_pipeline(root, controlnet=True)],
    "flux_controlnet": [lambda root: save_flux_controlnet_pipeline(root, controlnet=True)],
}
# family name -> what a user asks to sample from it (CONTROL_FILE: a control image written by the test)
CONTROL_FILE = "control.png"
REQUESTS: dict[str, ConditionRequest] = {
    "dit": ConditionRequest(labels=[0, 3]),
    "unet": ConditionRequest(labels=[0, 3]),
    "stable_diffusion": ConditionRequest(prompts=["a red circle", "three digits"]),
    "stable_diffusion_xl": ConditionRequest(prompts=["a red circle", "three digits"]),
    "stable_diffusion_3": ConditionRequest(prompts=["a red circle", "three digits"]),
    "flux": ConditionRequest(prompts=["a red circle", "three digits"]),
    "controlnet": ConditionRequest(prompts=["a red circle", "three digits"], controls=[CONTROL_FILE]),
    "sdxl_controlnet": ConditionRequest(prompts=["a red circle", "three digits"], controls=[CONTROL_FILE]),
    "sd3_controlnet": ConditionRequest(prompts=["a red circle", "three digits"], controls=[CONTROL_FILE]),
    "flux_controlnet": ConditionRequest(prompts=["a red circle", "three digits"], controls=[CONTROL_FILE]),
}
BANK_PROMPTS = ["a red circle", "a blue square", "", "three digits"]
CASES = [(name, i) for name, builders in BUILDERS.items() for i in range(len(builders))]


def test_every_registered_family_has_a_contract_builder() -> None:
    assert set(FAMILIES) == set(BUILDERS) == set(REQUESTS)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_implements_every_hook(name: str) -> None:
    family = FAMILIES[name]
    assert missing_hooks(family) == []
    assert all(callable(getattr(family, hook)) for hook in HOOKS)
    assert family.adapter.family is family  # the adapter finds its family
    assert family.name == name and family.model_classes
    assert set(family.adapter_targets) == {"lora", "svdiff"}
    # one default family per diffusers class; a narrower family (SDXL's) claims only some of its configs
    others = {
        cls
        for other in FAMILIES.values()
        if other is not family and not narrows(other)
        for cls in other.model_classes
    }
    assert narrows(family) or not others & set(family.model_classes)


def test_a_family_missing_a_hook_is_refused() -> None:
    hooks = {hook: getattr(ClassFamily, hook) for hook in HOOKS if hook != "heldout_conditions"}
    facts = {"name": "incomplete", "model_classes": ("Nope",), "model_class": object, "adapter": DiTBackbone}
    incomplete = type(
        "Incomplete", (ModelFamily,), {**hooks, **facts, "adapter_targets": {"lora": [], "svdiff": []}}
    )
    assert missing_hooks(incomplete()) == ["heldout_conditions"]
    with pytest.raises(TypeError, match=r"'incomplete' does not implement \['heldout_conditions'\]"):
        register_family(incomplete())
    assert "incomplete" not in FAMILIES
    # stated facts are part of the contract too: a family without default adapter targets is refused
    untargeted = type(
        "Untargeted", (ModelFamily,), {**hooks, **facts, "heldout_conditions": ClassFamily.heldout_conditions}
    )
    with pytest.raises(TypeError, match=r"adapter_targets"):
        register_family(untargeted())


@pytest.fixture(params=CASES, ids=[f"{name}-{i}" for name, i in CASES])
def model_dir(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Path]:
    name, i = request.param
    return name, BUILDERS[name][i](tmp_path / "model")


def _load(path: Path) -> LoadedModel:
    """The model of ``path``, its bank conditions prepared by its family (prompts, a Canny annotator)."""
    from difftune.control import build_annotator

    loaded = load_pretrained(str(path))
    loaded.family.prepare_bank(
        loaded, BankInputs(lambda: list(BANK_PROMPTS), lambda: build_annotator("canny"))
    )
    return loaded


def _images(loaded: LoadedModel, n: int) -> torch.Tensor:
    """``n`` random pixel images in [-1, 1] of the size and channels the model's samples decode to."""
    shape = loaded.backbone.sample_shape
    side, channels = loaded.codec.image_size(shape), loaded.codec.image_channels(shape)
    return torch.rand((n, channels, side, side), generator=torch.Generator().manual_seed(1)) * 2 - 1


def _condition(loaded: LoadedModel, n: int) -> Conditioning:
    """Bank conditions, with what the family computes from the bank's samples (a ControlNet's controls)."""
    cond = loaded.backbone.bank_condition(torch.arange(n))
    return Conditioning({**cond, **loaded.backbone.bank_extras(_images(loaded, n))})


def _inputs(loaded: LoadedModel, n: int = 4) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn((n, *loaded.backbone.sample_shape), generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    return x, t, _condition(loaded, n)


def _forward(loaded: LoadedModel, cond: Conditioning) -> torch.Tensor:
    backbone = loaded.backbone.eval()
    n = cond.batch_size
    x = torch.randn((n, *backbone.sample_shape), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return backbone(x, torch.full((n,), 500), cond)


def _request(name: str, root: Path) -> ConditionRequest:
    request = REQUESTS[name]
    if not request.controls:
        return request
    edges = np.zeros((32, 32, 3), np.uint8)
    edges[8:24, 15:17] = 255
    Image.fromarray(edges).save(root / CONTROL_FILE)
    return ConditionRequest(prompts=request.prompts, controls=[str(root / CONTROL_FILE)])


class _Target:
    """A target set as a family reads it: two classes, captions, and the data's own control images."""

    has_controls = True

    def __init__(self, n: int, side: int) -> None:
        self.labels = torch.arange(n) % 2
        self.side = side

    def captions(self) -> list[str]:
        return [f"digit {i}" for i in range(len(self.labels))]

    def annotator(self) -> None:
        return None

    def controls(self, indices: torch.Tensor, flipped: bool) -> torch.Tensor:
        control = torch.linspace(0, 1, self.side).expand(len(indices), 3, self.side, self.side)
        return control.flip(-1) if flipped else control


def test_loads_as_its_family_and_adapter(model_dir) -> None:
    name, path = model_dir
    loaded = load_pretrained(str(path))
    assert loaded.family is FAMILIES[name]
    assert type(loaded.backbone) is FAMILIES[name].adapter


def test_forward_shape_follows_the_declared_variance(model_dir) -> None:
    loaded = _load(model_dir[1])
    backbone = loaded.backbone.eval()
    x, t, cond = _inputs(loaded)
    backbone.check_condition(cond)
    with torch.no_grad():
        out = backbone(x, t, cond)
    C, H, W = backbone.sample_shape
    assert out.shape == (4, C * (2 if backbone.learns_variance else 1), H, W)
    assert torch.isfinite(out).all()


def test_unconditional_form_and_guidance_drop(model_dir) -> None:
    loaded = _load(model_dir[1])
    backbone = loaded.backbone.eval()
    x, t, cond = _inputs(loaded)
    uncond = backbone.drop(cond, torch.ones(4, dtype=torch.bool))
    assert set(backbone.unconditional(4)) == set(cond) == set(backbone.condition_names)
    assert isinstance(uncond, Conditioning) and uncond.batch_size == 4 and set(uncond) == set(cond)
    # dropping every row gives the unconditional form of each tensor, or keeps it (a ControlNet's control)
    null = backbone.unconditional(4)
    assert all(torch.equal(uncond[k], null[k]) or torch.equal(uncond[k], cond[k]) for k in cond)
    assert any(torch.equal(uncond[k], null[k]) and not torch.equal(cond[k], null[k]) for k in cond)
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
    assert all(torch.equal(cond[k], _condition(loaded, 4)[k]) for k in cond)


def test_bank_condition_is_a_pure_function_of_the_index(model_dir) -> None:
    backbone = _load(model_dir[1]).backbone
    whole = backbone.bank_condition(torch.arange(10))
    part = backbone.bank_condition(torch.arange(6, 10))
    assert all(torch.equal(whole.select(slice(6, 10))[k], part[k]) for k in whole)
    json.dumps(backbone.bank_record())  # recorded in the bank's manifest


def test_save_load_round_trip_gives_the_same_outputs_and_unconditional_form(
    model_dir, tmp_path: Path
) -> None:
    loaded = load_pretrained(str(model_dir[1]))
    out = tmp_path / "saved"
    save_model(loaded, out)
    json.dumps(loaded.family.source_record(loaded.parts))  # written into difftune_source.json
    again = load_pretrained(str(out))
    assert again.family is loaded.family
    assert type(again.backbone) is type(loaded.backbone)
    assert again.backbone.sample_shape == loaded.backbone.sample_shape
    assert again.backbone.learns_variance is loaded.backbone.learns_variance
    assert again.codec.space == loaded.codec.space
    before, after = loaded.backbone.unconditional(3), again.backbone.unconditional(3)
    assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)
    x, t, cond = _inputs(_load(model_dir[1]))
    with torch.no_grad():
        assert torch.equal(again.backbone.eval()(x, t, cond), loaded.backbone.eval()(x, t, cond))


def test_sample_conditions_fit_the_backbone(model_dir, tmp_path: Path) -> None:
    name, path = model_dir
    loaded = load_pretrained(str(path))
    request = _request(name, tmp_path)
    cond, tags = loaded.family.sample_conditions(loaded, request)
    size = len(request.labels or request.prompts)
    assert cond.batch_size == size == len(tags) == len(set(tags))
    assert set(cond) == set(loaded.backbone.condition_names)
    loaded.backbone.check_condition(cond)
    assert _forward(loaded, cond).shape[0] == size
    # the conditions of held-out images of classes 0 and 1: one row per image, those of a class alike
    labels = torch.tensor([0, 1, 1, 0, 1])
    request = ConditionRequest(labels=request.labels, prompts=request.prompts, controls=request.controls)
    held = loaded.family.heldout_conditions(loaded, labels, 2, request)
    assert held.batch_size == 5 and set(held) == set(cond)
    assert all(torch.equal(held[k][1], held[k][2]) and torch.equal(held[k][0], held[k][3]) for k in held)
    loaded.backbone.check_condition(held)
    # the family refuses inputs of another family's kind, in its own words
    other = {"labels": ConditionRequest(prompts=["x"]), "prompts": ConditionRequest(labels=[0])}
    with pytest.raises(UserError):
        loaded.family.check_request(other["labels" if request.labels else "prompts"])


def test_target_conditions_fit_the_backbone_and_key_the_cache(model_dir) -> None:
    loaded = load_pretrained(str(model_dir[1]))
    side = loaded.codec.image_size(loaded.backbone.sample_shape)
    target = _Target(6, side)
    conditioner = loaded.family.target_conditioner(loaded, target)
    assert conditioner.identity is None or isinstance(conditioner.identity, str)
    images = _images(loaded, 3)
    first = conditioner(torch.tensor([0, 2, 5]), images, False)
    again = loaded.family.target_conditioner(loaded, target)(torch.tensor([0, 2, 5]), images, False)
    assert set(first) == set(loaded.backbone.condition_names)
    assert all(torch.equal(first[k], again[k]) for k in first)  # a pure function of the images
    cond = Conditioning(first)
    loaded.backbone.check_condition(cond)
    assert _forward(loaded, cond).shape[0] == 3
    rows = loaded.family.grid_conditions(
        Conditioning(conditioner(torch.arange(6), _images(loaded, 6), False))
    )
    assert 1 <= rows.batch_size <= 6 and set(rows) == set(cond)


def test_the_other_hooks_answer(model_dir) -> None:
    loaded = _load(model_dir[1])
    family, backbone = loaded.family, loaded.backbone
    json.dumps(family.tuning_base(loaded.parts))  # an adapter's base record
    assert family.check_tuning(loaded.parts, False) is None
    _, _, cond = _inputs(loaded, 2)
    if family.has_control():
        controls = family.control_images(cond)
        assert controls.shape[0] == 2 and controls.min() >= 0 and controls.max() <= 1
    else:
        with pytest.raises(UserError):
            family.control_images(cond)
    manifest = {**backbone.bank_record(), "conditions": list(backbone.condition_names)}
    family.check_bank(manifest, backbone, lambda: backbone.bank_record().get("annotator"), "bank")
    with pytest.raises(UserError, match="regenerate the bank"):
        family.check_bank({"conditions": ["nothing"]}, backbone, lambda: None, "bank")
    facts = PreflightFacts(2, lambda: "the target has 2 captioned images", lambda: "control    from the data")
    lines = family.preflight_lines(backbone, facts)
    assert lines and lines[0].startswith("model") and all(isinstance(line, str) for line in lines)
    assert all(hasattr(part, "save_pretrained") for part in family.pipeline_parts(loaded).values())
    json.dumps(family.pipeline_extras(loaded, ["a", "b"]))
    assert family.sample_flags(loaded).startswith("--")
    assert isinstance(family.card_notes(loaded, Path(model_dir[1])), list)
    # default adapter targets: module names (a tiny model need not hold all of them; it holds some)
    names = [name for name, _ in backbone.inner.named_modules()]
    targets = [t for group in backbone.adapter_targets.values() for t in group]
    assert targets and all(isinstance(t, str) and t for t in targets)
    assert any(n == t or n.endswith("." + t) for n in names for t in targets)
