"""The variational-bound term that trains learned variance channels (improved DDPM, DiT).

DiT predicts, besides epsilon, per-pixel values v in [-1, 1] that interpolate the log variance of
p(x_{t-1} | x_t) between the posterior's clipped log variance and log beta_t (Nichol & Dhariwal,
2021, "Improved Denoising Diffusion Probabilistic Models", eq. 15). DiT (and the Diff-Tuning code)
adds the KL term L_vb for those channels with the mean prediction detached, so it trains only
the variance. Values are in bits per dimension.
"""

from __future__ import annotations

import math

import torch


def _gather(table: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """table[t] reshaped to (N, 1, ..., 1) for broadcasting against an ndim tensor."""
    return table[t].view(-1, *([1] * (ndim - 1)))


def normal_kl(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    # the tanh approximation of the normal CDF used by the reference implementations
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor
) -> torch.Tensor:
    """Elementwise log-likelihood of data in [-1, 1] quantised to 256 bins under N(mean, exp(log_scale)^2)."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class VariationalBound:
    """Per-sample L_vb for a model with learned-range variance, from a DDPM beta schedule.

    Args:
        betas: (T,) the noise schedule's betas (the DDPM scheduler's ``betas``).
    """

    def __init__(self, betas: torch.Tensor) -> None:
        betas = betas.double()
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, 0)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        posterior_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        # posterior variance is 0 at t = 0; clip it to the t = 1 value before the log
        self.posterior_logvar = torch.log(torch.cat([posterior_var[1:2], posterior_var[1:]])).float()
        self.log_betas = torch.log(betas).float()
        self.coef_x0 = (betas * abar_prev.sqrt() / (1.0 - abar)).float()
        self.coef_xt = ((1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar)).float()

    def to(self, device: torch.device | str) -> VariationalBound:
        """Move the tables to ``device`` (once, rather than at every call)."""
        for name in ("posterior_logvar", "log_betas", "coef_x0", "coef_xt"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def __call__(
        self,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        pred_x0: torch.Tensor,
        var_values: torch.Tensor,
    ) -> torch.Tensor:
        """L_vb per sample, bits/dim, shape (N,).

        Args:
            x0: clean samples (N, C, H, W).
            x_t: noised samples (N, C, H, W).
            t: integer timesteps (N,).
            pred_x0: the model's x0 estimate (N, C, H, W); pass it detached to train only the variance.
            var_values: the model's variance channels in [-1, 1] (N, C, H, W).
        """
        nd = x0.ndim
        if self.log_betas.device != t.device:
            self.to(t.device)
        coef_x0, coef_xt = _gather(self.coef_x0, t, nd), _gather(self.coef_xt, t, nd)
        min_log = _gather(self.posterior_logvar, t, nd)
        max_log = _gather(self.log_betas, t, nd)
        frac = (var_values.float() + 1.0) / 2.0
        model_logvar = frac * max_log + (1.0 - frac) * min_log
        model_mean = coef_x0 * pred_x0.float() + coef_xt * x_t.float()
        true_mean = coef_x0 * x0.float() + coef_xt * x_t.float()
        kl = normal_kl(true_mean, min_log, model_mean, model_logvar).flatten(1).mean(1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0.float(), model_mean, 0.5 * model_logvar)
        nll = nll.flatten(1).mean(1) / math.log(2.0)
        return torch.where(t == 0, nll, kl)
