"""The native CPU kernels (kernels/native, built as `fastddpm._native`) against the noise
contract (fastddpm/rng.py) and the eager reference (fastddpm/reference.py).

Given the same noise, every op follows the reference's float32 operations one by one, so the
tolerances are a few ulp (rtol 1e-6, 1e-5 for the bound's log-CDFs); with noise generated in
the kernel they also cover the rounding of log/cos/sin (1e-5 absolute).
"""

import itertools
import math
import os
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

from fastddpm import options, reference, rng
from fastddpm.schedule import Coefficients, NoiseSchedule

try:
    from fastddpm import _native

    IMPORT_ERROR = None
except ImportError as error:  # not built: these tests skip, unless CI requires the build
    _native, IMPORT_ERROR = None, error

native = pytest.mark.skipif(_native is None, reason=f"fastddpm._native is not built: {IMPORT_ERROR}")

PREDICTION = {name: options.code(name, options.PREDICTIONS) for name in options.PREDICTIONS}
VARIANCE = {name: options.code(name, options.VARIANCES) for name in options.VARIANCES}
DTYPE = {dtype: options.code(dtype, options.MODEL_DTYPES) for dtype in options.MODEL_DTYPES}
SHAPE = (3, 5, 7)  # N = 105: Q = 27, the last quarter short
T = 1000
ETAS = (None, 0.0, 0.5, 1.0)  # DDPM, DDIM η = 0, 0.5, 1


@pytest.fixture(scope="module", params=["linear", "cosine"])
def coef(request):
    return NoiseSchedule.by_name(request.param, T).coefficients("cpu", torch.float32)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def timesteps(batch, seed=0):
    """Both ends of the schedule, then random steps."""
    return torch.cat([torch.tensor([0, T - 1]), torch.randint(0, T, (max(batch - 2, 0),), generator=gen(seed))])[:batch]


def model_output(batch, variance, dtype, seed):
    """A model output [B, C or 2C, ...] in ``dtype``; the variance half lies around [−1, 1]."""
    out = torch.randn(batch, (2 if variance == "learned_range" else 1) * SHAPE[0], *SHAPE[1:], generator=gen(seed))
    return out.to(dtype)


def contract_noise(seed, sample_base, steps, stream, shape=SHAPE):
    """rng.normal per sample, each at its own step."""
    return torch.cat([rng.normal(seed, torch.tensor([sample_base + b]), int(s), stream, shape) for b, s in enumerate(steps)])


def ptr(tensor):
    return 0 if tensor is None else tensor.data_ptr()


# ---- thin wrappers: tensors in, the ABI's buffers out ---------------------------------------


def native_normal(batch, shape, seed, sample_base, step, stream):
    out = torch.empty(batch, *shape)
    _native.normal(out.data_ptr(), batch, out[0].numel(), seed, sample_base, step, stream)
    return out


def native_reverse_step(x, model_out, t, coef, noise=None, seed=0, sample_base=0, *, prediction, variance, clip, eta,
                        guidance=None):
    B, N = x.shape[0], x[0].numel()
    out = torch.empty_like(x)
    _native.reverse_step(
        out.data_ptr(), x.data_ptr(), model_out.data_ptr(), DTYPE[model_out.dtype], model_out[0].numel(), t.data_ptr(),
        coef.table.data_ptr(), coef.num_timesteps, B, N, ptr(noise), seed, sample_base, PREDICTION[prediction],
        VARIANCE[variance], clip, eta is not None, 0.0 if eta is None else eta, guidance is not None,
        0.0 if guidance is None else guidance,
    )
    return out


def native_q_sample(x0, t, coef, noise=None, seed=0, sample_base=0, step=0):
    out = torch.empty_like(x0)
    _native.q_sample(
        out.data_ptr(), x0.data_ptr(), t.data_ptr(), coef.table.data_ptr(), coef.num_timesteps, x0.shape[0],
        x0[0].numel(), ptr(noise), seed, sample_base, step,
    )
    return out


