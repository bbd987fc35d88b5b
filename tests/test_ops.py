"""The torch operators: opcheck, gradients against the reference, torch.compile, the checks at
the operator, and the CUDA paths simulated on the CPU (dispatch, launchers, no host syncs)."""

import subprocess
import sys
import textwrap
from contextlib import contextmanager

import pytest
import torch
from torch._dynamo.utils import counters
from torch._subclasses.fake_tensor import FakeTensorMode

from fastddpm import GaussianDiffusion, NoiseSchedule, UNet, kernels, reference, rng
from fastddpm.kernels import q_sample, reverse_step, simple_loss, triton_common, vlb_terms
from fastddpm.ops import FUSED, REFERENCE, backend_for
from fastddpm.schedule import Coefficients
from fastddpm.solvers import DPMSolverChain

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
    key = rng.noise_key(5, 2, 7)
    z = torch.randn_like(x)
    cases = [
        (FUSED.q_sample, (x.clone().requires_grad_(), t, coef.table, None, key)),
        (FUSED.q_sample, (x, t, coef.table, z.clone().requires_grad_(), None)),
        (FUSED.reverse_step, (x, out, t, coef.table, None, key, "eps", "fixed_small", True, None)),
        (FUSED.reverse_step, (x, out2, t, coef.table, z, None, "v", "learned_range", False, 0.5)),
        (FUSED.reverse_step, (x, out.to(memory_format=torch.channels_last), t, coef.table, None, key, "x0",
                              "fixed_large", True, None)),
        (FUSED.simple_loss, (out.clone().requires_grad_(), x, t, coef.table, None, key, "eps")),
        (FUSED.simple_loss, (out.clone().requires_grad_(), x, t, coef.table, z, None, "v")),
        (FUSED.simple_loss, (out.clone().requires_grad_(), x, t, coef.table, None, None, "x0")),
        (FUSED.vlb_terms, (out2.clone().requires_grad_(), x.clamp(-1, 1), x, t, coef.table, "eps", "learned_range",
                           True, 256)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_opcheck_solver_step_writes_x_and_history_in_place():
    chain = DPMSolverChain.build(NoiseSchedule.linear(1000), 6, order=3, stochastic=True)
    x, out, _ = data(6, channels=6)
    step = torch.tensor([0, 2, 5])
    for slots, stochastic, variance in [(0, False, "fixed_small"), (2, True, "learned_range"), (1, True, "fixed_small")]:
        mo = out if variance == "learned_range" else out[:, :3]
        args = (x.clone(), mo, step, chain.timesteps[step], chain.table.float(), torch.randn(slots, *x.shape), None,
                rng.noise_key(1, 2), "eps", variance, True, stochastic)
        torch.library.opcheck(FUSED.solver_step, args)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_simple_loss_gradient_matches_reference_autograd(coef, prediction):
    x0, out, t = data(1, channels=6)
    pred = out[:, :3]  # the mean half of a learned-variance output: batch stride 2N
    weights = torch.tensor([0.5, 1.0, 2.0])
    noise = rng.normal(9, 4 + torch.arange(B), 12, rng.STREAM_TRAIN, SHAPE)

    fused_pred = pred.detach().clone().requires_grad_()
    per_sample, _ = FUSED.simple_loss(fused_pred, x0, t, coef.table, None, rng.noise_key(9, 4, 12), prediction)
    (per_sample * weights).mean().backward()
    ref_pred = pred.detach().clone().requires_grad_()
    ref_loss, ref_per_sample = reference.simple_loss(ref_pred, x0, noise, t, coef, prediction=prediction, weights=weights)
    ref_loss.backward()
    torch.testing.assert_close(per_sample, ref_per_sample, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused_pred.grad, ref_pred.grad, rtol=1e-6, atol=1e-8)


def test_simple_loss_gradient_in_bfloat16(coef):
    x0, out, t = data(2)
    pred = out.bfloat16().requires_grad_()
    per_sample, _ = FUSED.simple_loss(pred, x0, t, coef.table, None, rng.noise_key(1), "eps")
    per_sample.sum().backward()
    assert pred.grad.dtype == torch.bfloat16
    noise = rng.normal(1, torch.arange(B), 0, rng.STREAM_TRAIN, SHAPE)
    expected = 2 * (pred.detach().float() - noise) / x0[0].numel()
    torch.testing.assert_close(pred.grad.float(), expected, rtol=1e-2, atol=1e-4)


def test_q_sample_and_vlb_gradients(coef):
    x0, out, t = data(3, channels=6)
    x = x0.clone().requires_grad_()
    FUSED.q_sample(x, t, coef.table, None, rng.noise_key(3)).sum().backward()
    torch.testing.assert_close(x.grad, coef.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1).expand_as(x0))
    x0 = x0.clamp(-1, 1)
    args = ("eps", "learned_range", False, 256)
    fused = out.clone().requires_grad_()
    FUSED.vlb_terms(fused, x0, x0 * 0.9, t, coef.table, *args).sum().backward()
    ref = out.clone().requires_grad_()
    reference.vlb_terms(ref, x0, x0 * 0.9, t, coef, prediction="eps", variance="learned_range", clip_denoised=False,
                        levels=256).sum().backward()
    torch.testing.assert_close(fused.grad, ref.grad)


def test_float64_runs_the_reference_without_reading_the_key_on_the_host(coef, monkeypatch):
    """float64 data falls back to the reference inside the operator; its contract noise is computed
    from the key where the key lives (on a GPU: no sync, and legal under graph capture)."""
    monkeypatch.setattr(rng, "unpack_key", lambda key: pytest.fail("the key was read on the host"))
    x, out, t = data(4)
    x, out = x.double(), out.double()
    table = NoiseSchedule.linear(1000).coefficients("cpu", torch.float64).table
    key = rng.noise_key(2**64 - 9, 5, 77)
    z = rng.normal(2**64 - 9, 5 + torch.arange(B), t, rng.STREAM_REVERSE, SHAPE).double()
    expected = reference.reverse_step(x, out, t, z, Coefficients.from_table(table), prediction="eps",
                                      variance="fixed_small", clip_denoised=True)
    got = FUSED.reverse_step(x, out, t, table, None, key, "eps", "fixed_small", True, None)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def training_loss(model, coef):
    """A training step's forward on the operators: q_sample, the model, simple_loss, the mean."""

    def loss_fn(x0, t, key):
        x_t = FUSED.q_sample(x0, t, coef.table, None, key)
        return FUSED.simple_loss(model(x_t, t), x0, t, coef.table, None, key, "eps")[0].mean()

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
        key = rng.noise_key(100 + i, 0, i)
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

    x0, t, key = torch.rand(2, 3, 16, 16) * 2 - 1, torch.tensor([3, 90]), rng.noise_key(1)
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
    key = rng.noise_key(seed, 3, 9)
    assert rng.unpack_key(key) == (seed, 3, 9)
    x0, _, t = data()
    eps = rng.normal(seed, 3 + torch.arange(B), 9, rng.STREAM_TRAIN, SHAPE)
    expected = reference.q_sample(x0, t, eps, coef)
    torch.testing.assert_close(FUSED.q_sample(x0, t, coef.table, None, key), expected, rtol=0, atol=1e-5)
    assert torch.equal(REFERENCE.q_sample(x0, t, coef.table, None, key), expected)


@pytest.mark.parametrize("args, match", [((-1,), "seed must be"), ((2**64,), "seed must be"), ((1.0,), "seed must be"),
                                          ((0, -1), "sample_base must be"), ((0, 0, 2**63), "step must be")])
def test_a_bad_key_names_the_coordinate(args, match):
    with pytest.raises(ValueError, match=match):
        rng.noise_key(*args)


def test_a_key_off_the_cpu_is_made_without_a_copy_from_the_host():
    """Off the CPU, noise_key fills its three values in place (a copy from host memory would wait)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Calls() as calls:
        key = rng.noise_key(2**64 - 1, 5, 7, "meta")
    assert key.device.type == "meta" and key.dtype == torch.int64 and key.shape == (3,)
    assert not {"_to_copy", "copy_", "lift_fresh", "_local_scalar_dense"} & set(calls.ops), calls.ops


def test_bad_inputs_give_one_line_naming_the_argument(coef):
    x, out, t = data()
    key = rng.noise_key(0)
    table = coef.table
    cases = [
        (lambda: FUSED.q_sample(x, t, table, torch.zeros(B, 3, 5, 6), None),
         r"fastddpm.q_sample: noise must be float32 \(3, 3, 5, 7\) on cpu like x0, got float32 \(3, 3, 5, 6\)"),
        (lambda: FUSED.q_sample(x, t, table, torch.zeros(B, *SHAPE, device="meta"), None), "noise must be .* got .* meta"),
        (lambda: FUSED.q_sample(x.long(), t, table, None, key), "x0 must be a float32 or float64 tensor"),
        (lambda: FUSED.q_sample(x, torch.tensor([0, 1, 1000]), table, None, key), r"t out of range.*\[0, 999\]"),
        (lambda: FUSED.q_sample(x.double(), torch.tensor([0, -1, 5]), table.double(), None, key), r"t out of range"),
        (lambda: FUSED.q_sample(x, t.int(), table, None, key), r"t must be int64 \(3,\)"),
        (lambda: FUSED.q_sample(x, t, table, None, torch.tensor([1, 2])), r"key must be an int64 tensor \[seed"),
        (lambda: FUSED.q_sample(x, t, table, None, None), "give noise, or a key"),
        (lambda: FUSED.reverse_step(x, out[:, :2], t, table, None, key, "eps", "fixed_small", True, None),
         r"model_out must be float32 or float16 or bfloat16 \(3, 3, 5, 7\)"),
        (lambda: FUSED.reverse_step(x, out, t, table, None, key, "eps", "learned_range", True, None),
         r"\(3, 6, 5, 7\) on cpu \(learned_range: twice the channels\)"),
        (lambda: FUSED.reverse_step(x, out, t, table, None, key, "score", "fixed_small", True, None),
         "unknown prediction 'score'; expected one of: eps, x0, v"),
        (lambda: FUSED.reverse_step(x, out, t, table, None, key, "eps", "fixed_small", True, 1.5),
         r"eta must lie in \[0, 1\]"),
        (lambda: FUSED.simple_loss(out.int(), x, t, table, None, key, "eps"), "pred must be float32"),
        (lambda: FUSED.vlb_terms(out, x, x, t, table, "eps", "fixed_small", True, 1), "levels must be an integer >= 2"),
        # the tables that crashed the process or read garbage
        (lambda: FUSED.reverse_step(x, out, torch.tensor([0, 1, 999]), torch.full((1, 30_000_000), 0.5), None, key,
                                    "eps", "fixed_small", True, None), r"table must be a Coefficients.table"),
        (lambda: FUSED.reverse_step(x, out, t, table[:1], None, key, "eps", "fixed_small", True, None),
         r"table must be a Coefficients.table, float32 \[13, T\] on cpu, got float32 \(1, 1000\)"),
        (lambda: FUSED.reverse_step(x, out, t, table.double(), None, key, "eps", "fixed_small", True, None),
         r"table must be .* float32 .* got float64"),
        (lambda: FUSED.vlb_terms(out, x, x, t, table.T, "eps", "fixed_small", True, 256), "table must be"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match) as raised:
            call()
        assert "\n" not in str(raised.value)


@pytest.mark.parametrize("name", ["q_sample", "reverse_step", "simple_loss", "vlb_terms"])
def test_the_reference_backend_runs_the_same_checks(coef, name):
    x, out, t = data()
    bad_table = coef.table[:1]
    args = {
        "q_sample": (x, t, bad_table, None, rng.noise_key(0)),
        "reverse_step": (x, out, t, bad_table, None, rng.noise_key(0), "eps", "fixed_small", True, None),
        "simple_loss": (out, x, t, bad_table, None, rng.noise_key(0), "eps"),
        "vlb_terms": (out, x, x, t, bad_table, "eps", "fixed_small", True, 256),
    }[name]
    for backend in (FUSED, REFERENCE, backend_for("auto", torch.float64)):
        with pytest.raises(ValueError, match=f"fastddpm.{name}: table must be"):
            getattr(backend, name)(*args)


def test_a_single_samples_batch_stride_is_never_read(coef):
    """A batch of one may carry any stride for its batch dimension (here 0, as an expand gives)."""
    x, out, _ = data(5)
    t, key = torch.tensor([7]), rng.noise_key(1)
    one = out[:1].as_strided(out[:1].shape, (0, *out.stride()[1:]))
    for backend in (FUSED, REFERENCE):
        got = backend.reverse_step(x[:1], one, t, coef.table, None, key, "eps", "fixed_small", True, None)
        torch.testing.assert_close(got, REFERENCE.reverse_step(x[:1], out[:1], t, coef.table, None, key, "eps",
                                                               "fixed_small", True, None), rtol=0, atol=1e-5)
        per_sample, _ = backend.simple_loss(one, x[:1], t, coef.table, None, key, "v")
        torch.testing.assert_close(per_sample, REFERENCE.simple_loss(out[:1], x[:1], t, coef.table, None, key, "v")[0])


def test_coefficients_from_table_views_the_same_rows(coef):
    again = Coefficients.from_table(coef.table)
    assert again.posterior_mean_coef1.data_ptr() == coef.posterior_mean_coef1.data_ptr()


# ---- the CUDA paths, simulated on the CPU ------------------------------------------------------


def run_script(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    return result.stdout


def test_on_a_cuda_machine_cpu_tensors_reach_the_cpu_kernels_compiled_or_not():
    """Imported as on a CUDA machine (CUDA reported available, Triton importable), an op compiled on
    CPU tensors runs the native kernel: the op is one opaque node, dispatched by device at run time.
    (It was a triton_op, whose Python body replaced it under compile and launched Triton on them.)"""
    out = run_script("""
        import torch
        available, torch.cuda.is_available = torch.cuda.is_available, lambda: True
        from fastddpm import NoiseSchedule, kernels, reference, rng
        from fastddpm.ops import FUSED
        torch.cuda.is_available = available  # (torch.compile itself would then look for the device)
        assert kernels.HAS_TRITON and torch.ops.fastddpm.q_sample.default.has_kernel_for_dispatch_key("CUDA")
        coef = NoiseSchedule.linear(100).coefficients("cpu")
        x0, t, key = torch.randn(4, 3, 8, 8), torch.tensor([0, 5, 50, 99]), rng.noise_key(3, 0, 2)
        f = lambda x0, t, key: FUSED.q_sample(x0, t, coef.table, None, key) * 2
        got = torch.compile(f, backend="aot_eager", fullgraph=True)(x0, t, key)
        torch.testing.assert_close(got, f(x0, t, key), rtol=0, atol=0)
        eps = rng.normal(3, torch.arange(4), 2, rng.STREAM_TRAIN, (3, 8, 8))
        torch.testing.assert_close(got, 2 * reference.q_sample(x0, t, eps, coef), rtol=0, atol=2e-5)
        torch.library.opcheck(FUSED.q_sample, (x0, t, coef.table, None, key))
        print("ok")
    """)
    assert out.strip() == "ok"


class _Recorder:
    """Stands in for a Triton kernel: records the grid and arguments of its launch."""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.grid, self.args, self.kwargs = grid, args, kwargs

        return launch


@contextmanager
def simulated_cuda_launch(monkeypatch, module, kernel_name):
    """Fake CUDA tensors (no GPU needed), the kernel recorded instead of launched, and the CUDA device
    guard recorded: yields (fake mode, recorder, devices entered)."""
    recorder, entered = _Recorder(), []

    @contextmanager
    def device_guard(device):
        entered.append(torch.device(device))
        yield

    monkeypatch.setattr(module, kernel_name, recorder)
    monkeypatch.setattr(triton_common.torch.cuda, "device", device_guard)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield mode, recorder, entered


def test_the_triton_launchers_guard_the_tensors_device_and_fold_the_batch(monkeypatch):
    """Tensors on cuda:1 launch with cuda:1 current; a batch of 70,000 (over the 65,535 of grid axis 1)
    launches on a 1-D grid."""
    with simulated_cuda_launch(monkeypatch, reverse_step, "_reverse_step_kernel") as (_, recorder, entered):
        x = torch.empty(70_000, 3, 4, 4, device="cuda:1")
        t = torch.zeros(70_000, dtype=torch.int64, device="cuda:1")
        table = torch.empty(13, 1000, device="cuda:1")
        reverse_step.triton_reverse_step(x, x, t, table, None, rng.noise_key(1, device="cuda:1"), "eps", "fixed_small",
                                         True, None)
    assert entered == [torch.device("cuda:1")]
    q, block, _ = triton_common.launch_config(48)
    assert recorder.grid == (70_000 * -(-q // block),)


def test_a_channels_last_model_output_is_read_in_place(monkeypatch):
    with simulated_cuda_launch(monkeypatch, reverse_step, "_reverse_step_kernel") as (_, recorder, _entered):
        x = torch.empty(4, 3, 8, 8, device="cuda")
        out = torch.empty(4, 6, 8, 8, device="cuda").to(memory_format=torch.channels_last)
        t = torch.zeros(4, dtype=torch.int64, device="cuda")
        table = torch.empty(13, 1000, device="cuda")
        reverse_step.triton_reverse_step(x, out, t, table, None, rng.noise_key(1, device="cuda"), "eps",
                                         "learned_range", True, None)
    assert recorder.args[1] is out  # no copy
    assert recorder.kwargs["STRIDED"]
    # batch stride, the unconditional half's offset (B samples on), variance offset (C channels on), HW,
    # channel stride, pixel stride
    assert recorder.args[13:19] == (6 * 64, 4 * 6 * 64, 3, 64, 1, 6)


def test_launch_configs_give_every_thread_its_own_groups():
    """No more warps than BLOCK_G / 32, so no group's Philox and Box–Muller run on two threads
    (the PTX count of this is in tests/triton_parity.py, compiled for sm_90)."""
    for numel in (1, 4, 105, 128, 3 * 32 * 32, 3 * 256 * 256):
        q, block, warps = triton_common.launch_config(numel)
        assert block & (block - 1) == 0 and 32 <= block <= 256 and block >= min(q, 32)
        assert 32 * warps <= block and block // (32 * warps) in (1, 2)


def test_gaussian_diffusion_reads_nothing_on_the_host_on_a_gpu():
    """q_sample, p_sample and training_losses with seeds on fake CUDA tensors: a host read of any
    device value (a sync on a GPU) would raise in fake mode."""
    d = GaussianDiffusion(NoiseSchedule.linear(100))
    respaced = d.respace(10)
    model = lambda x, t: x * 0.5  # noqa: E731
    with FakeTensorMode():
        for diffusion in (d, respaced):  # the tables, as built once per device
            T, cuda = diffusion.num_timesteps, torch.device("cuda:0")
            fake = Coefficients.from_table(torch.empty(13, T, device=cuda), torch.arange(T, device=cuda))
            diffusion.schedule._coefficients[cuda, torch.float32] = fake
        x = torch.empty(4, 3, 8, 8, device="cuda")
        t = torch.zeros(4, dtype=torch.int64, device="cuda")
        assert d.q_sample(x, t, seed=1).device.type == "cuda"
        assert d.p_sample(model, x, t, seed=1, sample_index=4).shape == x.shape
        assert d.p_sample(model, x, t).shape == x.shape
        assert d.training_losses(model, x, t, seed=3, step=5)["loss"].shape == ()
        assert respaced.p_sample(model, x, t, seed=1).shape == x.shape


def test_without_the_native_extension_cpu_ops_fall_back_with_one_warning():
    out = run_script("""
        import sys, warnings
        sys.modules['fastddpm._native'] = None  # as if the extension was never built
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            import torch
            from fastddpm import GaussianDiffusion, NoiseSchedule, kernels
            d = GaussianDiffusion(NoiseSchedule.linear(10))
            x = d.q_sample(torch.zeros(2, 3), torch.tensor([1, 2]), seed=1)
            x = d.q_sample(torch.zeros(2, 3), torch.tensor([1, 2]), seed=1)
        native = [w for w in caught if 'native CPU kernels are not available' in str(w.message)]
        assert kernels.native is None and len(native) == 1, [str(w.message) for w in caught]
        print('ok')
    """)
    assert out.strip() == "ok"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_operators_on_cuda_run_triton_and_match_the_reference():
    assert kernels.HAS_TRITON, "CUDA is available but Triton is not installed"
    coef = NoiseSchedule.linear(1000).coefficients("cuda")
    x, out, t = (a.cuda() for a in data(4, channels=6))
    z = torch.randn_like(x)
    args = ("eps", "learned_range", True, None)
    fused = FUSED.reverse_step(x, out, t, coef.table, z, None, *args)
    torch.testing.assert_close(fused, REFERENCE.reverse_step(x, out, t, coef.table, z, None, *args), rtol=1e-5,
                               atol=1e-5)
    model = UNet.from_preset("ddpm-tiny").cuda()
    loss_fn = training_loss(model, coef)
    x0, t = torch.rand(2, 3, 16, 16, device="cuda") * 2 - 1, torch.tensor([3, 900], device="cuda")
    key = rng.noise_key(1, device="cuda")
    torch.testing.assert_close(torch.compile(loss_fn, fullgraph=True)(x0, t, key), loss_fn(x0, t, key), rtol=1e-4,
                               atol=1e-6)
