"""The argument checks of the fastddpm operators: everything a kernel relies on, checked once,
where the operator is called (every implementation and the fake run them). Each raises a
ValueError of one line that starts with ``fastddpm.<op>:`` and names the argument.

The ranges of t's values are the exception, since they need the values: the native kernels
check them in C++, other CPU implementations here (`timesteps_in_range`), and on an
accelerator an asynchronous device assertion does (no host sync).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from fastddpm import options, validate
from fastddpm.schedule import Coefficients

_ROWS = len(Coefficients.row_names())
_IMAGE_DTYPES = (torch.float32, torch.float64)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _what(x) -> str:
    return f"{_name(x.dtype)} {tuple(x.shape)} on {x.device}" if isinstance(x, Tensor) else type(x).__name__


def images(op: str, **tensors: Tensor | None) -> Tensor:
    """Images [B, ...] of one float32 or float64 dtype, shape and device (None entries skipped);
    returns the first, which the others were held to."""
    (first_name, first), *others = [(n, x) for n, x in tensors.items() if x is not None]
    if not isinstance(first, Tensor) or first.dtype not in _IMAGE_DTYPES or first.ndim < 1:
        raise ValueError(f"fastddpm.{op}: {first_name} must be a float32 or float64 tensor [B, ...], got {_what(first)}")
    for name, x in others:
        if not isinstance(x, Tensor) or x.dtype != first.dtype or x.shape != first.shape or x.device != first.device:
            raise ValueError(f"fastddpm.{op}: {name} must be {_name(first.dtype)} {tuple(first.shape)} on {first.device} "
                             f"like {first_name}, got {_what(x)}")
    return first


def model_output(op: str, out: Tensor, like: Tensor, learned: bool, name: str = "model_out", guided: bool = False) -> None:
    """``like``'s shape (twice its channels when ``learned``, twice its batch when ``guided``), on its
    device; float32, float16 or bfloat16 for float32 images, float64 for float64 ones."""
    expected = list(like.shape)
    if learned:
        expected[1] *= 2
    if guided:
        expected[0] *= 2
    dtypes = options.MODEL_DTYPES if like.dtype == torch.float32 else (like.dtype,)
    if not isinstance(out, Tensor) or out.dtype not in dtypes or list(out.shape) != expected or out.device != like.device:
        allowed = " or ".join(_name(d) for d in dtypes)
        why = [w for w, on in (("learned_range: twice the channels", learned),
                               ("guidance: the conditional then the unconditional batch", guided)) if on]
        why = f" ({'; '.join(why)})" if why else ""
        raise ValueError(f"fastddpm.{op}: {name} must be {allowed} {tuple(expected)} on {like.device}{why}, "
                         f"got {_what(out)}")


def guidance(op: str, value) -> None:
    """Classifier-free guidance's w: None (no guidance) or a finite number."""
    try:
        validate.number("guidance", value, optional=True)
    except ValueError as err:
        raise ValueError(f"fastddpm.{op}: {err}") from None


def timesteps_and_table(op: str, t: Tensor, table_: Tensor, like: Tensor) -> None:
    """t: int64 [B] on the images' device; table: the schedule's `Coefficients.table`, [rows, T] in
    the images' dtype, on their device."""
    if not isinstance(t, Tensor) or t.dtype != torch.int64 or t.shape != like.shape[:1] or t.device != like.device:
        raise ValueError(f"fastddpm.{op}: t must be int64 ({like.shape[0]},) on {like.device}, got {_what(t)}")
    if (not isinstance(table_, Tensor) or table_.ndim != 2 or table_.shape[0] != _ROWS or table_.shape[1] < 1
            or table_.dtype != like.dtype or table_.device != like.device):
        raise ValueError(f"fastddpm.{op}: table must be a Coefficients.table, {_name(like.dtype)} [{_ROWS}, T] on "
                         f"{like.device}, got {_what(table_)}")


