"""``README.md`` of a saved model directory: how to load it, what its schedule is, what stock loaders can't do.

Written into a run's ``final/`` and a merged export, from what the directory holds, so it stays true
for the layout beside it. Code lines use ``THIS_FOLDER`` for the directory's path.
"""

from __future__ import annotations

import json
from pathlib import Path

from difftune.backbones.adapters import ADAPTER
from difftune.backbones.family import CARD_FOLDER
from difftune.backbones.loading import LoadedModel
from difftune.process.schedulers import DEFAULT_NOISE_SCHEDULE

CARD = "README.md"
FOLDER = CARD_FOLDER


def write_model_card(loaded: LoadedModel, directory: str | Path) -> None:
    """Write ``directory/README.md`` for the saved model ``loaded`` whose files ``directory`` holds."""
    directory = Path(directory)
    lines = [
        "# A model fine-tuned with difftune",
        "",
        f"Fine-tuned from `{loaded.source}`"
        + (f" with {loaded.tuning.method}" if loaded.tuning else "")
        + ". The path in the code below is this folder's.",
        "",
        "## Load",
        "",
        "```python",
        *_load_lines(loaded, directory),
        "```",
        "",
        "Or sample with difftune (EMA weights when present, classifier-free guidance 1.5 by default):",
        "",
        "```bash",
        f"difftune sample --model {FOLDER} {_condition_flag(loaded)} --out samples",
        "```",
        "",
        "## Noise schedule",
        "",
        *_schedule_lines(loaded),
    ]
    lines += loaded.family.card_notes(loaded, directory)  # what the family's stock pipeline cannot do
    (directory / CARD).write_text("\n".join(lines) + "\n")


def stock_loader(loaded: LoadedModel, directory: str | Path, where: str | None = None) -> str | None:
    """The stock diffusers call that loads the trained weights saved in ``directory`` (``where`` in
    the text: its path by default), or ``None`` for an adapter, which only difftune loads whole."""
    directory = Path(directory)
    where = str(directory) if where is None else where
    if (directory / ADAPTER).is_dir():
        return None
    index = directory / "model_index.json"
    if index.is_file():
        return f'{json.loads(index.read_text())["_class_name"]}.from_pretrained("{where}")'
    return f'{type(loaded.backbone.inner).__name__}.from_pretrained("{where}", subfolder="{loaded.backbone.subfolder}")'


def _load_lines(loaded: LoadedModel, directory: Path) -> list[str]:
    loader = stock_loader(loaded, directory, FOLDER)
    if loader is None:
        return [
            "# an adapter: difftune loads it onto the base it records (its fingerprint is checked);",
            "# `difftune export THIS_FOLDER --out merged --merge` writes a stock diffusers model",
            "from difftune.backbones import load_trained",
            "",
            f'model = load_trained("{FOLDER}")  # EMA weights; use_ema=False for the trained ones',
        ]
    model_class, sub = type(loaded.backbone.inner).__name__, loaded.backbone.subfolder
    names = sorted({model_class, loader.split(".")[0]})
    lines = [
        f"from diffusers import {', '.join(names)}",
        "",
        f"{'pipe' if 'Pipeline' in loader else 'model'} = {loader}",
    ]
    if (directory / "ema" / sub).is_dir():
        lines.append(f'ema = {model_class}.from_pretrained("{FOLDER}", subfolder="ema/{sub}")  # EMA weights')
    return lines


def _condition_flag(loaded: LoadedModel) -> str:
    return loaded.family.sample_flags(loaded)


def _schedule_lines(loaded: LoadedModel) -> list[str]:
    lines = [
        "`scheduler/` holds the noise schedule the model was trained with. Build samplers from it, e.g.",
        f'`DPMSolverMultistepScheduler.from_pretrained("{FOLDER}", subfolder="scheduler")`, so the model',
        "samples on the same timestep grid everywhere.",
    ]
    if loaded.scheduler_config == DEFAULT_NOISE_SCHEDULE:
        lines += [
            "",
            "It is difftune's default (DDPM: linear betas 1e-4..0.02, 1000 steps, epsilon prediction, "
            "`timestep_spacing` leading), which difftune gives a model saved without a schedule.",
        ]
    return lines
