"""Adapter for an ``SD3ControlNetModel`` beside a frozen Stable Diffusion 3 / 3.5 transformer.

The condition is SD3's (:mod:`~difftune.backbones.sd3`: prompt embeddings and pooled embeddings) and
the control image (:mod:`~difftune.backbones.controlnet`), kept as pixels like every ControlNet's. As
``StableDiffusion3ControlNetPipeline`` does, the ControlNet reads the control image encoded by the VAE
(its mean: the pipeline draws from the VAE's posterior, whose spread is negligible), without the VAE's
shift where the ControlNet zeroes its pooled projection (``force_zeros_for_pooled_projection``, as
``SD3ControlNetModel.from_transformer`` makes it), and the prompt embeddings unless it has no text
width (``joint_attention_dim`` null). Its block outputs enter the transformer as
``block_controlnet_hidden_states``.

:class:`VAEControlAdapter` (the VAE-encoded control image) is shared with the Flux ControlNet
(:mod:`~difftune.backbones.controlnet_flux`).
"""

from __future__ import annotations

import weakref
from types import SimpleNamespace
from typing import Any

import torch
from diffusers import AutoencoderKL, SD3ControlNetModel, SD3Transformer2DModel
from diffusers.configuration_utils import FrozenDict

from difftune.backbones.base import Backbone
from difftune.backbones.conditioning import Conditioning
from difftune.backbones.controlnet import CONTROL, ControlAdapter
from difftune.backbones.family import LoadContext
from difftune.backbones.sd3 import SD3Backbone
from difftune.backbones.sdxl import POOLED
from difftune.backbones.stable_diffusion import PROMPTS
from difftune.config.checks import check_model_path
from difftune.errors import UserError

VAE_DOWNSAMPLE = 8  # SD3's VAE, when the adapter is built without one (on the meta device)
CONTROLNET_LAYERS = 12  # a new ControlNet's blocks: SD3ControlNetModel.from_transformer's default


class VAEControlAdapter(ControlAdapter):
    """A :class:`ControlAdapter` whose ControlNet reads its control images encoded by the pipeline's VAE
    (SD3's and Flux's): the posterior's mean, shifted by :meth:`control_shift` and scaled, encoded once
    per control tensor. Call :meth:`attach_vae` after :meth:`attach`."""

    vae: AutoencoderKL | None
    label: str

    def attach_vae(self, vae: AutoencoderKL | None) -> None:
        """Keep ``vae`` (frozen; ``None`` on the meta device without one) to encode the control images."""
        self.vae = vae.requires_grad_(False) if vae is not None else None
        # the last control tensor encoded (a weak reference), what else keys it, and its latents
        self._encoded: tuple[Any, ...] | None = None

    @property
    def control_downsample(self) -> int:
        """Side of a control image / side of a sample: the VAE's downsampling."""
        if self.vae is None:
            return VAE_DOWNSAMPLE
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def control_shift(self, vae_config: Any) -> float:
        """What the control latents are shifted by before scaling: the VAE's ``shift_factor`` (of ``vae_config``)."""
        return float(vae_config.shift_factor or 0.0)

    def control_latents(self, control: torch.Tensor) -> torch.Tensor:
        """Control images (N, 3, H, W) uint8 -> the latents the ControlNet reads, as the pipeline makes them;
        encoded once per control tensor (sampling passes the same one at every step)."""
        if self.vae is None:
            raise UserError(
                f"the {self.label} ControlNet encodes its control images with the pipeline's VAE: load it with one"
            )
        key = (control._version, self.vae.dtype, control.device)
        if self._encoded is not None and self._encoded[0]() is control and self._encoded[1] == key:
            return self._encoded[2]
        pixels = control.to(self.vae.dtype) / 127.5 - 1
        with torch.no_grad():
            latent = self.vae.encode(pixels).latent_dist.mode()
            latents = (latent - self.control_shift(self.vae.config)) * self.vae.config.scaling_factor
        self._encoded = (weakref.ref(control), key, latents)
        return latents


