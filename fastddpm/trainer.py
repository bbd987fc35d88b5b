"""Training (Ho et al. 2020, Algorithm 1) as a `Trainer`: one GPU, one CPU, or many processes
under torchrun.

Each step takes the next global batch of a seeded per-epoch permutation, timesteps from the
timestep sampler and ε from the noise contract (regenerated inside the fused loss, never
stored), then one Adam step with linear warm-up and gradient-norm clipping, and an EMA
update of the weights (what gets sampled).

Every random choice is a pure function of (seed, step): the permutation of epoch e, the
step's t and flips (a generator seeded from (seed, step)), ε (the noise contract at (seed,
global sample index, step)) and dropout (the global RNG reseeded from (seed, step, rank)). So
there is no RNG state to save: a checkpoint holds the weights, the EMA, the optimizer's
moments, the loss scale, the timestep sampler's statistics and the step, and resuming from
it continues bit for bit.

Under torchrun (``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel (NCCL on
CUDA, Gloo on the CPU); ``batch_size`` is the global batch and rank r trains on the
contiguous slice r of it, with ε at the same global sample indices, so G processes compute
what one process computes on the whole batch (dropout masks aside). Every rank updates its
EMA from identical weights; rank 0 logs and writes checkpoints.

The loop syncs with the host only when logging, sampling or checkpointing: the loss's
finiteness is accumulated on the device and checked then; a NaN/Inf stops training with an
error and leaves the checkpoints as they were, and weights that became NaN/Inf are never saved.
SIGINT/SIGTERM save a checkpoint at the next step (under torchrun, at the next log step, when the
ranks agree) and return, naming the signal.

A run directory belongs to one run: a new run refuses a directory holding another's files, and
``resume`` continues from the newest checkpoint that verifies (`run_config` rebuilds the run's
own config from it), after deleting the temporaries of a save that was killed and the log rows
past the checkpoint's step.
"""

from __future__ import annotations

import copy
import csv
import json
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch

from . import conditioning, distributed, options, rng
from .atomic import atomic_path, remove_stale
from .checkpoint import (
    CheckpointError,
    checkpoint_path,
    latest_checkpoint,
    load_weights,
    newest_good_checkpoint,
    nonfinite,
    prune_checkpoints,
    run_checkpoints,
    save_checkpoint,
    weights,
)
from .config import TrainConfig, from_dict
from .datasets import load_dataset, load_heldout
from .diffusion import GaussianDiffusion
from .images import save_grid
from .loader import BatchLoader
from .progress import bar as progress_bar
from .sampler import Sampler
from .schedule import NoiseSchedule
from .sizing import auto_config, preset_for_data
from .timesteps import LossAwareSampler, sampler_by_name
from .unet import UNet

# Fields a resumed run must share with the checkpoint's (the rest — steps, logging, device,
# precision, compile — may change between sessions).
RESUME_FIELDS = ("model", "data", "image_size", "background", "channels", "schedule", "timesteps", "prediction",
                 "variance", "loss", "timestep_sampler", "batch_size", "lr", "warmup", "ema_decay", "dropout", "hflip",
                 "seed", "class_cond", "p_uncond")
