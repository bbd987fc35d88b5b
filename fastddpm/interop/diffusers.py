"""🤗 diffusers interop: the official DDPM checkpoints in fastddpm, and fastddpm inside diffusers.

The paper's released models are on the hub in diffusers' format (google/ddpm-cifar10-32,
-celebahq-256, -church-256, -bedroom-256, -cat-256): a `UNet2DModel` and a `DDPMScheduler`
config. This module maps them onto fastddpm and back:

- `unet_from_diffusers` / `unet_to_diffusers`: weights between `UNet2DModel` and `UNet`, by
  name, strictly (every tensor used once, every shape checked). The two networks are the same
  DDPM U-Net — the DDPM configurations use TF-"SAME" downsampling (``downsample_padding=0``),
  [sin, cos] embeddings with frequencies 10000^(−i/(d/2−1)) (``flip_sin_to_cos=False``,
  ``freq_shift=1``), single-head attention scaled by C^−½ (``attention_head_dim=None``) and
  GroupNorm ε = 1e-6 — so outputs agree to float rounding. Any other setting is a ValueError
  that names the field.
- `load_pretrained`: a local diffusers folder (a pipeline, or one model folder) → (`UNet`,
  `GaussianDiffusion`). Config JSON and safetensors only: never a pickle, never the hub.
- `FastDDPMScheduler`: `DDPMScheduler`'s interface and numbers on the fused `reverse_step`,
  so ``DDPMPipeline(unet=unet, scheduler=FastDDPMScheduler.from_config(config))`` runs as is.

Noise and ``generator``: `FastDDPMScheduler.step` draws its noise exactly as
`DDPMScheduler.step` does — ``randn_tensor(sample.shape, generator=generator, ...)`` in the
model output's dtype, and only when t > 0 — and hands it to the fused operator as its noise
tensor. So a pipeline called with a seeded generator consumes the generator as with
DDPMScheduler and returns the same images, to float rounding. The noise contract's keyed
in-kernel noise (image k of a seed is fixed in any batch) is what `fastddpm.sampler.Sampler`
and ``fastddpm sample --from-diffusers`` use.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import warnings
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

try:
    from diffusers import ConfigMixin, DDPMScheduler, SchedulerMixin, UNet2DModel
    from diffusers.configuration_utils import register_to_config
    from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
    from diffusers.utils.torch_utils import randn_tensor
except ImportError as err:
    raise ImportError(
        f"fastddpm.interop.diffusers needs diffusers ({err}); install it with: pip install fastddpm[diffusers]"
    ) from err

from safetensors import SafetensorError
from safetensors.torch import load_file

from ..diffusion import GaussianDiffusion
from ..ops import FusedOps
from ..reference import predict_x0, split_model_output
from ..schedule import Coefficients, NoiseSchedule
from ..unet import UNet, UNetConfig

__all__ = [
    "FastDDPMScheduler", "diffusion_from_diffusers", "load_pretrained", "unet_config_from_diffusers",
    "unet_from_diffusers", "unet_to_diffusers",
]

# ---- the U-Net ---------------------------------------------------------------------------------

# UNet2DModel settings fastddpm's UNet implements (it is the DDPM network), and only those.
_UNET_FIXED = {
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "flip_sin_to_cos": False,  # [sin, cos]
    "freq_shift": 1,  # frequencies 10000^(-i/(d/2-1))
    "mid_block_type": "UNetMidBlock2D",
    "mid_block_scale_factor": 1,
    "downsample_padding": 0,  # TF "SAME" for stride 2: pad right and bottom only
    "downsample_type": "conv",
    "upsample_type": "conv",
    "act_fn": "silu",
    "norm_eps": 1e-6,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
}
_DOWN_TYPES = ("DownBlock2D", "AttnDownBlock2D")
_UP_TYPES = ("UpBlock2D", "AttnUpBlock2D")
_ATTENTION_LAYERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_LIST_LIMIT = 10  # names listed per kind in a mapping error


def _with_defaults(cls, config) -> dict:
    """``config``'s fields over ``cls.__init__``'s defaults: the values diffusers builds ``cls`` with
    (it ignores unknown keys, and so do we)."""
    params = inspect.signature(cls.__init__).parameters
    values = {n: p.default for n, p in params.items() if n != "self" and p.default is not inspect.Parameter.empty}
    values.update({k: v for k, v in dict(config).items() if k in params})
    return values


def _unsupported(owner: str, name: str, value, supported) -> ValueError:
    return ValueError(f"{owner} {name}={value!r} is not supported by fastddpm (supported: {supported})")


def unet_config_from_diffusers(config) -> UNetConfig:
    """The `UNetConfig` of a `UNet2DModel` config (a dict, or ``model.config``), or a ValueError
    naming the first field fastddpm's UNet cannot express."""
    c = _with_defaults(UNet2DModel, config)
    for name, value in _UNET_FIXED.items():
        if c[name] != value:
            raise _unsupported("UNet2DModel", name, c[name], repr(value))
    down, up, widths = list(c["down_block_types"]), list(c["up_block_types"]), list(c["block_out_channels"])
    for name, types, allowed in (("down_block_types", down, _DOWN_TYPES), ("up_block_types", up, _UP_TYPES)):
        for block in types:
            if block not in allowed:
                raise _unsupported("UNet2DModel", name, block, " or ".join(allowed))
    if not len(down) == len(up) == len(widths) >= 1:
        raise ValueError(f"UNet2DModel needs as many down_block_types, up_block_types and block_out_channels, "
                         f"got {len(down)}, {len(up)} and {len(widths)}")
    attention = [block == "AttnDownBlock2D" for block in down]
    if [block == "AttnUpBlock2D" for block in up] != attention[::-1]:
        raise _unsupported("UNet2DModel", "up_block_types", up, "attention at the levels of down_block_types, mirrored")
    ch = widths[0]
    if any(not isinstance(w, int) or w % ch for w in widths):
        raise _unsupported("UNet2DModel", "block_out_channels", widths, "multiples of the first width")
    size = c["sample_size"]
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise _unsupported("UNet2DModel", "sample_size", size, "square images")
        size = size[0]
    if not isinstance(size, int):
        raise _unsupported("UNet2DModel", "sample_size", size, "an int")
    head_dim = c["attention_head_dim"]
    attention_widths = {w for w, a in zip(widths, attention) if a} | {widths[-1]}  # the mid block attends too
    if head_dim is not None and attention_widths != {head_dim}:
        raise _unsupported("UNet2DModel", "attention_head_dim", head_dim,
                           f"None or the attention width (single-head attention over {sorted(attention_widths)} channels)")
    if c["time_embedding_dim"] not in (None, 4 * ch):
        raise _unsupported("UNet2DModel", "time_embedding_dim", c["time_embedding_dim"], f"None or {4 * ch}")
    if c["attn_norm_num_groups"] not in (None, c["norm_num_groups"]):
        raise _unsupported("UNet2DModel", "attn_norm_num_groups", c["attn_norm_num_groups"], "None or norm_num_groups")
    if c["out_channels"] not in (c["in_channels"], 2 * c["in_channels"]):
        raise _unsupported("UNet2DModel", "out_channels", c["out_channels"],
                           "in_channels, or twice it for a learned variance")
    return UNetConfig(
        in_channels=c["in_channels"], resolution=size, ch=ch, ch_mult=tuple(w // ch for w in widths),
        num_res_blocks=c["layers_per_block"], attn_resolutions=tuple(size >> i for i, a in enumerate(attention) if a),
        dropout=c["dropout"], groups=c["norm_num_groups"], learned_variance=c["out_channels"] == 2 * c["in_channels"],
    )


def diffusers_unet_config(cfg: UNetConfig) -> dict:
    """The `UNet2DModel` keyword arguments of the same network as ``cfg``."""
    attention = [cfg.resolution >> i in cfg.attn_resolutions for i in range(len(cfg.ch_mult))]
    return {
        "sample_size": cfg.resolution, "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult], "layers_per_block": cfg.num_res_blocks,
        "down_block_types": [_DOWN_TYPES[a] for a in attention], "up_block_types": [_UP_TYPES[a] for a in attention[::-1]],
        "attention_head_dim": None, "norm_num_groups": cfg.groups, "dropout": cfg.dropout, **_UNET_FIXED,
    }


def _diffusers_name(name: str, levels: int) -> str:
    """The UNet2DModel state-dict name of fastddpm's parameter ``name``. fastddpm's up[i] mirrors
    down[i]; diffusers' up_blocks run deepest first, so up[i] is up_blocks[levels − 1 − i]."""
    if m := re.fullmatch(r"(down|up)\.(\d+)\.(blocks|attns)\.(\d+)\.(\w+)\.(weight|bias)", name):
        side, i, kind, j, layer, param = m.groups()
        block = f"{side}_blocks.{int(i) if side == 'down' else levels - 1 - int(i)}"
        if kind == "blocks":
            return f"{block}.resnets.{j}.{layer}.{param}"
        return f"{block}.attentions.{j}.{_ATTENTION_LAYERS[layer]}.{param}"
    if m := re.fullmatch(r"(down|up)\.(\d+)\.(downsample|upsample)\.conv\.(weight|bias)", name):
        side, i, kind, param = m.groups()
        return f"{side}_blocks.{int(i) if side == 'down' else levels - 1 - int(i)}.{kind}rs.0.conv.{param}"
    if m := re.fullmatch(r"mid\.(block1|attn|block2)\.(\w+)\.(weight|bias)", name):
        part, layer, param = m.groups()
        if part == "attn":
            return f"mid_block.attentions.0.{_ATTENTION_LAYERS[layer]}.{param}"
        return f"mid_block.resnets.{int(part[-1]) - 1}.{layer}.{param}"
    top = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
           "norm_out": "conv_norm_out", "conv_in": "conv_in", "conv_out": "conv_out"}
    module, param = name.rsplit(".", 1)
    return f"{top[module]}.{param}"


