"""Conditioning (issue 15): model_kwargs reach the model unchanged through every model-calling
API, image k with the same conditioning is the same in any batch, bad conditioning is a one-line
error naming the key; the class-conditional U-Net."""

import pytest
import torch

from fastddpm import GaussianDiffusion, NoiseSchedule, UNet, UNetConfig
from fastddpm.checkpoint import load_checkpoint, save_checkpoint
from fastddpm.sampler import Sampler

CONFIG = UNetConfig(in_channels=1, resolution=8, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                    groups=8, num_classes=3)


def conditional_unet():
    torch.manual_seed(0)
    model = UNet(CONFIG)
    with torch.no_grad():  # random weights everywhere: the zero-initialised output would hide the labels
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


class Baked(torch.nn.Module):
    """The conditional U-Net with the labels of the batch fixed: what the model_kwargs path must equal."""

    def __init__(self, model, y):
        super().__init__()
        self.model, self.y = model, y

    def forward(self, x, t):
        return self.model(x, t, self.y)


@pytest.fixture(scope="module")
def model():
    return conditional_unet()


@pytest.fixture(scope="module")
def diffusion():
    return GaussianDiffusion(NoiseSchedule.linear(20), levels=17)


def test_every_model_call_hands_the_conditioning_to_the_model(model, diffusion):
    y = torch.tensor([0, 2, 1, 3])  # 3: the null class
    baked, kw = Baked(model, y), {"model_kwargs": {"y": y}}
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    t = torch.tensor([0, 5, 11, 19])
    x_t = diffusion.q_sample(x0, t, seed=1)
    torch.manual_seed(0)
    pairs = [
        (lambda **k: diffusion.training_losses(model, x0, t, seed=3, **k)["loss"],
         lambda: diffusion.training_losses(baked, x0, t, seed=3)["loss"]),
        (lambda **k: diffusion.p_mean_variance(model, x_t, t, **k)["mean"],
         lambda: diffusion.p_mean_variance(baked, x_t, t)["mean"]),
        (lambda **k: diffusion.p_sample(model, x_t, t, seed=4, **k), lambda: diffusion.p_sample(baked, x_t, t, seed=4)),
        (lambda **k: diffusion.vlb_terms(model, x0, x_t, t, **k), lambda: diffusion.vlb_terms(baked, x0, x_t, t)),
        (lambda **k: diffusion.nll(model, x0, torch.Generator().manual_seed(5), False, **k)["total_bpd"],
         lambda: diffusion.nll(baked, x0, torch.Generator().manual_seed(5), False)["total_bpd"]),
    ]
    for solver in ("ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde"):
        pairs.append((lambda s=solver, **k: diffusion.sample(model, (4, 1, 8, 8), steps=4, seed=6, solver=s,
                                                              progress=False, **k),
                      lambda s=solver: diffusion.sample(baked, (4, 1, 8, 8), steps=4, seed=6, solver=s, progress=False)))
        pairs.append((lambda s=solver, **k: Sampler(model, diffusion, solver=s, steps=4, progress=False,
                                                    compile=False).sample(4, seed=6, **k),
                      lambda s=solver: Sampler(baked, diffusion, solver=s, steps=4, progress=False, compile=False,
                                               shape=(1, 8, 8)).sample(4, seed=6)))
    for conditioned, reference in pairs:
        a, b = conditioned(**kw), reference()
        assert torch.equal(a, b)
        assert not torch.equal(conditioned(), b)  # the labels change the result


def test_image_k_with_the_same_conditioning_is_the_same_in_any_batch(model, diffusion):
    y = torch.tensor([2, 0, 1, 1, 3, 0, 2])
    sampler = Sampler(model, diffusion, solver="dpmpp_2m_sde", steps=5, batch_size=7, progress=False, compile=False)
    whole = sampler.sample(7, seed=9, model_kwargs={"y": y})
    small = Sampler(model, diffusion, solver="dpmpp_2m_sde", steps=5, batch_size=3, progress=False, compile=False)
    # equal up to the U-Net's float rounding at another batch size (as unconditional sampling, test_sampler)
    torch.testing.assert_close(small.sample(7, seed=9, model_kwargs={"y": y}), whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(small.sample(3, seed=9, start=4, model_kwargs={"y": y[4:]}), whole[4:], rtol=0, atol=1e-5)
    other = small.sample(7, seed=9, model_kwargs={"y": y.roll(1)})  # labels one image off: far from it
    assert all((other[i] - whole[i]).abs().max() > 1e-3 for i in range(7) if y[i] != y.roll(1)[i])  # 100x the tolerance


def test_non_tensor_values_pass_as_they_are(diffusion):
    seen = []

    def model(x, t, scale, mode):
        seen.append(mode)
        return x * scale.view(-1, 1, 1, 1)

    x = torch.randn(2, 1, 8, 8)
    out = diffusion.p_mean_variance(model, x, torch.tensor([3, 4]), model_kwargs={"scale": torch.tensor([0.5, 2.0]),
                                                                                "mode": "fast"})
    assert seen == ["fast"] and out["mean"].shape == x.shape


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"y": torch.tensor([0, 1, 2])}, r"model_kwargs\['y'\] has shape \(3,\): its first dimension must be the batch, 4"),
        ({"y": torch.tensor(1)}, r"model_kwargs\['y'\] has shape \(\): its first dimension must be the batch, 4"),
        ({"y": torch.zeros(4, dtype=torch.int64, device="meta")}, r"model_kwargs\['y'\] is on meta, the images on cpu"),
        ([1, 2], "model_kwargs must be a dict of argument name -> value, got list"),
    ],
)
def test_bad_conditioning_names_the_key(model, diffusion, kwargs, message):
    x = torch.randn(4, 1, 8, 8)
    with pytest.raises(ValueError, match=message):
        diffusion.training_losses(model, x, seed=0, model_kwargs=kwargs)
    if isinstance(kwargs, dict) and kwargs["y"].device.type == "cpu":
        with pytest.raises(ValueError, match=message):
            Sampler(model, diffusion, steps=2, progress=False, compile=False).sample(4, model_kwargs=kwargs)


def test_the_class_conditional_unet(model, tmp_path):
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 7, 15])
    null = torch.full((3,), 3)
    assert torch.equal(model(x, t), model(x, t, null))  # no labels: the null class
    outputs = [model(x, t, torch.full((3,), c)) for c in range(4)]
    assert all(not torch.equal(outputs[a], outputs[b]) for a in range(4) for b in range(a + 1, 4))
    assert model.class_embed.weight.shape == (4, 4 * CONFIG.ch)
    with pytest.raises(ValueError, match=r"y must be int64 class labels of shape \[B\] = \[3\], got \(3,\) torch.int32"):
        model(x, t, null.int())
    unconditional = UNet(UNetConfig(**{**CONFIG.to_dict(), "num_classes": 0}))
    assert unconditional.class_embed is None
    with pytest.raises(ValueError, match=r"y \(class labels\) was given to an unconditional U-Net"):
        unconditional(x, t, null)
    with pytest.raises(ValueError, match="num_classes must be a non-negative integer, got -1"):
        UNetConfig(**{**CONFIG.to_dict(), "num_classes": -1})
    path = save_checkpoint(tmp_path / "ck.safetensors", model, GaussianDiffusion(NoiseSchedule.linear(20)))
    loaded, _, header = load_checkpoint(path)
    assert header["unet"]["num_classes"] == 3 and torch.equal(loaded(x, t, null), model(x, t, null))
