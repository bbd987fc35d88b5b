"""diffusers interop: the official DDPM configurations convert both ways and compute the same
function, FastDDPMScheduler is DDPMScheduler's step on the fused operator, and diffusers folders
load and sample offline. All models are built from their configs with random weights."""

import json
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel
from safetensors.torch import save_file

from fastddpm import cli
from fastddpm.interop.diffusers import (
    FastDDPMScheduler,
    FastDPMSolverScheduler,
    load_pretrained,
    unet_config_from_diffusers,
    unet_from_diffusers,
    unet_to_diffusers,
)
from fastddpm.unet import PRESETS, UNet, UNetConfig

# unet/config.json of the paper's checkpoints on the hub (as diffusers 0.0.4 wrote them), and
# their schedulers: linear β 1e-4 … 0.02, T = 1000, clipped ε-prediction.
_DDPM = {"act_fn": "silu", "attention_head_dim": None, "center_input_sample": False, "downsample_padding": 0,
         "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2,
         "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3,
         "time_embedding_type": "positional", "_class_name": "UNet2DModel", "_diffusers_version": "0.0.4"}
CIFAR10 = {**_DDPM, "sample_size": 32, "block_out_channels": [128, 256, 256, 256],
           "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
           "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}
LSUN_256 = {**_DDPM, "sample_size": 256, "block_out_channels": [128, 128, 256, 256, 512, 512],
            "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],  # attention at 16×16
            "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4}
SCHEDULER = {"_class_name": "DDPMScheduler", "_diffusers_version": "0.1.1", "beta_end": 0.02, "beta_schedule": "linear",
             "beta_start": 0.0001, "clip_sample": True, "num_train_timesteps": 1000, "trained_betas": None}
REPOS = {  # repo: (unet config, variance_type)
    "google/ddpm-cifar10-32": (CIFAR10, "fixed_large"),
    "google/ddpm-celebahq-256": (LSUN_256, "fixed_small"),
    "google/ddpm-church-256": (LSUN_256, "fixed_small"),
    "google/ddpm-bedroom-256": (LSUN_256, "fixed_small"),
    "google/ddpm-cat-256": (LSUN_256, "fixed_small"),
}
TINY = {**_DDPM, "sample_size": 16, "block_out_channels": [16, 32], "norm_num_groups": 8,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"]}


def shrunk(config):
    """The 256² models at 1/8 width (GroupNorm 8) and 64² (attention then at 4×4): same structure."""
    if config["sample_size"] != 256:
        return config
    return {**config, "sample_size": 64, "norm_num_groups": 8, "block_out_channels": [w // 8 for w in config["block_out_channels"]]}


def diffusers_unet(config, seed=0):
    """A UNet2DModel of ``config`` with every weight randomised (no zero-initialised layer hides a bug)."""
    torch.manual_seed(seed)
    model = UNet2DModel(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


# ---- the U-Net ------------------------------------------------------------------------------------


def test_import_fastddpm_does_not_import_diffusers():
    code = "import sys, fastddpm, fastddpm.interop, fastddpm.cli; assert 'diffusers' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_missing_diffusers_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    monkeypatch.delitem(sys.modules, "fastddpm.interop.diffusers")
    with pytest.raises(ImportError, match=r"pip install fastddpm\[diffusers\]"):
        import fastddpm.interop.diffusers  # noqa: F401


def test_official_configs_are_the_paper_presets():
    assert unet_config_from_diffusers(CIFAR10) == replace(PRESETS["ddpm-cifar10"], dropout=0.0)
    assert unet_config_from_diffusers(LSUN_256) == PRESETS["ddpm-256"]


@pytest.mark.parametrize("repo", REPOS)
def test_converted_unet_computes_the_same_function(repo):
    theirs = diffusers_unet(shrunk(REPOS[repo][0]))
    ours = unet_from_diffusers(theirs)
    size = ours.config.resolution
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 3, size, size, generator=g), torch.tensor([0, 999])
    with torch.no_grad():
        expected, got = theirs(x, t).sample, ours(x, t)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("repo", REPOS)
def test_round_trip_is_the_identity(repo):
    theirs = diffusers_unet(shrunk(REPOS[repo][0]))
    back = unet_to_diffusers(unet_from_diffusers(theirs))
    assert back.state_dict().keys() == theirs.state_dict().keys()
    assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in back.state_dict().items())
    ours = UNet(UNetConfig(in_channels=3, resolution=16, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                           attn_resolutions=(8,), groups=8, learned_variance=True))
    again = unet_from_diffusers(unet_to_diffusers(ours))
    assert again.config == ours.config
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in again.state_dict().items())


def test_class_conditional_unets_convert_both_ways():
    # fastddpm's K classes and null class are diffusers' K + 1 class embeddings, the null class last
    theirs = diffusers_unet({**TINY, "num_class_embeds": 4})
    ours = unet_from_diffusers(theirs)
    assert ours.config.num_classes == 3
    x, t = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 5, 500, 999])
    y = torch.tensor([0, 1, 2, 3])  # 3: the null class
    with torch.no_grad():
        expected, got = theirs(x, t, class_labels=y).sample, ours(x, t, y)
        assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
        assert torch.equal(ours(x, t), ours(x, t, torch.full((4,), 3)))
    back = unet_to_diffusers(ours)
    assert back.config.num_class_embeds == 4
    assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in back.state_dict().items())
    with pytest.raises(ValueError, match="UNet2DModel num_class_embeds=1 is not supported"):
        unet_config_from_diffusers({**TINY, "num_class_embeds": 1})


