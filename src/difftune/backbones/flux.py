"""Adapter for Flux.1's ``FluxTransformer2DModel`` (an MMDiT on rectified flow with a dynamic shift).

The condition is what ``FluxPipeline`` feeds its transformer:

* ``prompt_embeds`` (N, 512, D): T5's last hidden states (the pipeline's ``max_sequence_length``);
* ``pooled_prompt_embeds`` (N, 768): CLIP-L's pooled output;
* ``guidance`` (N,): the guidance embedding's value, for a guidance-distilled (dev) model only
  (``guidance_embeds=True``); ``FluxPipeline`` passes its ``guidance_scale`` there (3.5 by default).

The diffusion runs in the VAE's latent space (N, 16, H, W); the adapter packs the latents into 2x2
patches, (N, H/2·W/2, 64), with their image ids (row, column) and all-zero text ids, and unpacks the
transformer's output, as the pipeline does. The model reads its timestep and guidance divided by 1000
(it multiplies both by 1000 itself): the flow process gives σ·1000
(:meth:`difftune.process.flow.FlowProcess.model_input`), the adapter passes σ.

The unconditional form (guidance's second branch, ``FluxPipeline``'s ``true_cfg_scale`` with an empty
negative prompt) is the empty prompt's embeddings; a dropped row keeps its guidance value.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import FluxTransformer2DModel

from difftune.backbones.conditioning import Conditioning
from difftune.backbones.sd3 import SD3Backbone
from difftune.backbones.sdxl import POOLED
from difftune.backbones.stable_diffusion import PROMPTS
from difftune.errors import UserError

GUIDANCE = "guidance"
FLUX_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale: the guidance embedding's value
FLUX_SAMPLE_SIZE = 128  # FluxPipeline's default_sample_size: 128x128 latents, 1024x1024 images
TIMESTEP_SCALE = 1000.0  # the transformer multiplies its timestep and guidance by 1000


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, H/2·W/2, 4C): 2x2 patches, as ``FluxPipeline._pack_latents``."""
    n, c, h, w = latents.shape
    patches = latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(n, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, H/2·W/2, 4C) -> (N, C, H, W), the inverse of :func:`pack` (``FluxPipeline._unpack_latents``)."""
    n, _, channels = tokens.shape
    patches = tokens.view(n, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(n, channels // 4, height, width)


def image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(H/2·W/2, 3) ids of the packed latents: 0, row, column (``FluxPipeline._prepare_latent_image_ids``)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxBackbone(SD3Backbone):
    """A Flux transformer conditioned on T5 embeddings, CLIP's pooled embedding and (dev) a guidance value.

    Args:
        model: the ``FluxTransformer2DModel``.
        sample_size: height and width of its latents (the VAE's sample size over its downsampling).
        guidance: the guidance embedding's value for the conditions this adapter makes (the bank's,
            the unconditional form's); ignored by a model without a guidance embedding.
    """

    pipeline_class = "FluxPipeline"
    label = "Flux"
    # any even latent; each bucket is noised on its own size's shifted σ grid (FlowProcess.sigmas_for)
    size_buckets = True

    def __init__(
        self,
        model: FluxTransformer2DModel,
        sample_size: int = FLUX_SAMPLE_SIZE,
        guidance: float = FLUX_GUIDANCE,
    ) -> None:
        cfg = model.config
        channels = int(cfg.in_channels) // 4  # 2x2 patches of the latents
        if sample_size % 2:
            raise UserError(
                f"Flux packs its latents in 2x2 patches: the latent size {sample_size} must be even"
            )
        super().__init__(model, (channels, sample_size, sample_size))
        self.guided = bool(cfg.guidance_embeds)
        self.condition_names = (PROMPTS, POOLED, GUIDANCE) if self.guided else (PROMPTS, POOLED)
        self.guidance = float(guidance)

    def bucket_problem(self, shape: tuple[int, int, int]) -> str | None:
        """A latent with an odd side, which Flux's 2x2 packing cannot take."""
        height, width = shape[1], shape[2]
        if height % 2 or width % 2:
            return (
                f"its latent {width}x{height} has an odd side, and Flux packs its latents in 2x2 patches (use a "
                "data.buckets.step that is a multiple of twice the VAE's downsampling, 16 for Flux's VAE)"
            )
        return None

    def guidance_column(self, n: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """``{"guidance": (n,)}`` of :attr:`guidance` for a guidance-distilled model, else nothing."""
        return {GUIDANCE: torch.full((n,), self.guidance, device=device)} if self.guided else {}

    def set_bank_prompts(
        self, prompts: Sequence[str], embeddings: torch.Tensor, pooled: torch.Tensor
    ) -> None:
        super().set_bank_prompts(prompts, embeddings, pooled)
        if self.guided:
            self._bank_record["guidance"] = self.guidance

    def model_inputs(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning, dtype: torch.dtype
    ) -> dict[str, torch.Tensor | None]:
        """The keyword inputs ``FluxPipeline`` gives a Flux model (its transformer, a Flux ControlNet) in
        ``dtype``: the packed latents, the prompt's embeddings, σ, the ids and (dev) the guidance value."""
        device = x_t.device
        n, _, height, width = x_t.shape
        prompts = cond[PROMPTS].to(device, dtype)
        return {
            "hidden_states": pack(x_t.to(dtype)),
            "encoder_hidden_states": prompts,
            "pooled_projections": cond[POOLED].to(device, dtype),
            "timestep": torch.as_tensor(t, device=device).float().expand(n) / TIMESTEP_SCALE,
            "img_ids": image_ids(height, width, device, dtype),
            "txt_ids": torch.zeros(prompts.shape[1], 3, device=device, dtype=dtype),
            "guidance": cond[GUIDANCE].to(device, torch.float32) if self.guided else None,
        }

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        out = self.inner(**self.model_inputs(x_t, t, cond, self.inner.dtype)).sample
        return unpack(out, x_t.shape[2], x_t.shape[3])

    def unconditional(self, n: int, device: torch.device | str = "cpu") -> Conditioning:
        return Conditioning({**super().unconditional(n, device), **self.guidance_column(n, device)})

    def drop(self, cond: Conditioning, mask: torch.Tensor) -> Conditioning:
        """Masked rows get the empty prompt's embeddings; every row keeps its own guidance value."""
        null = self.unconditional(cond.batch_size, cond.device)
        kept = {GUIDANCE: cond[GUIDANCE]} if self.guided else {}
        return cond.where(mask, Conditioning({**null, **kept}))

    def check_condition(self, cond: Conditioning) -> None:
        super().check_condition(cond)
        if self.guided and cond[GUIDANCE].shape != (cond[PROMPTS].shape[0],):
            raise UserError(
                f"Flux's guidance is one value per row, (N,), got {tuple(cond[GUIDANCE].shape)} for "
                f"{cond[PROMPTS].shape[0]} rows"
            )

    def bank_condition(self, indices: torch.Tensor) -> Conditioning:
        """Prompt ``i mod P`` of the bank's prompts, and (dev) :attr:`guidance`, which the bank stores."""
        cond = super().bank_condition(indices)
        return Conditioning({**cond, **self.guidance_column(len(indices))})
