"""Timestep samplers: distributions, weights and the loss-aware update rule."""

import math

import pytest
import torch

from fastddpm.timesteps import LossAwareSampler, UniformSampler, sampler_by_name


def test_uniform_sampler_weights_are_one_and_covers_all_t():
    s = UniformSampler(10)
    t, w = s.sample(20_000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(w, torch.ones_like(w))
    counts = torch.bincount(t, minlength=10).double()
    # chi-square with 9 dof: 99.9% quantile is 27.9
    assert ((counts - 2000) ** 2 / 2000).sum().item() < 27.9


def test_loss_aware_sampler_warms_up_then_follows_root_second_moment():
    T, h = 4, 3
    s = LossAwareSampler(T, history=h, uniform_prob=0.0)
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0])
    for _ in range(h - 1):
        s.update(torch.arange(T), losses)
    assert torch.equal(s.probabilities(), torch.full((T,), 0.25, dtype=torch.float64))  # not warm yet
    s.update(torch.arange(T), losses)
    expected = losses.double() / losses.sum()  # √E[L²] = L for constant losses
    torch.testing.assert_close(s.probabilities(), expected, rtol=1e-12, atol=0)
    # a running mean for the first `history` losses of each t
    r = LossAwareSampler(2, history=10)
    r.update(torch.tensor([0, 0, 1]), torch.tensor([1.0, 3.0, 2.0]))
    r.update(torch.tensor([0]), torch.tensor([2.0]))
    torch.testing.assert_close(r.second_moment, torch.tensor([(1 + 9 + 4) / 3, 4.0], dtype=torch.float64))
    assert r.counts.tolist() == [3.0, 1.0]


def test_loss_aware_weights_are_unbiased():
    T = 5
    s = LossAwareSampler(T, history=1, uniform_prob=0.01)
    per_t = torch.tensor([0.1, 0.5, 1.0, 2.0, 8.0])
    s.update(torch.arange(T), per_t)
    t, w = s.sample(200_000, generator=torch.Generator().manual_seed(1))
    estimate = (w.double() * per_t.double()[t]).mean().item()
    assert estimate == pytest.approx(per_t.mean().item(), rel=0.02)
    p = s.probabilities()
    torch.testing.assert_close(w[:10].double(), 1 / (T * p[t[:10]]), rtol=1e-6, atol=0)
    assert math.isclose(p.sum().item(), 1.0, rel_tol=1e-12)


def test_unknown_sampler_name():
    with pytest.raises(ValueError, match="unknown timestep sampler 'impotance'"):
        sampler_by_name("impotance", 10)
    assert isinstance(sampler_by_name("importance", 10), LossAwareSampler)
