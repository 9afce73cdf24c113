"""Adapter for a ``FluxControlNetModel`` beside a frozen Flux.1 transformer.

The condition is Flux's (:mod:`~difftune.backbones.flux`: T5's embeddings, CLIP's pooled embedding and,
for a guidance-distilled model, the guidance value) and the control image
(:mod:`~difftune.backbones.controlnet`), kept as pixels like every ControlNet's. As
``FluxControlNetPipeline`` does for a ControlNet without an ``input_hint_block`` (InstantX's kind), the
ControlNet reads the control image encoded by the VAE (its mean: the pipeline draws from the VAE's
posterior, whose spread is negligible), shifted and scaled as the latents are and packed in 2x2
patches (``controlnet_cond``), beside the same packed latents, σ, prompt embeddings, ids and guidance
value as the transformer; its ``controlnet_block_samples`` and ``controlnet_single_block_samples``
enter the transformer.

Classifier-free guidance (``--guidance-scale`` above 1, ``true_cfg_scale``) runs the ControlNet on the
unconditional branch's prompt too, as training's prompt drop does; ``FluxControlNetPipeline`` reuses the
conditional branch's ControlNet outputs there. A guidance-distilled model samples without it
(``--guidance-scale 1``), where the two agree.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, FluxControlNetModel, FluxTransformer2DModel

from difftune.backbones.base import Backbone
from difftune.backbones.conditioning import Conditioning
from difftune.backbones.controlnet import CONTROL
from difftune.backbones.controlnet_sd3 import VAEControlAdapter, control_vae, existing_controlnet
from difftune.backbones.family import LoadContext
from difftune.backbones.flux import FLUX_GUIDANCE, FLUX_SAMPLE_SIZE, FluxBackbone, pack, unpack
from difftune.errors import UserError

# a new ControlNet's double and single blocks: FluxControlNetModel.from_transformer's defaults
CONTROLNET_LAYERS, CONTROLNET_SINGLE_LAYERS = 4, 10
# what a ControlNet shares with the transformer it steers: its latents, blocks, text widths and ids
PAIRED = (
    "in_channels",
    "num_attention_heads",
    "attention_head_dim",
    "joint_attention_dim",
    "pooled_projection_dim",
    "guidance_embeds",
    "axes_dims_rope",
)


class FluxControlNetBackbone(VAEControlAdapter, FluxBackbone):
    """A trainable ``FluxControlNetModel`` steering a frozen ``FluxTransformer2DModel``.

    Args:
        controlnet: the ControlNet (e.g. ``FluxControlNetModel.from_transformer(transformer)``).
        transformer: the Flux transformer it was made for; frozen here.
        vae: the pipeline's VAE, which encodes the control images; frozen here.
        sample_size: height and width of the latents (:class:`FluxBackbone`).
        guidance: the guidance embedding's value of the conditions this adapter makes (:class:`FluxBackbone`).
    """

    subfolder = "controlnet"
    base_subfolder = "transformer"
    pipeline_class = "FluxControlNetPipeline"

    def __init__(
        self,
        controlnet: FluxControlNetModel,
        transformer: FluxTransformer2DModel,
        vae: AutoencoderKL | None,
        sample_size: int = FLUX_SAMPLE_SIZE,
        guidance: float = FLUX_GUIDANCE,
    ) -> None:
        check_pair(controlnet, transformer)
        super().__init__(transformer, sample_size, guidance)
        self.attach(controlnet, transformer)
        self.attach_vae(vae)
        self.condition_names = (*self.condition_names, CONTROL)

    def base_adapter(self) -> Backbone:
        return FluxBackbone(self.transformer, self.sample_shape[1], self.guidance)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        dtype, frozen = self.inner.dtype, self.transformer.dtype
        control = pack(self.control_latents(cond[CONTROL].to(x_t.device)))
        blocks, singles = self.inner(
            **self.model_inputs(x_t, t, cond, dtype), controlnet_cond=control.to(dtype), return_dict=False
        )
        out = self.transformer(
            **self.model_inputs(x_t, t, cond, frozen),
            controlnet_block_samples=_cast(blocks, frozen),
            controlnet_single_block_samples=_cast(singles, frozen),
        ).sample
        return unpack(out, x_t.shape[2], x_t.shape[3])


def _cast(samples: list[torch.Tensor] | None, dtype: torch.dtype) -> list[torch.Tensor] | None:
    """A ControlNet's block outputs (``None`` for blocks it has none of) in the frozen model's ``dtype``."""
    return None if samples is None else [sample.to(dtype) for sample in samples]


def flux_controlnet_backbone(
    ctx: LoadContext, transformer: FluxTransformer2DModel, sample_size: int, guidance: float
) -> FluxControlNetBackbone:
    """A ControlNet over the Flux ``transformer``: new from its weights (``model.controlnet: from_unet``)
    or an existing ``FluxControlNetModel`` (its path or hub id), with the model's VAE (on the meta device,
    one built from the VAE's config)."""
    if ctx.controlnet == "from_unet" or ctx.load is None:  # built from configs (a dry run): a new one's size
        net = new_flux_controlnet(transformer, copy_weights=ctx.load is not None)
    else:
        net = existing_controlnet(ctx, FluxControlNetModel, "a FluxControlNetModel", "Flux")
    return FluxControlNetBackbone(net, transformer, control_vae(ctx), sample_size, guidance)


