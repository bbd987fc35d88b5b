"""Parity of the Triton kernels with `fastddpm.reference` and the noise contract `fastddpm.rng`.

Not collected by the main pytest run (no ``test_`` prefix): `tests/test_triton.py` runs this
file in a subprocess, interpreted on the CPU (``TRITON_INTERPRET=1``, which has to be set
before triton is imported) or compiled on CUDA (``FASTDDPM_TRITON_DEVICE=cuda``). By hand:

    TRITON_INTERPRET=1 python -m pytest -q -p no:cacheprovider tests/triton_parity.py
    FASTDDPM_TRITON_DEVICE=cuda python -m pytest -q -p no:cacheprovider tests/triton_parity.py

With ``FASTDDPM_TRITON_DEVICE=aot`` (no interpreter, no GPU needed) only
`test_kernels_compile_for_cuda` runs: every constexpr variant of every kernel is compiled
for sm_90 through ptxas, which catches what the interpreter accepts but the compiler does not,
and each thread's share of Philox is counted in the PTX.

The launchers are called as the operators call them (``fastddpm.kernels.<op>.triton_<op>``,
the operator's arguments, checked). The reference always runs on the CPU in float32 (and
float64 where float32 is not accurate enough to judge); the kernels get the same inputs on
DEVICE. Sizes are small and odd (3×5×7: Q = 27 with a short last quarter; batch 1 and 7)
because the interpreter is slow; 3×20×20 gives two blocks per sample, the last one ragged.
"""

from __future__ import annotations

import itertools
import math
import os
import re

MODE = os.environ.get("FASTDDPM_TRITON_DEVICE", "cpu")  # "cpu" (interpreted), "cuda" or "aot"
if MODE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
elif MODE == "aot":
    os.environ.pop("TRITON_INTERPRET", None)
DEVICE = "cpu" if MODE == "aot" else MODE  # where the tensors live

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fastddpm import NoiseSchedule, reference, rng  # noqa: E402
from fastddpm.kernels import q_sample, reverse_step, simple_loss, solver_step, triton_common, vlb_terms  # noqa: E402
from fastddpm.solvers import DPMSolverChain  # noqa: E402

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
TWO_BLOCKS = (3, 20, 20)  # N = 1200, Q = 300: blocks of 256 groups, the second ragged
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


def key(seed, sample_base=0, step=0):
    return rng.noise_key(seed, sample_base, step, DEVICE)


def contract_noise(seed, sample_base, steps, stream, shape):
    """rng.normal sample by sample: sample b at step steps[b] (the reverse step's z uses t[b])."""
    return torch.cat([rng.normal(seed, torch.tensor([sample_base + b]), int(s), stream, shape) for b, s in enumerate(steps)])


# ---- the noise contract (the jit helpers every kernel draws with, in test kernels) ----------------


@triton.jit
def _words_kernel(out_ptr, key_ptr, Q, stream, blocks, BLOCK_G: tl.constexpr):
    b, g = triton_common.sample_and_groups(blocks, BLOCK_G)
    r0, r1, r2, r3 = triton_common.philox_words4(tl.load(key_ptr), tl.load(key_ptr + 1) + b, tl.load(key_ptr + 2),
                                                 stream, g)
    row = out_ptr + b.to(tl.int64) * 4 * Q
    tl.store(row + g, r0.to(tl.int32, bitcast=True), mask=g < Q)
    tl.store(row + Q + g, r1.to(tl.int32, bitcast=True), mask=g < Q)
    tl.store(row + 2 * Q + g, r2.to(tl.int32, bitcast=True), mask=g < Q)
    tl.store(row + 3 * Q + g, r3.to(tl.int32, bitcast=True), mask=g < Q)


@triton.jit
def _normal_kernel(out_ptr, key_ptr, N, Q, stream, blocks, BLOCK_G: tl.constexpr):
    b, g = triton_common.sample_and_groups(blocks, BLOCK_G)
    z = triton_common.normals4(tl.load(key_ptr), tl.load(key_ptr + 1) + b, tl.load(key_ptr + 2), stream, g)
    for j in tl.static_range(4):
        e, mask = triton_common.quarter(j, g, N, Q)
        tl.store(out_ptr + b.to(tl.int64) * N + e, z[j], mask=mask)