def native_simple_loss(pred, pred_batch_stride, x0, t, coef, noise=None, seed=0, sample_base=0, step=0, *, prediction):
    """(per-sample MSE [B], its gradient [B, N]); ``pred`` is the buffer holding the predictions."""
    B, N = x0.shape[0], x0[0].numel()
    per_sample, grad = torch.empty(B), torch.empty(B, N)
    _native.simple_loss(
        per_sample.data_ptr(), grad.data_ptr(), pred.data_ptr(), DTYPE[pred.dtype], pred_batch_stride, x0.data_ptr(),
        t.data_ptr(), coef.table.data_ptr(), coef.num_timesteps, B, N, ptr(noise), seed, sample_base, step,
        PREDICTION[prediction],
    )
    return per_sample, grad


def native_vlb_terms(model_out, x0, x_t, t, coef, *, prediction, variance, clip, levels):
    out = torch.empty(x0.shape[0])
    _native.vlb_terms(
        out.data_ptr(), model_out.data_ptr(), DTYPE[model_out.dtype], model_out[0].numel(), x0.data_ptr(),
        x_t.data_ptr(), t.data_ptr(), coef.table.data_ptr(), coef.num_timesteps, x0.shape[0], x0[0].numel(),
        PREDICTION[prediction], VARIANCE[variance], clip, levels,
    )
    return out


# ---- the build and the ABI -------------------------------------------------------------------


def test_native_extension_is_built_where_required():
    if os.environ.get("FASTDDPM_REQUIRE_NATIVE") != "1":
        pytest.skip("FASTDDPM_REQUIRE_NATIVE is not 1")
    assert _native is not None, f"FASTDDPM_REQUIRE_NATIVE=1 but fastddpm._native does not import: {IMPORT_ERROR!r}"


@native
def test_the_codes_and_rows_are_the_python_ones():
    names = _native.names()
    assert names["rows"] == Coefficients.row_names()
    assert names["predictions"] == options.PREDICTIONS and names["variances"] == options.VARIANCES
    assert names["model_dtypes"] == tuple(str(d).removeprefix("torch.") for d in options.MODEL_DTYPES)


@native
def test_bad_arguments_raise_instead_of_reading_out_of_bounds():
    coef = NoiseSchedule.linear(T).coefficients("cpu", torch.float32)
    x = torch.zeros(2, *SHAPE)
    with pytest.raises(ValueError, match=rf"t out of range: t\[1\] = {T}, values must lie in \[0, {T - 1}\]"):
        native_q_sample(x, torch.tensor([0, T]), coef)
    with pytest.raises(ValueError, match="stride"):  # learned_range reads 2N values per sample
        native_reverse_step(x, x, torch.tensor([0, 1]), coef, prediction="eps", variance="learned_range", clip=False,
                            eta=None)
    with pytest.raises(ValueError, match="prediction"):
        _native.reverse_step(
            out_ptr=x.data_ptr(), x_ptr=x.data_ptr(), model_ptr=x.data_ptr(), model_dtype=0, model_batch_stride=105,
            t_ptr=torch.tensor([0, 1]).data_ptr(), table_ptr=coef.table.data_ptr(), T=T, B=2, N=105, noise_ptr=0,
            seed=0, sample_base=0, prediction=7, variance=0, clip=False, ddim=False, eta=0.0, guided=False, guidance=0.0,
        )


# ---- the noise contract ----------------------------------------------------------------------


@native
def test_philox_known_answers():
    """Random123's published known-answer vectors for philox4x32-10."""
    assert _native.philox(0, 0, 0, 0, 0) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    assert _native.philox(*[0xFFFFFFFF] * 4, 2**64 - 1) == (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)
    pi = (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)
    assert _native.philox(*pi, 0x299F31D0A4093822) == (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)


