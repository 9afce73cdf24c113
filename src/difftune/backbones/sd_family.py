"""The Stable Diffusion family: a text-conditional ``UNet2DConditionModel`` with its text encoder.

Its parts (:class:`TextParts`) are the prompt encoder, the pipeline it was read from, and, when
``model.controlnet`` puts a ControlNet over the UNet, where that ControlNet starts and where the
frozen UNet is. Conditions are prompt embeddings (float16 when cached with the target latents); the
bank's prompts come from ``bank.prompts`` or the target's captions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from difftune.backbones.conditioning import Conditioning
from difftune.backbones.controlnet import ControlNetBackbone
from difftune.backbones.family import (
    ConditionRequest,
    LoadContext,
    ModelFamily,
    PreflightFacts,
    TargetSource,
    absolute_source,
    check_bank_names,
    model_line,
    named,
    no_controlnet,
)
from difftune.backbones.lora_layout import pipeline_lora_card, save_pipeline_lora
from difftune.backbones.sd_parts import controlnet_backbone, load_prompt_encoder, sd_pipeline
from difftune.backbones.stable_diffusion import PROMPTS, TextConditionalBackbone
from difftune.backbones.text import PromptEncoder, prompts_digest
from difftune.errors import UserError

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]  # diffusers' Stable Diffusion LoRA training
GRID_ROWS = 8  # target conditions in a text model's sample grid, spread over the set


@dataclass
class TextParts:
    """What a text-conditional model keeps beside its denoiser.

    Attributes:
        prompts: the text encoder and tokenizer.
        pipeline: the Stable Diffusion pipeline (path or hub id) they come from.
        frozen_unet: ``(path or hub id, sub-folder)`` of a ControlNet's frozen UNet; ``None`` otherwise.
        controlnet: where a ControlNet trained over the UNet starts from (``model.controlnet``:
            ``from_unet``, a path or a hub id); ``None`` otherwise.
    """

    prompts: PromptEncoder
    pipeline: str | None
    frozen_unet: tuple[str, str | None] | None = None
    controlnet: str | None = None


class _Prompts:
    """A target set's prompt embeddings, from its captions (the encoder and captions key the cache)."""

    def __init__(self, prompts: PromptEncoder | None, source: TargetSource) -> None:
        if prompts is None:
            raise UserError("a text-conditional model was loaded without its text encoder")
        self.prompts, self.source = prompts, source
        self.captions = source.captions()
        self._checked_lengths = False
        self.parts = [f"prompts:{prompts.identity()}:{prompts_digest(self.captions)}"]
        self.identity: str | None = ";".join(self.parts)

    def __call__(self, indices: torch.Tensor, images: torch.Tensor, flipped: bool) -> dict[str, torch.Tensor]:
        if not self._checked_lengths:  # once, when the first chunk is encoded (not for a cached set)
            self.prompts.warn_truncated(self.captions, "captions")
            self._checked_lengths = True
        return {PROMPTS: self.prompts.encode([self.captions[i] for i in indices.tolist()]).half()}


