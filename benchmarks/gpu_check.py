"""`python -m benchmarks.gpu_check --out DIR [--dry]`: the one command that checks every GPU path.

On a CUDA machine (no network needed; build the native kernels first with
``pip install --no-build-isolation --no-deps -e .``) it runs, in this order, each section on
its own (a failure is recorded and the next one runs), within ``--budget`` seconds:

* ``env``: versions, device, measured copy bandwidth;
* ``tests``: the ``gpu`` tests and the Triton parity suite compiled on CUDA (Philox words bit
  for bit), in parallel processes;
* ``sync_free``: `torch.cuda.set_sync_debug_mode("error")` around each operator and the
  user-facing calls (GaussianDiffusion.q_sample / p_sample / training_losses with seeds);
* ``kernels``: reverse_step, the training loss (q_sample + simple_loss) and vlb_terms at
  256×3×32×32 and 64×3×256×256, in-kernel and given noise, against the eager reference,
  timed in CUDA graphs (`triton.testing.do_bench_cudagraph`: no launch overhead), with % of the
  measured copy bandwidth;
* ``compile``: opcheck of every operator on CUDA, the backward through the fused ops under
  torch.compile against eager, fp16 with a GradScaler, and CPU tensors compiled on this CUDA
  machine (they must reach the CPU kernels);
* ``sampler``: ddpm-cifar10 at batch 256, eager against CUDA graphs and against compile + CUDA
  graphs + bf16, for DDPM (``--steps``) and DPM-Solver++(2M) at 20 steps: the same images to
  tolerance, images/s of each and of the bare U-Net forwards, no sync inside a chain;
* ``train``: compiled bf16 training steps of the digits preset (300), the recompile count, no
  sync inside the steps, then the held-out NLL;
* ``guidance``: a class-conditional ddpm-cifar10 (10 classes) under DPM-Solver++(2M), 20 steps,
  compile + CUDA graphs + bf16: the conditional branch alone (w = 1) against classifier-free
  guidance (w = 3: both branches in each U-Net call of the batch, combined in the fused step),
  images/s of each (guided must reach 0.9× half the unguided rate), the guided CUDA graph (fp32)
  against eager fp32 to 1e-3, and no sync inside the guided graph's replays.

It writes DIR/gpu_check.json (after every section, so a timeout keeps what ran) and the
benchmark rows DIR/results.csv (`harness.Row`); ``--merge DIR`` adds those rows to
benchmarks/results/results.csv. ``--dry`` runs the same sections at toy sizes on the CPU
(no graphs, sync checks or compiles there), as the test suite does: the command is known to
run before a GPU is seen. Exit status 0 when every section passed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from fastddpm import GaussianDiffusion, NoiseSchedule, UNet, kernels, reference, rng
from fastddpm.ops import FUSED, REFERENCE
from fastddpm.solvers import DPMSolverChain

from .harness import RESULTS, Floors, Row, device_name, make_row, read_rows, store, time_call

ROOT = Path(__file__).resolve().parents[1]
NOMINAL_HBM = {"H200": 4.8e12, "H100": 3.35e12}  # bytes/s, the vendors' figures (SXM)


@dataclass(frozen=True)
class Plan:
    """What a run checks at which sizes: the real check on CUDA, toy sizes with --dry on the CPU."""

    device: torch.device
    dry: bool
    kernel_sizes: tuple
    sampler_preset: str
    sampler_batch: int
    sampler_steps: int
    train_steps: int
    train_timesteps: int
    nll_images: int

    @classmethod
    def for_run(cls, dry: bool) -> "Plan":
        if dry:
            return cls(torch.device("cpu"), True, ((4, 3, 8, 8),), "ddpm-tiny", 2, 3, 3, 20, 8)
        return cls(torch.device("cuda"), False, ((256, 3, 32, 32), (64, 3, 256, 256)), "ddpm-cifar10", 256, 50, 300,
                   1000, 297)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


class Report:
    """The JSON report, written after every section."""

    def __init__(self, path: Path, plan: Plan, budget: float):
        self.path, self.plan, self.deadline = path, plan, time.monotonic() + budget
        self.data = {"dry": plan.dry, "sections": {}}
        self.rows: list[Row] = []

    def run(self, name: str, section) -> None:
        if time.monotonic() > self.deadline:
            self.data["sections"][name] = {"ok": False, "skipped": "out of time (--budget)"}
        else:
            print(f"gpu_check: {name} …", file=sys.stderr, flush=True)
            start = time.monotonic()
            try:
                result = {"ok": True, **(section(self.plan, self.rows) or {})}
            except Exception as err:  # a failed section is recorded; the others still run
                result = {"ok": False, "error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                          "traceback": traceback.format_exc()[-4000:]}
            result["seconds"] = round(time.monotonic() - start, 1)
            self.data["sections"][name] = result
        self.data["ok"] = all(s["ok"] for s in self.data["sections"].values())
        self.path.write_text(json.dumps(self.data, indent=2, default=str) + "\n")


def sync(plan: Plan) -> None:
    if plan.cuda:
        torch.cuda.synchronize()


@contextmanager
def no_host_sync(plan: Plan):
    """Any call that waits for the device raises inside (CUDA's sync debug mode); a no-op on the CPU."""
    if not plan.cuda:
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def sync_free(plan: Plan, calls: dict) -> dict:
    """{name: "ok" or the error} for each call, run once to warm up, then under `no_host_sync`."""
    results = {}
    for name, call in calls.items():
        try:
            call()
            sync(plan)
            with no_host_sync(plan):
                call()
            sync(plan)
            results[name] = "ok"
        except Exception as err:
            results[name] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    failed = {k: v for k, v in results.items() if v != "ok"}
    if failed:
        raise AssertionError(f"host syncs in {', '.join(failed)}: {failed}")
    return results


def perturbed(model: torch.nn.Module, scale: float = 0.02, seed: int = 0) -> torch.nn.Module:
    """Every weight moved off its initialisation (zero-initialised output layers would hide everything)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.device))
    return model


# ---- sections ---------------------------------------------------------------------------------


def env(plan: Plan, rows: list) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": device_name(plan.device), "native": kernels.native is not None, "triton": kernels.HAS_TRITON,
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                     cwd=ROOT).stdout.strip() or "-"}
    if kernels.HAS_TRITON:
        import triton

        info["triton_version"] = triton.__version__
    if plan.cuda:
        props = torch.cuda.get_device_properties(plan.device)
        info.update(capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1))
    info["copy_bandwidth_gb_s"] = round(Floors(plan.device, plan.dry).bandwidth / 1e9, 1)
    return info


def tests(plan: Plan, rows: list) -> dict:
    """The gpu-marked tests and the Triton parity suite (on CUDA: compiled, in parallel processes when
    pytest-xdist is there; --dry: a few parity tests in the interpreter)."""
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts="]
    parallel = ["-n", "8"] if plan.cuda and _has("xdist") else []
    parity_env = dict(os.environ, FASTDDPM_TRITON_DEVICE="cuda" if plan.cuda else "cpu")
    if not plan.cuda:
        parity_env["TRITON_INTERPRET"] = "1"
    runs = {
        "gpu": (base + ["-m", "gpu", "tests", "--deselect",
                        "tests/test_triton.py::test_triton_kernels_match_reference_compiled_on_cuda"], os.environ),
        "triton_parity": (base + parallel + ["tests/triton_parity.py"] + ([] if plan.cuda else ["-k", "known_answer"]),
                          parity_env),
    }
    procs = {name: subprocess.Popen(cmd, cwd=ROOT, env=env_, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, (cmd, env_) in runs.items()}
    results = {}
    for name, proc in procs.items():
        output, _ = proc.communicate(timeout=1200)
        summary = next((line for line in reversed(output.splitlines()) if " in " in line and "=" not in line[:1]), "")
        results[name] = {"exit": proc.returncode, "summary": summary.strip(), "tail": output[-3000:]}
    failed = [n for n, r in results.items() if r["exit"] not in (0, 5)]  # 5: nothing collected (no gpu tests)
    if failed:
        raise AssertionError("failing: " + ", ".join(f"{n}: {results[n]['summary']}" for n in failed))
    return results


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def sync_free_calls(plan: Plan, rows: list) -> dict:
    """The operators and GaussianDiffusion's seeded calls wait for nothing on the device."""
    B, C, H, W = plan.kernel_sizes[0]
    d = GaussianDiffusion(NoiseSchedule.linear(1000))
    table = d.schedule.coefficients(plan.device).table
    g = torch.Generator().manual_seed(0)
    x, out, z = (torch.randn(B, C, H, W, generator=g).to(plan.device) for _ in range(3))
    t = torch.randint(0, 1000, (B,), generator=g).to(plan.device)
    key = rng.noise_key(1, 0, 5, plan.device)
    pred = out.clone().requires_grad_()
    model = lambda x_t, timesteps: out  # noqa: E731
    chain = DPMSolverChain.build(d.schedule, 10, order=3, stochastic=True)
    chain_table, step = chain.table.to(plan.device, torch.float32), torch.arange(B, device=plan.device) % 10
    history = torch.zeros(2, B, C, H, W, device=plan.device)

    def loss_backward():
        per_sample, _ = FUSED.simple_loss(pred, x, t, table, None, key, "eps")
        per_sample.mean().backward()

    return sync_free(plan, {
        "q_sample": lambda: FUSED.q_sample(x, t, table, None, key),
        "reverse_step (in-kernel noise)": lambda: FUSED.reverse_step(x, out, t, table, None, key, "eps",
                                                                     "fixed_small", True, None),
        "reverse_step (given noise, DDIM)": lambda: FUSED.reverse_step(x, out, t, table, z, None, "v",
                                                                       "fixed_large", False, 0.5),
        "simple_loss forward + backward": loss_backward,
        "vlb_terms": lambda: FUSED.vlb_terms(out, x.clamp(-1, 1), x, t, table, "eps", "fixed_small", True, 256),
        "GaussianDiffusion.q_sample(seed=)": lambda: d.q_sample(x, t, seed=3),
        "GaussianDiffusion.p_sample(seed=)": lambda: d.p_sample(model, x, t, seed=3),
        "GaussianDiffusion.p_sample(noise=None)": lambda: d.p_sample(model, x, t),
        "GaussianDiffusion.training_losses(seed=)": lambda: d.training_losses(model, x, t, seed=3, step=7),
        "solver_step (SDE, in-kernel noise)": lambda: FUSED.solver_step(
            x.clone(), out, step, chain.timesteps.to(plan.device)[step], chain_table, history, None, key, "eps",
            "fixed_small", True, True),
        "GaussianDiffusion.sample(solver='dpmpp_2m')": lambda: d.sample(model, x.shape, solver="dpmpp_2m", steps=5,
                                                                         seed=3, progress=False, device=plan.device),
    })


def kernel_rows(plan: Plan, rows: list) -> dict:
    """Kernel times without launch overhead, as rows; the fused against the eager reference."""
    floors = Floors(plan.device, plan.dry)
    table = NoiseSchedule.linear(1000).coefficients(plan.device).table
    summary = {}
    for shape in plan.kernel_sizes:
        B, N = shape[0], math.prod(shape[1:])
        g = torch.Generator().manual_seed(0)
        x, out, z = (torch.randn(shape, generator=g).to(plan.device) for _ in range(3))
        x0 = x.clamp(-1, 1)
        t = torch.randint(0, 1000, (B,), generator=g).to(plan.device)
        key = rng.noise_key(1, 0, 5, plan.device)
        size = "x".join(map(str, shape))
        chain = DPMSolverChain.build(NoiseSchedule.linear(1000), 20, order=3, stochastic=True)
        chain_table, step = chain.table.to(plan.device, torch.float32), torch.arange(B, device=plan.device) % 20
        chain_t, history = chain.timesteps.to(plan.device)[step], torch.zeros(2, *shape, device=plan.device)
        def train_loss(ops, noise, key_):  # the fused loss's forward: x_t, and the loss with its gradient
            return ops.q_sample(x0, t, table, noise, key_), ops.simple_loss(out, x0, t, table, noise, key_, "eps")

        cases = {  # (workload, provider, mode): (call, bytes moved)
            ("reverse_step", "fused", "noise=in-kernel"): (
                lambda: FUSED.reverse_step(x, out, t, table, None, key, "eps", "fixed_small", True, None), 12 * B * N),
            ("reverse_step", "fused", "noise=given"): (
                lambda: FUSED.reverse_step(x, out, t, table, z, None, "eps", "fixed_small", True, None), 16 * B * N),
            ("reverse_step", "eager", "noise=given"): (
                lambda: REFERENCE.reverse_step(x, out, t, table, z, None, "eps", "fixed_small", True, None), 16 * B * N),
            ("train_loss", "fused", "fwd, noise=in-kernel"): (lambda: train_loss(FUSED, None, key), 20 * B * N),
            ("train_loss", "fused", "fwd, noise=given"): (lambda: train_loss(FUSED, z, None), 28 * B * N),
            ("train_loss", "eager", "fwd, noise=given"): (lambda: train_loss(REFERENCE, z, None), 28 * B * N),
            ("solver_step", "fused", "order 2, ODE"): (lambda: FUSED.solver_step(
                x.clone(), out, step, chain_t, chain_table, history[:1], None, None, "eps", "fixed_small", True,
                False), 20 * B * N),
            ("solver_step", "fused", "order 3, SDE, noise=in-kernel"): (lambda: FUSED.solver_step(
                x.clone(), out, step, chain_t, chain_table, history, None, key, "eps", "fixed_small", True, True),
                28 * B * N),
            ("vlb_terms", "fused", "fixed_small"): (
                lambda: FUSED.vlb_terms(out, x0, x, t, table, "eps", "fixed_small", True, 256), 12 * B * N),
            ("vlb_terms", "eager", "fixed_small"): (
                lambda: REFERENCE.vlb_terms(out, x0, x, t, table, "eps", "fixed_small", True, 256), 12 * B * N),
        }
        for (workload, provider, mode), (call, nbytes) in cases.items():
            times = _kernel_times(plan, call)
            pct = floors.percent(sorted(times)[len(times) // 2], nbytes)
            row = make_row(workload, provider, mode + (", CUDA graph" if plan.cuda else ""), size, "fp32",
                           [s * 1e3 for s in times], "ms", pct, plan.device)
            rows.append(row)
            summary[f"{workload} {provider} {mode} {size}"] = {"median_ms": row.median, "pct_of_copy_bandwidth": pct}
    name = torch.cuda.get_device_name(plan.device) if plan.cuda else ""
    nominal = next((v for k, v in NOMINAL_HBM.items() if k in name), None)
    return {"copy_bandwidth_gb_s": round(floors.bandwidth / 1e9, 1), "nominal_hbm_gb_s": nominal and nominal / 1e9,
            "rows": summary}


def _kernel_times(plan: Plan, call) -> list[float]:
    """Seconds per call: replays of a CUDA graph of the calls (`do_bench_cudagraph`), or CPU timings."""
    if not plan.cuda:
        return time_call(call, plan.device, 3, min_seconds=0.01)
    import triton.testing

    return [ms / 1e3 for ms in triton.testing.do_bench_cudagraph(call, rep=50, return_mode="all")]


def compile_checks(plan: Plan, rows: list) -> dict:
    results = {}
    table = NoiseSchedule.linear(1000).coefficients(plan.device).table
    g = torch.Generator().manual_seed(0)
    x, out, z = (torch.randn(3, 3, 5, 7, generator=g).to(plan.device) for _ in range(3))
    out2 = torch.cat([out, out.tanh()], 1)
    t = torch.tensor([0, 999, 321], device=plan.device)
    key = rng.noise_key(5, 2, 7, plan.device)
    for op, args in [
        (FUSED.q_sample, (x.clone().requires_grad_(), t, table, None, key)),
        (FUSED.reverse_step, (x, out2, t, table, z, None, "v", "learned_range", False, 0.5)),
        (FUSED.reverse_step, (x, out.to(memory_format=torch.channels_last), t, table, None, key, "x0", "fixed_large",
                              True, None)),
        (FUSED.simple_loss, (out.clone().requires_grad_(), x, t, table, None, key, "eps")),
        (FUSED.vlb_terms, (out2.clone().requires_grad_(), x.clamp(-1, 1), x, t, table, "eps", "learned_range", True,
                           256)),
    ]:
        torch.library.opcheck(op, args)
    results["opcheck"] = "ok"
    results["backward under compile"] = _compiled_backward(plan)
    results["fp16 + GradScaler"] = _fp16_steps(plan)
    results["cpu tensors compiled"] = _cpu_compiled(("aot_eager", "inductor") if plan.cuda else ("aot_eager",))
    return results


def _compiled_backward(plan: Plan) -> str:
    """q_sample → U-Net → simple_loss + vlb_terms (the hybrid loss), compiled, against eager: loss and grads."""
    torch.manual_seed(0)
    model = perturbed(UNet.from_preset("ddpm-tiny", learned_variance=True).to(plan.device))
    diffusion = GaussianDiffusion(NoiseSchedule.linear(100), variance="learned_range", loss="hybrid")
    diffusion.schedule.coefficients(plan.device)
    x0 = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)).to(plan.device) * 2 - 1
    t = torch.tensor([0, 3, 50, 99], device=plan.device)
    key = rng.noise_key(9, 0, 1, plan.device)

    def loss(x0, t, key):
        return diffusion.training_losses(model, x0, t, key=key)["loss"]

    compiled = torch.compile(loss, fullgraph=True, backend="inductor" if plan.cuda else "aot_eager")
    grads = []
    for fn in (loss, compiled):
        model.zero_grad()
        value = fn(x0, t, key)
        value.backward()
        grads.append((value.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-4, atol=1e-6)
    for a, b in zip(grads[1][1], grads[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    return "ok"


def _fp16_steps(plan: Plan) -> str:
    import tempfile

    from fastddpm.config import preset
    from fastddpm.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        config = preset("digits", steps=5, timesteps=100, batch_size=32, nll_images=0, precision="fp16",
                        compile=False, device=str(plan.device))
        trainer = Trainer(config, tmp)
        losses = [trainer.train_step()[0] for _ in range(5)]
    finite = all(bool(torch.isfinite(v)) for v in losses)
    if not finite:
        raise AssertionError(f"fp16 losses not finite: {[float(v) for v in losses]}")
    return f"ok (losses {float(losses[0]):.4f} → {float(losses[-1]):.4f}, scale {trainer.scaler.get_scale():g})"


def _cpu_compiled(backends) -> str:
    """CPU tensors through a compiled op on this machine: the native kernel, not Triton."""
    coef = NoiseSchedule.linear(100).coefficients("cpu")
    x0, t, key = torch.randn(4, 3, 8, 8), torch.tensor([0, 5, 50, 99]), rng.noise_key(3, 0, 2)

    def f(x0, t, key):
        return FUSED.q_sample(x0, t, coef.table, None, key) * 2

    for backend in backends:
        torch.testing.assert_close(torch.compile(f, backend=backend, fullgraph=True)(x0, t, key), f(x0, t, key))
    return "ok"


def sampler(plan: Plan, rows: list) -> dict:
    """Eager fp32 against compile + CUDA graphs (fp32 and bf16): the same images to tolerance; images/s."""
    from fastddpm.sampler import Sampler

    torch.manual_seed(0)
    model = perturbed(UNet.from_preset(plan.sampler_preset, dropout=0.0).to(plan.device)).eval()
    diffusion = GaussianDiffusion(NoiseSchedule.linear(1000))
    n, steps = plan.sampler_batch, plan.sampler_steps
    levers = {"eager fp32": dict(compile=False, cuda_graph=False)}
    dpm = dict(solver="dpmpp_2m", steps=20)
    if plan.cuda:  # the graph alone (same kernels: to 1e-3), then with the compiled U-Net in bf16 (to bf16's rounding)
        levers.update({"cuda_graph fp32": dict(compile=False, cuda_graph=True),
                       "compile+cuda_graph bf16": dict(compile=True, cuda_graph=True, precision="bf16"),
                       "dpmpp_2m 20 steps, compile+cuda_graph bf16": dict(compile=True, cuda_graph=True,
                                                                           precision="bf16", **dpm)})
    levers["dpmpp_2m 20 steps, eager fp32"] = dict(compile=False, cuda_graph=False, **dpm)
    images, speed, samplers = {}, {}, {}
    for name, options in levers.items():
        options = {"steps": steps, **options}
        samplers[name] = s = Sampler(model, diffusion, batch_size=n, progress=False, **options)
        s.sample(n, seed=0)  # warm-up: compile, capture
        sync(plan)
        start = time.perf_counter()
        images[name] = s.sample(n, seed=1)
        seconds = time.perf_counter() - start
        speed[name] = n / seconds
        rows.append(make_row("sample_e2e", "fused", name, f"{n}x{plan.sampler_preset}, {options['steps']} steps",
                             "bf16" if "bf16" in name else "fp32", [n / seconds], "img/s", None, plan.device))
    eager = {True: images["dpmpp_2m 20 steps, eager fp32"], False: images["eager fp32"]}
    differences = {name: {"max": float((im - eager["dpmpp" in name]).abs().max()),
                          "mean": float((im - eager["dpmpp" in name]).abs().mean())} for name, im in images.items()}
    result = {"images_per_s": speed, "difference_to_eager": differences}
    if plan.cuda:
        result["unet_floor_images_per_s"] = _unet_floor(plan, samplers["compile+cuda_graph bf16"], n, steps, rows)
        graph, x, history, index, _, _ = samplers["compile+cuda_graph bf16"]._graphs[(n,)]  # unconditional
        eager_sampler = samplers["eager fp32"]
        key = rng.noise_key(0, 0, 0, plan.device)
        result["sync_free"] = sync_free(plan, {
            "graph replays": lambda: [graph.replay() for _ in range(3)],
            "eager steps": lambda: [eager_sampler._step(x, history, index, key, {}) for _ in range(3)],
        })
        # bf16 against fp32 on the CPU (ddpm-cifar10, 50 steps, 4 images): mean 0.0027, max 0.047
        dpm_graph = samplers["dpmpp_2m 20 steps, compile+cuda_graph bf16"]._graphs[(n,)][0]
        result["sync_free"].update(sync_free(plan, {"dpmpp_2m graph replays": lambda: [dpm_graph.replay()
                                                                                        for _ in range(3)]}))
        bf16 = [v["mean"] for k, v in differences.items() if "bf16" in k]
        if differences["cuda_graph fp32"]["max"] > 1e-3 or max(bf16) > 2e-2:
            raise AssertionError(f"graphed / compiled images differ from eager: {differences}")
    return result


def guidance(plan: Plan, rows: list) -> dict:
    """Conditional sampling at w = 1 (one branch) and w = 3 (both branches in each U-Net call of
    ``batch_size``), compiled with CUDA graphs in bf16: images/s of each; the guided graph alone (fp32,
    not compiled) against eager fp32 to 1e-3 (the graph path with conditioning: same kernels), the
    compiled bf16 images against eager (recorded); a sync-free guided graph."""
    from fastddpm.sampler import Sampler

    torch.manual_seed(0)
    model = perturbed(UNet.from_preset(plan.sampler_preset, dropout=0.0, num_classes=10).to(plan.device)).eval()
    with torch.no_grad():
        model.class_embed.weight.normal_()  # (its zero init would make the two branches equal)
    diffusion = GaussianDiffusion(NoiseSchedule.linear(1000))
    n, chain = plan.sampler_batch, dict(solver="dpmpp_2m", steps=20, classes="balanced")
    fast = dict(compile=True, cuda_graph=True, precision="bf16") if plan.cuda else dict(compile=False)
    settings = {"w=1 (conditional branch)": dict(guidance=1.0, **fast), "w=3 (guided)": dict(guidance=3.0, **fast),
                "w=3 eager fp32": dict(guidance=3.0, compile=False, cuda_graph=False)}
    if plan.cuda:
        settings["w=3 cuda_graph fp32"] = dict(guidance=3.0, compile=False, cuda_graph=True)
    images, speed, samplers = {}, {}, {}
    for name, options in settings.items():
        samplers[name] = s = Sampler(model, diffusion, batch_size=n, progress=False, **chain, **options)
        s.sample(n, seed=0)  # warm-up: compile, capture
        sync(plan)
        start = time.perf_counter()
        images[name] = s.sample(n, seed=1)
        speed[name] = n / (time.perf_counter() - start)
        dtype = "bf16" if options.get("precision") == "bf16" else "fp32"
        rows.append(make_row("sample_e2e", "fused", f"classes balanced, {name}", f"{n}x{plan.sampler_preset}, 20 steps",
                             dtype, [speed[name]], "img/s", None, plan.device))
    eager = images["w=3 eager fp32"]
    differences = {name: {"max": float((im - eager).abs().max()), "mean": float((im - eager).abs().mean())}
                   for name, im in images.items() if name.startswith("w=3") and name != "w=3 eager fp32"}
    result = {"images_per_s": speed, "difference_to_eager": differences,
              "guided_over_half_unguided": speed["w=3 (guided)"] / (speed["w=1 (conditional branch)"] / 2)}
    if plan.cuda:
        graph = next(iter(samplers["w=3 (guided)"]._graphs.values()))[0]
        result["sync_free"] = sync_free(plan, {"guided graph replays": lambda: [graph.replay() for _ in range(3)]})
        if differences["w=3 cuda_graph fp32"]["max"] > 1e-3 or result["guided_over_half_unguided"] < 0.9:
            raise AssertionError(f"guided sampling: {result}")
    return result


def _unet_floor(plan: Plan, s, n: int, steps: int, rows: list) -> float:
    """Images/s of the bare U-Net forwards of a chain (the sampler's compiled model, bf16, no step op)."""
    x = torch.randn(n, *s.shape, device=plan.device)
    t = torch.zeros(n, dtype=torch.int64, device=plan.device)

    def forwards():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            for _ in range(steps):
                s.model(x, t)

    forwards()
    sync(plan)
    start = time.perf_counter()
    forwards()
    sync(plan)
    speed = n / (time.perf_counter() - start)
    rows.append(make_row("sample_e2e", "floor", "bare U-Net forwards, compiled bf16",
                         f"{n}x{plan.sampler_preset}, {steps} steps", "bf16", [speed], "img/s", None, plan.device))
    return speed


def train(plan: Plan, rows: list) -> dict:
    """Compiled bf16 training steps of the digits preset: recompiles, host syncs, speed, then the NLL."""
    import tempfile

    from torch._dynamo.utils import counters

    from fastddpm.config import preset
    from fastddpm.datasets import load_heldout
    from fastddpm.trainer import Trainer, heldout_nll

    torch._dynamo.reset()
    counters.clear()
    with tempfile.TemporaryDirectory() as tmp:
        config = preset("digits", steps=plan.train_steps, timesteps=plan.train_timesteps, precision="bf16",
                        compile=plan.cuda, device=str(plan.device), nll_images=0)
        trainer = Trainer(config, tmp)
        for _ in range(2):
            trainer.train_step()  # warm-up (compile)
        sync_result = sync_free(plan, {"train_step": trainer.train_step})
        sync(plan)
        start, first = time.perf_counter(), trainer.step
        losses = [trainer.train_step()[0] for _ in range(plan.train_steps)]
        sync(plan)
        steps_per_s = (trainer.step - first) / (time.perf_counter() - start)
        rows.append(make_row("train_e2e", "fused", "compile+bf16, digits preset", f"{config.batch_size}x1x8x8",
                             "bf16", [steps_per_s * config.batch_size], "img/s", None, plan.device))
        images = load_heldout().tensor(plan.device)[: plan.nll_images]
        nll = heldout_nll(trainer.model.eval(), trainer.diffusion, images, 512, 0)
    return {"steps": trainer.step, "steps_per_s": round(steps_per_s, 1), "final_loss": float(losses[-1]),
            "unique_graphs": counters["stats"]["unique_graphs"], "recompiles": dict(counters["recompiles"]),
            "sync_free": sync_result, "heldout_nll_bpd": nll, "heldout_images": len(images)}


SECTIONS = {"env": env, "tests": tests, "sync_free": sync_free_calls, "kernels": kernel_rows,
            "compile": compile_checks, "sampler": sampler, "train": train, "guidance": guidance}


def merge(out: Path, results: Path = RESULTS) -> int:
    """Add DIR/results.csv's rows to the results CSV (rows with the same key replaced)."""
    rows = read_rows(out / "results.csv")
    store([Row(**{k: (None if v == "" and k == "floor_pct" else v) for k, v in r.items()}) for r in rows], results)
    print(f"merged {len(rows)} rows into {results}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and results.csv")
    p.add_argument("--dry", action="store_true", help="the same sections at toy sizes on the CPU")
    p.add_argument("--budget", type=float, default=480, help="seconds; sections not started by then are skipped")
    p.add_argument("--only", nargs="+", choices=sorted(SECTIONS), help="run these sections only")
    p.add_argument("--merge", action="store_true", help="merge the rows of a finished --out into the results CSV")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.out)
    if not args.dry and not torch.cuda.is_available():
        print("python -m benchmarks.gpu_check: error: no CUDA device (use --dry for the CPU run)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    plan = Plan.for_run(args.dry)
    report = Report(args.out / "gpu_check.json", plan, args.budget)
    for name in args.only or list(SECTIONS):
        report.run(name, SECTIONS[name])
        if report.rows:
            store(report.rows, args.out / "results.csv")
    status = {name: ("ok" if s["ok"] else s.get("skipped") or s.get("error")) for name, s in
              report.data["sections"].items()}
    print(json.dumps(status, indent=2))
    return 0 if report.data["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
