"""The eager reference: every operation a fused kernel implements, written from the equations.

This is the ground truth for kernel parity tests and the "eager" row of every benchmark.
Each op takes the schedule's `Coefficients` (device tables) and per-sample timestep indices
``t`` [B] (int64, on the tables' device); scalars are gathered by t on the device, so nothing
here syncs with the host or branches in Python on t. Noise always enters as an argument.

Shapes: images are [B, ...]; a model output has the image's shape, or twice its channels
(dim 1) with ``variance="learned_range"``.
"""

from __future__ import annotations

import torch

from .gaussian import discretized_gaussian_log_likelihood, mean_flat_bits, normal_kl
from .schedule import Coefficients

PREDICTIONS = ("eps", "x0", "v")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] values shaped [B, 1, ...] to broadcast against ``like`` [B, ...]."""
    return values.view(-1, *([1] * (like.ndim - 1)))


def at(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """table[t] per sample, broadcastable against ``like``."""
    return _per_sample(table[t], like)


# ---- forward process ------------------------------------------------------------------


def q_sample(x0, t, noise, coef: Coefficients):
    """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε  — eq. (4)."""
    return at(coef.sqrt_alphas_cumprod, t, x0) * x0 + at(coef.sqrt_one_minus_alphas_cumprod, t, x0) * noise


def q_posterior(x0, x_t, t, coef: Coefficients):
    """μ̃_t(x_t, x_0), β̃_t and log β̃_t of q(x_{t−1} | x_t, x_0)  — eq. (6), (7).

    β̃ is 0 at t = 0, so its log is clipped there to log β̃ of the next step."""
    mean = at(coef.posterior_mean_coef1, t, x0) * x0 + at(coef.posterior_mean_coef2, t, x0) * x_t
    return mean, at(coef.posterior_variance, t, x0), at(coef.posterior_log_variance_clipped, t, x0)


# ---- reverse process --------------------------------------------------------------------


def split_model_output(model_out, variance: str):
    """(mean prediction, variance values or None): learned_range models emit 2C channels."""
    if variance == "learned_range":
        return model_out.chunk(2, dim=1)
    return model_out, None


def guided_output(model_out, guidance: float, variance: str):
    """Classifier-free guidance (Ho & Salimans 2022, eq. (6), whose 1 + w is ``guidance`` here): the
    output of a batch [2B] whose first B rows are the conditional branch and last B the unconditional
    one, as one output [B]: prediction ε_u + w (ε_c − ε_u) (linear, so the same for ε, x_0 and v),
    with the conditional branch's variance values (learned_range)."""
    cond, uncond = model_out.chunk(2)
    pred_c, var_c = split_model_output(cond, variance)
    pred_u, _ = split_model_output(uncond, variance)
    pred = pred_u + guidance * (pred_c - pred_u)
    return pred if var_c is None else torch.cat([pred, var_c], dim=1)


def predict_x0(pred, x_t, t, coef: Coefficients, prediction: str):
    """x̂_0 from the network's prediction of ε (eq. (4) solved for x_0), x_0 itself, or v = √ᾱ ε − √(1−ᾱ) x_0."""
    if prediction == "eps":
        return at(coef.sqrt_recip_alphas_cumprod, t, x_t) * x_t - at(coef.sqrt_recipm1_alphas_cumprod, t, x_t) * pred
    if prediction == "x0":
        return pred
    return at(coef.sqrt_alphas_cumprod, t, x_t) * x_t - at(coef.sqrt_one_minus_alphas_cumprod, t, x_t) * pred


def p_log_variance(var_values, t, coef: Coefficients, variance: str, like):
    """log Σ_θ(x_t, t): β̃_t (fixed_small), β_t (fixed_large), or Nichol & Dhariwal's eq. (15)
    interpolation v log β_t + (1 − v) log β̃_t with v = (output + 1)/2 (learned_range)."""
    if variance == "fixed_small":
        return at(coef.posterior_log_variance_clipped, t, like)
    if variance == "fixed_large":
        return at(coef.log_large_variance, t, like)
    frac = (var_values + 1) / 2
    return frac * at(coef.log_betas, t, like) + (1 - frac) * at(coef.posterior_log_variance_clipped, t, like)


