"""What every Triton kernel of fastddpm shares: the Triton import, the option codes and table
rows as constexprs, the reverse-process math of `fastddpm.reference` as @triton.jit helpers,
the noise contract (`fastddpm.rng`), and the launch configuration.

Where Triton is not installed (a CPU-only install, or macOS) `triton` and `tl` are stand-ins
that let the op modules define their kernels, which are then never launched: `HAS_TRITON`
says which. All kernel arithmetic is float32.

A kernel walks the noise contract's layout: program p handles sample b = p // blocks and the
BLOCK_G group indices g of block p % blocks, i.e. the elements j·Q + g of the sample's four
quarters (Q = ⌈N/4⌉), one Philox call giving the four normals of g. The batch is folded into
grid axis 0 (2³¹ − 1 programs) because axis 1 stops at 65,535.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastddpm import options, solvers
from fastddpm.rng import STREAM_PRIOR, STREAM_REVERSE, STREAM_TRAIN
from fastddpm.schedule import Coefficients

from .library import dense_rows, per_sample_numel

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the kernels below are defined but never launched

    class _Stand_in:
        @staticmethod
        def jit(fn=None, **_options):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def constexpr(value):
            return value

    triton = tl = _Stand_in()
    HAS_TRITON = False

# ---- codes and rows as constexprs (fastddpm.options, Coefficients.row_names, solvers.ROWS) ---

EPS = tl.constexpr(options.code("eps", options.PREDICTIONS))
X0 = tl.constexpr(options.code("x0", options.PREDICTIONS))
V = tl.constexpr(options.code("v", options.PREDICTIONS))
FIXED_SMALL = tl.constexpr(options.code("fixed_small", options.VARIANCES))
FIXED_LARGE = tl.constexpr(options.code("fixed_large", options.VARIANCES))
LEARNED_RANGE = tl.constexpr(options.code("learned_range", options.VARIANCES))

ROW_ALPHAS_CUMPROD = tl.constexpr(Coefficients.row("alphas_cumprod"))
ROW_ALPHAS_CUMPROD_PREV = tl.constexpr(Coefficients.row("alphas_cumprod_prev"))
ROW_SQRT_ALPHAS_CUMPROD = tl.constexpr(Coefficients.row("sqrt_alphas_cumprod"))
ROW_SQRT_ONE_MINUS_ALPHAS_CUMPROD = tl.constexpr(Coefficients.row("sqrt_one_minus_alphas_cumprod"))
ROW_SQRT_RECIP_ALPHAS_CUMPROD = tl.constexpr(Coefficients.row("sqrt_recip_alphas_cumprod"))
ROW_SQRT_RECIPM1_ALPHAS_CUMPROD = tl.constexpr(Coefficients.row("sqrt_recipm1_alphas_cumprod"))
ROW_POSTERIOR_MEAN_COEF1 = tl.constexpr(Coefficients.row("posterior_mean_coef1"))
ROW_POSTERIOR_MEAN_COEF2 = tl.constexpr(Coefficients.row("posterior_mean_coef2"))
ROW_POSTERIOR_LOG_VARIANCE_CLIPPED = tl.constexpr(Coefficients.row("posterior_log_variance_clipped"))
ROW_LOG_BETAS = tl.constexpr(Coefficients.row("log_betas"))
ROW_LOG_LARGE_VARIANCE = tl.constexpr(Coefficients.row("log_large_variance"))

SOLVER_ALPHA_S = tl.constexpr(solvers.ROWS.index("alpha_s"))
SOLVER_SIGMA_S = tl.constexpr(solvers.ROWS.index("sigma_s"))
SOLVER_CX = tl.constexpr(solvers.ROWS.index("cx"))
SOLVER_C0 = tl.constexpr(solvers.ROWS.index("c0"))
SOLVER_C1 = tl.constexpr(solvers.ROWS.index("c1"))
SOLVER_C2 = tl.constexpr(solvers.ROWS.index("c2"))
SOLVER_CZ = tl.constexpr(solvers.ROWS.index("cz"))

PRIOR = tl.constexpr(STREAM_PRIOR)
REVERSE = tl.constexpr(STREAM_REVERSE)
TRAIN = tl.constexpr(STREAM_TRAIN)

# ---- where a program works -----------------------------------------------------------------


@triton.jit
def sample_and_groups(blocks, BLOCK_G: tl.constexpr):
    """(b, g): the sample of this program and its BLOCK_G group indices."""
    pid = tl.program_id(0)
    b = pid // blocks
    return b, (pid - b * blocks) * BLOCK_G + tl.arange(0, BLOCK_G)


@triton.jit
def quarter(j: tl.constexpr, g, N, Q):
    """(e, mask): the elements j·Q + g of quarter j, and which of them exist."""
    e = j * Q + g
    return e, (g < Q) & (e < N)


@triton.jit
def model_offsets(e, HW, stride_c, stride_p, STRIDED: tl.constexpr):
    """Offsets of elements e = c·HW + p of a model output within its sample: e itself when the
    sample is dense, c·stride_c + p·stride_p when it is strided (channels-last)."""
    if STRIDED:
        c = e // HW
        return c * stride_c + (e - c * HW) * stride_p
    else:
        return e


@triton.jit
def model_prediction(mo, mask, uncond, w, GUIDED: tl.constexpr):
    """The model's prediction at ``mo``, float32; with GUIDED, classifier-free guidance's
    ε_u + w (ε_c − ε_u) of the conditional branch at ``mo`` and the unconditional one ``uncond``
    elements after it (`fastddpm.reference.guided_output`)."""
    p = tl.load(mo, mask=mask, other=0.0).to(tl.float32)
    if GUIDED:
        u = tl.load(mo + uncond, mask=mask, other=0.0).to(tl.float32)
        p = u + w * (p - u)
    return p


# ---- the table and the reverse-process math ----------------------------------------------


@triton.jit
def timestep(t_ptr, b, T):
    """(t[b] where it lies in [0, T), else 0; whether it does). Where it does not, `coef` gives
    NaN: the op's check reports the error, and no load leaves the table."""
    t = tl.load(t_ptr + b)
    ok = (t >= 0) & (t < T)
    return tl.where(ok, t, 0), ok


