"""FID (Heusel et al. 2017) of users' own images, by torchmetrics' FrechetInceptionDistance in
torch-fidelity's Inception-v3: the network and resize of the original TensorFlow FID.

Needs the ``fid`` extra (``pip install fastddpm[fid]``) and the Inception weights as a local
file: nothing is downloaded. The file is ``weights=PATH``, else $FASTDDPM_INCEPTION_WEIGHTS,
else ``~/.cache/fastddpm/`` + `WEIGHTS_NAME`; get it from `WEIGHTS_URL`. It is read with
``torch.load(weights_only=True)`` (tensors only, no code), never by torch-fidelity, which
unpickles it with weights_only=False. Images are resized to 299x299 by torch-fidelity's port of TensorFlow 1.x's
bilinear resize (``antialias=False``), so scores match the original FID code's.
"""

from __future__ import annotations

import importlib.util
import io
import os
import sys
import types
from pathlib import Path

import numpy as np
import torch

WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_NAME}"
WEIGHTS_ENV = "FASTDDPM_INCEPTION_WEIGHTS"
DEFAULT_WEIGHTS = Path("~/.cache/fastddpm") / WEIGHTS_NAME
FEATURES = (64, 192, 768, 2048)  # the layers torch-fidelity's Inception can stop at; 2048 is FID's
_NEEDS_EXTRA = "fastddpm.metrics.fid needs torchmetrics and torch-fidelity: pip install fastddpm[fid]"


# ---- the libraries, imported on first use ------------------------------------------------------


def _torchmetrics_fid():
    """torchmetrics' (FrechetInceptionDistance, NoTrainInceptionV3), or a one-line ImportError."""
    try:
        import torch_fidelity  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != "torchvision" or importlib.util.find_spec("torch_fidelity") is None:
            raise ImportError(f"{_NEEDS_EXTRA} ({e})") from None
        # torch_fidelity/__init__.py imports its CLIP/VGG/DINOv2 extractors, which need
        # torchvision; the three modules torchmetrics' FID uses (feature_extractor_inceptionv3,
        # helpers, interpolate_compat_tensorflow) need only torch. Without torchvision, register
        # the package bare so those submodules import on their own.
        package = types.ModuleType("torch_fidelity")
        package.__path__ = list(importlib.util.find_spec("torch_fidelity").submodule_search_locations)
        sys.modules["torch_fidelity"] = package
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
    except ImportError as e:
        raise ImportError(f"{_NEEDS_EXTRA} ({e})") from None
    return FrechetInceptionDistance, NoTrainInceptionV3


# ---- the weights ---------------------------------------------------------------------------------


def weights_path(weights: str | os.PathLike | None = None) -> Path:
    """The Inception weights file: ``weights``, else $FASTDDPM_INCEPTION_WEIGHTS, else the default
    place; a FileNotFoundError saying what to download and where to put it if it is missing."""
    path = Path(os.path.expanduser(os.fspath(weights or os.environ.get(WEIGHTS_ENV) or DEFAULT_WEIGHTS)))
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights not found at {path}: download {WEIGHTS_URL} and put it there "
            f"(or pass weights=PATH, or set {WEIGHTS_ENV})"
        )
    return path


def load_weights(weights: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """The state dict in the weights file (`weights_path`), read as tensors only."""
    path = weights_path(weights)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt file, or one holding more than tensors
        raise ValueError(f"cannot read Inception weights {path}: {' '.join(str(e).split())[:300]}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"Inception weights {path} are not a state dict of tensors")
    return state


def inception(feature: int = 2048, weights: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """torchmetrics' NoTrainInceptionV3 (torch-fidelity's network, TF-compatible resize) stopping
    at ``feature`` and holding ``weights`` (a state dict, loaded strictly), or PyTorch's default
    initialisation when None: uint8 [N, 3, H, W] → float32 [N, feature]."""
    if feature not in FEATURES:
        raise ValueError(f"feature must be one of {', '.join(map(str, FEATURES))}, got {feature!r}")
    _, NoTrainInceptionV3 = _torchmetrics_fid()

    class Inception(NoTrainInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            # torch-fidelity's constructor loads the weights file it is given with
            # weights_only=False (it may run code); it is given an empty dict, skipped here.
            if state_dict:
                return super().load_state_dict(state_dict, strict=strict, assign=assign)

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    net = Inception("inception-v3-compat", [str(feature)], empty, antialias=False)
    if weights is not None:
        net.load_state_dict(weights)
    return net


# ---- FID -------------------------------------------------------------------------------------------


def _check_images(name: str, images) -> torch.Tensor:
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        got = getattr(images, "dtype", type(images).__name__)
        raise ValueError(f"{name} must be uint8 images [N, 3, H, W] (pixels 0..255), got {got}")
    if images.ndim != 4 or images.shape[1] not in (1, 3) or len(images) < 2:
        raise ValueError(f"{name} must have shape [N, 3 or 1, H, W] with N >= 2, got {tuple(images.shape)}")
    return images.expand(-1, 3, -1, -1)  # grayscale as RGB


class InceptionFID:
    """FID accumulated over batches: `add(images, real=...)` as often as needed, then `compute`.

    ``weights``: a path (see the module docstring). ``feature``: the Inception layer, 2048 for
    FID as published. Images are uint8 [N, 3, H, W] (or [N, 1, H, W], repeated to RGB), numpy
    or torch, of any size. FID is biased by the numbers of images: compare at equal numbers.
    """

    def __init__(self, weights: str | os.PathLike | None = None, *, feature: int = 2048,
                 device: str | torch.device = "cpu", batch_size: int = 64):
        FrechetInceptionDistance, _ = _torchmetrics_fid()
        net = inception(feature, load_weights(weights))
        self.metric = FrechetInceptionDistance(feature=net).to(device)
        self.device = torch.device(device)
        self.batch_size = batch_size

    @torch.no_grad()
    def add(self, images, *, real: bool) -> None:
        images = _check_images("real" if real else "fake", images)
        for batch in images.split(self.batch_size):
            self.metric.update(batch.to(self.device), real=real)

    def compute(self) -> float:
        return float(self.metric.compute())

    def reset_fake(self) -> None:
        """Forget the fake images, keep the real ones (to score several models against one set)."""
        self.metric.reset_real_features = False
        self.metric.reset()


def fid(real, fake, weights: str | os.PathLike | None = None, *, feature: int = 2048,
        device: str | torch.device = "cpu", batch_size: int = 64) -> float:
    """FID between uint8 image sets ``real`` and ``fake`` [N, 3, H, W] (see `InceptionFID`)."""
    real, fake = _check_images("real", real), _check_images("fake", fake)
    score = InceptionFID(weights, feature=feature, device=device, batch_size=batch_size)
    score.add(real, real=True)
    score.add(fake, real=False)
    return score.compute()
