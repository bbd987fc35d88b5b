"""DPM-Solver++ (fastddpm.solvers + the solver_step op): against a float64 implementation written
from the paper's equations, against diffusers' DPMSolverMultistepScheduler, and as a sampler
(batch invariance, every prediction and variance, respaced schedules, one-line errors)."""

import math

import numpy as np
import pytest
import torch

from fastddpm import GaussianDiffusion, NoiseSchedule, rng
from fastddpm.ops import FUSED, REFERENCE
from fastddpm.sampler import Sampler
from fastddpm.solvers import DPMSolverChain, solver_for

T = 1000
SHAPE = (3, 4, 4)


def model_of(prediction, learned=False):
    """A smooth, time-dependent stand-in for a network: its ε, x_0 or v prediction of x_t."""

    def model(x, t):
        scale = (t.to(x.dtype) / T).view(-1, *[1] * (x.ndim - 1))
        out = torch.tanh(x) * (0.3 + scale) + 0.1 * torch.sin(3 * x)
        return torch.cat([out, torch.tanh(out)], 1) if learned else out

    return model


# ---- the chain's coefficients against the paper ------------------------------------------------


def paper_dpm_solver(timesteps, sigmas_ve, model_x0, x, order, stochastic, noises, lower_order_final=True):
    """DPM-Solver++ in float64, step by step as Lu et al. 2022 write it (Algorithm 2, its SDE
    variant, and the third order of DPM-Solver's multistep method), with D0, D1, D2 as there."""
    sig = np.append(sigmas_ve, 0.0)
    alpha, sigma = 1 / np.sqrt(sig**2 + 1), sig / np.sqrt(sig**2 + 1)
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)
    m = []
    M = len(timesteps)
    for i in range(M):
        m.append(model_x0(x, timesteps[i], alpha[i], sigma[i]))
        k = min(order, i + 1)
        if i == M - 1:
            k = 1
        elif i == M - 2 and lower_order_final and M < 15:
            k = min(k, 2)
        if i == M - 1:
            x = m[-1]
            break
        h = lam[i + 1] - lam[i]
        at, st, ss = alpha[i + 1], sigma[i + 1], sigma[i]
        D0 = m[-1]
        if k >= 2:
            r0 = (lam[i] - lam[i - 1]) / h
            D1 = (m[-1] - m[-2]) / r0
        if k == 3:
            r1 = (lam[i - 1] - lam[i - 2]) / h
            D1_0, D1_1 = (m[-1] - m[-2]) / r0, (m[-2] - m[-3]) / r1
            D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1)
            D2 = (D1_0 - D1_1) / (r0 + r1)
        if not stochastic:
            x_new = st / ss * x - at * (math.exp(-h) - 1) * D0
            if k == 2:
                x_new = x_new - 0.5 * at * (math.exp(-h) - 1) * D1
            elif k == 3:
                x_new = x_new + at * ((math.exp(-h) - 1) / h + 1) * D1 - at * ((math.exp(-h) - 1 + h) / h**2 - 0.5) * D2
        else:
            e2 = math.exp(-2 * h)
            x_new = st / ss * math.exp(-h) * x + at * (1 - e2) * D0 + st * math.sqrt(1 - e2) * noises[i]
            if k == 2:
                x_new = x_new + 0.5 * at * (1 - e2) * D1
            elif k == 3:
                x_new = x_new + at * ((1 - e2) / (-2 * h) + 1) * D1 + at * ((1 - e2 - 2 * h) / (2 * h) ** 2 - 0.5) * D2
        x = x_new
    return x


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("steps", [1, 7, 20])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_reference_chain_is_the_papers_solver_in_float64(order, stochastic, steps, prediction):
    schedule = NoiseSchedule.cosine(T)
    diffusion = GaussianDiffusion(schedule, prediction=prediction, clip_denoised=False)
    chain = solver_for(diffusion, "dpmpp_2m_sde" if stochastic else "dpmpp_2m", steps, order=order)
    B, seed = 2, 11
    samples = torch.arange(B)
    x_T = rng.normal(seed, samples, T, rng.STREAM_PRIOR, SHAPE).double()
    model = model_of(prediction)
    # our chain on the float64 reference, from the same x_T and noise
    tables = chain.tables(torch.device("cpu"), torch.float64)
    x, history = x_T.clone(), torch.zeros(chain.history_slots, B, *SHAPE, dtype=torch.float64)
    noises = [rng.normal(seed, samples, int(t), rng.STREAM_REVERSE, SHAPE).double() for t in chain.chain.timesteps]
    for i in range(chain.num_steps):
        index = torch.full((B,), i)
        t = tables.t.index_select(0, index)
        out = model(x, tables.model_t.index_select(0, index))
        REFERENCE.solver_step(x, out, index, t, tables.table, history, noises[i] if stochastic else None, None,
                              prediction, "fixed_small", False, stochastic)

    def model_x0(xs, t, a, s):
        out = model(xs, torch.full((B,), int(t)))
        return {"eps": (xs - s * out) / a, "x0": out, "v": a * xs - s * out}[prediction]

    all_sigmas = ((1 - schedule.alphas_cumprod) / schedule.alphas_cumprod).sqrt().numpy()
    expected = paper_dpm_solver(chain.chain.timesteps.tolist(), all_sigmas[chain.chain.timesteps.numpy()],
                                model_x0, x_T, order, stochastic, noises)
    torch.testing.assert_close(x, expected, rtol=1e-10, atol=1e-10)


