"""CPU timings of the eager reference ops: the baseline every fused kernel is measured against.

Run with ``pytest benchmarks/ --benchmark-only`` (pytest-benchmark). Nothing here asserts a speed.
"""

import pytest
import torch

from fastddpm import NoiseSchedule, reference

SIZES = {"64x3x32x32": (64, 3, 32, 32), "256x3x32x32": (256, 3, 32, 32)}


@pytest.fixture(scope="module")
def coef():
    return NoiseSchedule.linear(1000).coefficients("cpu", torch.float32)


def inputs(shape, coef):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    t = torch.randint(0, coef.num_timesteps, (shape[0],), generator=g)
    return x, torch.randn(shape, generator=g), torch.randn(shape, generator=g), t


@pytest.mark.parametrize("size", SIZES)
def test_reverse_step(benchmark, coef, size):
    x, out, z, t = inputs(SIZES[size], coef)
    benchmark(reference.reverse_step, x, out, t, z, coef, prediction="eps", variance="fixed_small", clip_denoised=True)


@pytest.mark.parametrize("size", SIZES)
def test_q_sample_and_simple_loss_backward(benchmark, coef, size):
    x0, noise, pred, t = inputs(SIZES[size], coef)
    pred.requires_grad_()

    def step():
        reference.q_sample(x0, t, noise, coef)
        loss, _ = reference.simple_loss(pred, x0, noise, t, coef, prediction="eps")
        loss.backward()

    benchmark(step)
