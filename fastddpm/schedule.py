"""Noise schedules β_1..β_T and every table derived from them (Ho et al. 2020, §2 and §4).

A `NoiseSchedule` is built once from its betas; all derived tables are computed here, in
float64, and nowhere else. Timestep indices are 0-based: index t stands for the paper's t+1,
so ``alphas_cumprod[0] = α_1`` and the posterior at index 0 is q(x_0 | x_1, x_0).

`coefficients(device, dtype)` packs the tables a reverse step, q_sample or a loss needs into
one contiguous [rows, T] tensor on the target device, so a step gathers its scalars by each
sample's t on the device: no host sync and no Python branch on t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence

import torch

from . import options

SCHEDULES = ("linear", "cosine", "quadratic", "sigmoid")  # NoiseSchedule.by_name's names

_F64 = torch.float64


def _betas_from_alphas_cumprod(alphas_cumprod: torch.Tensor, max_beta: float) -> torch.Tensor:
    prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    return (1 - alphas_cumprod / prev).clamp(max=max_beta)


class NoiseSchedule:
    """β_1..β_T and the float64 tables of the forward process and its posterior.

    ``timesteps`` are the original step indices the model is conditioned on: ``arange(T)``
    for a full schedule, the kept indices for a respaced one.
    """

    def __init__(self, betas: Sequence[float] | torch.Tensor, timesteps: torch.Tensor | None = None):
        betas = torch.as_tensor(betas, dtype=_F64).detach().cpu().clone()
        if betas.ndim != 1 or betas.numel() < 2:
            raise ValueError(f"betas must be a 1-D sequence of at least 2 values, got shape {tuple(betas.shape)}")
        if not bool(torch.isfinite(betas).all()) or bool((betas <= 0).any()) or bool((betas >= 1).any()):
            raise ValueError("betas must all lie in the open interval (0, 1)")
        T = betas.numel()
        if timesteps is None:
            timesteps = torch.arange(T)
        timesteps = torch.as_tensor(timesteps, dtype=torch.int64).cpu()
        if timesteps.shape != (T,):
            raise ValueError(f"timesteps must have shape ({T},) to match betas, got {tuple(timesteps.shape)}")

        self.betas = betas
        self.timesteps = timesteps
        self.respaced = not torch.equal(timesteps, torch.arange(T))  # the model sees other timesteps than t
        self.alphas = 1 - betas  # α_t = 1 − β_t
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)  # ᾱ_t = Π_{s≤t} α_s
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])
        # q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I)  — eq. (4)
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - self.alphas_cumprod).sqrt()
        # x_0 = √(1/ᾱ_t) x_t − √(1/ᾱ_t − 1) ε  — eq. (4) solved for x_0
        self.sqrt_recip_alphas_cumprod = (1 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1 / self.alphas_cumprod - 1).sqrt()
        # q(x_{t−1} | x_t, x_0) = N(μ̃_t, β̃_t I)  — eq. (6), (7)
        self.posterior_variance = betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        # β̃ is 0 at the first step; the log is clipped by repeating β̃ of the second step.
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1 - self.alphas_cumprod)
        # Σ = β_t ("fixed_large"), with β̃ at the first step as the original code, which gives
        # a better decoder log likelihood than β_1.
        self.large_variance = torch.cat([self.posterior_variance[1:2], betas[1:]])
        self._coefficients: dict[tuple, Coefficients] = {}

    # ---- constructors ---------------------------------------------------------------

    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "NoiseSchedule":
        """The paper's schedule: β linear from 1e-4 to 0.02."""
        _check_T(T)
        return cls(torch.linspace(beta_start, beta_end, T, dtype=_F64))

    @classmethod
    def quadratic(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "NoiseSchedule":
        """β linear in √β between the linear schedule's endpoints (the original code's "quad")."""
        _check_T(T)
        return cls(torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=_F64) ** 2)

    @classmethod
    def sigmoid(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "NoiseSchedule":
        """β = σ(s) (β_end − β_start) + β_start, s linear in [−6, 6] (as in the original code)."""
        _check_T(T)
        return cls(torch.sigmoid(torch.linspace(-6, 6, T, dtype=_F64)) * (beta_end - beta_start) + beta_start)

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> "NoiseSchedule":
        """Nichol & Dhariwal 2021, eq. (17): ᾱ_t = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s) · π/2)."""
        _check_T(T)
        f = torch.cos((torch.arange(T + 1, dtype=_F64) / T + s) / (1 + s) * math.pi / 2) ** 2
        return cls(_betas_from_alphas_cumprod(f[1:] / f[0], max_beta))

    @classmethod
    def from_betas(cls, betas: Sequence[float] | torch.Tensor) -> "NoiseSchedule":
        return cls(betas)

    @classmethod
    def by_name(cls, name: str, T: int = 1000) -> "NoiseSchedule":
        """The named schedule ("linear", "cosine", "quadratic" or "sigmoid") with T steps."""
        options.choice("noise schedule", name, SCHEDULES)
        return getattr(cls, name)(T)

    # ---- respacing -----------------------------------------------------------------

    def respace(self, steps: int | Sequence[int]) -> "NoiseSchedule":
        """The schedule restricted to a sub-sequence of timesteps, with recomputed betas.

        ``steps`` is a count (kept indices evenly spaced over [0, T−1], both ends included, as
        improved-diffusion's respacing) or an explicit increasing sequence of indices. The new
        β_i = 1 − ᾱ_{t_i}/ᾱ_{t_{i−1}} keeps ᾱ at every kept step; a step whose predecessor is
        kept keeps its own β, so respacing with all steps gives back this schedule exactly.
        """
        T = len(self)
        if isinstance(steps, int):
            if not 2 <= steps <= T:
                raise ValueError(f"steps must be between 2 and {T}, got {steps}")
            kept = torch.round(torch.arange(steps, dtype=_F64) * ((T - 1) / (steps - 1))).to(torch.int64)
        else:
            kept = torch.as_tensor(list(steps), dtype=torch.int64)
            if kept.ndim != 1 or kept.numel() < 2:
                raise ValueError("steps must be a count or a sequence of at least 2 timestep indices")
            if bool((kept[1:] <= kept[:-1]).any()):
                raise ValueError("steps must be strictly increasing timestep indices")
            if int(kept[0]) < 0 or int(kept[-1]) >= T:
                raise ValueError(f"steps must lie in [0, {T - 1}], got {int(kept[0])}..{int(kept[-1])}")
        abar = self.alphas_cumprod[kept]
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        consecutive = torch.cat([kept[:1] == 0, kept[1:] == kept[:-1] + 1])
        betas = torch.where(consecutive, self.betas[kept], 1 - abar / abar_prev)
        return NoiseSchedule(betas, timesteps=self.timesteps[kept])

    # ---- device tables ---------------------------------------------------------------

    def coefficients(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> "Coefficients":
        """The step tables on ``device`` in ``dtype``, built once per (device, dtype)."""
        device = torch.device(device)
        if device.index is None and device.type != "cpu":  # "cuda": the current GPU, named as its tensors name it
            device = torch.empty(0, device=device).device
        key = (device, dtype)
        if key not in self._coefficients:
            self._coefficients[key] = Coefficients.pack(self, *key)
        return self._coefficients[key]

    def __len__(self) -> int:
        return self.betas.numel()

    def __repr__(self) -> str:
        return f"NoiseSchedule(T={len(self)}, beta=[{float(self.betas[0]):.3g} .. {float(self.betas[-1]):.3g}])"


def _check_T(T: int) -> None:
    if not isinstance(T, int) or T < 2:
        raise ValueError(f"T (number of diffusion steps) must be an integer >= 2, got {T!r}")


@dataclass(frozen=True)
class Coefficients:
    """Per-timestep scalars of a schedule as rows of one contiguous [rows, T] device tensor.

    Each field is a [T] view into ``table``; reference code gathers ``field[t]``, and a
    fused kernel takes ``table`` with the row index of the field it needs (`row`).
    ``timesteps`` (int64) maps an index of this schedule to the model's timestep.
    """

    table: torch.Tensor
    timesteps: torch.Tensor
    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    log_betas: torch.Tensor
    log_large_variance: torch.Tensor

    @classmethod
    def pack(cls, schedule: NoiseSchedule, device: torch.device, dtype: torch.dtype) -> "Coefficients":
        names = cls.row_names()
        derived = {"log_betas": schedule.betas.log(), "log_large_variance": schedule.large_variance.log()}
        rows = [derived[n] if n in derived else getattr(schedule, n) for n in names]
        table = torch.stack(rows).to(device=device, dtype=dtype).contiguous()
        return cls.from_table(table, schedule.timesteps.to(device))

    @classmethod
    def from_table(cls, table: torch.Tensor, timesteps: torch.Tensor | None = None) -> "Coefficients":
        """Coefficients viewing an existing ``table`` (as a kernel receives it)."""
        if timesteps is None:
            timesteps = torch.arange(table.shape[1], device=table.device)
        return cls(table=table, timesteps=timesteps, **dict(zip(cls.row_names(), table.unbind(0))))

    @classmethod
    def row_names(cls) -> tuple[str, ...]:
        return _ROW_NAMES  # a constant: torch.compile cannot trace dataclasses.fields

    @classmethod
    def row(cls, name: str) -> int:
        """Row index of ``name`` in ``table`` (for kernels)."""
        return cls.row_names().index(name)

    @property
    def num_timesteps(self) -> int:
        return self.table.shape[1]


_ROW_NAMES = tuple(f.name for f in fields(Coefficients) if f.name not in ("table", "timesteps"))
