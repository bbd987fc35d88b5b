"""The Triton launchers with the signatures of the `fastddpm::*` torch operators.

Drop-in for `fastddpm.ops._register(module, "cuda")`, like `kernels.native`: each function
takes the operator's arguments (already checked by `fastddpm.ops`) and returns what the
operator returns. The noise coordinates come from ``key`` (int64 [seed, sample_base, step] on
the device), which the kernels load themselves: no host sync, no recompile, CUDA-graph safe.
"""

from __future__ import annotations

from . import eps_loss as _eps_loss
from . import q_sample as _q_sample
from . import reverse_step as _reverse_step
from . import vlb_terms as _vlb_terms


def q_sample(x0, t, table, noise, key):
    return _q_sample.q_sample(x0, t, table, noise, key=key)


def reverse_step(x_t, model_out, t, table, noise, key, prediction, variance, clip_denoised, eta):
    return _reverse_step.reverse_step(x_t, model_out, t, table, noise, key=key, prediction=prediction,
                                      variance=variance, clip_denoised=clip_denoised, eta=eta)


def eps_loss(pred, x0, t, table, noise, key, prediction):
    """(per-sample MSE [B], d MSE_b / d pred = 2 (pred − target) / N, float32, x0's shape)."""
    return _eps_loss.eps_loss(pred, x0, t, table, None, noise, key=key, prediction=prediction,
                              grad_scale=1.0 / x0[0].numel())


def vlb_terms(model_out, x0, x_t, t, table, prediction, variance, clip_denoised, levels):
    return _vlb_terms.vlb_terms(model_out, x0, x_t, t, table, prediction=prediction, variance=variance,
                                clip_denoised=clip_denoised, levels=levels)
