"""solver_step: one step of a multistep DPM-Solver++ chain (`fastddpm.solvers`), fused, in place.

    torch.ops.fastddpm.solver_step(x, model_out, step, t, table, history, noise, key, prediction,
                                   variance, clip_denoised, stochastic, guidance=None) -> ()

m0 = x̂₀ from the model output at the step's (α_s, σ_s), optionally clipped to [−1, 1]; then
x ← cx x + c0 m0 + c1 m1 + c2 m2 (+ cz z with ``stochastic``), and the history of earlier x̂₀'s
← (m0, m1) — `fastddpm.reference.solver_step`. One launch reads x, the model output and the
history and writes x and the history where they are, so a CUDA graph of a sampling step
captures the whole update. x: float32 (or float64) [B, ...], contiguous. model_out: x's shape
(twice its channels with learned_range: the mean half is read), float32, float16 or bfloat16,
dense or channels-last. step: int64 [B], each sample's column of ``table``, the chain's
[7, M] `DPMSolverChain.table` in x's dtype. t: int64 [B], the step's schedule index (the noise
coordinate). history: [S, B, ...] like x, S = 0, 1 or 2 earlier x̂₀'s, newest first (zeros
before the first step). noise: z like x, or None to draw the contract's z at (seed,
sample_base + b, t[b], STREAM_REVERSE) from key. guidance: classifier-free guidance's w, with
model_out [2B, ...], the conditional branch's B rows then the unconditional one's: m0 is read
from ε_u + w (ε_c − ε_u) — `reference.guided_output`. Not differentiable.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastddpm import options, reference, rng, solvers

from . import checks, library
from . import triton_common as tc
from .triton_common import HAS_TRITON, tl, triton

NAME = "solver_step"


def check(x, model_out, step, t, table, history, noise, key, prediction, variance, clip_denoised,
          stochastic, guidance=None) -> torch.dtype:
    """The images' dtype, once every argument is checked."""
    checks.choices(NAME, prediction, variance, clip_denoised)
    checks.guidance(NAME, guidance)
    dtype = checks.images(NAME, x=x, noise=noise).dtype
    checks.model_output(NAME, model_out, x, learned=variance == "learned_range", guided=guidance is not None)
    checks.solver_state(NAME, x, step, t, table, history, len(solvers.ROWS))
    if not isinstance(stochastic, bool):
        raise ValueError(f"fastddpm.{NAME}: stochastic must be a bool, got {stochastic!r}")
    if stochastic:
        checks.key(NAME, key, noise, x)
    return dtype


def reference_solver_step(
    x: Tensor, model_out: Tensor, step: Tensor, t: Tensor, table: Tensor, history: Tensor, noise: Optional[Tensor],
    key: Optional[Tensor], prediction: str, variance: str, clip_denoised: bool, stochastic: bool,
    guidance: Optional[float] = None,
) -> None:
    if stochastic and noise is None:
        noise = rng.normal_at_key(key, x, rng.STREAM_REVERSE, step=t)
    coefs = dict(zip(solvers.ROWS, table.index_select(1, step).unbind(0)))
    out, new_history = reference.solver_step(x, model_out.to(x.dtype) if x.dtype == torch.float64 else model_out,
                                             history, noise if stochastic else None, coefs, prediction=prediction,
                                             variance=variance, clip_denoised=clip_denoised, guidance=guidance)
    x.copy_(out)
    history.copy_(new_history)


# ---- native (CPU) -------------------------------------------------------------------------


def native_solver_step(x, model_out, step, t, table, history, noise, key, prediction, variance, clip_denoised,
                       stochastic, guidance=None):
    step, t, table = step.contiguous(), t.contiguous(), table.contiguous()
    model_out = model_out if library.dense_rows(model_out) else model_out.contiguous()
    noise = None if noise is None else noise.contiguous()
    draws = stochastic and noise is None
    seed, sample_base, _ = rng.unpack_key(key) if draws else (0, 0, 0)
    library.native.solver_step(
        x.data_ptr(), model_out.data_ptr(), options.code(model_out.dtype, options.MODEL_DTYPES),
        library.batch_stride(model_out), step.data_ptr(), t.data_ptr(), table.data_ptr(), table.shape[1], x.shape[0],
        library.per_sample_numel(x), history.data_ptr() if history.numel() else 0, history.shape[0], stochastic,
        0 if noise is None else noise.data_ptr(), seed, sample_base, options.code(prediction, options.PREDICTIONS),
        clip_denoised, guidance is not None, 0.0 if guidance is None else guidance)


