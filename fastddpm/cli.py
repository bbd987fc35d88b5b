"""The `fastddpm` command: train, sample.

Errors a user can cause (bad arguments, paths, data, checkpoints) print one line to stderr
and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from .datasets import quantize
from .images import save_grid
from .train import PRESETS, preset, train


class UsageError(ValueError):
    """An error in how the command was called."""


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
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"device {text!r} requested but CUDA is not available")
    return text


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model (default: the bundled digits, a few minutes on a CPU)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="digits", choices=sorted(PRESETS), help="training recipe")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: runs/<preset>)")
    p.add_argument("--data", default=None, help="image folder, CIFAR-10 batches folder, or .npz/.npy (default: digits)")
    p.add_argument("--image-size", type=_positive_int, default=None, help="resize an image folder to this size")
    p.add_argument("--steps", type=_positive_int, default=None, help="training steps (default: the preset's)")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="batch size (default: the preset's)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the preset's)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", type=_device, default="cpu", help="torch device")


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="draw samples from a checkpoint",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint.safetensors written by train")
    p.add_argument("--n", type=_positive_int, default=64, help="number of images")
    p.add_argument("--out", type=Path, default=Path("samples.png"), help="output .png (a grid) or .npz (uint8 NHWC)")
    p.add_argument("--steps", type=_positive_int, default=None, help="respace to this many steps (default: all)")
    p.add_argument("--eta", type=float, default=None, help="sample with DDIM(eta) instead of ancestral DDPM")
    p.add_argument("--batch-size", type=_positive_int, default=256, help="images per batch")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", type=_device, default="cpu", help="torch device")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastddpm", description="Denoising Diffusion Probabilistic Models, fast.")
    sub = p.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_sample(sub)
    return p


def run_train(args) -> None:
    overrides = {k: v for k, v in (("data", args.data), ("image_size", args.image_size), ("steps", args.steps),
                                   ("batch_size", args.batch_size), ("lr", args.lr)) if v is not None}
    config = preset(args.preset, seed=args.seed, device=args.device, **overrides)
    out = args.out if args.out is not None else Path("runs") / args.preset
    metrics = train(config, out)
    print(f"trained {metrics['steps']} steps in {metrics['train_seconds']:.0f} s")
    print(f"checkpoint: {metrics['checkpoint']}")
    print(f"samples:    {metrics['samples']}")
    if "heldout_nll_bpd" in metrics:
        print(f"held-out NLL: {metrics['heldout_nll_bpd']:.4f} bits/dim ({metrics['heldout_images']} images)")


def run_sample(args) -> None:
    from .checkpoint import load_checkpoint

    suffix = args.out.suffix.lower()
    if suffix not in (".png", ".npz"):
        raise UsageError(f"--out must end in .png or .npz, got {args.out}")
    model, diffusion, header = load_checkpoint(args.checkpoint, args.device, use_ema=not args.no_ema)
    shape = tuple(header["data"]["shape"])
    generator = torch.Generator(args.device).manual_seed(args.seed)
    batches = []
    for start in range(0, args.n, args.batch_size):
        n = min(args.batch_size, args.n - start)
        batches.append(diffusion.sample(model, (n, *shape), steps=args.steps, eta=args.eta, generator=generator).cpu())
    images = torch.cat(batches)
    if suffix == ".png":
        save_grid(images, args.out, scale=header.get("train", {}).get("grid_scale", 1))
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        np.savez(args.out, quantize(images, 256).permute(0, 2, 3, 1).numpy())
    print(f"wrote {args.n} samples to {args.out}")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        {"train": run_train, "sample": run_sample}[args.command](args)
    except (ValueError, OSError) as err:
        print(f"fastddpm {args.command}: error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastddpm {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0
