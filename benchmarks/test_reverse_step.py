"""One reverse step at 64×3×32×32 on the CPU: the native kernel (in-kernel noise) called
directly, the same through the torch operator (what GaussianDiffusion calls: adds the
dispatcher and the input checks), the eager reference (noise drawn separately), and diffusers'
DDPMScheduler.step.

Run with ``pytest benchmarks/test_reverse_step.py --benchmark-only``. Nothing here asserts a speed.
"""

import pytest
import torch

from fastddpm import NoiseSchedule, reference, rng
from fastddpm.kernels.reverse_step import native_reverse_step
from fastddpm.ops import FUSED

SHAPE = (64, 3, 32, 32)
OPTIONS = dict(prediction="eps", variance="fixed_small", clip_denoised=True)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)


def test_native_in_kernel_noise(benchmark, inputs):
    x, out = inputs
    table = NoiseSchedule.linear(1000).coefficients("cpu").table
    t = torch.full((SHAPE[0],), 500)
    key = rng.noise_key(1)
    benchmark(native_reverse_step, x, out, t, table, None, key, "eps", "fixed_small", True, None)


def test_fused_op_in_kernel_noise(benchmark, inputs):
    x, out = inputs
    coef = NoiseSchedule.linear(1000).coefficients("cpu")
    t = torch.full((SHAPE[0],), 500)
    benchmark(FUSED.reverse_step, x, out, t, coef.table, None, rng.noise_key(1), "eps", "fixed_small", True, None)


def test_eager_reference(benchmark, inputs):
    x, out = inputs
    coef = NoiseSchedule.linear(1000).coefficients("cpu")
    t = torch.full((SHAPE[0],), 500)
    g = torch.Generator().manual_seed(1)
    benchmark(lambda: reference.reverse_step(x, out, t, torch.randn(SHAPE, generator=g), coef, **OPTIONS))


def test_diffusers_ddpm_scheduler_step(benchmark, inputs):
    diffusers = pytest.importorskip("diffusers")
    x, out = inputs
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                        variance_type="fixed_small", clip_sample=True)
    g = torch.Generator().manual_seed(1)
    benchmark(lambda: scheduler.step(out, 500, x, generator=g).prev_sample)