def philox_words(batch, numel, seed, sample_base=0, step=0, stream=0):
    """The kernels' raw Philox outputs [batch, 4, Q] as uint32 values in int64, like `rng.philox_words`."""
    q, block, warps = triton_common.launch_config(numel)
    grid, blocks = triton_common.grid(batch, q, block)
    out = torch.empty((batch, 4, q), device=DEVICE, dtype=torch.int32)
    _words_kernel[grid](out, key(seed, sample_base, step), q, stream, blocks, BLOCK_G=block, num_warps=warps)
    return out.to(torch.int64) & 0xFFFFFFFF


def normal(batch, shape, seed, sample_base=0, step=0, stream=0):
    numel = math.prod(shape)
    q, block, warps = triton_common.launch_config(numel)
    grid, blocks = triton_common.grid(batch, q, block)
    out = torch.empty((batch, *shape), device=DEVICE)
    _normal_kernel[grid](out, key(seed, sample_base, step), numel, q, stream, blocks, BLOCK_G=block, num_warps=warps)
    return out


SEEDS = [0, 5, 2**31 + 3, 2**32 + 7, 2**63 + 11, 2**64 - 1]


@pytest.mark.parametrize("seed", SEEDS)
def test_philox_words_bit_for_bit(seed):
    for numel, sample_base, step, stream in [(105, 0, 0, 0), (4, 9, 17, 1), (1, 2**32 - 3, 999, 2),
                                             (1200, 2**40 + 1, 2**33 + 5, 7)]:
        words = philox_words(3, numel, seed, sample_base, step, stream)
        expected = rng.philox_words(seed, torch.arange(3) + sample_base, step, stream, numel)
        assert words.dtype == torch.int64 and words.shape == expected.shape
        assert torch.equal(words.cpu(), expected), (seed, numel, sample_base, step, stream)


def test_philox_known_answer():
    """Random123's philox4x32-10 vector for counter 0 / key 0, through a kernel."""
    assert philox_words(1, 1, 0)[0, :, 0].tolist() == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@pytest.mark.parametrize("batch,shape", [(1, SHAPE), (7, SHAPE), (2, (1,)), (3, (2, 3)), (2, TWO_BLOCKS)])
def test_normal_matches_contract(batch, shape):
    for seed, base, step, stream in [(1234, 0, T, rng.STREAM_PRIOR), (2**64 - 1, 2**32 - 2, 3, rng.STREAM_TRAIN)]:
        z = normal(batch, shape, seed, base, step, stream)
        close(z, rng.normal(seed, torch.arange(batch) + base, step, stream, shape), **TOL_NOISE)


def test_normal_is_batch_invariant():
    batch = normal(7, SHAPE, 99, 10, 4, 1)
    for b in (0, 3, 6):
        assert torch.equal(normal(1, SHAPE, 99, 10 + b, 4, 1)[0], batch[b])


# ---- reverse_step ---------------------------------------------------------------------------


def step_inputs(variance, seed=0, shape=SHAPE, batch=B):
    g = gen(seed)
    x = torch.randn(batch, *shape, generator=g)
    channels = 2 * shape[0] if variance == "learned_range" else shape[0]
    model_out = torch.randn(batch, channels, *shape[1:], generator=g)
    if variance == "learned_range":
        model_out[:, shape[0]:] = torch.rand(batch, shape[0], *shape[1:], generator=g) * 2 - 1
    z = torch.randn(batch, *shape, generator=g)
    return x, model_out, torch.tensor(T_MIX[:batch]), z


def triton_step(x, model_out, t, table, z, key_, prediction, variance, clip, eta):
    return reverse_step.triton_reverse_step(*dev(x, model_out, t), table, dev(z), key_, prediction, variance, clip, eta)


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
        out = triton_step(x, mo, t, table, z, None, *opts.values())
        assert out.shape == x.shape and out.dtype == torch.float32
        close(out, expected, **TOL_STEP, msg=lambda m: f"{dtype}: {m}")


@pytest.mark.parametrize("case", [("eps", "fixed_small", False, None), ("v", "learned_range", True, None),
                                  ("x0", "fixed_large", True, 0.5), ("eps", "learned_range", False, 1.0)])
