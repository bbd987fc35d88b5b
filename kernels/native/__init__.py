"""Host launchers of the native CPU kernels (`fastddpm._native`, built from this folder).

Each takes the operator's tensors (already checked by `fastddpm.ops`), passes their buffers
to the C++ kernel and returns new tensors. Inputs must be float32 except the model output
(float32/float16/bfloat16); images are made contiguous per sample where they are not.
"""

from __future__ import annotations

import torch

from fastddpm import _native, reference, rng
from fastddpm.schedule import Coefficients

if tuple(_native.row_names()) != Coefficients.row_names():
    raise ImportError("fastddpm._native was built for another Coefficients row order; rebuild it (pip install .)")

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _per_sample_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``x`` (a model output or its mean half) with each sample contiguous, and its batch stride."""
    if x.shape[0] == 0:
        return x, 0
    if x.is_contiguous():  # the common case, without making the view x[0] (~1 µs)
        return x, x.stride(0)
    contiguous_rows = x[0].is_contiguous() and x.stride(0) >= x[0].numel()
    x = x if contiguous_rows else x.contiguous()
    return x, x.stride(0)


def _noise_ptr(noise: torch.Tensor | None) -> tuple[torch.Tensor | None, int]:
    if noise is None:
        return None, 0
    noise = noise.contiguous()
    return noise, noise.data_ptr()


def _sizes(x: torch.Tensor, table: torch.Tensor) -> tuple[int, int, int]:
    return table.shape[1], x.shape[0], x.numel() // x.shape[0] if x.shape[0] else 0


def q_sample(x0, t, table, noise, key):
    x0 = x0.contiguous()
    out = torch.empty_like(x0)
    noise, noise_ptr = _noise_ptr(noise)
    T, B, N = _sizes(x0, table)
    seed, sample_base, step = rng.unpack_key(key)
    _native.q_sample(out.data_ptr(), x0.data_ptr(), t.data_ptr(), table.data_ptr(), T, B, N, noise_ptr,
                     seed, sample_base, step)
    return out


def reverse_step(x_t, model_out, t, table, noise, key, prediction, variance, clip_denoised, eta):
    x_t = x_t.contiguous()
    model_out, model_stride = _per_sample_rows(model_out)
    out = torch.empty_like(x_t)
    noise, noise_ptr = _noise_ptr(noise)
    T, B, N = _sizes(x_t, table)
    seed, sample_base, _ = rng.unpack_key(key)
    _native.reverse_step(out.data_ptr(), x_t.data_ptr(), model_out.data_ptr(), _DTYPES[model_out.dtype],
                         model_stride, t.data_ptr(), table.data_ptr(), T, B, N, noise_ptr, seed, sample_base,
                         reference.PREDICTIONS.index(prediction), reference.VARIANCES.index(variance),
                         clip_denoised, eta is not None, 0.0 if eta is None else eta)
    return out


def eps_loss(pred, x0, t, table, noise, key, prediction):
    x0 = x0.contiguous()
    pred, pred_stride = _per_sample_rows(pred)
    per_sample = x0.new_empty(x0.shape[0])
    gradient = torch.empty_like(x0)
    noise, noise_ptr = _noise_ptr(noise)
    T, B, N = _sizes(x0, table)
    seed, sample_base, step = rng.unpack_key(key)
    # grad_scale B turns d(mean_b MSE_b)/d pred into d MSE_b / d pred = 2 (pred − target) / N
    _native.eps_loss(per_sample.data_ptr(), gradient.data_ptr(), pred.data_ptr(), _DTYPES[pred.dtype], pred_stride,
                     x0.data_ptr(), t.data_ptr(), table.data_ptr(), T, B, N, noise_ptr, seed, sample_base, step,
                     reference.PREDICTIONS.index(prediction), 0, float(B))
    return per_sample, gradient


def vlb_terms(model_out, x0, x_t, t, table, prediction, variance, clip_denoised, levels):
    x0, x_t = x0.contiguous(), x_t.contiguous()
    model_out, model_stride = _per_sample_rows(model_out)
    out = x0.new_empty(x0.shape[0])
    T, B, N = _sizes(x0, table)
    _native.vlb_terms(out.data_ptr(), model_out.data_ptr(), _DTYPES[model_out.dtype], model_stride,
                      x0.data_ptr(), x_t.data_ptr(), t.data_ptr(), table.data_ptr(), T, B, N,
                      reference.PREDICTIONS.index(prediction), reference.VARIANCES.index(variance),
                      clip_denoised, levels)
    return out