def _meta_unet(cfg: UNetConfig) -> UNet:
    with torch.device("meta"):
        return UNet(cfg)


def _name_map(cfg: UNetConfig) -> tuple[dict[str, str], dict[str, torch.Size]]:
    """(fastddpm name → diffusers name, fastddpm name → shape) for every tensor of UNet(cfg)."""
    state = _meta_unet(cfg).state_dict()
    names = {k: _diffusers_name(k, len(cfg.ch_mult)) for k in state}
    assert len(set(names.values())) == len(names), "the name map must be one-to-one"
    return names, {k: v.shape for k, v in state.items()}


def _listed(names) -> str:
    names = sorted(names)
    more = f", … and {len(names) - _LIST_LIMIT} more" if len(names) > _LIST_LIMIT else ""
    return ", ".join(names[:_LIST_LIMIT]) + more


def _renamed(state: dict, names: dict[str, str], shapes: dict[str, torch.Size], what: str) -> dict:
    """``state`` (keyed by the values of ``names``) keyed by the keys of ``names``, after checking that
    every tensor maps exactly once and has the shape its target needs."""
    missing = [source for source in names.values() if source not in state]
    unused = set(state) - set(names.values())
    wrong = [f"{source} {tuple(state[source].shape)} (needs {tuple(shapes[target])})"
             for target, source in names.items() if source in state and state[source].shape != shapes[target]]
    if missing or unused or wrong:
        problems = [f"{kind} ({len(items)}): {_listed(items)}"
                    for kind, items in (("missing", missing), ("unmapped", unused), ("wrong shape", wrong)) if items]
        raise ValueError(f"{what} does not map onto the U-Net: " + "; ".join(problems))
    return {target: state[source] for target, source in names.items()}


