"""🤗 diffusers interop: the official DDPM checkpoints in fastddpm, and fastddpm inside diffusers.

The paper's released models are on the hub in diffusers' format (google/ddpm-cifar10-32,
-celebahq-256, -church-256, -bedroom-256, -cat-256): a `UNet2DModel` and a `DDPMScheduler`
config. This package maps them onto fastddpm and back:

- `unet`: `unet_from_diffusers` / `unet_to_diffusers`, weights between `UNet2DModel` and `UNet`
  by name, strictly; `unet_config_from_diffusers`.
- `scheduler`: `diffusion_from_diffusers`, and `FastDDPMScheduler`, `DDPMScheduler`'s interface
  and numbers on the fused `reverse_step`, so
  ``DDPMPipeline(unet=unet, scheduler=FastDDPMScheduler.from_config(config))`` runs as is.
- `dpm_solver`: `FastDPMSolverScheduler`, `DPMSolverMultistepScheduler`'s interface (DPM-Solver++
  and its SDE variant) on the fused, in-place `solver_step`.
- `folders`: `load_pretrained`, a local diffusers folder (a pipeline, or one model folder) →
  (`UNet`, `GaussianDiffusion`).

Noise and ``generator``: `FastDDPMScheduler.step` draws its noise exactly as
`DDPMScheduler.step` does — ``randn_tensor(sample.shape, generator=generator, ...)`` in the
model output's dtype, and only when t > 0 — and hands it to the fused operator as its noise
tensor. So a pipeline called with a seeded generator consumes the generator as with
DDPMScheduler and returns the same images, to float rounding. The noise contract's keyed
in-kernel noise (image k of a seed is fixed in any batch) is what `fastddpm.sampler.Sampler`
and ``fastddpm sample --from-diffusers`` use.
"""

try:
    import diffusers  # noqa: F401  (the submodules import from it)
except ImportError as err:
    raise ImportError(
        f"fastddpm.interop.diffusers needs diffusers ({err}); install it with: pip install fastddpm[diffusers]"
    ) from err

from .dpm_solver import FastDPMSolverScheduler
from .folders import load_pretrained
from .scheduler import FastDDPMScheduler, diffusion_from_diffusers
from .unet import unet_config_from_diffusers, unet_from_diffusers, unet_to_diffusers

__all__ = [
    "FastDDPMScheduler", "FastDPMSolverScheduler", "diffusion_from_diffusers", "load_pretrained", "unet_config_from_diffusers",
    "unet_from_diffusers", "unet_to_diffusers",
]
