"""Checkpoints: weights as safetensors, configuration as JSON in the file's metadata.

One file holds everything needed to rebuild the model and the diffusion: the U-Net weights
(``model.*``), optionally their EMA (``ema.*``), the schedule's betas (``schedule.*``) and a
JSON header under the metadata key ``fastddpm``. A training run's checkpoints add the state
to resume from (``train.*`` tensors: optimizer moments, timestep-sampler statistics; the
rest — step, optimizer hyper-parameters, loss scale — in the header). Loading parses JSON and
raw tensors only, so it never executes code, and checks the header's every field and the
tensors' dtypes, so nothing is reinterpreted. Weights that are NaN/Inf are neither saved nor
loaded. Files are written atomically (`fastddpm.atomic`): temp file, fsync, rename, so a kill or
a full disk during a save leaves the previous checkpoint intact.

A run directory holds ``checkpoint-<step>.safetensors`` files; `latest_checkpoint` finds the
newest and `prune_checkpoints` keeps the newest K.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import validate
from .atomic import atomic_path
from .diffusion import GaussianDiffusion
from .schedule import NoiseSchedule
from .unet import UNet, UNetConfig

FORMAT = 1
# the header's "diffusion" holds GaussianDiffusion's options (GaussianDiffusion.config())
DIFFUSION_KEYS = tuple(p for p in inspect.signature(GaussianDiffusion).parameters if p not in ("schedule", "backend"))
SCHEDULE_DTYPES = {"schedule.betas": torch.float64, "schedule.timesteps": torch.int64}


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
    bad = _nonfinite_weights(tensors)
    if bad:
        raise CheckpointError(f"refusing to save {path}: {len(bad)} weight tensors are NaN/Inf ({bad[0]}, ...)")
    header = {"format": FORMAT, "unet": model.config.to_dict(), "diffusion": diffusion.config(), **info}
    try:
        with atomic_path(path, durable=True) as tmp:
            save_file(tensors, tmp, metadata={"fastddpm": json.dumps(header)})
    except (SafetensorError, OSError) as err:
        free = shutil.disk_usage(path.parent).free if path.parent.is_dir() else 0
        reason = "no space left on the device" if "space" in str(err).lower() else str(err).splitlines()[0]
        raise CheckpointError(f"cannot write checkpoint {path}: {reason} ({free / 2**20:.1f} MiB free in "
                              f"{path.parent}); the older checkpoints are intact") from None
    return path


def nonfinite(state: dict) -> list[str]:
    """The names of the floating-point tensors in ``state`` holding a NaN or an Inf."""
    floats = [(k, v) for k, v in state.items() if v.is_floating_point()]
    if not floats:
        return []
    finite = torch.stack([torch.isfinite(v).all() for _, v in floats]).tolist()  # one host sync
    return [k for (k, _), ok in zip(floats, finite) if not ok]


def _nonfinite_weights(tensors: dict) -> list[str]:
    """`nonfinite` over a checkpoint's weights and their EMA (``model.*``, ``ema.*``)."""
    return nonfinite({k: v for k, v in tensors.items() if k.startswith(("model.", "ema."))})