@native
def test_philox_matches_the_definition_bit_for_bit():
    g = gen(0)
    counters = torch.randint(0, 2**32, (4, 300), generator=g, dtype=torch.int64)
    seeds = [int(s) for s in torch.randint(0, 2**63 - 1, (300,), generator=g)]
    seeds[:3] = [0, 2**64 - 1, 2**63 + 12345]
    for i, seed in enumerate(seeds):
        c = counters[:, i : i + 1]
        expected = tuple(int(w) for w in rng.philox4x32(c[0], c[1], c[2], c[3], seed))
        assert _native.philox(*(int(v) for v in c[:, 0]), seed) == expected


@native
@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("seed", [0, 2024, 2**64 - 1, 2**64 - 12345])
def test_normal_matches_the_contract(batch, seed):
    for shape in (SHAPE, (1,), (2,), (3,), (5,), (4 * 1024 + 7,)):  # tiny N; N over several chunks
        for stream, step, base in ((rng.STREAM_PRIOR, T, 0), (rng.STREAM_REVERSE, 17, 2**32 + 9)):
            expected = rng.normal(seed, base + torch.arange(batch), step, stream, shape)
            assert_close(native_normal(batch, shape, seed, base, step, stream), expected, rtol=0, atol=1e-5)


@native
def test_sample_k_is_the_same_in_any_batch():
    batch = native_normal(8, SHAPE, 7, 100, 3, rng.STREAM_TRAIN)
    for k in range(8):
        assert torch.equal(native_normal(1, SHAPE, 7, 100 + k, 3, rng.STREAM_TRAIN)[0], batch[k])


@native
def test_normals_are_within_1e_6_of_box_muller_in_float64():
    """The kernels' log, sqrt, sin and cos against float64 on the definition's float32 uniforms
    (tighter than the contract's 1e-5, which also covers the definition's float32 θ)."""
    batch, shape, seed, step = 16, (3, 64, 64), 99, 4
    words = rng.philox_words(seed, torch.arange(batch), step, rng.STREAM_REVERSE, math.prod(shape))
    u = rng.uint_to_uniform(words).double()
    r = torch.sqrt(-2 * torch.log(torch.clamp(u[:, 0::2], min=torch.tensor(1e-7).item())))
    theta = 2 * math.pi * u[:, 1::2]
    pairs = torch.stack([r * torch.cos(theta), r * torch.sin(theta)], dim=2)  # [B, 2, 2, Q]: (n0, n1), (n2, n3)
    exact = pairs.reshape(batch, 4, -1).reshape(batch, -1)[:, : math.prod(shape)].reshape(batch, *shape)
    native = native_normal(batch, shape, seed, 0, step, rng.STREAM_REVERSE).double()
    assert (native - exact).abs().max().item() < 1e-6


@native
def test_every_cpu_level_draws_the_same_normals():
    """The AVX-512, AVX2 and portable versions (FASTDDPM_CPU_LEVEL caps the one picked) agree
    bit for bit, on sizes that end inside a vector."""
    script = (
        "import sys, torch; from fastddpm import _native\n"
        "out = torch.empty(3, 4 * 1024 + 7)\n"
        "_native.normal(out.data_ptr(), 3, out.shape[1], 2**64 - 5, 11, 6, 2)\n"
        "sys.stdout.write(out.numpy().tobytes().hex())\n"
    )
    results = {}
    for level in ("4", "3", "0"):
        env = {**os.environ, "FASTDDPM_CPU_LEVEL": level}
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        results[level] = done.stdout
    assert results["4"] == results["3"] == results["0"] and len(results["0"]) == 2 * 4 * 3 * (4 * 1024 + 7)
    expected = rng.normal(2**64 - 5, 11 + torch.arange(3), 6, 2, (4 * 1024 + 7,))
    assert_close(torch.frombuffer(bytearray.fromhex(results["0"]), dtype=torch.float32).view(3, -1), expected,
                 rtol=0, atol=1e-5)


# ---- reverse_step, q_sample --------------------------------------------------------------------


