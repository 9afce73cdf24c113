"""The ControlNet family: a trainable ControlNet over a frozen Stable Diffusion UNet.

Everything of the Stable Diffusion family (text encoder, prompts), plus control images: from the
target data or an annotator (targets), from the annotator run on the bank's own samples (the bank),
or from image files (sampling). A trained ControlNet reloads over the UNet it was trained with,
which its ``difftune_source.json`` records.

The control images are :class:`ControlFamily`'s, which the SDXL and SD3 ControlNet families
(:mod:`~difftune.backbones.controlnet_families`) mix in before their base model's family too.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from difftune.backbones.conditioning import Conditioning
from difftune.backbones.controlnet import CONTROL, ControlNetBackbone, to_uint8
from difftune.backbones.family import (
    ConditionRequest,
    LoadContext,
    PreflightFacts,
    TargetSource,
    absolute_source,
)
from difftune.backbones.lora_layout import lora_card, save_model_lora
from difftune.backbones.sd_family import ATTENTION, StableDiffusionFamily, TextParts
from difftune.backbones.sd_parts import frozen_unet_location
from difftune.config.experiment import NEW_CONTROLNET_TRAINS_IN_FULL
from difftune.errors import UserError
from difftune.io.images import load_square_image

NEEDS_CONTROLS = "a ControlNet needs control images: set data.annotator (e.g. canny) or data.control_column"


def frozen_model(ctx: LoadContext, cls: type, part: str) -> tuple[Any, tuple[str, str | None]]:
    """The frozen model (``cls``, a pipeline's ``part``) a trained ControlNet steers and where it is:
    loaded, or built from its config on the meta device (``ctx.load`` unset)."""
    location = frozen_unet_location(ctx.pretrained, ctx.components, ctx.record, part)
    if ctx.load is not None:
        return ctx.load(cls, *location, ctx.revision), location
    config = cls.load_config(location[0], subfolder=location[1], local_files_only=ctx.local_only)
    return cls.from_config(config), location


class _WithControls:
    """A base family's target conditioner with control images: the data's own, or the annotator's of
    each image (its record keys the target cache beside the base's identity)."""

    def __init__(self, base: Any, source: TargetSource) -> None:
        self.base, self.source = base, source
        self.annotator = source.annotator()
        if self.annotator is not None:
            part = f"annotator:{self.annotator.record()}"
        elif not source.has_controls:
            raise UserError(NEEDS_CONTROLS)
        else:
            part = "controls:data"
        self.identity = f"{base.identity};{part}"

    def __call__(self, indices: torch.Tensor, images: torch.Tensor, flipped: bool) -> dict[str, torch.Tensor]:
        out = self.base(indices, images, flipped)
        if self.annotator is not None:
            control = self.annotator(images.cpu().float())
        else:
            control = self.source.controls(indices, flipped)
        out[CONTROL] = to_uint8(control)
        return out


class ControlFamily:
    """What every ControlNet family shares, mixed in before its base model's family: control images in
    the target's, the bank's and the sampled conditions, the checks that go with them, a new
    ControlNet's full training, and the saved model's stock ControlNet pipeline."""

    def check_tuning(self, parts: Any, adapter: bool) -> None:
        """A new ControlNet (``from_unet``) has random layers an adapter would not save: it trains in full."""
        if adapter and parts is not None and parts.controlnet == "from_unet":
            raise UserError(NEW_CONTROLNET_TRAINS_IN_FULL)

    # conditions
    def check_request(self, request: ConditionRequest) -> None:
        if not request.prompts:
            super().check_request(request)  # type: ignore[misc]
        if not request.controls:
            raise UserError("a ControlNet needs --control-image (one for all prompts, or one per prompt)")

    def sample_conditions(self, loaded: Any, request: ConditionRequest) -> tuple[Conditioning, list[str]]:
        """The prompts' conditions with their control images (files used as they are: an edge map, ...)."""
        cond, tags = super().sample_conditions(loaded, request)  # type: ignore[misc]
        side = loaded.backbone.control_side
        images = torch.stack([(load_square_image(path, side, 3) + 1) / 2 for path in request.controls])
        if images.shape[0] == 1:
            images = images.expand(len(request.prompts), -1, -1, -1)
        return Conditioning({**cond, CONTROL: to_uint8(images)}), tags

    def target_conditioner(self, loaded: Any, source: TargetSource) -> _WithControls:
        return _WithControls(super().target_conditioner(loaded, source), source)  # type: ignore[misc]

    def prepare_bank(self, loaded: Any, inputs: Any) -> None:
        """The prompts of the bank, and the annotator that makes control images from its samples."""
        super().prepare_bank(loaded, inputs)  # type: ignore[misc]
        loaded.backbone.annotator = inputs.annotator()

    def check_bank(
        self, manifest: dict[str, Any], backbone: Any, annotator: Callable[[], Any], path: str
    ) -> None:
        """Also refuse control images another annotator made than the target's."""
        super().check_bank(manifest, backbone, annotator, path)  # type: ignore[misc]
        wanted = annotator()
        if manifest.get("annotator") != wanted or wanted is None:
            raise UserError(
                f"bank {path} holds control images made by {manifest.get('annotator')}, the target's come from "
                f"{wanted or 'the data (data.control_column)'}; a ControlNet bank must use the target's annotator: "
                "set data.annotator and regenerate the bank, or set objective.retention_data=target"
            )

    def preflight_lines(self, backbone: Any, facts: PreflightFacts) -> list[str]:
        return [*super().preflight_lines(backbone, facts), facts.control_line()]  # type: ignore[misc]

    def has_control(self) -> bool:
        return True

    def control_images(self, cond: Conditioning) -> torch.Tensor:
        return cond[CONTROL].float().cpu() / 255.0

    # saved models
    def pipeline_parts(self, loaded: Any) -> dict[str, Any]:
        """The base pipeline's parts and the frozen model the ControlNet steers."""
        backbone = loaded.backbone
        return {**super().pipeline_parts(loaded), backbone.base_subfolder: backbone.source_model}  # type: ignore[misc]

    def sample_flags(self, loaded: Any) -> str:
        return super().sample_flags(loaded) + " --control-image control.png"  # type: ignore[misc]

    def card_notes(self, loaded: Any, directory: Path) -> list[str]:
        """How a stock ControlNet loads the LoRA of an adapter run, if it has one."""
        backbone = loaded.backbone
        net, pipeline = type(backbone.inner).__name__, backbone.pipeline_class
        return lora_card(
            directory,
            f"{net}, {pipeline}",
            [
                f'controlnet = {net}.from_pretrained("{absolute_source(loaded.parts.controlnet)}")',
                'controlnet.load_lora_adapter("{folder}", prefix=None, use_safetensors=True)',
                f'pipe = {pipeline}.from_pretrained("{absolute_source(loaded.source)}", controlnet=controlnet)',
            ],
        )

    def save_lora(self, model: Any, directory: Path) -> None:
        """The layout of the ControlNet's own ``save_lora_adapter``: no pipeline loads a ControlNet's LoRA."""
        save_model_lora(model, directory)


class ControlNetFamily(ControlFamily, StableDiffusionFamily):
    """A ControlNet (what trains) steering a frozen Stable Diffusion UNet."""

    name = "controlnet"
    model_classes = ("ControlNetModel",)  # with the UNet of its pipeline
    model_class = ControlNetModel
    adapter = ControlNetBackbone
    adapter_targets = {"lora": ATTENTION, "svdiff": ATTENTION + ["conv1", "conv2"]}

    # loading
    def load(self, ctx: LoadContext, model: Any) -> tuple[ControlNetBackbone, TextParts]:
        """A trained ControlNet, beside the UNet it was trained with."""
        unet, location = frozen_model(ctx, UNet2DConditionModel, "unet")
        backbone = ControlNetBackbone(model, unet)
        return backbone, self.text_parts(ctx, backbone, location)

    def peek(self, ctx: LoadContext, model: Any) -> ControlNetBackbone:
        return ControlNetBackbone(model, frozen_model(ctx, UNet2DConditionModel, "unet")[0])


CONTROLNET = ControlNetFamily()
ControlNetBackbone.family = CONTROLNET