@triton.jit
def coef(table_ptr, T, t, ok, ROW: tl.constexpr):
    """table[ROW, t]: one per-sample scalar of the [rows, T] coefficient table (NaN where not ok)."""
    return tl.load(table_ptr + ROW * T + t, mask=ok, other=float("nan"))


@triton.jit
def solver_coefs(table_ptr, M, i, ok):
    """Step i's column of a DPM-Solver++ chain's table: (α_s, σ_s, cx, c0, c1, c2, cz)."""
    return (coef(table_ptr, M, i, ok, SOLVER_ALPHA_S), coef(table_ptr, M, i, ok, SOLVER_SIGMA_S),
            coef(table_ptr, M, i, ok, SOLVER_CX), coef(table_ptr, M, i, ok, SOLVER_C0),
            coef(table_ptr, M, i, ok, SOLVER_C1), coef(table_ptr, M, i, ok, SOLVER_C2),
            coef(table_ptr, M, i, ok, SOLVER_CZ))


@triton.jit
def predict_x0(x, p, table_ptr, T, t, ok, PREDICTION: tl.constexpr, CLIP: tl.constexpr):
    """x̂_0 from the network's ε, x_0 or v prediction ``p`` at x_t = ``x``; clamped to [−1, 1] with CLIP."""
    if PREDICTION == EPS:
        px0 = (coef(table_ptr, T, t, ok, ROW_SQRT_RECIP_ALPHAS_CUMPROD) * x
               - coef(table_ptr, T, t, ok, ROW_SQRT_RECIPM1_ALPHAS_CUMPROD) * p)
    elif PREDICTION == X0:
        px0 = p
    else:
        px0 = (coef(table_ptr, T, t, ok, ROW_SQRT_ALPHAS_CUMPROD) * x
               - coef(table_ptr, T, t, ok, ROW_SQRT_ONE_MINUS_ALPHAS_CUMPROD) * p)
    if CLIP:
        px0 = tl.minimum(tl.maximum(px0, -1.0, propagate_nan=tl.PropagateNan.ALL), 1.0,
                         propagate_nan=tl.PropagateNan.ALL)
    return px0


@triton.jit
def log_variance(v, table_ptr, T, t, ok, VARIANCE: tl.constexpr):
    """log Σ_θ: log β̃_t, log β_t (fixed_large's), or Nichol & Dhariwal eq. (15) from the model's
    variance values v: frac log β_t + (1 − frac) log β̃_t with frac = (v + 1)/2."""
    log_tilde = coef(table_ptr, T, t, ok, ROW_POSTERIOR_LOG_VARIANCE_CLIPPED)
    if VARIANCE == LEARNED_RANGE:
        frac = (v + 1.0) * 0.5
        return frac * coef(table_ptr, T, t, ok, ROW_LOG_BETAS) + (1.0 - frac) * log_tilde
    elif VARIANCE == FIXED_LARGE:
        return coef(table_ptr, T, t, ok, ROW_LOG_LARGE_VARIANCE)
    else:
        return log_tilde


# ---- the noise contract -------------------------------------------------------------------


@triton.jit
def philox_words4(seed, sample, step, stream, g):
    """The four uint32 Philox4x32-10 outputs for counters (g, sample, step, stream), key = seed."""
    zero = tl.zeros_like(g).to(tl.int64)
    c0 = g.to(tl.uint32, bitcast=True)
    c1 = (zero + sample).to(tl.uint32)
    c2 = (zero + step).to(tl.uint32)
    c3 = (zero + stream).to(tl.uint32)
    return tl.philox(seed.to(tl.int64), c0, c1, c2, c3)


