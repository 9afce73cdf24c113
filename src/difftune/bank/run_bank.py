"""The knowledge bank a training run reads: the whole bank, or one per aspect-ratio bucket."""

from __future__ import annotations

import torch

from difftune.backbones.conditioning import Conditioning
from difftune.backbones.loading import LoadedModel
from difftune.bank.buckets import load_bucket_bank
from difftune.bank.conditions import RunBank, check_bank_conditions, manifest_sampling
from difftune.bank.generate import load_bank
from difftune.bank.teacher_draws import check_stored, stored_teacher, teacher_draws
from difftune.config.experiment import ExperimentConfig
from difftune.io.store import LatentStore


def training_bank(cfg: ExperimentConfig, loaded: LoadedModel) -> RunBank:
    """The bank a run replays or evaluates forgetting on (``train.evaluation``), checked against the
    model (shape, space, weights, conditions) before the target set is encoded; empty without a bank.
    With ``objective.distillation.teacher: stored`` the bank's stored draws come with it, checked against
    the run's objective (K, ξ, the bank rows' condition).

    Raises:
        UserError: the bank is missing, incomplete, damaged or does not match the model.
    """
    bank: dict[str, torch.Tensor] = {"samples": torch.empty(0), "seeds": torch.empty(0, dtype=torch.long)}
    sampling, teacher = None, None
    if cfg.reads_bank and cfg.data.buckets.enabled:
        return load_bucket_bank(cfg, loaded)
    if cfg.reads_bank:
        bank = load_bank(cfg.bank.path, loaded, cfg.bank.made_by == "this_model", mapped=True)
        manifest = LatentStore(cfg.bank.path).manifest
        check_bank_conditions(manifest, loaded.backbone, cfg.data.annotator, cfg.bank.path)
        sampling = manifest_sampling(manifest)
        wanted = teacher_draws(cfg, loaded)
        if wanted is not None:
            check_stored(manifest, wanted.record, cfg.bank.path)
            teacher = stored_teacher(bank)
    names = [name for name in loaded.backbone.condition_names if name in bank]
    n = bank["samples"].shape[0]
    cond = Conditioning({name: bank[name] for name in names}, n)
    return RunBank(bank["samples"], cond, bank["seeds"], sampling, teacher=teacher)