def _unet_from_state(cfg: UNetConfig, state: dict, what: str) -> UNet:
    """UNet(cfg) holding float32 copies of ``state`` (diffusers names), in eval mode."""
    names, shapes = _name_map(cfg)
    renamed = _renamed(state, names, shapes, what)
    model = _meta_unet(cfg)  # no initialisation: every tensor is assigned below
    model.load_state_dict({k: v.detach().to(torch.float32, copy=True) for k, v in renamed.items()}, assign=True)
    return model.eval()


def unet_from_diffusers(unet2d) -> UNet:
    """fastddpm's `UNet` with the weights of a diffusers `UNet2DModel` (copied, float32, eval mode,
    on the model's device)."""
    return _unet_from_state(unet_config_from_diffusers(unet2d.config), unet2d.state_dict(), "the UNet2DModel's state dict")


def unet_to_diffusers(unet: UNet) -> UNet2DModel:
    """A diffusers `UNet2DModel` with ``unet``'s weights (copied, eval mode, on ``unet``'s device)."""
    names, _ = _name_map(unet.config)
    inverse = {d: f for f, d in names.items()}
    state = {k: v.detach().cpu() for k, v in unet.state_dict().items()}
    model = UNet2DModel(**diffusers_unet_config(unet.config))
    target = model.state_dict()
    renamed = _renamed(state, inverse, {d: target[d].shape for d in inverse if d in target}, "the UNet's state dict")
    if set(renamed) != set(target):  # the two architectures would have drifted apart
        raise ValueError(f"UNet2DModel tensors without a fastddpm counterpart: {_listed(set(target) - set(renamed))}")
    model.load_state_dict({k: v.clone() for k, v in renamed.items()})
    return model.to(unet.conv_in.weight.device).eval()


