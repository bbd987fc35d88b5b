"""The Trainer: a short run's outputs, exact resume, NaN stop, signals, atomic checkpoints,
and torchrun with two Gloo processes against one process."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastddpm.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, read_checkpoint, run_checkpoints
from fastddpm.config import preset
from fastddpm.trainer import Trainer, TrainingError

SMALL = dict(steps=4, timesteps=20, batch_size=16, samples=4, nll_images=0, quality_images=0, log_every=1, warmup=2,
             device="cpu")


def small(**overrides):
    return preset("digits", **{**SMALL, **overrides})


def losses(run_dir):
    with open(run_dir / "log.csv") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


def model_state(run_dir, ema=False):
    model, _, header = load_checkpoint(run_dir, use_ema=ema)
    return model.state_dict(), header


def cli(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "fastddpm", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


def test_a_short_run_writes_checkpoints_log_grids_nll_and_sample_quality(tmp_path):
    config = small(steps=4, checkpoint_every=2, sample_every=2, keep_checkpoints=1, nll_images=6, quality_images=12,
                   sample_steps=3)
    metrics = Trainer(config, tmp_path).fit()
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert metrics["steps"] == 4 and metrics["heldout_images"] == 6 and 0 < metrics["heldout_nll_bpd"] < 20
    quality = metrics["quality"]  # 4 steps of training: far from the digits, far above the floor
    assert quality["n"] == 12 and quality["solver"] == "dpmpp_2m" and quality["steps"] == 3
    assert quality["chain"] == "dpmpp_2m 3 steps (linspace)"
    assert quality["distance"] > 10 * quality["floor"] > 0 and 0 <= quality["precision"] <= 1
    assert [p.name for p in run_checkpoints(tmp_path)] == ["checkpoint-00000004.safetensors"]  # keep 1
    assert (tmp_path / "samples" / "step-00000002.png").is_file()
    from PIL import Image

    grid = Image.open(tmp_path / "samples.png")
    assert grid.mode == "L" and grid.size == (4 * (2 * 10 + 2), 4 * (2 * 10 + 2))  # 2×2 digits of 8 px, ×4
    assert [step for step, _ in losses(tmp_path)] == [1, 2, 3, 4]
    header, tensors = read_checkpoint(latest_checkpoint(tmp_path))
    assert header["step"] == 4 and header["data"]["levels"] == 17 and header["train"]["batch_size"] == 16
    assert any(k.startswith("train.optim.") for k in tensors) and any(k.startswith("ema.") for k in tensors)


def test_resume_is_exact(tmp_path):
    Trainer(small(steps=6), tmp_path / "straight").fit()
    Trainer(small(steps=3), tmp_path / "resumed").fit()
    with pytest.raises(ValueError, match="already holds a run .*pass --resume"):
        Trainer(small(steps=6), tmp_path / "resumed")
    Trainer(small(steps=6), tmp_path / "resumed", resume=True).fit()
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    for ema in (False, True):
        a, _ = model_state(tmp_path / "straight", ema)
        b, header = model_state(tmp_path / "resumed", ema)
        assert header["step"] == 6
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_importance_sampling_and_fp16_scaler_is_exact(tmp_path):
    # The loss-aware sampler's statistics and the loss scale are part of the state.
    options = dict(timestep_sampler="importance", loss="hybrid", variance="learned_range", precision="bf16")
    Trainer(small(steps=4, **options), tmp_path / "a").fit()
    Trainer(small(steps=2, **options), tmp_path / "b").fit()
    Trainer(small(steps=4, **options), tmp_path / "b", resume=True).fit()
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_resume_refuses_other_settings_and_corrupt_checkpoints(tmp_path):
    Trainer(small(steps=1), tmp_path).fit()
    with pytest.raises(TrainingError, match="trained with other settings \\(lr\\)"):
        Trainer(small(steps=2, lr=0.1), tmp_path, resume=True)
    path = latest_checkpoint(tmp_path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*checkpoint-00000001"):
        Trainer(small(steps=2), tmp_path, resume=True)


def test_resume_skips_a_corrupt_newest_checkpoint_and_says_so(tmp_path, capsys):
    # issue 14, item 8: it stopped with no fallback
    Trainer(small(steps=3), tmp_path / "straight").fit()
    Trainer(small(steps=2, checkpoint_every=1), tmp_path / "run").fit()
    newest = latest_checkpoint(tmp_path / "run")
    newest.write_bytes(newest.read_bytes()[:1000])
    capsys.readouterr()
    trainer = Trainer(small(steps=3), tmp_path / "run", resume=True)
    assert trainer.step == 1
    assert f"skipped: cannot read checkpoint {newest}" in capsys.readouterr().err
    trainer.fit()
    assert losses(tmp_path / "run") == losses(tmp_path / "straight")  # the log too: its row 2 was redone once


def test_resume_after_a_kill_truncates_the_log_to_the_checkpoint(tmp_path):
    # issue 14, item 10: after a SIGKILL past the last checkpoint, log.csv repeated the steps redone
    Trainer(small(steps=4, checkpoint_every=2), tmp_path).fit()
    latest_checkpoint(tmp_path).unlink()  # killed after logging steps 3 and 4, before saving step 4
    trainer = Trainer(small(steps=4), tmp_path, resume=True)
    assert trainer.step == 2 and [step for step, _ in losses(tmp_path)] == [1, 2]
    trainer.fit()
    assert [step for step, _ in losses(tmp_path)] == [1, 2, 3, 4]


def test_resume_needs_a_checkpoint_and_a_new_run_a_directory_of_no_other_run(tmp_path):
    # issue 14, item 7: --resume on a missing folder started a fresh run; on a folder with a log and samples
    # but no checkpoint it appended to the log and overwrote the samples
    with pytest.raises(ValueError, match=f"nothing to resume: {tmp_path / 'missing'} does not exist"):
        Trainer(small(), tmp_path / "missing", resume=True)
    assert not (tmp_path / "missing").exists()
    (tmp_path / "log.csv").write_text("step,loss\n1,0.5\n")
    (tmp_path / "samples").mkdir()
    with pytest.raises(ValueError, match=r"nothing to resume: .* holds no checkpoint \(only log.csv, samples\)"):
        Trainer(small(), tmp_path, resume=True)
    with pytest.raises(ValueError, match=r"already holds a run \(log.csv, samples\); pass --resume"):
        Trainer(small(), tmp_path)
    assert (tmp_path / "log.csv").read_text() == "step,loss\n1,0.5\n"


def test_weights_that_become_nan_are_never_saved(tmp_path):
    # issue 14, item 2: lr 1e39 gave finite losses and checkpoints of Inf weights, named "last good"
    trainer = Trainer(small(steps=3, lr=1e39, warmup=0, checkpoint_every=1), tmp_path)
    with pytest.raises(TrainingError, match=r"the weights became NaN/Inf by step 1 \(\d+ tensors, model\..*stopped "
                                            r"without saving \(last good checkpoint: none\)"):
        trainer.fit()
    assert run_checkpoints(tmp_path) == []


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = Trainer(small(steps=6, checkpoint_every=2, log_every=1), tmp_path)
    trainer.model.register_forward_hook(lambda m, i, out: out * float("nan") if trainer.step >= 3 else out)
    with pytest.raises(TrainingError, match=r"NaN/Inf by step 4; .*checkpoint-00000002"):
        trainer.fit()
    assert [p.name for p in run_checkpoints(tmp_path)] == ["checkpoint-00000002.safetensors"]
    state, header = model_state(tmp_path)
    assert header["step"] == 2 and all(torch.isfinite(v).all() for v in state.values())


def test_sigterm_saves_a_checkpoint_exits_143_and_the_printed_command_resumes(tmp_path):
    # issue 14, item 6: it exited 0, and its hint left out the --config the run needed
    config = tmp_path / "run.json"
    config.write_text(json.dumps({**SMALL, "steps": 100000, "nll_images": 0}))
    run = tmp_path / "run"

    def train_until_logged(command, rows):
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while time.time() < deadline and not (run / "log.csv").exists() or len(losses(run)) < rows:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        return proc.returncode, err

    code, err = train_until_logged([sys.executable, "-m", "fastddpm", "train", "--config", str(config), "--out",
                                    str(run)], 2)
    assert code == 128 + signal.SIGTERM == 143, err
    hint = err.strip().splitlines()[-1]
    assert hint.startswith("stopped by SIGTERM at step ") and hint.endswith(f"(continue with: fastddpm train --out {run} --resume)")
    _, header = model_state(run)
    first, started_with = header["step"], header["train"]
    assert 2 <= first < 100000 and [step for step, _ in losses(run)] == list(range(1, first + 1))
    code, err = train_until_logged([sys.executable, "-m", "fastddpm", *hint.split("continue with: ")[1][:-1].split()[1:]],
                                   first + 2)  # the command as printed: the run's own config, no flags
    assert code == 143, err
    _, header = model_state(run)
    assert header["step"] > first + 1 and header["train"] == {**started_with, "device": None}  # device: the machine's
    assert [step for step, _ in losses(run)] == list(range(1, header["step"] + 1))


def test_a_kill_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    script = f"""
import os, safetensors.torch
from fastddpm import checkpoint
from fastddpm.config import preset
from fastddpm.trainer import Trainer
trainer = Trainer(preset("digits", **{{**{SMALL!r}, "steps": 1}}), {str(tmp_path)!r})
trainer.fit()
def killed_midway(tensors, path, metadata=None):
    safetensors.torch.save_file(tensors, path, metadata=metadata)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    os._exit(9)