def test_reverse_step_draws_the_contract_noise(coef, table, case):
    x, model_out, t, _ = step_inputs(case[1], seed=1)
    for seed, base in [(2024, 0), (2**63 + 5, 2**32 - 3)]:
        z = contract_noise(seed, base, T_MIX, rng.STREAM_REVERSE, SHAPE)
        expected = reference.reverse_step(x, model_out, t, z, coef, prediction=case[0], variance=case[1],
                                          clip_denoised=case[2], eta=case[3])
        out = triton_step(x, model_out, t, table, None, key(seed, base, 12345), *case)  # the key's step is unused
        close(out, expected, **TOL_NOISE)
        # batch invariance: sample b alone (sample_base + b) gives the same bits as in the batch
        for b in (1, 4):
            alone = triton_step(x[b:b + 1], model_out[b:b + 1], t[b:b + 1], table, None, key(seed, base + b), *case)
            assert torch.equal(alone[0], out[b])


def test_reverse_step_layouts(coef, table):
    """A non-contiguous x_t is copied; a channels-last model output, and a learned-range output with
    a padded batch stride, are read in place."""
    x, model_out, t, z = step_inputs("learned_range", seed=2)
    opts = ("eps", "learned_range", True, None)
    expected = reference.reverse_step(x, model_out, t, z, coef, prediction="eps", variance="learned_range",
                                      clip_denoised=True)
    x_nc = x.transpose(2, 3).contiguous().transpose(2, 3)
    padded = torch.zeros(B, 2 * SHAPE[0] + 1, *SHAPE[1:])
    padded[:, : 2 * SHAPE[0]] = model_out
    for mo in (model_out.to(memory_format=torch.channels_last), padded[:, : 2 * SHAPE[0]]):
        close(triton_step(x_nc, mo, t, table, z, None, *opts), expected, **TOL_STEP)
    flat = triton_step(x.reshape(B, N), model_out.reshape(B, 2 * N), t, table, z.reshape(B, N), None, *opts)
    close(flat, expected.reshape(B, N), **TOL_STEP)


def test_reverse_step_single_sample_and_tiny_images(coef, table):
    g = gen(3)
    for shape in [(1,), (2,), (5,), (3, 2, 2)]:
        x, mo, z = (torch.randn(1, *shape, generator=g) for _ in range(3))
        for t in ([0], [T - 1], [1]):
            t = torch.tensor(t)
            expected = reference.reverse_step(x, mo, t, z, coef, prediction="v", variance="fixed_large",
                                              clip_denoised=False)
            close(triton_step(x, mo, t, table, z, None, "v", "fixed_large", False, None), expected, **TOL_STEP)


def test_a_timestep_outside_the_table_reads_nothing_outside_it(coef, table):
    """The kernels never load past the table: such a sample comes out NaN (the operator's check is
    what reports it; here the launcher is called directly)."""
    x, model_out, _, z = step_inputs("fixed_small", seed=5, batch=3)
    out = triton_step(x, model_out, torch.tensor([5, T, -1]), table, z, None, "eps", "fixed_small", True, None)
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1:]).all()


def test_two_blocks_per_sample(coef, table):
    """Samples over two programs, the second ragged: every op against the reference."""
    x, model_out, t, z = step_inputs("learned_range", seed=9, shape=TWO_BLOCKS, batch=3)
    for eta in (None, 0.5):
        expected = reference.reverse_step(x, model_out, t, z, coef, prediction="v", variance="learned_range",
                                          clip_denoised=True, eta=eta)
        close(triton_step(x, model_out, t, table, z, None, "v", "learned_range", True, eta), expected, **TOL_STEP)
    x0 = x.clamp(-1, 1)
    close(q_sample.triton_q_sample(*dev(x0, t), table, dev(z), None), reference.q_sample(x0, t, z, coef), **TOL_STEP)
    pred = model_out[:, : TWO_BLOCKS[0]]
    per_sample, grad = simple_loss.triton_simple_loss(*dev(pred, x0, t), table, dev(z), None, "v")
    ref, expected_grad = simple_loss.reference_simple_loss(pred, x0, t, table.cpu(), z, None, "v")
    close(per_sample, ref, **TOL_LOSS)
    close(grad, expected_grad, rtol=1e-5, atol=1e-5 * expected_grad.abs().max().item())
    x0, x_t, t, model_out = vlb_inputs(coef, "eps", "learned_range", 0.3, seed=9, shape=TWO_BLOCKS, batch=3)
    args = ("eps", "learned_range", False, 256)
    close(vlb_terms.triton_vlb_terms(*dev(model_out, x0, x_t, t), table, *args),
          reference.vlb_terms(model_out, x0, x_t, t, coef, prediction="eps", variance="learned_range",
                              clip_denoised=False, levels=256), **TOL_VLB)


