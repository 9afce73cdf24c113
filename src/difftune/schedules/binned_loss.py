"""The denoising loss of models on sets of samples, per bin of t, with the same t and noise for all.

One measurement, two uses: the chain-of-forgetting probe compares two models on the same samples
(:func:`~difftune.analysis.forgetting.transfer_gap`), and a data-driven schedule compares one model
on two sets of samples (:func:`~difftune.schedules.data_driven.fit_data_schedule`). Both need
common random numbers: every evaluation of a draw sees the same timesteps and the same noise, so
their difference is not drowned by the variance of the loss over t and noise.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from difftune.backbones.base import Backbone
from difftune.backbones.conditioning import Conditioning
from difftune.process import build_process
from difftune.schedules.base import timestep_bins


@dataclass
class Evaluation:
    """One model on one set of clean samples.

    Attributes:
        model: the denoiser (its mode, train or eval, is the caller's business).
        x0: clean samples in the diffusion space (N, C, H, W).
        cond: the condition each sample is evaluated with (N).
    """

    model: Backbone
    x0: torch.Tensor
    cond: Conditioning


@dataclass
class BinnedLoss:
    """What :func:`binned_denoising_loss` measured.

    Attributes:
        edges: bin b holds ``edges[b] <= t < edges[b + 1]`` (num_bins + 1,).
        losses: mean denoising MSE per bin and evaluation (num_bins, E), float64.
        per_draw: the same per draw (num_bins, draws_per_bin, E), for standard errors.
        forward_passes: model calls made (all evaluations together).
        seconds: wall-clock time of the measurement.
    """

    edges: torch.Tensor
    losses: torch.Tensor
    per_draw: torch.Tensor
    forward_passes: int
    seconds: float


@torch.no_grad()
def binned_denoising_loss(
    evaluations: Sequence[Evaluation],
    scheduler_config: dict[str, Any],
    num_bins: int,
    draws_per_bin: int = 1,
    seed: int = 0,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    rows_per_draw: int | None = None,
    desc: str = "denoising loss",
    edges: torch.Tensor | None = None,
    x0_space: bool = False,
    progress: bool = True,
) -> BinnedLoss:
    """Mean denoising MSE (in the model's own parameterisation) of each evaluation per bin of t.

    Each bin has ``draws_per_bin`` draws; a draw takes ``rows_per_draw`` rows of every evaluation
    (the next ones of its set, cycling: draw k takes rows ``k*n .. k*n + n - 1`` modulo the set's
    size), gives row i the timestep ``t_i`` (uniform within the bin) and the noise ``noise_i``,
    the same for every evaluation, and scores the model's output (its first C channels, without a
    learned variance) against the regression target of its prediction type.

    Args:
        evaluations: the (model, samples, conditions) to measure; all samples of one shape.
        scheduler_config: the models' noise schedule (a diffusers scheduler config).
        num_bins: equal ranges of t (:func:`~difftune.schedules.base.timestep_bins`).
        draws_per_bin: draws per bin.
        seed: seed of the timesteps and the noise.
        batch_size: rows per model call.
        device: where the models run.
        rows_per_draw: rows per draw; ``None``: the smallest set's size.
        edges: bin b is ``edges[b] <= t < edges[b + 1]`` (increasing, from 0 to T); ``None``: ``num_bins``
            equal ranges. Bins of equal log-SNR width are ranges of t too, since log-SNR falls with t.
        x0_space: score the squared error of the implied x0 estimate instead of the raw output's (the raw
            error times the process's ``x0_factor``), which compares across processes at equal log-SNR.
        progress: show a progress bar over the bins.
    """
    start = time.perf_counter()
    process = build_process(scheduler_config, tuple(evaluations[0].x0.shape[1:]))
    edges = timestep_bins(process.num_timesteps, num_bins) if edges is None else edges
    num_bins = len(edges) - 1
    factor = process.x0_factor() if x0_space else torch.ones(process.num_timesteps, dtype=torch.float64)
    n = rows_per_draw or min(e.x0.shape[0] for e in evaluations)
    shape = tuple(evaluations[0].x0.shape[1:])
    g = torch.Generator().manual_seed(seed)
    losses = torch.zeros(num_bins, len(evaluations), dtype=torch.float64)
    per_draw = torch.zeros(num_bins, draws_per_bin, len(evaluations), dtype=torch.float64)
    calls = draw = 0
    for b in tqdm(range(num_bins), desc=desc, disable=not progress):
        lo, hi = int(edges[b]), int(edges[b + 1])
        for d in range(draws_per_bin):
            t_all = torch.randint(lo, hi, (n,), generator=g)
            noise_all = torch.randn((n, *shape), generator=g)
            for part in torch.arange(n).split(batch_size):
                t, noise = t_all[part].to(device), noise_all[part].to(device)
                for k, e in enumerate(evaluations):
                    rows = (draw * n + part) % e.x0.shape[0]
                    x = e.x0[rows].to(device)
                    x_in, time_in = process.model_input(process.noised(x, noise, t), t)
                    target = process.target(x, noise, t).float()
                    pred = e.model(x_in, time_in, e.cond.select(rows).to(device))[:, : x.shape[1]].float()
                    squared = (pred - target).pow(2).flatten(1).mean(1).double().cpu()
                    total = (squared * factor[t.cpu()]).sum()
                    losses[b, k] += total
                    per_draw[b, d, k] += total
                    calls += 1
            draw += 1
    losses /= draws_per_bin * n
    return BinnedLoss(edges, losses, per_draw / n, calls, time.perf_counter() - start)
