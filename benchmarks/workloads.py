"""The benchmark workloads. Each takes a `Context` and returns rows for its providers:
``fused`` (fastddpm's operators / engine), ``eager`` (the reference, as a user would run it)
and ``diffusers`` (when installed; same weights through fastddpm.interop for end-to-end rows).

Kernel rows time one call (ms); end-to-end rows report images/s.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastddpm import GaussianDiffusion, NoiseSchedule, UNet, kernels, reference, rng
from fastddpm.ops import FUSED
from fastddpm.sampler import Sampler

from .harness import Floors, Row, make_row, time_call, time_calls

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Context:
    device: torch.device
    quick: bool
    floors: Floors
    checkpoint: Path = Path("runs/digits")  # the default digits job's run (fastddpm train), for quality_vs_nfe
    cond_checkpoint: Path = Path("runs/digits-cond")  # the conditional digits job's (--class-cond), for guidance

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def repeats(self) -> int:
        return 5 if self.quick else 15

    def kernel_sizes(self) -> list[tuple[int, ...]]:
        if self.cuda:
            return [(64, 3, 32, 32), (256, 3, 32, 32), (64, 3, 256, 256)]
        return [(64, 3, 32, 32)] if self.quick else [(64, 3, 32, 32), (256, 3, 32, 32)]

    def row(self, workload, provider, mode, size, dtype, times, nbytes=0, flops=0.0, flops_dtype=torch.float32,
            images=None) -> Row:
        if images is None:
            pct = self.floors.percent(sorted(times)[len(times) // 2], nbytes, flops, flops_dtype)
            return make_row(workload, provider, mode, size, dtype, [t * 1e3 for t in times], "ms", pct, self.device)
        pct = self.floors.percent(sorted(times)[len(times) // 2], 0, flops, flops_dtype) if flops else None
        return make_row(workload, provider, mode, size, dtype, [images / t for t in times], "img/s", pct, self.device)


def _size(shape) -> str:
    return "x".join(str(s) for s in shape)


def _diffusers():
    try:
        import diffusers
    except ImportError:
        return None
    return diffusers


def _inputs(ctx: Context, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(ctx.device) for _ in range(3)]


# ---- kernels ------------------------------------------------------------------------------------


def reverse_step(ctx: Context) -> list[Row]:
    """One reverse step at each size: the operator (in-kernel or given noise), on the CPU also the
    native launcher without the operator's dispatch and checks, `GaussianDiffusion.p_sample` (what
    a user calls: the operator plus its own checks and a key, with a model that returns a fixed
    output), the eager reference, and diffusers' DDPMScheduler.step, timed in turns (`time_calls`)."""
    rows = []
    diffusion = GaussianDiffusion(NoiseSchedule.linear(1000))
    coef = diffusion.schedule.coefficients(ctx.device)
    diffusers = _diffusers()
    options = dict(prediction="eps", variance="fixed_small", clip_denoised=True)
    for shape in ctx.kernel_sizes():
        x, out32, z = _inputs(ctx, shape)
        B, N = shape[0], math.prod(shape[1:])
        t = torch.full((B,), 500, device=ctx.device)
        key = rng.noise_key(1, 0, 0, ctx.device)
        for dname, dtype in DTYPES.items():
            out = out32.to(dtype)
            model_bytes = B * N * out.element_size()
            calls = {}  # (provider, mode) → (fn, bytes moved)
            for mode, noise, extra in (("noise=in-kernel", None, 0), ("noise=given", z, 4 * B * N)):
                calls["fused", mode] = (lambda noise=noise: FUSED.reverse_step(
                    x, out, t, coef.table, noise, key, "eps", "fixed_small", True, None), 8 * B * N + model_bytes + extra)
            calls["fused", "GaussianDiffusion.p_sample(seed=)"] = (lambda: diffusion.p_sample(
                lambda x_t, timesteps: out, x, t, seed=1), 8 * B * N + model_bytes)
            if not ctx.cuda and kernels.native is not None:  # the kernel without the operator's dispatch
                calls["fused", "native launcher, noise=in-kernel"] = (lambda: kernels.reverse_step.native_reverse_step(
                    x, out, t, coef.table, None, key, "eps", "fixed_small", True, None), 8 * B * N + model_bytes)
            calls["eager", "noise=randn"] = (lambda: reference.reverse_step(
                x, out.float(), t, torch.randn_like(x), coef, **options), 8 * B * N + model_bytes)
            if diffusers is not None:
                scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                                    variance_type="fixed_small", clip_sample=True)
                g = torch.Generator(ctx.device).manual_seed(1)
                calls["diffusers", "DDPMScheduler.step"] = (
                    lambda: scheduler.step(out, 500, x, generator=g).prev_sample, 8 * B * N + model_bytes)
            times = time_calls({name: fn for name, (fn, _) in calls.items()}, ctx.device, ctx.repeats)
            for (provider, mode), (_, nbytes) in calls.items():
                rows.append(ctx.row("reverse_step", provider, mode, _size(shape), dname, times[provider, mode],
                                    nbytes=nbytes))
    return rows


