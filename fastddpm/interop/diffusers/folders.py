"""Local diffusers folders: `load_pretrained` of a pipeline or model folder → (`UNet`,
`GaussianDiffusion`). Config JSON and safetensors only: never a pickle, never the hub."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file

from ...diffusion import GaussianDiffusion
from ...unet import UNet
from .scheduler import diffusion_from_diffusers
from .unet import _unet_from_state, unet_config_from_diffusers

_WEIGHTS = "diffusion_pytorch_model"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path}: {str(err).splitlines()[0]}") from None
    if isinstance(data, dict):
        return data
    raise ValueError(f"{path} is not a JSON object")


def _weights_file(folder: Path) -> Path:
    path = folder / f"{_WEIGHTS}.safetensors"
    if path.is_file():
        return path
    if (folder / f"{_WEIGHTS}.safetensors.index.json").is_file():
        raise ValueError(f"{folder} holds sharded weights, which fastddpm does not read; save them unsharded")
    if (folder / f"{_WEIGHTS}.bin").is_file():
        raise ValueError(f"{folder} holds only {_WEIGHTS}.bin, a pickle (loading it can run code), which fastddpm "
                         f"refuses; convert it to {_WEIGHTS}.safetensors (diffusers: save_pretrained(..., "
                         "safe_serialization=True))")
    raise ValueError(f"no weights in {folder}: {path.name} not found")


def _read_weights(path: Path) -> dict:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read {path}: {str(err).splitlines()[0]}") from None


def _check_class(what: str, name, allowed: tuple[str, ...]) -> None:
    if name is not None and name not in allowed:
        raise ValueError(f"{what} is a {name}; fastddpm reads {' or '.join(allowed)}")


def load_pretrained(path, device="cpu") -> tuple[UNet, GaussianDiffusion]:
    """(UNet in eval mode on ``device``, GaussianDiffusion) from a local diffusers folder.

    ``path`` is a pipeline folder (``model_index.json``, ``unet/config.json`` and
    ``unet/diffusion_pytorch_model.safetensors``, ``scheduler/scheduler_config.json``) as
    ``DDPMPipeline.save_pretrained`` or a hub download writes it, or a model folder
    (``config.json`` + weights, as ``UNet2DModel.save_pretrained`` writes it) with an optional
    ``scheduler_config.json`` beside them; without one, DDPMScheduler's defaults (the paper's
    linear schedule, T = 1000, fixed_small, clipped ε-prediction) apply, with a warning.
    Nothing is downloaded: a missing path is an error, and so are pickled (.bin) weights.
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"diffusers folder not found: {path} (fastddpm reads local folders only, never the hub)")
    if (path / "model_index.json").is_file():
        index = _read_json(path / "model_index.json")
        for component, allowed in (("unet", ("UNet2DModel",)), ("scheduler", ("DDPMScheduler", "FastDDPMScheduler"))):
            entry = index.get(component)
            if not (isinstance(entry, list) and len(entry) == 2):
                raise ValueError(f"{path / 'model_index.json'} lists no {component}")
            _check_class(f"the pipeline's {component}", entry[1], allowed)
        unet_dir, scheduler_file = path / "unet", path / "scheduler" / "scheduler_config.json"
        if not scheduler_file.is_file():
            raise ValueError(f"scheduler config not found: {scheduler_file}")
    elif (path / "config.json").is_file():
        unet_dir, scheduler_file = path, path / "scheduler_config.json"
    else:
        raise ValueError(f"not a diffusers folder: {path} has neither model_index.json (a pipeline) "
                         "nor config.json (a model)")
    if not (unet_dir / "config.json").is_file():
        raise ValueError(f"U-Net config not found: {unet_dir / 'config.json'}")
    unet_config = _read_json(unet_dir / "config.json")
    _check_class(f"{unet_dir / 'config.json'}", unet_config.get("_class_name"), ("UNet2DModel",))
    weights = _weights_file(unet_dir)
    if scheduler_file.is_file():
        scheduler_config = _read_json(scheduler_file)
        _check_class(f"{scheduler_file}", scheduler_config.get("_class_name"), ("DDPMScheduler", "FastDDPMScheduler"))
    else:
        warnings.warn(f"no {scheduler_file.name} in {path}: using DDPMScheduler's defaults", stacklevel=2)
        scheduler_config = {}
    cfg = unet_config_from_diffusers(unet_config)
    diffusion = diffusion_from_diffusers(scheduler_config)
    if (diffusion.variance == "learned_range") != cfg.learned_variance:
        raise ValueError(f"variance_type {diffusion.variance!r} does not fit a U-Net with out_channels={cfg.out_channels} "
                         f"(learned_range needs 2 × in_channels = {2 * cfg.in_channels})")
    model = _unet_from_state(cfg, _read_weights(weights), str(weights))
    return model.to(device), diffusion
