"""Condition fidelity: how closely the control re-extracted from generated images matches the input.

Both controls are ``(N, C, H, W)`` tensors in [0, 1] made by the same annotator (e.g. Canny edge maps,
replicated on 3 channels). Three scores per sample:

- ``mse``: the mean squared difference over all pixels and channels (for binary maps, the fraction of
  pixels that disagree); lower is better.
- ``ssim``: structural similarity (torchmetrics, Gaussian 11x11 window, ``data_range=1``); higher is
  better. ``dssim = (1 - ssim) / 2`` is the matching dissimilarity, in [0, 1].
- ``edge_f1``: for binary edge maps (channel 0, thresholded at 0.5), the F1 score of the generated edges
  against the input edges, where an edge pixel counts as matched if an edge pixel of the other map lies
  within ``edge_tolerance`` pixels (Chebyshev distance); higher is better.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from difftune.errors import UserError

__all__ = ["condition_fidelity", "edge_f1", "per_sample_fidelity"]


def _check_controls(generated: torch.Tensor, reference: torch.Tensor) -> None:
    """Refuse controls whose shapes differ or are not ``(N, C, H, W)``."""
    if generated.shape != reference.shape:
        raise UserError(
            f"generated control {tuple(generated.shape)} and input control {tuple(reference.shape)} "
            "differ in shape; annotate images of the condition's size"
        )
    if generated.ndim != 4:
        raise UserError(f"controls must be (N, C, H, W), got shape {tuple(generated.shape)}")


def _dilate(mask: torch.Tensor, tolerance: int) -> torch.Tensor:
    """``mask`` ``(N, 1, H, W)`` grown by ``tolerance`` pixels in every direction (a square window)."""
    if tolerance == 0:
        return mask
    grown = F.max_pool2d(mask.float(), kernel_size=2 * tolerance + 1, stride=1, padding=tolerance)
    return grown > 0


def edge_f1(generated: torch.Tensor, reference: torch.Tensor, tolerance: int = 1) -> torch.Tensor:
    """Per-sample F1 ``(N,)`` of the edges of ``generated`` against those of ``reference``.

    Precision is the fraction of generated edge pixels within ``tolerance`` pixels of a reference edge
    pixel; recall the fraction of reference edge pixels within ``tolerance`` of a generated one. F1 is
    their harmonic mean: 1 when both maps are empty, 0 when exactly one is.

    Raises:
        UserError: the shapes differ, or ``tolerance`` is negative.
    """
    _check_controls(generated, reference)
    if tolerance < 0:
        raise UserError(f"edge tolerance must be >= 0 pixels, got {tolerance}")
    pred = generated[:, :1].to(reference.device) > 0.5
    true = reference[:, :1] > 0.5
    n_pred, n_true = pred.sum((1, 2, 3)).double(), true.sum((1, 2, 3)).double()
    precision = (pred & _dilate(true, tolerance)).sum((1, 2, 3)) / n_pred.clamp(min=1)
    recall = (true & _dilate(pred, tolerance)).sum((1, 2, 3)) / n_true.clamp(min=1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    f1 = torch.where((n_pred == 0) != (n_true == 0), 0.0, f1)
    return torch.where((n_pred == 0) & (n_true == 0), 1.0, f1).float()


def per_sample_fidelity(
    generated_control: torch.Tensor, input_control: torch.Tensor, edge_tolerance: int = 1
) -> dict[str, torch.Tensor]:
    """The scores of each sample: ``mse``, ``ssim``, ``dssim`` and ``edge_f1``, each a tensor ``(N,)``.

    Args:
        generated_control: the control annotated from the generated images, ``(N, C, H, W)`` in [0, 1].
        input_control: the control the images were generated from, same shape.
        edge_tolerance: how many pixels a matched edge may be off by, for ``edge_f1``.

    Raises:
        UserError: the shapes differ or are not 4-D, or ``edge_tolerance`` is negative.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    _check_controls(generated_control, input_control)
    generated = generated_control.detach().float().to(input_control.device)
    reference = input_control.detach().float()
    ssim = structural_similarity_index_measure(generated, reference, data_range=1.0, reduction="none")
    return {
        "mse": ((generated - reference) ** 2).mean((1, 2, 3)),
        "ssim": ssim,
        "dssim": (1 - ssim) / 2,
        "edge_f1": edge_f1(generated, reference, edge_tolerance),
    }


def condition_fidelity(
    generated_control: torch.Tensor, input_control: torch.Tensor, edge_tolerance: int = 1
) -> dict[str, float]:
    """The batch means of :func:`per_sample_fidelity`: ``mse``, ``ssim``, ``dssim`` and ``edge_f1``.

    Raises:
        UserError: the shapes differ or are not 4-D, or ``edge_tolerance`` is negative.
    """
    scores = per_sample_fidelity(generated_control, input_control, edge_tolerance)
    return {name: float(values.mean()) for name, values in scores.items()}
