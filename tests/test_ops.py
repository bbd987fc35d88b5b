"""The torch operators: opcheck, gradients against the reference, torch.compile, input errors."""

import pytest
import torch
from torch._dynamo.utils import counters

from fastddpm import NoiseSchedule, UNet, ops, reference, rng
from fastddpm.schedule import Coefficients

B, SHAPE = 3, (3, 5, 7)  # N = 105: odd, not a multiple of any block


@pytest.fixture(scope="module")
def coef():
    return NoiseSchedule.linear(1000).coefficients("cpu", torch.float32)


def data(seed=0, channels=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, *SHAPE, generator=g)
    out = torch.randn(B, channels, *SHAPE[1:], generator=g)
    return x, out, torch.tensor([0, 999, 321])


def test_opcheck_every_op(coef):
    x, out, t = data()
    out2 = torch.cat([out, out.tanh()], 1)
    key = ops.noise_key(5, 2, 7)
    z = torch.randn_like(x)
    cases = [
        (ops.q_sample_op, (x.clone().requires_grad_(), t, coef.table, None, key)),
        (ops.q_sample_op, (x, t, coef.table, z.clone().requires_grad_(), key)),
        (ops.reverse_step_op, (x, out, t, coef.table, None, key, "eps", "fixed_small", True, None)),
        (ops.reverse_step_op, (x, out2, t, coef.table, z, key, "v", "learned_range", False, 0.5)),
        (ops.eps_loss_op, (out.clone().requires_grad_(), x, t, coef.table, None, key, "eps")),
        (ops.eps_loss_op, (out.clone().requires_grad_(), x, t, coef.table, z, key, "v")),
        (ops.vlb_terms_op, (out2.clone().requires_grad_(), x.clamp(-1, 1), x, t, coef.table, "eps", "learned_range", True, 256)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_eps_loss_gradient_matches_reference_autograd(coef, prediction):
    x0, out, t = data(1, channels=6)
    pred = out[:, :3]  # the mean half of a learned-variance output: batch stride 2N
    weights = torch.tensor([0.5, 1.0, 2.0])
    noise = rng.normal(9, 4 + torch.arange(B), 12, rng.STREAM_TRAIN, SHAPE)

    fused_pred = pred.detach().clone().requires_grad_()
    loss, per_sample = ops.FusedOps.simple_loss(fused_pred, x0, t, coef, key=ops.noise_key(9, 4, 12),
                                                prediction=prediction, weights=weights)
    loss.backward()
    ref_pred = pred.detach().clone().requires_grad_()
    ref_loss, ref_per_sample = reference.simple_loss(ref_pred, x0, noise, t, coef, prediction=prediction, weights=weights)
    ref_loss.backward()
    torch.testing.assert_close(per_sample, ref_per_sample, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused_pred.grad, ref_pred.grad, rtol=1e-6, atol=1e-8)


def test_eps_loss_gradient_in_bfloat16(coef):
    x0, out, t = data(2)
    pred = out.bfloat16().requires_grad_()
    per_sample, _ = ops.eps_loss_op(pred, x0, t, coef.table, None, ops.noise_key(1), "eps")
    per_sample.sum().backward()
    assert pred.grad.dtype == torch.bfloat16
    noise = rng.normal(1, torch.arange(B), 0, rng.STREAM_TRAIN, SHAPE)
    expected = 2 * (pred.detach().float() - noise) / x0[0].numel()
    torch.testing.assert_close(pred.grad.float(), expected, rtol=1e-2, atol=1e-4)


def test_q_sample_and_vlb_gradients(coef):
    x0, out, t = data(3, channels=6)
    x = x0.clone().requires_grad_()
    ops.q_sample_op(x, t, coef.table, None, ops.noise_key(3)).sum().backward()
    torch.testing.assert_close(x.grad, coef.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1).expand_as(x0))
    x0 = x0.clamp(-1, 1)
    options = dict(prediction="eps", variance="learned_range", clip_denoised=False, levels=256)
    fused = out.clone().requires_grad_()
    ops.FusedOps.vlb_terms(fused, x0, x0 * 0.9, t, coef, **options).sum().backward()
    ref = out.clone().requires_grad_()
    reference.vlb_terms(ref, x0, x0 * 0.9, t, coef, **options).sum().backward()
    torch.testing.assert_close(fused.grad, ref.grad)


def training_loss(model, coef):
    """A training step's forward on the operators: q_sample, the model, eps_loss, the mean."""

    def loss_fn(x0, t, key):
        x_t = ops.q_sample_op(x0, t, coef.table, None, key)
        return ops.eps_loss_op(model(x_t, t), x0, t, coef.table, None, key, "eps")[0].mean()

    return loss_fn


def test_a_whole_training_step_compiles_without_graph_breaks():
    torch.manual_seed(0)
    model = UNet.from_preset("ddpm-tiny")
    coef = NoiseSchedule.linear(100).coefficients("cpu")

    loss_fn = training_loss(model, coef)

    counters.clear()
    # AOTAutograd traces the backward of the compiled forward into one joint graph
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    x0 = torch.rand(2, 3, 16, 16) * 2 - 1
    t = torch.tensor([3, 90])
    for i in range(3):  # a new seed and step every call: the key is data, so no recompiles
        key = ops.noise_key(100 + i, 0, i)
        model.zero_grad()
        loss = compiled(x0, t, key)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        expected = loss_fn(x0, t, key)
        expected.backward()
        torch.testing.assert_close(loss, expected)
        for a, p in zip(grads, model.parameters()):
            torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.slow
def test_training_step_compiles_with_inductor():
    torch.manual_seed(0)
    model = UNet.from_preset("ddpm-tiny")
    coef = NoiseSchedule.linear(100).coefficients("cpu")

    loss_fn = training_loss(model, coef)

    x0, t, key = torch.rand(2, 3, 16, 16) * 2 - 1, torch.tensor([3, 90]), ops.noise_key(1)
    loss = torch.compile(loss_fn, fullgraph=True)(x0, t, key)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected = loss_fn(x0, t, key)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    for a, p in zip(grads, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("seed", [2**63, 2**64 - 1])
def test_a_64_bit_seed_survives_the_int64_key(coef, seed):
    """Seeds of 2**63 and more are stored as negative int64 in the key; every backend reads the seed back."""
    key = ops.noise_key(seed, 3, 9)
    assert rng.unpack_key(key) == (seed, 3, 9)
    x0, _, t = data()
    eps = rng.normal(seed, 3 + torch.arange(B), 9, rng.STREAM_TRAIN, SHAPE)
    expected = reference.q_sample(x0, t, eps, coef)
    torch.testing.assert_close(ops.q_sample_op(x0, t, coef.table, None, key), expected, rtol=0, atol=1e-5)
    assert torch.equal(ops.ReferenceOps.q_sample(x0, t, coef, None, key), expected)


@pytest.mark.parametrize("args, match", [((-1,), "seed must be"), ((2**64,), "seed must be"), ((1.0,), "seed must be"),
                                          ((0, -1), "sample_base must be"), ((0, 0, 2**63), "step must be")])
def test_a_bad_key_names_the_coordinate(args, match):
    with pytest.raises(ValueError, match=match):
        ops.noise_key(*args)


def test_bad_inputs_name_the_argument(coef):
    x, out, t = data()
    key = ops.noise_key(0)
    cases = [
        (lambda: ops.q_sample_op(x, t, coef.table, torch.zeros(B, 3, 5, 6), key), r"noise has shape \(3, 3, 5, 6\)"),
        (lambda: ops.q_sample_op(x, t, coef.table, torch.zeros(B, *SHAPE, device="meta"), key), "noise is on meta"),
        (lambda: ops.q_sample_op(x.long(), t, coef.table, None, key), "x0 must be a float32"),
        (lambda: ops.q_sample_op(x, torch.tensor([0, 1, 1000]), coef.table, None, key), r"t out of range.*\[0, 999\]"),
        (lambda: ops.q_sample_op(x, t.int(), coef.table, None, key), "t must be an int64 tensor"),
        (lambda: ops.q_sample_op(x, t, coef.table, None, torch.tensor([1, 2])), r"key must be an int64 tensor \[seed"),
        (lambda: ops.reverse_step_op(x, out[:, :2], t, coef.table, None, key, "eps", "fixed_small", True, None),
         r"model output has shape \(3, 2, 5, 7\), expected \(3, 3, 5, 7\)"),
        (lambda: ops.reverse_step_op(x, out, t, coef.table, None, key, "eps", "learned_range", True, None),
         r"expected \(3, 6, 5, 7\)"),
        (lambda: ops.eps_loss_op(out.int(), x, t, coef.table, None, key, "eps"), "model output must be float32"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


def test_coefficients_from_table_views_the_same_rows(coef):
    again = Coefficients.from_table(coef.table)
    assert again.posterior_mean_coef1.data_ptr() == coef.posterior_mean_coef1.data_ptr()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_operators_on_cuda_run_triton_and_match_the_reference():
    assert ops.triton_kernels is not None, "CUDA is available but the Triton kernels did not load"
    coef = NoiseSchedule.linear(1000).coefficients("cuda")
    x, out, t = (a.cuda() for a in data(4, channels=6))
    z = torch.randn_like(x)
    options = dict(prediction="eps", variance="learned_range", clip_denoised=True)
    fused = ops.FusedOps.reverse_step(x, out, t, coef, noise=z, **options)
    torch.testing.assert_close(fused, reference.reverse_step(x, out, t, z, coef, **options), rtol=1e-5, atol=1e-5)
    model = UNet.from_preset("ddpm-tiny").cuda()

    loss_fn = training_loss(model, coef)

    x0, t, key = torch.rand(2, 3, 16, 16, device="cuda") * 2 - 1, torch.tensor([3, 900], device="cuda"), ops.noise_key(1, device="cuda")
    torch.testing.assert_close(torch.compile(loss_fn, fullgraph=True)(x0, t, key), loss_fn(x0, t, key), rtol=1e-4, atol=1e-6)


def test_without_the_native_extension_cpu_ops_fall_back_with_one_warning():
    import subprocess
    import sys

    script = (
        "import sys, warnings\n"
        "sys.modules['fastddpm._native'] = None  # as if the extension was never built\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch\n"
        "    from fastddpm import GaussianDiffusion, NoiseSchedule, ops\n"
        "    d = GaussianDiffusion(NoiseSchedule.linear(10))\n"
        "    x = d.q_sample(torch.zeros(2, 3), torch.tensor([1, 2]), seed=1)\n"
        "    x = d.q_sample(torch.zeros(2, 3), torch.tensor([1, 2]), seed=1)\n"
        "native = [w for w in caught if 'native CPU kernels are not available' in str(w.message)]\n"
        "assert ops.native_kernels is None and len(native) == 1, [str(w.message) for w in caught]\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