# ---- Triton (CUDA) ------------------------------------------------------------------------


@triton.jit
def _solver_step_kernel(x_ptr, mo_ptr, step_ptr, t_ptr, table_ptr, hist_ptr, noise_ptr, key_ptr, w, N, Q, M, blocks,
                        BN, mo_stride_b, mo_uncond, HW, mo_stride_c, mo_stride_p, PREDICTION: tl.constexpr,
                        CLIP: tl.constexpr, SLOTS: tl.constexpr, STOCHASTIC: tl.constexpr, HAS_NOISE: tl.constexpr,
                        STRIDED: tl.constexpr, GUIDED: tl.constexpr, BLOCK_G: tl.constexpr):
    """The step for the BLOCK_G groups of one sample; BN = B·N, the offset of the second history slot."""
    b, g = tc.sample_and_groups(blocks, BLOCK_G)
    i, ok = tc.timestep(step_ptr, b, M)
    alpha, sigma, cx, c0, c1, c2, cz = tc.solver_coefs(table_ptr, M, i, ok)
    row = b.to(tl.int64) * N
    mo_row = b.to(tl.int64) * mo_stride_b
    drawn = tc.draw_normals(key_ptr, b, tl.load(t_ptr + b), g, tc.REVERSE, STOCHASTIC and not HAS_NOISE)
    for j in tl.static_range(4):
        e, mask, z = tc.quarter_and_noise(j, g, N, Q, noise_ptr + row, drawn, HAS_NOISE)
        x = tl.load(x_ptr + row + e, mask=mask, other=0.0)
        p = tc.model_prediction(mo_ptr + mo_row + tc.model_offsets(e, HW, mo_stride_c, mo_stride_p, STRIDED), mask,
                                mo_uncond, w, GUIDED)
        if PREDICTION == tc.EPS:
            m0 = tl.math.div_rn(x - sigma * p, alpha)  # DPM-Solver++ eq. (5): x̂₀ = (x_s − σ_s ε)/α_s
        elif PREDICTION == tc.X0:
            m0 = p
        else:
            m0 = alpha * x - sigma * p
        if CLIP:
            m0 = tl.minimum(tl.maximum(m0, -1.0, propagate_nan=tl.PropagateNan.ALL), 1.0,
                            propagate_nan=tl.PropagateNan.ALL)
        out = cx * x + c0 * m0
        if SLOTS >= 1:
            h0 = tl.load(hist_ptr + row + e, mask=mask, other=0.0)
            out = out + c1 * h0
            if SLOTS >= 2:
                out = out + c2 * tl.load(hist_ptr + BN + row + e, mask=mask)
                tl.store(hist_ptr + BN + row + e, h0, mask=mask)
            tl.store(hist_ptr + row + e, m0, mask=mask)
        if STOCHASTIC:
            out = out + cz * z
        tl.store(x_ptr + row + e, out, mask=mask)


def triton_solver_step(x, model_out, step, t, table, history, noise, key, prediction, variance, clip_denoised,
                       stochastic, guidance=None):
    step, t, table = step.contiguous(), t.contiguous(), table.contiguous()
    noise = None if noise is None else noise.contiguous()
    model_out, (stride_b, _, *layout), strided = tc.model_layout(model_out, x)
    L = tc.launch_plan(x)
    tc.launch(_solver_step_kernel, L.grid, x.device, x, model_out, step, t, table, history if history.numel() else x,
              x if noise is None else noise, t if key is None else key, 0.0 if guidance is None else float(guidance),
              L.N, L.Q, table.shape[1], L.blocks, L.B * L.N, stride_b, L.B * stride_b, *layout,
              PREDICTION=options.code(prediction, options.PREDICTIONS), CLIP=clip_denoised, SLOTS=history.shape[0],
              STOCHASTIC=stochastic, HAS_NOISE=noise is not None, STRIDED=strided, GUIDED=guidance is not None,
              BLOCK_G=L.block, num_warps=L.warps)


def _fake(*args):
    return None


op = library.define(NAME, reference_solver_step, check, _fake, cpu=native_solver_step,
                    cuda=triton_solver_step if HAS_TRITON else None, mutates=("x", "history"), index="step")
