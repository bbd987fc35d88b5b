"""`GaussianDiffusion`: the DDPM forward and reverse processes, the losses and the bound.

The class holds the schedule, calls the model, and runs the fusable ops (q_sample,
reverse_step, simple_loss, vlb_terms) on a backend of `fastddpm.ops`, which checks their
arguments (t's range included, without a host sync on a GPU); the equations themselves live in
`fastddpm.reference` and `fastddpm.gaussian`.

``t`` is always a per-sample index into this diffusion's schedule ([B], int64); the model is
called with the original timestep of that index (they differ only after `respace`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from . import conditioning, options, reference, rng, solvers, validate
from .kernels import checks
from .ops import backend_for
from .progress import bar as progress_bar
from .schedule import Coefficients, NoiseSchedule

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_KEYS_KEPT = 64  # noise keys cached per diffusion (a sampling loop reuses one)


class GaussianDiffusion:
    """DDPM (Ho et al. 2020) over a `NoiseSchedule`.

    prediction: what the network outputs — "eps" (ε, the paper's), "x0", or "v".
    variance: Σ_θ — "fixed_small" (β̃_t), "fixed_large" (β_t), or "learned_range"
        (Nichol & Dhariwal; the network outputs 2×C channels, the second half interpolating
        log β̃_t … log β_t).
    loss: "simple" (L_simple, eq. (14)), "vlb" (T·L_t, an unbiased estimate of Σ_t L_t), or
        "hybrid" (L_simple + λ·T·L_t with λ = ``hybrid_lambda`` and the mean stop-gradiented
        in the bound term, Nichol & Dhariwal eq. (16)).
    clip_denoised: clip the predicted x_0 to [−1, 1] when sampling and evaluating the bound.
    levels: number of intensity levels of the data, for the discretized decoder L_0.
    min_snr_gamma: weight each sample's loss by min-SNR-γ (Hang et al. 2023) when set.
    backend: which implementation runs the fusable ops ("auto", "reference", …).
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        prediction: str = "eps",
        variance: str = "fixed_small",
        loss: str = "simple",
        clip_denoised: bool = True,
        levels: int = 256,
        min_snr_gamma: float | None = None,
        hybrid_lambda: float = 1e-3,
        backend: str = "auto",
    ):
        if not isinstance(schedule, NoiseSchedule):
            raise ValueError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        validate.integer("levels", levels, 2, 2**16 + 1)  # the data's quantization levels: 8-bit is 256, 16-bit 65536
        if validate.number("min_snr_gamma", min_snr_gamma, 0, optional=True) == 0:
            raise ValueError("min_snr_gamma must be positive or null, got 0")
        validate.number("hybrid_lambda", hybrid_lambda, 0)
        validate.flag("clip_denoised", clip_denoised)
        backend_for(backend)  # validate the name now, not at the first step
        self.schedule = schedule
        self.prediction = options.choice("prediction", prediction, options.PREDICTIONS)
        self.variance = options.choice("variance", variance, options.VARIANCES)
        self.loss = options.choice("loss", loss, options.LOSSES)
        self.clip_denoised = clip_denoised
        self.levels = levels
        self.min_snr_gamma = min_snr_gamma
        self.hybrid_lambda = hybrid_lambda
        self.backend = backend
        self._keys: dict[tuple, torch.Tensor] = {}

    @property
    def num_timesteps(self) -> int:
        return len(self.schedule)

    def config(self) -> dict:
        """The options (without schedule and backend) as a JSON-serialisable dict."""
        return {
            "prediction": self.prediction,
            "variance": self.variance,
            "loss": self.loss,
            "clip_denoised": self.clip_denoised,
            "levels": self.levels,
            "min_snr_gamma": self.min_snr_gamma,
            "hybrid_lambda": self.hybrid_lambda,
        }

    def respace(self, steps: int | Sequence[int]) -> "GaussianDiffusion":
        """The same process on a sub-sequence of timesteps (see `NoiseSchedule.respace`)."""
        return GaussianDiffusion(self.schedule.respace(steps), backend=self.backend, **self.config())

    # ---- plumbing ---------------------------------------------------------------------

    def coefficients(self, like: torch.Tensor) -> Coefficients:
        """Schedule tables on ``like``'s device, float64 for float64 data and float32 otherwise."""
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        return self.schedule.coefficients(like.device, dtype)

    def _ops(self, x: torch.Tensor):
        return backend_for(self.backend, x.dtype)

    def _model_output(self, model: Model, x_t: torch.Tensor, t: torch.Tensor, coef: Coefficients,
                      model_kwargs: dict) -> torch.Tensor:
        """The model at x_t and the original timesteps of t (t itself unless respaced; there, t is
        clamped into the table so that a bad t is reported by the op, not by this gather)."""
        if self.schedule.respaced:
            t = coef.timesteps.index_select(0, t.clamp(0, self.num_timesteps - 1))
        return self._model_at(model, x_t, t, model_kwargs)

    def _model_at(self, model: Model, x_t: torch.Tensor, model_t: torch.Tensor, model_kwargs: dict) -> torch.Tensor:
        """The model at x_t, the timesteps and the conditioning (`fastddpm.conditioning`, checked by
        the caller), its output's shape checked."""
        out = model(x_t, model_t, **model_kwargs)
        expected = list(x_t.shape)
        if self.variance == "learned_range":
            expected[1] *= 2
        if not isinstance(out, torch.Tensor) or list(out.shape) != expected:
            raise ValueError(
                f"model output has shape {tuple(getattr(out, 'shape', ()))}, expected {tuple(expected)} "
                f"(prediction={self.prediction!r}, variance={self.variance!r})"
            )
        return out

    def _key(self, seed: int, sample_index: int, step: int, device: torch.device) -> torch.Tensor:
        """The noise key [seed, sample_index, step] on ``device``, made once and kept (`rng.noise_key`
        checks the values)."""
        validate.integer("sample_index", sample_index, 0)
        coordinates = (seed, sample_index, step, device)
        key = self._keys.get(coordinates)
        if key is None:
            if len(self._keys) >= _KEYS_KEPT:
                self._keys.clear()
            key = self._keys[coordinates] = rng.noise_key(seed, sample_index, step, device)
        return key

    # ---- input checks (of what this class uses itself; the ops check their arguments) --------

    @staticmethod
    def _check_images(name: str, x) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.ndim < 2:
            raise ValueError(f"{name} must have shape [B, ...] with at least 2 dims, got {tuple(x.shape)}")

    @staticmethod
    def _check_t(t, x: torch.Tensor) -> torch.Tensor:
        """t as int64 [B] on x's device (its values are the ops' to check)."""
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"t must be an int64 tensor of timestep indices, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape [B] = ({x.shape[0]},), got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"t is on {t.device}, expected {x.device}")
        return t.long()

    # ---- forward process ------------------------------------------------------------------

    def q_sample(
        self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None,
        seed: int | None = None, sample_index: int = 0, step: int = 0,
    ) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I)  — eq. (4).

        ε is ``noise``, else the noise contract's at (``seed``, ``sample_index`` + b, ``step``)
        when a seed is given, else ``torch.randn``.
        """
        self._check_images("x0", x0)
        t = self._check_t(t, x0)
        noise, key = self._noise(x0, noise, seed, sample_index, step)
        return self._ops(x0).q_sample(x0, t, self.coefficients(x0).table, noise, key)

    def _noise(self, like: torch.Tensor, noise, seed, sample_index: int, step: int):
        """(noise, key) for an op: the given noise; else the contract's at a seed, from its key; else N(0, I)."""
        if noise is not None:
            return noise, None
        if seed is not None:
            return None, self._key(seed, sample_index, step, like.device)
        return torch.randn_like(like), None

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """(μ̃_t, β̃_t, log β̃_t clipped) of q(x_{t−1} | x_t, x_0)  — eq. (6), (7)."""
        self._check_images("x0", x0)
        self._check_images("x_t", x_t)
        t = self._check_t(t, x0)
        checks.timesteps_in_range("q_posterior", t, self.num_timesteps)
        mean, variance, log_variance = reference.q_posterior(x0, x_t, t, self.coefficients(x0))
        return mean, variance.expand_as(x0), log_variance.expand_as(x0)

    # ---- reverse process --------------------------------------------------------------------

    def p_mean_variance(self, model: Model, x_t: torch.Tensor, t: torch.Tensor, model_kwargs: dict | None = None) -> dict:
        """dict(mean, variance, log_variance, pred_x0) of p_θ(x_{t−1} | x_t)  — eq. (1), (11)."""
        self._check_images("x_t", x_t)
        t = self._check_t(t, x_t)
        checks.timesteps_in_range("p_mean_variance", t, self.num_timesteps)
        coef = self.coefficients(x_t)
        out = self._model_output(model, x_t, t, coef, conditioning.check(model_kwargs, len(x_t), x_t.device))
        return reference.p_mean_variance(out, x_t, t, coef, prediction=self.prediction, variance=self.variance,
                                         clip_denoised=self.clip_denoised)

    def p_sample(
        self, model: Model, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None,
        eta: float | None = None, seed: int | None = None, sample_index: int = 0, model_kwargs: dict | None = None,
    ) -> torch.Tensor:
        """One reverse step x_{t−1} ~ p_θ(x_{t−1} | x_t) (Algorithm 2), or DDIM(η) when ``eta`` is given.

        z is ``noise``, else the noise contract's at (``seed``, ``sample_index`` + b, t[b])
        when a seed is given, else ``torch.randn``. ``model_kwargs``: the conditioning handed to
        the model (`fastddpm.conditioning`).
        """
        self._check_images("x_t", x_t)
        t = self._check_t(t, x_t)
        model_kwargs = conditioning.check(model_kwargs, len(x_t), x_t.device)
        noise, key = self._noise(x_t, noise, seed, sample_index, 0)
        coef = self.coefficients(x_t)
        out = self._model_output(model, x_t, t, coef, model_kwargs)
        return self._ops(x_t).reverse_step(x_t, out, t, coef.table, noise, key, self.prediction, self.variance,
                                           self.clip_denoised, eta)

    @torch.no_grad()
    def sample(
        self,
        model: Model,
        shape: Sequence[int],
        steps: int | Sequence[int] | None = None,
        eta: float | None = None,
        generator: torch.Generator | None = None,
        progress: bool = True,
        device: torch.device | str | None = None,
        seed: int | None = None,
        sample_index: int = 0,
        solver: str | None = None,
        model_kwargs: dict | None = None,
        **solver_options,
    ) -> torch.Tensor:
        """Draw samples [shape] from x_T ~ N(0, I) by a reverse chain (`solvers.solver_for`).

        ``solver``: "ddpm" (ancestral sampling, Algorithm 2; ``steps`` respaces), "ddim" (η =
        ``eta``), "dpmpp_2m" or "dpmpp_2m_sde" (DPM-Solver++ with ``steps`` model evaluations;
        ``solver_options``: order, spacing, karras, lower_order_final); by default "ddpm", or
        "ddim" when ``eta`` is given. With a ``seed``, all noise follows the noise contract and
        image b is the image ``sample_index`` + b of that seed, whatever the batch; otherwise
        noise comes from ``generator``. ``device`` defaults to the model's. ``model_kwargs``: the
        conditioning of each image, handed to every model call (`fastddpm.conditioning`).
        """
        chain = solvers.solver_for(self, solver, steps, eta=eta, **solver_options)
        shape = tuple(int(s) for s in shape)
        if len(shape) < 2 or min(shape) < 1:
            raise ValueError(f"shape must be [B, ...] with positive sizes, got {shape}")
        if device is None:
            params = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
            device = params.device if params is not None else "cpu"
        device = torch.device(device)
        model_kwargs = conditioning.check(model_kwargs, shape[0], device)
        diffusion = chain.diffusion
        if seed is None:
            x, key = torch.randn(shape, generator=generator, device=device), None
        else:
            key = diffusion._key(seed, sample_index, 0, device)
            samples = sample_index + torch.arange(shape[0], device=device)
            x = rng.normal(seed, samples, diffusion.num_timesteps, rng.STREAM_PRIOR, shape[1:])
        tables, ops = chain.tables(x.device, x.dtype), diffusion._ops(x)
        history = x.new_zeros(chain.history_slots, *shape)
        index = torch.empty(shape[0], device=x.device, dtype=torch.int64)
        for i in progress_bar(range(chain.num_steps), desc="sampling", disable=not progress):
            index.fill_(chain.position(i))
            out = diffusion._model_at(model, x, tables.model_t.index_select(0, index), model_kwargs)
            noise = torch.randn(shape, generator=generator, device=x.device) if key is None and chain.takes_noise else None
            chain.update(ops, x, out, index, tables.t.index_select(0, index), tables, history, noise, key)
        return x

    # ---- training --------------------------------------------------------------------------

    def training_losses(
        self,
        model: Model,
        x0: torch.Tensor,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
        seed: int | None = None,
        sample_index: int = 0,
        step: int = 0,
        key: torch.Tensor | None = None,
        model_kwargs: dict | None = None,
    ) -> dict:
        """The training objective for a batch: dict(loss, per_sample, mse, vb, t).

        ``t`` defaults to uniform timesteps. ε is ``noise``, else the noise contract's at
        (``seed``, ``sample_index`` + b, ``step``) — regenerated by the loss instead of
        stored — when a seed is given, else ``torch.randn``. ``weights`` [B] (e.g.
        importance-sampling weights) multiply each sample's loss in the mean, together with
        min-SNR-γ weights when configured. ``per_sample`` is each sample's unweighted loss
        (what a loss-aware timestep sampler learns from); ``vb`` is L_t in bits/dim, or None.
        ``key`` (`fastddpm.rng.noise_key`: int64 [seed, sample_index, step] on x0's device) may
        replace the three integers: a compiled training step takes it as a tensor, so a new
        step is new data, not a recompile. ``model_kwargs``: each image's conditioning, handed to
        the model (`fastddpm.conditioning`).
        """
        self._check_images("x0", x0)
        model_kwargs = conditioning.check(model_kwargs, len(x0), x0.device)
        if self.variance == "learned_range" and self.loss == "simple":
            raise ValueError("variance='learned_range' is only trained by loss='vlb' or 'hybrid', not 'simple'")
        if t is None:
            t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device)
        t = self._check_t(t, x0)
        if key is None:
            noise, key = self._noise(x0, noise, seed, sample_index, step)
        if weights is not None and (not isinstance(weights, torch.Tensor) or weights.shape != (x0.shape[0],)):
            raise ValueError(f"weights must be a tensor of shape [B] = ({x0.shape[0]},)")
        coef = self.coefficients(x0)
        if self.min_snr_gamma is not None:
            snr_weights = reference.min_snr_weights(t, coef, self.min_snr_gamma, self.prediction)
            weights = snr_weights if weights is None else weights * snr_weights
        ops = self._ops(x0)
        x_t = ops.q_sample(x0, t, coef.table, noise, key)
        out = self._model_output(model, x_t, t, coef, model_kwargs)
        pred, var_values = reference.split_model_output(out, self.variance)

        terms = {"t": t, "mse": None, "vb": None}
        loss = per_sample = 0
        if self.loss in ("simple", "hybrid"):
            terms["mse"], _ = ops.simple_loss(pred, x0, t, coef.table, noise, key, self.prediction)
            per_sample = terms["mse"]
            loss = (per_sample if weights is None else per_sample * weights).mean()
        if self.loss in ("vlb", "hybrid"):
            # The bound trains Σ_θ; under "hybrid" the mean is learned by L_simple alone.
            if self.loss == "vlb":
                frozen = out
            elif var_values is None:
                frozen = pred.detach()
            else:
                frozen = torch.cat([pred.detach(), var_values], dim=1)
            vb = ops.vlb_terms(frozen, x0, x_t, t, coef.table, self.prediction, self.variance, False, self.levels)
            scale = self.num_timesteps * (1.0 if self.loss == "vlb" else self.hybrid_lambda)
            weighted_vb = vb if weights is None else vb * weights
            loss = loss + scale * weighted_vb.mean()
            per_sample = per_sample + scale * vb
            terms["vb"] = vb
        return {"loss": loss, "per_sample": per_sample, **terms}

    def training_loss(self, model: Model, x0: torch.Tensor, t=None, noise=None, weights=None, **options) -> torch.Tensor:
        """The scalar training loss (see `training_losses` for the per-sample terms, the seed and
        ``model_kwargs``)."""
        return self.training_losses(model, x0, t=t, noise=noise, weights=weights, **options)["loss"]

    # ---- the variational bound ------------------------------------------------------------

    def vlb_terms(self, model: Model, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                  model_kwargs: dict | None = None) -> torch.Tensor:
        """Per-sample L_{t−1} (t > 0) or L_0 (t = 0) in bits/dim at the given x_t  — eq. (5)."""
        self._check_images("x0", x0)
        t = self._check_t(t, x0)
        coef = self.coefficients(x0)
        out = self._model_output(model, x_t, t, coef, conditioning.check(model_kwargs, len(x0), x0.device))
        return self._ops(x0).vlb_terms(out, x0, x_t, t, coef.table, self.prediction, self.variance,
                                       self.clip_denoised, self.levels)

    def prior_bpd(self, x0: torch.Tensor) -> torch.Tensor:
        """Per-sample L_T = KL(q(x_T | x_0) ‖ N(0, I)) in bits/dim."""
        self._check_images("x0", x0)
        return reference.prior_bpd(x0, self.coefficients(x0))

    @torch.no_grad()
    def nll(
        self, model: Model, x0: torch.Tensor, generator: torch.Generator | None = None, progress: bool = True,
        model_kwargs: dict | None = None,
    ) -> dict:
        """The full bound L = L_T + Σ_{t>1} L_{t−1} + L_0 in bits/dim, per image of the batch.

        Returns dict(total_bpd [B], prior_bpd [B], decoder_bpd [B], vb [B, T]); vb[:, t] is the
        term at index t (vb[:, 0] is the decoder L_0), each at x_t drawn from q(x_t | x_0).
        ``model_kwargs``: each image's conditioning (`fastddpm.conditioning`).
        """
        self._check_images("x0", x0)
        model_kwargs = conditioning.check(model_kwargs, len(x0), x0.device)
        coef = self.coefficients(x0)
        ops = self._ops(x0)
        batch = x0.shape[0]
        vb = torch.empty(batch, self.num_timesteps, dtype=x0.dtype, device=x0.device)
        for i in progress_bar(range(self.num_timesteps - 1, -1, -1), desc="bits/dim", disable=not progress):
            t = torch.full((batch,), i, device=x0.device, dtype=torch.int64)
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            x_t = ops.q_sample(x0, t, coef.table, noise, None)
            out = self._model_output(model, x_t, t, coef, model_kwargs)
            vb[:, i] = ops.vlb_terms(out, x0, x_t, t, coef.table, self.prediction, self.variance, self.clip_denoised,
                                     self.levels)
        prior = reference.prior_bpd(x0, coef)
        return {"total_bpd": vb.sum(1) + prior, "prior_bpd": prior, "decoder_bpd": vb[:, 0], "vb": vb}
