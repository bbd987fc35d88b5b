"""simple_loss: L_simple per sample, MSE_b = mean ‖target − prediction‖² — eq. (14), fused.

    torch.ops.fastddpm.simple_loss(pred, x0, t, table, noise, key, prediction) -> (MSE [B], gradient)

The target (ε, x_0, or v = √ᾱ_t ε − √(1 − ᾱ_t) x_0) is rebuilt in the kernel: ε is ``noise``,
or regenerated from the noise contract at (seed, sample_base + b, step, STREAM_TRAIN), where
`q_sample` drew it from the same key, so it is never stored. pred: the mean-prediction part of
the model output (x0's shape; float32, float16 or bfloat16; any batch stride, dense or
channels-last samples). The second output is d MSE_b / d pred = 2 (pred − target) / N in
float32, written in the same pass and kept for the backward (storing it beat regenerating the
target there on the CPU: benchmarks' train_loss rows). Per-sample sums are deterministic:
per-block partial sums, then a fixed-order sum, no atomics.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastddpm import options, reference, rng
from fastddpm.schedule import Coefficients

from . import checks, library
from . import triton_common as tc
from .triton_common import HAS_TRITON, tl, triton

NAME = "simple_loss"


def check(pred, x0, t, table, noise, key, prediction) -> torch.dtype:
    """The images' dtype, once every argument is checked."""
    checks.choices(NAME, prediction)
    dtype = checks.images(NAME, x0=x0, noise=noise).dtype
    checks.model_output(NAME, pred, x0, learned=False, name="pred")
    checks.timesteps_and_table(NAME, t, table, x0)
    if prediction != "x0":  # the x0 target needs no ε
        checks.key(NAME, key, noise, x0)
    return dtype


def reference_simple_loss(
    pred: Tensor, x0: Tensor, t: Tensor, table: Tensor, noise: Optional[Tensor], key: Optional[Tensor], prediction: str
) -> tuple[Tensor, Tensor]:
    if noise is None:
        noise = rng.normal_at_key(key, x0, rng.STREAM_TRAIN) if key is not None else torch.zeros_like(x0)
    coef = Coefficients.from_table(table)
    _, per_sample = reference.simple_loss(pred, x0, noise, t, coef, prediction=prediction)
    target = reference.prediction_target(x0, noise, t, coef, prediction)
    return per_sample, (2.0 / library.per_sample_numel(x0)) * (pred.to(target.dtype) - target)


# ---- native (CPU) -------------------------------------------------------------------------


def native_simple_loss(pred, x0, t, table, noise, key, prediction):
    x0, t, table = x0.contiguous(), t.contiguous(), table.contiguous()
    pred = pred if library.dense_rows(pred) else pred.contiguous()
    per_sample = x0.new_empty(x0.shape[0])
    gradient = torch.empty_like(x0)
    noise = None if noise is None else noise.contiguous()
    seed, sample_base, step = rng.unpack_key(key) if key is not None and noise is None else (0, 0, 0)
    library.native.simple_loss(
        per_sample.data_ptr(), gradient.data_ptr(), pred.data_ptr(), options.code(pred.dtype, options.MODEL_DTYPES),
        library.batch_stride(pred), x0.data_ptr(), t.data_ptr(), table.data_ptr(), table.shape[1], x0.shape[0],
        library.per_sample_numel(x0), 0 if noise is None else noise.data_ptr(), seed, sample_base, step,
        options.code(prediction, options.PREDICTIONS))
    return per_sample, gradient


# ---- Triton (CUDA) ------------------------------------------------------------------------


@triton.jit
def _simple_loss_kernel(
    pred_ptr, x0_ptr, t_ptr, table_ptr, noise_ptr, key_ptr, grad_ptr, partial_ptr,
    N, Q, T, blocks, p_stride_b, HW, p_stride_c, p_stride_p,
    PREDICTION: tl.constexpr, HAS_NOISE: tl.constexpr, STRIDED: tl.constexpr, BLOCK_G: tl.constexpr,
):
    b, g = tc.sample_and_groups(blocks, BLOCK_G)
    row = b.to(tl.int64) * N
    p_row = b.to(tl.int64) * p_stride_b
    if PREDICTION == tc.V:
        t, ok = tc.timestep(t_ptr, b, T)
        sa = tc.coef(table_ptr, T, t, ok, tc.ROW_SQRT_ALPHAS_CUMPROD)
        s1ma = tc.coef(table_ptr, T, t, ok, tc.ROW_SQRT_ONE_MINUS_ALPHAS_CUMPROD)
    drawn = tc.draw_normals(key_ptr, b, 0, g, tc.TRAIN, not HAS_NOISE and PREDICTION != tc.X0)
    total = 0.0
    for j in tl.static_range(4):
        e, mask, z = tc.quarter_and_noise(j, g, N, Q, noise_ptr + row, drawn, HAS_NOISE and PREDICTION != tc.X0)
        x0 = tl.load(x0_ptr + row + e, mask=mask, other=0.0)
        p = tl.load(pred_ptr + p_row + tc.model_offsets(e, HW, p_stride_c, p_stride_p, STRIDED), mask=mask,
                    other=0.0).to(tl.float32)
        if PREDICTION == tc.X0:
            target = x0
        elif PREDICTION == tc.EPS:
            target = z
        else:
            target = sa * z - s1ma * x0  # v
        diff = tl.where(mask, p - target, 0.0)
        total += tl.sum(diff * diff, axis=0)
        tl.store(grad_ptr + row + e, (2.0 * diff) * (1.0 / N), mask=mask)
    tl.store(partial_ptr + tl.program_id(0), total / N)


def triton_simple_loss(pred, x0, t, table, noise, key, prediction):
    x0, t, table = x0.contiguous(), t.contiguous(), table.contiguous()
    noise = None if noise is None else noise.contiguous()
    pred, layout, strided = tc.model_layout(pred, x0)
    L = tc.launch_plan(x0)
    gradient, partial = torch.empty_like(x0), torch.empty(L.B, L.blocks, device=x0.device, dtype=torch.float32)
    tc.launch(_simple_loss_kernel, L.grid, x0.device, pred, x0, t, table, x0 if noise is None else noise,
              t if key is None else key, gradient, partial, L.N, L.Q, table.shape[1], L.blocks, layout[0], *layout[2:],
              PREDICTION=options.code(prediction, options.PREDICTIONS), HAS_NOISE=noise is not None, STRIDED=strided,
              BLOCK_G=L.block, num_warps=L.warps)
    return (partial[:, 0] if L.blocks == 1 else partial.sum(dim=1)), gradient


# ---- the operator ---------------------------------------------------------------------------


def _fake(pred, x0, *args):
    return library.per_sample(x0), library.like(x0)


def _setup_context(ctx, inputs, output):
    ctx.pred_dtype = inputs[0].dtype
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_per_sample, _grad_of_gradient):
    (gradient,) = ctx.saved_tensors
    grad = gradient * grad_per_sample.view(-1, *([1] * (gradient.ndim - 1)))
    return grad.to(ctx.pred_dtype), None, None, None, None, None, None


op = library.define(NAME, reference_simple_loss, check, _fake, cpu=native_simple_loss,
                    cuda=triton_simple_loss if HAS_TRITON else None, backward=_backward, setup_context=_setup_context)
