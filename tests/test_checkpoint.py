"""Checkpoints: exact round trip, no code execution, clear errors for bad files."""

import json
import os
import stat

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


def rewrite(path, edit_header=None, edit_tensors=None):
    """Rewrite the checkpoint at ``path`` with its header and tensors edited (as a careless tool would)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        header = json.loads(f.metadata()["fastddpm"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header = edit_header(header) if edit_header else header
    tensors = edit_tensors(tensors) if edit_tensors else tensors
    save_file(tensors, path, metadata={"fastddpm": json.dumps(header)})
    return path


def edited(header, key, value):
    """``header`` with the dotted ``key`` set to ``value`` (deleted when value is ...)."""
    *parents, last = key.split(".")
    node = header
    for part in parents:
        node = node[part]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return header


@pytest.mark.parametrize(
    "key, value, message",
    [  # issue 14, item 4: each was accepted and reinterpreted, or failed with a KeyError/TypeError traceback
        ("diffusion", ..., "has no 'diffusion' object in its header"),
        ("diffusion.bogus", 1, r"unknown 'diffusion' options \['bogus'\]"),
        ("diffusion.levels", 1, r"invalid diffusion: levels must be an integer in \[2, 65537\), got 1"),
        ("diffusion.levels", 10**9, r"invalid diffusion: levels must be an integer in \[2, 65537\), got 1000000000"),
        ("diffusion.clip_denoised", "no", "invalid diffusion: clip_denoised must be true or false"),
        ("data.levels", 0, r"data levels must be an integer in \[2, 65537\), got 0"),
        ("data.shape", [1, 8], r"data shape must be \[C, H, W\], got \[1, 8\]"),
        ("unet", [1], "has no 'unet' object in its header"),
        ("unet.ch", "32", "invalid 'unet' config: ch must be a positive integer, got '32'"),
        ("train", ["grid_scale", 4], "a 'train' entry that is not a JSON object"),  # failed after all the sampling
        ("train.grid_scale", 0, "grid_scale must be a positive integer or null, got 0"),
        ("step", -1, "step must be a non-negative integer, got -1"),
        ("format", 2, "unsupported format 2"),
    ],
)
def test_a_bad_header_is_refused_when_read(tmp_path, key, value, message):
    path = save_checkpoint(tmp_path / "ck.safetensors", tiny(), GaussianDiffusion(NoiseSchedule.linear(10)), step=3,
                           data={"name": "digits/train", "shape": [3, 16, 16], "levels": 256}, train={"grid_scale": 2})
    rewrite(path, edit_header=lambda h: edited(h, key, value))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "name, dtype, message",
    [
        ("ema.conv_in.weight", torch.int32, "stores conv_in.weight as torch.int32, the model's is torch.float32"),
        ("model.conv_in.weight", torch.float64, "stores conv_in.weight as torch.float64, the model's is torch.float32"),
        ("schedule.timesteps", torch.float64, r"schedule.timesteps of dtype torch.float64 .*expected 1-D torch.int64"),
        ("schedule.betas", torch.float32, r"schedule.betas of dtype torch.float32 .*expected 1-D torch.float64"),
    ],
)
def test_tensors_of_another_dtype_are_refused_not_cast(tmp_path, name, dtype, message):
    path = save_checkpoint(tmp_path / "ck.safetensors", tiny(), GaussianDiffusion(NoiseSchedule.linear(10)), ema=tiny(1))
    rewrite(path, edit_tensors=lambda t: {**t, name: t[name].to(dtype)})
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path, use_ema=name.startswith(("ema", "schedule")))


def test_nan_weights_are_neither_saved_nor_sampled(tmp_path):
    model = tiny()
    with torch.no_grad():
        model.conv_in.weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(CheckpointError, match=r"refusing to save .*bad.safetensors: 1 weight tensors are NaN/Inf "
                                              r"\(model.conv_in.weight"):
        save_checkpoint(tmp_path / "bad.safetensors", model, GaussianDiffusion(NoiseSchedule.linear(10)))
    assert list(tmp_path.iterdir()) == []
    path = save_checkpoint(tmp_path / "ck.safetensors", tiny(), GaussianDiffusion(NoiseSchedule.linear(10)))
    rewrite(path, edit_tensors=lambda t: {k: v * float("nan") if k.startswith("model.") else v for k, v in t.items()})
    with pytest.raises(CheckpointError, match=r"has NaN/Inf weights \(\d+ of \d+ model tensors"):
        load_checkpoint(path)


def test_a_full_disk_is_one_line_naming_the_path_and_the_free_space(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from fastddpm import checkpoint

    diffusion = GaussianDiffusion(NoiseSchedule.linear(10))
    older = save_checkpoint(tmp_path / "checkpoint-00000001.safetensors", tiny(), diffusion)
    before = older.read_bytes()

    def full_disk(tensors, path, metadata=None):  # what safetensors raises on ENOSPC, after a partial write
        with open(path, "wb") as f:
            f.write(b"\0" * 100)
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(CheckpointError) as caught:
        save_checkpoint(tmp_path / "checkpoint-00000002.safetensors", tiny(), diffusion)
    message = str(caught.value)
    assert "\n" not in message and "checkpoint-00000002.safetensors: no space left on the device (" in message
    assert f"MiB free in {tmp_path}); the older checkpoints are intact" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000001.safetensors"]  # no temporary left
    assert older.read_bytes() == before


def test_checkpoints_take_the_umask_as_other_files_do(tmp_path):
    previous = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "ck.safetensors", tiny(), GaussianDiffusion(NoiseSchedule.linear(10)))
        (tmp_path / "other").write_text("x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE((tmp_path / "other").stat().st_mode) == 0o644  # was 0600