def train_loss(ctx: Context) -> list[Row]:
    """q_sample + ε-MSE forward and backward, with the model output as a leaf tensor: the operators,
    `GaussianDiffusion.training_loss` on them, the eager reference, and diffusers' recipe."""
    rows = []
    diffusion = GaussianDiffusion(NoiseSchedule.linear(1000))
    coef = diffusion.schedule.coefficients(ctx.device)
    diffusers = _diffusers()
    for shape in ctx.kernel_sizes():
        x0, pred32, _ = _inputs(ctx, shape)
        B, N = shape[0], math.prod(shape[1:])
        t = torch.randint(0, 1000, (B,), generator=torch.Generator().manual_seed(0)).to(ctx.device)
        key = rng.noise_key(1, 0, 0, ctx.device)
        for dname, dtype in DTYPES.items():
            pred = pred32.to(dtype).requires_grad_()
            nbytes = 12 * B * N + 2 * B * N * pred.element_size()  # x0 → x_t; read pred, x0; write grad

            def fused():
                x_t = FUSED.q_sample(x0, t, coef.table, None, key)
                per_sample, _ = FUSED.simple_loss(pred, x0, t, coef.table, None, key, "eps")
                per_sample.mean().backward()
                return x_t

            def eager():
                noise = torch.randn_like(x0)
                x_t = reference.q_sample(x0, t, noise, coef)
                loss, _ = reference.simple_loss(pred.float(), x0, noise, t, coef, prediction="eps")
                loss.backward()
                return x_t

            def user_call():  # what a user calls: GaussianDiffusion's checks and key, the ops, the mean
                diffusion.training_loss(lambda x_t, timesteps: pred, x0, t, seed=1, step=3).backward()

            calls = {("fused", "fwd+bwd"): fused, ("fused", "GaussianDiffusion.training_loss(seed=)"): user_call,
                     ("eager", "fwd+bwd"): eager}
            if diffusers is not None:
                scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")

                def recipe():
                    noise = torch.randn_like(x0)
                    x_t = scheduler.add_noise(x0, noise, t)
                    F.mse_loss(pred.float(), noise).backward()
                    return x_t

                calls["diffusers", "add_noise+mse_loss"] = recipe
            times = time_calls(calls, ctx.device, ctx.repeats)
            for (provider, mode), fn in calls.items():
                rows.append(ctx.row("train_loss", provider, mode, _size(shape), dname, times[provider, mode],
                                    nbytes=nbytes))
    return rows