def test_a_state_dict_that_does_not_map_lists_the_tensors():
    model = diffusers_unet(TINY)
    state = dict(model.state_dict())
    del state["mid_block.attentions.0.to_q.bias"]
    state["mid_block.attentions.0.extra"] = torch.zeros(3)
    state["conv_out.weight"] = torch.zeros(3, 16, 1, 1)
    with pytest.raises(ValueError) as err:
        unet_from_diffusers(SimpleNamespace(config=model.config, state_dict=lambda: state))
    message = str(err.value)
    assert "missing (1): mid_block.attentions.0.to_q.bias" in message
    assert "unmapped (1): mid_block.attentions.0.extra" in message
    assert "wrong shape (1): conv_out.weight (3, 16, 1, 1) (needs (3, 16, 3, 3))" in message


@pytest.mark.parametrize("field, value", [
    ("flip_sin_to_cos", True), ("freq_shift", 0), ("downsample_padding", 1), ("norm_eps", 1e-5),
    ("attention_head_dim", 8), ("resnet_time_scale_shift", "scale_shift"), ("class_embed_type", "timestep"),
    ("time_embedding_type", "fourier"), ("center_input_sample", True), ("mid_block_type", None),
    ("down_block_types", "CrossAttnDownBlock2D"), ("up_block_types", ["UpBlock2D", "AttnUpBlock2D"]),
    ("out_channels", 4), ("time_embedding_dim", 100),
])
def test_unsupported_unet_fields_are_named(field, value):
    config = {**TINY, field: value}
    if field == "down_block_types":
        config[field] = ["DownBlock2D", value]
    with pytest.raises(ValueError, match=f"UNet2DModel {field}="):
        unet_config_from_diffusers(config)


# ---- the scheduler ---------------------------------------------------------------------------------


@pytest.mark.parametrize("option, value", [
    ("thresholding", True), ("variance_type", "learned"), ("variance_type", "fixed_large_log"),
    ("clip_sample_range", 2.0), ("beta_schedule", "laplace"), ("rescale_betas_zero_snr", True),
    ("prediction_type", "flow"), ("timestep_spacing", "karras"),
])
def test_unsupported_scheduler_options_are_named(option, value):
    with pytest.raises(ValueError, match=f"DDPMScheduler {option}="):
        FastDDPMScheduler(**{option: value})


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"])
def test_schedules_are_diffusers_schedules(beta_schedule):
    theirs, ours = DDPMScheduler(beta_schedule=beta_schedule), FastDDPMScheduler(beta_schedule=beta_schedule)
    # fastddpm's tables are float64; diffusers' float32 cumprod drifts by up to 1.3e-5 (cosine, t → T)
    assert torch.allclose(ours.schedule.betas, theirs.betas.double(), rtol=1e-6, atol=0)
    assert torch.allclose(ours.schedule.alphas_cumprod, theirs.alphas_cumprod.double(), rtol=2e-5, atol=0)
    betas = torch.linspace(1e-4, 0.03, 100, dtype=torch.float64)
    assert torch.equal(FastDDPMScheduler(num_train_timesteps=100, trained_betas=betas.tolist()).schedule.betas, betas)