# ---- the scheduler -------------------------------------------------------------------------------

_PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
# fixed_small_log is fixed_small: DDPMScheduler's exp(½ log β̃)·z is √β̃·z.
_VARIANCES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large",
              "learned_range": "learned_range"}
# diffusers' schedules with their fastddpm twins: the same formulas (scaled_linear is the
# original code's "quad", squaredcos_cap_v2 Nichol & Dhariwal's cosine with s = 0.008, β ≤ 0.999);
# fastddpm computes them in float64, diffusers in float32 (betas agree to 3e-7 relative).
_SCHEDULES = {
    "linear": lambda T, start, end: NoiseSchedule.linear(T, start, end),
    "scaled_linear": lambda T, start, end: NoiseSchedule.quadratic(T, start, end),
    "squaredcos_cap_v2": lambda T, start, end: NoiseSchedule.cosine(T),
    "sigmoid": lambda T, start, end: NoiseSchedule.sigmoid(T, start, end),
}
_SPACINGS = ("leading", "linspace", "trailing")


def _scheduler_options(config) -> tuple[NoiseSchedule, dict]:
    """(schedule, GaussianDiffusion options) of a DDPMScheduler config, or a ValueError
    naming the first option fastddpm does not implement."""
    c = _with_defaults(DDPMScheduler, config)
    if c["thresholding"]:
        raise _unsupported("DDPMScheduler", "thresholding", True, "False (clip_sample clips x̂₀ to [-1, 1])")
    if c["rescale_betas_zero_snr"]:
        raise _unsupported("DDPMScheduler", "rescale_betas_zero_snr", True, "False (ᾱ_T = 0 has no ε-parametrisation)")
    if c["clip_sample"] and c["clip_sample_range"] != 1.0:
        raise _unsupported("DDPMScheduler", "clip_sample_range", c["clip_sample_range"], "1.0")
    if c["variance_type"] not in _VARIANCES:
        raise _unsupported("DDPMScheduler", "variance_type", c["variance_type"], ", ".join(_VARIANCES))
    if c["prediction_type"] not in _PREDICTIONS:
        raise _unsupported("DDPMScheduler", "prediction_type", c["prediction_type"], ", ".join(_PREDICTIONS))
    if c["timestep_spacing"] not in _SPACINGS:
        raise _unsupported("DDPMScheduler", "timestep_spacing", c["timestep_spacing"], ", ".join(_SPACINGS))
    T = c["num_train_timesteps"]
    if c["trained_betas"] is not None:
        schedule = NoiseSchedule.from_betas(torch.as_tensor(c["trained_betas"], dtype=torch.float64))
        if len(schedule) != T:
            raise ValueError(f"DDPMScheduler trained_betas has {len(schedule)} values but num_train_timesteps={T}")
    elif c["beta_schedule"] in _SCHEDULES:
        schedule = _SCHEDULES[c["beta_schedule"]](T, c["beta_start"], c["beta_end"])
    else:
        raise _unsupported("DDPMScheduler", "beta_schedule", c["beta_schedule"], ", ".join(_SCHEDULES))
    options = {"prediction": _PREDICTIONS[c["prediction_type"]], "variance": _VARIANCES[c["variance_type"]],
               "clip_denoised": bool(c["clip_sample"])}
    return schedule, options


