"""Gaussian densities the variational bound is made of (Ho et al. 2020, §3.3 and eq. (5)).

Everything is elementwise and in nats; `mean_flat_bits` reduces to bits/dim per sample.
"""

from __future__ import annotations

import math

import torch

LOG2 = math.log(2.0)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, mean, log_scale, levels: int):
    """log p(x) of data with ``levels`` evenly spaced values in [−1, 1] under N(mean, e^{2 log_scale}).

    L_0 of eq. (13): each value owns the bin [x − δ, x + δ] with δ = 1/(levels − 1), and the
    outermost bins extend to ∓∞ so the probabilities of all bins sum to 1.
    """
    half_bin = 1.0 / (levels - 1)
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (x - mean + half_bin)
    lower = inv_std * (x - mean - half_bin)
    log_cdf_upper = torch.special.log_ndtr(upper)  # log Φ(upper): the lowest bin, (−∞, x + δ]
    log_sf_lower = torch.special.log_ndtr(-lower)  # log (1 − Φ(lower)): the highest bin, [x − δ, ∞)
    # Φ(upper) − Φ(lower) = Φ(−lower) − Φ(−upper): take the side away from the tail, with Φ from
    # erfc in float64 — float32 ndtr is (1 + erf)/2, which loses every bin below ~1e-7.
    upper64, lower64 = upper.double(), lower.double()
    mid = torch.where(lower64 > 0, _cdf(-lower64) - _cdf(-upper64), _cdf(upper64) - _cdf(lower64))
    log_mid = torch.log(mid.clamp(min=1e-12)).to(x.dtype)
    return torch.where(x < -1 + half_bin, log_cdf_upper, torch.where(x > 1 - half_bin, log_sf_lower, log_mid))


def _cdf(z: torch.Tensor) -> torch.Tensor:
    """Φ(z) = erfc(−z/√2)/2, accurate in the lower tail."""
    return 0.5 * torch.special.erfc(-z / math.sqrt(2.0))


def mean_flat_bits(nats: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dimension, converted from nats to bits: bits/dim per sample."""
    return nats.mean(dim=tuple(range(1, nats.ndim))) / LOG2
