"""`FastDPMSolverScheduler`: diffusers' `DPMSolverMultistepScheduler` on the fused, in-place
`solver_step` — a drop-in for pipelines, next to `FastDDPMScheduler`."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from diffusers import DPMSolverMultistepScheduler
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from ... import options
from ...ops import FUSED
from ...solvers import DPMSolverChain
from .scheduler import _PREDICTIONS, FusedScheduler, schedule_of
from .unet import _unsupported, _with_defaults

_ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++")
# Options fastddpm implements only at these values (diffusers' defaults): the solver's data-prediction
# form with midpoint second order, σ's from the spacing or Karras', and a last step into x_0.
_FIXED = {"thresholding": False, "solver_type": "midpoint", "euler_at_final": False, "use_exponential_sigmas": False,
          "use_beta_sigmas": False, "use_lu_lambdas": False, "use_flow_sigmas": False, "final_sigmas_type": "zero",
          "lambda_min_clipped": -math.inf, "rescale_betas_zero_snr": False, "use_dynamic_shifting": False}


class FastDPMSolverScheduler(FusedScheduler):
    """diffusers' `DPMSolverMultistepScheduler` (its config, attributes and methods, algorithms
    "dpmsolver++" and "sde-dpmsolver++") whose `step` is fastddpm's fused `solver_step`: x̂₀, the
    multistep update and the history of earlier x̂₀'s in one kernel.

    The chain is `fastddpm.solvers.DPMSolverChain` over fastddpm's float64 schedule of the config
    (diffusers computes its σ's from a float32 cumprod, 3e-5 off at T = 1000). The SDE variant
    draws its noise as diffusers does, ``randn_tensor(model_output.shape, generator=...)`` in
    float32 (or takes ``variance_noise``), so a seeded pipeline consumes its generator alike. Other
    options (thresholding, heun, exponential/beta/Lu σ's, flow prediction, a σ_min last step,
    custom timesteps) raise a ValueError naming them.
    """

    _compatibles: ClassVar[list[str]] = list(DPMSolverMultistepScheduler._compatibles)

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -math.inf,
        variance_type: str | None = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
    ):
        c = _with_defaults(DPMSolverMultistepScheduler, self.config)
        for name, value in _FIXED.items():
            if c[name] != value:
                raise _unsupported("DPMSolverMultistepScheduler", name, c[name], repr(value))
        if c["algorithm_type"] not in _ALGORITHMS:
            raise _unsupported("DPMSolverMultistepScheduler", "algorithm_type", c["algorithm_type"], ", ".join(_ALGORITHMS))
        if c["prediction_type"] not in _PREDICTIONS:
            raise _unsupported("DPMSolverMultistepScheduler", "prediction_type", c["prediction_type"],
                               ", ".join(_PREDICTIONS))
        self.schedule = schedule_of(c, "DPMSolverMultistepScheduler")
        self.prediction = _PREDICTIONS[c["prediction_type"]]
        # a learned variance's output holds 2C channels, of which the solver reads the mean half; any other
        # value (a DDPMScheduler config's fixed_small, fixed_large) is a plain output, as in diffusers
        self.variance = "learned_range" if c["variance_type"] in ("learned", "learned_range") else "fixed_small"
        self.stochastic = c["algorithm_type"] == "sde-dpmsolver++"
        self.alphas_cumprod = self.schedule.alphas_cumprod.float()
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1)
        self.num_inference_steps = None
        self.chain = None
        self._step_index = self._begin_index = None

    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        self._begin_index = begin_index

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, mu=None, timesteps=None):
        """The chain's timesteps for ``num_inference_steps`` model evaluations, spaced as the config
        says (timestep_spacing, steps_offset, or use_karras_sigmas)."""
        if timesteps is not None or mu is not None:
            raise _unsupported("FastDPMSolverScheduler.set_timesteps", "timesteps" if timesteps is not None else "mu",
                               "given", "None (the spacing or Karras σ's choose them)")
        c = self.config
        self.chain = DPMSolverChain.build(self.schedule, num_inference_steps, order=c.solver_order,
                                          stochastic=self.stochastic, spacing=c.timestep_spacing,
                                          karras=c.use_karras_sigmas, lower_order_final=c.lower_order_final,
                                          steps_offset=c.steps_offset)
        self.timesteps = self.chain.timesteps if device is None else self.chain.timesteps.to(device)
        self.num_inference_steps = self.chain.num_steps
        self._tables: dict[tuple, torch.Tensor] = {}
        self._history = None
        self._step_index = self._begin_index = None

    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        """The step of ``timestep``, as diffusers finds it (of repeated timesteps, the second)."""
        candidates = ((self.timesteps if schedule_timesteps is None else schedule_timesteps) == timestep).nonzero()
        if len(candidates) == 0:
            return len(self.timesteps) - 1
        return int(candidates[1 if len(candidates) > 1 else 0])

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None, variance_noise=None,
             return_dict: bool = True):
        """The sample at the next timestep: DPMSolverMultistepScheduler.step, fused."""
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                             "the scheduler")
        if self._step_index is None:
            self._step_index = self.index_for_timestep(torch.as_tensor(timestep).to(self.timesteps.device)) \
                if self._begin_index is None else self._begin_index
        i = self._step_index
        x = sample.to(torch.float32).contiguous().clone()  # written in place by the op
        if i == 0 or self._history is None or self._history.shape[1:] != x.shape:
            self._history = x.new_zeros(max(self.chain.orders) - 1, *x.shape)
        noise = None
        if self.stochastic:  # drawn in the shape of the converted (mean) output, as diffusers draws it
            noise = variance_noise if variance_noise is not None else randn_tensor(
                x.shape, generator=generator, device=model_output.device, dtype=torch.float32)
            noise = noise.to(device=x.device, dtype=torch.float32)
        key = (x.device, x.dtype)
        if key not in self._tables:
            self._tables[key] = self.chain.table.to(x.device, x.dtype)
        index = torch.full((x.shape[0],), i, dtype=torch.int64, device=x.device)
        t = torch.full_like(index, int(self.chain.timesteps[i]))
        out = model_output if model_output.dtype in options.MODEL_DTYPES else model_output.float()
        FUSED.solver_step(x, out, index, t, self._tables[key], self._history, noise, None, self.prediction,
                          self.variance, False, self.stochastic)
        self._step_index += 1
        prev = x.to(model_output.dtype)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)