@native
@pytest.mark.parametrize("prediction", list(PREDICTION))
@pytest.mark.parametrize("variance", list(VARIANCE))
def test_reverse_step_matches_reference(coef, prediction, variance):
    cases = itertools.product((1, 7), (False, True), ETAS, DTYPE)
    for i, (batch, clip, eta, dtype) in enumerate(cases):
        g = gen(i)
        x = torch.randn(batch, *SHAPE, generator=g)
        z = torch.randn(batch, *SHAPE, generator=g)
        model_out = model_output(batch, variance, dtype, seed=i)
        step_ts = [timesteps(batch, seed=i)] + ([torch.tensor([0])] if batch == 1 else [])  # B = 1: t = 0 and T − 1
        for t in step_ts:
            kw = {"prediction": prediction, "variance": variance, "clip": clip, "eta": eta}
            expected = reference.reverse_step(x, model_out.float(), t, z, coef, prediction=prediction,
                                              variance=variance, clip_denoised=clip, eta=eta)
            assert_close(native_reverse_step(x, model_out, t, coef, z, **kw), expected, rtol=1e-6, atol=1e-6)
            # in-kernel noise at (seed, sample_base + b, t[b], STREAM_REVERSE)
            seed, base = 2**64 - 1 - i, 1000 + i
            z_contract = contract_noise(seed, base, t.tolist(), rng.STREAM_REVERSE)
            expected = reference.reverse_step(x, model_out.float(), t, z_contract, coef, prediction=prediction,
                                              variance=variance, clip_denoised=clip, eta=eta)
            got = native_reverse_step(x, model_out, t, coef, None, seed, base, **kw)
            assert_close(got, expected, rtol=1e-5, atol=1e-5)


@native
@pytest.mark.parametrize("prediction", list(PREDICTION))
@pytest.mark.parametrize("variance", list(VARIANCE))
def test_guided_reverse_step_matches_reference(coef, prediction, variance):
    """Classifier-free guidance: model_out [2B] (conditional, then unconditional), ε_u + w (ε_c − ε_u)
    read in the kernel, against `reference.guided_output` then the step, for every dtype, DDPM and DDIM."""
    for i, (w, eta, dtype) in enumerate(itertools.product((0.0, 1.0, 3.5), ETAS, DTYPE)):
        g, batch = gen(100 + i), 5
        x, z = torch.randn(batch, *SHAPE, generator=g), torch.randn(batch, *SHAPE, generator=g)
        model_out = model_output(2 * batch, variance, dtype, seed=100 + i)
        t = timesteps(batch, seed=i)
        expected = reference.reverse_step(x, model_out.float(), t, z, coef, prediction=prediction, variance=variance,
                                          clip_denoised=True, eta=eta, guidance=w)
        got = native_reverse_step(x, model_out, t, coef, z, prediction=prediction, variance=variance, clip=True,
                                  eta=eta, guidance=w)
        assert_close(got, expected, rtol=1e-6, atol=1e-6)


@native
def test_reverse_step_may_write_into_x_t():
    coef = NoiseSchedule.linear(T).coefficients("cpu", torch.float32)
    batch, shape = 4, (3, 64, 64)  # threaded, several chunks per sample
    g = gen(0)
    x, model_out = torch.randn(batch, *shape, generator=g), torch.randn(batch, 2 * shape[0], *shape[1:], generator=g)
    t = timesteps(batch)
    kw = {"prediction": "v", "variance": "learned_range", "clip": True, "eta": None}
    expected = native_reverse_step(x, model_out, t, coef, None, 5, 0, **kw)
    _native.reverse_step(
        x.data_ptr(), x.data_ptr(), model_out.data_ptr(), 0, model_out[0].numel(), t.data_ptr(), coef.table.data_ptr(),
        T, batch, x[0].numel(), 0, 5, 0, PREDICTION["v"], VARIANCE["learned_range"], True, False, 0.0, False, 0.0,
    )
    assert torch.equal(x, expected)