class SD3ControlNetBackbone(VAEControlAdapter, SD3Backbone):
    """A trainable ``SD3ControlNetModel`` steering a frozen ``SD3Transformer2DModel``.

    Args:
        controlnet: the ControlNet (e.g. ``SD3ControlNetModel.from_transformer(transformer)``).
        transformer: the SD3 transformer it was made for; frozen here.
        vae: the pipeline's VAE, which encodes the control images; frozen here.
    """

    subfolder = "controlnet"
    base_subfolder = "transformer"
    pipeline_class = "StableDiffusion3ControlNetPipeline"
    condition_names = (PROMPTS, POOLED, CONTROL)

    def __init__(
        self, controlnet: SD3ControlNetModel, transformer: SD3Transformer2DModel, vae: AutoencoderKL | None
    ) -> None:
        super().__init__(transformer)
        self.attach(controlnet, transformer)
        self.attach_vae(vae)

    def base_adapter(self) -> Backbone:
        return SD3Backbone(self.transformer)

    def control_shift(self, vae_config: Any) -> float:
        """No shift where the ControlNet zeroes its pooled projection, as the SD3 ControlNet pipeline does."""
        zeroed = self.inner.config.force_zeros_for_pooled_projection
        return 0.0 if zeroed else super().control_shift(vae_config)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        dtype, frozen = self.inner.dtype, self.transformer.dtype
        timestep = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0])
        embeds, pooled = cond[PROMPTS].to(x_t.device), cond[POOLED].to(x_t.device)
        config = self.inner.config
        blocks = self.inner(
            hidden_states=x_t.to(dtype),
            controlnet_cond=self.control_latents(cond[CONTROL].to(x_t.device)).to(dtype),
            encoder_hidden_states=embeds.to(dtype) if config.joint_attention_dim is not None else None,
            pooled_projections=(
                torch.zeros_like(pooled) if config.force_zeros_for_pooled_projection else pooled
            ).to(dtype),
            timestep=timestep,
            return_dict=False,
        )[0]
        return self.transformer(
            hidden_states=x_t.to(frozen),
            encoder_hidden_states=embeds.to(frozen),
            pooled_projections=pooled.to(frozen),
            timestep=timestep,
            block_controlnet_hidden_states=[block.to(frozen) for block in blocks],
        ).sample


def sd3_controlnet_backbone(ctx: LoadContext, transformer: SD3Transformer2DModel) -> SD3ControlNetBackbone:
    """A ControlNet over the SD3 ``transformer``: new from its weights (``model.controlnet: from_unet``)
    or an existing ``SD3ControlNetModel`` (its path or hub id), with the model's VAE (on the meta device,
    one built from the VAE's config)."""
    if ctx.controlnet == "from_unet" or ctx.load is None:  # built from configs (a dry run): a new one's size
        net = new_sd3_controlnet(transformer)
    else:
        net = existing_controlnet(ctx, SD3ControlNetModel, "an SD3ControlNetModel", "SD3")
        _check_pair(net, transformer)
    return SD3ControlNetBackbone(net, transformer, control_vae(ctx))


def new_sd3_controlnet(transformer: SD3Transformer2DModel) -> SD3ControlNetModel:
    """``SD3ControlNetModel.from_transformer``: the first :data:`CONTROLNET_LAYERS` blocks (fewer than the
    transformer's, whose last block differs) and its embeddings copied, the control input and the block
    outputs zero; without changing the transformer's config, which ``from_transformer`` writes to."""
    layers = min(CONTROLNET_LAYERS, int(transformer.config.num_layers) - 1)
    parts = ("pos_embed", "time_text_embed", "context_embedder", "transformer_blocks")
    view = SimpleNamespace(
        config=FrozenDict(transformer.config), **{name: getattr(transformer, name) for name in parts}
    )
    return SD3ControlNetModel.from_transformer(view, num_layers=layers, num_extra_conditioning_channels=0)


def existing_controlnet(ctx: LoadContext, cls: type, article_name: str, family: str) -> Any:
    """The ControlNet of class ``cls`` at ``model.controlnet`` (a path or hub id).

    Raises:
        UserError: the path is missing, or it holds another class (the message says what to give).
    """
    check_model_path(str(ctx.controlnet), "model.controlnet")
    held = cls.load_config(ctx.controlnet, revision=ctx.revision).get("_class_name")
    if held != cls.__name__:
        raise UserError(
            f"model.controlnet {ctx.controlnet} holds a {held}, not {article_name}: give a ControlNet made for "
            f"{family}, or from_unet for a new one"
        )
    return ctx.load(cls, ctx.controlnet, None, ctx.revision)


def control_vae(ctx: LoadContext) -> AutoencoderKL | None:
    """The model's VAE; built from its config where the model is (on the meta device), ``None`` without one."""
    if ctx.vae is not None or ctx.load is not None:
        return ctx.vae
    source = (
        (ctx.pretrained, "vae")
        if "vae" in ctx.components
        else (ctx.record.get("vae"), ctx.record.get("vae_subfolder"))
    )
    if source[0] is None:
        return None
    try:
        config = AutoencoderKL.load_config(
            source[0], subfolder=source[1], revision=ctx.revision, local_files_only=ctx.local_only
        )
    except OSError:
        return None
    return AutoencoderKL.from_config(config)


def _check_pair(controlnet: SD3ControlNetModel, transformer: SD3Transformer2DModel) -> None:
    """Refuse a ControlNet whose latents or blocks do not fit the transformer."""
    ours, theirs = controlnet.config, transformer.config
    keys = ("in_channels", "patch_size", "num_attention_heads", "attention_head_dim")
    if any(ours[key] != theirs[key] for key in keys):
        raise UserError(
            f"the SD3 ControlNet ({', '.join(f'{k} {ours[k]}' for k in keys)}) does not fit the transformer "
            f"({', '.join(f'{k} {theirs[k]}' for k in keys)}); use a ControlNet made for this SD3 model"
        )