def diffusion_from_diffusers(config) -> GaussianDiffusion:
    """The `GaussianDiffusion` of a DDPMScheduler config (a dict, or ``scheduler.config``)."""
    schedule, options = _scheduler_options(config)
    # improved-diffusion trains learned_range with the hybrid loss; sampling does not use it
    loss = "hybrid" if options["variance"] == "learned_range" else "simple"
    return GaussianDiffusion(schedule, loss=loss, **options)


def _step_table(schedule: NoiseSchedule, kept: list[int]) -> tuple[torch.Tensor, int]:
    """(float64 Coefficients.table, column offset) for stepping through the ascending timesteps
    ``kept`` as DDPMScheduler does: column offset + i steps from kept[i] to kept[i − 1], and from
    kept[0] to x_0 (ᾱ_prev = 1), with β = 1 − ᾱ_t/ᾱ_prev and β̃ from those two ᾱ's.

    The operator adds no noise in column 0. DDPMScheduler adds none at t = 0 only, so when the
    last timestep is above 0 (trailing spacing, steps_offset) column 0 is an unused copy and that
    step sits in column 1, where DDPMScheduler's variances (β̃ = 0 clamped to 1e-20; β) are written.
    """
    n = len(kept)
    if n >= 2:
        steps = schedule.respace(kept)
    else:  # NoiseSchedule needs two steps; the second column is never read
        steps = NoiseSchedule([1 - float(schedule.alphas_cumprod[kept[0]]), 0.5])
    table = steps.coefficients("cpu", torch.float64).table[:, :n]
    if kept[0] == 0:
        return table, 0
    table = torch.cat([table[:, :1], table], dim=1)
    table[Coefficients.row("posterior_log_variance_clipped"), 1] = math.log(1e-20)
    table[Coefficients.row("log_large_variance"), 1] = table[Coefficients.row("log_betas"), 1]
    return table, 1


