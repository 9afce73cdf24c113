"""Adapter for a ControlNet beside a frozen Stable Diffusion UNet.

The condition is ``{"prompt_embeds": (N, L, D), "control": (N, 3, H, W) uint8}``: the prompt and
the control image at the pixel resolution (stored as 0..255 to keep caches small; the ControlNet
reads it in [0, 1], as diffusers' pipelines give it). Classifier-free guidance drops the prompt
only, keeping the control image, as ControlNet's training and pipelines do. What trains is the
ControlNet (:attr:`inner`); the UNet is frozen and its residual inputs are those diffusers injects.

:class:`ControlAdapter` is what every ControlNet adapter shares (SD 1.x / 2.x here, SDXL in
:mod:`~difftune.backbones.controlnet_sdxl`, SD3 in :mod:`~difftune.backbones.controlnet_sd3`): the
control image beside the base model's own condition, the annotator of the bank's control images, and
the frozen base model that generates the bank.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from difftune.backbones.base import Backbone
from difftune.backbones.conditioning import Conditioning
from difftune.backbones.stable_diffusion import PROMPTS, TextConditionalBackbone
from difftune.errors import UserError

CONTROL = "control"
# what the bank's generator (the base adapter around the frozen model) takes over from the ControlNet's
_BASE_STATE = ("null_prompt", "null_pooled", "bank_prompts", "bank_pooled", "_bank_record")


class ControlAdapter:
    """A ControlNet (:attr:`inner`, what trains) steering a frozen base model: mixed in before the base
    model's adapter class, whose condition it extends by the control image.

    Attributes:
        base_subfolder: the frozen model's attribute and its sub-folder in a stock pipeline.
        annotator: makes the bank's control images from its samples (set by the bank command).
    """

    base_subfolder = "unet"
    size_buckets = False  # its control images are square
    annotator: Any = None
    inner: torch.nn.Module
    sample_shape: tuple[int, int, int]

    def attach(self, controlnet: torch.nn.Module, base: torch.nn.Module) -> None:
        """Make ``controlnet`` the trained model beside the frozen ``base`` (after the base adapter's init)."""
        setattr(self, self.base_subfolder, base.requires_grad_(False))
        self.inner = controlnet
        self.annotator = None

    @property
    def source_model(self) -> torch.nn.Module:
        """The frozen base model: the pre-trained model whose knowledge the bank holds."""
        return getattr(self, self.base_subfolder)

    def backpropagated_models(self) -> list[torch.nn.Module]:
        """The ControlNet, and the frozen model its residuals pass through on the way to the loss."""
        return [self.inner, self.source_model]

    def base_adapter(self) -> Backbone:
        """The base model's own adapter around the frozen model (no control)."""
        raise NotImplementedError

    def bank_generator(self) -> Backbone:
        """The frozen base model alone, with this adapter's prompts: the bank holds its samples."""
        plain = self.base_adapter()
        for name in _BASE_STATE:
            if hasattr(self, name):
                setattr(plain, name, getattr(self, name))
        return plain

    def bank_record(self) -> dict[str, Any]:
        """The prompts' record, the condition names, and the annotator that made the control images."""
        annotator = None if self.annotator is None else self.annotator.record()
        return {**super().bank_record(), "annotator": annotator}  # type: ignore[misc]

    def bank_extras(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The control images of the bank's decoded samples ``images`` in [-1, 1], by :attr:`annotator`."""
        if self.annotator is None:
            raise UserError("a ControlNet bank needs an annotator for its control images: set data.annotator")
        return {CONTROL: to_uint8(self.annotator(images))}

    @property
    def control_downsample(self) -> int:
        """Side of a control image / side of a sample."""
        raise NotImplementedError

    @property
    def control_side(self) -> int:
        """Side of a control image (the pixel images' side)."""
        return self.sample_shape[1] * self.control_downsample

    def unconditional(self, n: int, device: torch.device | str = "cpu") -> Conditioning:
        """The base model's unconditional form with an empty (black) control image."""
        black = torch.zeros(n, 3, self.control_side, self.control_side, dtype=torch.uint8, device=device)
        return Conditioning({**super().unconditional(n, device), CONTROL: black})  # type: ignore[misc]

    def drop(self, cond: Conditioning, mask: torch.Tensor) -> Conditioning:
        """Rows where ``mask`` is True get the base model's drop; every row keeps its control image."""
        rest = Conditioning({name: value for name, value in cond.items() if name != CONTROL})
        return Conditioning({**super().drop(rest, mask), CONTROL: cond[CONTROL]})  # type: ignore[misc]

    def check_condition(self, cond: Conditioning) -> None:
        super().check_condition(cond)  # type: ignore[misc]
        if CONTROL not in cond:
            raise UserError(
                "a ControlNet needs control images: set data.annotator (e.g. canny) or data.control_column"
            )


class ControlNetBackbone(ControlAdapter, TextConditionalBackbone):
    """A trainable ControlNet steering a frozen text-conditional UNet.

    Args:
        controlnet: the ControlNet (e.g. ``ControlNetModel.from_unet(unet)``).
        unet: the Stable Diffusion UNet it was made for; frozen here.
        null_prompt: the empty prompt's embedding (1, L, D).
    """

    subfolder = "controlnet"
    pipeline_class = "StableDiffusionControlNetPipeline"
    condition_names = (PROMPTS, CONTROL)

    def __init__(
        self, controlnet: ControlNetModel, unet: UNet2DConditionModel, null_prompt: torch.Tensor | None = None
    ) -> None:
        super().__init__(unet)
        self.attach(controlnet, unet)
        if null_prompt is not None:
            self.set_null_prompt(null_prompt)

    @property
    def cross_attention_dim(self) -> int:
        dim = self.source_model.config.cross_attention_dim
        return int(dim if isinstance(dim, int) else dim[0])

    def base_adapter(self) -> Backbone:
        return TextConditionalBackbone(self.unet)

    def added_conditions(
        self, cond: Conditioning, device: torch.device, dtype: torch.dtype
    ) -> dict[str, Any]:
        """The UNet's (and the ControlNet's) keyword inputs beside the prompt: none for SD 1.x / 2.x."""
        return {}

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        dtype, frozen = self.inner.dtype, self.unet.dtype
        embeds = cond[PROMPTS].to(x_t.device, dtype)
        control = cond[CONTROL].to(x_t.device, dtype) / 255.0
        down, mid = self.inner(
            x_t,
            t,
            encoder_hidden_states=embeds,
            controlnet_cond=control,
            return_dict=False,
            **self.added_conditions(cond, x_t.device, dtype),
        )
        return self.unet(
            x_t,
            t,
            encoder_hidden_states=embeds.to(frozen),
            down_block_additional_residuals=[r.to(frozen) for r in down],
            mid_block_additional_residual=mid.to(frozen),
            **self.added_conditions(cond, x_t.device, frozen),
        ).sample

    @property
    def control_downsample(self) -> int:
        """Side of a control image / side of a sample: the ControlNet's condition embedding halves the
        image once per block after the first (8 for Stable Diffusion, matching its VAE)."""
        return 2 ** (len(self.inner.config.conditioning_embedding_out_channels) - 1)


def to_uint8(control: torch.Tensor) -> torch.Tensor:
    """Control images in [0, 1] -> uint8 0..255 (how conditions are cached)."""
    return (control.clamp(0, 1) * 255).round().to(torch.uint8)
