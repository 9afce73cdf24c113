"""Tiny random-init SDXL and SD3 pipelines for ControlNet tests, built from configs (nothing downloaded).

* :func:`save_sdxl_controlnet_pipeline`: the tiny SDXL pipeline (:func:`~difftune.testing.models.save_sdxl_pipeline`),
  optionally as a ``StableDiffusionXLControlNetPipeline`` with a ControlNet that changes the UNet's output.
* :func:`save_sd3_controlnet_pipeline`: the tiny SD3 pipeline (:func:`~difftune.testing.sd3.save_sd3_pipeline`)
  with a VAE whose posterior has a negligible spread, as a trained VAE's has (the stock SD3 ControlNet
  pipeline draws its control latents from it; difftune takes the mean), optionally as a
  ``StableDiffusion3ControlNetPipeline`` with a ControlNet that changes the transformer's output.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, ControlNetModel, SD3ControlNetModel

from difftune.testing.models import save_sdxl_pipeline, tiny_controlnet, tiny_sdxl_unet
from difftune.testing.sd3 import save_sd3_pipeline, tiny_sd3_transformer

LOG_VARIANCE = -30.0  # the VAE's posterior log-variance (its clamp's floor): a spread of 3e-7


def sharpen_vae(vae: AutoencoderKL) -> AutoencoderKL:
    """Make the posterior of ``vae`` (with ``quant_conv``) nearly a point: its log-variance :data:`LOG_VARIANCE`."""
    latent = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[latent:] = 0
        vae.quant_conv.bias[latent:] = LOG_VARIANCE
    return vae


def save_sdxl_controlnet_pipeline(root: Path, seed: int = 0, controlnet: bool = False) -> Path:
    """The tiny SDXL pipeline; with ``controlnet``, a ``StableDiffusionXLControlNetPipeline`` with a
    :func:`~difftune.testing.models.tiny_controlnet` of its UNet."""
    save_sdxl_pipeline(root, tiny_sdxl_unet(seed=seed), seed=seed)
    if controlnet:
        _with_controlnet(
            root, tiny_controlnet(tiny_sdxl_unet(seed=seed), seed), "StableDiffusionXLControlNetPipeline"
        )
    return root


def save_sd3_controlnet_pipeline(root: Path, seed: int = 0, controlnet: bool = False) -> Path:
    """The tiny SD3 pipeline with a sharp VAE (:func:`sharpen_vae`); with ``controlnet``, a
    ``StableDiffusion3ControlNetPipeline`` with a one-block ``SD3ControlNetModel`` of its transformer whose
    control input and block outputs are random (a new one's are zero)."""
    from difftune.backbones.controlnet_sd3 import new_sd3_controlnet

    save_sd3_pipeline(root, tiny_sd3_transformer(seed=seed), seed=seed)
    sharpen_vae(AutoencoderKL.from_pretrained(root / "vae", use_safetensors=True)).save_pretrained(
        root / "vae"
    )
    if controlnet:
        net = new_sd3_controlnet(tiny_sd3_transformer(seed=seed))
        torch.manual_seed(seed)
        for layer in [*net.controlnet_blocks, net.pos_embed_input.proj]:
            torch.nn.init.normal_(layer.weight, std=0.1)
        _with_controlnet(root, net, "StableDiffusion3ControlNetPipeline")
    return root


def _with_controlnet(root: Path, net: ControlNetModel | SD3ControlNetModel, pipeline: str) -> None:
    """Add ``net`` as ``controlnet/`` to the pipeline at ``root`` and make it a ``pipeline``."""
    import json

    net.save_pretrained(root / "controlnet")
    index = json.loads((root / "model_index.json").read_text())
    index.update({"_class_name": pipeline, "controlnet": ["diffusers", type(net).__name__]})
    (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