# Fields that describe the machine, not the run: a resumed run takes them afresh (`run_config`).
MACHINE_FIELDS = ("device", "compile", "channels_last", "tf32")
# What a run writes into its directory (besides its checkpoints).
RUN_FILES = ("log.csv", "metrics.json", "samples.png", "samples", "tensorboard")


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN/Inf loss, a checkpoint that does not fit the run)."""


def run_config(out: str | Path, **overrides) -> TrainConfig:
    """The config the run in ``out`` was started with (its newest good checkpoint's), with
    ``overrides``; the machine's fields (device, compile, ...) start from their defaults again."""
    saved = newest_good_checkpoint(_existing_run(out))[1].get("train")
    if not saved:
        raise CheckpointError(f"the checkpoints in {out} do not record their training config; pass the "
                              "--config/--preset the run was started with")
    return from_dict({**{k: v for k, v in saved.items() if k not in MACHINE_FIELDS}, **overrides})


def _existing_run(out: str | Path) -> Path:
    """``out`` if it holds a run's checkpoints, else a ValueError saying what is there."""
    out = Path(out)
    if not out.is_dir():
        raise ValueError(f"nothing to resume: {out} does not exist")
    if not run_checkpoints(out):
        found = [name for name in RUN_FILES if (out / name).exists()]
        raise ValueError(f"nothing to resume: {out} holds no checkpoint" + (f" (only {', '.join(found)})" if found else ""))
    return out


def build(config: TrainConfig, shape: tuple[int, int, int], levels: int,
          num_classes: int = 0) -> tuple[UNet, GaussianDiffusion]:
    """The U-Net (sized for data of ``shape`` = (C, H, W), conditioned on ``num_classes`` classes
    when not 0) and the diffusion a config describes."""
    channels, height, width = shape
    if height != width:
        raise ValueError(f"images must be square, got {height}x{width} (an image folder is made square with "
                         f"--image-size; crop or pad an array)")
    extra = {"num_classes": num_classes, **({} if config.dropout is None else {"dropout": config.dropout})}
    learned = config.variance == "learned_range"
    if config.model == "auto":
        model = UNet(auto_config(channels, height, config.model_budget, learned_variance=learned, **extra))
    else:
        model = UNet(preset_for_data(config.model, channels, height, learned_variance=learned, **extra))
    diffusion = GaussianDiffusion(NoiseSchedule.by_name(config.schedule, config.timesteps),
                                  prediction=config.prediction, variance=config.variance, loss=config.loss,
                                  levels=levels)
    return model, diffusion


def heldout_nll(model, diffusion: GaussianDiffusion, images: torch.Tensor, batch_size: int, seed: int) -> float:
    """Mean negative log-likelihood bound in bits/dim over ``images``."""
    generator = torch.Generator(images.device).manual_seed(seed)
    totals = [diffusion.nll(model, images[start : start + batch_size], generator=generator)["total_bpd"]
              for start in range(0, len(images), batch_size)]
    return torch.cat(totals).mean().item()


def use_tf32(enabled: bool) -> None:
    """TF32 (10-bit mantissa products, float32 sums) for float32 matmuls and cuDNN convolutions on
    CUDA, as most trainers run: on Ampere and later several times the float32 throughput."""
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled


def derived_seed(seed: int, *coordinates: int) -> int:
    """A 63-bit seed that is a pure function of (seed, coordinates): SplitMix64 chained."""
    x = seed & (2**64 - 1)
    for c in coordinates:
        x = (x ^ (c & (2**64 - 1))) + 0x9E3779B97F4A7C15 & (2**64 - 1)
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & (2**64 - 1)
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & (2**64 - 1)
        x ^= x >> 31
    return x >> 1


class Trainer:
    """Trains ``config`` into the run directory ``out`` (checkpoints, log.csv, sample grids,
    metrics.json). ``resume`` continues from the newest checkpoint there."""

    def __init__(self, config: TrainConfig, out: str | Path, resume: bool = False):
        self.config, self.out = config, Path(out)
        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.rank, self.world, self.device = distributed.init(device)
        if config.batch_size % self.world:
            raise ValueError(f"batch_size {config.batch_size} is not divisible by the {self.world} processes")
        self.local_batch = config.batch_size // self.world
        if resume:
            _existing_run(self.out)
        elif self.out.exists():
            found = [p.name for p in run_checkpoints(self.out)[-1:]] + [n for n in RUN_FILES if (self.out / n).exists()]
            if found:
                raise ValueError(f"{self.out} already holds a run ({', '.join(found)}); pass --resume to continue it "
                                 "or choose another --out")

        dataset = load_dataset(config.data, config.image_size, background=config.background, channels=config.channels)
        self.dataset_info = {"name": dataset.name, "shape": list(dataset.shape), "levels": dataset.levels}
        self.classes = None
        if config.class_cond:
            if dataset.labels is None:
                raise ValueError(f"class_cond needs class labels and {dataset.name} has none (labelled data: the digits, "
                                 "CIFAR-10, a .npz with a 'labels' array, a folder with one subfolder a class)")
            self.classes = self.dataset_info["classes"] = dataset.classes
        self.heldout = load_heldout(config.data, config.image_size)
        # held on the device as float32 when that fits data_memory_mb, else streamed from the uint8 codes
        streamed = len(dataset) * dataset.codes[0].numel() * 4 > config.data_memory_mb * 2**20
        self.data = None if streamed else dataset.tensor(self.device)
        self.labels = None if self.classes is None else dataset.labels.to("cpu" if streamed else self.device)
        self.loader = BatchLoader(dataset, self.device, self._indices) if streamed else None
        self.images = len(dataset)
        self.batches_per_epoch = self.images // config.batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"batch_size {config.batch_size} exceeds the {self.images} training images")

        torch.manual_seed(config.seed)  # the initial weights
        model, self.diffusion = build(config, dataset.shape, dataset.levels, len(self.classes or ()))
        # the step's tables, built before the step is compiled: built inside it, they would be in its
        # first graph (with a host-to-device copy) and their cache's change would recompile it
        self.diffusion.schedule.coefficients(self.device, torch.float32)
        cuda = self.device.type == "cuda"
        self.config = config = replace(config, tf32=cuda if config.tf32 is None else config.tf32)
        if cuda:
            use_tf32(config.tf32)
        memory_format = torch.channels_last if (cuda if config.channels_last is None else config.channels_last) \
            else torch.preserve_format
        self.model = model.to(self.device, memory_format=memory_format).train()
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.net = self.model
        if self.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=[self.device] if cuda else None)
        self.params = list(self.model.parameters())
        self.ema_params = list(self.ema.parameters())
        self.optimizer = torch.optim.Adam(self.params, lr=config.lr, fused=True)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        self.timestep_sampler = sampler_by_name(config.timestep_sampler, self.diffusion.num_timesteps, self.device)
        self.key = rng.noise_key(config.seed, self.rank * self.local_batch, 0, self.device)
        compiled = cuda if config.compile is None else config.compile
        self.losses = torch.compile(self._losses) if compiled else self._losses
        self.step, self._epoch, self._order = 0, -1, None
        self.stopped_by: int | None = None  # the signal that stopped the run
        if resume:
            self._resume()

    # ---- one step ---------------------------------------------------------------------------

    def _losses(self, x0, t, weights, key, y):
        dtype = options.PRECISIONS[self.config.precision]
        autocast = torch.autocast(self.device.type, dtype=dtype) if dtype is not None else nullcontext()
        with autocast:
            terms = self.diffusion.training_losses(self.net, x0, t, weights=weights, key=key,
                                                   model_kwargs=None if y is None else {"y": y})
        return terms["loss"], terms["per_sample"]

    def _batch(self, generator: torch.Generator):
        """This rank's slice of the step's global batch: (x0, t, weights, labels or None, t of all ranks).
        A label is dropped to the null class with probability p_uncond."""
        c, B = self.config, self.config.batch_size
        t, w = self.timestep_sampler.sample(B, generator=generator)
        local = slice(self.rank * self.local_batch, (self.rank + 1) * self.local_batch)
        indices = self._indices(self.step)
        x0 = self.data[indices] if self.loader is None else self.loader(self.step)
        if c.hflip:
            flip = torch.rand(B, generator=generator, device=self.device)[local] < 0.5
            x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(3), x0)
        y = None
        if self.labels is not None:
            drop = torch.rand(B, generator=generator, device=self.device)[local] < c.p_uncond
            y = torch.where(drop, len(self.classes), self.labels[indices].to(self.device))
        return x0, t[local], w[local], y, t

    def _indices(self, step: int) -> torch.Tensor:
        """This rank's images in the global batch of ``step``: its slice of batch k of epoch e's seeded
        permutation (on the device; on the host, fetched once an epoch, when the data is streamed)."""
        epoch, k = divmod(step, self.batches_per_epoch)
        if epoch != self._epoch:
            order_generator = torch.Generator(self.device).manual_seed(derived_seed(self.config.seed, 1, epoch))
            order = torch.randperm(self.images, generator=order_generator, device=self.device)
            self._order = order if self.loader is None else order.cpu()
            self._epoch = epoch
        start = k * self.config.batch_size + self.rank * self.local_batch
        return self._order[start : start + self.local_batch]

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step; returns (loss, gradient norm) as device tensors (no host sync)."""
        c = self.config
        generator = torch.Generator(self.device).manual_seed(derived_seed(c.seed, 0, self.step))
        x0, t, w, y, t_all = self._batch(generator)
        torch.manual_seed(derived_seed(c.seed, 2, self.step, self.rank))  # dropout
        self.key[2].fill_(self.step)  # a scalar fill: no host-to-device copy to wait for
        for group in self.optimizer.param_groups:
            group["lr"] = c.lr * min(1.0, (self.step + 1) / max(c.warmup, 1))
        loss, per_sample = self.losses(x0, t, w, self.key, y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, c.grad_clip if c.grad_clip > 0 else float("inf"))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if isinstance(self.timestep_sampler, LossAwareSampler):
            self.timestep_sampler.update(t_all, distributed.gather(per_sample.detach().float(), self.world))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema_params, self.params, 1.0 - c.ema_decay)
        self.step += 1
        return loss.detach(), grad_norm

    # ---- the loop ------------------------------------------------------------------------------

    def fit(self) -> dict:
        """Train to ``config.steps``; returns the metrics also written to metrics.json.

        Stops early, with a checkpoint, on SIGINT/SIGTERM (``metrics["interrupted"]``)."""
        c = self.config
        main = self.rank == 0
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
        log = _CsvLog(self.out / "log.csv") if main else None
        board = _tensorboard(self.out) if main else None
        bad = torch.zeros((), dtype=torch.bool, device=self.device)
        bar = progress_bar(total=c.steps, initial=self.step, desc="training", unit="step", disable=not main)
        started, window = time.perf_counter(), (time.perf_counter(), self.step)
        interrupted = False
        with _stop_on_signals(self):
            while self.step < c.steps:
                loss, grad_norm = self.train_step()
                bad |= ~torch.isfinite(loss)
                bar.update(1)
                logging = self.step % c.log_every == 0 or self.step == c.steps
                if logging:
                    self._check_finite(bad)
                    seconds = time.perf_counter() - window[0]
                    row = {"step": self.step, "loss": distributed.mean(loss, self.world), "grad_norm": grad_norm.item(),
                           "lr": self.optimizer.param_groups[0]["lr"],
                           "images_per_s": (self.step - window[1]) * c.batch_size / max(seconds, 1e-9),
                           "elapsed_s": time.perf_counter() - started}
                    window = (time.perf_counter(), self.step)
                    if main:
                        bar.set_postfix(loss=f"{row['loss']:.4f}", grad=f"{row['grad_norm']:.2f}",
                                        img_s=f"{row['images_per_s']:.0f}")
                        log.write(row)
                        if board is not None:
                            for name in ("loss", "grad_norm", "lr", "images_per_s"):
                                board.add_scalar(f"train/{name}", row[name], self.step)
                if c.checkpoint_every and self.step % c.checkpoint_every == 0 and self.step < c.steps:
                    self._check_finite(bad)
                    self.save()
                if c.sample_every and self.step % c.sample_every == 0 and self.step < c.steps and main:
                    self.sample_grid(self.out / "samples" / f"step-{self.step:08d}.png")
                if self._should_stop(logging):
                    interrupted = True
                    break
        bar.close()
        self._check_finite(bad)
        path = self.save()
        metrics = {"steps": self.step, "train_seconds": round(time.perf_counter() - started, 1),
                   "checkpoint": str(path)}
        if interrupted:
            return {**metrics, "interrupted": signal.Signals(self.stopped_by or signal.SIGTERM).name}
        if main:
            metrics["samples"] = str(self.sample_grid(self.out / "samples.png"))
            if self.heldout is not None and c.nll_images != 0:
                images = self.heldout.tensor(self.device)[: c.nll_images]
                metrics["heldout_images"] = len(images)
                metrics["heldout_nll_bpd"] = heldout_nll(self.ema, self.diffusion, images, 512, c.seed)
            if self.dataset_info["name"].startswith("digits/") and c.quality_images:
                metrics["quality"] = self.sample_quality(c.quality_images)
            with atomic_path(self.out / "metrics.json") as tmp:
                tmp.write_text(json.dumps(metrics, indent=2) + "\n")
            if board is not None:
                board.close()
        return metrics

    def sample_grid(self, path: Path) -> Path:
        """A grid of ``config.samples`` EMA samples (the same noise at every step: seed = config.seed);
        of a class-conditional run, one row per class."""
        if self.classes is None:
            return save_grid(self._samples(0, self.config.samples), path, scale=self.config.grid_scale)
        per_class = max(1, self.config.samples // len(self.classes))
        y = torch.arange(len(self.classes)).repeat_interleave(per_class)
        return save_grid(self._samples(0, len(y), y), path, nrow=per_class, scale=self.config.grid_scale)

    def sample_quality(self, n: int) -> dict:
        """`fastddpm.metrics.digit_quality` of ``n`` EMA samples (images 0 … n − 1 of the run's seed;
        of a class-conditional run, every class equally often: image k is class k mod K)."""
        from .metrics import digit_quality

        sampler = self._sampler(None if self.classes is None else conditioning.BALANCED)
        images = sampler.sample(n, seed=self.config.seed)
        return {**digit_quality(images.clamp(-1, 1)), "solver": self.config.sample_solver,
                "steps": self.config.sample_steps, "chain": sampler.label}

    def _samples(self, start: int, n: int, classes=None) -> torch.Tensor:
        """EMA images start … start + n − 1 of the run's seed, of ``classes`` (`_sampler`)."""
        return self._sampler(classes).sample(n, seed=self.config.seed, start=start)

    def _sampler(self, classes=None) -> Sampler:
        """The config's chain on the EMA weights; with ``classes`` (a `Sampler`'s), classifier-free
        guidance at `conditioning.DEFAULT_GUIDANCE`, as `fastddpm sample` draws them."""
        c = self.config
        guided = {} if classes is None else {"classes": classes, "guidance": conditioning.DEFAULT_GUIDANCE}
        return Sampler(self.ema, self.diffusion, solver=c.sample_solver, steps=c.sample_steps, batch_size=500,
                       compile=False, cuda_graph=False, channels_last=False, progress=False, distributed=False,
                       **guided)

    def _check_finite(self, bad: torch.Tensor) -> None:
        if distributed.any_rank(bad, self.world, self.device):
            last = latest_checkpoint(self.out)
            raise TrainingError(f"the loss became NaN/Inf by step {self.step}; stopped without saving "
                                f"(last good checkpoint: {last if last is not None else 'none'})")

    def _should_stop(self, logging: bool) -> bool:
        stop = self.stopped_by is not None
        if self.world == 1:
            return stop
        return logging and distributed.any_rank(stop, self.world, self.device)

    # ---- checkpoints ---------------------------------------------------------------------------

    def save(self) -> Path:
        """Write checkpoint-<step> (rank 0) and keep the newest ``keep_checkpoints``; weights that
        became NaN/Inf (the loss can still be finite at that step) stop training unsaved instead."""
        path = checkpoint_path(self.out, self.step)
        bad = nonfinite({**{f"model.{k}": v for k, v in self.model.state_dict().items()},
                         **{f"ema.{k}": v for k, v in self.ema.state_dict().items()}})
        if bad:  # the same on every rank: their weights are equal
            last = latest_checkpoint(self.out)
            raise TrainingError(f"the weights became NaN/Inf by step {self.step} ({len(bad)} tensors, {bad[0]}, ...); "
                                f"stopped without saving (last good checkpoint: {last if last is not None else 'none'})")
        if self.rank == 0:
            state, groups = {}, []
            optimizer = self.optimizer.state_dict()
            for index, values in optimizer["state"].items():
                state.update({f"optim.{index}.{name}": v for name, v in values.items()})
            for group in optimizer["param_groups"]:
                groups.append({k: list(v) if isinstance(v, tuple) else v for k, v in group.items()})
            if isinstance(self.timestep_sampler, LossAwareSampler):
                state["sampler.second_moment"] = self.timestep_sampler.second_moment
                state["sampler.counts"] = self.timestep_sampler.counts
            save_checkpoint(path, self.model, self.diffusion, ema=self.ema, train_state=state, step=self.step,
                            data=self.dataset_info, train=self.config.to_dict(),
                            optimizer={"param_groups": groups}, scaler=self.scaler.state_dict())
            prune_checkpoints(self.out, self.config.keep_checkpoints)
        distributed.barrier(self.world)
        return path

    def _resume(self) -> None:
        """Continue from the newest checkpoint that verifies: name the ones skipped, delete a killed
        save's temporaries and the log rows past the checkpoint."""
        path, header, tensors, skipped = newest_good_checkpoint(self.out)
        if self.rank == 0:
            for reason in skipped:
                print(f"skipped: {reason}", file=sys.stderr)
            remove_stale(self.out, "checkpoint-*")
        saved = header.get("train", {})
        # a field newer than the checkpoint holds its default there
        changed = [f for f in RESUME_FIELDS if saved.get(f, getattr(TrainConfig, f)) != getattr(self.config, f)]
        if changed:
            raise TrainingError(f"{path} was trained with other settings ({', '.join(changed)}); resume with the "
                                "same config or choose another --out")
        load_weights(self.model, weights(tensors, "model"), path)
        load_weights(self.ema, weights(tensors, "ema"), path)
        train_state = weights(tensors, "train")
        state: dict = {}
        for name, value in train_state.items():
            if name.startswith("optim."):
                _, index, field = name.split(".", 2)
                state.setdefault(int(index), {})[field] = value
        try:
            self.optimizer.load_state_dict({"state": state, "param_groups": header["optimizer"]["param_groups"]})
        except (KeyError, ValueError) as err:
            raise CheckpointError(f"cannot restore the optimizer from {path}: {err}") from None
        if header.get("scaler"):
            self.scaler.load_state_dict(header["scaler"])
        if isinstance(self.timestep_sampler, LossAwareSampler):
            self.timestep_sampler.second_moment.copy_(train_state["sampler.second_moment"])
            self.timestep_sampler.counts.copy_(train_state["sampler.counts"])
        self.step = int(header["step"])
        if self.rank == 0:
            _CsvLog(self.out / "log.csv").truncate(self.step)


# ---- helpers ---------------------------------------------------------------------------------


class _CsvLog:
    """log.csv: one row per logged step, appended (a resumed run continues the file)."""

    FIELDS = ("step", "loss", "grad_norm", "lr", "images_per_s", "elapsed_s")

    def __init__(self, path: Path):
        self.path = path
        if not path.exists():
            with open(path, "w", newline="") as f:
                csv.writer(f).writerow(self.FIELDS)

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([row[k] for k in self.FIELDS])

    def truncate(self, step: int) -> None:
        """Drop the rows past ``step``: a run killed after its last checkpoint logged steps it redoes."""
        with open(self.path, newline="") as f:
            rows = list(csv.reader(f))
        kept = rows[:1] + [r for r in rows[1:] if r and int(r[0]) <= step]
        if len(kept) < len(rows):
            with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
                csv.writer(f).writerows(kept)


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(out / "tensorboard"))


class _stop_on_signals:
    """While active, SIGINT and SIGTERM ask the trainer to stop at the next step (main thread only)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, trainer: Trainer):
        self.trainer, self.previous = trainer, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.trainer.stopped_by = signum

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
