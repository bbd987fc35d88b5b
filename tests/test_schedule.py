"""Schedules and their tables against float64 closed forms computed independently here."""

import math

import pytest
import torch

from fastddpm import NoiseSchedule
from fastddpm.schedule import Coefficients


def python_cumprod(values):
    out, acc = [], 1.0
    for v in values:
        acc *= v
        out.append(acc)
    return torch.tensor(out, dtype=torch.float64)


def test_linear_endpoints_and_alphas_cumprod():
    s = NoiseSchedule.linear(1000)
    assert s.betas.dtype == torch.float64 and len(s) == 1000
    assert s.betas[0].item() == 1e-4 and s.betas[-1].item() == 0.02
    assert torch.allclose(s.betas[1:] - s.betas[:-1], torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))
    expected = python_cumprod([1 - b for b in s.betas.tolist()])
    torch.testing.assert_close(s.alphas_cumprod, expected, rtol=1e-13, atol=0)
    assert s.alphas_cumprod_prev[0].item() == 1.0
    assert torch.equal(s.alphas_cumprod_prev[1:], s.alphas_cumprod[:-1])
    # the paper's schedule leaves x_T almost exactly N(0, I): ᾱ_T ≈ 4.04e-5
    assert 4.0e-5 < s.alphas_cumprod[-1].item() < 4.1e-5


def test_cosine_matches_closed_form():
    T, s_off = 1000, 0.008
    s = NoiseSchedule.cosine(T)
    f = [math.cos((t / T + s_off) / (1 + s_off) * math.pi / 2) ** 2 for t in range(T + 1)]
    expected = torch.tensor([f[t + 1] / f[0] for t in range(T)], dtype=torch.float64)
    unclipped = s.betas < 0.999
    assert unclipped[:-1].all() and s.betas.max().item() == 0.999
    torch.testing.assert_close(s.alphas_cumprod[unclipped], expected[unclipped], rtol=1e-12, atol=0)


def test_quadratic_and_sigmoid_endpoints():
    q = NoiseSchedule.quadratic(100)
    assert q.betas[0].item() == pytest.approx(1e-4, rel=1e-12) and q.betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    torch.testing.assert_close(q.betas.sqrt().diff(), torch.full((99,), (0.02**0.5 - 1e-4**0.5) / 99, dtype=torch.float64))
    g = NoiseSchedule.sigmoid(100)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert g.betas[0].item() == pytest.approx(sig(-6) * (0.02 - 1e-4) + 1e-4, rel=1e-12)
    assert g.betas[-1].item() == pytest.approx(sig(6) * (0.02 - 1e-4) + 1e-4, rel=1e-12)


def test_posterior_tables_closed_form():
    s = NoiseSchedule.linear(50)
    for t in range(50):
        beta, abar = s.betas[t].item(), s.alphas_cumprod[t].item()
        abar_prev = s.alphas_cumprod[t - 1].item() if t > 0 else 1.0
        assert s.posterior_variance[t].item() == pytest.approx(beta * (1 - abar_prev) / (1 - abar), rel=1e-12, abs=0)
        assert s.posterior_mean_coef1[t].item() == pytest.approx(beta * math.sqrt(abar_prev) / (1 - abar), rel=1e-12)
        assert s.posterior_mean_coef2[t].item() == pytest.approx(
            (1 - abar_prev) * math.sqrt(1 - beta) / (1 - abar), rel=1e-12, abs=1e-300
        )
    assert s.posterior_variance[0].item() == 0.0
    assert s.posterior_log_variance_clipped[0].item() == math.log(s.posterior_variance[1].item())
    assert s.large_variance[0].item() == s.posterior_variance[1].item()
    assert torch.equal(s.large_variance[1:], s.betas[1:])


def test_respace_with_all_steps_is_the_identity():
    for s in (NoiseSchedule.linear(1000), NoiseSchedule.cosine(100)):
        r = s.respace(len(s))
        for name in ("betas", "alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                     "posterior_mean_coef1", "posterior_mean_coef2", "timesteps"):
            assert torch.equal(getattr(r, name), getattr(s, name)), name
        assert torch.equal(s.respace(list(range(len(s)))).betas, s.betas)


def test_respace_keeps_alphas_cumprod_at_kept_steps():
    s = NoiseSchedule.linear(1000)
    r = s.respace(50)
    assert len(r) == 50 and r.timesteps[0].item() == 0 and r.timesteps[-1].item() == 999
    kept = [round(i * 999 / 49) for i in range(50)]
    assert r.timesteps.tolist() == kept
    torch.testing.assert_close(r.alphas_cumprod, s.alphas_cumprod[kept], rtol=1e-12, atol=0)
    explicit = s.respace([10, 20, 700])
    assert explicit.timesteps.tolist() == [10, 20, 700]
    torch.testing.assert_close(explicit.alphas_cumprod, s.alphas_cumprod[[10, 20, 700]], rtol=1e-12, atol=0)
    # respacing a respaced schedule composes the timestep maps
    twice = r.respace([0, 1, 49])
    assert twice.timesteps.tolist() == [0, kept[1], 999]
    torch.testing.assert_close(twice.alphas_cumprod, s.alphas_cumprod[[0, kept[1], 999]], rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "steps, match",
    [(1, "between 2 and"), (1001, "between 2 and"), ([5, 3], "strictly increasing"), ([0, 1000], r"\[0, 999\]"),
     ([7], "at least 2")],
)
def test_respace_rejects_bad_steps(steps, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule.linear(1000).respace(steps)


def test_bad_schedules_are_rejected():
    with pytest.raises(ValueError, match="unknown noise schedule 'cosin'"):
        NoiseSchedule.by_name("cosin")
    with pytest.raises(ValueError, match="T"):
        NoiseSchedule.linear(1)
    with pytest.raises(ValueError, match=r"open interval \(0, 1\)"):
        NoiseSchedule.from_betas([0.1, 1.0])
    with pytest.raises(ValueError, match="1-D"):
        NoiseSchedule.from_betas([[0.1, 0.2]])
    assert torch.equal(NoiseSchedule.by_name("cosine", 10).betas, NoiseSchedule.cosine(10).betas)


def test_coefficients_pack_the_tables_on_the_device():
    s = NoiseSchedule.linear(20)
    c = s.coefficients("cpu", torch.float32)
    assert c is s.coefficients("cpu", torch.float32)  # built once
    assert c.table.shape == (len(Coefficients.row_names()), 20) and c.table.is_contiguous()
    assert torch.equal(c.alphas_cumprod, s.alphas_cumprod.float())
    assert torch.equal(c.table[Coefficients.row("posterior_mean_coef2")], s.posterior_mean_coef2.float())
    assert c.alphas_cumprod.data_ptr() == c.table[Coefficients.row("alphas_cumprod")].data_ptr()
    c64 = s.coefficients("cpu", torch.float64)
    assert torch.equal(c64.log_large_variance, s.large_variance.log())
    assert c64.timesteps.dtype == torch.int64 and c64.num_timesteps == 20


def test_a_device_without_an_index_shares_the_tables_of_its_tensors_device():
    """"cuda" and cuda:0 (what its tensors report) are one cache entry: a table asked for as "cuda"
    before a compiled step must be the one the step finds (else it is built inside the step)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    schedule = NoiseSchedule.linear(10)
    with FakeTensorMode(allow_non_fake_inputs=True):
        T, cuda0 = 10, torch.device("cuda:0")
        schedule._coefficients[cuda0, torch.float32] = Coefficients.from_table(torch.empty(13, T, device=cuda0))
        assert schedule.coefficients("cuda") is schedule._coefficients[cuda0, torch.float32]
