"""Timestep samplers for training: which t each sample of a batch is trained at, and its weight.

`sample` returns (t, weights) with weights = 1 / (T p_t), so E_t[weight · L_t] = mean_t L_t
whatever the sampling distribution p. Both samplers stay on the device: no host sync.
"""

from __future__ import annotations

import torch


class UniformSampler:
    """t ~ Uniform{0, …, T−1} (Ho et al. 2020, Algorithm 1)."""

    def __init__(self, num_timesteps: int, device: torch.device | str = "cpu"):
        self.num_timesteps = num_timesteps
        self.device = torch.device(device)

    def probabilities(self) -> torch.Tensor:
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, device=self.device, dtype=torch.float64)

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.randint(0, self.num_timesteps, (batch_size,), generator=generator, device=self.device)
        return t, torch.ones(batch_size, device=self.device)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Uniform sampling ignores the losses."""


class LossAwareSampler(UniformSampler):
    """Importance sampling p_t ∝ √E[L_t²] (Nichol & Dhariwal 2021, eq. (18)), mixed with a
    little uniform probability, and uniform until every t has ``history`` observed losses.

    E[L_t²] is a running mean over the first ``history`` losses of each t, then a moving
    average with rate 1/``history``; updates are scatter ops on the device.
    """

    def __init__(
        self, num_timesteps: int, device: torch.device | str = "cpu", history: int = 10, uniform_prob: float = 0.001
    ):
        super().__init__(num_timesteps, device)
        self.history = history
        self.uniform_prob = uniform_prob
        self.second_moment = torch.zeros(num_timesteps, dtype=torch.float64, device=self.device)
        self.counts = torch.zeros(num_timesteps, dtype=torch.float64, device=self.device)

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.probabilities()
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        return t, (1.0 / (self.num_timesteps * p[t])).float()

    def probabilities(self) -> torch.Tensor:
        uniform = super().probabilities()
        p = self.second_moment.sqrt()
        p = p / p.sum().clamp(min=1e-300) * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps
        return torch.where(self.counts.min() >= self.history, p, uniform)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Fold the per-sample losses observed at timesteps ``t`` into E[L_t²]."""
        t = t.to(self.device)
        sq = losses.detach().to(device=self.device, dtype=torch.float64) ** 2
        sums = torch.zeros_like(self.second_moment).index_add_(0, t, sq)
        n = torch.zeros_like(self.counts).index_add_(0, t, torch.ones_like(sq))
        # Exact running mean while counts + n ≤ history; afterwards a moving average whose
        # step never exceeds the batch mean (n > history).
        rate_denominator = torch.maximum((self.counts + n).clamp(max=self.history), n).clamp(min=1)
        self.second_moment += (sums - n * self.second_moment) / rate_denominator
        self.counts += n


def sampler_by_name(name: str, num_timesteps: int, device: torch.device | str = "cpu") -> UniformSampler:
    samplers = {"uniform": UniformSampler, "importance": LossAwareSampler}
    if name not in samplers:
        raise ValueError(f"unknown timestep sampler {name!r}; known: {', '.join(samplers)}")
    return samplers[name](num_timesteps, device)
