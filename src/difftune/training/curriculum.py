"""The knowledge bank's share of each step's batch (``objective.bank_curriculum``).

Like the learning rate (:mod:`difftune.training.lr_schedule`), the share is a function of the step
alone: step k draws ``int(share(k) * B)`` bank samples and ``B`` minus that target samples, so a
resumed run and every process of a multi-process run assemble the same batch without any state
beyond the step and the index streams' positions.
"""

from __future__ import annotations

from difftune.config.experiment import ExperimentConfig
from difftune.config.objective import ObjectiveConfig


def bank_share_at(objective: ObjectiveConfig, step: int) -> float:
    """The nominal bank share of step ``step`` (0-based): ``objective.bank_share`` shaped by
    ``objective.bank_curriculum`` (:class:`~difftune.config.objective.BankCurriculum`).

    Between the warm-up and the anneal it is ``objective.bank_share`` itself (not a product), so the
    default curriculum reproduces the constant share exactly.
    """
    c, share = objective.bank_curriculum, objective.bank_share
    if step < c.start_step or (c.end_step is not None and step >= c.end_step):
        return 0.0
    if step < c.start_step + c.warmup_steps:
        return share * (step - c.start_step) / c.warmup_steps
    if c.end_step is not None and step >= c.end_step - c.anneal_steps:
        return c.final_share + (share - c.final_share) * (c.end_step - step) / c.anneal_steps
    return share


def step_counts(cfg: ExperimentConfig, step: int) -> tuple[int, int]:
    """``(n_target, n_bank)`` of the global batch of step ``step``: n_bank = int(share(k) * B), as
    :attr:`ExperimentConfig.bank_count` for the constant share; 0 without a retention stream."""
    batch = cfg.train.batch_size
    n_bank = int(bank_share_at(cfg.objective, step) * batch) if cfg.bank_count else 0
    return batch - n_bank, n_bank


def bank_weight_at(objective: ObjectiveConfig, step: int) -> float:
    """λ of step ``step``: ``objective.bank_weight``, times share(k) / ``bank_share`` when
    ``objective.bank_curriculum.scale_weight`` is set (exactly λ wherever the share is full)."""
    if not objective.bank_curriculum.scale_weight:
        return objective.bank_weight
    return objective.bank_weight * (bank_share_at(objective, step) / objective.bank_share)
