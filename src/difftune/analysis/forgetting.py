"""Chain-of-forgetting probes (docs/method.md §1).

* :func:`swap_probe`: sample with the fine-tuned model and hand the last fraction f of the reverse
  chain (the low-noise end) over to the pre-trained model; score each f with the same seeds. The
  paper finds the score flat for small f and worse and worse as f grows: transferability of the
  pre-trained denoiser decreases monotonically along the reverse process.
* :func:`transfer_gap`: the cheap probe, no sampling: the denoising loss (in the models' own
  parameterisation: epsilon-MSE for epsilon models, the velocity MSE for rectified flow, the MSE of
  EDM's F) of the pre-trained and the fine-tuned model on held-out target data, binned over t, with
  the same noise for both. With ``axis="log_snr"`` the bins are ranges of log-SNR shared by every
  process (:data:`LOG_SNR_EDGES`) and the loss is that of the implied x0 estimate: at equal log-SNR the
  noisy inputs of two processes differ only in scale, so these rows compare across processes.

Both work on every forward process: the sampler (its own steps, noisiest first) and the binned loss
(:func:`~difftune.process.build_process`) carry what the process is.
"""

from __future__ import annotations

import math
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
from difftune.process import build_process, process_name
from difftune.process.base import ForwardProcess
from difftune.sampling.generate import generate, handover_step
from difftune.schedules.binned_loss import Evaluation, binned_denoising_loss

DEFAULT_FRACTIONS = tuple(round(0.1 * i, 1) for i in range(11))
# inner edges of the log-SNR bins of transfer_gap(axis="log_snr"); the outer bins are open-ended. Every
# process difftune builds by default (DDPM linear: -10.1..9.2, flow at shift 1: -inf..13.8, EDM: -8.8..12.4)
# has indices in each of the 10 bins
LOG_SNR_EDGES = (-8.0, -6.0, -4.0, -2.0, 0.0, 2.0, 4.0, 6.0, 8.0)


def log_snr_bins(
    process: ForwardProcess, inner_edges: Sequence[float] = LOG_SNR_EDGES
) -> list[dict[str, Any]]:
    """The ranges of t whose log-SNR falls in each bin, from the highest log-SNR (least noise) down.

    Returns:
        ``[{"log_snr_high", "log_snr_low", "t_low", "t_high"}, ...]``: bin b holds the t with
        ``log_snr_low <= log-SNR(t) < log_snr_high`` (``None``: open-ended), ``t_low..t_high`` inclusive.
        Bins no index falls in are left out.
    """
    log_snr = process.log_snr()
    bounds = [math.inf, *sorted(inner_edges, reverse=True), -math.inf]
    rows = []
    for high, low in zip(bounds[:-1], bounds[1:], strict=True):
        inside = ((log_snr < high) & (log_snr >= low)).nonzero().flatten()
        if inside.numel():  # log-SNR falls with t, so the indices of a bin are a range
            rows.append(
                {
                    "log_snr_high": high if math.isfinite(high) else None,
                    "log_snr_low": low if math.isfinite(low) else None,
                    "t_low": int(inside[0]),
                    "t_high": int(inside[-1]),
                }
            )
    return rows