@pytest.mark.parametrize("spacing, offset", [("leading", 0), ("leading", 1), ("linspace", 0), ("trailing", 0)])
@pytest.mark.parametrize("n", [1, 7, 33, 50, 1000])
def test_set_timesteps_chooses_diffusers_timesteps(spacing, offset, n):
    config = {"timestep_spacing": spacing, "steps_offset": offset}
    theirs, ours = DDPMScheduler(**config), FastDDPMScheduler(**config)
    if offset and n == 1000:  # diffusers would step from t = 1000, past the schedule
        with pytest.raises(ValueError, match="timesteps must lie in"):
            ours.set_timesteps(n)
        return
    theirs.set_timesteps(n)
    ours.set_timesteps(n)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    assert [ours.previous_timestep(t) for t in ours.timesteps] == [int(theirs.previous_timestep(t)) for t in theirs.timesteps]


def _schedulers(**config):
    """(DDPMScheduler, the same evaluated in float64 on fastddpm's ᾱ, FastDDPMScheduler)."""
    theirs, exact, ours = DDPMScheduler(**config), DDPMScheduler(**config), FastDDPMScheduler(**config)
    exact.alphas_cumprod, exact.one = ours.schedule.alphas_cumprod.clone(), torch.tensor(1.0, dtype=torch.float64)
    return theirs, exact, ours


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_small_log", "fixed_large", "learned_range"])
@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("clip", [True, False])
def test_step_is_diffusers_step(variance, prediction, clip):
    config = {"variance_type": variance, "prediction_type": prediction, "clip_sample": clip}
    # respaced (50 leading steps, 33 trailing: the last step starts at t = 29 and still adds noise) and full
    for spacing, n in (("leading", None), ("leading", 50), ("trailing", 33)):
        theirs, exact, ours = _schedulers(**config, timestep_spacing=spacing)
        for s in (theirs, exact, ours):
            if n is not None:
                s.set_timesteps(n)
        g = torch.Generator().manual_seed(n or 0)
        for t in ours.timesteps[[0, len(ours.timesteps) // 2, -2, -1]]:
            out = torch.randn(2, 6 if variance == "learned_range" else 3, 8, 8, generator=g)
            x = torch.randn(2, 3, 8, 8, generator=g)
            a, b, c = (s.step(out, t, x if s is not exact else x.double(), generator=torch.Generator().manual_seed(int(t)))
                       for s in (theirs, exact, ours))
            # the same equations in float64 vs the fused float32 kernel
            torch.testing.assert_close(c.prev_sample, b.prev_sample.float(), rtol=1e-5, atol=1e-5)
            # x̂₀ = √(1/ᾱ) x − √(1/ᾱ − 1) ε: near T the two terms are ~160 |x| and cancel, ~2e-5 in float32
            torch.testing.assert_close(c.pred_original_sample, b.pred_original_sample.float(), rtol=1e-5, atol=1e-4)
            # diffusers itself, whose float32 1 − ᾱ_t/ᾱ_{t−1} loses digits near t = 0 (2e-4 at t = 1)
            torch.testing.assert_close(c.prev_sample, a.prev_sample, rtol=1e-4, atol=5e-4)


def test_step_without_return_dict_and_an_unknown_timestep():
    ours = FastDDPMScheduler()
    ours.set_timesteps(10)
    prev, x0 = ours.step(torch.zeros(1, 3, 4, 4), ours.timesteps[0], torch.zeros(1, 3, 4, 4), return_dict=False)
    assert prev.shape == x0.shape == (1, 3, 4, 4)
    with pytest.raises(ValueError, match="timestep 5 is not one of the scheduler's timesteps"):
        ours.step(torch.zeros(1, 3, 4, 4), 5, torch.zeros(1, 3, 4, 4))


def test_add_noise_is_diffusers_add_noise():
    theirs, ours = DDPMScheduler(), FastDDPMScheduler()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 1, 500, 999])
    torch.testing.assert_close(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t), rtol=1e-5, atol=1e-5)


