"""The "auto" U-Net: an architecture derived from the data's (C, H, W) and a compute budget.

Levels and attention follow DDPM's and improved-diffusion's practice for the image size: the
resolution is halved while it stays even, down to 2×2, for 4 levels, or on to 8×8 for larger
images (64 → 8: 4 levels, 256 → 8: 6, as DDPM's 256×256 model); channel multipliers are
(1, 2, 2, 2, 4, 4) cut to the levels; single-head attention sits at the first level below the
input with at most 16×16 positions (16 at 32×32 and above, as DDPM; 14 at 28×28; 4 at 8×8).
The width is the budget's: the widest ``ch`` of `WIDTHS` (two residual blocks per level from
64 up, as DDPM's models) whose forward pass costs at most ``budget`` MFLOPs per pixel. A U-Net's
cost per pixel barely depends on the image size (its top level dominates), so one budget means
the same network weight at 8×8 and at 64×64, and training time grows with the pixel count. The
default, 1 MFLOP per pixel, is ch 32 (about 0.5 MFLOPs per pixel; ch 48 is 1.1): at 8×8 that is
the digits model, 1.1M parameters.
"""
from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

import torch

from . import validate
from .unet import PRESETS, UNet, UNetConfig

DEFAULT_BUDGET = 1.0  # forward MFLOPs per pixel: ch 32
MULTIPLIERS = (1, 2, 2, 2, 4, 4)
WIDTHS = (16, 32, 48, 64, 96, 128, 160, 192, 256)  # GroupNorm's groups, min(32, ch / 2), divide each


def levels_for(size: int) -> list[int]:
    """The level resolutions of a ``size``×``size`` U-Net: halved while even and at least 4, for 4
    levels or until 8×8, at most 6."""
    levels = [size]
    while (levels[-1] % 2 == 0 and levels[-1] >= 4 and (len(levels) < 4 or levels[-1] > 8)
           and len(levels) < len(MULTIPLIERS)):
        levels.append(levels[-1] // 2)
    return levels


def attention_for(levels: list[int]) -> tuple[int, ...]:
    """Attention at the first level below the input with at most 16×16 positions (none for one level)."""
    return next(((r,) for r in levels[1:] if r <= 16), ())


def auto_config(channels: int, size: int, budget: float = DEFAULT_BUDGET, *, dropout: float = 0.0,
                learned_variance: bool = False, num_classes: int = 0) -> UNetConfig:
    """The widest U-Net for ``channels``×``size``×``size`` images within ``budget`` forward MFLOPs
    per pixel (the narrowest, ch 16, if none fits); ``num_classes`` > 0 makes it class-conditional
    (the class embedding's cost is one row a call, nothing next to the convolutions)."""
    check_budget(budget)
    chosen = _config(channels, size, WIDTHS[0], dropout, learned_variance)
    for ch in WIDTHS[1:]:
        config = _config(channels, size, ch, dropout, learned_variance)
        if cost_per_pixel(config) > budget:
            break
        chosen = config
    return replace(chosen, num_classes=num_classes)


def check_budget(budget) -> float:
    """``budget`` if it is a finite number above 0 (forward MFLOPs per pixel), else a ValueError."""
    if not validate.number("model_budget", budget, 0) > 0:
        raise ValueError(f"model_budget must be a positive number (MFLOPs per pixel), got {budget!r}")
    return budget


def preset_for_data(name: str, channels: int, size: int, **overrides) -> UNetConfig:
    """The U-Net preset ``name`` for ``channels``×``size``×``size`` images, exactly as it is but for
    its input channels; images it cannot take get an error that says what would fit."""
    preset = PRESETS[name]
    try:
        return replace(preset, in_channels=channels, resolution=size, **overrides)
    except ValueError as err:
        sizes = [s for s in range(2, 513) if _fits(preset, s)]
        raise ValueError(f"model {name} does not take {size}x{size} images ({err}); it takes "
                         f"{', '.join(map(str, sizes))}: resize the data (an image folder: --image-size "
                         f"{min(sizes, key=lambda s: abs(s - size))}) or use the auto model, sized to the data "
                         f'("model": "auto", the default)') from None


def _fits(preset: UNetConfig, size: int) -> bool:
    try:
        replace(preset, resolution=size)
    except ValueError:
        return False
    return True


def _config(channels: int, size: int, ch: int, dropout: float, learned_variance: bool) -> UNetConfig:
    levels = levels_for(size)
    return UNetConfig(in_channels=channels, resolution=size, ch=ch, ch_mult=MULTIPLIERS[: len(levels)],
                      num_res_blocks=2 if ch >= 64 else 1, attn_resolutions=attention_for(levels), dropout=dropout,
                      groups=min(32, ch // 2), learned_variance=learned_variance)


@lru_cache(maxsize=256)
def cost_per_pixel(config: UNetConfig) -> float:
    """Forward MFLOPs per pixel of one image, counted by torch on the meta device (nothing allocated)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = UNet(config)
        x = torch.zeros(1, config.in_channels, config.resolution, config.resolution)
        t = torch.zeros(1, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        model(x, t)
    return counter.get_total_flops() / 1e6 / config.resolution**2


def describe(config: UNetConfig) -> str:
    """One line on a U-Net: widths, blocks, attention, parameters and cost."""
    with torch.device("meta"):
        params = sum(p.numel() for p in UNet(config).parameters())
    attention = ", ".join(f"{r}x{r}" for r in config.attn_resolutions) or "none but the middle"
    return (f"{config.in_channels}x{config.resolution}x{config.resolution} images, ch {config.ch} x "
            f"{tuple(config.ch_mult)}, {config.num_res_blocks} residual block(s) a level, attention at {attention}"
            f"{f', {config.num_classes} classes' if config.num_classes else ''}; "
            f"{params:,} parameters, {cost_per_pixel(config):.2f} forward MFLOPs per pixel")