class FastDDPMScheduler(SchedulerMixin, ConfigMixin):
    """diffusers' `DDPMScheduler` (same config, attributes and methods) whose `step` is fastddpm's
    fused `reverse_step`: x̂₀, its clipping, the posterior mean and σz in one kernel.

    The schedule is fastddpm's float64 one for the config (`diffusion_from_diffusers`); a
    respaced run (`set_timesteps`) steps between consecutive chosen timesteps with ᾱ of both,
    as DDPMScheduler does. Noise: see the module docstring. Options fastddpm does not
    implement (thresholding, variance_type "learned"/"fixed_large_log", clip_sample_range ≠ 1,
    rescale_betas_zero_snr, the "laplace" schedule) raise a ValueError.
    """

    _compatibles: ClassVar[list[str]] = list(DDPMScheduler._compatibles)
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        self.schedule, options = _scheduler_options(self.config)
        self.prediction, self.variance, self.clip_denoised = options["prediction"], options["variance"], options["clip_denoised"]
        self.variance_type = variance_type
        self.betas = self.schedule.betas.float()
        self.alphas = self.schedule.alphas.float()
        self.alphas_cumprod = self.schedule.alphas_cumprod.float()
        self.one = torch.tensor(1.0)
        self.init_noise_sigma = 1.0
        self.custom_timesteps = False
        self.num_inference_steps = None
        self._use_timesteps(torch.arange(num_train_timesteps - 1, -1, -1))

    def _use_timesteps(self, timesteps: torch.Tensor, device=None) -> None:
        kept = timesteps.flip(0).tolist()
        self._table, offset = _step_table(self.schedule, kept)
        self._column = {t: offset + i for i, t in enumerate(kept)}
        self._previous = {t: (kept[i - 1] if i else -1) for i, t in enumerate(kept)}
        self._tables: dict[tuple, Coefficients] = {}
        self.timesteps = timesteps if device is None else timesteps.to(device)

    def _coefficients(self, like: torch.Tensor) -> Coefficients:
        key = (like.device, like.dtype)
        if key not in self._tables:
            self._tables[key] = Coefficients.from_table(self._table.to(device=like.device, dtype=like.dtype).contiguous())
        return self._tables[key]

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps: list[int] | None = None):
        """The timesteps to run, as DDPMScheduler chooses them: ``num_inference_steps`` spaced by the
        config's timestep_spacing ("leading": 0, k, 2k, … with k = T // n, plus steps_offset;
        "linspace"; "trailing"), or the descending custom ``timesteps``."""
        T = self.config.num_train_timesteps
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
        if timesteps is not None:
            timesteps = torch.as_tensor(list(timesteps), dtype=torch.int64)
            if bool((timesteps[1:] >= timesteps[:-1]).any()):
                raise ValueError("`custom_timesteps` must be in descending order.")
            if int(timesteps[0]) >= T:
                raise ValueError(f"`timesteps` must start before `self.config.train_timesteps`: {T}.")
            self.custom_timesteps, self.num_inference_steps = True, len(timesteps)
        else:
            n = num_inference_steps
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= T:
                raise ValueError(f"num_inference_steps must be an integer in [1, {T}], got {n!r}")
            spacing, offset = self.config.timestep_spacing, self.config.steps_offset
            if spacing == "linspace":  # numpy, as DDPMScheduler, so rounding ties agree
                chosen = np.linspace(0, T - 1, n).round()[::-1]
            elif spacing == "leading":
                chosen = (np.arange(0, n) * (T // n)).round()[::-1] + offset
            else:  # trailing
                chosen = np.round(np.arange(T, 0, -T / n)) - 1
            timesteps = torch.from_numpy(chosen.astype(np.int64))
            self.custom_timesteps, self.num_inference_steps = False, n
        if int(timesteps.min()) < 0 or int(timesteps.max()) >= T:
            raise ValueError(f"timesteps must lie in [0, {T - 1}], got {int(timesteps.min())}..{int(timesteps.max())}")
        self._use_timesteps(timesteps, device)

    def previous_timestep(self, timestep) -> int:
        """The timestep the step from ``timestep`` lands on (−1: x_0)."""
        return self._previous[self._timestep(timestep)]

    def _timestep(self, timestep) -> int:
        t = int(timestep)
        if t not in self._column:
            raise ValueError(f"timestep {t} is not one of the scheduler's timesteps (see set_timesteps)")
        return t

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """x_{t_prev} and x̂₀ from the model output at ``timestep``: DDPMScheduler.step, fused."""
        t = self._timestep(timestep)
        x = sample if sample.dtype in (torch.float32, torch.float64) else sample.float()
        noise = None
        if t > 0:  # DDPMScheduler's draw, so a generator is consumed exactly as there
            noise = randn_tensor(x.shape, generator=generator, device=model_output.device, dtype=model_output.dtype)
            noise = noise.to(x.dtype)
        coef = self._coefficients(x)
        column = torch.full((x.shape[0],), self._column[t], dtype=torch.int64, device=x.device)
        options = {"prediction": self.prediction, "variance": self.variance, "clip_denoised": self.clip_denoised}
        prev = FusedOps.reverse_step(x, model_output, column, coef, noise=noise, **options)
        pred, _ = split_model_output(model_output, self.variance)
        x0 = predict_x0(pred.to(x.dtype), x, column, coef, self.prediction)
        if self.clip_denoised:
            x0 = x0.clamp(-1, 1)
        prev, x0 = prev.to(sample.dtype), x0.to(sample.dtype)
        if not return_dict:
            return prev, x0
        return DDPMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε at the training ``timesteps`` (one, or one per sample)."""
        x0 = original_samples if original_samples.dtype in (torch.float32, torch.float64) else original_samples.float()
        t = torch.as_tensor(timesteps, device=x0.device).to(torch.int64).reshape(-1)
        if t.numel() == 1:
            t = t.expand(x0.shape[0]).contiguous()
        full = self.schedule.coefficients(x0.device, x0.dtype)
        return FusedOps.q_sample(x0, t, full, noise=noise.to(x0.dtype)).to(original_samples.dtype)

    def __len__(self) -> int:
        return self.config.num_train_timesteps


# ---- folders -------------------------------------------------------------------------------------

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