def vlb_terms(ctx: Context) -> list[Row]:
    rows = []
    coef = NoiseSchedule.linear(1000).coefficients(ctx.device)
    for shape in ctx.kernel_sizes():
        x0, out, x_t = _inputs(ctx, shape)
        B, N = shape[0], math.prod(shape[1:])
        x0 = x0.clamp(-1, 1)
        t = torch.arange(B, device=ctx.device) % 1000
        options = dict(prediction="eps", variance="fixed_small", clip_denoised=True, levels=256)
        fused = lambda: FUSED.vlb_terms(out, x0, x_t, t, coef.table, "eps", "fixed_small", True, 256)  # noqa: E731
        eager = lambda: reference.vlb_terms(out, x0, x_t, t, coef, **options)  # noqa: E731
        for provider, fn in (("fused", fused), ("eager", eager)):
            rows.append(ctx.row("vlb_terms", provider, "fixed_small", _size(shape), "fp32",
                                time_call(fn, ctx.device, ctx.repeats), nbytes=12 * B * N))
    return rows


# ---- end to end ---------------------------------------------------------------------------------


def _e2e_model(ctx: Context) -> tuple[UNet, tuple[int, int, int]]:
    """ddpm-cifar10 (35.7M) on a GPU; the digits U-Net (8×8, 1 channel) on the CPU."""
    torch.manual_seed(0)
    if ctx.cuda:
        return UNet.from_preset("ddpm-cifar10", dropout=0.0).to(ctx.device), (3, 32, 32)
    return UNet.from_preset("ddpm-digits").to(ctx.device), (1, 8, 8)


