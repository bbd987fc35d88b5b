"""The multistep DPM-Solver++ chains (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided
Sampling of Diffusion Probabilistic Models"): which timesteps a chain visits, and each step's
update as one linear combination, built once per chain in float64.

With α_s = √ᾱ_s, σ_s = √(1 − ᾱ_s) and λ_s = log(α_s/σ_s), a step from s to t (h = λ_t − λ_s > 0)
of DPM-Solver++ in data prediction x̂₀ (eq. (9) and Algorithm 2, multistep; the third order as
DPM-Solver's multistep, eq. (3.10) of Lu et al. 2022a) is

    x_t = (σ_t/σ_s) x_s + α_t (1 − e^{−h}) D0 + (order 2, "midpoint")  ½ α_t (1 − e^{−h}) D1
                                             (order 3)  α_t ((e^{−h} − 1)/h + 1) D1 − α_t ((e^{−h} − 1 + h)/h² − ½) D2

and its SDE variant (SDE-DPM-Solver++, their appendix; diffusers' ``sde-dpmsolver++``)

    x_t = (σ_t/σ_s) e^{−h} x_s + α_t (1 − e^{−2h}) D0 + ½ α_t (1 − e^{−2h}) D1 + σ_t √(1 − e^{−2h}) z

(third order: α_t ((1 − e^{−2h})/(−2h) + 1) D1 + α_t ((1 − e^{−2h} − 2h)/(2h)² − ½) D2), with the
differences of the last x̂₀'s m0, m1, m2 at λ_{s}, λ_{s1}, λ_{s2}: r0 = (λ_s − λ_{s1})/h,
r1 = (λ_{s1} − λ_{s2})/h, D0 = m0, D1 = (m0 − m1)/r0 (order 2), and for order 3
D1_0 = (m0 − m1)/r0, D1_1 = (m1 − m2)/r1, D1 = D1_0 + r0/(r0 + r1) (D1_0 − D1_1),
D2 = (D1_0 − D1_1)/(r0 + r1). Each step is therefore x_t = cx x_s + c0 m0 + c1 m1 + c2 m2 + cz z;
`DPMSolverChain.table` holds those five coefficients and the step's α_s, σ_s (to turn the
model's output into m0) for each step, which is all the fused `solver_step` reads.

The chain is diffusers' `DPMSolverMultistepScheduler` with ``final_sigmas_type="zero"``: the
timesteps follow ``spacing`` (or Karras et al. 2022's σ's, ρ = 7, each evaluated by the model
at its nearest timestep), the last step goes to σ = 0 (x_0 = x̂₀), the first steps warm up one
order at a time, and the last step is first order (the last two at most second order with
``lower_order_final`` and fewer than 15 steps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from . import options
from .schedule import NoiseSchedule

SOLVERS = ("ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde")
SPACINGS = ("linspace", "leading", "trailing")
ORDERS = (1, 2, 3)
KARRAS_RHO = 7.0  # Karras et al. 2022, eq. (5)

# The rows of `DPMSolverChain.table`, and the codes the fused op reads them by.
ROWS = ("alpha_s", "sigma_s", "cx", "c0", "c1", "c2", "cz")


def check_solver(solver) -> str:
    return options.choice("solver", solver, SOLVERS)


@dataclass(frozen=True)
class DPMSolverChain:
    """The steps of one DPM-Solver++ chain over a diffusion's schedule.

    timesteps: int64 [M], the schedule indices the model is evaluated at, first to last.
    table: float64 [len(ROWS), M]: column i holds step i's α_s, σ_s (at its model evaluation)
        and cx, c0, c1, c2, cz (its update, module docstring).
    orders: the order each step used (warm-up and lower_order_final included).
    """

    timesteps: torch.Tensor
    table: torch.Tensor
    orders: tuple[int, ...]
    stochastic: bool

    @classmethod
    def build(cls, schedule: NoiseSchedule, steps: int, *, order: int = 2, stochastic: bool = False,
              spacing: str = "linspace", karras: bool = False, lower_order_final: bool = True,
              steps_offset: int = 0) -> "DPMSolverChain":
        T = len(schedule)
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
            raise ValueError(f"steps must be an integer between 1 and {T}, got {steps!r}")
        if order not in ORDERS or isinstance(order, bool):
            raise ValueError(f"unknown solver order {order!r}; expected one of: {', '.join(map(str, ORDERS))}")
        options.choice("timestep spacing", spacing, SPACINGS)
        for name, value in (("stochastic", stochastic), ("karras", karras), ("lower_order_final", lower_order_final)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be a bool, got {value!r}")
        all_sigmas = ((1 - schedule.alphas_cumprod) / schedule.alphas_cumprod).sqrt().numpy()  # σ/α, the VE σ's
        if karras:
            sigmas, timesteps = _karras(all_sigmas, steps)
        else:
            timesteps = _spaced(T, steps, spacing, steps_offset)
            sigmas = all_sigmas[timesteps]
        sigmas = np.append(sigmas, 0.0)  # the last step lands on x_0
        alpha = 1 / np.sqrt(sigmas**2 + 1)
        sigma = sigmas * alpha
        with np.errstate(divide="ignore"):
            lam = np.log(alpha) - np.log(sigma)  # λ = log(α/σ); +∞ at x_0
        orders = _orders(steps, order, lower_order_final)
        table = np.zeros((len(ROWS), steps))
        for i, k in enumerate(orders):
            h = lam[i + 1] - lam[i]
            r0 = (lam[i] - lam[i - 1]) / h if k >= 2 else None
            r1 = (lam[i - 1] - lam[i - 2]) / h if k >= 3 else None
            cx, weights, cz = _step(alpha[i + 1], sigma[i + 1], sigma[i], h, k, r0, r1, stochastic)
            table[:, i] = (alpha[i], sigma[i], cx, *weights, cz)
        return cls(torch.as_tensor(timesteps, dtype=torch.int64), torch.from_numpy(table), tuple(orders), stochastic)

    @property
    def num_steps(self) -> int:
        return len(self.orders)

    def row(self, name: str) -> torch.Tensor:
        return self.table[ROWS.index(name)]


def _spaced(T: int, steps: int, spacing: str, offset: int) -> np.ndarray:
    """diffusers' spacings (Lin et al. 2023, Table 2), descending; the chain then steps to x_0."""
    if spacing == "linspace":
        timesteps = np.linspace(0, T - 1, steps + 1).round()[::-1][:-1]
    elif spacing == "leading":
        timesteps = (np.arange(0, steps + 1) * (T // (steps + 1))).round()[::-1][:-1] + offset
    else:  # trailing
        timesteps = np.arange(T, 0, -T / steps).round() - 1
    return np.clip(timesteps.astype(np.int64), 0, T - 1)


def _karras(all_sigmas: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Karras et al. 2022 eq. (5): σ_i = (σ_max^{1/ρ} + i/(M−1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, and
    for each the timestep whose log σ it interpolates, rounded (the model takes integer steps)."""
    ramp = np.linspace(0, 1, steps)
    lo, hi = all_sigmas[0] ** (1 / KARRAS_RHO), all_sigmas[-1] ** (1 / KARRAS_RHO)
    sigmas = (hi + ramp * (lo - hi)) ** KARRAS_RHO
    log_all = np.log(all_sigmas)
    t = np.interp(np.log(sigmas), log_all, np.arange(len(all_sigmas)))  # log σ increases with t
    return sigmas, t.round().astype(np.int64)


def _orders(steps: int, order: int, lower_order_final: bool) -> list[int]:
    """Each step's order: warm-up (step i has i earlier x̂₀'s), first order into x_0, and with
    lower_order_final and under 15 steps at most second order on the step before."""
    orders = []
    for i in range(steps):
        k = min(order, i + 1)
        if i == steps - 1:
            k = 1
        elif i == steps - 2 and lower_order_final and steps < 15:
            k = min(k, 2)
        orders.append(k)
    return orders


def _step(alpha_t, sigma_t, sigma_s, h, k, r0, r1, stochastic):
    """(cx, (c0, c1, c2), cz) of one step of order k: the module docstring's update, with the
    D's written as weights over (m0, m1, m2)."""
    m0, m1, m2 = np.eye(3)
    if k == 1:
        d1 = d2 = np.zeros(3)
    elif k == 2:
        d1, d2 = (m0 - m1) / r0, np.zeros(3)
    else:
        d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
        d1, d2 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1), (d1_0 - d1_1) / (r0 + r1)
    if math.isinf(h):  # into σ = 0: x_0 = x̂₀ (first order)
        return 0.0, m0, 0.0
    if stochastic:
        e2 = math.exp(-2 * h)
        cx, cz = sigma_t / sigma_s * math.exp(-h), sigma_t * math.sqrt(1 - e2)
        a = alpha_t * (1 - e2)
        if k <= 2:
            return cx, a * m0 + 0.5 * a * d1, cz
        b = alpha_t * ((1 - e2) / (-2 * h) + 1)
        c = alpha_t * ((1 - e2 - 2 * h) / (2 * h) ** 2 - 0.5)
        return cx, a * m0 + b * d1 + c * d2, cz
    e = math.exp(-h)
    cx, a = sigma_t / sigma_s, alpha_t * (1 - e)
    if k <= 2:
        return cx, a * m0 + 0.5 * a * d1, 0.0
    b = alpha_t * ((e - 1) / h + 1)
    c = alpha_t * ((e - 1 + h) / h**2 - 0.5)
    return cx, a * m0 + b * d1 - c * d2, 0.0


# ---- the solvers the samplers run -----------------------------------------------------------------

DEFAULT_DPM_STEPS = 20


class Tables(NamedTuple):
    """A solver's device tables, read by each step's position ``index`` [B]: ``table`` (the op's),
    ``t`` (the schedule index: the noise coordinate) and ``model_t`` (the timestep the model sees)."""

    table: torch.Tensor
    t: torch.Tensor
    model_t: torch.Tensor


class Ancestral:
    """DDPM (Ho et al. 2020, Algorithm 2), or DDIM(η) (Song et al. 2021), on the fused reverse_step
    over the schedule, respaced to ``steps``; position i is the schedule index T′ − 1 − i."""

    history_slots = 0
    takes_noise = True  # the step op draws (or is given) z even where η = 0 multiplies it away

    def __init__(self, diffusion, steps, eta):
        self.diffusion = diffusion if steps is None else diffusion.respace(steps)
        self.eta = eta
        self.name = "ddpm" if eta is None else "ddim"
        self.num_steps = self.diffusion.num_timesteps
        self.label = f"{self.name}{'' if eta is None else f' (eta {eta:g})'} {self.num_steps} steps"

    def position(self, i: int) -> int:
        return self.num_steps - 1 - i

    def tables(self, device: torch.device, dtype: torch.dtype = torch.float32) -> Tables:
        coef = self.diffusion.schedule.coefficients(device, dtype)
        return Tables(coef.table, torch.arange(self.num_steps, device=coef.table.device), coef.timesteps)

    def update(self, ops, x, out, index, t, tables: Tables, history, noise, key, guidance=None) -> None:
        """x ← the step from x at ``index`` with the model output ``out`` (both branches [2B] with
        ``guidance``: the op's classifier-free guidance)."""
        d = self.diffusion
        x.copy_(ops.reverse_step(x, out, t, tables.table, noise, key, d.prediction, d.variance, d.clip_denoised,
                                 self.eta, guidance))


class DPMSolver:
    """DPM-Solver++ (multistep, order 1–3) or SDE-DPM-Solver++ on the fused solver_step: position i
    is the chain's step i (`DPMSolverChain`)."""

    def __init__(self, diffusion, steps, *, stochastic, order, spacing, karras, lower_order_final):
        self.diffusion = diffusion
        self.chain = DPMSolverChain.build(diffusion.schedule, steps, order=order, stochastic=stochastic,
                                          spacing=spacing, karras=karras, lower_order_final=lower_order_final)
        self.num_steps = self.chain.num_steps
        self.history_slots = max(self.chain.orders) - 1
        self.stochastic = self.takes_noise = stochastic
        self.name = "dpmpp_2m_sde" if stochastic else "dpmpp_2m"
        how = ["karras" if karras else spacing] + ([f"order {order}"] if order != 2 else [])
        self.label = f"{self.name} {self.num_steps} steps ({', '.join(how)})"
        self._tables: dict[tuple, Tables] = {}

    def position(self, i: int) -> int:
        return i

    def tables(self, device: torch.device, dtype: torch.dtype = torch.float32) -> Tables:
        coef = self.diffusion.schedule.coefficients(device)
        key = (coef.table.device, dtype)
        if key not in self._tables:
            t = self.chain.timesteps.to(coef.table.device)
            self._tables[key] = Tables(self.chain.table.to(coef.table.device, dtype), t, coef.timesteps[t])
        return self._tables[key]

    def update(self, ops, x, out, index, t, tables: Tables, history, noise, key, guidance=None) -> None:
        """As `Ancestral.update`, in place on x and the history."""
        d = self.diffusion
        ops.solver_step(x, out, index, t, tables.table, history, noise, key, d.prediction, d.variance,
                        d.clip_denoised, self.stochastic, guidance)


def solver_for(diffusion, solver: str | None = None, steps=None, *, eta=None, order=None, spacing=None, karras=None,
               lower_order_final=None):
    """The solver ``solver`` over ``diffusion``: "ddpm" (``steps`` respaces; the default without
    ``eta``), "ddim" (η = ``eta``, default 0; the default with ``eta``), "dpmpp_2m" or
    "dpmpp_2m_sde" (``steps`` model evaluations, default 20; ``order`` 2, ``spacing`` "linspace",
    ``karras`` False, ``lower_order_final`` True, as diffusers' DPMSolverMultistepScheduler)."""
    solver = check_solver(("ddim" if eta is not None else "ddpm") if solver is None else solver)
    dpm = {"order": order, "spacing": spacing, "karras": karras, "lower_order_final": lower_order_final}
    if solver in ("ddpm", "ddim"):
        given = [name for name, value in dpm.items() if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} apply to the dpmpp solvers only, not to solver={solver!r}")
        if solver == "ddpm" and eta is not None:
            raise ValueError("eta is DDIM's: use solver='ddim' (or no solver) with it")
        from .kernels import checks  # (the kernels read this module's ROWS)

        checks.eta("reverse_step", eta)
        return Ancestral(diffusion, steps, (0.0 if eta is None else eta) if solver == "ddim" else None)
    if eta is not None:
        raise ValueError(f"eta is DDIM's, not {solver}'s (dpmpp_2m_sde is the stochastic DPM-Solver++)")
    defaults = {"order": 2, "spacing": "linspace", "karras": False, "lower_order_final": True}
    settings = {name: defaults[name] if value is None else value for name, value in dpm.items()}
    return DPMSolver(diffusion, DEFAULT_DPM_STEPS if steps is None else steps,
                     stochastic=solver == "dpmpp_2m_sde", **settings)
