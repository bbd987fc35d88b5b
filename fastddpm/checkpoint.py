"""Checkpoints: weights as safetensors, configuration as JSON in the file's metadata.

One file holds everything needed to rebuild the model and the diffusion: the U-Net weights
(``model.*``), optionally their EMA (``ema.*``), the schedule's betas (``schedule.*``) and a
JSON header under the metadata key ``fastddpm``. A training run's checkpoints add the state
to resume from (``train.*`` tensors: optimizer moments, timestep-sampler statistics; the
rest — step, optimizer hyper-parameters, loss scale — in the header). Loading parses JSON and
raw tensors only, so it never executes code. Files are written atomically: temp file, fsync,
rename, so a kill during a save leaves the previous checkpoint intact.

A run directory holds ``checkpoint-<step>.safetensors`` files; `latest_checkpoint` finds the
newest and `prune_checkpoints` keeps the newest K.
"""

from __future__ import annotations

import json
import os
import re
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


def save_checkpoint(path, model: UNet, diffusion: GaussianDiffusion, ema: UNet | None = None,
                    train_state: dict | None = None, **info) -> Path:
    """Write model (+ EMA) weights, the schedule and the configuration to ``path``; ``info``
    (JSON-serialisable: step, dataset, …) is stored in the header, ``train_state`` (name →
    tensor) under ``train.*``."""
    path = Path(path)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    tensors.update({f"train.{k}": v for k, v in (train_state or {}).items()})
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


def read_checkpoint(path) -> tuple[dict, dict]:
    """(header, name → tensor) of a fastddpm checkpoint, or a `CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if "fastddpm" not in meta:
                raise CheckpointError(f"not a fastddpm checkpoint (no fastddpm header): {path}")
            header = json.loads(meta["fastddpm"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except (SafetensorError, OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"unsupported checkpoint format {header.get('format')!r} in {path}")
    for name in ("schedule.betas", "schedule.timesteps"):
        if name not in tensors:
            raise CheckpointError(f"checkpoint {path} has no {name}")
    return header, tensors


def weights(tensors: dict, prefix: str) -> dict:
    """The state dict stored under ``prefix`` (``model``, ``ema``, ``train``)."""
    return {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def build_model(header: dict, state: dict, path) -> UNet:
    """The U-Net of a checkpoint's header with ``state`` loaded."""
    try:
        model = UNet(UNetConfig.from_dict(header["unet"]))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} has no valid U-Net config: {err}") from None
    return load_weights(model, state, path)


def load_weights(model: UNet, state: dict, path) -> UNet:
    """``model`` with the checkpoint's ``state`` loaded, or a `CheckpointError` naming the mismatch."""
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        detail = " ".join(str(err).split("\n")[1:2]).strip()
        raise CheckpointError(f"checkpoint {path} does not match its U-Net config: {detail}") from None
    return model


def load_checkpoint(path, device="cpu", use_ema: bool = True) -> tuple[UNet, GaussianDiffusion, dict]:
    """(model in eval mode, diffusion, header) from a checkpoint written by `save_checkpoint`.

    The EMA weights are used when present and ``use_ema`` is set. ``path`` may be a run
    directory: its newest checkpoint is loaded.
    """
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"no checkpoint-*.safetensors in {path}")
        path = found
    header, tensors = read_checkpoint(path)
    prefix = "ema" if use_ema and any(k.startswith("ema.") for k in tensors) else "model"
    model = build_model(header, weights(tensors, prefix), path)
    schedule = NoiseSchedule(tensors["schedule.betas"], tensors["schedule.timesteps"])
    diffusion = GaussianDiffusion(schedule, **header["diffusion"])
    return model.to(device).eval(), diffusion, header


# ---- run directories ---------------------------------------------------------------------------

_PATTERN = re.compile(r"checkpoint-(\d+)\.safetensors")


def checkpoint_path(run_dir, step: int) -> Path:
    return Path(run_dir) / f"checkpoint-{step:08d}.safetensors"


def run_checkpoints(run_dir) -> list[Path]:
    """The run's checkpoints, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _PATTERN.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir) -> Path | None:
    found = run_checkpoints(run_dir)
    return found[-1] if found else None


def prune_checkpoints(run_dir, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints of the run."""
    for path in run_checkpoints(run_dir)[:-keep]:
        path.unlink()
