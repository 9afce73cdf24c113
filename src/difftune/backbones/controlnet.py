"""Adapter for a ControlNet beside a frozen Stable Diffusion UNet.

The condition is ``{"prompt_embeds": (N, L, D), "control": (N, 3, H, W) uint8}``: the prompt and
the control image at the pixel resolution (stored as 0..255 to keep caches small; the ControlNet
reads it in [0, 1], as diffusers' pipelines give it). Classifier-free guidance drops the prompt
only, keeping the control image, as ControlNet's training and pipelines do. What trains is the
ControlNet (:attr:`inner`); the UNet is frozen and its residual inputs are those diffusers injects.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from difftune.backbones.conditioning import Conditioning
from difftune.backbones.stable_diffusion import PROMPTS, TextConditionalBackbone
from difftune.errors import UserError

CONTROL = "control"


class ControlNetBackbone(TextConditionalBackbone):
    """A trainable ControlNet steering a frozen text-conditional UNet.

    Args:
        controlnet: the ControlNet (e.g. ``ControlNetModel.from_unet(unet)``).
        unet: the Stable Diffusion UNet it was made for; frozen here.
        null_prompt: the empty prompt's embedding (1, L, D).
    """

    subfolder = "controlnet"
    pipeline_class = "StableDiffusionControlNetPipeline"
    size_buckets = False  # its control images are square
    condition_names = (PROMPTS, CONTROL)

    def __init__(
        self, controlnet: ControlNetModel, unet: UNet2DConditionModel, null_prompt: torch.Tensor | None = None
    ) -> None:
        super().__init__(unet, null_prompt)
        self.unet = unet.requires_grad_(False)
        self.inner = controlnet
        self.annotator: Any = None  # set where bank controls are computed (the bank command)

    @property
    def source_model(self) -> torch.nn.Module:
        """The frozen UNet: the pre-trained model whose knowledge the bank holds."""
        return self.unet

    @property
    def cross_attention_dim(self) -> int:
        dim = self.unet.config.cross_attention_dim
        return int(dim if isinstance(dim, int) else dim[0])

    def bank_generator(self) -> TextConditionalBackbone:
        """Stable Diffusion alone (the frozen UNet): the bank holds its samples."""
        plain = TextConditionalBackbone(self.unet, self.null_prompt)
        plain.bank_prompts, plain._bank_record = self.bank_prompts, self._bank_record
        return plain

    def bank_record(self) -> dict[str, Any]:
        """The prompts' record, the condition names, and the annotator that made the control images."""
        annotator = None if self.annotator is None else self.annotator.record()
        return {**super().bank_record(), "annotator": annotator}

    def bank_extras(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The control images of the bank's decoded samples ``images`` in [-1, 1], by :attr:`annotator`."""
        if self.annotator is None:
            raise UserError("a ControlNet bank needs an annotator for its control images: set data.annotator")
        return {CONTROL: to_uint8(self.annotator(images))}

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        dtype = self.inner.dtype
        embeds = cond[PROMPTS].to(x_t.device, dtype)
        control = cond[CONTROL].to(x_t.device, dtype) / 255.0
        down, mid = self.inner(
            x_t, t, encoder_hidden_states=embeds, controlnet_cond=control, return_dict=False
        )
        return self.unet(
            x_t,
            t,
            encoder_hidden_states=embeds.to(self.unet.dtype),
            down_block_additional_residuals=[r.to(self.unet.dtype) for r in down],
            mid_block_additional_residual=mid.to(self.unet.dtype),
        ).sample

    def unconditional(self, n: int, device: torch.device | str = "cpu") -> Conditioning:
        """The empty prompt with an empty (black) control image."""
        side = self.sample_shape[1] * self.control_downsample
        black = torch.zeros(n, 3, side, side, dtype=torch.uint8, device=device)
        return Conditioning({**super().unconditional(n, device), CONTROL: black})

    @property
    def control_downsample(self) -> int:
        """Side of a control image / side of a sample: the ControlNet's condition embedding halves the
        image once per block after the first (8 for Stable Diffusion, matching its VAE)."""
        return 2 ** (len(self.inner.config.conditioning_embedding_out_channels) - 1)

    def drop(self, cond: Conditioning, mask: torch.Tensor) -> Conditioning:
        """Rows where ``mask`` is True get the empty prompt; every row keeps its control image."""
        empty = super().unconditional(cond.batch_size, cond.device)
        dropped = Conditioning({PROMPTS: cond[PROMPTS]}).where(mask, empty)
        return Conditioning({PROMPTS: dropped[PROMPTS], CONTROL: cond[CONTROL]})

    def check_condition(self, cond: Conditioning) -> None:
        super().check_condition(cond)
        if CONTROL not in cond:
            raise UserError(
                "a ControlNet needs control images: set data.annotator (e.g. canny) or data.control_column"
            )


def to_uint8(control: torch.Tensor) -> torch.Tensor:
    """Control images in [0, 1] -> uint8 0..255 (how conditions are cached)."""
    return (control.clamp(0, 1) * 255).round().to(torch.uint8)
