"""Chain-of-forgetting probes (docs/method.md §1).

* :func:`swap_probe`: sample with the fine-tuned model and hand the last fraction f of the reverse
  chain (the low-noise end) over to the pre-trained model; score each f with the same seeds. The
  paper finds the score flat for small f and worse and worse as f grows: transferability of the
  pre-trained denoiser decreases monotonically along the reverse process.
* :func:`transfer_gap`: the cheap probe, no sampling: the denoising loss (in the models' own
  parameterisation: epsilon-MSE for epsilon models, the velocity MSE for rectified flow, the MSE of
  EDM's F) of the pre-trained and the fine-tuned model on held-out target data, binned over t, with
  the same noise for both.

Both work on every forward process: the sampler (its own steps, noisiest first) and the binned loss
(:func:`~difftune.process.build_process`) carry what the process is.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import SchedulerMixin
from scipy.stats import spearmanr
from tqdm.auto import tqdm

from difftune.backbones.base import Backbone
from difftune.backbones.conditioning import Conditioning
from difftune.errors import UserError
from difftune.io.atomic import atomic_path, atomic_write_json
from difftune.sampling.generate import generate
from difftune.schedules.binned_loss import Evaluation, binned_denoising_loss

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
        model shrinks as t grows, so the absolute gap shrinks too (other targets scale otherwise); the
        ratio is the scale-free view.
    """
    pre = Evaluation(pretrained, x0, pretrained.unconditional(x0.shape[0]))
    fine = Evaluation(finetuned, x0, cond)
    measured = binned_denoising_loss(
        (pre, fine), scheduler_config, num_bins, draws_per_bin, seed, batch_size, device, desc="transfer gap"
    )
    rows = []
    for b, (pre_loss, fine_loss) in enumerate(measured.losses.tolist()):
        rows.append(
            {
                "t_low": int(measured.edges[b]),
                "t_high": int(measured.edges[b + 1]) - 1,
                "pretrained": pre_loss,
                "finetuned": fine_loss,
                "gap": pre_loss - fine_loss,
                "ratio": pre_loss / fine_loss if fine_loss > 0 else float("inf"),
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