def test_orders_warm_up_and_lower_at_the_end():
    s = NoiseSchedule.linear(T)
    assert DPMSolverChain.build(s, 10, order=3).orders == (1, 2, 3, 3, 3, 3, 3, 3, 2, 1)
    assert DPMSolverChain.build(s, 20, order=3).orders == (1, 2) + (3,) * 17 + (1,)
    assert DPMSolverChain.build(s, 10, order=3, lower_order_final=False).orders == (1, 2) + (3,) * 7 + (1,)
    assert DPMSolverChain.build(s, 1, order=2).orders == (1,)
    chain = DPMSolverChain.build(s, 5)
    assert torch.equal(chain.row("c1"), torch.zeros(5)) is False and chain.row("c1")[0] == 0  # no history at first
    assert chain.row("cx")[-1] == 0 and chain.row("c0")[-1] == 1  # the last step lands on x̂₀


@pytest.mark.parametrize("spacing, expected", [("linspace", [999, 799, 599, 400, 200]),
                                                ("leading", [830, 664, 498, 332, 166]),
                                                ("trailing", [999, 799, 599, 399, 199])])
def test_spacings_are_diffusers(spacing, expected):
    assert DPMSolverChain.build(NoiseSchedule.linear(T), 5, spacing=spacing).timesteps.tolist() == expected


# ---- against diffusers ------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm, order, spacing, karras, steps", [
    ("dpmsolver++", 2, "linspace", False, 20), ("dpmsolver++", 2, "leading", False, 10),
    ("dpmsolver++", 3, "trailing", False, 25), ("dpmsolver++", 2, "linspace", True, 15),
    ("dpmsolver++", 1, "linspace", False, 8), ("sde-dpmsolver++", 2, "linspace", False, 20),
    ("sde-dpmsolver++", 2, "trailing", True, 12), ("sde-dpmsolver++", 3, "leading", False, 9),
])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_every_step_is_diffusers_dpm_solver_multistep_step(algorithm, order, spacing, karras, steps, prediction):
    """Same options, same model outputs, same noise: each fused step gives diffusers' next sample to
    float32 precision. (diffusers' σ's come from a float32 cumprod of the betas, 3e-5 off the
    float64 ones at T = 1000, which moves whole chains by up to 3e-3: so it steps on ours here.)"""
    diffusers = pytest.importorskip("diffusers")
    kinds = {"eps": "epsilon", "v": "v_prediction"}
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=T, beta_schedule="linear", solver_order=order, prediction_type=kinds[prediction],
        algorithm_type=algorithm, timestep_spacing=spacing, use_karras_sigmas=karras, lower_order_final=True)
    scheduler.set_timesteps(steps)
    solver = "dpmpp_2m_sde" if algorithm.startswith("sde") else "dpmpp_2m"
    chain = solver_for(GaussianDiffusion(NoiseSchedule.linear(T), prediction=prediction), solver, steps, order=order,
                       spacing=spacing, karras=karras).chain
    sigmas = chain.row("sigma_s") / chain.row("alpha_s")  # the VE σ's of the steps
    assert scheduler.timesteps.tolist() == chain.timesteps.tolist()
    torch.testing.assert_close(scheduler.sigmas[:-1].double(), sigmas, rtol=1e-4, atol=0)
    scheduler.sigmas = torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)]).float()

    B, seed, samples = 3, 5, torch.arange(3)
    table, model = chain.table.float(), model_of(prediction)
    x = rng.normal(seed, samples, T, rng.STREAM_PRIOR, SHAPE)
    history = torch.zeros(max(chain.orders) - 1, B, *SHAPE)
    for i, t in enumerate(scheduler.timesteps):
        out = model(x, t.expand(B))
        z = rng.normal(seed, samples, int(t), rng.STREAM_REVERSE, SHAPE)
        expected = scheduler.step(out, t, x, variance_noise=z).prev_sample
        got = x.clone()
        FUSED.solver_step(got, out, torch.full((B,), i), t.expand(B).clone(), table, history, z, None, prediction,
                          "fixed_small", False, chain.stochastic)
        torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-5, msg=lambda m: f"step {i}: {m}")
        x = expected