def _unet_flops(model: UNet, shape) -> float:
    """FLOPs of one U-Net forward on one image (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, *shape, device=next(model.parameters()).device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, torch.zeros(1, dtype=torch.long, device=x.device))
    return float(counter.get_total_flops())


def _to_diffusers(model: UNet):
    try:
        from fastddpm.interop.diffusers import unet_to_diffusers
    except ImportError:
        return None
    return unet_to_diffusers(model)


def sample_e2e(ctx: Context) -> list[Row]:
    model, shape = _e2e_model(ctx)
    model.eval()
    batch = 256 if ctx.cuda else 64
    steps = 1000 if ctx.cuda else (50 if ctx.quick else 1000)
    diffusion = GaussianDiffusion(NoiseSchedule.linear(1000))
    flops = _unet_flops(model, shape) * steps * batch
    size = f"{batch}x{_size(shape)}, {steps} steps"
    rows = []
    repeats = 3 if ctx.quick or ctx.cuda else 5

    def measure(provider, mode, fn, dtype=torch.float32):
        fn()  # warm-up (and compile / capture)
        times = time_call(fn, ctx.device, repeats, min_seconds=0.0)
        rows.append(ctx.row("sample_e2e", provider, mode, size, "bf16" if dtype == torch.bfloat16 else "fp32",
                            times, flops=flops, flops_dtype=dtype, images=batch))

    reference_diffusion = GaussianDiffusion(NoiseSchedule.linear(1000), backend="reference")
    respaced = None if steps == 1000 else steps
    measure("eager", "reference loop", lambda: reference_diffusion.sample(model, (batch, *shape), steps=respaced,
                                                                         progress=False))
    levers = [("no compile", dict(compile=False, cuda_graph=False)), ("+compile", dict(compile=True, cuda_graph=False))]
    if ctx.cuda:
        levers += [("+compile+cuda_graph", dict(compile=True, cuda_graph=True)),
                   ("+compile+cuda_graph+bf16", dict(compile=True, cuda_graph=True, precision="bf16"))]
    else:
        levers += [("+bf16", dict(compile=False, precision="bf16"))]
    for mode, options in levers:
        sampler = Sampler(model, diffusion, steps=respaced, batch_size=batch, progress=False, **options)
        dtype = torch.bfloat16 if options.get("precision") == "bf16" else torch.float32
        measure("fused", mode, lambda: sampler.sample(batch, seed=0), dtype)
    unet2d, diffusers = _to_diffusers(model), _diffusers()
    if unet2d is not None and diffusers is not None:
        scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
        pipeline = diffusers.DDPMPipeline(unet=unet2d.to(ctx.device), scheduler=scheduler)
        pipeline.set_progress_bar_config(disable=True)
        measure("diffusers", "DDPMPipeline fp32",
                lambda: pipeline(batch_size=batch, num_inference_steps=steps, output_type="np"))
    return rows


def train_e2e(ctx: Context) -> list[Row]:
    """One training step (forward, backward, Adam, EMA for fastddpm) at batch 128."""
    from fastddpm.config import preset
    from fastddpm.trainer import Trainer

    model, shape = _e2e_model(ctx)
    batch, rows = 128, []
    size = f"{batch}x{_size(shape)}"
    repeats = 3 if ctx.quick else 10
    flops = 3 * _unet_flops(model, shape) * batch  # forward + backward ≈ 3 forwards

    def measure(provider, mode, step, dtype=torch.float32):
        for _ in range(2):
            step()  # warm-up (and compile)
        times = time_call(step, ctx.device, repeats, min_seconds=0.0)
        rows.append(ctx.row("train_e2e", provider, mode, size, "bf16" if dtype == torch.bfloat16 else "fp32",
                            times, flops=flops, flops_dtype=dtype, images=batch))

    data = torch.rand(batch * 4, *shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x0 = data[:batch].to(ctx.device)
    reference_diffusion = GaussianDiffusion(NoiseSchedule.linear(1000), backend="reference")
    eager_model = _e2e_model(ctx)[0].train()
    optimizer = torch.optim.Adam(eager_model.parameters(), lr=2e-4)

    def eager_step():
        optimizer.zero_grad(set_to_none=True)
        reference_diffusion.training_loss(eager_model, x0).backward()
        optimizer.step()

    measure("eager", "reference fp32", eager_step)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.npy"
        np.save(path, ((data.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8))
        levers = [("fused", dict(compile=False)), ("+compile", dict(compile=True)),
                  ("+compile+bf16", dict(compile=True, precision="bf16"))]
        for mode, options in levers:
            config = preset("cifar10" if ctx.cuda else "digits", data=str(path), batch_size=batch, timesteps=1000,
                            device=str(ctx.device), nll_images=0, **options)
            trainer = Trainer(config, Path(tmp) / mode)
            dtype = torch.bfloat16 if options.get("precision") == "bf16" else torch.float32
            measure("fused", mode, trainer.train_step, dtype)

    unet2d, diffusers = _to_diffusers(_e2e_model(ctx)[0]), _diffusers()
    if unet2d is not None and diffusers is not None:
        unet2d = unet2d.to(ctx.device).train()
        scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
        d_optimizer = torch.optim.Adam(unet2d.parameters(), lr=2e-4)

        def diffusers_step():
            noise = torch.randn_like(x0)
            t = torch.randint(0, 1000, (batch,), device=ctx.device)
            d_optimizer.zero_grad(set_to_none=True)
            F.mse_loss(unet2d(scheduler.add_noise(x0, noise, t), t).sample, noise).backward()
            d_optimizer.step()

        measure("diffusers", "UNet2DModel+add_noise+mse fp32", diffusers_step)
    return rows


def nll(ctx: Context) -> list[Row]:
    """Bits/dim evaluation: the full bound over all T terms, images/s."""
    model, shape = _e2e_model(ctx)
    model.eval()
    batch = 256 if ctx.cuda else 64
    T = 1000 if (ctx.cuda or not ctx.quick) else 100
    x0 = (torch.rand(batch, *shape, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(ctx.device)
    rows = []
    for provider, backend in (("fused", "auto"), ("eager", "reference")):
        diffusion = GaussianDiffusion(NoiseSchedule.linear(T), backend=backend)
        fn = lambda: diffusion.nll(model, x0, progress=False)  # noqa: E731
        fn()
        times = time_call(fn, ctx.device, 3, min_seconds=0.0)
        rows.append(ctx.row("nll", provider, f"{T} terms", f"{batch}x{_size(shape)}", "fp32", times, images=batch))
    return rows


# (solver, options, the step counts it runs at): each chain's NFE is its step count
QUALITY_RUNS = [("ddpm", {}, (1000, 250, 100)), ("ddim", {}, (100, 50, 20)), ("dpmpp_2m", {}, (50, 20, 10)),
                ("dpmpp_2m_sde", {}, (50, 20, 10))]


def quality_vs_nfe(ctx: Context) -> list[Row]:
    """The default digits job's checkpoint (``--checkpoint``) sampled by each solver at several step
    counts, each seed's n images a new chain: the distance of all n to the training digits and
    its mean over sets of 297 (`fastddpm.metrics.digit_quality`), whose floor is the held-out
    digits' distance (a row); each a median and range over seeds; and images/s (eager U-Net, after
    a warm-up at the batch size; each chain's tables built before its timings)."""
    from fastddpm.checkpoint import load_checkpoint
    from fastddpm.metrics import digit_floor, digit_quality

    model, diffusion, header = load_checkpoint(ctx.checkpoint, ctx.device)
    if not header.get("data", {}).get("name", "").startswith("digits/"):
        raise ValueError(f"quality_vs_nfe scores the digits job; {ctx.checkpoint} was trained on other data")
    n, seeds = (300, 1) if ctx.quick else (1500, 4)
    size = f"{n}x1x8x8"
    floor = digit_floor()
    rows = [make_row("quality_vs_nfe", "floor", "held-out digits", f"{floor['n']}x1x8x8", "fp32",
                     [floor["distance"]], "distance", None, ctx.device)]
    Sampler(model, diffusion, solver="ddim", steps=2, batch_size=n, progress=False, compile=False).sample(n)  # warm-up
    for solver, options, step_counts in QUALITY_RUNS:
        name = solver + (" karras" if options.get("karras") else "")
        for steps in step_counts:
            sampler = Sampler(model, diffusion, solver=solver, steps=steps, batch_size=n, progress=False,
                              compile=False, **options)
            sampler.sample(2, seed=2**32)
            scores, speeds = [], []
            for seed in range(seeds):
                start = time.perf_counter()
                images = sampler.sample(n, seed=seed)
                speeds.append(n / (time.perf_counter() - start))
                scores.append(digit_quality(images.clamp(-1, 1)))
            for mode, key in ((f"{steps} NFE", "distance"), (f"{steps} NFE, sets of {floor['n']}", "distance_at_floor_n")):
                rows.append(make_row("quality_vs_nfe", name, mode, size, "fp32", [q[key] for q in scores], "distance",
                                     None, ctx.device))
            rows.append(make_row("quality_vs_nfe", name, f"{steps} NFE, speed", size, "fp32", speeds, "img/s", None,
                                 ctx.device))
    return rows


