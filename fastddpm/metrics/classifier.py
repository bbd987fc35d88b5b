"""The digit classifier whose features fastddpm's sample-quality metric measures in.

A small CNN for the bundled 1x8x8 digits (`fastddpm.datasets.digits`), trained on their
training split only by `fastddpm.metrics.train_classifier`, which writes the weights shipped in
``fastddpm/data/digit_classifier.safetensors``. Its features are the 64 activations of the
penultimate layer, as Inception's pool3 activations are for FID (Heusel et al. 2017).
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

WEIGHTS_FILE = "digit_classifier.safetensors"
FEATURES = 64


class DigitClassifier(nn.Module):
    """[N, 1, 8, 8] in [-1, 1] → logits [N, 10]; `features` is the 64-unit layer before the head.

    Two 3x3 convolutions at 8x8, a max-pool, one at 4x4, a max-pool, then 2x2x32 → 64 → 10:
    23k parameters (92 KB in float32).
    """

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.hidden = nn.Linear(32 * 2 * 2, FEATURES)
        self.head = nn.Linear(FEATURES, 10)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate activations, float32 [N, 64] (after the ReLU, as the head sees them)."""
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        x = torch.relu(self.conv3(nn.functional.max_pool2d(x, 2)))
        x = nn.functional.max_pool2d(x, 2).flatten(1)
        return torch.relu(self.hidden(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        """The penultimate activations of float images [N, 1, 8, 8] in [-1, 1], as float64 [N, 64]."""
        param = next(self.parameters())
        out = [self.embed(b.to(param.device, param.dtype)).double().cpu() for b in images.split(batch_size)]
        return torch.cat(out) if out else torch.empty(0, FEATURES, dtype=torch.float64)


# ---- the shipped weights ------------------------------------------------------------------------


def weights_path() -> Path:
    """Where the shipped weights are (inside the installed package)."""
    try:
        return Path(str(resources.files("fastddpm") / "data" / WEIGHTS_FILE))
    except (ModuleNotFoundError, TypeError, AttributeError):  # pragma: no cover
        return Path(__file__).resolve().parents[1] / "data" / WEIGHTS_FILE


def weights_metadata(path: str | Path | None = None) -> dict:
    """The training record stored beside the weights: accuracies, recipe, floor (JSON)."""
    with safe_open(str(path or weights_path()), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("fastddpm", "{}"))


@lru_cache(maxsize=1)
def load_digit_classifier() -> DigitClassifier:
    """The shipped classifier, in eval mode on the CPU (one instance per process; do not train it).

    The weights are read as raw tensors by safetensors: loading executes no code.
    """
    model = DigitClassifier()
    model.load_state_dict(load_file(str(weights_path())))
    return model.eval().requires_grad_(False)
