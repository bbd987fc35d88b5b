"""@triton.jit helpers shared by the op kernels: coefficient gathers and the reverse-process math
of `fastddpm.reference` (x̂_0, clipping, the learned_range log-variance), all in float32."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def coef(table_ptr, T, t, ROW: tl.constexpr):
    """table[ROW, t]: one per-sample scalar of the [R, T] coefficient table."""
    return tl.load(table_ptr + ROW * T + t)


@triton.jit
def predict_x0(x, p, sra, srm1, sa, s1ma, PREDICTION: tl.constexpr, CLIP: tl.constexpr):
    """x̂_0 from the network's ε (0), x_0 (1) or v (2) prediction ``p``; clamped to [−1, 1] with CLIP."""
    if PREDICTION == 0:
        px0 = sra * x - srm1 * p
    elif PREDICTION == 1:
        px0 = p
    else:
        px0 = sa * x - s1ma * p
    if CLIP:
        px0 = tl.minimum(tl.maximum(px0, -1.0, propagate_nan=tl.PropagateNan.ALL), 1.0,
                         propagate_nan=tl.PropagateNan.ALL)
    return px0


@triton.jit
def learned_log_variance(v, log_beta, log_posterior_var):
    """Nichol & Dhariwal eq. (15): frac log β_t + (1 − frac) log β̃_t with frac = (v + 1)/2."""
    frac = (v + 1.0) * 0.5
    return frac * log_beta + (1.0 - frac) * log_posterior_var