GUIDANCES = (0.0, 1.0, 1.5, 2.0, 3.0, 4.0)  # classifier-free guidance's w: unconditional, conditional, guided
GUIDED_CHAIN = dict(solver="dpmpp_2m", steps=10)  # the trainer's default chain (TrainConfig.sample_solver)


def guidance(ctx: Context) -> list[Row]:
    """The conditional digits job's checkpoint (``--cond-checkpoint``) sampled at each guidance w with
    every class equally often (image k is class k mod 10): the bundled classifier's accuracy on each
    class's samples (each class, the worst, the mean) and the distance of all n to the training
    digits and in sets of 297 beside the floor (`fastddpm.metrics.digit_quality`), each a median and
    range over seeds; and images/s at one U-Net batch (eager; w = 0 and 1 run one branch, chains of
    that many images; any other w both in each call, chains of half as many), the settings timed in
    turns (`time_calls`) so that their ratio holds on a shared machine."""
    from fastddpm.checkpoint import load_checkpoint
    from fastddpm.datasets import quantize, to_float
    from fastddpm.metrics import digit_floor, digit_quality
    from fastddpm.metrics.classifier import load_digit_classifier

    model, diffusion, header = load_checkpoint(ctx.cond_checkpoint, ctx.device)
    classes = header.get("data", {}).get("classes") or []
    if not header.get("data", {}).get("name", "").startswith("digits/") or len(classes) != 10:
        raise ValueError(f"guidance scores the conditional digits job (fastddpm train --class-cond); "
                         f"{ctx.cond_checkpoint} is not one")
    classifier = load_digit_classifier().eval()
    n, seeds, batch = (300, 1, 300) if ctx.quick else (1500, 3, 500)
    size, floor = f"{n}x1x8x8", digit_floor()
    labels = torch.arange(n) % len(classes)
    rows = [make_row("guidance", "floor", "held-out digits", f"{floor['n']}x1x8x8", "fp32", [floor["distance"]],
                     "distance", None, ctx.device)]
    samplers = {w: Sampler(model, diffusion, **GUIDED_CHAIN, batch_size=batch, progress=False, compile=False,
                           classes="balanced", guidance=w) for w in GUIDANCES}
    seconds = time_calls({w: lambda s=s: s.sample(batch, seed=2**32) for w, s in samplers.items()}, ctx.device,
                         3 if ctx.quick else 5, min_seconds=0.0)
    for w, sampler in samplers.items():
        accuracy, scores = [], []
        for seed in range(seeds):
            images = sampler.sample(n, seed=seed).clamp(-1, 1)
            with torch.no_grad():
                predicted = classifier(to_float(quantize(images, 17), 17)).argmax(1)
            accuracy.append([(predicted[labels == k] == k).float().mean().item() for k in range(len(classes))])
            scores.append(digit_quality(images))
        provider = f"w={w:g}"

        def row(mode, values, unit):
            rows.append(make_row("guidance", provider, mode, size, "fp32", values, unit, None, ctx.device))

        for k, name in enumerate(classes):
            row(f"accuracy, class {name}", [a[k] for a in accuracy], "accuracy")
        row("accuracy, worst class", [min(a) for a in accuracy], "accuracy")
        row("accuracy, mean", [sum(a) / len(a) for a in accuracy], "accuracy")
        row("distance", [q["distance"] for q in scores], "distance")
        row(f"distance, sets of {floor['n']}", [q["distance_at_floor_n"] for q in scores], "distance")
        row(f"speed, U-Net batch {batch}", [batch / t for t in seconds[w]], "img/s")
    return rows


