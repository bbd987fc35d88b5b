"""Bridges to other diffusion libraries.

Each submodule imports its library itself, so ``import fastddpm`` (and ``import
fastddpm.interop``) never does:

- `fastddpm.interop.diffusers`: 🤗 diffusers — the official DDPM checkpoints (UNet2DModel +
  DDPMScheduler folders) as fastddpm models, and `FastDDPMScheduler`, a drop-in
  DDPMScheduler on the fused reverse step. Needs ``pip install fastddpm[diffusers]``.
"""
