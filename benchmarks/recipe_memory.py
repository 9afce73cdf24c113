"""The dry run's memory estimate of each real-size recipe, from the published model configurations.

``difftune train --dry-run`` estimates a run's device memory per process from the model's config alone:
the network is built on the ``meta`` device and one micro-batch is traced there
(:mod:`difftune.training.memory_estimate`). This script gives it the real sizes without downloading
anything: for each model it writes a folder that holds only the published configurations (``model_index.json``,
the denoiser's ``config.json``, the scheduler's), checks that the denoiser has its published parameter
count, and estimates each recipe on it as its dry run does (the same function, on the same meta-device model).

What the estimate covers: the denoiser's parameters (trained and frozen), gradients, AdamW's moments, the EMA,
autocast's 16-bit copies and one micro-batch's saved activations. The VAE and the text encoders are not
in it: the folder has no weight files to count, and the run uses them only to encode the data and the
bank's prompts once, before training. A recipe's comment quotes the number this script prints.

    python benchmarks/recipe_memory.py                     # every recipe below, about 1 min on one CPU thread
    python benchmarks/recipe_memory.py --recipes sdxl_lora --json memory.json
    python benchmarks/recipe_memory.py --recipes sdxl_full --set train.optimizer=adamw_8bit --set train.ema_decay=0

Each recipe's line is the dry run's ``memory`` line. The last line is ``max <GiB>``: the largest estimate.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from difftune.backbones.loading import peek_backbone
from difftune.config.experiment import load_config
from difftune.testing.flux import FLUX_SCHEDULER as FLUX1_DEV_SCHEDULER
from difftune.training.memory_estimate import MemoryEstimate, estimate_training_memory

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30

# the denoisers' published configurations (the hub folders' config.json, keys at their defaults left out)
SDXL_UNET = {
    "_class_name": "UNet2DConditionModel",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "in_channels": 4,
    "layers_per_block": 2,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}
SD35_MEDIUM_TRANSFORMER = {
    "_class_name": "SD3Transformer2DModel",
    "attention_head_dim": 64,
    "caption_projection_dim": 1536,
    "dual_attention_layers": list(range(13)),
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 24,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "qk_norm": "rms_norm",
    "sample_size": 128,
}
SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
FLUX1_DEV_TRANSFORMER = {
    "_class_name": "FluxTransformer2DModel",
    "attention_head_dim": 128,
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}
# FLUX.1-dev's scheduler: the shift grows with the image's token count
FLUX_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", **FLUX1_DEV_SCHEDULER}

# the VAEs' published configurations (an SD3 ControlNet encodes its control image with it)
VAE_BLOCKS = {
    "_class_name": "AutoencoderKL",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "sample_size": 1024,
}
VAES = {
    "stabilityai/stable-diffusion-xl-base-1.0": {
        **VAE_BLOCKS,
        "latent_channels": 4,
        "scaling_factor": 0.13025,
    },
    "stabilityai/stable-diffusion-3.5-medium": {
        **VAE_BLOCKS,
        "latent_channels": 16,
        "scaling_factor": 1.5305,
        "shift_factor": 0.0609,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    },
    "black-forest-labs/FLUX.1-dev": {
        **VAE_BLOCKS,
        "latent_channels": 16,
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    },
}

# name -> (pipeline class, denoiser folder, denoiser config, scheduler config, published parameter count)
MODELS: dict[str, tuple[str, str, dict[str, Any], dict[str, Any], int]] = {
    "stabilityai/stable-diffusion-xl-base-1.0": (
        "StableDiffusionXLPipeline",
        "unet",
        SDXL_UNET,
        SDXL_SCHEDULER,
        2_567_463_684,
    ),
    "stabilityai/stable-diffusion-3.5-medium": (
        "StableDiffusion3Pipeline",
        "transformer",
        SD35_MEDIUM_TRANSFORMER,
        SD3_SCHEDULER,
        2_243_171_520,
    ),
    "black-forest-labs/FLUX.1-dev": (
        "FluxPipeline",
        "transformer",
        FLUX1_DEV_TRANSFORMER,
        FLUX_SCHEDULER,
        11_901_408_320,
    ),
}
RECIPES = {
    f"{name}{twin}": f"configs/recipes/{name}{twin}.yaml"
    for name in (
        "sdxl_lora",
        "sdxl_full",
        "sdxl_controlnet_canny",
        "sd35_medium_lora",
        "sd35_medium_full",
        "sd35_medium_controlnet_canny",
        "flux1_dev_lora",
        "flux1_dev_full",
    )
    for twin in ("", "_plain")
}


def parameter_count(config: dict[str, Any]) -> int:
    """Parameters of the diffusers model ``config`` describes, built on the meta device."""
    import diffusers

    cls = getattr(diffusers, config["_class_name"])
    with torch.device("meta"):
        model = cls.from_config({k: v for k, v in config.items() if k != "_class_name"})
    return sum(p.numel() for p in model.parameters())


def write_config_folder(root: Path, pretrained: str) -> Path:
    """A pipeline folder of ``pretrained``'s published configurations, no weights; checks the parameter count.

    Raises:
        SystemExit: the denoiser built from the configuration does not have the published parameter count.
    """
    pipeline, sub, config, scheduler, published = MODELS[pretrained]
    counted = parameter_count(config)
    if counted != published:
        sys.exit(
            f"{pretrained}: the config builds {counted:,} parameters, the published model has {published:,}"
        )
    folder = root / pretrained.replace("/", "--")
    (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / sub / "config.json").write_text(json.dumps(config))
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    (folder / "vae").mkdir(exist_ok=True)
    (folder / "vae" / "config.json").write_text(json.dumps(VAES[pretrained]))
    index = {"_class_name": pipeline, sub: ["diffusers", config["_class_name"]]}
    index["scheduler"] = ["diffusers", scheduler["_class_name"]]
    index["vae"] = ["diffusers", "AutoencoderKL"]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def estimate(recipe: Path, model: Path, overrides: list[str] | None = None) -> MemoryEstimate:
    """What ``difftune train --config recipe --dry-run`` estimates, with the model read from the config
    folder ``model`` (:func:`~difftune.training.memory_estimate.estimate_training_memory` on the backbone
    built on the meta device, as the dry run builds it), under the FSDP launch the recipe names
    (:func:`sharded_over`)."""
    cfg = load_config(recipe, [f"model.pretrained={model}", *(overrides or [])])
    backbone = peek_backbone(str(model), cfg.model.subfolder, controlnet=cfg.model.controlnet)
    processes = sharded_over(recipe)
    return estimate_training_memory(cfg, backbone, processes=processes or 1, sharded=bool(processes))


def quoted(recipe: Path) -> float | None:
    """The estimate (GiB) a recipe's comment quotes (``the dry run estimates 12.34 GiB``), or ``None``."""
    match = re.search(r"the dry run estimates ([0-9.]+) GiB", recipe.read_text())
    return float(match.group(1)) if match else None


def sharded_over(recipe: Path) -> int | None:
    """The processes a recipe is sharded over (``GiB per process sharded over 8``), or ``None``."""
    match = re.search(r"GiB per process sharded over (\d+)", recipe.read_text())
    return int(match.group(1)) if match else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=sorted(RECIPES))
    parser.add_argument("--json", type=Path, help="write the estimates here")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key"
    )
    args = parser.parse_args(argv)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        folders: dict[str, Path] = {}
        for name in args.recipes:
            recipe = ROOT / RECIPES[name]
            pretrained = yaml.safe_load(recipe.read_text())["model"]["pretrained"]
            if pretrained not in folders:
                folders[pretrained] = write_config_folder(Path(tmp), pretrained)
            memory = estimate(recipe, folders[pretrained], args.set)
            gib = round(memory.total / GIB, 2)
            rows[name] = {"recipe": RECIPES[name], "model": pretrained, "gib": gib, "quoted": quoted(recipe)}
            print(f"{name:<20} {memory.line()}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    print(f"max {max(row['gib'] for row in rows.values()):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