# ---- solver_step ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chain(schedule):
    return DPMSolverChain.build(schedule, 12, order=3, stochastic=True)


@pytest.mark.parametrize("slots", [0, 1, 2])
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_solver_step_matches_reference(chain, prediction, stochastic, slots):
    """In place, against `reference.solver_step`: dense (float32), learned-range half (float16) and
    channels-last (bfloat16) outputs, given and drawn noise, 0–2 history slots, columns of every order."""
    table = chain.table.float()
    g = gen(40 + slots)
    step = torch.tensor([0, 1, 2, 5, 9, 10, 11])
    t = chain.timesteps[step]
    x, z = torch.randn(B, *SHAPE, generator=g), torch.randn(B, *SHAPE, generator=g)
    history = torch.randn(slots, B, *SHAPE, generator=g)
    out2 = torch.randn(B, 2 * SHAPE[0], *SHAPE[1:], generator=g)
    layouts = {"dense": ("fixed_small", out2[:, : SHAPE[0]].contiguous()), "learned": ("learned_range", out2),
               "channels_last": ("learned_range", out2.to(memory_format=torch.channels_last))}
    noises = ["given", "drawn"] if stochastic else ["given"]
    for ((name, (variance, out)), dtype), noise in itertools.product(zip(layouts.items(), DTYPES), noises):
        z_ = z if noise == "given" else contract_noise(2**63 + 3, 17, t.tolist(), rng.STREAM_REVERSE, SHAPE)
        key_ = key(2**63 + 3, 17) if noise == "drawn" else None
        mo = out.to(dtype)
        x_ref, h_ref = x.clone(), history.clone()
        coefs = dict(zip(("alpha_s", "sigma_s", "cx", "c0", "c1", "c2", "cz"), table[:, step].unbind(0)))
        expected, expected_h = reference.solver_step(x_ref, mo, h_ref, z_ if stochastic else None, coefs,
                                                     prediction=prediction, variance=variance, clip_denoised=True)
        got, got_h = dev(x.clone(), history.clone())
        solver_step.triton_solver_step(got, dev(mo), dev(step), dev(t), dev(table), got_h,
                                       dev(z) if noise == "given" else None, key_, prediction, variance, True,
                                       stochastic)
        tol = TOL_NOISE if noise == "drawn" and stochastic else TOL_STEP
        close(got, expected, **tol, msg=lambda m: f"{name} {dtype} {noise}: {m}")
        close(got_h, expected_h, **TOL_STEP, msg=lambda m: f"{name} {dtype} history: {m}")


# ---- classifier-free guidance: both branches [2B] combined in the step ---------------------------


def guided_output(variance, seed, dtype, layout="dense"):
    """A model output [2B, ...] (conditional rows, then unconditional) in ``dtype`` and ``layout``."""
    _, model_out, _, _ = step_inputs(variance, seed=seed, batch=2 * B)
    out = model_out.to(dtype)
    return out.to(memory_format=torch.channels_last) if layout == "channels_last" else out