def digest(model: torch.nn.Module) -> str:
    """SHA-256 of the model's weights (names, dtypes, shapes and bytes): what identifies a model."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        value = value.detach().cpu().contiguous()
        h.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        h.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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
    check_header(header, tensors, path)
    return header, tensors


def check_header(header, tensors: dict, path) -> None:
    """A `CheckpointError` naming the first field of the header (or schedule tensor) that is missing,
    unknown or of the wrong type, so a bad file fails when it is read, not after work is done."""
    def fail(what: str):
        raise CheckpointError(f"checkpoint {path} has {what}")

    if not isinstance(header, dict):
        fail("a header that is not a JSON object")
    if header.get("format") != FORMAT:
        fail(f"an unsupported format {header.get('format')!r} (this fastddpm reads format {FORMAT})")
    for key in ("unet", "diffusion"):
        if not isinstance(header.get(key), dict):
            fail(f"no {key!r} object in its header")
    try:
        UNetConfig.from_dict(header["unet"])
    except (TypeError, ValueError) as err:
        fail(f"an invalid 'unet' config: {err}")
    unknown = sorted(set(header["diffusion"]) - set(DIFFUSION_KEYS))
    if unknown:
        fail(f"unknown 'diffusion' options {unknown} (known: {', '.join(DIFFUSION_KEYS)})")
    for key in ("train", "data", "optimizer", "scaler"):
        if key in header and not isinstance(header[key], dict):
            fail(f"a {key!r} entry that is not a JSON object: {header[key]!r}")
    try:
        validate.integer("step", header.get("step", 0), 0)
        data = header.get("data", {})
        if "name" in data and not isinstance(data["name"], str):
            raise ValueError(f"data name must be a string, got {data['name']!r}")
        if "shape" in data and (not isinstance(data["shape"], list) or len(data["shape"]) != 3):
            raise ValueError(f"data shape must be [C, H, W], got {data['shape']!r}")
        for size in data.get("shape", ()):
            validate.integer("data shape entry", size, 1)
        validate.integer("data levels", data.get("levels", 256), 2, 2**16 + 1)
        classes = data.get("classes")
        if classes is not None and (not isinstance(classes, list) or not all(isinstance(c, str) for c in classes)):
            raise ValueError(f"data classes must be a list of names, got {classes!r}")
        validate.integer("grid_scale", header.get("train", {}).get("grid_scale"), 1, optional=True)
    except ValueError as err:
        fail(f"an invalid header: {err}")
    for name, dtype in SCHEDULE_DTYPES.items():
        if name not in tensors:
            fail(f"no {name}")
        if tensors[name].dtype != dtype or tensors[name].ndim != 1:
            fail(f"{name} of dtype {tensors[name].dtype} and shape {tuple(tensors[name].shape)} "
                 f"(expected 1-D {dtype})")


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
    """``model`` with the checkpoint's ``state`` loaded, or a `CheckpointError` naming the mismatch
    (a tensor of another dtype included: loading would cast it silently)."""
    for name, value in model.state_dict().items():
        if name in state and state[name].dtype != value.dtype:
            raise CheckpointError(f"checkpoint {path} stores {name} as {state[name].dtype}, the model's is {value.dtype}")
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
    state = weights(tensors, prefix)
    bad = nonfinite(state)
    if bad:
        raise CheckpointError(f"checkpoint {path} has NaN/Inf weights ({len(bad)} of {len(state)} {prefix} tensors, "
                              f"{bad[0]}, ...): it cannot sample")
    model = build_model(header, state, path)
    try:
        schedule = NoiseSchedule(tensors["schedule.betas"], tensors["schedule.timesteps"])
        diffusion = GaussianDiffusion(schedule, **header["diffusion"])
    except ValueError as err:
        raise CheckpointError(f"checkpoint {path} has an invalid diffusion: {err}") from None
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


def newest_good_checkpoint(run_dir) -> tuple[Path, dict, dict, list[str]]:
    """(path, header, tensors, skipped) of the run's newest checkpoint that reads and verifies (its
    header, dtypes, finite weights); ``skipped`` says why each newer one was passed over. A
    `CheckpointError` when none verifies."""
    skipped = []
    for path in reversed(run_checkpoints(run_dir)):
        try:
            header, tensors = read_checkpoint(path)
            bad = _nonfinite_weights(tensors)
            if bad:
                raise CheckpointError(f"checkpoint {path} has NaN/Inf weights ({bad[0]}, ...)")
            return path, header, tensors, skipped
        except CheckpointError as err:
            skipped.append(str(err))
    if not skipped:
        raise CheckpointError(f"no checkpoint-*.safetensors in {run_dir}")
    raise CheckpointError(f"no checkpoint in {run_dir} can be read; the newest: {skipped[0]}")


def prune_checkpoints(run_dir, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints of the run."""
    for path in run_checkpoints(run_dir)[:-keep]:
        path.unlink()