checkpoint.save_file = killed_midway
trainer.train_step()
trainer.save()
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 9, result.stderr
    assert [p.name for p in run_checkpoints(tmp_path)] == ["checkpoint-00000001.safetensors"]
    _, header = model_state(tmp_path)
    assert header["step"] == 1
    assert len(list(tmp_path.glob(".checkpoint-00000002.*tmp*"))) == 1  # the killed save's temporary
    Trainer(preset("digits", **{**SMALL, "steps": 2}), tmp_path, resume=True)
    assert not list(tmp_path.glob(".checkpoint-*"))  # issue 14, item 10: removed when the run starts again


def test_torchrun_with_two_gloo_processes_equals_one_process(tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({**SMALL, "steps": 3}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = cli("train", "--config", str(config), "--out", str(tmp_path / "one"), env=env)
    assert single.returncode == 0, single.stderr
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastddpm",
         "train", "--config", str(config), "--out", str(tmp_path / "two")],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for ema in (False, True):
        one, _ = model_state(tmp_path / "one", ema)
        two, header = model_state(tmp_path / "two", ema)
        assert header["step"] == 3
        # Gradients agree to float rounding (the all-reduce sums in another order). Adam divides
        # each gradient element by its own magnitude, so an element whose gradient is at rounding
        # level can take a different step (at most 2 lr per step); every other element agrees.
        max_move = 2 * sum(2e-3 * min(1.0, (s + 1) / 2) for s in range(3))
        diffs = torch.cat([(two[k] - one[k]).abs().flatten() for k in one])
        assert (diffs > 1e-6).float().mean() < 1e-3 and diffs.max() <= max_move and diffs.mean() < 1e-8
    for (s1, l1), (s2, l2) in zip(losses(tmp_path / "one"), losses(tmp_path / "two")):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-5)


