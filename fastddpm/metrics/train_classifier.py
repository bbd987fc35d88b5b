"""Trains the digit classifier of `fastddpm.metrics` reproducibly and writes its weights.

    python -m fastddpm.metrics.train_classifier [--out PATH] [--seed 0] [--epochs N]

It trains on the digits' training split only (the held-out split stays unseen, so its scores
are the metric's floor: real digits the classifier has not seen, as samples are), with a fixed
recipe: fixed seeds, deterministic single-threaded ops, a fixed number of epochs, Adam with a
cosine learning rate, and random shifts of at most one pixel. It prints the accuracies and writes safetensors whose metadata (key ``fastddpm``, JSON)
records them, the recipe, the versions, and the floor of `fastddpm.metrics.digit_quality`. The
default --out is the file the package ships, ``fastddpm/data/digit_classifier.safetensors``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform

import torch
from safetensors.torch import save_file
from torch.nn import functional as F

from ..datasets import digits
from . import digit_floor
from .classifier import DigitClassifier, weights_path

RECIPE = {
    "data": "digits/train",
    "epochs": 40,
    "batch_size": 50,
    "optimizer": "Adam",
    "lr": 3e-3,
    "lr_schedule": "cosine to 0, per step",
    "weight_decay": 0.0,
    "augmentation": "shift by -1..1 pixels in x and y, background -1",
    "threads": 1,
}


@contextlib.contextmanager
def _deterministic():
    """One thread and deterministic algorithms while training; the caller's settings after."""
    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(strict)
        torch.set_num_threads(threads)


def shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image of [B, 1, 8, 8] moved by its own random -1..1 pixels in x and y."""
    b, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(0, 3, (2, b, 1), generator=generator)
    rows = (dy + torch.arange(h))[:, :, None]
    cols = (dx + torch.arange(w))[:, None, :]
    return padded[torch.arange(b)[:, None, None], 0, rows, cols].unsqueeze(1)


def train(seed: int = 0, epochs: int = RECIPE["epochs"]) -> DigitClassifier:
    """The classifier trained by `RECIPE` (with ``epochs``) from ``seed``: the same weights, bit
    for bit, on every run on one machine."""
    with _deterministic():
        torch.manual_seed(seed)  # the initial weights
        model = DigitClassifier()
        generator = torch.Generator().manual_seed(seed)  # batch order and shifts
        data = digits("train")
        x, y = data.tensor(), data.labels
        b = RECIPE["batch_size"]
        steps_per_epoch = len(x) // b
        total = epochs * steps_per_epoch
        opt = torch.optim.Adam(model.parameters(), lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"])
        model.train()
        for step in range(total):
            if step % steps_per_epoch == 0:
                order = torch.randperm(len(x), generator=generator)
            i = order[(step % steps_per_epoch) * b : (step % steps_per_epoch + 1) * b]
            for group in opt.param_groups:
                group["lr"] = RECIPE["lr"] * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(model(shift(x[i], generator)), y[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def accuracy(model: DigitClassifier, split: str) -> float:
    data = digits(split)
    return (model(data.tensor()).argmax(1) == data.labels).double().mean().item()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastddpm.metrics.train_classifier",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(weights_path()),
                        help="where to write the safetensors (default: the file the package ships)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=RECIPE["epochs"])
    args = parser.parse_args(argv)

    model = train(args.seed, args.epochs)
    record = {
        "train_accuracy": accuracy(model, "train"),
        "heldout_accuracy": accuracy(model, "heldout"),
        "floor": digit_floor(model)["distance"],
        "recipe": {**RECIPE, "epochs": args.epochs, "seed": args.seed},
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    print(f"train accuracy {record['train_accuracy']:.4f}, held-out accuracy {record['heldout_accuracy']:.4f}, "
          f"floor {record['floor']:.4f}")
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, args.out, metadata={"fastddpm": json.dumps(record)})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
