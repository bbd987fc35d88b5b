"""Smoke test of an installed wheel: the native kernels load and agree with the reference."""

import torch

import fastddpm
from fastddpm import GaussianDiffusion, NoiseSchedule, UNet, kernels, reference
from fastddpm.ops import FUSED

assert "site-packages" in fastddpm.__file__, fastddpm.__file__
assert kernels.native is not None, "the wheel has no native kernels"
coef = NoiseSchedule.linear(1000).coefficients("cpu")
x, out, z = torch.randn(3, 3, 5, 7), torch.randn(3, 3, 5, 7), torch.randn(3, 3, 5, 7)
t = torch.tensor([0, 500, 999])
options = dict(prediction="eps", variance="fixed_small", clip_denoised=True)
fused = FUSED.reverse_step(x, out, t, coef.table, z, None, *options.values(), None)
torch.testing.assert_close(fused, reference.reverse_step(x, out, t, z, coef, **options), rtol=1e-6, atol=1e-6)
model = UNet.from_preset("ddpm-tiny")
images = GaussianDiffusion(NoiseSchedule.linear(10)).sample(model, (2, 3, 16, 16), seed=0, progress=False)
assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
print("wheel smoke test passed:", fastddpm.__file__)