@pytest.mark.parametrize("class_cond", [False, True])
def test_the_step_that_gets_compiled_is_one_graph(tmp_path, class_cond):
    # Forward, q_sample and the fused loss with hybrid vb terms and importance weights (and class
    # labels): no graph break, no host sync (the key, t and y are tensors).
    trainer = Trainer(small(steps=1, loss="hybrid", variance="learned_range", timestep_sampler="importance",
                            class_cond=class_cond), tmp_path)
    x0, t, w, y, _ = trainer._batch(torch.Generator().manual_seed(0))
    assert (y is not None) == class_cond
    explained = torch._dynamo.explain(trainer._losses)(x0, t, w, trainer.key, y)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.slow  # inductor compiles the U-Net's forward and backward: about a minute on 2 cores
def test_the_compiled_step_trains_like_the_eager_one(tmp_path):
    Trainer(small(steps=3, compile=False), tmp_path / "eager").fit()
    Trainer(small(steps=3, compile=True), tmp_path / "compiled").fit()
    for (s1, l1), (s2, l2) in zip(losses(tmp_path / "eager"), losses(tmp_path / "compiled")):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-4)


def test_three_compiled_steps_are_one_graph(tmp_path, monkeypatch):
    """The step's tables are built before it is compiled: built inside its first call, they put a
    host-to-device copy in its first graph and the cache's change recompiled it (on a GPU, a second
    inductor compile of the U-Net's forward and backward)."""
    from torch._dynamo.utils import counters

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, backend="aot_eager", **kw))
    torch._dynamo.reset()
    counters.clear()
    trainer = Trainer(small(steps=3, compile=True), tmp_path)
    for _ in range(3):
        trainer.train_step()
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"], dict(counters["recompiles"])


