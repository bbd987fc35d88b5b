"""The noise contract: every Gaussian fastddpm draws is a pure function of its coordinates.

    normal(seed, sample, step, stream, element)

A sample's N elements are split into four contiguous quarters of Q = ⌈N/4⌉ elements.
Element ``j·Q + g`` (quarter j ∈ {0,1,2,3}, g ∈ [0, Q)) is output j of one Philox4x32-10 call

    counter = (g, sample, step, stream)   key = (seed mod 2³², seed div 2³²)

turned into normals exactly as `triton.language.random` does: each 32-bit output, read as a
signed int32 x, becomes u = (x < 0 ? −x − 1 : x) · 4.6566127342e-10 (`uint_to_uniform_float`),
and the pairs (u₀, u₁), (u₂, u₃) go through Box–Muller: r = √(−2 ln max(u, 1e-7)),
θ = 2π u', giving (r cos θ, r sin θ) (`pair_uniform_to_normal`). All four outputs are used.

Consequences: image k of seed s is the same whatever the batch it is drawn in (callers pass
global sample indices), the same on every backend up to float rounding of log/sqrt/cos/sin,
and training noise never needs storing, since any kernel can regenerate it.

This module is the definition: exact integer Philox in torch (int64 arithmetic, so it runs
on any device) and the float conversion above, used by the reference backend and by the
tests that hold every kernel to it.
"""

from __future__ import annotations

import torch

from . import validate

# Streams keep the noise of different uses independent.
STREAM_PRIOR = 0  # x_T ~ N(0, I) at the start of sampling
STREAM_REVERSE = 1  # z of the reverse step at step t
STREAM_TRAIN = 2  # ε of q_sample / the ε-loss at a training step

_MASK32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_UNIFORM_SCALE = 4.6566127342e-10
_TWO_PI = 6.283185307179586


def _mul32(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of the 64-bit product of uint32 values a (int64 tensor) and b."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    b_hi, b_lo = b >> 16, b & 0xFFFF
    lo_lo, hi_lo, lo_hi = a_lo * b_lo, a_hi * b_lo, a_lo * b_hi
    cross = (lo_lo >> 16) + (hi_lo & 0xFFFF) + (lo_hi & 0xFFFF)
    high = a_hi * b_hi + (hi_lo >> 16) + (lo_hi >> 16) + (cross >> 16)
    low = ((cross & 0xFFFF) << 16) | (lo_lo & 0xFFFF)
    return high & _MASK32, low


def philox4x32(c0, c1, c2, c3, seed, rounds: int = 10):
    """Philox4x32 (Salmon et al. 2011) on uint32 counters held in int64 tensors, keyed by a 64-bit
    seed: an int, or an int64 tensor holding its bits (a key's, read on its device)."""
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(rounds):
        hi_b, lo_b = _mul32(c2, _ROUND_B)
        hi_a, lo_a = _mul32(c0, _ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def uint_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """uint32 (in int64) → float32 in [0, 1), as `triton.language.random.uint_to_uniform_float`."""
    signed = torch.where(x >= 2**31, x - 2**32, x)
    folded = torch.where(signed < 0, -signed - 1, signed)
    return folded.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def box_muller(u1: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two uniforms → two normals, as `triton.language.random.pair_uniform_to_normal`."""
    r = torch.sqrt(-2.0 * torch.log(torch.clamp(u1, min=1.0e-7)))
    theta = torch.tensor(_TWO_PI, dtype=torch.float32) * u2
    return r * torch.cos(theta), r * torch.sin(theta)


def _seed(seed: int) -> int:
    return validate.integer("seed", seed, 0, 2**64)


def seed_bits(seed: int) -> int:
    """The signed int64 with the 64-bit seed's bits (a key tensor's or a kernel parameter's type):
    seeds of 2**63 or more read as negative there, and the kernels take the bits."""
    seed = _seed(seed)
    return seed - 2**64 if seed >= 2**63 else seed


def noise_key(seed: int, sample_base: int = 0, step: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """The operators' ``key``: int64 [`seed_bits`(seed), sample_base, step] on ``device``
    (`unpack_key` reads it back). Off the CPU it is made of scalar fills on the device, so making
    one never waits for the device (a copy from host memory would)."""
    for name, value in (("sample_base", sample_base), ("step", step)):
        validate.integer(name, value, 0, 2**63)
    values = (seed_bits(seed), sample_base, step)
    device = torch.device(device)
    if device.type == "cpu":
        return torch.tensor(values, dtype=torch.int64)
    return torch.stack([torch.full((), v, dtype=torch.int64, device=device) for v in values])


def unpack_key(key: torch.Tensor) -> tuple[int, int, int]:
    """(seed, sample_base, step) of a `noise_key` tensor, read on the host."""
    seed, sample_base, step = key.tolist()
    return seed % 2**64, sample_base, step


def philox_words(seed, samples: torch.Tensor, step, stream: int, numel: int) -> torch.Tensor:
    """The raw Philox outputs [B, 4, Q] (uint32 values in int64) for ``numel`` elements per sample;
    ``seed`` is an int or an int64 tensor of its bits, ``step`` one int or tensor, or one per sample."""
    seed = seed if isinstance(seed, torch.Tensor) else _seed(seed)
    samples = torch.as_tensor(samples, dtype=torch.int64)
    quarter = -(-numel // 4)
    g = torch.arange(quarter, dtype=torch.int64, device=samples.device).expand(samples.numel(), quarter)
    b = (samples.reshape(-1, 1) & _MASK32).expand_as(g)
    s = (torch.as_tensor(step, dtype=torch.int64, device=samples.device).reshape(-1, 1) & _MASK32).expand_as(g)
    words = philox4x32(g, b, s, torch.full_like(g, stream & _MASK32), seed)
    return torch.stack(words, dim=1)


def normal(seed, samples: torch.Tensor, step, stream: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normals [B, *shape] (float32) for global sample indices ``samples`` [B] at
    ``step`` (one int, or one per sample as the reverse step's t)."""
    numel = 1
    for s in shape:
        numel *= s
    words = philox_words(seed, samples, step, stream, numel)  # [B, 4, Q]
    u = uint_to_uniform(words)
    n0, n1 = box_muller(u[:, 0], u[:, 1])
    n2, n3 = box_muller(u[:, 2], u[:, 3])
    quarters = torch.stack([n0, n1, n2, n3], dim=1)  # element j·Q + g is quarters[:, j, g]
    return quarters.reshape(quarters.shape[0], -1)[:, :numel].reshape(-1, *shape)


def normal_at_key(key: torch.Tensor, like: torch.Tensor, stream: int, step: torch.Tensor | None = None) -> torch.Tensor:
    """The contract's normals in ``like``'s shape and dtype at a `noise_key` tensor: sample b at
    (seed, sample_base + b, step), the key's step unless ``step`` (one per sample: the reverse
    step's t) replaces it. Computed on the key's device from its values there: no host sync."""
    seed, sample_base, key_step = key.unbind(0)
    samples = sample_base + torch.arange(like.shape[0], device=key.device)
    z = normal(seed, samples, key_step if step is None else step, stream, tuple(like.shape[1:]))
    return z.to(like.dtype)