def test_ddpm_pipeline_runs_on_the_fast_scheduler():
    unet = diffusers_unet(TINY)
    config = DDPMScheduler(variance_type="fixed_large").config
    fast = DDPMPipeline(unet=unet, scheduler=FastDDPMScheduler.from_config(config))
    slow = DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(config))
    fast.set_progress_bar_config(disable=True)
    slow.set_progress_bar_config(disable=True)

    def images(pipe):
        return pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=5, output_type="np").images

    first = images(fast)
    assert first.shape == (2, 16, 16, 3)
    assert (images(fast) == first).all()  # the same generator gives the same images
    assert abs(images(slow) - first).max() < 1e-3  # and the images DDPMScheduler gives


# ---- the DPM-Solver++ scheduler ------------------------------------------------------------------------


@pytest.mark.parametrize("config", [
    {}, {"algorithm_type": "sde-dpmsolver++"}, {"solver_order": 3, "timestep_spacing": "trailing"},
    {"use_karras_sigmas": True, "prediction_type": "v_prediction"},
    {"algorithm_type": "sde-dpmsolver++", "timestep_spacing": "leading", "steps_offset": 1},
    {"variance_type": "learned_range"},
])
def test_dpm_solver_steps_are_diffusers_steps(config):
    """Each step from the same sample and model output, the SDE's noise from the same generator,
    with diffusers on fastddpm's σ's (its own come from a float32 cumprod, 3e-5 off)."""
    theirs, ours = DPMSolverMultistepScheduler(**config), FastDPMSolverScheduler(**config)
    theirs.set_timesteps(12)
    ours.set_timesteps(12)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    sigmas = ours.chain.row("sigma_s") / ours.chain.row("alpha_s")
    theirs.sigmas = torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)]).float()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=g)
    channels = 6 if config.get("variance_type") else 3
    for t in ours.timesteps:
        out = torch.randn(2, channels, 8, 8, generator=g)
        expected = theirs.step(out, t, x, generator=torch.Generator().manual_seed(int(t))).prev_sample
        got = ours.step(out, t, x, generator=torch.Generator().manual_seed(int(t))).prev_sample
        torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-5)
        x = expected


@pytest.mark.parametrize("option, value", [
    ("thresholding", True), ("solver_type", "heun"), ("algorithm_type", "dpmsolver"), ("use_lu_lambdas", True),
    ("final_sigmas_type", "sigma_min"), ("prediction_type", "flow_prediction"), ("beta_schedule", "laplace"),
])
def test_unsupported_dpm_solver_options_are_named(option, value):
    with pytest.raises(ValueError, match=f"DPMSolverMultistepScheduler {option}="):
        FastDPMSolverScheduler(**{option: value})


def test_a_pipeline_runs_on_the_fast_dpm_solver():
    unet = diffusers_unet(TINY)
    config = DDPMScheduler(variance_type="fixed_large").config  # a DDPM checkpoint's scheduler, sampled by DPM-Solver++
    fast = DDPMPipeline(unet=unet, scheduler=FastDPMSolverScheduler.from_config(config))
    slow = DDPMPipeline(unet=unet, scheduler=DPMSolverMultistepScheduler.from_config(config))
    for pipe in (fast, slow):
        pipe.set_progress_bar_config(disable=True)

    def images(pipe):
        return pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=10,
                    output_type="np").images

    first = images(fast)
    assert first.shape == (2, 16, 16, 3) and (images(fast) == first).all()
    assert abs(images(slow) - first).max() < 2e-3  # diffusers' σ's, from its float32 cumprod