# ---- the sampler ------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["dpmpp_2m", "dpmpp_2m_sde"])
def test_an_image_is_the_same_in_any_batch_and_equals_gaussian_diffusion_sample(solver):
    diffusion = GaussianDiffusion(NoiseSchedule.linear(100))
    model = model_of("eps")
    sampler = Sampler(model, diffusion, solver=solver, steps=8, order=3, batch_size=4, progress=False, shape=SHAPE)
    images = sampler.sample(7, seed=3)
    for start, n in [(0, 1), (2, 3), (6, 1)]:
        assert torch.equal(Sampler(model, diffusion, solver=solver, steps=8, order=3, batch_size=2, progress=False,
                                   shape=SHAPE).sample(n, seed=3, start=start), images[start:start + n])
    direct = diffusion.sample(model, (7, *SHAPE), solver=solver, steps=8, order=3, seed=3, progress=False)
    torch.testing.assert_close(images, direct, rtol=0, atol=0)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("variance", ["fixed_large", "learned_range"])
def test_fused_chain_matches_the_reference_chain(prediction, variance):
    """Every prediction and variance (the mean half of a learned-range output), on a respaced
    schedule, float32 fused against the float32 reference."""
    diffusion = GaussianDiffusion(NoiseSchedule.linear(T).respace(250), prediction=prediction, variance=variance,
                                  loss="hybrid" if variance == "learned_range" else "simple")
    reference = GaussianDiffusion(diffusion.schedule, prediction=prediction, variance=variance, backend="reference",
                                  loss=diffusion.loss)
    model = model_of(prediction, learned=variance == "learned_range")
    for solver in ("dpmpp_2m", "dpmpp_2m_sde"):
        a = diffusion.sample(model, (3, *SHAPE), solver=solver, steps=10, seed=1, progress=False)
        b = reference.sample(model, (3, *SHAPE), solver=solver, steps=10, seed=1, progress=False)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_respaced_schedules_evaluate_the_model_at_their_original_timesteps():
    seen = []
    respaced = GaussianDiffusion(NoiseSchedule.linear(T).respace(100))

    def model(x, t):
        seen.append(int(t[0]))
        return torch.zeros_like(x)

    respaced.sample(model, (1, *SHAPE), solver="dpmpp_2m", steps=4, seed=0, progress=False)
    chain = solver_for(respaced, "dpmpp_2m", 4).chain
    assert seen == respaced.schedule.timesteps[chain.timesteps].tolist() and seen[0] == T - 1


@pytest.mark.parametrize("options, match", [
    (dict(solver="dpm"), "unknown solver 'dpm'; expected one of: ddpm, ddim, dpmpp_2m, dpmpp_2m_sde"),
    (dict(solver="dpmpp_2m", order=4), "unknown solver order 4; expected one of: 1, 2, 3"),
    (dict(solver="dpmpp_2m", spacing="even"), "unknown timestep spacing 'even'; expected one of: linspace, leading"),
    (dict(solver="dpmpp_2m", steps=0), "steps must be an integer between 1 and 1000"),
    (dict(solver="ddpm", order=2), "order apply to the dpmpp solvers only"),
    (dict(solver="ddpm", eta=0.5), "eta is DDIM's"),
    (dict(solver="dpmpp_2m", eta=0.5), "eta is DDIM's"),
    (dict(solver="ddim", eta=2.0), r"eta must lie in \[0, 1\]"),
])
def test_bad_solver_options_give_one_line(options, match):
    diffusion = GaussianDiffusion(NoiseSchedule.linear(T))
    with pytest.raises(ValueError, match=match) as raised:
        Sampler(model_of("eps"), diffusion, progress=False, shape=SHAPE, **options)
    assert "\n" not in str(raised.value)


def test_bad_solver_step_arguments_name_the_argument():
    chain = DPMSolverChain.build(NoiseSchedule.linear(T), 5)
    x, out = torch.zeros(2, *SHAPE), torch.zeros(2, *SHAPE)
    step, t, table = torch.tensor([0, 4]), torch.tensor([999, 3]), chain.table.float()
    history = torch.zeros(1, 2, *SHAPE)
    args = lambda **kw: {**dict(x=x, model_out=out, step=step, t=t, table=table, history=history, noise=None,  # noqa
                                key=None, prediction="eps", variance="fixed_small", clip_denoised=True,
                                stochastic=False), **kw}
    cases = [
        (args(step=torch.tensor([0, 5])), r"step out of range: .*\[0, 4\]"),
        (args(table=table[:3]), r"table must be a DPMSolverChain.table, float32 \[7, M\]"),
        (args(history=torch.zeros(3, 2, *SHAPE)), r"history must be a contiguous float32 \[S, 2, 3, 4, 4\]"),
        (args(x=x.transpose(2, 3)), "x must be contiguous"),
        (args(stochastic=True), "give noise, or a key"),
        (args(t=t.int()), r"t must be int64 \(2,\)"),
    ]
    for backend in (FUSED, REFERENCE):
        for kwargs, match in cases:
            with pytest.raises(ValueError, match=match):
                backend.solver_step(*kwargs.values())
