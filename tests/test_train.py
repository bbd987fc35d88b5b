"""The training job end to end on a few steps, and its presets."""

import json

import pytest
import torch

from fastddpm.checkpoint import load_checkpoint
from fastddpm.train import preset, train


def test_a_short_training_run_writes_checkpoint_grid_and_nll(tmp_path):
    config = preset("digits", steps=3, timesteps=20, batch_size=16, samples=4, nll_images=6, log_every=1)
    metrics = train(config, tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert metrics["heldout_images"] == 6 and 0 < metrics["heldout_nll_bpd"] < 20
    from PIL import Image

    grid = Image.open(tmp_path / "samples.png")
    assert grid.mode == "L" and grid.size == (4 * (2 * 10 + 2), 4 * (2 * 10 + 2))  # 2×2 digits of 8 px, 2 px padding, ×4
    model, diffusion, header = load_checkpoint(tmp_path / "checkpoint.safetensors")
    assert header["step"] == 3 and header["data"]["levels"] == 17 and diffusion.levels == 17
    assert diffusion.num_timesteps == 20 and model.config.in_channels == 1


def test_training_is_deterministic(tmp_path):
    config = preset("digits", steps=10, timesteps=50, batch_size=32, samples=1, nll_images=0, lr=2e-3, warmup=1)
    train(config, tmp_path / "a")
    train(config, tmp_path / "b")
    a, _, _ = load_checkpoint(tmp_path / "a" / "checkpoint.safetensors", use_ema=False)
    b, _, _ = load_checkpoint(tmp_path / "b" / "checkpoint.safetensors", use_ema=False)
    for (_, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q)


def test_unknown_preset_and_option():
    with pytest.raises(ValueError, match="unknown training preset 'digit'"):
        preset("digit")
    with pytest.raises(ValueError, match=r"unknown training options \['stepz'\]"):
        preset("digits", stepz=3)
    assert preset("cifar10").lr == 2e-4 and preset("cifar10").warmup == 5000 and preset("cifar10").ema_decay == 0.9999
