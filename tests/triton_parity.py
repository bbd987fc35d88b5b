"""Parity of the Triton kernels with `fastddpm.reference` and the noise contract `fastddpm.rng`.

Not collected by the main pytest run (no ``test_`` prefix): `tests/test_triton.py` runs this
file in a subprocess, interpreted on the CPU (``TRITON_INTERPRET=1``, which has to be set
before triton is imported) or compiled on CUDA (``FASTDDPM_TRITON_DEVICE=cuda``). By hand:

    TRITON_INTERPRET=1 python -m pytest -q -p no:cacheprovider tests/triton_parity.py
    FASTDDPM_TRITON_DEVICE=cuda python -m pytest -q -p no:cacheprovider tests/triton_parity.py

With ``FASTDDPM_TRITON_DEVICE=aot`` (no interpreter, no GPU needed) only
`test_kernels_compile_for_cuda` runs: every constexpr variant of every kernel is compiled
for sm_90 through ptxas, which catches what the interpreter accepts but the compiler does not.

The reference always runs on the CPU in float32 (and float64 where float32 is not accurate
enough to judge); the kernels get the same inputs on DEVICE. Sizes are small and odd (3×5×7,
Q = 27 with a short last quarter; batch 1 and 7) because the interpreter is slow.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
from pathlib import Path

MODE = os.environ.get("FASTDDPM_TRITON_DEVICE", "cpu")  # "cpu" (interpreted), "cuda" or "aot"
if MODE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
elif MODE == "aot":
    os.environ.pop("TRITON_INTERPRET", None)
DEVICE = "cpu" if MODE == "aot" else MODE  # where the tensors live

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
if (ROOT / "kernels" / "triton" / "__init__.py").exists():  # a checkout: test its kernels
    sys.path.insert(0, str(ROOT))
    from kernels.triton import eps_loss as eps_loss_mod  # noqa: E402
    from kernels.triton import noise as noise_mod  # noqa: E402
    from kernels.triton import ops as triton_ops  # noqa: E402
    from kernels.triton import q_sample as q_sample_mod  # noqa: E402
    from kernels.triton import reverse_step as reverse_step_mod  # noqa: E402
    from kernels.triton import vlb_terms as vlb_mod  # noqa: E402
else:  # an installed package
    from fastddpm.kernels.triton import eps_loss as eps_loss_mod  # noqa: E402
    from fastddpm.kernels.triton import noise as noise_mod  # noqa: E402
    from fastddpm.kernels.triton import ops as triton_ops  # noqa: E402
    from fastddpm.kernels.triton import q_sample as q_sample_mod  # noqa: E402
    from fastddpm.kernels.triton import reverse_step as reverse_step_mod  # noqa: E402
    from fastddpm.kernels.triton import vlb_terms as vlb_mod  # noqa: E402

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fastddpm import NoiseSchedule, reference, rng  # noqa: E402
from fastddpm import ops as fastddpm_ops  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
if MODE not in ("cpu", "cuda", "aot"):
    raise ValueError(f"FASTDDPM_TRITON_DEVICE must be cpu, cuda or aot, got {MODE!r}")
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("FASTDDPM_TRITON_DEVICE=cuda but no CUDA device", allow_module_level=True)
if MODE == "cpu" and not INTERPRETED:
    pytest.skip("the CPU runs these kernels only under TRITON_INTERPRET=1", allow_module_level=True)

# Compiled, Triton's fp32 exp is ex2.approx and LLVM may contract a·b + c into an FMA, so the
# CUDA run gets a little more room than the interpreter (numpy, no FMA).
TOL_STEP = dict(rtol=1e-6, atol=1e-6) if INTERPRETED else dict(rtol=1e-5, atol=1e-5)
TOL_NOISE = dict(rtol=1e-5, atol=1e-5)
TOL_LOSS = dict(rtol=1e-5, atol=1e-7)
TOL_VLB = dict(rtol=1e-5, atol=1e-7)  # bits/dim; atol for KLs near 0 (−1 + e^δ − δ cancels)

SHAPE = (3, 5, 7)  # N = 105, Q = 27: the last quarter is 24 long
N = 105
B = 7
T = 1000
T_MIX = [0, T - 1, 1, 500, 7, 0, T - 1]
PREDICTIONS = ["eps", "x0", "v"]
VARIANCES = ["fixed_small", "fixed_large", "learned_range"]
MODES = {"ddpm": None, "ddim0": 0.0, "ddim0.5": 0.5, "ddim1": 1.0}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _mode(request):
    """In the aot mode only the compile test runs; it runs in no other mode."""
    if (MODE == "aot") != request.node.name.startswith("test_kernels_compile_for_cuda"):
        pytest.skip("runs with FASTDDPM_TRITON_DEVICE=aot only" if MODE != "aot" else "aot mode: compile test only")


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.linear(T)


@pytest.fixture(scope="module")
def coef(schedule):
    return schedule.coefficients("cpu", torch.float32)


@pytest.fixture(scope="module")
def table(coef):
    return coef.table.to(DEVICE)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def dev(*tensors):
    out = tuple(x.to(DEVICE) if x is not None else None for x in tensors)
    return out[0] if len(out) == 1 else out


def close(actual, expected, **tol):
    torch.testing.assert_close(actual.detach().cpu(), expected.detach().cpu(), **tol)


def contract_noise(seed, sample_base, steps, stream, shape):
    """rng.normal sample by sample: sample b at step steps[b] (the reverse step's z uses t[b])."""
    return torch.cat([rng.normal(seed, torch.tensor([sample_base + b]), int(s), stream, shape) for b, s in enumerate(steps)])


# ---- the noise contract -------------------------------------------------------------------

SEEDS = [0, 5, 2**31 + 3, 2**32 + 7, 2**63 + 11, 2**64 - 1]


@pytest.mark.parametrize("seed", SEEDS)
def test_philox_words_bit_for_bit(seed):
    for numel, sample_base, step, stream in [(105, 0, 0, 0), (4, 9, 17, 1), (1, 2**32 - 3, 999, 2), (9, 2**40 + 1, 2**33 + 5, 7)]:
        words = noise_mod.philox_words(3, numel, seed, sample_base, step, stream, device=DEVICE)
        ref = rng.philox_words(seed, torch.arange(3) + sample_base, step, stream, numel)
        assert words.dtype == torch.int64 and words.shape == ref.shape
        assert torch.equal(words.cpu(), ref), (seed, numel, sample_base, step, stream)


def test_philox_known_answer():
    """Random123's philox4x32-10 vector for counter 0 / key 0, through the kernel."""
    words = noise_mod.philox_words(1, 1, 0, device=DEVICE)
    assert words[0, :, 0].tolist() == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@pytest.mark.parametrize("batch,shape", [(1, SHAPE), (7, SHAPE), (2, (1,)), (3, (2, 3)), (1, (4, 64))])
def test_normal_matches_contract(batch, shape):
    for seed, base, step, stream in [(1234, 0, T, rng.STREAM_PRIOR), (2**64 - 1, 2**32 - 2, 3, rng.STREAM_TRAIN)]:
        z = noise_mod.normal(batch, shape, seed, base, step, stream, device=DEVICE)
        assert z.shape == (batch, *shape) and z.dtype == torch.float32
        close(z, rng.normal(seed, torch.arange(batch) + base, step, stream, shape), **TOL_NOISE)


def test_normal_reads_its_coordinates_from_a_key_tensor():
    for seed, base, step, stream in [(1234, 5, T, 0), (2**62 + 1, 2**32 + 3, 2**33 + 7, 2)]:
        key = torch.tensor([seed, base, step], dtype=torch.int64, device=DEVICE)
        z = noise_mod.normal(3, SHAPE, key=key, stream=stream, device=DEVICE)
        assert torch.equal(z, noise_mod.normal(3, SHAPE, seed, base, step, stream, device=DEVICE))
        close(z, rng.normal(seed, torch.arange(3) + base, step, stream, SHAPE), **TOL_NOISE)


def test_normal_is_batch_invariant():
    batch = noise_mod.normal(7, SHAPE, 99, 10, 4, 1, device=DEVICE)
    for b in (0, 3, 6):
        alone = noise_mod.normal(1, SHAPE, 99, 10 + b, 4, 1, device=DEVICE)
        assert torch.equal(alone[0], batch[b])


def test_normal_block_size_does_not_change_values():
    a = noise_mod.normal(2, 1000, 7, device=DEVICE)
    b = noise_mod.normal(2, 1000, 7, device=DEVICE, block_g=16)
    assert torch.equal(a, b)


# ---- reverse_step ---------------------------------------------------------------------------


def step_inputs(variance, seed=0):
    g = gen(seed)
    x = torch.randn(B, *SHAPE, generator=g)
    channels = 2 * SHAPE[0] if variance == "learned_range" else SHAPE[0]
    model_out = torch.randn(B, channels, *SHAPE[1:], generator=g)
    if variance == "learned_range":
        model_out[:, SHAPE[0]:] = torch.rand(B, SHAPE[0], *SHAPE[1:], generator=g) * 2 - 1
    z = torch.randn(B, *SHAPE, generator=g)
    return x, model_out, torch.tensor(T_MIX), z


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("variance", VARIANCES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_reverse_step_matches_reference(coef, table, prediction, variance, clip, mode):
    x, model_out, t, z = step_inputs(variance)
    opts = dict(prediction=prediction, variance=variance, clip_denoised=clip, eta=MODES[mode])
    for dtype in DTYPES:
        mo = model_out.to(dtype)
        expected = reference.reverse_step(x, mo.float(), t, z, coef, **opts)  # the ABI: float32 arithmetic
        out = reverse_step_mod.reverse_step(*dev(x, mo, t), table, dev(z), **opts)
        assert out.shape == x.shape and out.dtype == torch.float32
        close(out, expected, **TOL_STEP, msg=lambda m: f"{dtype}: {m}")


@pytest.mark.parametrize("case", [("eps", "fixed_small", False, None), ("v", "learned_range", True, None),
                                  ("x0", "fixed_large", True, 0.5), ("eps", "learned_range", False, 1.0)])
def test_reverse_step_draws_the_contract_noise(coef, table, case):
    prediction, variance, clip, eta = case
    opts = dict(prediction=prediction, variance=variance, clip_denoised=clip, eta=eta)
    x, model_out, t, _ = step_inputs(variance, seed=1)
    for seed, base in [(2024, 0), (2**63 + 5, 2**32 - 3)]:
        z = contract_noise(seed, base, T_MIX, rng.STREAM_REVERSE, SHAPE)
        expected = reference.reverse_step(x, model_out, t, z, coef, **opts)
        out = reverse_step_mod.reverse_step(*dev(x, model_out, t), table, None, seed, base, **opts)
        close(out, expected, **TOL_NOISE)
        # the same coordinates read by the kernel from a key tensor (its step is unused)
        key = fastddpm_ops.noise_key(seed, base, 12345, DEVICE)
        assert torch.equal(reverse_step_mod.reverse_step(*dev(x, model_out, t), table, key=key, **opts), out)
        # batch invariance: sample b alone (sample_base + b) gives the same bits as in the batch
        for b in (1, 4):
            alone = reverse_step_mod.reverse_step(*dev(x[b:b + 1], model_out[b:b + 1], t[b:b + 1]), table, None,
                                                  seed, base + b, **opts)
            assert torch.equal(alone[0], out[b])


def test_reverse_step_layouts(coef, table):
    """Strided inputs: a non-contiguous x_t is copied; a channels-last model output is copied;
    a learned-range output with a padded batch stride is used in place."""
    x, model_out, t, z = step_inputs("learned_range", seed=2)
    opts = dict(prediction="eps", variance="learned_range", clip_denoised=True)
    expected = reference.reverse_step(x, model_out, t, z, coef, **opts)
    x_nc = x.transpose(2, 3).contiguous().transpose(2, 3)
    padded = torch.zeros(B, 2 * SHAPE[0] + 1, *SHAPE[1:])
    padded[:, : 2 * SHAPE[0]] = model_out
    for mo in (model_out.to(memory_format=torch.channels_last), padded[:, : 2 * SHAPE[0]]):
        out = reverse_step_mod.reverse_step(dev(x_nc), dev(mo), dev(t), table, dev(z), **opts)
        close(out, expected, **TOL_STEP)
    flat = reverse_step_mod.reverse_step(*dev(x.reshape(B, N), model_out.reshape(B, 2 * N), t), table,
                                         dev(z.reshape(B, N)), **opts)
    close(flat, expected.reshape(B, N), **TOL_STEP)


def test_reverse_step_single_sample_and_tiny_images(coef, table):
    opts = dict(prediction="v", variance="fixed_large", clip_denoised=False)
    g = gen(3)
    for shape in [(1,), (2,), (5,), (3, 2, 2)]:
        x, mo, z = (torch.randn(1, *shape, generator=g) for _ in range(3))
        for t in ([0], [T - 1], [1]):
            t = torch.tensor(t)
            expected = reference.reverse_step(x, mo, t, z, coef, **opts)
            close(reverse_step_mod.reverse_step(*dev(x, mo, t), table, dev(z), **opts), expected, **TOL_STEP)


def test_multi_block_grids(coef, table):
    """Several programs per sample (block_g=8: Q = 27 over 4 programs, the last one ragged)."""
    x, model_out, t, z = step_inputs("learned_range", seed=9)
    opts = dict(prediction="v", variance="learned_range", clip_denoised=True)
    for eta in (None, 0.5):
        expected = reference.reverse_step(x, model_out, t, z, coef, **opts, eta=eta)
        for noise in (dev(z), None):
            small = reverse_step_mod.reverse_step(*dev(x, model_out, t), table, noise, 3, 4, **opts, eta=eta, block_g=8)
            default = reverse_step_mod.reverse_step(*dev(x, model_out, t), table, noise, 3, 4, **opts, eta=eta)
            assert torch.equal(small, default)
        close(reverse_step_mod.reverse_step(*dev(x, model_out, t), table, dev(z), **opts, eta=eta, block_g=8),
              expected, **TOL_STEP)
    x0 = x.clamp(-1, 1)
    close(q_sample_mod.q_sample(*dev(x0, t), table, dev(z), block_g=8), reference.q_sample(x0, t, z, coef), **TOL_STEP)
    p = model_out[:, : SHAPE[0]].clone().requires_grad_()
    w = torch.rand(B, generator=gen(9))
    loss, per_sample = reference.simple_loss(p, x0, z, t, coef, prediction="v", weights=w)
    loss.backward()
    got, grad = eps_loss_mod.eps_loss(*dev(model_out[:, : SHAPE[0]], x0, t), table, dev(w), dev(z), prediction="v",
                                      block_g=8)
    close(got, per_sample, **TOL_LOSS)
    close(grad, p.grad, rtol=1e-5, atol=1e-5 * p.grad.abs().max().item())
    x0, x_t, t, model_out = vlb_inputs(coef, "eps", "learned_range", 0.3, seed=9)
    vopts = dict(prediction="eps", variance="learned_range", clip_denoised=False, levels=256)
    close(vlb_mod.vlb_terms(*dev(model_out, x0, x_t, t), table, **vopts, block_g=8),
          reference.vlb_terms(model_out, x0, x_t, t, coef, **vopts), **TOL_VLB)


# ---- q_sample -------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 7])
def test_q_sample_matches_reference(coef, table, batch):
    g = gen(4)
    x0, eps = torch.randn(batch, *SHAPE, generator=g), torch.randn(batch, *SHAPE, generator=g)
    t = torch.tensor(T_MIX[:batch])
    close(q_sample_mod.q_sample(*dev(x0, t), table, dev(eps)), reference.q_sample(x0, t, eps, coef), **TOL_STEP)
    for seed, base, step in [(7, 0, 0), (2**64 - 1, 2**32 - 1, 123456)]:
        eps = rng.normal(seed, torch.arange(batch) + base, step, rng.STREAM_TRAIN, SHAPE)
        out = q_sample_mod.q_sample(*dev(x0, t), table, None, seed, base, step)
        close(out, reference.q_sample(x0, t, eps, coef), **TOL_NOISE)
        key = fastddpm_ops.noise_key(seed, base, step, DEVICE)
        assert torch.equal(q_sample_mod.q_sample(*dev(x0, t), table, key=key), out)


# ---- eps_loss -------------------------------------------------------------------------------


def loss_inputs(batch, dtype, strided, seed):
    g = gen(seed)
    x0 = torch.rand(batch, *SHAPE, generator=g) * 2 - 1
    out = torch.randn(batch, 2 * SHAPE[0], *SHAPE[1:], generator=g).to(dtype)
    pred = out[:, : SHAPE[0]] if strided else out[:, : SHAPE[0]].contiguous()
    return x0, pred, torch.tensor(T_MIX[:batch]), torch.rand(batch, generator=g) + 0.5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_eps_loss_matches_autograd(coef, table, prediction, dtype):
    cases = itertools.product([7, 1], ["tensor", "contract"], [False, True])
    for i, (batch, noise_mode, weighted) in enumerate(cases):
        x0, pred, t, w = loss_inputs(batch, dtype, strided=i % 2 == 0, seed=10 + i)
        w = w if weighted else None
        if noise_mode == "tensor":
            eps = torch.randn(batch, *SHAPE, generator=gen(20 + i))
            kw = dict(noise=dev(eps))
        else:
            seed, base, step = 2**63 + i, 2**32 - 2, 31337
            eps = rng.normal(seed, torch.arange(batch) + base, step, rng.STREAM_TRAIN, SHAPE)
            kw = dict(seed=seed, sample_base=base, step=step)
        p = pred.float().requires_grad_()
        loss, per_sample = reference.simple_loss(p, x0, eps, t, coef, prediction=prediction, weights=w)
        loss.backward()
        got, grad = eps_loss_mod.eps_loss(*dev(pred, x0, t), table, dev(w) if w is not None else None,
                                          prediction=prediction, **kw)
        msg = f"batch={batch} noise={noise_mode} weighted={weighted}"
        assert got.shape == (batch,) and grad.shape == pred.shape and grad.dtype == torch.float32
        close(got, per_sample, **TOL_LOSS, msg=lambda m: f"{msg}: {m}")
        close(grad, p.grad, rtol=1e-5, atol=1e-5 * p.grad.abs().max().item(), msg=lambda m: f"{msg}: {m}")
        # the regenerate-in-backward variant: grad = 2 (pred − target) c with c = w / (B·N)
        c = (w if w is not None else torch.ones(batch)) / (batch * N)
        grad2 = eps_loss_mod.eps_loss_grad(*dev(pred, x0, t), table, dev(c), prediction=prediction, **kw)
        close(grad2, p.grad, rtol=1e-5, atol=1e-5 * p.grad.abs().max().item(), msg=lambda m: f"{msg}: {m}")
        _, none = eps_loss_mod.eps_loss(*dev(pred, x0, t), table, prediction=prediction, compute_grad=False, **kw)
        assert none is None
        if noise_mode == "contract":  # the coordinates from a key tensor instead (the seed fits int64 after wrap)
            key = torch.tensor([kw["seed"] - 2**64, kw["sample_base"], kw["step"]], dtype=torch.int64, device=DEVICE)
            got_k, grad_k = eps_loss_mod.eps_loss(*dev(pred, x0, t), table, dev(w) if w is not None else None,
                                                  key=key, prediction=prediction)
            assert torch.equal(got_k, got) and torch.equal(grad_k, grad)


def test_eps_loss_regenerates_q_samples_noise(table):
    """x_t from q_sample and the ε eps_loss regenerates share coordinates: predicting that ε is free."""
    g = gen(5)
    x0, t = torch.rand(B, *SHAPE, generator=g) * 2 - 1, torch.tensor(T_MIX)
    seed, base, step = 77, 1000, 5
    eps = noise_mod.normal(B, SHAPE, seed, base, step, rng.STREAM_TRAIN, device=DEVICE)
    per_sample, grad = eps_loss_mod.eps_loss(eps, dev(x0), dev(t), table, seed=seed, sample_base=base, step=step,
                                             prediction="eps")
    # (identical in the interpreter; compiled, two kernels might round Box–Muller differently by an ulp)
    assert per_sample.abs().max().item() < 1e-12 and grad.abs().max().item() < 1e-8
    x_t = q_sample_mod.q_sample(dev(x0), dev(t), table, None, seed, base, step)
    close(x_t, q_sample_mod.q_sample(dev(x0), dev(t), table, eps), rtol=1e-6, atol=1e-6)


# ---- vlb_terms ------------------------------------------------------------------------------


def vlb_inputs(coef, prediction, variance, error, seed):
    g = gen(seed)
    x0 = torch.randint(0, 256, (B, *SHAPE), generator=g).float() / 127.5 - 1
    x0[:, 0, 0, :4] = torch.tensor([-1.0, 1.0, -1.0, 1.0])  # the edge bins
    t = torch.tensor(T_MIX)
    eps = torch.randn(B, *SHAPE, generator=g)
    x_t = reference.q_sample(x0, t, eps, coef)
    target = reference.prediction_target(x0, eps, t, coef, prediction)
    model_out = target + error * torch.randn(B, *SHAPE, generator=g)
    if variance == "learned_range":
        model_out = torch.cat([model_out, torch.rand(B, *SHAPE, generator=g) * 2 - 1], dim=1)
    return x0, x_t, t, model_out


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("variance", VARIANCES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_vlb_terms_match_reference(schedule, coef, table, prediction, variance, clip):
    opts = dict(prediction=prediction, variance=variance, clip_denoised=clip, levels=256)
    coef64 = schedule.coefficients("cpu", torch.float64)
    dtype = DTYPES[(PREDICTIONS.index(prediction) + VARIANCES.index(variance)) % 3]
    # a model close to the truth (x̂_0 off by ~1/3 of the decoder's σ): the float32 reference is accurate
    x0, x_t, t, model_out = vlb_inputs(coef, prediction, variance, {"x0": 0.003}.get(prediction, 0.3), seed=6)
    model_out = model_out.to(dtype)
    out = vlb_mod.vlb_terms(*dev(model_out, x0, x_t, t), table, **opts)
    assert out.shape == (B,) and out.dtype == torch.float32
    close(out, reference.vlb_terms(model_out.float(), x0, x_t, t, coef, **opts), **TOL_VLB)
    # a poor model: decoder bins deep in the tails, where the float32 reference's Φ = (1 + erf)/2 is
    # only 6e-8 absolute, so the decoder terms (t = 0) are held to the float64 reference
    x0, x_t, t, model_out = vlb_inputs(coef, prediction, variance, 0.3 if prediction == "x0" else 3.0, seed=7)
    out = vlb_mod.vlb_terms(*dev(model_out, x0, x_t, t), table, **opts).cpu()
    decoder = t == 0
    expected = reference.vlb_terms(model_out.double(), x0.double(), x_t.double(), t, coef64, **opts)
    close(out[decoder], expected.float()[decoder], **TOL_VLB)
    close(out[~decoder], reference.vlb_terms(model_out, x0, x_t, t, coef, **opts)[~decoder], **TOL_VLB)


def test_vlb_terms_other_levels_and_batch_one(schedule, coef, table):
    for levels in (2, 17):
        x0, x_t, t, model_out = vlb_inputs(coef, "eps", "learned_range", 0.3, seed=8)
        x0 = torch.round((x0 + 1) / 2 * (levels - 1)) / (levels - 1) * 2 - 1
        opts = dict(prediction="eps", variance="learned_range", clip_denoised=True, levels=levels)
        for b in (slice(None), slice(0, 1)):
            out = vlb_mod.vlb_terms(*dev(model_out[b], x0[b], x_t[b], t[b]), table, **opts)
            close(out, reference.vlb_terms(model_out[b], x0[b], x_t[b], t[b], coef, **opts), **TOL_VLB)


_ndtr, _log_ndtr = vlb_mod.ndtr, vlb_mod.log_ndtr  # jit helpers, called from the test kernel


@triton.jit
def _cdf_kernel(x_ptr, ndtr_ptr, log_ndtr_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(ndtr_ptr + offs, _ndtr(x), mask=offs < n)
    tl.store(log_ndtr_ptr + offs, _log_ndtr(x), mask=offs < n)


def test_normal_cdf_helpers_are_accurate():
    """log Φ to 1e-6 relative everywhere (as torch.special.log_ndtr), and Φ itself accurate in
    relative terms down to 1e-30, where the erf form (1 + erf(x/√2))/2 of torch.special.ndtr is
    only 6e-8 absolute: compared through its log, which is what the decoder term uses."""
    x = torch.cat([torch.linspace(-40, 12, 1001), torch.tensor([-1.0, -0.999, 0.0, 1e-4, -1e-4])])
    phi, log_phi = torch.empty_like(x), torch.empty_like(x)
    xd, phi_d, log_phi_d = dev(x, phi, log_phi)
    _cdf_kernel[(triton.cdiv(x.numel(), 256),)](xd, phi_d, log_phi_d, x.numel(), BLOCK=256)
    log_true = torch.special.log_ndtr(x.double())
    close(log_phi_d.double(), log_true, rtol=1e-6, atol=1e-7)
    keep = log_true > math.log(1e-30)
    close(phi_d.double().cpu()[keep].log(), log_true[keep], rtol=1e-6, atol=2e-7)


# ---- the operator adapter (kernels.triton.ops) --------------------------------------------------


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_operator_adapter_matches_the_operators_reference(table, prediction):
    """kernels.triton.ops has the signatures and outputs of fastddpm.ops' reference implementations
    (what `fastddpm.ops._register(..., "cuda")` plugs in)."""
    g = gen(30)
    x0 = torch.rand(B, *SHAPE, generator=g) * 2 - 1
    x_t, t = torch.randn(B, *SHAPE, generator=g), torch.tensor(T_MIX)
    out2 = torch.randn(B, 2 * SHAPE[0], *SHAPE[1:], generator=g)
    out2[:, SHAPE[0]:] = out2[:, SHAPE[0]:].tanh()
    pred = out2[:, : SHAPE[0]]
    noise = torch.randn(B, *SHAPE, generator=g)
    key = fastddpm_ops.noise_key(2024, 2**32 - 2, 77)
    cpu_table = table.cpu()
    for z in (None, noise):
        args = (x0, t, cpu_table, z, key)
        close(triton_ops.q_sample(*dev(*args)), fastddpm_ops._q_sample_ref(*args), **TOL_NOISE)
        args = (pred, x0, t, cpu_table, z, key, prediction)
        got, expected = triton_ops.eps_loss(*dev(*args[:6]), prediction), fastddpm_ops._eps_loss_ref(*args)
        close(got[0], expected[0], **TOL_LOSS)
        close(got[1], expected[1], rtol=1e-5, atol=1e-5 * expected[1].abs().max().item())
        for variance, eta in [("fixed_small", None), ("learned_range", 0.5)]:
            mo = out2 if variance == "learned_range" else pred
            args = (x_t, mo, t, cpu_table, z, key, prediction, variance, True, eta)
            close(triton_ops.reverse_step(*dev(*args[:6]), *args[6:]), fastddpm_ops._reverse_step_ref(*args),
                  **TOL_NOISE)
    args = (out2, x0, x_t, t, cpu_table, prediction, "learned_range", False, 256)
    close(triton_ops.vlb_terms(*dev(*args[:5]), *args[5:]), fastddpm_ops._vlb_terms_ref(*args), **TOL_VLB)


# ---- argument checks --------------------------------------------------------------------------


def test_launchers_reject_bad_arguments(table):
    x, mo, t, z = dev(*step_inputs("fixed_small"))
    opts = dict(prediction="eps", variance="fixed_small", clip_denoised=False)
    bad = [
        ("x_t", dict(x_t=x.double())),
        ("model_out", dict(model_out=mo.to(torch.int32))),
        ("model_out", dict(model_out=mo[:, :2])),
        ("model_out", dict(model_out=mo.to("meta"))),
        ("t", dict(t=t.to(torch.int32))),
        ("t", dict(t=t[:3])),
        ("table", dict(table=table[:, :5].T)),
        ("noise", dict(noise=z[:, :2])),
        ("prediction", dict(prediction="score")),
        ("variance", dict(variance="learned")),
        ("eta", dict(eta=-1.0)),
        ("seed", dict(seed=-1)),
        ("seed", dict(seed=2**64)),
        ("sample_base", dict(sample_base=1.5)),
    ]
    for name, change in bad:
        args = dict(x_t=x, model_out=mo, t=t, table=table, noise=z, **opts)
        args.update(change)
        with pytest.raises(ValueError, match=name):
            reverse_step_mod.reverse_step(**args)
    with pytest.raises(ValueError, match="model_out"):  # learned_range needs 2N values per sample
        reverse_step_mod.reverse_step(x, mo, t, table, z, prediction="eps", variance="learned_range",
                                      clip_denoised=False)
    with pytest.raises(ValueError, match="weights"):
        eps_loss_mod.eps_loss(mo, x, t, table, torch.ones(3, device=DEVICE), prediction="eps")
    with pytest.raises(ValueError, match="pred"):
        eps_loss_mod.eps_loss(mo[:1], x, t, table, prediction="eps")
    with pytest.raises(ValueError, match="c "):
        eps_loss_mod.eps_loss_grad(mo, x, t, table, torch.ones(B, dtype=torch.int64, device=DEVICE), prediction="eps")
    with pytest.raises(ValueError, match="levels"):
        vlb_mod.vlb_terms(mo, x, x, t, table, prediction="eps", variance="fixed_small", clip_denoised=False, levels=1)
    with pytest.raises(ValueError, match="x_t"):
        vlb_mod.vlb_terms(mo, x, x[:2], t, table, prediction="eps", variance="fixed_small", clip_denoised=False,
                          levels=256)
    with pytest.raises(ValueError, match="step"):
        q_sample_mod.q_sample(x, t, table, seed=1, step=None)
    for key in (torch.zeros(3, dtype=torch.int32, device=DEVICE), torch.zeros(4, dtype=torch.int64, device=DEVICE),
                torch.zeros(3, dtype=torch.int64, device="meta"), [1, 2, 3]):
        with pytest.raises(ValueError, match="key"):
            q_sample_mod.q_sample(x, t, table, key=key)


# ---- no recompiles for new seeds, samples or steps ------------------------------------------------


class _Recorder:
    """Stands in for a kernel: records the arguments of its launch instead of running it."""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.args, self.kwargs = args, kwargs

        return launch


def _specializations(monkeypatch, module, name, launches):
    """The specialization (the compile-cache key) of each launch, computed by Triton's own binder."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    kernel = getattr(module, name)
    jit = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn, **kernel.kwargs)
    binder = create_function_from_signature(jit.signature, jit.params, BaseBackend)
    recorder = _Recorder()
    keys = set()
    with monkeypatch.context() as patch:
        patch.setattr(module, name, recorder)
        for launch in launches:
            launch()
            keys.add(str(binder(*recorder.args, **recorder.kwargs)[1]))
    return keys


COORDS = list(itertools.product([0, 1, 16, 2**31 + 1, 2**40, 2**63 + 16, 2**64 - 1], [0, 1, 16, 2**31, 2**32 - 1],
                                [0, 1, 16, 999, 2**32 + 1]))


def test_seeds_samples_and_steps_do_not_recompile(monkeypatch, table):
    x, mo, t, _ = dev(*step_inputs("fixed_small"))
    opts = dict(prediction="eps", variance="fixed_small", clip_denoised=False)
    for eta in (None, 0.0, 0.5, 1.0):
        keys = _specializations(monkeypatch, reverse_step_mod, "_reverse_step_kernel", [
            lambda s=s, b=b, eta=eta: reverse_step_mod.reverse_step(x, mo, t, table, None, s, b, **opts, eta=eta)
            for s, b, _step in COORDS])
        assert len(keys) == 1, keys
    keys = _specializations(monkeypatch, reverse_step_mod, "_reverse_step_kernel", [
        lambda e=e: reverse_step_mod.reverse_step(x, mo, t, table, None, 5, **opts, eta=e) for e in (0.0, 0.5, 1.0, 2)])
    assert len(keys) == 1, keys
    keys = _specializations(monkeypatch, q_sample_mod, "_q_sample_kernel", [
        lambda c=c: q_sample_mod.q_sample(x, t, table, None, *c) for c in COORDS])
    assert len(keys) == 1, keys
    keys = _specializations(monkeypatch, eps_loss_mod, "_eps_loss_kernel", [
        lambda c=c: eps_loss_mod.eps_loss(mo, x, t, table, None, None, *c, prediction="v") for c in COORDS])
    assert len(keys) == 1, keys
    keys = _specializations(monkeypatch, reverse_step_mod, "_reverse_step_kernel", [
        lambda s=s, b=b: reverse_step_mod.reverse_step(
            x, mo, t, table, key=torch.tensor([s, b, 0], dtype=torch.int64, device=DEVICE), **opts)
        for s, b in [(0, 0), (1, 16), (2**40, 2**32 - 1)]])
    assert len(keys) == 1, keys
    keys = _specializations(monkeypatch, noise_mod, "_normal_kernel", [
        lambda c=c: noise_mod.normal(B, SHAPE, *c, stream=c[2] % 3, device=DEVICE) for c in COORDS])
    assert len(keys) == 1, keys


@pytest.mark.skipif(INTERPRETED, reason="the interpreter has no compile cache")
def test_compiled_cache_does_not_grow_with_new_seeds(table):
    x, mo, t, _ = dev(*step_inputs("fixed_small"))
    opts = dict(prediction="eps", variance="fixed_small", clip_denoised=False)
    reverse_step_mod.reverse_step(x, mo, t, table, None, 0, 0, **opts)
    kernel = reverse_step_mod._reverse_step_kernel
    device = torch.cuda.current_device()
    before = len(kernel.device_caches[device][0])
    for seed, base, _ in COORDS[::7]:
        reverse_step_mod.reverse_step(x, mo, t, table, None, seed, base, **opts)
    assert len(kernel.device_caches[device][0]) == before


# ---- ahead-of-time compile for CUDA (FASTDDPM_TRITON_DEVICE=aot) ---------------------------------


def _launch_variants(table):
    """(module, kernel name, launch) for every constexpr variant of every kernel, at three sizes."""
    for batch, numel in [(4, 3072), (7, 105), (1, 1)]:
        x, t = torch.randn(batch, numel), torch.randint(0, T, (batch,))
        mo1, mo2, ones = torch.randn(batch, numel), torch.randn(batch, 2 * numel), torch.ones(batch)
        yield noise_mod, "_normal_kernel", lambda: noise_mod.normal(batch, numel, 5, device=DEVICE)
        yield noise_mod, "_words_kernel", lambda: noise_mod.philox_words(batch, numel, 5, device=DEVICE)
        for p, v, c, eta, z in itertools.product(PREDICTIONS, VARIANCES, [False, True], [None, 0.5], [x, None]):
            mo = mo2 if v == "learned_range" else mo1
            yield reverse_step_mod, "_reverse_step_kernel", lambda p=p, v=v, c=c, eta=eta, z=z, mo=mo: (
                reverse_step_mod.reverse_step(x, mo, t, table, z, 3, 4, prediction=p, variance=v, clip_denoised=c,
                                              eta=eta))
        key = torch.tensor([1, 2, 3], dtype=torch.int64, device=DEVICE)
        yield noise_mod, "_normal_kernel", lambda: noise_mod.normal(batch, numel, key=key, device=DEVICE)
        for p, v, eta in [("eps", "fixed_small", None), ("v", "learned_range", 0.5)]:
            mo = mo2 if v == "learned_range" else mo1
            yield reverse_step_mod, "_reverse_step_kernel", lambda p=p, v=v, eta=eta, mo=mo: (
                reverse_step_mod.reverse_step(x, mo, t, table, key=key, prediction=p, variance=v, clip_denoised=True,
                                              eta=eta))
        yield q_sample_mod, "_q_sample_kernel", lambda: q_sample_mod.q_sample(x, t, table, key=key)
        yield eps_loss_mod, "_eps_loss_kernel", lambda: eps_loss_mod.eps_loss(mo1, x, t, table, key=key, prediction="v")
        for z in (x, None):
            yield q_sample_mod, "_q_sample_kernel", lambda z=z: q_sample_mod.q_sample(x, t, table, z, 1, 2, 3)
        for p, z, w in itertools.product(PREDICTIONS, (x, None), (ones, None)):
            yield eps_loss_mod, "_eps_loss_kernel", lambda p=p, z=z, w=w: eps_loss_mod.eps_loss(
                mo2[:, :numel], x, t, table, w, z, 1, 2, 3, prediction=p)
            yield eps_loss_mod, "_eps_loss_kernel", lambda p=p, z=z: eps_loss_mod.eps_loss_grad(
                mo1, x, t, table, ones, z, prediction=p)
        for p, v, c in itertools.product(PREDICTIONS, VARIANCES, [False, True]):
            mo = mo2 if v == "learned_range" else mo1
            yield vlb_mod, "_vlb_kernel", lambda p=p, v=v, c=c, mo=mo: vlb_mod.vlb_terms(
                mo, x, x, t, table, prediction=p, variance=v, clip_denoised=c, levels=256)


def test_kernels_compile_for_cuda(monkeypatch, table):
    """Each launcher's arguments, specialized as Triton's launcher does, compiled to a sm_90 cubin."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", 90, 32))
    compiled = {}
    for module, name, launch in _launch_variants(table):
        kernel, recorder = getattr(module, name), _Recorder()
        with monkeypatch.context() as patch:
            patch.setattr(module, name, recorder)
            launch()
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialization, options = binder(*recorder.args, **recorder.kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, options, bound, specialization, options)
        binary = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=backend.target,
                                options=options.__dict__)
        assert binary.asm["cubin"], name
        compiled[name] = compiled.get(name, 0) + 1
    assert compiled == {"_normal_kernel": 6, "_words_kernel": 3, "_reverse_step_kernel": 222, "_q_sample_kernel": 9,
                        "_eps_loss_kernel": 75, "_vlb_kernel": 54}, compiled
