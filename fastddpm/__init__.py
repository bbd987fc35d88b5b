"""fastddpm: Denoising Diffusion Probabilistic Models (Ho et al. 2020), exactly and fast."""

from .diffusion import GaussianDiffusion
from .schedule import NoiseSchedule
from .unet import UNet, UNetConfig

__all__ = ["GaussianDiffusion", "NoiseSchedule", "UNet", "UNetConfig"]
__version__ = "0.1.0"
