"""Checkpoints: exact round trip, no code execution, clear errors for bad files."""

import json

import pytest
import torch
from safetensors.torch import save_file

from fastddpm import GaussianDiffusion, NoiseSchedule, UNet
from fastddpm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    model = UNet.from_preset("ddpm-tiny", **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def test_round_trip_restores_weights_schedule_and_options(tmp_path):
    model, ema = tiny(0, learned_variance=True), tiny(1, learned_variance=True)
    schedule = NoiseSchedule.cosine(50).respace([0, 3, 20, 49])
    diffusion = GaussianDiffusion(schedule, prediction="v", variance="learned_range", loss="hybrid", levels=17)
    path = save_checkpoint(tmp_path / "ck.safetensors", model, diffusion, ema=ema, step=7)
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed away
    for use_ema, source in [(True, ema), (False, model)]:
        loaded, d2, header = load_checkpoint(path, use_ema=use_ema)
        assert not loaded.training and header["step"] == 7
        for (k, a), (k2, b) in zip(source.state_dict().items(), loaded.state_dict().items()):
            assert k == k2 and torch.equal(a, b)
        assert torch.equal(d2.schedule.betas, schedule.betas) and torch.equal(d2.schedule.timesteps, schedule.timesteps)
        assert d2.config() == diffusion.config()


def test_bad_checkpoints_get_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*missing.safetensors"):
        load_checkpoint(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*junk.safetensors"):
        load_checkpoint(junk)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a fastddpm checkpoint"):
        load_checkpoint(foreign)
    good = save_checkpoint(tmp_path / "good.safetensors", tiny(), GaussianDiffusion(NoiseSchedule.linear(10)))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*truncated"):
        load_checkpoint(truncated)
    pickled = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(1)}, pickled)  # a pickle is refused, never unpickled
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*model.pt"):
        load_checkpoint(pickled)


def test_header_mismatch_is_reported(tmp_path):
    path = save_checkpoint(tmp_path / "ck.safetensors", tiny(), GaussianDiffusion(NoiseSchedule.linear(10)))
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        header = json.loads(f.metadata()["fastddpm"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header["unet"]["ch"] = 64
    save_file(tensors, path, metadata={"fastddpm": json.dumps(header)})
    with pytest.raises(CheckpointError, match="does not match its U-Net config"):
        load_checkpoint(path)
