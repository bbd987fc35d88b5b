"""The noise contract (`fastddpm.rng`) in Triton: Philox4x32-10 normals by coordinates.

Element ``j·Q + g`` (Q = ⌈N/4⌉) of sample s is output j of one Philox call with counter
(g, s, step, stream) and key (seed mod 2³², seed div 2³²), turned into floats by
`tl.uint_to_uniform_float` and `tl.pair_uniform_to_normal`.

@triton.jit helpers: `philox_normal4` (the four normals of group indices g, one per quarter),
`normal_quarters` (the same as a [4, G] block, row j = quarter j) and `quarter_offsets` (the
matching element offsets j·Q + g and mask), which every fused kernel uses. Launchers:
`normal` fills a [B, *shape] tensor (x_T of sampling, tests) and `philox_words` returns the
raw 32-bit words (tests compare them bit for bit with `fastddpm.rng.philox4x32`).

Integer arguments: ``seed`` is the int64 with the bits of the uint64 seed, ``sample``,
``step`` and ``stream`` are integer scalars (only their low 32 bits are used) and ``g`` an
int32 block. Kernel parameters carrying them are typed int64 and not specialized, so new
seeds, samples or steps never recompile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastddpm import rng

from . import _utils as U


@triton.jit
def philox_words4(seed, sample, step, stream, g):
    """The four uint32 Philox outputs for counters (g, sample, step, stream)."""
    zero = tl.zeros_like(g).to(tl.int64)
    c0 = g.to(tl.uint32, bitcast=True)
    c1 = (zero + sample).to(tl.uint32)
    c2 = (zero + step).to(tl.uint32)
    c3 = (zero + stream).to(tl.uint32)
    return tl.philox(seed.to(tl.int64), c0, c1, c2, c3)


@triton.jit
def philox_normal4(seed, sample, step, stream, g):
    """The four standard normals of group indices ``g`` (quarters 0..3 of the sample)."""
    r0, r1, r2, r3 = philox_words4(seed, sample, step, stream, g)
    n0, n1 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(r0), tl.uint_to_uniform_float(r1))
    n2, n3 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(r2), tl.uint_to_uniform_float(r3))
    return n0, n1, n2, n3


@triton.jit
def normal_quarters(seed, sample, step, stream, g):
    """The normals of group indices ``g`` [G] as a [4, G] block: row j is quarter j (elements j·Q + g)."""
    n0, n1, n2, n3 = philox_normal4(seed, sample, step, stream, g)
    j = tl.arange(0, 4)[:, None]
    return tl.where(j == 0, n0[None, :], tl.where(j == 1, n1[None, :], tl.where(j == 2, n2[None, :], n3[None, :])))


@triton.jit
def load_key(key_ptr, seed, sample_base, step, HAS_KEY: tl.constexpr):
    """(seed, sample_base, step): read from the int64 [3] ``key`` tensor with HAS_KEY, else as given."""
    if HAS_KEY:
        seed = tl.load(key_ptr)
        sample_base = tl.load(key_ptr + 1)
        step = tl.load(key_ptr + 2)
    return seed, sample_base, step


@triton.jit
def quarter_offsets(pid_g, N, Q, BLOCK_G: tl.constexpr):
    """(g [G], element offsets e = j·Q + g [4, G], mask [4, G]) of program ``pid_g``'s group indices."""
    g = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    e = tl.arange(0, 4)[:, None] * Q + g[None, :]
    mask = (g[None, :] < Q) & (e < N)
    return g, e, mask


@triton.jit(do_not_specialize=["seed", "sample_base", "step", "stream"])
def _normal_kernel(out_ptr, key_ptr, seed: tl.int64, sample_base: tl.int64, step: tl.int64, stream: tl.int64,
                   N, Q, HAS_KEY: tl.constexpr, BLOCK_G: tl.constexpr):
    b = tl.program_id(1)
    seed, sample_base, step = load_key(key_ptr, seed, sample_base, step, HAS_KEY)
    g, e, mask = quarter_offsets(tl.program_id(0), N, Q, BLOCK_G)
    z = normal_quarters(seed, sample_base + b, step, stream, g)
    tl.store(out_ptr + b.to(tl.int64) * N + e, z, mask=mask)


@triton.jit(do_not_specialize=["seed", "sample_base", "step", "stream"])
def _words_kernel(out_ptr, seed: tl.int64, sample_base: tl.int64, step: tl.int64, stream: tl.int64,
                  Q, BLOCK_G: tl.constexpr):
    pid_g = tl.program_id(0)
    b = tl.program_id(1)
    g = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    r0, r1, r2, r3 = philox_words4(seed, sample_base + b, step, stream, g)
    base = out_ptr + b.to(tl.int64) * 4 * Q
    m = g < Q
    tl.store(base + g, r0.to(tl.int32, bitcast=True), mask=m)
    tl.store(base + Q + g, r1.to(tl.int32, bitcast=True), mask=m)
    tl.store(base + 2 * Q + g, r2.to(tl.int32, bitcast=True), mask=m)
    tl.store(base + 3 * Q + g, r3.to(tl.int32, bitcast=True), mask=m)


def _launch_args(batch, numel, seed, sample_base, step, stream):
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 1:
        raise ValueError(f"numel must be a positive integer, got {numel!r}")
    return rng.seed_bits(seed), U.u32_arg(sample_base, "sample_base"), U.u32_arg(step, "step"), U.u32_arg(stream, "stream")


def normal(batch: int, shape, seed: int = 0, sample_base: int = 0, step: int = 0, stream: int = 0, *,
           key: torch.Tensor | None = None, device="cuda", block_g: int | None = None) -> torch.Tensor:
    """Standard normals [batch, *shape] float32: sample b is ``rng.normal(seed, sample_base + b, step,
    stream, shape)`` (x_T of sampling is step T, stream `rng.STREAM_PRIOR`). ``key``: int64
    [seed, sample_base, step] on ``device``, read by the kernel instead of the scalars."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    numel = 1
    for s in shape:
        numel *= s
    _, _, _, stream = _launch_args(batch, numel, 0, 0, 0, stream)
    out = torch.empty((batch, *shape), device=device, dtype=torch.float32)
    seed, sample_base, step, key = U.coordinates(seed, sample_base, step, key, out.device)
    q = U.quarter(numel)
    blk = U.block_g(q, block_g)
    _normal_kernel[(triton.cdiv(q, blk), batch)](
        out, key if key is not None else out, seed, sample_base, step, stream, numel, q,
        HAS_KEY=key is not None, BLOCK_G=blk, num_warps=U.num_warps(blk))
    return out


def philox_words(batch: int, numel: int, seed: int, sample_base: int = 0, step: int = 0, stream: int = 0, *,
                 device="cuda", block_g: int | None = None) -> torch.Tensor:
    """The raw Philox outputs [batch, 4, Q] as uint32 values in int64, like `fastddpm.rng.philox_words`."""
    seed, sample_base, step, stream = _launch_args(batch, numel, seed, sample_base, step, stream)
    q = U.quarter(numel)
    out = torch.empty((batch, 4, q), device=device, dtype=torch.int32)
    blk = U.block_g(q, block_g)
    _words_kernel[(triton.cdiv(q, blk), batch)](
        out, seed, sample_base, step, stream, q, BLOCK_G=blk, num_warps=U.num_warps(blk))
    return out.to(torch.int64) & 0xFFFFFFFF
