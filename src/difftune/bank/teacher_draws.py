"""The teacher's predictions stored in a knowledge bank (``objective.distillation.teacher: stored``).

Distillation (docs/method.md §7) compares the student with the pre-trained model on the bank rows. With
``teacher: stored`` the pre-trained model's predictions are made once, with the bank: for bank sample i
(seed ``s_i = bank.sampling.seed + i``) and draw ``k < K`` (``objective.distillation.stored_draws``),

    seed_ik = s_i * K + k + SEED_OFFSET
    noise   = torch.randn(sample_shape, generator=torch.Generator().manual_seed(seed_ik))
    t       ~ xi, drawn from that same generator after the noise (uniform under ``realisation: weight``)
    out     = f_pre(process.noised(x0_i, noise, t), t, c_i)

with ``c_i`` the condition training gives the row (its own, dropped under ``bank.condition: null``).
A shard stores ``teacher_t`` (n, K) int64, ``teacher_seed`` (n, K) int64 and ``teacher_out``
(n, K, C_out, H, W) float32; a sample's draws are a function of its index alone, so the bank is the same
on any number of processes and after a resumed generation. Training picks one of the K draws per bank
row with the step's generator (:meth:`StoredTeacher.apply`), so a resumed run draws the same ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from difftune.backbones.conditioning import Conditioning
from difftune.errors import UserError
from difftune.io.mapped import MappedRows, rows
from difftune.objectives.base import Draw

if TYPE_CHECKING:
    from difftune.backbones.base import Backbone
    from difftune.backbones.loading import LoadedModel
    from difftune.config.experiment import ExperimentConfig
    from difftune.process import ForwardProcess
    from difftune.schedules.base import TimestepSchedule

SEED_OFFSET = 1 << 32  # keeps the draws' seeds clear of the samples' own (seed + i)
KEYS = ("teacher_t", "teacher_seed", "teacher_out")
RECORD = "teacher_draws"  # the manifest's field


def draw_noise(seeds: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The noise of each draw, (len(seeds), *shape): ``torch.randn(shape)`` from a generator seeded with it."""
    out = torch.empty((len(seeds), *shape))
    for row, seed in enumerate(seeds.tolist()):
        out[row] = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return out


