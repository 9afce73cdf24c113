"""Analysis tools: chain-of-forgetting probes for trained models and an analytic Gaussian-mixture check."""

# The analytic gap functions get a prefix here: `forgetting.transfer_gap` is the probe of real models.
from difftune.analysis.gaussian import (
    GAP_SPACES,
    GaussianMixture,
    ddpm_alphas_cumprod,
    is_monotone_increasing,
    noised_kl,
    optimal_eps,
    optimal_score,
    optimal_x0,
    random_gmm,
    single_gaussian_x0_gap,
)
from difftune.analysis.gaussian import transfer_gap as gaussian_transfer_gap
from difftune.analysis.gaussian import transfer_gaps as gaussian_transfer_gaps

__all__ = [
    "GAP_SPACES",
    "GaussianMixture",
    "ddpm_alphas_cumprod",
    "gaussian_transfer_gap",
    "gaussian_transfer_gaps",
    "is_monotone_increasing",
    "noised_kl",
    "optimal_eps",
    "optimal_score",
    "optimal_x0",
    "random_gmm",
    "single_gaussian_x0_gap",
]