# ---- data ---------------------------------------------------------------------------------------

ADWAITA = Path("/usr/share/icons/Adwaita/32x32")  # 713 real RGBA icon PNGs, where the theme is installed


def _picture(rng: np.random.Generator, size: int, alpha: bool) -> np.ndarray:
    """A smooth random picture (an upscaled 4×4 grid of colours plus light noise), so it compresses as a
    photo or an icon does, not as white noise; with an alpha channel, an opaque disc on transparency."""
    from PIL import Image

    coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    pixels = np.asarray(coarse).astype(np.int16) + rng.integers(-8, 9, (size, size, 3))
    pixels = pixels.clip(0, 255).astype(np.uint8)
    if not alpha:
        return pixels
    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    disc = ((x**2 + y**2) < (0.45 * size) ** 2).astype(np.uint8) * 255
    return np.dstack([pixels, disc])


def _generated_folder(root: Path, n: int, size: int, kind: str) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n):
        if kind == "png":
            Image.fromarray(_picture(rng, size, alpha=True), "RGBA").save(root / f"{i:06d}.png")
        else:
            Image.fromarray(_picture(rng, size, alpha=False)).save(root / f"{i:06d}.jpg", quality=90)
    return root


def data_loader(ctx: Context) -> list[Row]:
    """Image folders (fastddpm.datasets.cache): the cache build's images/s (list, header scan, decode,
    composite, resize, write, fsync) with 1 process and with one a core, on generated RGBA PNGs
    (64×64 to 32×32), generated JPEG photos (256×256 to 64×64) and, where installed, the Adwaita
    32×32 icons (713 real RGBA PNGs, no resize), the source files in the page cache; reopening a built
    cache; then a training step (the auto U-Net at 32×32, batch 64) with the data held in memory against
    streamed from the cache's memory map (the same batches), and the loader's batch alone."""
    from fastddpm.config import preset
    from fastddpm.datasets import image_folder
    from fastddpm.datasets.cache import default_workers
    from fastddpm.trainer import Trainer

    rows, cores = [], default_workers()
    repeats = 2 if ctx.quick else 3
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n_png, n_jpg = (256, 128) if ctx.quick else (4096, 1024)
        folders = [("generated RGBA PNG 64->32", _generated_folder(tmp / "png", n_png, 64, "png"), n_png, 32),
                   ("generated JPEG 256->64", _generated_folder(tmp / "jpg", n_jpg, 256, "jpg"), n_jpg, 64)]
        if ADWAITA.is_dir():
            folders.append(("Adwaita 32x32 icons", ADWAITA, sum(1 for _ in ADWAITA.rglob("*.png")), 32))
        builds = 0
        for name, root, n, size in folders:
            for workers in sorted({1, cores}):
                times = []
                for _ in range(repeats):
                    builds += 1
                    start = time.perf_counter()
                    image_folder(root, size, cache_dir=tmp / f"cache{builds}", workers=workers)
                    times.append(time.perf_counter() - start)
                rows.append(ctx.row("data_loader", "fused", f"cache build, {workers} process(es)",
                                    f"{n}x {name}", "uint8", times, images=n))
            reopen = [time.perf_counter()]
            for _ in range(5):
                image_folder(root, size, cache_dir=tmp / f"cache{builds}")
                reopen.append(time.perf_counter())
            rows.append(ctx.row("data_loader", "fused", "cache reopen (list, stat, index)", f"{n}x {name}", "uint8",
                                list(np.diff(reopen))))

        batch = 64
        data = str(tmp / "png")
        trainers, cache_env = {}, os.environ.get("FASTDDPM_CACHE")
        os.environ["FASTDDPM_CACHE"] = str(tmp / "trainer-cache")  # the trainers' cache: not the user's
        try:
            for mode, budget in (("step, data in memory", 1024), ("step, streamed from the memory map", 0)):
                config = preset("digits", model="auto", data=data, image_size=32, batch_size=batch, nll_images=0,
                                device=str(ctx.device), data_memory_mb=budget)
                trainers[mode] = Trainer(config, tmp / mode.replace(" ", "-").replace(",", ""))
        finally:
            if cache_env is None:
                del os.environ["FASTDDPM_CACHE"]
            else:
                os.environ["FASTDDPM_CACHE"] = cache_env
        assert trainers["step, streamed from the memory map"].loader is not None
        times = time_calls({mode: t.train_step for mode, t in trainers.items()}, ctx.device, repeats + 1,
                           min_seconds=0.0)
        params = sum(p.numel() for p in trainers["step, data in memory"].model.parameters())
        for mode in trainers:
            rows.append(ctx.row("data_loader", "fused", mode, f"{batch}x3x32x32, auto U-Net {params / 1e6:.1f}M",
                                "fp32", times[mode]))
        memory, streamed = trainers.values()
        steps = iter(range(10**9)), iter(range(10**9))  # each in turn: on CUDA the loader's next batch is ready
        batches = {"batch, gathered from memory": lambda: memory.data[memory._indices(next(steps[0]))],
                   "batch, streamed from the memory map": lambda: streamed.loader(next(steps[1]))}
        times = time_calls(batches, ctx.device, ctx.repeats)
        for mode, fn in batches.items():
            rows.append(ctx.row("data_loader", "fused", mode, f"{batch}x3x32x32", "uint8", times[mode]))
    return rows


WORKLOADS = {"reverse_step": reverse_step, "train_loss": train_loss, "vlb_terms": vlb_terms,
             "sample_e2e": sample_e2e, "train_e2e": train_e2e, "nll": nll, "quality_vs_nfe": quality_vs_nfe,
             "guidance": guidance, "data_loader": data_loader}
