"""LoRA adapters in diffusers' own layout, for the stock loaders of the Stable Diffusion families.

peft's format (``adapter_model.safetensors``) is what ``PeftModel.from_pretrained`` reads, and the
stock loader of a DiT or a ``UNet2DModel``. A Stable Diffusion (SDXL, SD3) pipeline reads LoRA weights with
``pipe.load_lora_weights(directory)``, a ``ControlNetModel`` (which no pipeline loads a LoRA into)
with ``controlnet.load_lora_adapter(directory, prefix=None, use_safetensors=True)``; both read
``pytorch_lora_weights.safetensors``, which diffusers' own writers make here. Each file carries the
peft config as its ``lora_adapter_metadata``, so the stock loader scales the update by
``lora_alpha / r`` as training did. Only peft's ``lora`` is written in this layout; LoHa, LoKr and
difftune's own methods keep their adapter folder's other files only.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from difftune.backbones.family import CARD_FOLDER
from difftune.tuning.lora import ADAPTER_NAME

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' default name (LORA_WEIGHT_NAME_SAFE)


def save_pipeline_lora(unet: nn.Module, directory: Path, pipeline: str = "StableDiffusionPipeline") -> None:
    """Write the LoRA of a Stable Diffusion ``unet`` (peft layers injected) for ``pipe.load_lora_weights``.

    The keys are diffusers' (``unet.<module>.lora.down.weight``), written by ``pipeline``'s
    ``save_lora_weights`` (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``) with the
    adapter's peft config as metadata.
    """
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME))
    getattr(diffusers, pipeline).save_lora_weights(
        directory,
        unet_lora_layers={name: tensor.detach().cpu().contiguous() for name, tensor in layers.items()},
        weight_name=LORA_WEIGHTS,
        unet_lora_adapter_metadata=unet.peft_config[ADAPTER_NAME].to_dict(),
    )


def save_transformer_lora(
    transformer: nn.Module, directory: Path, pipeline: str = "StableDiffusion3Pipeline"
) -> None:
    """Write the LoRA of a pipeline's ``transformer`` (peft layers injected) for ``pipe.load_lora_weights``.

    The keys are peft's under ``transformer.``, written by ``pipeline``'s ``save_lora_weights``
    (``StableDiffusion3Pipeline``) with the adapter's peft config as metadata, as diffusers' SD3 LoRA
    training script saves them.
    """
    import diffusers
    from peft import get_peft_model_state_dict

    layers = get_peft_model_state_dict(transformer, adapter_name=ADAPTER_NAME)
    getattr(diffusers, pipeline).save_lora_weights(
        directory,
        transformer_lora_layers={name: tensor.detach().cpu().contiguous() for name, tensor in layers.items()},
        weight_name=LORA_WEIGHTS,
        transformer_lora_adapter_metadata=transformer.peft_config[ADAPTER_NAME].to_dict(),
    )


def save_model_lora(model: nn.Module, directory: Path) -> None:
    """Write the LoRA of a diffusers ``model`` that no pipeline loads a LoRA into (a ControlNet) for
    ``model.load_lora_adapter(directory, prefix=None, use_safetensors=True)``.

    What the model's own ``save_lora_adapter`` writes (peft's keys, its config as metadata), through
    the same diffusers writer, without the dtype cast that warns on every save.
    """
    from diffusers.loaders.lora_base import LoraBaseMixin
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    LoraBaseMixin.write_lora_layers(
        state_dict={name: tensor.detach().cpu().contiguous() for name, tensor in state.items()},
        save_directory=str(directory),
        is_main_process=True,
        weight_name=LORA_WEIGHTS,
        save_function=None,
        safe_serialization=True,
        lora_adapter_metadata=model.peft_config[ADAPTER_NAME].to_dict(),
    )


def lora_card(directory: Path, imports: str, load_lines: list[str]) -> list[str]:
    """The model-card section on loading the LoRA files below ``directory`` with stock diffusers, or none.

    Args:
        directory: the saved model.
        imports: the names the code imports from ``diffusers``.
        load_lines: the code; ``{folder}`` stands for the adapter folder (the EMA one when there is one).
    """
    folders = sorted(str(path.parent.relative_to(directory)) for path in directory.glob(f"**/{LORA_WEIGHTS}"))
    if not folders:
        return []
    folder = f"{CARD_FOLDER}/{([name for name in folders if name.startswith('ema')] or folders)[0]}"
    listed = " and ".join(
        f"`{name}/`" + (" (the EMA weights)" if name.startswith("ema") else "") for name in folders
    )
    return [
        "",
        "## The LoRA in stock diffusers",
        "",
        f"The LoRA is also in diffusers' layout (`{LORA_WEIGHTS}`) in {listed}:",
        "",
        "```python",
        f"from diffusers import {imports}",
        "",
        *(line.replace("{folder}", folder) for line in load_lines),
        "```",
    ]


def pipeline_lora_card(directory: Path, pipeline: str, source: str) -> list[str]:
    """:func:`lora_card` for a text-to-image pipeline: ``pipeline.from_pretrained(source)``, then the LoRA."""
    return lora_card(
        directory,
        pipeline,
        [f'pipe = {pipeline}.from_pretrained("{source}")', 'pipe.load_lora_weights("{folder}")'],
    )
