"""The auto U-Net: levels, attention and width derived from the data and the budget."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fastddpm.sizing import (
    WIDTHS,
    attention_for,
    auto_config,
    cost_per_pixel,
    describe,
    levels_for,
    preset_for_data,
)
from fastddpm.unet import PRESETS, UNet


@pytest.mark.parametrize(
    "size, levels, attention",
    [
        (8, [8, 4, 2], (4,)),
        (12, [12, 6, 3], (6,)),
        (28, [28, 14, 7], (14,)),
        (32, [32, 16, 8, 4], (16,)),  # DDPM's CIFAR-10 levels and attention
        (64, [64, 32, 16, 8], (16,)),
        (256, [256, 128, 64, 32, 16, 8], (16,)),  # DDPM's 256x256 levels and attention
        (7, [7], ()),
    ],
)
def test_levels_halve_while_even_and_attention_sits_at_16_or_below(size, levels, attention):
    assert levels_for(size) == levels and attention_for(levels) == attention
    assert auto_config(3, size).attn_resolutions == attention


def test_the_default_budget_at_8x8_is_the_digits_model():
    assert auto_config(1, 8) == PRESETS["ddpm-digits"]


@pytest.mark.parametrize("size", [8, 28, 32])
def test_the_width_is_the_widest_within_the_budget(size):
    for budget in (1.0, 4.0, 12.0):
        config = auto_config(3, size, budget)
        assert cost_per_pixel(config) <= budget
        wider = auto_config(3, size, cost_per_pixel(config) * 1.0001 + 10)  # a budget that admits more
        assert wider.ch > config.ch
        assert config.ch == WIDTHS[-1] or cost_per_pixel(auto_config(3, size, 1e9)) > budget
    assert auto_config(3, 32, 1e-3).ch == WIDTHS[0]  # nothing fits: the narrowest


def test_the_cost_counted_on_the_meta_device_is_the_cost_of_running_it():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    config = auto_config(3, 28)
    model = UNet(config)
    # the CPU's fused attention kernel has no FLOP formula in torch; its math (two bmm) has
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(torch.zeros(1, 3, 28, 28), torch.zeros(1, dtype=torch.long))
    assert cost_per_pixel(config) == counter.get_total_flops() / 1e6 / 28**2


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [8, 12, 16, 28, 32, 48, 64])
def test_auto_models_run_on_every_size_from_8_to_64(channels, size):
    model = UNet(auto_config(channels, size, learned_variance=True))
    out = model(torch.zeros(2, channels, size, size), torch.tensor([0, 999]))
    assert out.shape == (2, 2 * channels, size, size)


def test_presets_stay_exact_and_say_what_fits():
    assert preset_for_data("ddpm-cifar10", 3, 32) == PRESETS["ddpm-cifar10"]
    assert preset_for_data("ddpm-256", 3, 256) == PRESETS["ddpm-256"]
    with pytest.raises(ValueError, match=r"model ddpm-cifar10 does not take 28x28 images .* it takes 16, 32, 64, 128: "
                                         r"resize the data \(an image folder: --image-size 32\) or use the auto model"):
        preset_for_data("ddpm-cifar10", 1, 28)
    with pytest.raises(ValueError, match="model_budget must be a positive number"):
        auto_config(3, 32, 0)


def test_describe_names_the_architecture_and_its_size():
    text = describe(auto_config(1, 28))
    assert text.startswith("1x28x28 images, ch 32 x (1, 2, 2), 1 residual block(s) a level, attention at 14x14; ")
    assert f"{sum(p.numel() for p in UNet(auto_config(1, 28)).parameters()):,} parameters" in text
