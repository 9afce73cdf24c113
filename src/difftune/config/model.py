"""The ``model`` section of the experiment config: which pre-trained model to transfer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from difftune.config.checks import _check, _check_fields

NEW_CONTROLNET_TRAINS_IN_FULL = (
    "a parameter-efficient method saves an adapter to load onto its base, and a new ControlNet "
    "(model.controlnet: from_unet) has random layers that are not saved: train it in full (tuning.method: full), "
    "or give an existing ControlNet as model.controlnet"
)


@dataclass
class ModelConfig:
    """Which pre-trained model to transfer (which of its parameters train is ``tuning.method``).

    Attributes:
        pretrained: hub id or local directory of a diffusers pipeline (``model_index.json``) or of a
            single model (``config.json`` of a ``DiTTransformer2DModel`` or ``UNet2DModel``).
        subfolder: model subfolder inside a pipeline directory; ``None`` picks ``transformer`` or
            ``unet`` automatically.
        vae: optional hub id / directory of an ``AutoencoderKL`` for latent-space models; ``None``
            uses the pipeline's ``vae`` if there is one, else the model works in pixel space.
        revision: optional hub revision.
        controlnet: train a ControlNet over the Stable Diffusion UNet of ``pretrained`` (which stays
            frozen): ``from_unet`` makes a new one from the UNet's weights, as ControlNet's training
            does; a hub id or directory continues an existing ControlNet; ``None``: no ControlNet.
        guidance: the guidance embedding's value of a guidance-distilled model (Flux.1-dev,
            ``guidance_embeds``): the bank is generated with it (each sample stores it, and trains
            with it) and the target trains with it; ``None``: what a saved model records, else
            ``FluxPipeline``'s default 3.5. Refused for a model without a guidance embedding.
        pretraining_density: the density over the noise level a flow model was pre-trained with: what
            plain fine-tuning as the model was trained draws (``objective.target_schedule:
            pretraining``) and what the ``offsets`` port centres on. ``auto``: the family's (SD3/3.5:
            ``logit_normal``, its published recipe; every other flow family: ``uniform`` over the
            index); ``uniform``; ``logit_normal`` (σ before the shift ~ sigmoid(N(0, 1))). A run records
            the concrete one. DDPM and EDM models state their own (only ``auto``).
    """

    pretrained: str = ""
    subfolder: str | None = None
    vae: str | None = None
    revision: str | None = None
    controlnet: str | None = None
    guidance: float | None = None
    pretraining_density: Literal["auto", "uniform", "logit_normal"] = "auto"

    def __post_init__(self) -> None:
        _check_fields(self, "model")
        _check(
            self.guidance is None or 0 <= self.guidance < 1e3,
            f"model.guidance must be a number in [0, 1000) (FluxPipeline's default is 3.5), got {self.guidance!r}",
        )
        _check(
            bool(self.pretrained),
            "model.pretrained is empty: set it to a hub id or a local diffusers directory",
        )