def new_flux_controlnet(
    transformer: FluxTransformer2DModel, copy_weights: bool = True
) -> FluxControlNetModel:
    """``FluxControlNetModel.from_transformer``: its first :data:`CONTROLNET_LAYERS` double and
    :data:`CONTROLNET_SINGLE_LAYERS` single blocks (at most the transformer's) and its embeddings copied,
    the control input and the block outputs zero; with the transformer's heads (``from_transformer``
    would give FLUX.1's 24 of 128 to any transformer)."""
    cfg = transformer.config
    return FluxControlNetModel.from_transformer(
        transformer,
        num_layers=min(CONTROLNET_LAYERS, int(cfg.num_layers)),
        num_single_layers=min(CONTROLNET_SINGLE_LAYERS, int(cfg.num_single_layers)),
        attention_head_dim=int(cfg.attention_head_dim),
        num_attention_heads=int(cfg.num_attention_heads),
        load_weights_from_transformer=copy_weights,
    )


def check_pair(controlnet: FluxControlNetModel, transformer: FluxTransformer2DModel) -> None:
    """Refuse a ControlNet whose latents, blocks or inputs do not fit the transformer, and the kinds
    difftune does not feed (a union ControlNet's mode, an ``input_hint_block``'s pixel input)."""
    ours: Any = controlnet.config
    if ours.get("num_mode") is not None:
        raise UserError(
            "the Flux ControlNet is a union ControlNet (num_mode set), which needs a control mode per image; "
            "difftune trains a single-condition FluxControlNetModel: give one without num_mode"
        )
    if ours.get("conditioning_embedding_channels") is not None:
        raise UserError(
            "the Flux ControlNet reads pixels through its input_hint_block (conditioning_embedding_channels "
            "set, XLabs' kind); difftune trains the kind that reads VAE latents: give one without it"
        )
    theirs: Any = transformer.config
    if any(_value(ours[key]) != _value(theirs[key]) for key in PAIRED):
        raise UserError(
            f"the Flux ControlNet ({', '.join(f'{k} {ours[k]}' for k in PAIRED)}) does not fit the transformer "
            f"({', '.join(f'{k} {theirs[k]}' for k in PAIRED)}); use a ControlNet made for this Flux model"
        )


def _value(setting: Any) -> Any:
    """A config value as compared (a list and a tuple of the same numbers are equal)."""
    return tuple(setting) if isinstance(setting, list | tuple) else setting
