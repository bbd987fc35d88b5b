"""The sampling engine: many images, in batches, with no host sync inside the reverse chain.

`Sampler` runs `GaussianDiffusion.sample`'s chains (`fastddpm.solvers`: ancestral DDPM or
DDIM(η) on the fused `reverse_step`, DPM-Solver++ and its SDE variant on the fused, in-place
`solver_step`), with all noise drawn from the noise contract: x_T is the contract's prior for
each global image index and each step's z is drawn inside the kernel from ``key`` = [seed,
first index of the batch, 0]. So image k of a seed is the same in any batch, at any position,
on any number of processes. A class-conditional U-Net samples the classes asked for; with
classifier-free guidance w (Ho & Salimans 2022) each step runs both branches in one U-Net call of
batch 2B (the labels, then the null class), whose halves the fused step combines,
ε_u + w (ε_c − ε_u). A step is the U-Net (optionally compiled, under autocast, channels-last) and
the operator, both updating preallocated tensors; on CUDA the whole step is captured once per
batch size in a CUDA graph, so a step costs one ``fill_`` of its position and one replay. The
host waits once per batch, to move its images off the device. Under `torch.distributed`, each
rank draws a contiguous block of the indices and all ranks gather the full result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from . import conditioning, distributed, options, rng, solvers, validate
from .diffusion import GaussianDiffusion
from .ops import FUSED
from .progress import bar as progress_bar
from .unet import UNetConfig

# torch.compile of the U-Net on the CPU, ddpm-digits (8x8, 1 channel), batch 64, respaced to 100
# steps, 2 cores (torch 2.13, inductor): 22.5 img/s eager, 32.7 img/s compiled (28.4 -> 19.6 ms a
# step). But the first compile takes ~30 s (~3 s from inductor's cache), for each new batch size:
# end to end, `fastddpm sample --n 256 --steps 100` of the digits model ran at 32.4 img/s eager
# and 6.8 img/s compiled. So on the CPU compiling is opt-in (--compile, for long runs).
COMPILE_BY_DEFAULT = ("cuda",)


class Sampler:
    """Draws images [n, C, H, W] (float32, on the CPU) from ``model`` under ``diffusion``.

    solver, steps, eta, order, spacing, karras, lower_order_final: the chain (`solvers.solver_for`):
        "ddpm" (``steps`` respaces), "ddim" (DDIM(η)), "dpmpp_2m" or "dpmpp_2m_sde" (``steps``
        model evaluations, default 20); by default "ddpm", or "ddim" with an ``eta``.
    batch_size: the U-Net's batch: images per reverse chain, or with guidance half as many, whose two
        branches ride in one call (so guidance costs U-Net time, not memory); a rank's last chain
        holds the rest. progress: a tqdm bar over the images (of rank 0's block under
        `torch.distributed`).
    precision: "fp32", "bf16" or "fp16" — autocast for the U-Net only; the chain stays float32.
    compile, cuda_graph, channels_last: the speed levers; None turns each on where it helps
        (compile on `COMPILE_BY_DEFAULT` devices; CUDA graphs and channels-last on CUDA). channels_last
        converts the model's weights in place, which changes no result.
    shape: (C, H, W) of an image, for a model without a `UNetConfig` as ``config``.
    classes: for a class-conditional U-Net (`UNetConfig.num_classes`): a class index for every image,
        "balanced" (image k is class k mod K) or one label per image (`conditioning.check_classes`).
    guidance: classifier-free guidance's w ≥ 0 with ``classes``: 0 samples the unconditional
        branch alone (the images without classes), 1 (or None) the conditional branch alone, any
        other w both in one batch of 2B, combined inside the fused step.
    distributed: under `torch.distributed`, every rank draws its block and gathers all (the default);
        False: this process draws all n alone (a trainer's rank 0, for its grids).
    """

    def __init__(
        self, model: Callable, diffusion: GaussianDiffusion, *, solver: str | None = None,
        steps: int | Sequence[int] | None = None, eta: float | None = None, order: int | None = None,
        spacing: str | None = None, karras: bool | None = None, lower_order_final: bool | None = None,
        batch_size: int = 256, precision: str = "fp32", compile: bool | None = None, cuda_graph: bool | None = None,
        channels_last: bool | None = None, progress: bool = True, shape: Sequence[int] | None = None,
        classes=None, guidance: float | None = None, distributed: bool = True,
    ):
        if not isinstance(diffusion, GaussianDiffusion):
            raise TypeError(f"diffusion must be a GaussianDiffusion, got {type(diffusion).__name__}")
        self.solver = solvers.solver_for(diffusion, solver, steps, eta=eta, order=order, spacing=spacing,
                                         karras=karras, lower_order_final=lower_order_final)
        validate.integer("batch_size", batch_size, 1)
        options.choice("precision", precision, options.PRECISIONS)
        for name, value in (("compile", compile), ("cuda_graph", cuda_graph), ("channels_last", channels_last)):
            validate.flag(name, value, optional=True)
        params = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
        self.device = params.device if params is not None else torch.device("cpu")
        on_cuda = self.device.type == "cuda"
        if cuda_graph and not on_cuda:
            raise ValueError(f"cuda_graph=True requires a CUDA device, but the model is on {self.device}")

        self.shape = _image_shape(model, shape)
        self.num_classes, self.classes, self.guidance = _classes_and_guidance(model, classes, guidance)
        self.guided = self.classes is not None and self.guidance not in (None, 0, 1)
        self.tables = self.solver.tables(self.device)
        self.batch_size = max(1, batch_size // 2) if self.guided else batch_size  # images per chain
        self.dtype = options.PRECISIONS[precision]
        self.cuda_graph = on_cuda if cuda_graph is None else cuda_graph
        self.progress = progress
        self.distributed = validate.flag("distributed", distributed)
        self.module = model if isinstance(model, torch.nn.Module) else None
        if (on_cuda if channels_last is None else channels_last) and self.module is not None:
            model = model.to(memory_format=torch.channels_last)
        if self.device.type in COMPILE_BY_DEFAULT if compile is None else compile:
            model = torch.compile(model)
        self.model = model
        self._graphs: dict[tuple, tuple] = {}  # by `_signature`

    @property
    def label(self) -> str:
        """The chain, and the classes and guidance asked for: "dpmpp_2m 10 steps (linspace), classes
        balanced, guidance 2"."""
        if self.classes is None:
            return self.solver.label
        which = self.classes if isinstance(self.classes, (int, str)) else "per image"
        return f"{self.solver.label}, classes {which}, guidance {1 if self.guidance is None else self.guidance:g}"

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0, start: int = 0, model_kwargs: dict | None = None) -> torch.Tensor:
        """Images ``start`` … ``start`` + n − 1 of ``seed``: float32 [n, C, H, W] on the CPU, in
        [−1, 1] when the diffusion clips x̂₀. ``model_kwargs``: the conditioning of the n images
        (tensors [n, ...] on any device, sliced and moved with each batch; `fastddpm.conditioning`).
        Under `torch.distributed` every rank returns them all."""
        validate.integer("n", n, 1)
        validate.integer("seed", seed, 0, 2**64)
        validate.integer("start", start, 0)
        model_kwargs = conditioning.check(model_kwargs, n)
        if self.classes is not None and self.guidance != 0:  # w = 0: the unconditional branch alone
            if "y" in model_kwargs:
                raise ValueError("give the labels as classes or as model_kwargs['y'], not both")
            model_kwargs = {**model_kwargs, "y": conditioning.class_labels(self.classes, self.num_classes, start, n)}
        rank, world = (dist.get_rank(), dist.get_world_size()) if self.distributed and dist.is_initialized() else (0, 1)
        per_rank = -(-n // world)
        first, stop = min(rank * per_rank, n), min((rank + 1) * per_rank, n)
        images = torch.empty(stop - first, *self.shape)
        training = self.module is not None and self.module.training
        if self.module is not None:
            self.module.eval()  # dropout off: an image is a function of its noise alone
        try:
            with progress_bar(total=len(images), unit="img", desc="sampling", disable=not self.progress or rank != 0) as bar:
                for lo in range(0, len(images), self.batch_size):
                    hi = min(lo + self.batch_size, len(images))
                    kwargs = conditioning.select(model_kwargs, first + lo, first + hi, self.device)
                    images[lo:hi] = self._batch(seed, start + first + lo, hi - lo, kwargs)
                    bar.update(hi - lo)
        finally:
            if training:
                self.module.train()
        return images if world == 1 else _all_gather(images, per_rank, n, self.device)

    def _batch(self, seed: int, base: int, size: int, kwargs: dict) -> torch.Tensor:
        """Images base … base + size − 1 of ``seed`` with their conditioning ``kwargs``, by the whole chain."""
        if self.guided:
            kwargs = conditioning.guided(kwargs, self.num_classes)
        samples = base + torch.arange(size, device=self.device)
        prior = rng.normal(seed, samples, self.solver.diffusion.num_timesteps, rng.STREAM_PRIOR, self.shape)
        key = rng.noise_key(seed, base, 0, self.device)
        positions = [self.solver.position(i) for i in range(self.solver.num_steps)]
        if not self.cuda_graph:
            x, history = prior, prior.new_zeros(self.solver.history_slots, *prior.shape)
            index = torch.empty(size, dtype=torch.int64, device=self.device)
            for position in positions:
                index.fill_(position)
                self._step(x, history, index, key, kwargs)
            return x.cpu()
        with torch.cuda.device(self.device):  # graphs capture and replay on the current device
            signature = _signature(size, kwargs)
            graph, x, history, index, static_key, static_kwargs = self._graphs.get(signature) or \
                self._capture(signature, size, kwargs)
            x.copy_(prior)
            history.zero_()
            static_key.copy_(key)
            for name, value in static_kwargs.items():
                if isinstance(value, torch.Tensor):
                    value.copy_(kwargs[name])
            for position in positions:
                index.fill_(position)
                graph.replay()
            return x.cpu()

    def _step(self, x: torch.Tensor, history: torch.Tensor, index: torch.Tensor, key: torch.Tensor,
              kwargs: dict) -> None:
        """The chain's step at position ``index`` [B], in place: the U-Net (autocast when ``precision``
        asks) with the batch's conditioning (guided: on [x; x], both branches), then the solver's fused
        update of x (and its history)."""
        x_in, t = x, self.tables.model_t.index_select(0, index)
        if self.guided:
            x_in, t = torch.cat([x, x]), torch.cat([t, t])
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None, cache_enabled=False):
            out = self.model(x_in, t, **kwargs)
        self.solver.update(FUSED, x, out, index, self.tables.t.index_select(0, index), self.tables, history, None, key,
                           self.guidance if self.guided else None)

    def _capture(self, signature: tuple, size: int, kwargs: dict):
        """A CUDA graph of one step at batch ``size`` with conditioning shaped as ``kwargs``, updating
        its static x and history in place from its position index, key and conditioning."""
        x = torch.zeros(size, *self.shape, device=self.device)
        history = x.new_zeros(self.solver.history_slots, *x.shape)
        index = torch.zeros(size, dtype=torch.int64, device=self.device)
        key = rng.noise_key(0, 0, 0, self.device)
        kwargs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        side = torch.cuda.Stream(self.device)  # warm up (compile, autotune, allocate) off the capture
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self._step(x, history, index, key, kwargs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step(x, history, index, key, kwargs)
        self._graphs[signature] = graph, x, history, index, key, kwargs
        return self._graphs[signature]


def sample(model: Callable, diffusion: GaussianDiffusion, n: int, seed: int = 0, model_kwargs: dict | None = None,
           **options) -> torch.Tensor:
    """Images 0 … n − 1 of ``seed``: `Sampler`(model, diffusion, **options).sample(n, seed, model_kwargs=...)."""
    return Sampler(model, diffusion, **options).sample(n, seed, model_kwargs=model_kwargs)


def _all_gather(shard: torch.Tensor, per_rank: int, n: int, device: torch.device) -> torch.Tensor:
    """Every rank's contiguous block of images, in rank order: [n, ...] on the CPU."""
    if "cpu:" not in dist.get_backend_config():  # e.g. NCCL alone: gather on the device
        shard = shard.to(device)
    padded = shard.new_zeros(per_rank, *shard.shape[1:])
    padded[: len(shard)] = shard
    return distributed.gather(padded, dist.get_world_size())[:n].cpu()


def _signature(size: int, kwargs: dict) -> tuple:
    """What a captured step is specific to: the batch size and the conditioning's shapes (its flags'
    values); (size,) without conditioning."""
    return (size, *((k, tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else (k, repr(v))
                    for k, v in sorted(kwargs.items())))


def _classes_and_guidance(model, classes, guidance) -> tuple[int, object, float | None]:
    """(the model's number of classes, the checked classes, the checked guidance)."""
    config = getattr(model, "config", None)
    num_classes = config.num_classes if isinstance(config, UNetConfig) else 0
    validate.number("guidance", guidance, low=0, optional=True)
    if classes is None:
        if guidance not in (None, 0):
            raise ValueError(f"guidance {guidance} needs classes: it pushes the conditional prediction away from "
                             "the unconditional one")
        return num_classes, None, guidance
    if not num_classes:
        raise ValueError("classes need a class-conditional model (a fastddpm U-Net with UNetConfig.num_classes > 0, "
                         "trained with --class-cond); this one has none")
    return num_classes, conditioning.check_classes(classes, num_classes), guidance


def _image_shape(model, shape: Sequence[int] | None) -> tuple[int, ...]:
    if shape is None:
        config = getattr(model, "config", None)
        if not isinstance(config, UNetConfig):
            raise ValueError("shape=(C, H, W) is required for a model without a UNetConfig as model.config")
        return config.in_channels, config.resolution, config.resolution
    shape = tuple(shape)
    if len(shape) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"shape must be (C, H, W) of positive ints, got {shape!r}")
    return shape
