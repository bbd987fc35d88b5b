"""The scheduler: a DDPMScheduler config as fastddpm's schedule and `GaussianDiffusion`
(`diffusion_from_diffusers`), and `FastDDPMScheduler`, DDPMScheduler on the fused `reverse_step`."""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch
from diffusers import ConfigMixin, DDPMScheduler, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from ...diffusion import GaussianDiffusion
from ...ops import FUSED
from ...reference import predict_x0, split_model_output
from ...schedule import Coefficients, NoiseSchedule
from .unet import _unsupported, _with_defaults

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


def schedule_of(c: dict, owner: str) -> NoiseSchedule:
    """The float64 schedule of a scheduler config ``c`` (``owner``'s, its defaults filled in):
    trained_betas, or beta_schedule with beta_start, beta_end and num_train_timesteps."""
    T = c["num_train_timesteps"]
    if c["trained_betas"] is not None:
        schedule = NoiseSchedule.from_betas(torch.as_tensor(c["trained_betas"], dtype=torch.float64))
        if len(schedule) != T:
            raise ValueError(f"{owner} trained_betas has {len(schedule)} values but num_train_timesteps={T}")
        return schedule
    if c["beta_schedule"] in _SCHEDULES:
        return _SCHEDULES[c["beta_schedule"]](T, c["beta_start"], c["beta_end"])
    raise _unsupported(owner, "beta_schedule", c["beta_schedule"], ", ".join(_SCHEDULES))


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
    schedule = schedule_of(c, "DDPMScheduler")
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


class FusedScheduler(SchedulerMixin, ConfigMixin):
    """What the fused schedulers share with diffusers' interface: no input scaling, the length,
    and ``add_noise`` on the fused q_sample over ``self.schedule``."""

    order = 1
    init_noise_sigma = 1.0

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε at the training ``timesteps`` (one, or one per sample)."""
        x0 = original_samples if original_samples.dtype in (torch.float32, torch.float64) else original_samples.float()
        t = torch.as_tensor(timesteps, device=x0.device).to(torch.int64).reshape(-1)
        if t.numel() == 1:
            t = t.expand(x0.shape[0]).contiguous()
        full = self.schedule.coefficients(x0.device, x0.dtype)
        return FUSED.q_sample(x0, t, full.table, noise.to(x0.dtype), None).to(original_samples.dtype)

    def __len__(self) -> int:
        return self.config.num_train_timesteps


class FastDDPMScheduler(FusedScheduler):
    """diffusers' `DDPMScheduler` (same config, attributes and methods) whose `step` is fastddpm's
    fused `reverse_step`: x̂₀, its clipping, the posterior mean and σz in one kernel.

    The schedule is fastddpm's float64 one for the config (`diffusion_from_diffusers`); a
    respaced run (`set_timesteps`) steps between consecutive chosen timesteps with ᾱ of both,
    as DDPMScheduler does. Noise: see the package docstring. Options fastddpm does not
    implement (thresholding, variance_type "learned"/"fixed_large_log", clip_sample_range ≠ 1,
    rescale_betas_zero_snr, the "laplace" schedule) raise a ValueError.
    """

    _compatibles: ClassVar[list[str]] = list(DDPMScheduler._compatibles)

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
        if t > 0:  # DDPMScheduler's draw, so a generator is consumed exactly as there
            noise = randn_tensor(x.shape, generator=generator, device=model_output.device, dtype=model_output.dtype)
            noise = noise.to(x.dtype)
        else:  # none is added (and none drawn) at t = 0
            noise = torch.zeros_like(x)
        coef = self._coefficients(x)
        column = torch.full((x.shape[0],), self._column[t], dtype=torch.int64, device=x.device)
        out = model_output if x.dtype == torch.float32 else model_output.to(x.dtype)
        prev = FUSED.reverse_step(x, out, column, coef.table, noise, None, self.prediction, self.variance,
                                  self.clip_denoised, None)
        pred, _ = split_model_output(model_output, self.variance)
        x0 = predict_x0(pred.to(x.dtype), x, column, coef, self.prediction)
        if self.clip_denoised:
            x0 = x0.clamp(-1, 1)
        prev, x0 = prev.to(sample.dtype), x0.to(sample.dtype)
        if not return_dict:
            return prev, x0
        return DDPMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)
