"""Tiny random-init SDXL, SD3 and Flux pipelines for ControlNet tests, built from configs (nothing downloaded).

* :func:`save_sdxl_controlnet_pipeline`: the tiny SDXL pipeline (:func:`~difftune.testing.models.save_sdxl_pipeline`),
  optionally as a ``StableDiffusionXLControlNetPipeline`` with a ControlNet that changes the UNet's output.
* :func:`save_sd3_controlnet_pipeline`: the tiny SD3 pipeline (:func:`~difftune.testing.sd3.save_sd3_pipeline`)
  with a VAE whose posterior has a negligible spread, as a trained VAE's has (the stock SD3 ControlNet
  pipeline draws its control latents from it; difftune takes the mean), optionally as a
  ``StableDiffusion3ControlNetPipeline`` with a ControlNet that changes the transformer's output.
* :func:`save_flux_controlnet_pipeline`: the tiny Flux.1-dev pipeline (:func:`~difftune.testing.flux.save_flux_pipeline`)
  with a sharp VAE likewise (``FluxControlNetPipeline`` draws its control latents from the posterior too),
  optionally as a ``FluxControlNetPipeline`` with a ControlNet that changes the transformer's output.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, ControlNetModel, FluxControlNetModel, SD3ControlNetModel

from difftune.testing.flux import save_flux_pipeline, tiny_flux_transformer
from difftune.testing.models import save_sdxl_pipeline, tiny_controlnet, tiny_sdxl_unet
from difftune.testing.sd3 import save_sd3_pipeline, tiny_sd3_transformer

LOG_VARIANCE = -30.0  # the VAE's posterior log-variance (its clamp's floor): a spread of 3e-7


def sharpen_vae(vae: AutoencoderKL) -> AutoencoderKL:
    """Make the posterior of ``vae`` nearly a point: its log-variance :data:`LOG_VARIANCE`, set by
    ``quant_conv`` (the encoder's last convolution where the VAE has none, as Flux's)."""
    latent = vae.config.latent_channels
    last = vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out
    with torch.no_grad():
        last.weight[latent:] = 0
        last.bias[latent:] = LOG_VARIANCE
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
    _sharpen_saved_vae(root)
    if controlnet:
        net = new_sd3_controlnet(tiny_sd3_transformer(seed=seed))
        _randomise(seed, [*net.controlnet_blocks, net.pos_embed_input.proj])
        _with_controlnet(root, net, "StableDiffusion3ControlNetPipeline")
    return root


def save_flux_controlnet_pipeline(root: Path, seed: int = 0, controlnet: bool = False) -> Path:
    """The tiny Flux.1-dev pipeline with a sharp VAE (:func:`sharpen_vae`); with ``controlnet``, a
    ``FluxControlNetPipeline`` with a one-block ``FluxControlNetModel`` of its transformer whose control
    input and block outputs are random (a new one's are zero)."""
    from difftune.backbones.controlnet_flux import new_flux_controlnet

    save_flux_pipeline(root, tiny_flux_transformer(seed=seed), seed=seed)
    _sharpen_saved_vae(root)
    if controlnet:
        net = new_flux_controlnet(tiny_flux_transformer(seed=seed))
        _randomise(seed, [*net.controlnet_blocks, *net.controlnet_single_blocks, net.controlnet_x_embedder])
        _with_controlnet(root, net, "FluxControlNetPipeline")
    return root


def _sharpen_saved_vae(root: Path) -> None:
    """Replace the pipeline's saved VAE at ``root/vae`` by its :func:`sharpen_vae` form."""
    sharpen_vae(AutoencoderKL.from_pretrained(root / "vae", use_safetensors=True)).save_pretrained(
        root / "vae"
    )


def _randomise(seed: int, layers: list[torch.nn.Module]) -> None:
    """Give ``layers`` (a new ControlNet's zero-initialised ones) random weights drawn from ``seed``."""
    torch.manual_seed(seed)
    for layer in layers:
        torch.nn.init.normal_(layer.weight, std=0.1)


def _with_controlnet(
    root: Path, net: ControlNetModel | SD3ControlNetModel | FluxControlNetModel, pipeline: str
) -> None:
    """Add ``net`` as ``controlnet/`` to the pipeline at ``root`` and make it a ``pipeline``."""
    import json

    net.save_pretrained(root / "controlnet")
    index = json.loads((root / "model_index.json").read_text())
    index.update({"_class_name": pipeline, "controlnet": ["diffusers", type(net).__name__]})
    (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