@native
def test_q_sample_matches_reference(coef):
    for batch in (1, 7):
        g = gen(batch)
        x0, z = torch.rand(batch, *SHAPE, generator=g) * 2 - 1, torch.randn(batch, *SHAPE, generator=g)
        t = timesteps(batch, seed=batch)
        assert_close(native_q_sample(x0, t, coef, z), reference.q_sample(x0, t, z, coef), rtol=1e-6, atol=1e-6)
        seed, base, step = 2**64 - 3, 40, 123_456
        z_contract = rng.normal(seed, base + torch.arange(batch), step, rng.STREAM_TRAIN, SHAPE)
        assert_close(native_q_sample(x0, t, coef, None, seed, base, step), reference.q_sample(x0, t, z_contract, coef),
                     rtol=1e-5, atol=1e-5)


# ---- simple_loss ---------------------------------------------------------------------------------


@native
@pytest.mark.parametrize("prediction", list(PREDICTION))
def test_simple_loss_matches_reference_and_autograd(coef, prediction):
    batch, seed, base, step = 7, 99, 3, 5000
    cases = itertools.product((1, 2), DTYPE, (False, True))
    for i, (channels, dtype, generated) in enumerate(cases):
        g = gen(i)
        x0 = torch.rand(batch, *SHAPE, generator=g) * 2 - 1
        z = contract_noise(seed, base, [step] * batch, rng.STREAM_TRAIN) if generated else torch.randn(x0.shape, generator=g)
        t = timesteps(batch, seed=i)
        # with channels = 2, pred is the mean half of a learned-range output: batch stride 2N
        full = torch.randn(batch, channels * SHAPE[0], *SHAPE[1:], generator=g).to(dtype)
        pred = full[:, : SHAPE[0]]
        per_sample, grad = native_simple_loss(full, full[0].numel(), x0, t, coef, None if generated else z, seed, base,
                                              step, prediction=prediction)

        pred_ref = pred.float().requires_grad_()
        _, expected = reference.simple_loss(pred_ref, x0, z, t, coef, prediction=prediction)
        expected.sum().backward()  # d MSE_b / d pred, each sample's own
        assert_close(per_sample, expected.detach(), rtol=1e-5 if generated else 1e-6, atol=1e-7)
        # generated ε is the contract's to 1e-5, and the gradient is 2 (pred − ε) / N
        atol = 2 * 1e-5 / x0[0].numel() if generated else 1e-9
        assert_close(grad.view_as(pred), pred_ref.grad, rtol=1e-5 if generated else 2e-6, atol=atol)


@native
def test_per_sample_sums_do_not_depend_on_the_thread_count():
    coef = NoiseSchedule.linear(T).coefficients("cpu", torch.float32)
    batch, shape = 4, (3, 64, 64)  # 49k elements: over the threading threshold, several chunks per sample
    g = gen(0)
    x0, pred = torch.rand(batch, *shape, generator=g), torch.randn(batch, *shape, generator=g)
    t = timesteps(batch)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, max(threads, 2)):
            torch.set_num_threads(n)  # the same OpenMP runtime as torch's
            results.append(native_simple_loss(pred, pred[0].numel(), x0, t, coef, None, 1, 0, 2, prediction="v")[0])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


@native
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_half_value_widens_exactly(dtype):
    """All 65536 bit patterns (subnormals, ±inf, NaN included) read as torch widens them."""
    coef = NoiseSchedule.linear(T).coefficients("cpu", torch.float32)
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    pred = bits.view(dtype).reshape(1, -1)
    zeros = torch.zeros(pred.shape)
    # x0-prediction at t = 0 passes the model output through: μ̃ = 1·x̂₀ + 0·x_t, no noise
    t = torch.tensor([0])
    assert coef.posterior_mean_coef1[0].item() == 1 and coef.posterior_mean_coef2[0].item() == 0
    out = native_reverse_step(zeros, pred, t, coef, zeros, prediction="x0", variance="fixed_small", clip=False, eta=None)
    assert_close(out, pred.float(), rtol=0, atol=0, equal_nan=True)


def accurate_ndtr(x):
    """Φ(x) = ½ erfc(−x/√2) in float64, rounded once to x's dtype."""
    return (0.5 * torch.erfc(-x.double() * math.sqrt(0.5))).to(x.dtype)


