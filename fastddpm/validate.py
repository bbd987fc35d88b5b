"""Validation of values a user hands in (config files, checkpoint headers, API arguments): each returns
the value or raises a ValueError that names it, says what it must be and shows what it got.

JSON and YAML make it easy to write ``"false"`` for false or ``"0.9"`` for 0.9; Python's truthiness
would take the first as true, so every check is by type: a bool is not an integer, a string is
not a number, and only ``true``/``false`` are flags.
"""

from __future__ import annotations

import math

import torch


def integer(name: str, value, low: int | None = None, high: int | None = None, optional: bool = False):
    """An int in [low, high) (either bound may be open); None too when ``optional``."""
    if value is None and optional:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or not _within(value, low, high, inclusive=False):
        raise ValueError(f"{name} must be {_integer_kind(low, high)}{' or null' if optional else ''}, got {value!r}")
    return value


def number(name: str, value, low: float | None = None, high: float | None = None, high_open: bool = False,
           optional: bool = False):
    """A finite int or float in [low, high] ([low, high) with ``high_open``); None too when ``optional``."""
    if value is None and optional:
        return value
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or not _within(value, low, high, inclusive=not high_open)):
        raise ValueError(f"{name} must be a finite number{_interval(low, high, high_open)}"
                         f"{' or null' if optional else ''}, got {value!r}")
    return value


def flag(name: str, value, optional: bool = False):
    """True or False (not a string such as "false"); None too when ``optional``."""
    if (value is None and optional) or isinstance(value, bool):
        return value
    raise ValueError(f"{name} must be true or false{' or null' if optional else ''}, got {value!r}")


def device(name: str, value) -> str:
    """A torch device string this machine has: "cpu", "cuda", "cuda:1", ... (CUDA only where available)."""
    try:
        if not isinstance(value, str):
            raise TypeError
        parsed = torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name} must be a torch device such as cpu or cuda, got {value!r}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name} {value!r} requested but CUDA is not available on this machine")
    return value


def _within(value, low, high, inclusive: bool) -> bool:
    if low is not None and value < low:
        return False
    return high is None or (value <= high if inclusive else value < high)


def _interval(low, high, high_open: bool) -> str:
    if low is None and high is None:
        return ""
    left = "(-inf" if low is None else f"[{low:g}"
    right = "inf)" if high is None else f"{high:g}{')' if high_open else ']'}"
    return f" in {left}, {right}"


def _integer_kind(low, high) -> str:
    if high is None:
        return {0: "a non-negative integer", 1: "a positive integer"}.get(low, "an integer" if low is None else
                                                                          f"an integer >= {low}")
    return f"an integer in [{low}, {_power(high)})"


def _power(n: int) -> str:
    """2**k for the large powers of two (seeds' bounds), else the number."""
    return f"2**{n.bit_length() - 1}" if n >= 2**16 and n & (n - 1) == 0 else str(n)