def test_tf32_is_a_setting_recorded_in_the_run(tmp_path):
    from fastddpm.trainer import use_tf32

    trainer = Trainer(small(steps=1), tmp_path / "cpu")
    assert trainer.config.tf32 is False  # None: on for CUDA only, and the run records which
    trainer.fit()
    _, header = model_state(tmp_path / "cpu")
    assert header["train"]["tf32"] is False
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        use_tf32(True)
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
        use_tf32(False)
        assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]


# ---- class-conditional runs (issue 15) ------------------------------------------------------------


def test_a_class_conditional_run_records_its_classes_and_draws_a_row_a_class(tmp_path):
    Trainer(small(steps=2, class_cond=True, samples=20), tmp_path).fit()
    header, tensors = read_checkpoint(latest_checkpoint(tmp_path))
    assert header["data"]["classes"] == [str(k) for k in range(10)] and header["unet"]["num_classes"] == 10
    assert tensors["ema.class_embed.weight"].shape == (11, 128)  # 10 digits and the null class, ch 32 * 4
    from PIL import Image

    with Image.open(tmp_path / "samples.png") as grid:  # 10 rows (a digit each) of 20 // 10 = 2, 8 px at 4x
        assert grid.size == (4 * (2 * 10 + 2), 4 * (10 * 10 + 2))


def test_labels_are_dropped_to_the_null_class_at_p_uncond(tmp_path):
    def labels(p_uncond, out):
        trainer = Trainer(small(steps=1, class_cond=True, p_uncond=p_uncond, batch_size=500), tmp_path / out)
        _, _, _, y, _ = trainer._batch(torch.Generator().manual_seed(0))
        return y, trainer.labels[trainer._indices(0)]

    y, true = labels(0.0, "none")
    assert torch.equal(y, true) and set(true.tolist()) == set(range(10))
    y, _ = labels(1.0, "all")
    assert torch.equal(y, torch.full((500,), 10))
    y, true = labels(0.1, "some")
    dropped = (y == 10).float().mean().item()
    assert torch.equal(y[y != 10], true[y != 10]) and 0.07 < dropped < 0.13  # 500 draws of p = 0.1: sd 0.013


def test_class_conditional_resume_and_streaming_are_exact(tmp_path):
    Trainer(small(steps=4, class_cond=True), tmp_path / "straight").fit()
    Trainer(small(steps=2, class_cond=True), tmp_path / "resumed").fit()
    Trainer(small(steps=4, class_cond=True), tmp_path / "resumed", resume=True).fit()
    Trainer(small(steps=4, class_cond=True, data_memory_mb=0), tmp_path / "streamed").fit()
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed") == losses(tmp_path / "streamed")


def test_class_cond_on_data_without_labels_is_refused(tmp_path):
    import numpy as np

    np.save(tmp_path / "x.npy", np.zeros((32, 8, 8, 1), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"class_cond needs class labels and array:.*x.npy has none \(labelled data: "
                                         r"the digits, CIFAR-10, a .npz with a 'labels' array"):
        Trainer(small(class_cond=True, data=str(tmp_path / "x.npy")), tmp_path / "run")
    assert not (tmp_path / "run").exists()
