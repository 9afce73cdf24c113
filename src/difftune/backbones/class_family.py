"""The class-conditional families: DiT and ``UNet2DModel``, conditioned on ``{"labels": (N,)}``.

They load the denoiser alone (no parts beside it), make conditions from class labels (the null
label is the unconditional form), hold their bank to ``i mod K`` labels, and give a stock
``DiTPipeline`` its ``id2label``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import DiTTransformer2DModel, UNet2DModel

from difftune.backbones.base import ClassConditionalBackbone
from difftune.backbones.conditioning import Conditioning
from difftune.backbones.dit import DiTBackbone
from difftune.backbones.family import (
    CARD_FOLDER,
    ConditionRequest,
    LoadContext,
    ModelFamily,
    PreflightFacts,
    TargetSource,
    check_bank_names,
    model_line,
    named,
    no_controlnet,
)
from difftune.backbones.unet import UNetBackbone
from difftune.errors import UserError

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
IMAGENET_NULL_LABEL = 1000  # the null label stock DiTPipeline hard-codes for guidance


class _Labels:
    """A labelled target set's conditions: each image's class label (no cache identity of its own)."""

    identity = None

    def __init__(self, labels: torch.Tensor) -> None:
        self.labels = labels

    def __call__(self, indices: torch.Tensor, images: torch.Tensor, flipped: bool) -> dict[str, torch.Tensor]:
        return dict(ClassConditionalBackbone.condition(self.labels[indices]))


class ClassFamily(ModelFamily):
    """A class-conditional model family: one diffusers class and its adapter."""

    adapter: type[ClassConditionalBackbone]

    def __init__(
        self,
        name: str,
        model_classes: tuple[str, ...],
        model_class: type,
        adapter: type[ClassConditionalBackbone],
        svdiff_extra: list[str],
    ) -> None:
        self.name, self.model_classes, self.model_class, self.adapter = (
            name,
            model_classes,
            model_class,
            adapter,
        )
        self.adapter_targets = {"lora": ATTENTION, "svdiff": ATTENTION + svdiff_extra}
        adapter.family = self

    # loading
    def load(self, ctx: LoadContext, model: Any) -> tuple[ClassConditionalBackbone, None]:
        if ctx.controlnet is not None:
            raise UserError(
                f"model.controlnet needs a Stable Diffusion UNet, but {ctx.pretrained!r} holds a "
                f"{ctx.config['_class_name']}"
            )
        return self.adapter(model), None

    def peek(self, ctx: LoadContext, model: Any) -> ClassConditionalBackbone:
        return self.adapter(model)

    def source_record(self, parts: Any) -> dict[str, Any]:
        return {}

    def tuning_base(self, parts: Any) -> dict[str, Any]:
        return {"controlnet": None}

    def check_tuning(self, parts: Any, adapter: bool) -> None:
        return None

    # conditions
    def check_request(self, request: ConditionRequest) -> None:
        if request.prompts:
            raise UserError(
                f"{request.model} takes class labels, not prompts (it is not text-conditional); give --labels instead"
            )
        if request.controls:
            raise no_controlnet(request.model)

    def sample_conditions(self, loaded: Any, request: ConditionRequest) -> tuple[Conditioning, list[str]]:
        request = named(request, loaded)
        self.check_request(request)
        num_classes = loaded.backbone.num_classes
        labels = list(range(num_classes)) if request.labels is None else list(request.labels)
        for label in labels:
            if not 0 <= label <= num_classes:
                raise UserError(
                    f"label {label} is out of range: the model has labels 0..{num_classes - 1} "
                    f"(and {num_classes} = unconditional)"
                )
        return self.adapter.condition(torch.tensor(labels)), [f"label{label}" for label in labels]

    def heldout_conditions(
        self, loaded: Any, labels: torch.Tensor, num_classes: int, request: ConditionRequest
    ) -> Conditioning:
        self.check_request(named(request, loaded))
        cond = self.adapter.condition(labels)
        loaded.backbone.check_condition(cond)
        return cond

    def target_conditioner(self, loaded: Any, source: TargetSource) -> _Labels:
        loaded.backbone.check_condition(self.adapter.condition(source.labels))  # before anything is encoded
        return _Labels(source.labels)

    def prepare_bank(self, loaded: Any, inputs: Any) -> None:
        return None  # the bank's labels are i mod K (ClassConditionalBackbone.bank_condition)

    def check_bank(
        self, manifest: dict[str, Any], backbone: Any, annotator: Callable[[], Any], path: str
    ) -> None:
        check_bank_names(manifest, backbone, path)

    def grid_conditions(self, target_cond: Conditioning) -> Conditioning:
        return target_cond.distinct()  # one row per class label

    def preflight_lines(self, backbone: Any, facts: PreflightFacts) -> list[str]:
        backbone.check_condition(self.adapter.condition(torch.arange(facts.classes)))
        return [model_line(backbone, f"{backbone.num_classes} classes; the target has {facts.classes}")]

    def has_control(self) -> bool:
        return False

    def control_images(self, cond: Conditioning) -> torch.Tensor:
        raise UserError(f"a {self.name} model has no control images")

    # saved models
    def pipeline_parts(self, loaded: Any) -> dict[str, Any]:
        return {}

    def pipeline_extras(self, loaded: Any, class_names: list[str]) -> dict[str, Any]:
        return {"id2label": {str(i): name for i, name in enumerate(class_names)}}

    def sample_flags(self, loaded: Any) -> str:
        return "--labels 0,1 --per-label 8"

    def card_notes(self, loaded: Any, directory: Path) -> list[str]:
        """Why stock ``DiTPipeline`` cannot guide this model (its null label is not ImageNet's), if so."""
        backbone = loaded.backbone
        if self.adapter.pipeline_class != "DiTPipeline" or not (directory / "model_index.json").is_file():
            return []
        null = backbone.null_label
        if null == IMAGENET_NULL_LABEL:
            return []
        return [
            "",
            "## Guidance in the stock `DiTPipeline`",
            "",
            f"`DiTPipeline` uses ImageNet's null label {IMAGENET_NULL_LABEL} for classifier-free guidance, but "
            f"this model's null label is {null} ({null} classes). The stock pipeline therefore fails at its "
            "default `guidance_scale=4.0`; call it with `guidance_scale=1` (no guidance), and sample with "
            f"guidance through `difftune sample --model {CARD_FOLDER} --guidance-scale 1.5`.",
        ]

    def save_lora(self, model: Any, directory: Path) -> None:
        """Nothing: peft's format, which the adapter folder holds, is what loads a LoRA into these models."""
        return None


DIT = ClassFamily(
    "dit",
    ("DiTTransformer2DModel", "Transformer2DModel"),  # Transformer2DModel: original DiT checkpoints
    DiTTransformer2DModel,
    DiTBackbone,
    ["ff.net.0.proj", "ff.net.2"],
)
UNET = ClassFamily("unet", ("UNet2DModel",), UNet2DModel, UNetBackbone, ["conv1", "conv2"])
