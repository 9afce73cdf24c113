"""What a knowledge bank's conditions are made from, given to the model's family: the bank's prompts
(``bank.prompts``: :mod:`difftune.bank.prompts`) and the annotator that turns each generated image into
its control image; the check of a bank's conditions against the model; the bank a run replays (and
evaluates forgetting on)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from difftune.backbones.base import Backbone
from difftune.backbones.conditioning import Conditioning
from difftune.backbones.family import BankInputs
from difftune.backbones.loading import LoadedModel
from difftune.bank.prompts import check_prompt_mode, choose_prompts
from difftune.bank.teacher_draws import StoredTeacher
from difftune.config.experiment import ExperimentConfig
from difftune.config.sampling import SamplingSpec
from difftune.data.buckets import Bucket, BucketRows
from difftune.errors import UserError
from difftune.io.mapped import MappedRows, rows


def prepare_bank_conditions(loaded: LoadedModel, cfg: ExperimentConfig) -> str | None:
    """Give the backbone what its family's bank conditions need (a text model's prompts, embedded; a
    ControlNet's annotator), read from ``cfg`` only when the family asks for it.

    Returns:
        The line that says where the bank's prompts come from, or ``None`` for a model that reads none.

    Raises:
        UserError: a ``bank.prompts`` other than ``captions`` for a model whose bank takes no prompts, or
            prompts that cannot be read (:func:`~difftune.bank.prompts.choose_prompts`).
    """
    check_prompt_mode(cfg.bank, loaded.backbone, cfg.model.pretrained)
    lines: list[str] = []

    def prompts() -> list[str]:
        chosen = choose_prompts(cfg)
        lines.append(chosen.line)
        return chosen.prompts

    loaded.family.prepare_bank(loaded, BankInputs(prompts, lambda: _bank_annotator(cfg)))
    return lines[0] if lines else None


def _bank_annotator(cfg: ExperimentConfig) -> Any:
    """The annotator that makes control images from a bank's samples (``data.annotator``)."""
    if not cfg.data.annotator:  # also refused by `difftune bank` before loading anything
        raise UserError(
            "a ControlNet bank computes its control images from its samples: set data.annotator (e.g. canny)"
        )
    from difftune.control import build_annotator

    return build_annotator(cfg.data.annotator)


def check_bank_conditions(
    manifest: dict[str, Any], backbone: Backbone, annotator: str | None, path: str
) -> None:
    """Refuse a bank whose conditions the model's family cannot train on: one that lacks a condition the
    model needs, or whose control images another annotator made than the target's.

    ``annotator`` is the target data's (``data.annotator``); ``None`` means precomputed controls, which no
    bank matches.

    Raises:
        UserError: the message names what the bank holds and how to make a matching one.
    """

    def wanted() -> dict[str, Any] | None:
        if not annotator:
            return None
        from difftune.control import build_annotator

        return build_annotator(annotator).record()

    backbone.family.check_bank(manifest, backbone, wanted, path)


@dataclass
class RunBank:
    """The knowledge bank of a run (empty without one).

    Attributes:
        samples: the bank's samples in the diffusion space (N, C, H, W), in memory or memory-mapped.
        cond: the condition each was generated with (N).
        seeds: the seed each was generated from (N,).
        sampling: how they were generated (scheduler, steps, guidance; from the manifest), or ``None``.
        buckets: with ``data.buckets``, the bucket of each part of ``samples`` (a ``BucketRows``:
            :mod:`difftune.bank.buckets`); ``None`` without.
        teacher: the pre-trained model's stored predictions (``objective.distillation.teacher: stored``,
            :mod:`difftune.bank.teacher_draws`); ``None`` when the run does not train with them.
    """

    samples: torch.Tensor | MappedRows | BucketRows
    cond: Conditioning
    seeds: torch.Tensor
    sampling: SamplingSpec | None
    buckets: list[Bucket] | None = None
    teacher: StoredTeacher | None = None

    def __len__(self) -> int:
        return int(self.samples.shape[0])

    def split(self, keep: torch.Tensor) -> RunBank:
        """The samples at indices ``keep`` (their conditions, seeds and stored draws with them)."""
        teacher = None if self.teacher is None else self.teacher.split(keep)
        return RunBank(
            rows(self.samples, keep), self.cond.select(keep), self.seeds[keep], self.sampling, teacher=teacher
        )


def manifest_sampling(manifest: dict[str, Any]) -> SamplingSpec:
    """How a bank's samples were generated, from its manifest (scheduler, steps, guidance, seed)."""
    return SamplingSpec(
        scheduler=manifest["scheduler"],
        steps=manifest["num_inference_steps"],
        guidance_scale=manifest["guidance_scale"],
        seed=manifest["seed"],
    )