def step_log_snr(scheduler: SchedulerMixin, num_steps: int) -> list[float]:
    """The log-SNR of the sample each of ``num_steps`` sampling steps starts from, noisiest first: where
    a hand-over at each step begins, comparable across processes (a fraction of the steps is not: the
    last 10% of the demos' 25 steps starts at log-SNR 1.8 on DDPM's DPM-Solver++, 4.8 on flow's Euler
    and 8.8 on EDM's DPM-Solver++ over Karras' σ).

    Read from the scheduler's σ after ``set_timesteps``: ``−2·log σ`` for DDPM (σ² = (1 − ᾱ)/ᾱ) and EDM,
    ``2·log((1 − σ)/σ)`` for flow; a DDPM scheduler without σ (DDIM, ...) from ᾱ at its timesteps.
    """
    scheduler.set_timesteps(num_steps)
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is None:  # DDIM and its kin: the timesteps are indices of ᾱ
        alpha = scheduler.alphas_cumprod[scheduler.timesteps.long()].double()
        return (alpha / (1 - alpha)).log().tolist()
    sigma = torch.as_tensor(sigmas[:num_steps]).double()
    if process_name(dict(scheduler.config)) == "flow":
        return (2 * ((1 - sigma) / sigma).log()).tolist()
    return (-2 * sigma.log()).tolist()


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
        ``[{"fraction": f, "score": s, "handover_log_snr": λ}, ...]`` in the order of ``fractions``; λ is
        the log-SNR where the pre-trained model takes over (:func:`step_log_snr`; ``None`` for no hand-over
        or from pure noise).
    """
    if finetuned.sample_shape != pretrained.sample_shape:
        raise UserError(
            f"the models work on different shapes ({finetuned.sample_shape} vs {pretrained.sample_shape})"
        )
    if any(not 0.0 <= f <= 1.0 for f in fractions):
        raise UserError(f"hand-over fractions must be in [0, 1], got {list(fractions)}")
    out = []
    log_snr = step_log_snr(scheduler, num_inference_steps)  # where each step starts; the same for every f
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
        first = handover_step(num_inference_steps, f)
        start = log_snr[first] if first < num_inference_steps and math.isfinite(log_snr[first]) else None
        out.append({"fraction": float(f), "score": float(score(x)), "handover_log_snr": start})
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
    axis: str = "index",
) -> list[dict[str, float]]:
    """Per-bin denoising MSE of both models on held-out target data, with shared t and noise.

    For each of ``num_bins`` equal ranges of t (``axis="index"``), or each log-SNR bin of
    :func:`log_snr_bins` scored in x0 space (``axis="log_snr"``; ``num_bins`` is not read), every sample gets a t drawn uniformly within the
    range and fresh noise (``draws_per_bin`` times); both models see the same x_t. The fine-tuned
    model gets the target condition, the pre-trained model its unconditional form.

    Args:
        x0: held-out target samples in the diffusion space (N, C, H, W).
        cond: their target conditions (N).

    Returns:
        ``[{"t_low", "t_high", "pretrained", "finetuned", "gap", "ratio"}, ...]`` per bin (on the log-SNR
        axis also ``log_snr_high`` and ``log_snr_low``, least noisy bin first): gap = pre-trained
        loss minus fine-tuned loss, ratio = pre-trained loss / fine-tuned loss. The epsilon-MSE of any
        model shrinks as t grows, so the absolute gap shrinks too (other targets scale otherwise); the
        ratio is the scale-free view.

    Raises:
        UserError: an axis other than ``index`` or ``log_snr``.
    """
    if axis not in ("index", "log_snr"):
        raise UserError(f"transfer-gap axis {axis!r} is unknown: use 'index' or 'log_snr'")
    bins, edges = None, None
    if axis == "log_snr":
        bins = log_snr_bins(build_process(scheduler_config, tuple(x0.shape[1:])))
        edges = torch.tensor([b["t_low"] for b in bins] + [bins[-1]["t_high"] + 1])
    pre = Evaluation(pretrained, x0, pretrained.unconditional(x0.shape[0]))
    fine = Evaluation(finetuned, x0, cond)
    measured = binned_denoising_loss(
        (pre, fine),
        scheduler_config,
        num_bins,
        draws_per_bin,
        seed,
        batch_size,
        device,
        desc="transfer gap",
        edges=edges,
        x0_space=axis == "log_snr",
    )
    rows = []
    for b, (pre_loss, fine_loss) in enumerate(measured.losses.tolist()):
        rows.append(
            {
                **(bins[b] if bins is not None else {}),
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


def save_swap_probe(rows: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """Write the rows of :func:`swap_probe` with :func:`save_probe`, the score named ``fid``."""
    save_probe(
        [
            {"fraction": r["fraction"], "fid": r["score"], "handover_log_snr": r["handover_log_snr"]}
            for r in rows
        ],
        "fraction",
        ["fid"],
        path,
        "pre-trained model takes the last fraction f",
        "hand-over fraction f",
    )


def save_transfer_gap(rows: list[dict[str, Any]], axis: str, path: str | os.PathLike) -> None:
    """Write the rows of :func:`transfer_gap` on ``axis`` with :func:`save_probe`: each row gains where it
    sits on the axis (``t_mid``; ``log_snr_mid``, an open-ended bin 1 beyond its finite edge)."""
    if axis == "index":
        middle, rows = "t_mid", [{**r, "t_mid": (r["t_low"] + r["t_high"]) / 2} for r in rows]
    else:

        def centre(r: dict[str, Any]) -> float:
            high, low = r["log_snr_high"], r["log_snr_low"]
            return low + 1 if high is None else high - 1 if low is None else (high + low) / 2

        middle, rows = "log_snr_mid", [{**r, "log_snr_mid": centre(r)} for r in rows]
    space = "" if axis == "index" else " (x0 space)"
    xlabel = "t" if axis == "index" else "log-SNR"
    title = f"denoising loss on held-out target data{space}"
    save_probe(rows, middle, ["pretrained", "finetuned", "gap", "ratio"], path, title, xlabel)