@pytest.mark.parametrize("variance", VARIANCES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_guided_reverse_step_matches_reference(coef, table, prediction, variance):
    """ε_u + w (ε_c − ε_u) read in the kernel: DDPM and DDIM, every dtype, dense and channels-last,
    given and drawn noise, against `reference.reverse_step(..., guidance=w)`."""
    x, _, t, z = step_inputs(variance, seed=20)
    for i, (eta, dtype, layout) in enumerate(zip((None, 0.5, None), DTYPES, ("dense", "channels_last", "dense"))):
        mo, w = guided_output(variance, 21 + i, dtype, layout), (0.0, 2.0, 4.5)[i]
        opts = dict(prediction=prediction, variance=variance, clip_denoised=i != 1, eta=eta, guidance=w)
        expected = reference.reverse_step(x, mo.float(), t, z, coef, **opts)
        close(reverse_step.triton_reverse_step(*dev(x, mo, t), table, dev(z), None, *opts.values()), expected,
              **TOL_STEP)
    z = contract_noise(7, 3, T_MIX, rng.STREAM_REVERSE, SHAPE)
    expected = reference.reverse_step(x, mo.float(), t, z, coef, **opts)
    close(reverse_step.triton_reverse_step(*dev(x, mo, t), table, None, key(7, 3), *opts.values()), expected,
          **TOL_NOISE)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_guided_solver_step_matches_reference(chain, prediction):
    table = chain.table.float()
    g = gen(50)
    step = torch.tensor([0, 1, 2, 5, 9, 10, 11])
    t = chain.timesteps[step]
    x, z = torch.randn(B, *SHAPE, generator=g), torch.randn(B, *SHAPE, generator=g)
    for slots, dtype, layout in zip((0, 1, 2), DTYPES, ("dense", "channels_last", "dense")):
        mo, history = guided_output("learned_range", 60 + slots, dtype, layout), torch.randn(slots, B, *SHAPE, generator=g)
        coefs = dict(zip(("alpha_s", "sigma_s", "cx", "c0", "c1", "c2", "cz"), table[:, step].unbind(0)))
        expected, expected_h = reference.solver_step(x.clone(), mo, history.clone(), z, coefs, prediction=prediction,
                                                     variance="learned_range", clip_denoised=True, guidance=2.5)
        got, got_h = dev(x.clone(), history.clone())
        solver_step.triton_solver_step(got, dev(mo), dev(step), dev(t), dev(table), got_h, dev(z), None, prediction,
                                       "learned_range", True, True, 2.5)
        close(got, expected, **TOL_STEP)
        close(got_h, expected_h, **TOL_STEP)


# ---- q_sample -------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 7])
def test_q_sample_matches_reference(coef, table, batch):
    g = gen(4)
    x0, eps = torch.randn(batch, *SHAPE, generator=g), torch.randn(batch, *SHAPE, generator=g)
    t = torch.tensor(T_MIX[:batch])
    close(q_sample.triton_q_sample(*dev(x0, t), table, dev(eps), None), reference.q_sample(x0, t, eps, coef), **TOL_STEP)
    for seed, base, step in [(7, 0, 0), (2**64 - 1, 2**32 - 1, 123456)]:
        eps = rng.normal(seed, torch.arange(batch) + base, step, rng.STREAM_TRAIN, SHAPE)
        out = q_sample.triton_q_sample(*dev(x0, t), table, None, key(seed, base, step))
        close(out, reference.q_sample(x0, t, eps, coef), **TOL_NOISE)


# ---- simple_loss ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_simple_loss_matches_autograd(coef, table, prediction, dtype):
    for i, (batch, noise_mode, layout) in enumerate(itertools.product([7, 1], ["tensor", "contract"],
                                                                      ["half", "dense", "channels_last"])):
        g = gen(10 + i)
        x0 = torch.rand(batch, *SHAPE, generator=g) * 2 - 1
        out = torch.randn(batch, 2 * SHAPE[0], *SHAPE[1:], generator=g).to(dtype)
        pred = {"half": out[:, : SHAPE[0]], "dense": out[:, : SHAPE[0]].contiguous(),
                "channels_last": out.to(memory_format=torch.channels_last)[:, : SHAPE[0]]}[layout]
        t = torch.tensor(T_MIX[:batch])
        if noise_mode == "tensor":
            eps, noise, key_ = torch.randn(batch, *SHAPE, generator=gen(20 + i)), None, None
            noise = eps
        else:
            seed, base, step = 2**63 + i, 2**32 - 2, 31337
            eps, noise, key_ = rng.normal(seed, torch.arange(batch) + base, step, rng.STREAM_TRAIN, SHAPE), None, key(
                seed, base, step)
        p = pred.float().requires_grad_()
        _, expected = reference.simple_loss(p, x0, eps, t, coef, prediction=prediction)
        expected.sum().backward()  # each sample's d MSE_b / d pred
        got, grad = simple_loss.triton_simple_loss(*dev(pred, x0, t), table, dev(noise), key_, prediction)
        msg = f"batch={batch} noise={noise_mode} layout={layout}"
        assert got.shape == (batch,) and grad.shape == x0.shape and grad.dtype == torch.float32
        close(got, expected, **TOL_LOSS, msg=lambda m: f"{msg}: {m}")
        close(grad, p.grad, rtol=1e-5, atol=1e-5 * p.grad.abs().max().item(), msg=lambda m: f"{msg}: {m}")


def test_simple_loss_regenerates_q_samples_noise(table):
    """x_t from q_sample and the ε simple_loss regenerates share coordinates: predicting that ε is free."""
    g = gen(5)
    x0, t = torch.rand(B, *SHAPE, generator=g) * 2 - 1, torch.tensor(T_MIX)
    eps = normal(B, SHAPE, 77, 1000, 5, rng.STREAM_TRAIN)
    per_sample, grad = simple_loss.triton_simple_loss(eps, *dev(x0, t), table, None, key(77, 1000, 5), "eps")
    # (identical in the interpreter; compiled, two kernels might round Box–Muller differently by an ulp)
    assert per_sample.abs().max().item() < 1e-12 and grad.abs().max().item() < 1e-8
    x_t = q_sample.triton_q_sample(*dev(x0, t), table, None, key(77, 1000, 5))
    close(x_t, q_sample.triton_q_sample(*dev(x0, t), table, eps, None), rtol=1e-6, atol=1e-6)


# ---- vlb_terms ------------------------------------------------------------------------------


def vlb_inputs(coef, prediction, variance, error, seed, shape=SHAPE, batch=B):
    g = gen(seed)
    x0 = torch.randint(0, 256, (batch, *shape), generator=g).float() / 127.5 - 1
    x0[:, 0, 0, :4] = torch.tensor([-1.0, 1.0, -1.0, 1.0])  # the edge bins
    t = torch.tensor(T_MIX[:batch])
    eps = torch.randn(batch, *shape, generator=g)
    x_t = reference.q_sample(x0, t, eps, coef)
    target = reference.prediction_target(x0, eps, t, coef, prediction)
    model_out = target + error * torch.randn(batch, *shape, generator=g)
    if variance == "learned_range":
        model_out = torch.cat([model_out, torch.rand(batch, *shape, generator=g) * 2 - 1], dim=1)
    return x0, x_t, t, model_out


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("variance", VARIANCES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_vlb_terms_match_reference(schedule, coef, table, prediction, variance, clip):
    args = (prediction, variance, clip, 256)
    opts = dict(prediction=prediction, variance=variance, clip_denoised=clip, levels=256)
    coef64 = schedule.coefficients("cpu", torch.float64)
    dtype = DTYPES[(PREDICTIONS.index(prediction) + VARIANCES.index(variance)) % 3]
    # a model close to the truth (x̂_0 off by ~1/3 of the decoder's σ): the float32 reference is accurate
    x0, x_t, t, model_out = vlb_inputs(coef, prediction, variance, {"x0": 0.003}.get(prediction, 0.3), seed=6)
    model_out = model_out.to(dtype)
    out = vlb_terms.triton_vlb_terms(*dev(model_out, x0, x_t, t), table, *args)
    assert out.shape == (B,) and out.dtype == torch.float32
    close(out, reference.vlb_terms(model_out.float(), x0, x_t, t, coef, **opts), **TOL_VLB)
    # a poor model: decoder bins deep in the tails, where the float32 reference's Φ = (1 + erf)/2 is
    # only 6e-8 absolute, so the decoder terms (t = 0) are held to the float64 reference
    x0, x_t, t, model_out = vlb_inputs(coef, prediction, variance, 0.3 if prediction == "x0" else 3.0, seed=7)
    out = vlb_terms.triton_vlb_terms(*dev(model_out, x0, x_t, t), table, *args).cpu()
    decoder = t == 0
    expected = reference.vlb_terms(model_out.double(), x0.double(), x_t.double(), t, coef64, **opts)
    close(out[decoder], expected.float()[decoder], **TOL_VLB)
    close(out[~decoder], reference.vlb_terms(model_out, x0, x_t, t, coef, **opts)[~decoder], **TOL_VLB)


def test_vlb_terms_other_levels_and_batch_one(coef, table):
    for levels in (2, 17):
        x0, x_t, t, model_out = vlb_inputs(coef, "eps", "learned_range", 0.3, seed=8)
        x0 = torch.round((x0 + 1) / 2 * (levels - 1)) / (levels - 1) * 2 - 1
        for b in (slice(None), slice(0, 1)):
            out = vlb_terms.triton_vlb_terms(*dev(model_out[b], x0[b], x_t[b], t[b]), table, "eps", "learned_range",
                                             True, levels)
            close(out, reference.vlb_terms(model_out[b], x0[b], x_t[b], t[b], coef, prediction="eps",
                                           variance="learned_range", clip_denoised=True, levels=levels), **TOL_VLB)


_ndtr, _log_ndtr = vlb_terms.ndtr, vlb_terms.log_ndtr  # jit helpers, called from the test kernel


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


# ---- no recompiles for new seeds, samples, steps or η ----------------------------------------------


class _Recorder:
    """Stands in for a kernel: records the grid and arguments of its launch instead of running it."""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.grid, self.args, self.kwargs = grid, args, kwargs

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


def test_seeds_samples_steps_and_eta_do_not_recompile(monkeypatch, table):
    """The coordinates are in the key tensor, η is an unspecialized float."""
    x, mo, t, _ = dev(*step_inputs("fixed_small"))
    coords = itertools.product([0, 2**31 + 1, 2**63 + 16, 2**64 - 1], [0, 16, 2**32 - 1], [0, 999, 2**32 + 1])
    keys = _specializations(monkeypatch, reverse_step, "_reverse_step_kernel", [
        lambda c=c, eta=eta: reverse_step.triton_reverse_step(x, mo, t, table, None, key(*c), "eps", "fixed_small",
                                                              False, eta)
        for c, eta in zip(coords, itertools.cycle([0.0, 0.5, 1.0, 0.25]))])
    assert len(keys) == 1, keys


@pytest.mark.skipif(INTERPRETED, reason="the interpreter has no compile cache")
def test_compiled_cache_does_not_grow_with_new_seeds(table):
    x, mo, t, _ = dev(*step_inputs("fixed_small"))
    reverse_step.triton_reverse_step(x, mo, t, table, None, key(0), "eps", "fixed_small", False, None)
    kernel = reverse_step._reverse_step_kernel
    device = torch.cuda.current_device()
    before = len(kernel.device_caches[device][0])
    for seed in (1, 2**40, 2**64 - 1):
        reverse_step.triton_reverse_step(x, mo, t, table, None, key(seed, seed % 999), "eps", "fixed_small", False, None)
    assert len(kernel.device_caches[device][0]) == before


# ---- ahead-of-time compile for CUDA (FASTDDPM_TRITON_DEVICE=aot) ---------------------------------


def _launch_variants(table):
    """(module, kernel name, launch) for every constexpr variant of every kernel, at three sizes."""
    for batch, shape in [(4, (3, 32, 32)), (7, (105,)), (1, (1,))]:
        numel = math.prod(shape)
        x, t = torch.randn(batch, *shape), torch.randint(0, T, (batch,))
        c = shape[0] if len(shape) > 1 else 1
        mo1 = torch.randn(batch, *shape)
        mo2 = torch.randn(batch, 2 * c, *shape[1:]) if len(shape) > 1 else torch.randn(batch, 2 * numel)
        layouts = [mo1, mo1.to(memory_format=torch.channels_last)] if len(shape) == 3 else [mo1]
        layouts2 = [mo2, mo2.to(memory_format=torch.channels_last)] if len(shape) == 3 else [mo2]
        k = rng.noise_key(1, 2, 3)
        for p, v, clip, eta, z, layout in itertools.product(PREDICTIONS, VARIANCES, [False, True], [None, 0.5], [x, None],
                                                            range(len(layouts))):
            mo = (layouts2 if v == "learned_range" else layouts)[layout]
            yield reverse_step, "_reverse_step_kernel", lambda p=p, v=v, clip=clip, eta=eta, z=z, mo=mo: (
                reverse_step.triton_reverse_step(x, mo, t, table, z, None if z is not None else k, p, v, clip, eta))
        guided1, guided2 = torch.cat([mo1, mo1]), torch.cat([mo2, mo2])
        for p, v, eta in itertools.product(PREDICTIONS, VARIANCES, [None, 0.5]):  # guided: drawn noise, clipped
            mo = guided2 if v == "learned_range" else guided1
            yield reverse_step, "_reverse_step_kernel", lambda p=p, v=v, eta=eta, mo=mo: (
                reverse_step.triton_reverse_step(x, mo, t, table, None, k, p, v, True, eta, 2.0))
        for z in (x, None):
            yield q_sample, "_q_sample_kernel", lambda z=z: q_sample.triton_q_sample(x, t, table, z, k)
        for p, z, layout in itertools.product(PREDICTIONS, (x, None), range(len(layouts2))):
            pred = layouts2[layout][:, :c] if len(shape) > 1 else layouts2[layout][:, :numel]
            yield simple_loss, "_simple_loss_kernel", lambda p=p, z=z, pred=pred: simple_loss.triton_simple_loss(
                pred, x, t, table, z, k, p)
        chain = DPMSolverChain.build(NoiseSchedule.linear(T), 6, order=3)
        step = torch.arange(batch) % 6
        for p, slots, stochastic, z, layout in itertools.product(PREDICTIONS, [0, 1, 2], [False, True], [x, None],
                                                                  range(len(layouts2))):
            history = torch.zeros(slots, *x.shape)
            yield solver_step, "_solver_step_kernel", lambda p=p, s=stochastic, z=z, h=history, mo=layouts2[layout]: (
                solver_step.triton_solver_step(x.clone(), mo, step, chain.timesteps[step], chain.table.float(), h, z,
                                               k, p, "learned_range", True, s))
        for p, slots, stochastic in itertools.product(PREDICTIONS, [0, 1, 2], [False, True]):  # guided, drawn noise
            history = torch.zeros(slots, *x.shape)
            yield solver_step, "_solver_step_kernel", lambda p=p, s=stochastic, h=history: (
                solver_step.triton_solver_step(x.clone(), guided2, step, chain.timesteps[step], chain.table.float(), h,
                                               None, k, p, "learned_range", True, s, 2.0))
        for p, v, clip, layout in itertools.product(PREDICTIONS, VARIANCES, [False, True], range(len(layouts))):
            mo = (layouts2 if v == "learned_range" else layouts)[layout]
            yield vlb_terms, "_vlb_terms_kernel", lambda p=p, v=v, clip=clip, mo=mo: vlb_terms.triton_vlb_terms(
                mo, x, x, t, table, p, v, clip, 256)


PHILOX_PRODUCTS = 20  # mul.hi.u32 per Philox4x32-10 call: two in each of ten rounds


def test_kernels_compile_for_cuda(monkeypatch, table):
    """Each launcher's arguments, specialized as Triton's launcher does, compiled to a sm_90 cubin; and
    no thread draws more noise than its share: Philox's mul.hi.u32 in the PTX (each thread's
    program) are at most 20 per group of its share, BLOCK_G / (32 · num_warps) groups. (The
    [4, BLOCK_G] tile of the first kernels, whose 4 warps sm_90 laid out [2, 2], computed every
    group on two threads: 74 for a share of 2.)"""
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
        share = recorder.kwargs["BLOCK_G"] // (32 * recorder.kwargs["num_warps"])
        products = len(re.findall(r"\bmul\.hi\.u32\b", binary.asm["ptx"]))
        needs_noise = not (name == "_simple_loss_kernel" and recorder.kwargs["PREDICTION"] == 1)  # x0 target
        needs_noise &= recorder.kwargs.get("STOCHASTIC", True)  # the ODE solver draws none
        if not recorder.kwargs.get("HAS_NOISE", True) and needs_noise:
            # (fewer where the compiler shares a lane-invariant product, or fuses one into mul.wide)
            assert PHILOX_PRODUCTS * share // 2 < products <= PHILOX_PRODUCTS * share, (name, share, products)
        compiled[name] = compiled.get(name, 0) + 1
    assert compiled == {"_reverse_step_kernel": 288 + 54, "_q_sample_kernel": 6, "_simple_loss_kernel": 24,
                        "_solver_step_kernel": 144 + 54, "_vlb_terms_kernel": 72}, compiled