def p_mean_variance(model_out, x_t, t, coef: Coefficients, *, prediction: str, variance: str, clip_denoised: bool):
    """p_θ(x_{t−1} | x_t) = N(μ_θ, Σ_θ): dict(mean, variance, log_variance, pred_x0)  — eq. (1), (11).

    μ_θ is the posterior mean at the predicted x̂_0; for ε-prediction without clipping it is
    exactly eq. (11), (x_t − β_t/√(1 − ᾱ_t) ε_θ)/√α_t.
    """
    pred, var_values = split_model_output(model_out, variance)
    pred_x0 = predict_x0(pred, x_t, t, coef, prediction)
    if clip_denoised:
        pred_x0 = pred_x0.clamp(-1, 1)
    mean, _, _ = q_posterior(pred_x0, x_t, t, coef)
    log_variance = p_log_variance(var_values, t, coef, variance, x_t).expand_as(x_t)
    return {"mean": mean, "variance": log_variance.exp(), "log_variance": log_variance, "pred_x0": pred_x0}


def reverse_step(
    x_t, model_out, t, noise, coef: Coefficients, *, prediction: str, variance: str, clip_denoised: bool, eta=None,
    guidance=None,
):
    """One reverse step x_{t−1} from x_t, given the model output and the noise z.

    Ancestral DDPM (Algorithm 2): x_{t−1} = μ_θ + σ_t z. DDIM(η) when ``eta`` is given
    (Song et al. 2021, eq. (12)): x_{t−1} = √ᾱ_{t−1} x̂_0 + √(1 − ᾱ_{t−1} − σ²) ε̂ + σ z with
    σ = η √((1 − ᾱ_{t−1})/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t−1}). No noise is added at t = 0. With
    ``guidance`` w, model_out holds both branches [2B] (`guided_output`).
    """
    if guidance is not None:
        model_out = guided_output(model_out, guidance, variance)
    out = p_mean_variance(model_out, x_t, t, coef, prediction=prediction, variance=variance, clip_denoised=clip_denoised)
    nonzero = _per_sample((t > 0).to(x_t.dtype), x_t)
    if eta is None:
        return out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
    pred_x0 = out["pred_x0"]
    abar, abar_prev = at(coef.alphas_cumprod, t, x_t), at(coef.alphas_cumprod_prev, t, x_t)
    eps = (at(coef.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_x0) / at(coef.sqrt_recipm1_alphas_cumprod, t, x_t)
    sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
    mean = abar_prev.sqrt() * pred_x0 + torch.sqrt((1 - abar_prev - sigma**2).clamp(min=0)) * eps
    return mean + nonzero * sigma * noise


def solver_step(x, model_out, history, noise, coefs, *, prediction: str, variance: str, clip_denoised: bool,
                guidance=None):
    """One step of a multistep DPM-Solver++ chain (`fastddpm.solvers`): (x_t, new history).

    m0 = x̂₀ is the model's data prediction at the step's (α_s, σ_s) — DPM-Solver++ eq. (5):
    (x_s − σ_s ε)/α_s, the output itself, or α_s x_s − σ_s v —, optionally clipped; then
    x_t = cx x_s + c0 m0 + c1 m1 + c2 m2 + cz z, where m1, m2 are the earlier steps' x̂₀ in
    ``history`` [S, B, ...] (S ≤ 2 slots, newest first) and z is ``noise`` (None: no noise term).
    ``coefs`` maps the chain table's rows (alpha_s, sigma_s, cx, c0, c1, c2, cz) to per-sample
    values [B]. The new history is (m0, m1) cut to S slots. With ``guidance`` w, model_out holds
    both branches [2B] (`guided_output`, in x's dtype).
    """
    if guidance is not None:
        model_out = guided_output(model_out.to(x.dtype), guidance, variance)
    pred, _ = split_model_output(model_out, variance)
    c = {name: _per_sample(values, x) for name, values in coefs.items()}
    if prediction == "eps":
        m0 = (x - c["sigma_s"] * pred) / c["alpha_s"]
    elif prediction == "x0":
        m0 = pred.to(x.dtype)
    else:
        m0 = c["alpha_s"] * x - c["sigma_s"] * pred
    if clip_denoised:
        m0 = m0.clamp(-1, 1)
    out = c["cx"] * x + c["c0"] * m0
    for slot, name in zip(history, ("c1", "c2")):
        out = out + c[name] * slot
    if noise is not None:
        out = out + c["cz"] * noise
    return out, torch.stack([m0, *history[:-1]])[: len(history)] if len(history) else history


# ---- losses -------------------------------------------------------------------------------


def prediction_target(x0, noise, t, coef: Coefficients, prediction: str):
    """What the network is trained to output: ε, x_0, or v = √ᾱ_t ε − √(1 − ᾱ_t) x_0."""
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    return at(coef.sqrt_alphas_cumprod, t, x0) * noise - at(coef.sqrt_one_minus_alphas_cumprod, t, x0) * x0


def simple_loss(pred, x0, noise, t, coef: Coefficients, *, prediction: str, weights=None):
    """L_simple = E ‖target − prediction‖²  — eq. (14): (weighted mean over the batch, per-sample MSE).

    ``pred`` is the mean-prediction part of the model output; ``weights`` [B] scales each
    sample (min-SNR-γ, importance sampling) in the mean, not in the per-sample terms.
    """
    target = prediction_target(x0, noise, t, coef, prediction)
    per_sample = (pred.to(target.dtype) - target).pow(2).mean(dim=tuple(range(1, x0.ndim)))
    weighted = per_sample if weights is None else per_sample * weights
    return weighted.mean(), per_sample


def min_snr_weights(t, coef: Coefficients, gamma: float, prediction: str):
    """Min-SNR-γ loss weights (Hang et al. 2023): min(SNR_t, γ) in x_0 units, converted to the target's units."""
    abar = coef.alphas_cumprod[t]
    snr = abar / (1 - abar)
    clipped = snr.clamp(max=gamma)
    if prediction == "eps":
        return clipped / snr
    if prediction == "x0":
        return clipped
    return clipped / (snr + 1)


def vlb_terms(
    model_out, x0, x_t, t, coef: Coefficients, *, prediction: str, variance: str, clip_denoised: bool, levels: int
):
    """Per-sample terms of the bound in bits/dim  — eq. (5):
    L_{t−1} = KL(q(x_{t−1}|x_t, x_0) ‖ p_θ(x_{t−1}|x_t)) for t > 0, and the decoder
    L_0 = −log p_θ(x_0|x_1) (discretized Gaussian over ``levels`` values) at t = 0."""
    true_mean, _, true_log_variance = q_posterior(x0, x_t, t, coef)
    out = p_mean_variance(model_out, x_t, t, coef, prediction=prediction, variance=variance, clip_denoised=clip_denoised)
    kl = mean_flat_bits(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"]))
    decoder_nll = -mean_flat_bits(
        discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"], levels)
    )
    return torch.where(t == 0, decoder_nll, kl)


def prior_bpd(x0, coef: Coefficients):
    """L_T = KL(q(x_T | x_0) ‖ N(0, I)) in bits/dim per sample."""
    t = torch.full((x0.shape[0],), coef.num_timesteps - 1, device=x0.device, dtype=torch.int64)
    mean = at(coef.sqrt_alphas_cumprod, t, x0) * x0
    log_variance = torch.log1p(-at(coef.alphas_cumprod, t, x0)).expand_as(x0)
    return mean_flat_bits(normal_kl(mean, log_variance, torch.zeros_like(x0), torch.zeros_like(x0)))
