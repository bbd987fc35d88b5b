"""The sampling engine: the noise contract across batches, positions and processes, parity with
`GaussianDiffusion.sample`, the speed levers, the output files and the input errors."""

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from fastddpm import GaussianDiffusion, NoiseSchedule, UNet, UNetConfig, rng
from fastddpm.images import save_images
from fastddpm.sampler import Sampler, sample

SHAPE = (3, 8, 8)
CONFIG = UNetConfig(in_channels=3, resolution=8, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                    groups=8)


def make_model(dropout=0.0):
    """A tiny U-Net with random weights everywhere (the zero-initialised output layers would
    make it predict ε = 0 and hide every model-dependent difference)."""
    torch.manual_seed(0)
    model = UNet(UNetConfig(**{**CONFIG.to_dict(), "dropout": dropout}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def diffusion():
    return GaussianDiffusion(NoiseSchedule.linear(20))


def draw(model, diffusion, n=5, seed=3, start=0, **options):
    options = {"compile": False, "progress": False, **options}
    return Sampler(model, diffusion, **options).sample(n, seed, start)


def pointwise(x, timesteps):
    """A model with no interaction between samples, so any difference is the engine's."""
    return torch.tanh(x) * 0.5 + 1e-3 * timesteps.view(-1, 1, 1, 1)


# ---- the noise contract ------------------------------------------------------------------------


@pytest.mark.parametrize("eta", [None, 0.5])
def test_an_image_is_the_same_in_any_batch_and_position_exactly(diffusion, eta):
    kw = {"shape": SHAPE, "eta": eta}
    whole = draw(pointwise, diffusion, batch_size=5, **kw)
    assert whole.shape == (5, *SHAPE) and whole.dtype == torch.float32 and whole.device.type == "cpu"
    assert torch.equal(draw(pointwise, diffusion, batch_size=2, **kw), whole)
    assert torch.equal(draw(pointwise, diffusion, n=3, start=2, batch_size=2, **kw), whole[2:])


def test_unet_images_are_batch_invariant_to_float_rounding(model, diffusion):
    # Not bit-exact: the CPU convolutions and matmuls block differently per batch size
    # (max difference 3.9e-7 over 20 steps); the noise itself is exact (test above).
    whole = draw(model, diffusion, batch_size=5)
    torch.testing.assert_close(draw(model, diffusion, batch_size=2), whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(draw(model, diffusion, n=3, start=2, batch_size=3), whole[2:], rtol=0, atol=1e-5)


def test_reruns_are_identical_and_seeds_differ(model, diffusion):
    first = draw(model, diffusion)
    assert torch.equal(draw(model, diffusion), first)
    assert torch.equal(sample(model, diffusion, 5, seed=3, compile=False, progress=False), first)
    other = draw(model, diffusion, seed=4)
    assert (other - first).abs().amax(dim=(1, 2, 3)).min() > 0.1


@pytest.mark.parametrize("steps, eta", [(None, None), (5, None), (None, 0.0), (5, 0.5), ([0, 3, 9, 19], 1.0)])
def test_equals_gaussian_diffusion_sample(model, diffusion, steps, eta):
    images = draw(model, diffusion, start=7, steps=steps, eta=eta)
    expected = diffusion.sample(model, (5, *SHAPE), steps=steps, eta=eta, progress=False, seed=3, sample_index=7)
    assert images.shape == (5, *SHAPE) and bool(images.isfinite().all())
    assert bool((images.abs() <= 1).all())  # clip_denoised: the last step returns the clipped x̂₀
    torch.testing.assert_close(images, expected, rtol=1e-6, atol=1e-6)


def test_ddim_eta_0_does_not_depend_on_the_step_noise(model, diffusion):
    """DDIM(0) is a deterministic map of x_T: the chain with arbitrary z gives the same images."""
    images = draw(model, diffusion, steps=5, eta=0.0)
    respaced = diffusion.respace(5)
    x = rng.normal(3, torch.arange(5), 5, rng.STREAM_PRIOR, SHAPE)
    g = torch.Generator().manual_seed(0)
    for i in reversed(range(5)):
        t = torch.full((5,), i)
        x = respaced.p_sample(model, x, t, noise=torch.randn(x.shape, generator=g) * 10, eta=0.0)
    torch.testing.assert_close(images, x, rtol=1e-6, atol=1e-6)


# ---- modes and levers ----------------------------------------------------------------------------


def test_sampling_runs_in_eval_mode_and_restores_training():
    model = make_model(dropout=0.5).train()
    diffusion = GaussianDiffusion(NoiseSchedule.linear(5))
    first = draw(model, diffusion, n=2)
    assert model.training
    assert torch.equal(draw(model, diffusion, n=2), first)  # dropout off: no randomness beyond the contract


def test_bf16_autocast_stays_close_to_fp32(model, diffusion):
    # bf16 keeps 8 bits of mantissa (relative error 2^-9 per rounding), so the U-Net's ε is off by
    # ~1e-2 relative; the chain stays float32 and the x̂₀ of the last step is clipped, so 0.05 is loose.
    # (Measured: 5e-4 for bf16, 1e-4 for fp16.)
    fp32 = draw(model, diffusion)
    for precision in ("bf16", "fp16"):
        images = draw(model, diffusion, precision=precision)
        assert bool(images.isfinite().all())
        torch.testing.assert_close(images, fp32, rtol=0, atol=0.05)


@pytest.mark.slow  # inductor's first compiles of the U-Net (batch 3, then any): ~50 s on 2 cores
def test_compiled_unet_matches_eager(model, diffusion):
    eager = draw(model, diffusion)
    compiled = draw(model, diffusion, compile=True, batch_size=3)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)


def test_channels_last_changes_no_image(diffusion):
    model = make_model()
    eager = draw(model, diffusion)
    torch.testing.assert_close(draw(model, diffusion, channels_last=True), eager, rtol=0, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_matches_eager_on_cuda(diffusion):
    model = make_model().cuda()
    eager = draw(model, diffusion, cuda_graph=False, channels_last=False, batch_size=2)
    graphed = draw(model, diffusion, cuda_graph=True, channels_last=False, batch_size=2)  # batches 2, 2, 1
    torch.testing.assert_close(graphed, eager, rtol=0, atol=1e-5)
    again = draw(model, diffusion, cuda_graph=True, batch_size=3, start=2, n=3, seed=3)
    torch.testing.assert_close(again, eager[2:], rtol=0, atol=1e-4)


def test_progress_bar_counts_images(model, diffusion, capsys):
    Sampler(model, diffusion, compile=False, batch_size=2).sample(3)
    err = capsys.readouterr().err
    assert "3/3" in err and "img/s" in err
    Sampler(model, diffusion, compile=False, progress=False).sample(3)
    assert capsys.readouterr().err == ""


# ---- files ---------------------------------------------------------------------------------------


@pytest.fixture
def images():
    return torch.linspace(-1, 1, 4 * 3 * 8 * 8).reshape(4, 3, 8, 8)


def test_save_png_grid(images, tmp_path):
    path = save_images(images, tmp_path / "a" / "grid.png", scale=2)
    assert path == tmp_path / "a" / "grid.png"
    with Image.open(path) as im:
        assert im.mode == "RGB" and im.size == (2 * (2 + 2 * 10), 2 * (2 + 2 * 10))  # 2×2 tiles of 8 + padding 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["grid.png"]  # no temporary left behind


def test_save_npz_is_uint8_nhwc(images, tmp_path):
    path = save_images(images, tmp_path / "samples.npz")
    with np.load(path) as f:
        assert list(f.keys()) == ["arr_0"]
        arr = f["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (4, 8, 8, 3)
    assert arr[0, 0, 0, 0] == 0 and arr[-1, -1, -1, -1] == 255
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.npz"]


def test_save_directory_of_pngs_named_by_image_index_at_1_to_1(images, tmp_path):
    path = save_images(images[:, :1], tmp_path / "out" / "imgs", first=998, scale=3, run={"seed": 0})
    assert sorted(p.name for p in path.iterdir()) == ["000998.png", "000999.png", "001000.png", "001001.png",
                                                      "samples.json"]
    with Image.open(path / "001001.png") as im:  # the grid's scale is the grid's alone
        assert im.mode == "L" and im.size == (8, 8)
    with pytest.raises(ValueError, match="holds images of another run \\(differs in seed\\)"):
        save_images(images[:, :1], path, run={"seed": 1})


@pytest.mark.parametrize("name", ["samples.jpg", "samples.PNG.bak", "x.npy"])
def test_save_rejects_other_suffixes(images, tmp_path, name):
    with pytest.raises(ValueError, match=r"\.png.*\.npz"):
        save_images(images, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


# ---- distributed ---------------------------------------------------------------------------------


def _rank(rank, world, init, state, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model = UNet(CONFIG)
        model.load_state_dict(state)
        seen = []  # the batch of every U-Net call: each rank draws only its own block
        model.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
        images = draw(model, GaussianDiffusion(NoiseSchedule.linear(20)), start=1, batch_size=2)
        torch.save((images, seen), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_ranks_all_return_the_single_process_images(model, diffusion, tmp_path):
    mp.spawn(_rank, args=(2, f"file://{tmp_path}/init", model.state_dict(), tmp_path), nprocs=2)
    expected = draw(model, diffusion, start=1, batch_size=2)
    # 5 images over 2 ranks: blocks of 3 (batches 2, 1) and 2, padded to 3 for the gather
    for rank, batches in enumerate([[2, 1], [2]]):
        images, seen = torch.load(tmp_path / f"rank{rank}.pt")
        assert seen == [b for b in batches for _ in range(20)]
        torch.testing.assert_close(images, expected, rtol=0, atol=1e-6)


# ---- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, name", [
    ({"precision": "x"}, "unknown precision 'x'; expected one of: fp32, bf16, fp16"),
    ({"precision": torch.float16}, "precision"),
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": 2.0}, "batch_size"),
    ({"eta": 1.5}, "eta"),
    ({"steps": 1}, "steps"),
    ({"steps": 21}, "steps"),
    ({"compile": "yes"}, "compile"),
    ({"channels_last": 1}, "channels_last"),
    ({"cuda_graph": True}, "cuda_graph=True requires a CUDA device"),
    ({"shape": (3, 8)}, "shape"),
    ({"shape": (3, 0, 8)}, "shape"),
])
def test_bad_options_name_the_argument(model, diffusion, options, name):
    with pytest.raises(ValueError, match=name.replace("(", r"\(")):
        Sampler(model, diffusion, **options)


@pytest.mark.parametrize("args, name", [
    ((0,), "n"), ((-1,), "n"), ((2.0,), "n"), ((2, -1), "seed"), ((2, 2**64), "seed"), ((2, 0, -1), "start"),
])
def test_bad_sample_arguments_name_the_argument(model, diffusion, args, name):
    with pytest.raises(ValueError, match=f"^{name} must be"):
        Sampler(model, diffusion, compile=False).sample(*args)


def test_a_model_without_config_needs_a_shape(diffusion):
    with pytest.raises(ValueError, match=r"shape=\(C, H, W\) is required"):
        Sampler(pointwise, diffusion)
    with pytest.raises(TypeError, match="diffusion must be a GaussianDiffusion"):
        Sampler(pointwise, "linear", shape=SHAPE)
