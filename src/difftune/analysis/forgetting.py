"""Chain-of-forgetting probes (docs/method.md §1).

* :func:`swap_probe`: sample with the fine-tuned model and hand the last fraction f of the reverse
  chain (the low-noise end) over to the pre-trained model; score each f with the same seeds. The
  paper finds the score flat for small f and worse and worse as f grows: transferability of the
  pre-trained denoiser decreases monotonically along the reverse process.
* :func:`transfer_gap`: the cheap probe, no sampling: the denoising loss (in the models' own
  parameterisation: epsilon-MSE for epsilon models) of the pre-trained and the fine-tuned model on
  held-out target data, binned over t, with the same noise for both.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, SchedulerMixin
from scipy.stats import spearmanr
from tqdm.auto import tqdm

from difftune.atomic import atomic_path, atomic_write_json
from difftune.backbones.base import Backbone
from difftune.backbones.conditioning import Conditioning
from difftune.errors import UserError
from difftune.objectives.prediction import Parameterisation
from difftune.sampling import generate

DEFAULT_FRACTIONS = tuple(round(0.1 * i, 1) for i in range(11))


def swap_probe(
    finetuned: Backbone,
    pretrained: Backbone,
    scheduler: SchedulerMixin,
    cond: Conditioning,
    seeds: Sequence[int],
    score: Callable[[torch.Tensor], float],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    guidance_scale: float = 1.0,
    num_inference_steps: int = 25,
    device: torch.device | str = "cpu",
) -> list[dict[str, float]]:
    """Score samples whose last ``f`` of the steps are denoised by the pre-trained model.

    Args:
        finetuned, pretrained: the two denoisers (same sample space).
        scheduler: the sampling scheduler.
        cond: target conditions (N) for the fine-tuned model (the pre-trained model gets its
            unconditional form).
        seeds: one seed per sample (N); the same for every fraction.
        score: diffusion-space samples (N, C, H, W) -> a number (e.g. decode + FID).
        fractions: the hand-over fractions f in [0, 1].

    Returns:
        ``[{"fraction": f, "score": s}, ...]`` in the order of ``fractions``.
    """
    if finetuned.sample_shape != pretrained.sample_shape:
        raise UserError(
            f"the models work on different shapes ({finetuned.sample_shape} vs {pretrained.sample_shape})"
        )
    if any(not 0.0 <= f <= 1.0 for f in fractions):
        raise UserError(f"hand-over fractions must be in [0, 1], got {list(fractions)}")
    out = []
    for f in tqdm(fractions, desc="swap probe"):
        x = generate(
            finetuned,
            scheduler,
            cond,
            seeds,
            guidance_scale,
            num_inference_steps,
            device,
            handover=pretrained,
            handover_fraction=f,
        )
        out.append({"fraction": float(f), "score": float(score(x))})
    return out


@torch.no_grad()
def transfer_gap(
    finetuned: Backbone,
    pretrained: Backbone,
    scheduler_config: dict[str, Any],
    x0: torch.Tensor,
    cond: Conditioning,
    num_bins: int = 10,
    draws_per_bin: int = 1,
    seed: int = 0,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> list[dict[str, float]]:
    """Per-bin denoising MSE of both models on held-out target data, with shared t and noise.

    For each of ``num_bins`` equal ranges of t, every sample gets a t drawn uniformly within the
    range and fresh noise (``draws_per_bin`` times); both models see the same x_t. The fine-tuned
    model gets the target condition, the pre-trained model its unconditional form.

    Args:
        x0: held-out target samples in the diffusion space (N, C, H, W).
        cond: their target conditions (N).

    Returns:
        ``[{"t_low", "t_high", "pretrained", "finetuned", "gap", "ratio"}, ...]`` per bin: gap = pre-trained
        loss minus fine-tuned loss, ratio = pre-trained loss / fine-tuned loss. The epsilon-MSE of any
        model shrinks as t grows, so the absolute gap shrinks too; the ratio is the scale-free view.
    """
    scheduler = DDPMScheduler.from_config(scheduler_config)
    parameterisation = Parameterisation(scheduler)
    T = scheduler.config.num_train_timesteps
    edges = torch.linspace(0, T, num_bins + 1).round().long()
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in tqdm(range(num_bins), desc="transfer gap"):
        lo, hi = int(edges[b]), int(edges[b + 1])
        sums = torch.zeros(2, dtype=torch.float64)
        count = 0
        for _ in range(draws_per_bin):
            t_all = torch.randint(lo, hi, (x0.shape[0],), generator=g)
            noise_all = torch.randn(x0.shape, generator=g)
            for idx in torch.arange(x0.shape[0]).split(batch_size):
                x, t, noise = x0[idx].to(device), t_all[idx].to(device), noise_all[idx].to(device)
                x_t = scheduler.add_noise(x, noise, t)
                target = parameterisation.target(x, noise, t).float()
                conds = (pretrained.unconditional(idx.numel(), device), cond.select(idx).to(device))
                C = x.shape[1]
                for k, (model, c) in enumerate(zip((pretrained, finetuned), conds, strict=True)):
                    pred = model(x_t, t, c)[:, :C].float()
                    sums[k] += (pred - target).pow(2).flatten(1).mean(1).double().sum().cpu()
                count += idx.numel()
        pre, fine = (sums / count).tolist()
        ratio = pre / fine if fine > 0 else float("inf")
        rows.append(
            {
                "t_low": lo,
                "t_high": hi - 1,
                "pretrained": pre,
                "finetuned": fine,
                "gap": pre - fine,
                "ratio": ratio,
            }
        )
    return rows


def monotonicity(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman rank correlation of ``ys`` with ``xs`` (1 = perfectly increasing)."""
    return float(spearmanr(xs, ys).statistic)


def save_probe(
    rows: list[dict[str, float]],
    x_key: str,
    y_keys: Sequence[str],
    path: str | os.PathLike,
    title: str,
    xlabel: str,
) -> None:
    """Write ``path`` (.json, with the Spearman correlation of each y with x) and a PNG plot beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    xs = [r[x_key] for r in rows]
    summary = {f"spearman_{k}": monotonicity(xs, [r[k] for r in rows]) for k in y_keys}
    atomic_write_json(path, {"rows": rows, **summary})
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key in y_keys:
        ax.plot(xs, [r[key] for r in rows], marker="o", label=key)
    ax.set(xlabel=xlabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path.with_suffix(".png")) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
