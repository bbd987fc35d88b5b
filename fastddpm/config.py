"""Training configurations: `TrainConfig`, its presets and config files.

A preset is a JSON file in ``fastddpm/presets/`` (``digits``: the default main job,
``cifar10``: Ho et al. 2020's recipe) holding the fields that differ from `TrainConfig`'s
defaults. A config file (``--config``) is JSON, or YAML when PyYAML is installed; it may name a
``preset`` to start from and overrides its fields. Keys starting with ``_`` are comments.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from importlib import resources
from pathlib import Path

from . import options, validate
from .datasets.folder import check_channels, parse_background
from .schedule import SCHEDULES
from .sizing import DEFAULT_BUDGET, check_budget
from .solvers import SOLVERS
from .unet import PRESETS as UNET_PRESETS


@dataclass(frozen=True)
class TrainConfig:
    model: str = "auto"  # "auto" (fastddpm.sizing: sized to the data and model_budget) or a U-Net preset
    model_budget: float = DEFAULT_BUDGET  # auto: the U-Net's forward MFLOPs per pixel (1: ch 32; 12: DDPM's CIFAR-10 width)
    data: str | None = None  # None: the bundled digits (see fastddpm.datasets.load_dataset)
    image_size: int | None = None  # resize an image folder to this size
    background: str = "white"  # an image folder's transparent pixels are composited on this: white, black or #rrggbb
    channels: int | None = None  # an image folder's channels, 1 or 3 (None: 1 when every image is grayscale)
    data_memory_mb: int = 1024  # data whose float32 copy is larger is streamed batch by batch (fastddpm.loader)
    schedule: str = "linear"
    timesteps: int = 1000
    prediction: str = "eps"
    variance: str = "fixed_small"
    loss: str = "simple"
    timestep_sampler: str = "uniform"
    steps: int = 1500
    batch_size: int = 128  # the global batch: split evenly over torch.distributed ranks
    lr: float = 1e-3
    warmup: int = 100  # linear learning-rate warm-up steps
    grad_clip: float = 1.0  # max gradient norm (0: no clipping)
    ema_decay: float = 0.999
    dropout: float | None = None  # None: the U-Net preset's
    hflip: bool = False  # random horizontal flips (not for digits: they are not symmetric)
    class_cond: bool = False  # condition the U-Net on the data's class labels (a "null" class for none)
    p_uncond: float = 0.1  # class_cond: the chance a label is dropped to the null class, so one network serves both
    seed: int = 0
    samples: int = 64  # images in each sample grid
    grid_scale: int | None = None  # enlarge the grid's images (None: 32 // size; tiny images are unreadable at 1:1)
    # the chain of the grids, the final score and `fastddpm sample`'s default (fastddpm.solvers): on the
    # default digits model DPM-Solver++(2M) at 10 steps scores as 1000 ancestral steps do (README)
    sample_solver: str = "dpmpp_2m"
    sample_steps: int | None = 10  # its steps (None: the solver's default; ddpm: all)
    quality_images: int = 1500  # samples scored against the training digits at the end, beside the held-out floor (digits only; 0: skip)
    nll_images: int | None = None  # held-out images for the final NLL (None: all, 0: skip)
    log_every: int = 50  # steps between log lines (the only host syncs of the loop)
    sample_every: int = 0  # steps between EMA sample grids (0: only at the end)
    checkpoint_every: int = 0  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 3  # the newest K checkpoints are kept
    device: str | None = None  # None: cuda when available, else cpu
    precision: str = "fp32"  # autocast dtype of the U-Net: fp32, bf16, or fp16 (with a loss scaler)
    compile: bool | None = None  # torch.compile the training step; None: on for CUDA, off on the CPU
    channels_last: bool | None = None  # None: on for CUDA
    tf32: bool | None = None  # TF32 matmuls and convolutions in fp32 on CUDA; None: on there (the run records which)

    def __post_init__(self):
        """Every field checked by type and range (a config file's ``"false"`` is not false)."""
        for name in ("timesteps", "steps", "batch_size", "samples", "log_every", "keep_checkpoints"):
            validate.integer(name, getattr(self, name), 1)
        for name in ("warmup", "sample_every", "checkpoint_every", "quality_images", "data_memory_mb"):
            validate.integer(name, getattr(self, name), 0)
        for name in ("image_size", "grid_scale", "sample_steps"):
            validate.integer(name, getattr(self, name), 1, optional=True)
        validate.integer("nll_images", self.nll_images, 0, optional=True)
        validate.integer("seed", self.seed, 0, 2**64)  # the noise contract's seeds are 64-bit
        for name in ("lr", "grad_clip"):
            validate.number(name, getattr(self, name), 0)
        validate.number("ema_decay", self.ema_decay, 0, 1, high_open=True)
        validate.number("dropout", self.dropout, 0, 1, high_open=True, optional=True)
        check_budget(self.model_budget)
        validate.flag("hflip", self.hflip)
        validate.flag("class_cond", self.class_cond)
        validate.number("p_uncond", self.p_uncond, 0, 1)
        for name in ("compile", "channels_last", "tf32"):
            validate.flag(name, getattr(self, name), optional=True)
        if self.data is not None and not isinstance(self.data, str):
            raise ValueError(f"data must be a path (a string) or null (the bundled digits), got {self.data!r}")
        if self.device is not None:
            validate.device("device", self.device)
        for name, allowed in (("model", ("auto", *UNET_PRESETS)), ("schedule", SCHEDULES),
                              ("prediction", options.PREDICTIONS), ("variance", options.VARIANCES),
                              ("precision", tuple(options.PRECISIONS)), ("loss", options.LOSSES),
                              ("timestep_sampler", ("uniform", "importance")), ("sample_solver", SOLVERS)):
            options.choice(name, getattr(self, name), allowed)
        parse_background(self.background)
        check_channels(self.channels)

    def to_dict(self) -> dict:
        return asdict(self)


def preset_names() -> list[str]:
    return sorted(p.name[: -len(".json")] for p in resources.files(__package__).joinpath("presets").iterdir()
                  if p.name.endswith(".json"))


def preset(name: str, **overrides) -> TrainConfig:
    """The named preset with fields overridden; unknown names raise ValueError."""
    if name not in preset_names():
        raise ValueError(f"unknown training preset {name!r}; known: {', '.join(preset_names())}")
    text = resources.files(__package__).joinpath("presets", f"{name}.json").read_text()
    return from_dict({**_fields_of(json.loads(text), f"preset {name}"), **overrides})


def load_config(path: str | Path, base: str | None = None, **overrides) -> TrainConfig:
    """The config in a JSON or YAML file with fields overridden: it starts from its own ``preset``
    key, else from the preset ``base``, else from ``digits``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"reading {path} needs PyYAML (pip install pyyaml), or write the config as JSON") from None
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    elif path.suffix.lower() == ".json":
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
    else:
        raise ValueError(f"config file must end in .json, .yaml or .yml, got {path}")
    values = _fields_of(values, str(path))
    return preset(values.pop("preset", base or "digits"), **{**values, **overrides})


def _fields_of(values, where: str) -> dict:
    if not isinstance(values, dict):
        raise ValueError(f"{where} must hold a mapping of TrainConfig fields")  # noqa: TRY004 (a user error)
    return {k: v for k, v in values.items() if not str(k).startswith("_")}


def from_dict(values: dict) -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown training options {unknown}; known: {', '.join(sorted(known))}")
    return replace(TrainConfig(), **values)
