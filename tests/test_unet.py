import json
import math

import pytest
import torch
import torch.nn.functional as F

from fastddpm.unet import PRESETS, AttnBlock, UNet, UNetConfig, timestep_embedding


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def perturbed(model, scale=0.05, seed=0):
    """Randomise all parameters so the zero-initialised layers stop hiding bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.eval()


def tiny_inputs(batch=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return x, t


def closed_form_embedding(t, dim):
    half = dim // 2
    out = torch.empty(len(t), dim, dtype=torch.float64)
    for b, tb in enumerate(t.tolist()):
        for i in range(half):
            arg = tb * math.exp(-math.log(10000) * i / (half - 1))
            out[b, i], out[b, half + i] = math.sin(arg), math.cos(arg)
    return out


# --- size and structure ---

def test_cifar10_parameter_count_matches_paper():
    with torch.device("meta"):
        model = UNet.from_preset("ddpm-cifar10")
    assert n_params(model) == 35_746_307


def test_256_structure():
    with torch.device("meta"):
        model = UNet.from_preset("ddpm-256")
    assert n_params(model) == 113_673_219  # the paper's "114M"
    assert len(model.down) == len(model.up) == 6
    has_attn = [any(isinstance(a, AttnBlock) for a in level.attns) for level in model.down]
    assert has_attn == [False, False, False, False, True, False]  # resolution 16 only
    assert [hasattr(level, "downsample") for level in model.down] == [True] * 5 + [False]
    assert [hasattr(level, "upsample") for level in model.up] == [False] + [True] * 5
    assert all(len(level.blocks) == 3 for level in model.up)


def test_cifar10_attention_placement():
    with torch.device("meta"):
        model = UNet.from_preset("ddpm-cifar10")
    for levels in (model.down, model.up):
        assert [any(isinstance(a, AttnBlock) for a in level.attns) for level in levels] == [False, True, False, False]


# --- forward ---

@pytest.mark.parametrize("name, batch", [("ddpm-tiny", 2), ("ddpm-digits", 2), ("ddpm-cifar10", 1)])
def test_output_shape_and_zero_init(name, batch):
    model = UNet.from_preset(name).eval()
    cfg = model.config
    x = torch.randn(batch, cfg.in_channels, cfg.resolution, cfg.resolution)
    with torch.no_grad():
        out = model(x, torch.randint(0, 1000, (batch,)))
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised conv_out


def test_256_forward_reduced_width():
    model = perturbed(UNet.from_preset("ddpm-256", ch=32, groups=8))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = model(x, torch.tensor([10]))
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["ddpm-tiny", "ddpm-digits"])
def test_learned_variance_doubles_output_channels(name):
    model = UNet.from_preset(name, learned_variance=True)
    cfg = model.config
    assert cfg.out_channels == 2 * cfg.in_channels
    x = torch.randn(2, cfg.in_channels, cfg.resolution, cfg.resolution)
    assert model(x, torch.tensor([0, 999])).shape == (2, 2 * cfg.in_channels, cfg.resolution, cfg.resolution)


def test_other_sizes_run():
    model = perturbed(UNet.from_preset("ddpm-tiny"))
    with torch.no_grad():
        assert model(torch.randn(1, 3, 8, 24), torch.tensor([5])).shape == (1, 3, 8, 24)


def test_float_timesteps_match_integer():
    model = perturbed(UNet.from_preset("ddpm-tiny"))
    x, t = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x, t.float()), model(x, t), rtol=0, atol=0)


def test_timesteps_change_output():
    model = perturbed(UNet.from_preset("ddpm-tiny"))
    x, _ = tiny_inputs(batch=1)
    with torch.no_grad():
        assert not torch.allclose(model(x, torch.tensor([1])), model(x, torch.tensor([500])))


def test_backward_reaches_all_parameters():
    model = perturbed(UNet.from_preset("ddpm-tiny")).train()
    x, t = tiny_inputs()
    model(x, t).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# --- time embedding ---

def test_timestep_embedding_closed_form():
    t = torch.tensor([0, 1, 7, 250, 999])
    expected = closed_form_embedding(t, 128)
    torch.testing.assert_close(timestep_embedding(t, 128, torch.float64), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(timestep_embedding(t, 128).double(), expected, rtol=0, atol=2e-4)


def test_model_feeds_closed_form_embedding_to_time_mlp():
    model = UNet.from_preset("ddpm-tiny").double()
    seen = []
    model.time_embed.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    t = torch.tensor([3, 999])
    model(torch.randn(2, 3, 16, 16, dtype=torch.float64), t)
    torch.testing.assert_close(seen[0], closed_form_embedding(t, model.config.ch), rtol=0, atol=1e-12)


# --- memory formats, compile, dtypes ---

def test_channels_last_matches_contiguous():
    model = perturbed(UNet.from_preset("ddpm-tiny"))
    x, t = tiny_inputs()
    with torch.no_grad():
        ref = model(x, t)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last), t)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_compile_fullgraph_matches_eager():
    # aot_eager traces the full graph (no graph breaks allowed) without the slow C++ codegen
    model = perturbed(UNet.from_preset("ddpm-tiny"))
    x, t = tiny_inputs()
    with torch.no_grad():
        ref = model(x, t)
        out = torch.compile(model, fullgraph=True, backend="aot_eager")(x, t)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_compile_inductor_fullgraph_matches_eager():
    model = perturbed(UNet.from_preset("ddpm-tiny"))
    x, t = tiny_inputs()
    with torch.no_grad():
        ref = model(x, t)
        out = torch.compile(model, fullgraph=True)(x, t)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_float64_model():
    model = perturbed(UNet.from_preset("ddpm-tiny"))
    x, t = tiny_inputs()
    with torch.no_grad():
        ref = model(x, t)
        out = model.double()(x.double(), t)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref.double(), rtol=0, atol=1e-4)


def test_bf16_autocast():
    model = perturbed(UNet.from_preset("ddpm-tiny"))
    x, t = tiny_inputs()
    with torch.no_grad():
        ref = model(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=0.1)


# --- errors ---

def test_unknown_preset():
    with pytest.raises(ValueError, match="nope.*ddpm-cifar10"):
        UNet.from_preset("nope")


def test_unknown_override():
    with pytest.raises(ValueError, match="chanels"):
        UNet.from_preset("ddpm-tiny", chanels=3)


@pytest.mark.parametrize("x, t, match", [
    (torch.randn(2, 1, 16, 16), torch.zeros(2), "channels"),
    (torch.randn(3, 16, 16), torch.zeros(3), "4-D"),
    (torch.randn(2, 3, 16, 13), torch.zeros(2), "divisible"),
    (torch.randn(2, 3, 16, 16), torch.zeros(3), "t must"),
    (torch.randn(2, 3, 16, 16), torch.zeros(2, 1), "t must"),
    (torch.randn(2, 3, 16, 16), torch.tensor(5), "t must"),
])
def test_bad_inputs(x, t, match):
    model = UNet.from_preset("ddpm-tiny")
    with pytest.raises(ValueError, match=match):
        model(x, t)


@pytest.mark.parametrize("overrides, match", [
    (dict(groups=12), "groups"),
    (dict(resolution=18), "resolution"),
    (dict(ch_mult=(1, 0)), "ch_mult"),
    (dict(ch_mult=()), "ch_mult"),
    (dict(ch=0), "ch"),
    (dict(num_res_blocks=1.5), "num_res_blocks"),
    (dict(attn_resolutions=(5,)), "attn_resolutions"),
    (dict(dropout=1.0), "dropout"),
    (dict(learned_variance=1), "learned_variance"),
])
def test_bad_config(overrides, match):
    with pytest.raises(ValueError, match=match):
        UNet.from_preset("ddpm-tiny", **overrides)


# --- config serialisation ---

@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_json_round_trip(name):
    for cfg in (PRESETS[name], UNetConfig.from_dict({**PRESETS[name].to_dict(), "learned_variance": True})):
        back = UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert back == cfg and isinstance(back.ch_mult, tuple)


def test_config_from_dict_rejects_bad_keys():
    d = PRESETS["ddpm-tiny"].to_dict()
    with pytest.raises(ValueError, match="colour"):
        UNetConfig.from_dict({**d, "colour": 1})
    del d["ch"]
    with pytest.raises(ValueError, match="ch"):
        UNetConfig.from_dict(d)


def test_model_keeps_config():
    model = UNet.from_preset("ddpm-digits", dropout=0.2)
    assert model.config == UNetConfig.from_dict({**PRESETS["ddpm-digits"].to_dict(), "dropout": 0.2})


def test_attention_is_one_head_of_4d_sdpa(monkeypatch):
    """[B, 1, L, C] into scaled_dot_product_attention, which the flash and memory-efficient kernels
    take (3-D inputs always ran the math path), computing the same single-head attention."""
    block = AttnBlock(16, 4)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    shapes, sdpa = [], F.scaled_dot_product_attention

    def recording(q, k, v, **kw):
        shapes.append(tuple(q.shape))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    out = block(x)
    assert shapes == [(2, 1, 16, 16)]
    h = block.norm(x).flatten(2).transpose(1, 2)
    weights = torch.softmax(block.q(h) @ block.k(h).transpose(1, 2) / 16**0.5, dim=-1)
    expected = x + block.proj_out(weights @ block.v(h)).transpose(1, 2).reshape(2, 16, 4, 4)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