# ---- folders and the command line ------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusers")
    unet = diffusers_unet(TINY)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(variance_type="fixed_large")).save_pretrained(root / "pipeline")
    unet.save_pretrained(root / "model")
    unet.save_pretrained(root / "pickle", safe_serialization=False)
    return SimpleNamespace(root=root, unet=unet)


def _same_function(ours, theirs):
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 900])
    with torch.no_grad():
        expected = theirs(x, t).sample
        assert (ours(x, t) - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_load_a_pipeline_folder(folders):
    model, diffusion = load_pretrained(folders.root / "pipeline")
    _same_function(model, folders.unet)
    assert diffusion.config()["variance"] == "fixed_large" and diffusion.prediction == "eps" and diffusion.clip_denoised
    assert torch.allclose(diffusion.schedule.betas, torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))


def test_load_a_model_folder(folders, tmp_path):
    with pytest.warns(UserWarning, match="using DDPMScheduler's defaults"):
        model, diffusion = load_pretrained(folders.root / "model")
    _same_function(model, folders.unet)
    assert diffusion.variance == "fixed_small"
    DDPMScheduler(prediction_type="v_prediction", clip_sample=False).save_config(folders.root / "model")
    model, diffusion = load_pretrained(folders.root / "model")
    assert (diffusion.prediction, diffusion.clip_denoised) == ("v", False)


def test_load_a_hub_style_folder(tmp_path):
    """The hub's configs predate most UNet2DModel fields: the missing ones take diffusers' defaults."""
    config = shrunk(LSUN_256)
    (tmp_path / "unet").mkdir()
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps(config))
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({**SCHEDULER, "variance_type": "fixed_large"}))
    (tmp_path / "model_index.json").write_text(json.dumps(
        {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDPMScheduler"]}))
    theirs = diffusers_unet(config)
    save_file(theirs.state_dict(), tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    model, diffusion = load_pretrained(tmp_path)
    assert model.config == unet_config_from_diffusers(config) and diffusion.variance == "fixed_large"


def test_sample_from_a_diffusers_folder(folders, tmp_path):
    out = tmp_path / "x.png"
    result = subprocess.run([sys.executable, "-m", "fastddpm", "sample", "--from-diffusers", str(folders.root / "pipeline"),
                             "--n", "2", "--steps", "5", "--no-compile", "--out", str(out)],
                            check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "wrote 2 samples" in result.stdout
    from PIL import Image

    assert Image.open(out).size[1] == 16 + 2 * 2  # one row of 16×16 images with 2-pixel padding


def _bad_scheduler(root):
    folder = root / "bad-scheduler"
    if not folder.exists():
        DDPMPipeline(unet=diffusers_unet(TINY), scheduler=DDPMScheduler(thresholding=True)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("make, message", [
    (lambda root: root / "nowhere", "diffusers folder not found"),
    (lambda root: root, "has neither model_index.json (a pipeline) nor config.json (a model)"),
    (lambda root: root / "pickle", "holds only diffusion_pytorch_model.bin, a pickle"),
    (_bad_scheduler, "DDPMScheduler thresholding=True is not supported"),
])
def test_bad_folders_are_one_line_errors(folders, capsys, make, message):
    assert cli.main(["sample", "--from-diffusers", str(make(folders.root)), "--no-compile", "--out", "x.png"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("flags", [[], ["--checkpoint", "c.safetensors", "--from-diffusers", "d"]])
def test_sample_needs_exactly_one_source(capsys, flags):
    assert cli.main(["sample", *flags]) == 2
    assert "give exactly one of --checkpoint PATH and --from-diffusers PATH" in capsys.readouterr().err


def test_a_bin_folder_fails_without_traceback(folders):
    result = subprocess.run([sys.executable, "-m", "fastddpm", "sample", "--from-diffusers", str(folders.root / "pickle")],
                            check=False, capture_output=True, text=True)
    assert result.returncode == 2 and "a pickle" in result.stderr and result.stderr.count("\n") == 1
