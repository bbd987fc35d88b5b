"""The Fréchet distance between the Gaussian fits of two feature sets (Heusel et al. 2017, FID).

For N(μ1, Σ1) and N(μ2, Σ2) it is (their eq. (6), the squared 2-Wasserstein distance)

    d² = ‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^{1/2}).

Σ1 Σ2 is not symmetric, but it has the eigenvalues of √Σ1 Σ2 √Σ1 = A Aᵀ, A = √Σ1 √Σ2, which
is symmetric positive semi-definite: Tr((Σ1 Σ2)^{1/2}) is the sum of the square roots of its
eigenvalues, that is of the singular values of A. Those are taken from A itself: an eigenvalue
of A Aᵀ near 0 is found only to ±ε‖A‖², and its square root to ±√ε‖A‖, while a singular value
is found to ±ε‖A‖ (for the held-out digits against themselves, d² = −3e-6 by the eigenvalues
and 7e-13 by the singular values). The square roots of Σ1 and Σ2 come from `eigh`, with
rounding's tiny negative eigenvalues clamped to 0; everything is float64. The estimate from N
samples is biased upwards by O(1/N): compare distances only at equal numbers of samples.
"""

from __future__ import annotations

import torch

_F64 = torch.float64


def check_features(name: str, x, min_rows: int = 2) -> torch.Tensor:
    """``x`` as a float64 [N, D] tensor, or a one-line ValueError naming ``name``."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = getattr(x, "dtype", type(x).__name__)
        raise ValueError(f"{name} must be a float tensor [N, D] of features, got {got}")
    if x.ndim != 2 or x.shape[0] < min_rows or x.shape[1] < 1:
        raise ValueError(f"{name} must have shape [N, D] with N >= {min_rows}, got {tuple(x.shape)}")
    x = x.detach().to("cpu", _F64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} has non-finite values")
    return x


def gaussian_fit(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and unbiased covariance [D, D] (divided by N − 1, as FID), float64."""
    x = check_features("features", features)
    mu = x.mean(0)
    centred = x - mu
    return mu, centred.T @ centred / (x.shape[0] - 1)


def frechet_distance_gaussians(mu1, sigma1, mu2, sigma2) -> float:
    """d² between N(mu1, sigma1) and N(mu2, sigma2) (module docstring), in float64."""
    mu1, sigma1, mu2, sigma2 = (torch.as_tensor(t, dtype=_F64) for t in (mu1, sigma1, mu2, sigma2))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        shapes = ", ".join(str(tuple(t.shape)) for t in (mu1, sigma1, mu2, sigma2))
        raise ValueError(f"means must be [D] and covariances [D, D] for one D, got {shapes}")
    trace_sqrt = torch.linalg.svdvals(_sqrtm_psd(sigma1) @ _sqrtm_psd(sigma2)).sum()  # Tr((Σ1 Σ2)^½)
    d2 = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt
    return max(d2.item(), 0.0)  # d² ≥ 0; equal fits give rounding's ±1e-15 · Tr Σ


def _sqrtm_psd(sigma: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a covariance matrix."""
    w, v = torch.linalg.eigh((sigma + sigma.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """d² between the Gaussian fits of features ``a`` [N, D] and ``b`` [M, D]."""
    a, b = check_features("a", a), check_features("b", b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must have the same feature size, got {a.shape[1]} and {b.shape[1]}")
    return frechet_distance_gaussians(*gaussian_fit(a), *gaussian_fit(b))
