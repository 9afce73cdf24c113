"""The ``bank`` section of the experiment config: the knowledge bank and how it is sampled."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from difftune.config.checks import ConfigError, _check, _check_fields
from difftune.config.sampling import SamplingSpec

PromptMode = Literal["captions", "empty", "file", "class_swap"]
PROMPT_MODES: tuple[str, ...] = ("captions", "empty", "file", "class_swap")


@dataclass
class ClassSwapSettings:
    """``bank.class_swap``, read by ``bank.prompts: class_swap`` (DreamBooth's prior preservation): each
    caption of the target set with its instance token or phrase replaced by the class word, so that
    "a photo of sks dog" becomes "a photo of dog" in the bank.

    Attributes:
        instance: the instance phrase, or a list of them; matched as whole words, case-insensitively
            (a longer phrase before a shorter one it contains). ``""``: unset.
        class_word: what replaces each match.
    """

    instance: str | list[str] = ""
    class_word: str = ""

    def __post_init__(self) -> None:
        _check_fields(self, "bank.class_swap")
        _check(
            self.instance != [] and all(phrase.strip() for phrase in self.phrases),
            f"bank.class_swap.instance={self.instance!r}: give a phrase such as 'sks dog', or a list of "
            "non-empty phrases",
        )

    @property
    def phrases(self) -> list[str]:
        """The instance phrases, as a list (empty when unset)."""
        if isinstance(self.instance, str):
            return [self.instance] if self.instance else []
        return list(self.instance)


@dataclass
class BankConfig:
    """The knowledge bank: samples of the frozen pre-trained model (docs/method.md §2).

    Attributes:
        path: directory of the bank (shards + ``manifest.json``); empty = no bank.
        num_samples: number of samples to generate.
        sampling: how they are generated (``scheduler``, ``steps``, ``guidance_scale``, ``seed``:
            :class:`SamplingSpec`); sample i uses seed ``sampling.seed + i``.
        shard_size: samples per shard file.
        batch_size: generation batch size (does not change the result).
        prompts: the prompts a text-conditional model's bank is generated from (sample i gets prompt
            ``i mod P``; docs/method.md §9): ``captions`` (the target set's captions), ``empty`` (the
            empty prompt alone: the unconditional model's knowledge), ``file`` (one prompt per line
            of ``prompts_file``) or ``class_swap`` (the captions with ``class_swap.instance`` replaced
            by ``class_swap.class_word``). A class-conditional model's bank takes labels ``i mod K``
            and refuses any but ``captions``. Before it was a mode this key held a prompt file's path
            (now ``file`` with ``prompts_file``) or null (now ``captions``); those still load.
        prompts_file: the text file of ``prompts: file``, one prompt per line.
        class_swap: the instance phrase(s) and class word of ``prompts: class_swap``
            (:class:`ClassSwapSettings`).
        condition: the condition bank samples are trained with: ``"null"`` (the unconditional
            form: the empty prompt; a ControlNet keeps each sample's control image) or ``"own"``
            (the condition each sample was generated with).
        made_by: ``"this_model"``: the bank must come from the very weights being fine-tuned (checked by
            their fingerprint, and its label count against the model's). ``"earlier_model"``: it comes
            from an earlier model of the same line (a task sequence's ``pretrained``, ``previous`` or
            ``accumulate`` bank, made before the model moved on and its label table grew): shape,
            space and conditions are still checked, the weights and label count are not.
    """

    path: str = ""
    num_samples: int = 1000
    sampling: SamplingSpec = field(default_factory=SamplingSpec)
    shard_size: int = 256
    batch_size: int = 64
    prompts: PromptMode = "captions"
    prompts_file: str = ""
    class_swap: ClassSwapSettings = field(default_factory=ClassSwapSettings)
    condition: Literal["null", "own"] = "null"
    made_by: Literal["this_model", "earlier_model"] = "this_model"

    def __post_init__(self) -> None:
        _check_fields(self, "bank")
        _check_fields(self.sampling, "bank.sampling")
        _check(self.num_samples > 0, f"bank.num_samples={self.num_samples} must be > 0")
        _check(self.shard_size > 0 and self.batch_size > 0, "bank.shard_size and bank.batch_size must be > 0")
        self._check_prompt_settings()

    def _check_prompt_settings(self) -> None:
        """Each prompt mode has the settings it reads, and no other mode's (they would be ignored)."""
        mode, swap = self.prompts, self.class_swap
        _check(
            mode != "file" or bool(self.prompts_file),
            "bank.prompts=file reads bank.prompts_file, which is empty: give a text file with one prompt per line",
        )
        _check(
            mode == "file" or not self.prompts_file,
            f"bank.prompts_file={self.prompts_file!r} is read only by bank.prompts=file, but "
            f"bank.prompts={mode}: set bank.prompts=file, or remove bank.prompts_file",
        )
        if mode == "class_swap":
            _check(
                bool(swap.phrases) and bool(swap.class_word.strip()),
                "bank.prompts=class_swap replaces bank.class_swap.instance by bank.class_swap.class_word in "
                "each caption: set both (e.g. class_swap: {instance: sks dog, class_word: dog})",
            )
            return
        given = [name for name in ("instance", "class_word") if getattr(swap, name)]
        if given:
            raise ConfigError(
                f"bank.class_swap.{given[0]}={getattr(swap, given[0])!r} is read only by bank.prompts=class_swap, "
                f"but bank.prompts={mode}: set bank.prompts=class_swap, or remove bank.class_swap"
            )