def solver_state(op: str, x: Tensor, step: Tensor, t: Tensor, table_: Tensor, history: Tensor, rows: int) -> None:
    """A solver step's state: x written in place (contiguous), step and t int64 [B], the chain's
    [rows, M] table and the history [S ≤ 2, *x.shape] of earlier x̂₀'s (contiguous, written in place)."""
    if not x.is_contiguous():
        raise ValueError(f"fastddpm.{op}: x must be contiguous (it is written in place)")
    for name, index in (("step", step), ("t", t)):
        if not isinstance(index, Tensor) or index.dtype != torch.int64 or index.shape != x.shape[:1] \
                or index.device != x.device:
            raise ValueError(f"fastddpm.{op}: {name} must be int64 ({x.shape[0]},) on {x.device}, got {_what(index)}")
    if (not isinstance(table_, Tensor) or table_.ndim != 2 or table_.shape[0] != rows or table_.shape[1] < 1
            or table_.dtype != x.dtype or table_.device != x.device):
        raise ValueError(f"fastddpm.{op}: table must be a DPMSolverChain.table, {_name(x.dtype)} [{rows}, M] on "
                         f"{x.device}, got {_what(table_)}")
    if (not isinstance(history, Tensor) or history.ndim != x.ndim + 1 or history.shape[0] > 2
            or history.shape[1:] != x.shape or history.dtype != x.dtype or history.device != x.device
            or not history.is_contiguous()):
        raise ValueError(f"fastddpm.{op}: history must be a contiguous {_name(x.dtype)} [S, {', '.join(map(str, x.shape))}]"
                         f" with S = 0, 1 or 2 on {x.device}, got {_what(history)}")


def key(op: str, key_: Tensor | None, noise: Tensor | None, like: Tensor) -> None:
    """A `noise_key` (int64 [seed, sample_base, step] on the images' device), unless noise is given."""
    if key_ is None and noise is None:
        raise ValueError(f"fastddpm.{op}: give noise, or a key (fastddpm.rng.noise_key) to draw it from")
    if key_ is not None and (not isinstance(key_, Tensor) or key_.dtype != torch.int64 or key_.shape != (3,)
                             or key_.device != like.device):
        raise ValueError(f"fastddpm.{op}: key must be an int64 tensor [seed, sample_base, step] on {like.device} "
                         f"(fastddpm.rng.noise_key), got {_what(key_)}")


def choices(op: str, prediction, variance=None, clip_denoised=None) -> None:
    """The op's options: a prediction, and where the op takes them a variance and clip_denoised."""
    _choice(op, "prediction", prediction, options.PREDICTIONS)
    if variance is not None:
        _choice(op, "variance", variance, options.VARIANCES)
    if clip_denoised is not None and not isinstance(clip_denoised, bool):
        raise ValueError(f"fastddpm.{op}: clip_denoised must be a bool, got {clip_denoised!r}")


def _choice(op: str, kind: str, value, allowed) -> None:
    try:
        options.choice(kind, value, allowed)
    except ValueError as err:
        raise ValueError(f"fastddpm.{op}: {err}") from None


def eta(op: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1):
        raise ValueError(f"fastddpm.{op}: eta must lie in [0, 1] (DDIM(η); None: DDPM), got {value!r}")


def levels(op: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ValueError(f"fastddpm.{op}: levels must be an integer >= 2, got {value!r}")


def timesteps_in_range(op: str, t: Tensor, T: int, name: str = "t") -> None:
    """Every t[b] in [0, T) (``name``: the index's argument): read on the CPU; on an accelerator an
    asynchronous device assertion (it stops the program at the next sync), so nothing waits for the
    device."""
    if t.numel() == 0 or is_fake(t):
        return
    message = f"fastddpm.{op}: {name} out of range: values must lie in [0, {T - 1}]"
    if t.device.type == "cpu":
        low, high = torch.aminmax(t)
        if not (0 <= int(low) and int(high) < T):
            raise ValueError(message)
    else:
        torch._assert_async(((t >= 0) & (t < T)).all(), message)
