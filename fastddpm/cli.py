"""The `fastddpm` command: train, sample, nll, eval, info.

Errors a user can cause (bad arguments, paths, data, checkpoints, a diverged run) print one
line to stderr and exit with status 2, before any work where they can be known before it; no
traceback. A run stopped by a signal exits with 128 + its number (SIGINT 130, SIGTERM 143), a
`train` after saving a checkpoint to resume from. Each command writes only under the output
path it is given (train: --out; sample: --out; nll and info write nothing).
Under ``torchrun --nproc_per_node=G -m fastddpm train|sample ...`` the work is spread over G
processes and rank 0 writes the results.
"""

from __future__ import annotations

import argparse
import platform
import signal
import sys
import time
from pathlib import Path

import torch

from . import options, validate
from .checkpoint import CheckpointError
from .conditioning import DEFAULT_GUIDANCE, class_labels
from .config import TrainConfig, load_config, preset, preset_names
from .datasets import DatasetError
from .sizing import describe
from .unet import PRESETS


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless it has none or its help already says it in words."""

    def _get_help_string(self, action):
        said = action.default is None or "(default" in (action.help or "")
        return action.help if said else super()._get_help_string(action)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _device(text: str) -> str:
    try:
        return validate.device("device", text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _solver(text: str) -> str:
    from .solvers import check_solver

    try:
        return check_solver(text.replace("-", "_"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).replace("_", "-")) from None


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _add_solver(p) -> None:
    chain = TrainConfig()
    p.add_argument("--solver", type=_solver, default=None,
                   help="ddpm (ancestral), ddim, dpmpp-2m (DPM-Solver++) or dpmpp-2m-sde (its SDE variant) (default: "
                        f"{chain.sample_solver.replace('_', '-')} with --steps {chain.sample_steps}, as the trainer's "
                        "grids; ddim with --eta)")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="ddpm/ddim: respace to this many steps (default: all); dpmpp: model evaluations (default: 20)")
    p.add_argument("--eta", type=float, default=None, help="DDIM's eta (0: deterministic; implies --solver ddim)")
    p.add_argument("--order", type=int, default=None, help="dpmpp: the multistep order, 1-3 (default: 2)")
    p.add_argument("--spacing", default=None,
                   help="dpmpp: timestep spacing, linspace, leading or trailing (default: linspace)")
    p.add_argument("--karras", action=argparse.BooleanOptionalAction, default=None,
                   help="dpmpp: Karras et al.'s sigmas instead of --spacing (default: off)")


def _sampler(args, model, diffusion, **options):
    """The chain --solver names, or without --solver and --eta the trainer's (`TrainConfig`'s
    sample_solver and sample_steps)."""
    from .sampler import Sampler

    solver, steps = args.solver, args.steps
    if solver is None and args.eta is None:
        default = TrainConfig()
        solver, steps = default.sample_solver, default.sample_steps if steps is None else steps
    return Sampler(model, diffusion, solver=solver, steps=steps, eta=args.eta, order=args.order, spacing=args.spacing,
                   karras=args.karras, batch_size=args.batch_size, precision=args.precision or "fp32",
                   compile=args.compile, **options)


def _add_common(p, compile_help: str) -> None:
    p.add_argument("--device", type=_device, default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--precision", choices=tuple(options.PRECISIONS), default=None,
                   help="autocast dtype of the U-Net; the chain state and the optimizer stay float32 (default: fp32)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help=f"torch.compile {compile_help} (default: on for CUDA, off on the CPU)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: 0)")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model (default: the bundled digits, a few minutes on a CPU)",
                       formatter_class=_Help)
    p.add_argument("--preset", default=None, choices=preset_names(), help="training recipe (default: digits)")
    p.add_argument("--config", type=Path, default=None,
                   help="JSON or YAML file of TrainConfig fields; it starts from its own \"preset\", else --preset")
    p.add_argument("--model", default=None, choices=("auto", *PRESETS),
                   help="the U-Net: auto (sized to the data and --model-budget) or a preset (default: the recipe's)")
    p.add_argument("--model-budget", type=float, default=None,
                   help="auto model: forward MFLOPs per pixel; 1 is ch 32, 12 DDPM's CIFAR-10 width (default: 1)")
    p.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<preset>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest good checkpoint, with the config it was started "
                        "with (flags given here override it; --config/--preset replace it)")
    p.add_argument("--data", default=None, help="image folder, CIFAR-10 batches folder, or .npz/.npy (default: digits)")
    p.add_argument("--image-size", type=_positive_int, default=None, help="resize an image folder to this size")
    p.add_argument("--background", default=None,
                   help="an image folder's transparent pixels are composited on this: white, black or #rrggbb "
                        "(default: white)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="an image folder's channels (default: 1 when every image is grayscale, else 3)")
    p.add_argument("--class-cond", action=argparse.BooleanOptionalAction, default=None,
                   help="condition on the data's class labels: the digits, CIFAR-10, a .npz's 'labels', or a folder's "
                        "subfolders (default: off)")
    p.add_argument("--steps", type=_positive_int, default=None, help="training steps (default: the preset's)")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="global batch size, split over torchrun processes (default: the preset's)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the preset's)")
    _add_common(p, "the training step")


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="draw samples from a checkpoint or a diffusers folder",
                       formatter_class=_Help)
    p.add_argument("--checkpoint", type=Path, default=None, help="a checkpoint file, or a run directory (its newest)")
    p.add_argument("--from-diffusers", type=Path, default=None, metavar="PATH",
                   help="instead of --checkpoint: a local diffusers folder (a DDPMPipeline, or a UNet2DModel with an "
                        "optional scheduler_config.json) such as a download of google/ddpm-cifar10-32; never fetched from the "
                        "hub; needs fastddpm[diffusers]")
    # --num-images / --first-image: torchrun's own parser claims --n and --start (prefixes of its options)
    p.add_argument("--n", "--num-images", dest="n", type=_positive_int, default=64, help="number of images")
    p.add_argument("--out", type=Path, default=Path("samples.png"),
                   help="a .png grid (enlarged by the run's grid scale), a .npz (uint8 N×H×W×C, as FID tools read), "
                        "or a directory of PNGs at 1:1 named by image index, which shards of one run (--start) share")
    p.add_argument("--start", "--first-image", dest="start", type=int, default=0,
                   help="index of the first image (image k of a seed never changes)")
    classes = p.add_mutually_exclusive_group()
    classes.add_argument("--class", dest="class_", default=None, metavar="C",
                         help="a class-conditional run: draw class C (its name or index) (default: no class)")
    classes.add_argument("--classes", choices=("balanced",), default=None,
                         help="a class-conditional run: image k is class k mod K; a .png grid has a row a class")
    p.add_argument("--guidance", type=float, default=None, metavar="W",
                   help="classifier-free guidance with --class/--classes: eps_u + W (eps_c - eps_u); 0 draws "
                        "unconditional images, 1 the conditional model alone (default: "
                        f"{DEFAULT_GUIDANCE:g}, the README's measured choice for the digits)")
    _add_solver(p)
    p.add_argument("--batch-size", type=_positive_int, default=256,
                   help="the U-Net's batch: images per batch, half as many with --guidance (both branches in one call)")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="replay each step as one CUDA graph (default: on for CUDA)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    _add_common(p, "the U-Net (pays off on long runs: its first compile takes ~30 s on a CPU)")


def _add_nll(sub) -> None:
    p = sub.add_parser("nll", help="the held-out negative log-likelihood bound in bits/dim",
                       formatter_class=_Help)
    p.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint file, or a run directory (its newest)")
    p.add_argument("--data", default=None,
                   help="held-out data; a folder is read on the run's background with the model's channels (default: "
                        "the held-out split of the data the checkpoint was trained on)")
    p.add_argument("--n", type=_positive_int, default=None, help="evaluate the first N images (default: all)")
    p.add_argument("--batch-size", type=_positive_int, default=512, help="images per batch")
    p.add_argument("--seed", type=int, default=0, help="seed of the x_t draws")
    p.add_argument("--device", type=_device, default=None, help="torch device (default: cuda when available)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="sample quality of a digits checkpoint: distance, precision and recall "
                                    "against the training digits, beside the held-out digits' (the floor)", formatter_class=_Help)
    p.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint file, or a run directory (its newest)")
    p.add_argument("--n", "--num-images", dest="n", type=_positive_int, default=1500,
                   help="samples to score; they are also scored in sets of 297, the floor's n (scores compare at equal n)")
    p.add_argument("--batch-size", type=_positive_int, default=500, help="images per batch")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    _add_solver(p)
    _add_common(p, "the U-Net")


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="versions and kernels in use, and a checkpoint's configuration",
                       formatter_class=_Help)
    p.add_argument("--checkpoint", type=Path, default=None, help="also describe this checkpoint")
    p.add_argument("--data", default=None,
                   help="also the data's shape and the auto model `fastddpm train --data` would build for it")
    p.add_argument("--image-size", type=_positive_int, default=None, help="with --data: resize an image folder to this")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastddpm", description="Denoising Diffusion Probabilistic Models, fast.")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_sample, _add_nll, _add_eval, _add_info):
        add(sub)
    return p


def run_train(args) -> int:
    from .trainer import Trainer, run_config

    overrides = {k: v for k, v in (("model", args.model), ("model_budget", args.model_budget),
                                   ("data", args.data), ("image_size", args.image_size),
                                   ("background", args.background), ("channels", args.channels),
                                   ("class_cond", args.class_cond), ("steps", args.steps),
                                   ("batch_size", args.batch_size), ("lr", args.lr), ("seed", args.seed),
                                   ("device", args.device), ("precision", args.precision),
                                   ("compile", args.compile)) if v is not None}
    recipe = args.preset or "digits"
    out = args.out if args.out is not None else Path("runs") / (args.config.stem if args.config else recipe)
    if args.config:
        config = load_config(args.config, args.preset, **overrides)
    elif args.resume and not args.preset:
        config = run_config(out, **overrides)
    else:
        config = preset(recipe, **overrides)
    trainer = Trainer(config, out, resume=args.resume)
    if trainer.rank == 0:
        print(f"model: {config.model}, {describe(trainer.model.config)}", flush=True)
    metrics = trainer.fit()
    if metrics.get("interrupted"):
        signum = signal.Signals[metrics["interrupted"]]
        if trainer.rank == 0:
            print(f"stopped by {signum.name} at step {metrics['steps']}; checkpoint: {metrics['checkpoint']} "
                  f"(continue with: fastddpm train --out {out} --resume)", file=sys.stderr)
        return 128 + signum
    if trainer.rank != 0:
        return 0
    print(f"trained {metrics['steps']} steps in {metrics['train_seconds']:.0f} s")
    print(f"checkpoint: {metrics['checkpoint']}")
    print(f"samples:    {metrics['samples']}")
    if "heldout_nll_bpd" in metrics:
        print(f"held-out NLL: {metrics['heldout_nll_bpd']:.4f} bits/dim ({metrics['heldout_images']} images)")
    if "quality" in metrics:
        q = metrics["quality"]
        at_floor_n = "–" if q["distance_at_floor_n"] is None else f"{q['distance_at_floor_n']:.3f}"
        print(f"sample distance: {q['distance']:.3f} ({q['n']} samples, {q['chain']}; "
              f"in sets of {q['floor_n']}: {at_floor_n}, floor {q['floor']:.3f})")
    return 0


def run_sample(args) -> None:
    from . import distributed
    from .checkpoint import digest, load_checkpoint
    from .images import check_suffix, prepare_output, save_images

    validate.integer("--start", args.start, 0)
    if (args.checkpoint is None) == (args.from_diffusers is None):
        raise ValueError("give exactly one of --checkpoint PATH and --from-diffusers PATH")
    check_suffix(args.out)
    rank, world, device = distributed.init(args.device or _default_device())
    if args.from_diffusers is not None:
        model, diffusion = _load_diffusers(args.from_diffusers, device)
        header = {}
    else:
        model, diffusion, header = load_checkpoint(args.checkpoint, device, use_ema=not args.no_ema)
    names = _class_names(model, header)
    classes = _classes(args, names)
    if classes is None and args.guidance is not None:
        raise ValueError("--guidance needs --class C or --classes balanced (a class-conditional run)")
    guidance = None if classes is None else DEFAULT_GUIDANCE if args.guidance is None else args.guidance
    sampler = _sampler(args, model, diffusion, cuda_graph=args.cuda_graph, classes=classes, guidance=guidance)
    seed = args.seed or 0
    # what makes image k (a directory of PNGs holds one run's, fastddpm.images); rank 0 checks it
    # with the output's folder before any image is drawn, and the ranks stop together
    run = {"model": digest(model), "diffusion": diffusion.config(), "chain": sampler.solver.label, "seed": seed,
           "precision": args.precision or "fp32", "classes": args.classes or args.class_, "guidance": guidance}
    refused = None
    if rank == 0:
        try:
            prepare_output(args.out, run)
        except ValueError as err:
            refused = err
    if distributed.any_rank(refused is not None, world, device):
        raise refused or ValueError(f"rank 0 cannot write to {args.out}")
    started = time.perf_counter()
    images = sampler.sample(args.n, seed=seed, start=args.start)
    seconds = time.perf_counter() - started
    if rank == 0:
        nrow = None
        if args.classes and args.out.suffix.lower() == ".png":  # the grid: a row a class
            order = torch.argsort(class_labels(classes, len(names), args.start, args.n), stable=True)
            images, nrow = images[order], -(-args.n // len(names))
        path = save_images(images, args.out, first=args.start, scale=header.get("train", {}).get("grid_scale", 1),
                           run=run, nrow=nrow)
        print(f"wrote {args.n} samples to {path} ({args.n / seconds:.1f} images/s)")


def _class_names(model, header: dict) -> list[str]:
    """The classes of a class-conditional model (the checkpoint's names, else "0", "1", ...); [] if none."""
    count = getattr(getattr(model, "config", None), "num_classes", 0)
    names = header.get("data", {}).get("classes") or [str(k) for k in range(count)]
    return names[:count]


def _classes(args, names: list[str]):
    """The Sampler's ``classes`` that --class (an index: a name or a number) or --classes
    (balanced) asks for; None for neither."""
    if args.class_ is None and args.classes is None:
        return None
    if not names:
        raise ValueError("--class/--classes need a class-conditional run (fastddpm train --class-cond); this model "
                         "has no classes")
    if args.classes is not None:
        return args.classes
    index = names.index(args.class_) if args.class_ in names else \
        int(args.class_) if args.class_.isdigit() and int(args.class_) < len(names) else None
    if index is None:
        raise ValueError(f"--class {args.class_!r} is not a class of this model: {', '.join(names)} (or 0 to "
                         f"{len(names) - 1})")
    return index


def _load_diffusers(path: Path, device: str):
    try:
        from .interop.diffusers import load_pretrained
    except ImportError as err:
        raise ValueError(str(err)) from None
    return load_pretrained(path, device)


def run_nll(args) -> None:
    from .checkpoint import load_checkpoint
    from .datasets import is_image_folder, load_dataset, load_heldout
    from .trainer import heldout_nll

    device = args.device or _default_device()
    model, diffusion, header = load_checkpoint(args.checkpoint, device, use_ema=not args.no_ema)
    train = header.get("train", {})
    data = args.data if args.data is not None else train.get("data")
    size = train.get("image_size")
    # a folder is read as the run read its own: on its background, with the model's channels
    folder = {"background": train.get("background", "white"), "channels": model.config.in_channels} \
        if is_image_folder(args.data) else {}
    heldout = load_heldout(data, size) if args.data is None else load_dataset(args.data, size, **folder)
    if heldout is None:
        raise ValueError(f"the data {data!r} has no held-out split; pass --data")
    images = heldout.tensor(device)[: args.n]
    shape = tuple(header.get("data", {}).get("shape", images.shape[1:]))
    if tuple(images.shape[1:]) != shape:
        raise ValueError(f"held-out images have shape {tuple(images.shape[1:])}, the model takes {shape}")
    bpd = heldout_nll(model, diffusion, images, args.batch_size, args.seed)
    print(f"held-out NLL: {bpd:.4f} bits/dim ({len(images)} images, {diffusion.num_timesteps} terms)")


def run_eval(args) -> None:
    from . import distributed
    from .checkpoint import load_checkpoint
    from .metrics import digit_quality

    rank, _, device = distributed.init(args.device or _default_device())
    model, diffusion, header = load_checkpoint(args.checkpoint, device, use_ema=not args.no_ema)
    data = header.get("data", {}).get("name", "")
    if not data.startswith("digits/"):
        raise ValueError(f"the built-in quality metric scores samples of the bundled digits; this checkpoint was "
                         f"trained on {data or 'other data'} (for your own images: fastddpm.metrics.fid, the [fid] extra)")
    sampler = _sampler(args, model, diffusion, progress=False)
    started = time.perf_counter()
    images = sampler.sample(args.n, seed=args.seed or 0)
    seconds = time.perf_counter() - started
    if rank == 0:
        q = digit_quality(images.clamp(-1, 1))
        print(f"{args.n} samples ({sampler.solver.label}, {args.n / seconds:.1f} images/s) against the 1500 training digits "
              f"({q['reference']}):")
        columns = (f"all {q['n']}", f"in sets of {q['floor_n']}", f"floor: {q['floor_n']} held-out digits")
        print(f"{'':10}" + "".join(f"{c:>{len(c) + 3}}" for c in columns))
        for name in ("distance", "precision", "recall"):
            row = (q[name], q[f"{name}_at_floor_n"], q["floor" if name == "distance" else f"floor_{name}"])
            print(f"{name:10}" + "".join("–".rjust(len(c) + 3) if v is None else f"{v:{len(c) + 3}.3f}"
                                          for c, v in zip(columns, row)))


def run_info(args) -> None:
    from . import __version__, kernels

    native = "yes" if kernels.native is not None else "no (reference ops)"
    triton = "yes" if kernels.HAS_TRITON else "no"
    print(f"fastddpm {__version__}, torch {torch.__version__}, Python {platform.python_version()}")
    print(f"native CPU kernels: {native}; Triton CUDA kernels: {triton}; "
          f"CUDA: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'not available'}")
    print(f"presets: {', '.join(preset_names())}")
    if args.data is not None:
        from .datasets import load_dataset
        from .sizing import auto_config

        dataset = load_dataset(args.data, args.image_size)
        channels, height, width = dataset.shape
        print(f"data: {dataset.name}, {len(dataset):,} images of {channels}x{height}x{width}, {dataset.levels} levels"
              + (f", {len(dataset.classes)} classes: {', '.join(dataset.classes)}" if dataset.classes else ""))
        if height == width:
            print(f"auto model: {describe(auto_config(channels, height))}")
    if args.checkpoint is not None:
        import json

        from .checkpoint import load_checkpoint

        model, diffusion, header = load_checkpoint(args.checkpoint)
        data = header.get("data", {})
        print(f"checkpoint: step {header.get('step')}, data {data.get('name')}, {data.get('shape')}, "
              f"{data.get('levels')} levels")
        if data.get("classes"):
            print(f"classes: {', '.join(data['classes'])} (and the null class {len(data['classes'])})")
        print(f"model: {header.get('train', {}).get('model', 'a U-Net')}, {describe(model.config)}")
        print(f"diffusion: {json.dumps(diffusion.config())}")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from . import distributed
    from .trainer import TrainingError

    try:
        status = {"train": run_train, "sample": run_sample, "nll": run_nll, "eval": run_eval,
                  "info": run_info}[args.command](args)
        distributed.shutdown()
    except (ValueError, OSError, TrainingError, CheckpointError, DatasetError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"fastddpm {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastddpm {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    return status or 0