@triton.jit
def draw_normals(key_ptr, b, t, g, STREAM: tl.constexpr, DRAW: tl.constexpr):
    """The contract's normals of group indices g in the sample's four quarters, at (seed,
    sample_base + b, step, STREAM) from the key: the reverse step's step is each sample's t, the
    others' the key's. Without DRAW (the noise is given) nothing is drawn or loaded."""
    if DRAW:
        step = t if STREAM == REVERSE else tl.load(key_ptr + 2)
        return normals4(tl.load(key_ptr), tl.load(key_ptr + 1) + b, step, STREAM, g)
    else:
        return g, g, g, g


@triton.jit
def quarter_and_noise(j: tl.constexpr, g, N, Q, noise_ptr, drawn, GIVEN: tl.constexpr):
    """(e, mask, z) of quarter j: its elements j·Q + g, which of them exist, and their noise, loaded
    from the given noise (GIVEN) or taken from the normals drawn (`draw_normals`)."""
    e, mask = quarter(j, g, N, Q)
    if GIVEN:
        z = tl.load(noise_ptr + e, mask=mask, other=0.0)
    else:
        z = drawn[j]
    return e, mask, z


@triton.jit
def normals4(seed, sample, step, stream, g):
    """The standard normals of group indices g in quarters 0..3 of the sample (elements j·Q + g):
    `tl.uint_to_uniform_float` and `tl.pair_uniform_to_normal` of the four words, as the contract."""
    r0, r1, r2, r3 = philox_words4(seed, sample, step, stream, g)
    n0, n1 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(r0), tl.uint_to_uniform_float(r1))
    n2, n3 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(r2), tl.uint_to_uniform_float(r3))
    return n0, n1, n2, n3


# ---- launching ----------------------------------------------------------------------------


class Launch(NamedTuple):
    """How a kernel over images [B, ...] launches: per-sample numel N, quarter Q, BLOCK_G, warps, the
    1-D grid and its blocks per sample."""

    B: int
    N: int
    Q: int
    block: int
    warps: int
    grid: tuple[int]
    blocks: int


def launch_plan(x: torch.Tensor) -> Launch:
    """The `Launch` of a kernel over ``x``'s samples (`launch_config`, `grid`)."""
    B, N = x.shape[0], per_sample_numel(x)
    q, block, warps = launch_config(N)
    grid_, blocks = grid(B, q, block)
    return Launch(B, N, q, block, warps, grid_, blocks)


def launch_config(numel: int) -> tuple[int, int, int]:
    """(Q, BLOCK_G, num_warps) for samples of ``numel`` elements: BLOCK_G is Q rounded up to a power
    of two between 32 and 256, and num_warps gives each thread 1 or 2 groups (4–8 elements) with
    no thread left without one. More warps than BLOCK_G / 32 would compute some groups' noise on
    two threads (tests/triton_parity.py counts Philox's multiplies in the PTX)."""
    q = -(-numel // 4)
    block = max(32, min(256, 1 << max(q - 1, 0).bit_length()))
    return q, block, max(1, block // 64)


def grid(batch: int, q: int, block: int) -> tuple[tuple[int], int]:
    """(the 1-D grid, blocks per sample)."""
    blocks = -(-q // block)
    return (batch * blocks,), blocks


def model_layout(x: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, tuple, bool]:
    """A model output (or its mean half) for images ``like`` ready to read: (tensor, (batch stride,
    variance offset, HW, channel stride, pixel stride), STRIDED). Samples that are dense are read as
    they are, at any batch stride (a learned-range output's mean half too); [B, C, H, W] with H and
    W collapsible (channels-last) by its strides; anything else is copied. A learned-range output's
    variance values sit ``like``'s C channels (N elements, when dense) after its mean."""
    if dense_rows(x):
        return x, (x.stride(0), per_sample_numel(like), 1, 1, 1), False
    if x.ndim == 4 and x.stride(2) == x.shape[3] * x.stride(3):
        return x, (x.stride(0), like.shape[1] * x.stride(1), x.shape[2] * x.shape[3], x.stride(1), x.stride(3)), True
    return model_layout(x.contiguous(), like)


def launch(kernel, grid_, device: torch.device, *args, **constexprs) -> None:
    """``kernel[grid_](*args, **constexprs)`` on ``device``: Triton launches on the current CUDA
    device (and its current stream), which need not be the tensors'. (CPU tensors: the
    interpreter, TRITON_INTERPRET=1.)"""
    if device.type != "cuda":
        kernel[grid_](*args, **constexprs)
        return
    with torch.cuda.device(device):
        kernel[grid_](*args, **constexprs)
