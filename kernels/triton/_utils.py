"""Host-side helpers shared by the Triton launchers: argument checks and integer packing.

Nothing here launches a kernel. All checks raise ``ValueError`` naming the argument.
"""

from __future__ import annotations

import math

import torch
import triton
from torch.library import wrap_triton
from triton.runtime.jit import JITFunction

from fastddpm import rng
from fastddpm.schedule import Coefficients

PREDICTIONS = {"eps": 0, "x0": 1, "v": 2}
VARIANCES = {"fixed_small": 0, "fixed_large": 1, "learned_range": 2}
MODEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LN2 = math.log(2.0)

_MASK32 = 0xFFFFFFFF

# Row indices of the coefficient table, as kernel constexprs.
ROW = {name: Coefficients.row(name) for name in Coefficients.row_names()}


def enum(value, table: dict, name: str) -> int:
    if isinstance(value, str) and value in table:
        return table[value]
    raise ValueError(f"{name} must be one of {', '.join(map(repr, table))}, got {value!r}")


def u32_arg(value, name: str) -> int:
    """An integer coordinate (sample_base, step) reduced mod 2**32, as the noise contract does."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return value & _MASK32


def coordinates(seed, sample_base, step, key, device: torch.device):
    """The noise coordinates as kernel arguments: (seed, sample_base, step, key tensor or None).

    With ``key`` (int64 [seed, sample_base, step] on the op's device, as `fastddpm.ops.noise_key`
    makes) the kernel loads them itself — nothing to recompile, CUDA-graph safe — and the
    scalars are not used."""
    if key is None:
        return rng.seed_bits(seed), u32_arg(sample_base, "sample_base"), u32_arg(step, "step"), None
    if not isinstance(key, torch.Tensor) or key.dtype != torch.int64 or key.shape != (3,):
        raise ValueError("key must be an int64 tensor [seed, sample_base, step] of shape (3,), got "
                         f"{getattr(key, 'dtype', type(key).__name__)} {tuple(getattr(key, 'shape', ()))}")
    check_device(key, "key", device)
    return 0, 0, 0, key.contiguous()


def per_sample_numel(x: torch.Tensor) -> int:
    n = 1
    for s in x.shape[1:]:
        n *= s
    return n


def sample_contiguous(x: torch.Tensor) -> bool:
    """True when each x[b] is one dense row-major block (any batch stride)."""
    expected = 1
    for size, stride in zip(reversed(x.shape[1:]), reversed(x.stride()[1:])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def check_batch(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"{name} must have shape [B, ...] with B >= 1, got {tuple(x.shape)}")


def check_device(x: torch.Tensor, name: str, device: torch.device) -> None:
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, expected {device} (all tensors must share one device)")


def check_tensor(x, name: str, device: torch.device, what: str) -> None:
    """``x`` is a tensor (else "``name`` must be ``what``") on ``device``."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be {what}, got {type(x).__name__}")
    check_device(x, name, device)


def check_image(x: torch.Tensor, name: str, device: torch.device) -> torch.Tensor:
    """A float32 [B, ...] tensor; made contiguous (copy) when it is not."""
    check_batch(x, name)
    check_device(x, name, device)
    if x.dtype != torch.float32:
        raise ValueError(f"{name} must be float32, got {x.dtype}")
    return x.contiguous()


def check_model(x: torch.Tensor, name: str, device: torch.device, batch: int, numel: int, factors=(1,)):
    """A float32/float16/bfloat16 [B, ...] tensor with ``f·numel`` elements per sample (f in factors);
    each sample dense (a contiguous copy is made otherwise). Returns (tensor, batch stride)."""
    check_batch(x, name)
    check_device(x, name, device)
    if x.dtype not in MODEL_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.shape[0] != batch:
        raise ValueError(f"{name} has batch size {x.shape[0]}, expected {batch}")
    n = per_sample_numel(x)
    if n not in [f * numel for f in factors]:
        want = " or ".join(str(f * numel) for f in factors)
        raise ValueError(f"{name} has {n} elements per sample, expected {want}")
    if not sample_contiguous(x):
        x = x.contiguous()
    stride = x.stride(0) if x.shape[0] > 1 else n
    return x, stride


def check_t(t: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    check_tensor(t, "t", device, "an int64 tensor [B]")
    if t.dtype != torch.int64:
        raise ValueError(f"t must be int64, got {t.dtype}")
    if t.shape != (batch,):
        raise ValueError(f"t must have shape ({batch},), got {tuple(t.shape)}")
    return t.contiguous()


def check_table(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    check_tensor(table, "table", device, "the float32 [R, T] Coefficients.table")
    if table.dtype != torch.float32:
        raise ValueError(f"table must be float32, got {table.dtype}")
    if table.ndim != 2 or table.shape[0] != len(ROW):
        raise ValueError(f"table must be the [{len(ROW)}, T] Coefficients.table, got shape {tuple(table.shape)}")
    return table.contiguous()


def check_per_sample(v, name: str, batch: int, device: torch.device) -> torch.Tensor:
    check_tensor(v, name, device, "a float32 tensor [B]")
    if not v.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {v.dtype}")
    if v.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(v.shape)}")
    return v.to(torch.float32).contiguous()


def check_noise(noise, batch: int, numel: int, device: torch.device) -> torch.Tensor:
    """A float32 noise tensor with the image's B and N (any shape [B, ...]); contiguous copy if needed."""
    check_batch(noise, "noise")
    check_device(noise, "noise", device)
    if noise.dtype != torch.float32:
        raise ValueError(f"noise must be float32, got {noise.dtype}")
    if noise.shape[0] != batch or per_sample_numel(noise) != numel:
        raise ValueError(f"noise must have {batch} samples of {numel} elements, got shape {tuple(noise.shape)}")
    return noise.contiguous()


def quarter(numel: int) -> int:
    return -(-numel // 4)


def block_g(q: int, block: int | None) -> int:
    """Group indices per program (the tile is [4, BLOCK_G] elements): ``block`` if given (a power
    of two, for tuning), else Q rounded up to a power of two, between 16 and 256 (1024 elements,
    8 per thread with 4 warps). Untuned: benchmark on the GPU."""
    if block is not None:
        if isinstance(block, bool) or not isinstance(block, int) or block < 1 or block & (block - 1):
            raise ValueError(f"block_g must be a power of two, got {block!r}")
        return block
    return max(16, min(256, triton.next_power_of_2(q)))


def num_warps(block: int) -> int:
    return 4 if block >= 256 else (2 if block >= 64 else 1)


def sum_partials(partial: torch.Tensor) -> torch.Tensor:
    """Per-sample totals [B] of a [B, n_blocks] buffer of per-program partial sums, in a fixed
    order (deterministic); a view, with no kernel, when there is one block per sample."""
    return partial[:, 0] if partial.shape[1] == 1 else partial.sum(dim=1)


def launcher(kernel):
    """``kernel`` wrapped with `torch.library.wrap_triton`, so `torch.compile` traces into the
    launch; the Triton interpreter's kernels (TRITON_INTERPRET=1) are launched as they are."""
    return wrap_triton(kernel) if isinstance(kernel, JITFunction) else kernel
