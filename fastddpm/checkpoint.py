"""Checkpoints: weights as safetensors, configuration as JSON in the file's metadata.

One file holds everything needed to rebuild the model and the diffusion: the U-Net weights
(``model.*``), optionally their EMA (``ema.*``), the schedule's betas (``schedule.*``) and a
JSON header under the metadata key ``fastddpm``. Loading parses JSON and raw tensors only,
so it never executes code. Files are written atomically: temp file, fsync, rename.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .diffusion import GaussianDiffusion
from .schedule import NoiseSchedule
from .unet import UNet, UNetConfig

FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, or not a fastddpm checkpoint."""


def save_checkpoint(path, model: UNet, diffusion: GaussianDiffusion, ema: UNet | None = None, **info) -> Path:
    """Write model (+ EMA) weights, the schedule and the configuration to ``path``; ``info``
    (JSON-serialisable: step, dataset, …) is stored in the header."""
    path = Path(path)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    tensors["schedule.betas"] = diffusion.schedule.betas
    tensors["schedule.timesteps"] = diffusion.schedule.timesteps
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = {"format": FORMAT, "unet": model.config.to_dict(), "diffusion": diffusion.config(), **info}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"fastddpm": json.dumps(header)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checkpoint(path, device="cpu", use_ema: bool = True) -> tuple[UNet, GaussianDiffusion, dict]:
    """(model in eval mode, diffusion, header) from a checkpoint written by `save_checkpoint`.

    The EMA weights are used when present and ``use_ema`` is set.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if "fastddpm" not in meta:
                raise CheckpointError(f"not a fastddpm checkpoint (no fastddpm header): {path}")
            header = json.loads(meta["fastddpm"])
            prefix = "ema." if use_ema and any(k.startswith("ema.") for k in f.keys()) else "model."
            weights = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
            schedule = NoiseSchedule(f.get_tensor("schedule.betas"), f.get_tensor("schedule.timesteps"))
    except (SafetensorError, OSError, json.JSONDecodeError, KeyError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {str(err).splitlines()[0]}") from None
    if header.get("format") != FORMAT:
        raise CheckpointError(f"unsupported checkpoint format {header.get('format')!r} in {path}")
    model = UNet(UNetConfig.from_dict(header["unet"]))
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        detail = " ".join(str(err).split("\n")[1:2]).strip()
        raise CheckpointError(f"checkpoint {path} does not match its U-Net config: {detail}") from None
    diffusion = GaussianDiffusion(schedule, **header["diffusion"])
    return model.to(device).eval(), diffusion, header