@native
@pytest.mark.parametrize("prediction", list(PREDICTION))
@pytest.mark.parametrize("variance", list(VARIANCE))
def test_vlb_terms_match_reference(coef, prediction, variance, monkeypatch):
    """KL terms and decoder NLL, against the reference evaluated with an accurate Φ.

    float32 `torch.special.ndtr` is (1 + erf(x/√2))/2, off by up to 6e-8 absolute, so the
    reference's middle-bin probabilities below ~1e-7 are noise (clamped at 1e-12), e.g. −27.6
    instead of −23.2 nats for a bin 6.4σ–7.5σ out. The kernel's Φ is erfc in float64.
    """
    monkeypatch.setattr(torch.special, "ndtr", accurate_ndtr)
    batch = 7
    for i, (levels, clip, dtype) in enumerate(itertools.product((17, 256), (False, True), DTYPE)):
        g = gen(i)
        x0 = torch.randint(0, levels, (batch, *SHAPE), generator=g) / (levels - 1) * 2 - 1  # on the data grid
        t = torch.tensor([0, 0, 1, 2, 500, T - 1, int(torch.randint(0, T, (1,), generator=g))])
        x_t = reference.q_sample(x0, t, torch.randn(x0.shape, generator=g), coef)
        model_out = model_output(batch, variance, dtype, seed=i)
        expected = reference.vlb_terms(model_out.float(), x0, x_t, t, coef, prediction=prediction, variance=variance,
                                       clip_denoised=clip, levels=levels)
        got = native_vlb_terms(model_out, x0, x_t, t, coef, prediction=prediction, variance=variance, clip=clip,
                               levels=levels)
        assert_close(got, expected, rtol=1e-5, atol=1e-6)


@native
def test_vlb_decoder_is_accurate_in_the_tails():
    """Bins far from the mean, against Φ from math.erfc in float64: middle bins 6.4σ below and
    7σ above, and the outermost bins at 15σ and 30σ (where erfc underflows in the kernel's
    float64 and it takes the asymptotic series of log Φ)."""
    coef = NoiseSchedule.linear(T).coefficients("cpu", torch.float32)
    levels = 256
    half_bin = 1 / (levels - 1)
    std = math.exp(0.5 * coef.posterior_log_variance_clipped[0].item())
    x0 = torch.tensor([[128, 200, 0, 0, 255, 255, 60]]) / (levels - 1) * 2 - 1
    # model predicts x0 and at t = 0 the mean is exactly the prediction: μ̃ = 1·x̂₀ + 0·x_t
    offsets = torch.tensor([[half_bin + 6.4 * std, -half_bin - 7 * std, half_bin + 15 * std, half_bin + 30 * std,
                             -half_bin - 15 * std, -half_bin - 30 * std, 0.3 * std]])
    mean = (x0 + offsets).float()
    t = torch.tensor([0])
    got = native_vlb_terms(mean, x0, torch.zeros_like(x0), t, coef, prediction="x0", variance="fixed_small", clip=False,
                           levels=levels)

    inv_std = torch.exp(-(0.5 * coef.posterior_log_variance_clipped[t]))
    upper, lower = inv_std * (x0 - mean + half_bin), inv_std * (x0 - mean - half_bin)  # float32, as the kernel

    def ndtr(z):
        return 0.5 * math.erfc(-z / math.sqrt(2))

    log_p = []
    for x, u, l in zip(x0.flatten().tolist(), upper.flatten().tolist(), lower.flatten().tolist()):
        if x < -1 + half_bin:
            log_p.append(math.log(ndtr(u)))
        elif x > 1 - half_bin:
            log_p.append(math.log(ndtr(-l)))
        else:
            log_p.append(math.log(ndtr(-l) - ndtr(-u) if l > 0 else ndtr(u) - ndtr(l)))
    expected = -sum(log_p) / len(log_p) / math.log(2)
    assert got.item() == pytest.approx(expected, rel=1e-5)
