"""The ``bank`` section of the experiment config: the knowledge bank and how it is sampled."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from difftune.config.checks import _check, _check_fields
from difftune.config.sampling import SamplingSpec


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
        prompts: a text-conditional model's bank prompts: a text file with one prompt per line;
            ``None`` uses the target set's captions. Sample i gets prompt ``i mod P``.
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
    prompts: str | None = None
    condition: Literal["null", "own"] = "null"
    made_by: Literal["this_model", "earlier_model"] = "this_model"

    def __post_init__(self) -> None:
        _check_fields(self, "bank")
        _check_fields(self.sampling, "bank.sampling")
        _check(self.num_samples > 0, f"bank.num_samples={self.num_samples} must be > 0")
        _check(self.shard_size > 0 and self.batch_size > 0, "bank.shard_size and bank.batch_size must be > 0")