class StableDiffusionFamily(ModelFamily):
    """Stable Diffusion 1.x / 2.x: the UNet conditioned on prompt embeddings."""

    name = "stable_diffusion"
    model_classes = ("UNet2DConditionModel",)
    model_class = UNet2DConditionModel
    adapter: type[TextConditionalBackbone] = TextConditionalBackbone
    adapter_targets = {"lora": ATTENTION, "svdiff": ATTENTION + ["conv1", "conv2"]}
    conditioner: type[_Prompts] = _Prompts

    # loading
    def load(self, ctx: LoadContext, model: Any) -> tuple[TextConditionalBackbone, TextParts]:
        frozen_unet: tuple[str, str | None] | None = None
        if ctx.controlnet is not None:  # a ControlNet trained over this UNet
            backbone: TextConditionalBackbone = controlnet_backbone(
                ctx.controlnet, model, ctx.revision, ctx.load, ctx.downsample
            )
            frozen_unet = (ctx.pretrained, ctx.subfolder)
        else:
            backbone = TextConditionalBackbone(model)
        return backbone, self.text_parts(ctx, backbone, frozen_unet)

    @staticmethod
    def text_parts(
        ctx: LoadContext, backbone: TextConditionalBackbone, frozen_unet: tuple[str, str | None] | None
    ) -> TextParts:
        """Load the text encoder of the model's pipeline and give ``backbone`` the empty prompt's embedding."""
        text_root = sd_pipeline(ctx.pretrained, ctx.components, ctx.record, "text_encoder")
        prompts = load_prompt_encoder(text_root, ctx.revision, ctx.load)
        backbone.set_null_prompt(prompts.encode([""]))
        return TextParts(prompts, ctx.record.get("pipeline") or text_root, frozen_unet, ctx.controlnet)

    def peek(self, ctx: LoadContext, model: Any) -> TextConditionalBackbone:
        backbone = TextConditionalBackbone(model)
        if ctx.controlnet is not None:
            return ControlNetBackbone(ControlNetModel.from_unet(model), model)
        return backbone

    def source_record(self, parts: TextParts | None) -> dict[str, Any]:
        record: dict[str, Any] = {}
        if parts is not None and parts.pipeline is not None:  # where the text encoder is read from
            record["pipeline"] = absolute_source(parts.pipeline)
        if parts is not None and parts.frozen_unet is not None:  # a ControlNet's UNet
            record["unet"] = [absolute_source(parts.frozen_unet[0]), parts.frozen_unet[1]]
        return record

    def tuning_base(self, parts: TextParts | None) -> dict[str, Any]:
        return {"controlnet": absolute_source(parts.controlnet if parts is not None else None)}

    def check_tuning(self, parts: TextParts | None, adapter: bool) -> None:
        return None

    # conditions
    def check_request(self, request: ConditionRequest) -> None:
        if not request.prompts:
            raise UserError(
                f"{request.model} is not class-conditional: give {request.prompt_flag} (and --control-image "
                "for a ControlNet)"
            )
        if request.controls:
            raise no_controlnet(request.model)

    def sample_conditions(self, loaded: Any, request: ConditionRequest) -> tuple[Conditioning, list[str]]:
        request = named(request, loaded)
        self.check_request(request)
        prompts = _encoder(loaded)
        prompts.warn_truncated(request.prompts)
        cond = Conditioning({PROMPTS: prompts.encode(list(request.prompts))})
        return cond, [f"prompt{k}" for k in range(len(request.prompts))]

    def heldout_conditions(
        self, loaded: Any, labels: torch.Tensor, num_classes: int, request: ConditionRequest
    ) -> Conditioning:
        """Class ``c``'s images get prompt ``c`` (control image ``c``), or the only one for every class."""
        rows, _ = self.sample_conditions(loaded, request)
        if rows.batch_size not in (1, num_classes):
            raise UserError(
                f"{request.prompt_flag} gives {rows.batch_size} prompts for {num_classes} held-out classes; give "
                "one prompt for all classes, or one per class (in the sorted order of the class folders)"
            )
        return rows.select(labels if rows.batch_size > 1 else torch.zeros_like(labels))

    def target_conditioner(self, loaded: Any, source: TargetSource) -> _Prompts:
        return self.conditioner(loaded.parts.prompts if loaded.parts is not None else None, source)

    def prepare_bank(self, loaded: Any, inputs: Any) -> None:
        """Bank sample ``i`` is generated from prompt ``i mod P`` of the bank's prompts."""
        encoder = _encoder(loaded)
        prompts = inputs.prompts()
        encoder.warn_truncated(prompts, "bank prompts")
        loaded.backbone.set_bank_prompts(prompts, encoder.encode(prompts))

    def check_bank(
        self, manifest: dict[str, Any], backbone: Any, annotator: Callable[[], Any], path: str
    ) -> None:
        check_bank_names(manifest, backbone, path)

    def grid_conditions(self, target_cond: Conditioning) -> Conditioning:
        return target_cond.spread(GRID_ROWS)  # every image its own condition

    def preflight_lines(self, backbone: Any, facts: PreflightFacts) -> list[str]:
        names = ", ".join(backbone.condition_names)
        return [model_line(backbone, f"conditioned on {names}; {facts.target_line()}")]

    def has_control(self) -> bool:
        return False

    def control_images(self, cond: Conditioning) -> torch.Tensor:
        raise UserError(f"a {self.name} model has no control images")

    # saved models
    def pipeline_parts(self, loaded: Any) -> dict[str, Any]:
        prompts = _encoder(loaded)
        return {"text_encoder": prompts.text_encoder, "tokenizer": prompts.tokenizer}

    def pipeline_extras(self, loaded: Any, class_names: list[str]) -> dict[str, Any]:
        return {
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
        }

    def sample_flags(self, loaded: Any) -> str:
        return '--prompt "a photo"'

    def card_notes(self, loaded: Any, directory: Path) -> list[str]:
        """How a stock pipeline loads the LoRA of an adapter run, if it has one."""
        return pipeline_lora_card(directory, "StableDiffusionPipeline", absolute_source(loaded.source))

    def save_lora(self, model: Any, directory: Path) -> None:
        """diffusers' LoRA layout, which ``StableDiffusionPipeline.load_lora_weights`` reads."""
        save_pipeline_lora(model, directory)


def _encoder(loaded: Any) -> PromptEncoder:
    """The prompt encoder of a loaded text-conditional model."""
    if loaded.parts is None:
        raise UserError(
            "a text-conditional model was loaded without its text encoder: load it with its pipeline"
        )
    return loaded.parts.prompts


STABLE_DIFFUSION = StableDiffusionFamily()
TextConditionalBackbone.family = STABLE_DIFFUSION