@dataclass
class TeacherDraws:
    """How a bank's teacher draws are made: K, ξ (``schedule``), the process and the bank rows' condition.

    Attributes:
        draws: K, the draws per bank sample.
        schedule: ξ, the bank stream's timestep schedule as the objective builds it.
        uniform: draw t uniformly instead (``objective.realisation: weight``, which weights the loss by ξ).
        process: the model's forward process (noising and what the model is fed).
        condition: ``bank.condition`` (``null``: the rows' conditions are dropped, as training does).
        record: what the manifest says of the draws; a run's must equal it (:func:`check_stored`).
    """

    draws: int
    schedule: TimestepSchedule
    uniform: bool
    process: ForwardProcess
    condition: str
    record: dict[str, Any]

    def seeds(self, sample_seeds: torch.Tensor) -> torch.Tensor:
        """The seed of each draw of each sample, (n, K) int64."""
        return sample_seeds.long()[:, None] * self.draws + torch.arange(self.draws) + SEED_OFFSET

    def timesteps(self, seeds: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(t, noise)`` of the draws ``seeds`` (m,): the noise first, then t, from each draw's generator."""
        t, noise = torch.empty(len(seeds), dtype=torch.long), torch.empty((len(seeds), *shape))
        T = self.process.num_timesteps
        for row, seed in enumerate(seeds.tolist()):
            g = torch.Generator().manual_seed(seed)
            noise[row] = torch.randn(shape, generator=g)
            t[row] = torch.randint(0, T, (1,), generator=g) if self.uniform else self.schedule.sample(1, g)
        return t, noise

    @torch.no_grad()
    def make(
        self,
        backbone: Backbone,
        samples: torch.Tensor,
        cond: Conditioning,
        sample_seeds: torch.Tensor,
        device: torch.device | str,
        batch_size: int,
    ) -> dict[str, torch.Tensor]:
        """The stored tensors of a shard's ``samples`` (n, C, H, W) with their bank conditions and seeds."""
        n, K = samples.shape[0], self.draws
        if self.condition == "null":
            cond = backbone.drop(cond, torch.ones(n, dtype=torch.bool))
        seeds = self.seeds(sample_seeds)
        t, noise = self.timesteps(seeds.flatten(), tuple(samples.shape[1:]))
        owner = torch.arange(n).repeat_interleave(K)  # the sample of each draw, draws in order
        outs = []
        for part in torch.arange(n * K).split(batch_size * K):
            x0, ti = samples[owner[part]].to(device), t[part].to(device)
            x_t = self.process.noised(x0, noise[part].to(device), ti)
            out = backbone(*self.process.model_input(x_t, ti), cond.select(owner[part]).to(device))
            outs.append(out.float().cpu())
        out = torch.cat(outs)
        return {
            "teacher_t": t.view(n, K),
            "teacher_seed": seeds,
            "teacher_out": out.view(n, K, *out.shape[1:]),
        }


def teacher_draws(cfg: ExperimentConfig, loaded: LoadedModel) -> TeacherDraws | None:
    """The teacher draws ``cfg`` asks the bank to store, or ``None`` (``teacher: copy``)."""
    if not cfg.stores_teacher:
        return None
    from difftune.objectives import stream_schedule
    from difftune.schedules.ports import resolve_port

    process, density = loaded.forward_process(cfg.model.pretraining_density)
    objective = resolve_port(cfg.objective, process.name)
    name, K = objective.bank_schedule, objective.distillation.stored_draws
    record = {
        "draws": K,
        "schedule": name,
        "exponent": float(objective.exponent(name)),
        "offset": float(objective.offset(name)),
        "axis": objective.power.axis,
        "min_snr_gamma": float(objective.min_snr.gamma),
        "realisation": objective.realisation,
        "process": process.name,
        "pretraining_density": density,
        "condition": cfg.bank.condition,
        "seed_rule": f"(seed + i) * K + k + {SEED_OFFSET}",
        "dtype": "float32",
    }
    schedule = stream_schedule(objective, process, name)
    uniform = objective.realisation == "weight"
    return TeacherDraws(K, schedule, uniform, process, cfg.bank.condition, record)


def check_stored(manifest: dict[str, Any], wanted: dict[str, Any], path: str) -> None:
    """Refuse, in one line, a bank without stored teacher draws or with draws of other settings than
    ``wanted`` (the keys it gives: all of :attr:`TeacherDraws.record` at the start of a run, a few in a dry run).

    Raises:
        UserError: the message names the settings that differ and how to get a matching bank.
    """
    stored = manifest.get(RECORD)
    if not isinstance(stored, dict):
        raise UserError(
            f"bank {path} holds no stored teacher predictions, which objective.distillation.teacher=stored "
            "trains with: generate the bank with this config (`difftune bank`) at a new bank.path, or set "
            "objective.distillation.teacher=copy"
        )
    differ = sorted(key for key in wanted if stored.get(key) != wanted[key])
    if differ:
        theirs = ", ".join(f"{key}={stored.get(key)!r}" for key in differ)
        ours = ", ".join(f"{key}={wanted.get(key)!r}" for key in differ)
        raise UserError(
            f"bank {path} stores teacher draws made with {theirs}, this run asks for {ours}: regenerate the bank "
            "with this config (`difftune bank`), or give the run the bank's settings"
        )


@dataclass
class StoredTeacher:
    """A run's view of the bank's stored draws (rows aligned with the bank's samples).

    Attributes:
        out: the predictions (N, K, C_out, H, W), memory-mapped in training (read a batch at a time).
        t: the draws' timesteps (N, K).
        seeds: the draws' noise seeds (N, K).
    """

    out: torch.Tensor | MappedRows
    t: torch.Tensor
    seeds: torch.Tensor

    @property
    def draws(self) -> int:
        return int(self.t.shape[1])

    def split(self, keep: torch.Tensor) -> StoredTeacher:
        """The draws of the samples at indices ``keep``."""
        return StoredTeacher(rows(self.out, keep), self.t[keep], self.seeds[keep])

    def apply(
        self,
        draw: Draw,
        retained: torch.Tensor,
        generator: torch.Generator,
        read: Callable[[str, Any, torch.Tensor], torch.Tensor],
    ) -> Draw:
        """``draw`` with its bank rows (the last ``len(retained)``, bank samples ``retained``) at one of
        their stored draws, picked uniformly with ``generator``, and their stored predictions as
        :attr:`Draw.reference` (zeros on the target rows). ``read`` reads rows of ``out`` (prefetched)."""
        n = len(retained)
        n_target = len(draw.t) - n
        k = torch.randint(0, self.draws, (n,), generator=generator)
        chosen = self.seeds[retained, k]
        noise = draw_noise(chosen, tuple(draw.noise.shape[1:])).to(draw.noise.dtype)
        picked = read("bank/teacher_out", self.out, retained)[torch.arange(n), k].float()
        reference = torch.zeros((len(draw.t), *picked.shape[1:]))
        reference[n_target:] = picked
        t = torch.cat([draw.t[:n_target], self.t[retained, k]])
        return Draw(t, torch.cat([draw.noise[:n_target], noise]), draw.drop, draw.bank, reference)


def stored_teacher(bank: dict[str, Any]) -> StoredTeacher:
    """The stored draws of a loaded bank (:func:`~difftune.bank.generate.load_bank`)."""
    return StoredTeacher(bank["teacher_out"], bank["teacher_t"], bank["teacher_seed"])
