"""The command line: help, one-line errors with a non-zero exit, and sampling from a checkpoint."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastddpm import GaussianDiffusion, NoiseSchedule, UNet
from fastddpm.checkpoint import save_checkpoint
from fastddpm.conditioning import DEFAULT_GUIDANCE


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fastddpm", *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = UNet.from_preset("ddpm-digits")
    path = tmp_path_factory.mktemp("ck") / "checkpoint.safetensors"
    save_checkpoint(path, model, GaussianDiffusion(NoiseSchedule.linear(20), levels=17),
                    data={"name": "digits/train", "shape": [1, 8, 8], "levels": 17}, train={"grid_scale": 4})
    return path


@pytest.mark.parametrize("command", ["train", "sample", "nll", "eval"])
def test_help_shows_defaults(command):
    result = cli(command, "--help")
    assert result.returncode == 0 and "(default:" in result.stdout and "(default: None)" not in result.stdout


def test_info_describes_the_install_and_a_checkpoint(checkpoint):
    result = cli("info", "--checkpoint", str(checkpoint))
    assert result.returncode == 0, result.stderr
    assert "native CPU kernels: yes" in result.stdout and "presets: cifar10, digits" in result.stdout
    assert '"levels": 17' in result.stdout


def test_nll_of_a_checkpoint_on_the_digits_heldout_split(checkpoint):
    result = cli("nll", "--checkpoint", str(checkpoint), "--n", "4", "--data", "digits")
    assert result.returncode == 0, result.stderr
    bpd = float(result.stdout.split("held-out NLL: ")[1].split()[0])
    assert 0 < bpd < 30 and "(4 images, 20 terms)" in result.stdout


def test_eval_scores_samples_beside_the_floor(checkpoint, tmp_path):
    result = cli("eval", "--checkpoint", str(checkpoint), "--no-compile", "--n", "16", "--solver", "dpmpp-2m",
                 "--steps", "4")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "16 samples (dpmpp_2m 4 steps" in lines[0] and "digits/train" in lines[0]
    assert lines[1].split() == ["all", "16", "in", "sets", "of", "297", "floor:", "297", "held-out", "digits"]
    name, distance, at_floor_n, floor = lines[2].split()
    assert name == "distance" and at_floor_n == "–" and float(distance) > float(floor) > 0  # 16 < 297: no set
    assert lines[3].startswith("precision") and lines[4].startswith("recall") and len(lines) == 5
    other = tmp_path / "other.safetensors"
    save_checkpoint(other, UNet.from_preset("ddpm-tiny"), GaussianDiffusion(NoiseSchedule.linear(20)),
                    data={"name": "folder:/x", "shape": [3, 16, 16], "levels": 256})
    result = cli("eval", "--checkpoint", str(other), "--n", "4")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "scores samples of the bundled digits; this checkpoint was trained on folder:/x" in result.stderr


def test_sample_writes_png_and_npz(checkpoint, tmp_path):
    result = cli("sample", "--checkpoint", str(checkpoint), "--no-compile", "--n", "5", "--batch-size", "2", "--out", str(tmp_path / "s.npz"))
    assert result.returncode == 0, result.stderr
    arrays = np.load(tmp_path / "s.npz")
    assert arrays["arr_0"].shape == (5, 8, 8, 1) and arrays["arr_0"].dtype == np.uint8
    result = cli("sample", "--checkpoint", str(checkpoint), "--no-compile", "--n", "4", "--steps", "5", "--eta", "0", "--out", str(tmp_path / "s.png"))
    assert result.returncode == 0, result.stderr
    from PIL import Image

    assert Image.open(tmp_path / "s.png").size == (4 * 22, 4 * 22)


def test_sample_without_solver_runs_the_trainers_chain(checkpoint):
    from fastddpm import cli as cli_module
    from fastddpm.checkpoint import load_checkpoint

    model, diffusion, _ = load_checkpoint(checkpoint, "cpu")

    def chain(*options):
        args = cli_module.parser().parse_args(["sample", "--checkpoint", str(checkpoint), *options])
        return cli_module._sampler(args, model, diffusion).solver.label

    assert chain() == "dpmpp_2m 10 steps (linspace)"  # TrainConfig's sample_solver and sample_steps
    assert chain("--steps", "5", "--karras") == "dpmpp_2m 5 steps (karras)"
    assert chain("--solver", "dpmpp-2m", "--spacing", "trailing") == "dpmpp_2m 20 steps (trailing)"
    assert chain("--solver", "ddpm") == "ddpm 20 steps"  # all the checkpoint's steps
    assert chain("--eta", "0", "--steps", "5") == "ddim (eta 0) 5 steps"


@pytest.mark.parametrize(
    "args, message",
    [
        (["sample", "--checkpoint", "nope.safetensors"], "checkpoint not found: nope.safetensors"),
        (["sample", "--checkpoint", "{ck}", "--out", "x.jpg"], "cannot save images to x.jpg: expected a .png (one grid)"),
        (["sample", "--checkpoint", "{tmp}"], "no checkpoint-*.safetensors in"),
        (["nll", "--checkpoint", "nope.safetensors"], "checkpoint not found: nope.safetensors"),
        (["train", "--config", "nope.json"], "config file not found: nope.json"),
        (["train", "--precision", "fp8"], "invalid choice: 'fp8'"),
        (["sample", "--checkpoint", "{ck}", "--eta", "2", "--out", "{tmp}/x.png"], "eta must lie in [0, 1]"),
        (["sample", "--checkpoint", "{ck}", "--solver", "ddpm", "--steps", "50", "--out", "{tmp}/x.png"],
         "steps must be between 2 and 20"),
        (["sample", "--checkpoint", "{ck}", "--steps", "50", "--out", "{tmp}/x.png"],
         "steps must be an integer between 1 and 20, got 50"),
        (["train", "--data", "/no/such/folder", "--out", "{tmp}/run"], "dataset path does not exist: /no/such/folder"),
        (["train", "--steps", "0"], "expected a positive integer, got '0'"),
        (["train", "--device", "gpu0"], "device must be a torch device such as cpu or cuda, got 'gpu0'"),
    ],
)
def test_errors_are_one_line_without_traceback(checkpoint, tmp_path, args, message):
    result = cli(*[a.format(ck=checkpoint, tmp=tmp_path) for a in args], cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 or lines[0].startswith("usage:")  # argparse prints usage, then one error line
    assert not (tmp_path / "run").exists()


def test_cuda_device_without_cuda_is_refused(monkeypatch):
    import argparse

    from fastddpm import cli as cli_module

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(argparse.ArgumentTypeError, match="CUDA is not available"):
        cli_module._device("cuda:0")


def test_torchrun_sampling_writes_what_one_process_writes(checkpoint, tmp_path):
    # Two ranks of 2 images each, the same batches as one process with --batch-size 2: equal files.
    # --num-images, not --n: torchrun's parser takes --n for a prefix of its own --nnodes/--nproc-per-node
    args = ["sample", "--checkpoint", str(checkpoint), "--num-images", "4", "--batch-size", "2", "--no-compile",
            "--seed", "5"]
    single = cli(*args, "--out", str(tmp_path / "one.npz"))
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "fastddpm", *args, "--out", str(tmp_path / "two.npz")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote 4 samples") == 1  # rank 0 writes
    np.testing.assert_array_equal(np.load(tmp_path / "two.npz")["arr_0"], np.load(tmp_path / "one.npz")["arr_0"])


def test_train_on_28x28_arrays_sizes_the_model_to_the_data(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "fmnist.npy", rng.integers(0, 256, (40, 28, 28, 1), dtype=np.uint8))  # Fashion-MNIST's layout
    args = ["train", "--data", str(tmp_path / "fmnist.npy"), "--steps", "2", "--batch-size", "8", "--out",
            str(tmp_path / "run")]
    result = cli(*args, "--model", "ddpm-cifar10")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and not (tmp_path / "run").exists()
    assert "model ddpm-cifar10 does not take 28x28 images" in result.stderr and "use the auto model" in result.stderr
    result = cli(*args)  # the default recipe: the auto model
    assert result.returncode == 0, result.stderr
    assert "model: auto, 1x28x28 images, ch 32 x (1, 2, 2), 1 residual block(s) a level, attention at 14x14" in result.stdout
    from PIL import Image

    assert Image.open(tmp_path / "run" / "samples.png").size == (8 * 30 + 2, 8 * 30 + 2)  # 28 px at 1:1
    info = cli("info", "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "fmnist.npy"))
    assert "model: auto, 1x28x28 images, ch 32" in info.stdout
    assert "40 images of 1x28x28, 256 levels" in info.stdout
    assert "auto model: 1x28x28 images, ch 32 x (1, 2, 2)" in info.stdout


# ---- issue 14: bad input and lost work -----------------------------------------------------------


def test_sample_shards_fill_one_directory_by_global_index(checkpoint, tmp_path):
    # item 1: `--start 3` named its files 000000…, overwriting the first shard; PNGs were enlarged, the .npz not
    base = ["sample", "--checkpoint", str(checkpoint), "--no-compile", "--steps", "4"]
    for start in ("0", "3"):
        result = cli(*base, "--n", "3", "--start", start, "--out", str(tmp_path / "shards"))
        assert result.returncode == 0, result.stderr
    assert cli(*base, "--n", "6", "--out", str(tmp_path / "whole")).returncode == 0
    assert cli(*base, "--n", "6", "--out", str(tmp_path / "whole.npz")).returncode == 0
    names = [f"{i:06d}.png" for i in range(6)]
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [*names, "samples.json"]
    from PIL import Image

    arrays = np.load(tmp_path / "whole.npz")["arr_0"]
    for i, name in enumerate(names):
        assert (tmp_path / "shards" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
        with Image.open(tmp_path / "shards" / name) as image:  # 1:1, the pixels of the .npz
            np.testing.assert_array_equal(np.asarray(image), arrays[i, :, :, 0])


def test_sample_refuses_a_directory_of_another_run_before_sampling(checkpoint, tmp_path):
    base = ["sample", "--checkpoint", str(checkpoint), "--no-compile", "--steps", "4", "--n", "2"]
    assert cli(*base, "--out", str(tmp_path / "run")).returncode == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    for other, differ in ((["--seed", "1"], "seed"), (["--steps", "3"], "chain"), (["--precision", "bf16"], "precision")):
        result = cli(*base, *other, "--out", str(tmp_path / "run"))
        assert result.returncode == 2 and result.stderr.count("\n") == 1
        assert f"holds images of another run (differs in {differ}); choose another directory" in result.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    result = cli(*base, "--out", str(tmp_path / "mine"))
    assert result.returncode == 2 and "holds files that fastddpm sample did not write (notes.txt, ...)" in result.stderr
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


@pytest.mark.parametrize(
    "out, message",
    [
        ("/sys/fastddpm-samples.png", "cannot write to /sys: "),  # read-only, even for root
        ("/sys/fastddpm-samples", "cannot write to /sys/fastddpm-samples: "),
        ("{tmp}/notes.txt/grid.png", "notes.txt: it is a file, not a directory"),
        ("{tmp}/folder.png", "folder.png: it is a directory"),
        ("{tmp}/grid.jpg", "grid.jpg: expected a .png (one grid), a .npz (uint8 NHWC) or a path without a suffix"),
    ],
)
def test_sample_checks_its_output_before_any_work(checkpoint, tmp_path, monkeypatch, capsys, out, message):
    # item 5: --out was checked only after every image was drawn
    from fastddpm import cli as cli_module
    from fastddpm.sampler import Sampler

    monkeypatch.setattr(Sampler, "sample", lambda *a, **k: pytest.fail("sampled before checking --out"))
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "folder.png").mkdir()
    assert cli_module.main(["sample", "--checkpoint", str(checkpoint), "--out", out.format(tmp=tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_sample_checks_the_checkpoint_header_before_any_work(tmp_path, monkeypatch, capsys):
    # item 4: a header whose "train" is a list failed only after all the sampling was done
    from fastddpm import cli as cli_module
    from fastddpm.sampler import Sampler

    monkeypatch.setattr(Sampler, "sample", lambda *a, **k: pytest.fail("sampled before checking the header"))
    path = save_checkpoint(tmp_path / "ck.safetensors", UNet.from_preset("ddpm-digits"),
                           GaussianDiffusion(NoiseSchedule.linear(20), levels=17), train=["grid_scale", 4])
    assert cli_module.main(["sample", "--checkpoint", str(path), "--out", str(tmp_path / "s.png")]) == 2
    assert "has a 'train' entry that is not a JSON object" in capsys.readouterr().err


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"hflip": "false"}, "hflip must be true or false, got 'false'"),
        ({"nll_images": "0"}, "nll_images must be a non-negative integer or null, got '0'"),
        ({"image_size": "8"}, "image_size must be a positive integer or null, got '8'"),  # item 12: "size 8 was requested"
        ({"ema_decay": "0.9"}, r"ema_decay must be a finite number in [0, 1), got '0.9'"),
    ],
)
def test_train_refuses_bad_config_values_before_any_work(tmp_path, fields, message):
    (tmp_path / "c.json").write_text(json.dumps(fields))
    result = cli("train", "--config", str(tmp_path / "c.json"), "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert message in result.stderr and not (tmp_path / "run").exists()


def test_train_resume_refuses_a_folder_without_a_checkpoint(tmp_path):
    # item 7: a missing folder started a fresh run; one with a log but no checkpoint had its log appended
    result = cli("train", "--resume", "--out", str(tmp_path / "missing"))
    assert result.returncode == 2 and f"nothing to resume: {tmp_path / 'missing'} does not exist" in result.stderr
    assert not (tmp_path / "missing").exists()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.csv").write_text("step,loss\n")
    result = cli("train", "--resume", "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and "holds no checkpoint (only log.csv)" in result.stderr
    assert (tmp_path / "run" / "log.csv").read_text() == "step,loss\n"


def test_train_class_cond_and_info_shows_the_classes(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"steps": 2, "batch_size": 16, "timesteps": 20, "nll_images": 0,
                                                 "quality_images": 0, "samples": 10, "sample_steps": 2}))
    result = cli("train", "--class-cond", "--config", str(tmp_path / "c.json"), "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    assert "ch 32 x (1, 2, 2), 1 residual block(s) a level, attention at 4x4, 10 classes;" in result.stdout
    info = cli("info", "--checkpoint", str(tmp_path / "run"))
    assert "classes: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9 (and the null class 10)" in info.stdout
    np.save(tmp_path / "x.npy", np.zeros((16, 8, 8, 1), dtype=np.uint8))
    result = cli("train", "--class-cond", "--data", str(tmp_path / "x.npy"), "--out", str(tmp_path / "bad"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "class_cond needs class labels" in result.stderr


def test_nll_reads_a_folder_as_the_run_read_its_own(tmp_path, monkeypatch, capsys):
    # a gray run trained on a folder composited on black, scored on a folder of colour RGBA icons: read
    # with white and three channels (the folder's own), it did not fit the model
    from PIL import Image

    from fastddpm import cli as cli_module
    from fastddpm import datasets

    torch.manual_seed(0)
    model = UNet.from_preset("ddpm-tiny", in_channels=1)
    path = save_checkpoint(tmp_path / "ck.safetensors", model, GaussianDiffusion(NoiseSchedule.linear(20)),
                           data={"name": "folder:/x", "shape": [1, 16, 16], "levels": 256},
                           train={"image_size": 16, "background": "black"})
    folder, rng = tmp_path / "icons", np.random.default_rng(0)
    folder.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (16, 16, 4), dtype=np.uint8), "RGBA").save(folder / f"icon{i}.png")
    monkeypatch.setenv("FASTDDPM_CACHE", str(tmp_path / "cache"))
    seen = []
    load = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: seen.append(k) or load(*a, **k))
    assert cli_module.main(["nll", "--checkpoint", str(path), "--data", str(folder)]) == 0, capsys.readouterr().err
    assert "(3 images, 20 terms)" in capsys.readouterr().out
    assert seen == [{"background": "black", "channels": 1}]


@pytest.fixture(scope="module")
def conditional(tmp_path_factory):
    torch.manual_seed(0)
    model = UNet.from_preset("ddpm-tiny", num_classes=3)
    with torch.no_grad():  # random weights everywhere: the zero-initialised output would hide the labels
        for p in model.parameters():
            p.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("cond") / "checkpoint.safetensors"
    save_checkpoint(path, model, GaussianDiffusion(NoiseSchedule.linear(20)), train={"grid_scale": 1},
                    data={"name": "folder:/animals", "shape": [3, 16, 16], "levels": 256, "classes": ["cat", "dog", "zebra"]})
    return path


def test_sample_draws_the_classes_asked_for(conditional, tmp_path):
    base = ["sample", "--checkpoint", str(conditional), "--no-compile", "--steps", "3"]

    def draw(*args, out):
        result = cli(*base, *args, "--out", str(tmp_path / out))
        assert result.returncode == 0, result.stderr
        return np.load(tmp_path / out)["arr_0"] if out.endswith(".npz") else tmp_path / out

    dog = draw("--class", "dog", "--n", "4", out="dog.npz")
    assert np.array_equal(draw("--class", "1", "--n", "4", out="one.npz"), dog)  # a name or an index
    assert not np.array_equal(draw("--class", "cat", "--n", "4", out="cat.npz"), dog)
    balanced = draw("--classes", "balanced", "--n", "6", out="all.npz")  # image k is class k mod 3
    assert np.array_equal(balanced[4], draw("--class", "dog", "--n", "1", "--start", "4", out="d4.npz")[0])
    for start in ("0", "3"):  # shards of a balanced run fill one directory as one run would
        draw("--classes", "balanced", "--n", "3", "--start", start, out="shards")
    from PIL import Image

    for k in range(6):
        with Image.open(tmp_path / "shards" / f"{k:06d}.png") as image:
            assert np.array_equal(np.asarray(image), balanced[k])
    with Image.open(draw("--classes", "balanced", "--n", "6", out="grid.png")) as grid:
        assert grid.size == (2 + 2 * 18, 2 + 3 * 18)  # a row a class: 3 rows of 2 tiles of 16 px + padding 2
        tiles = np.asarray(grid)
        assert np.array_equal(tiles[2:18, 2:18], balanced[0]) and np.array_equal(tiles[2:18, 20:36], balanced[3])
        assert np.array_equal(tiles[20:36, 2:18], balanced[1])  # row 2: the dogs, images 1 and 4


def test_sample_guidance_zero_is_the_unconditional_run_and_is_recorded(conditional, tmp_path):
    base = ["sample", "--checkpoint", str(conditional), "--no-compile", "--steps", "3", "--n", "3"]

    def draw(*args, out):
        result = cli(*base, *args, "--out", str(tmp_path / out))
        assert result.returncode == 0, result.stderr
        return tmp_path / out

    unconditional = np.load(draw(out="none.npz"))["arr_0"]
    assert np.array_equal(np.load(draw("--classes", "balanced", "--guidance", "0", out="w0.npz"))["arr_0"], unconditional)
    default = np.load(draw("--classes", "balanced", out="default.npz"))["arr_0"]
    assert np.array_equal(np.load(draw("--classes", "balanced", "--guidance", str(DEFAULT_GUIDANCE),
                                       out="w.npz"))["arr_0"], default)
    assert not np.array_equal(np.load(draw("--classes", "balanced", "--guidance", "1", out="w1.npz"))["arr_0"], default)
    manifest = json.loads((draw("--classes", "balanced", "--guidance", "4", out="dir") / "samples.json").read_text())
    assert manifest["run"]["guidance"] == 4.0 and manifest["run"]["classes"] == "balanced"


@pytest.mark.parametrize(
    "which, args, message",
    [
        ("conditional", ["--guidance", "2"], "--guidance needs --class C or --classes balanced"),
        ("conditional", ["--class", "0", "--guidance", "nan"], "guidance must be a finite number"),
        ("conditional", ["--class", "0", "--guidance", "-1"], "guidance must be a finite number in [0, inf)"),
        ("conditional", ["--class", "bird"], "--class 'bird' is not a class of this model: cat, dog, zebra (or 0 to 2)"),
        ("conditional", ["--class", "3"], "--class '3' is not a class of this model"),
        ("checkpoint", ["--class", "0"], "--class/--classes need a class-conditional run (fastddpm train --class-cond)"),
        ("conditional", ["--class", "0", "--classes", "balanced"], "not allowed with argument --class"),
    ],
)
def test_bad_class_requests_are_one_line_errors(checkpoint, conditional, tmp_path, which, args, message):
    path = {"checkpoint": checkpoint, "conditional": conditional}[which]
    result = cli("sample", "--checkpoint", str(path), "--n", "2", *args, "--out", str(tmp_path / "x.png"))
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x.png").exists()
