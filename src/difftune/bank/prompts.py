"""The prompts a text-conditional model's knowledge bank is generated from (``bank.prompts``): the target
set's captions, the empty prompt, a prompt file, or the captions with an instance phrase swapped for its
class word (DreamBooth's prior preservation); what the bank's manifest records of that choice (and
resuming a bank made before it was recorded), and the refusal of a choice a class-conditional model
would ignore."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difftune.backbones.base import Backbone
from difftune.backbones.stable_diffusion import PROMPTS
from difftune.config.bank import BankConfig, ClassSwapSettings
from difftune.config.experiment import ExperimentConfig
from difftune.errors import UserError
from difftune.io.store import MANIFEST, LatentStore


@dataclass(frozen=True)
class BankPrompts:
    """The bank's prompts (sample i gets prompt ``i mod P``) and one line that says where they come from."""

    prompts: list[str]
    line: str


def choose_prompts(cfg: ExperimentConfig) -> BankPrompts:
    """The prompts ``bank.prompts`` chooses, and the line that reports them.

    Raises:
        UserError: the prompt file is missing or empty, the target set has no captions, or no caption
            holds the instance phrase of ``class_swap``.
    """
    mode = cfg.bank.prompts
    if mode == "empty":
        return BankPrompts([""], "the empty prompt (the model's unconditional knowledge)")
    if mode == "file":
        prompts = _prompt_file(cfg.bank.prompts_file)
        return BankPrompts(prompts, f"{len(prompts)} prompts of {cfg.bank.prompts_file}")
    captions = _captions(cfg)
    if mode == "captions":
        return BankPrompts(captions, f"the target set's {len(captions)} captions")
    swap = cfg.bank.class_swap
    prompts, swapped = swap_instances(captions, swap)
    kept = f" ({len(captions) - swapped} without it kept as they are)" if swapped < len(captions) else ""
    return BankPrompts(
        prompts,
        f"the target set's {len(captions)} captions, {swapped} with {_phrases(swap)} replaced by "
        f"{swap.class_word!r}{kept}",
    )


def bank_prompts(cfg: ExperimentConfig) -> list[str]:
    """The bank's prompts (:func:`choose_prompts`)."""
    return choose_prompts(cfg).prompts


def swap_instances(captions: list[str], swap: ClassSwapSettings) -> tuple[list[str], int]:
    """Each caption with every whole-word, case-insensitive match of an instance phrase replaced by the
    class word (a longer phrase first; spaces inside a phrase match any run of white space), and the
    number of captions that had one; a caption without any is kept as it is.

    Raises:
        UserError: no caption holds any of the phrases (the message names them and shows a caption).
    """
    phrases = sorted(swap.phrases, key=len, reverse=True)
    words = (r"\s+".join(re.escape(word) for word in phrase.split()) for phrase in phrases)
    pattern = re.compile(r"(?<!\w)(?:" + "|".join(words) + r")(?!\w)", re.IGNORECASE)
    swapped = [pattern.subn(lambda _: swap.class_word, caption) for caption in captions]
    count = sum(1 for _, n in swapped if n)
    if not count:
        example = f" (e.g. {captions[0]!r})" if captions else ""
        raise UserError(
            f"bank.class_swap.instance={_phrases(swap)} is in none of the target set's {len(captions)} "
            f"captions{example}; give the token or phrase the captions use"
        )
    return [text for text, _ in swapped], count


def prompts_record(cfg: BankConfig) -> dict[str, Any]:
    """What a bank's manifest records of ``bank.prompts`` (beside the prompts' count and hash), so that
    a bank is resumed only with the prompts it was made from."""
    if cfg.prompts != "class_swap":
        return {"prompts": cfg.prompts}
    swap = cfg.class_swap
    return {"prompts": cfg.prompts, "class_swap": {"instance": swap.phrases, "class_word": swap.class_word}}


def unrecorded_prompt_mode(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """The manifest keys of :func:`prompts_record` when the bank at ``path`` was made from prompts before
    its manifest recorded their mode (it resumes if their count and hash match); none otherwise."""
    if not (Path(path) / MANIFEST).is_file():
        return ()
    manifest = LatentStore(path).manifest
    return ("prompts", "class_swap") if "prompts_sha256" in manifest and "prompts" not in manifest else ()


def reads_prompts(backbone: Backbone) -> bool:
    """``backbone``'s bank samples are generated from prompts (a text-conditional model, or a ControlNet's)."""
    return PROMPTS in backbone.condition_names


def check_prompt_mode(cfg: BankConfig, backbone: Backbone, model: str) -> None:
    """Refuse a ``bank.prompts`` other than the default for a model whose bank takes no prompts (it
    would be ignored).

    Raises:
        UserError: the message names the mode, the model's conditions and the fix.
    """
    if cfg.prompts == "captions" or reads_prompts(backbone):
        return
    extra = {"file": " and bank.prompts_file", "class_swap": " and bank.class_swap"}.get(cfg.prompts, "")
    raise UserError(
        f"bank.prompts={cfg.prompts} chooses a text-conditional model's bank prompts, but {model} is "
        f"conditioned on {', '.join(backbone.condition_names)} (its bank takes no prompts); remove "
        f"bank.prompts{extra}"
    )


def _prompt_file(path: str) -> list[str]:
    """The non-blank lines of the prompt file ``path``, stripped."""
    file = Path(path)
    if not file.is_file():
        raise UserError(
            f"bank.prompts_file {path!r} does not exist; give a text file with one prompt per line"
        )
    prompts = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"bank.prompts_file {path!r} holds no prompts; write one prompt per line")
    return prompts


def _captions(cfg: ExperimentConfig) -> list[str]:
    """The target set's captions (a class-folder set's from ``data.caption_template``)."""
    from difftune.data.targets import load_target_images

    images = load_target_images(cfg.data, 8, 3)  # captions only: nothing is decoded at this size
    return images.caption_list(cfg.data.caption_template)


def _phrases(swap: ClassSwapSettings) -> str:
    """The instance phrase(s) as a message names them."""
    phrases = swap.phrases
    return repr(phrases[0]) if len(phrases) == 1 else repr(phrases)
