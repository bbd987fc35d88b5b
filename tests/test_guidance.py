"""Classifier-free guidance: the fused steps' combination of the two branches against the reference
and a float64 closed form, the operators' checks, and the sampler's classes and guidance (one
U-Net call of 2B a step, the eager chain's images, batch invariance, w = 0 and 1 exact)."""

import itertools

import pytest
import torch

from fastddpm import GaussianDiffusion, NoiseSchedule, reference, rng
from fastddpm.ops import FUSED, REFERENCE
from fastddpm.sampler import Sampler
from fastddpm.solvers import DPMSolverChain
from fastddpm.unet import UNet, UNetConfig

B, SHAPE = 4, (3, 5, 7)  # N = 105: the last quarter short
PREDICTIONS, VARIANCES = ("eps", "x0", "v"), ("fixed_small", "fixed_large", "learned_range")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def both_branches(variance, seed, dtype=torch.float32):
    """A model output [2B, C or 2C, ...]: the conditional rows, then the unconditional ones."""
    channels = 2 * SHAPE[0] if variance == "learned_range" else SHAPE[0]
    out = torch.randn(2 * B, channels, *SHAPE[1:], generator=gen(seed))
    if variance == "learned_range":
        out[:, SHAPE[0]:] = out[:, SHAPE[0]:].tanh()
    return out.to(dtype)


@pytest.fixture(scope="module")
def coef():
    return NoiseSchedule.cosine(1000).coefficients("cpu", torch.float32)


def test_guided_output_is_the_closed_form_in_float64():
    out = both_branches("learned_range", 0).double()
    cond, uncond = out[:B], out[B:]
    for w in (0.0, 1.0, 2.5, -0.5):
        got = reference.guided_output(out, w, "learned_range")
        expected = uncond[:, :3] + w * (cond[:, :3] - uncond[:, :3])
        assert torch.equal(got[:, :3], expected) and torch.equal(got[:, 3:], cond[:, 3:])
    assert torch.equal(reference.guided_output(out[:, :3], 0.0, "fixed_small"), uncond[:, :3])


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("variance", VARIANCES)
def test_guided_reverse_step_matches_the_reference(coef, prediction, variance):
    """The native kernel (through the operator) against the eager reference, ≤ 1e-6 with given noise,
    for DDPM and DDIM and every model dtype; the noise the kernel draws is the contract's."""
    g = gen(1)
    x, z = torch.randn(B, *SHAPE, generator=g), torch.randn(B, *SHAPE, generator=g)
    t = torch.tensor([0, 1, 500, 999])
    for i, (w, eta, dtype) in enumerate(itertools.product((0.0, 3.0), (None, 0.5), DTYPES)):
        out = both_branches(variance, 10 + i, dtype)
        args = (x, out, t, coef.table, z, None, prediction, variance, True, eta, w)
        torch.testing.assert_close(FUSED.reverse_step(*args), REFERENCE.reverse_step(*args), rtol=1e-6, atol=1e-6)
    key = rng.noise_key(2024, 7)
    args = (x, out, t, coef.table, None, key, prediction, variance, False, None, 2.0)
    drawn = rng.normal_at_key(key, x, rng.STREAM_REVERSE, step=t)
    torch.testing.assert_close(FUSED.reverse_step(*args), REFERENCE.reverse_step(x, out, t, coef.table, drawn, None,
                                                                                 *args[6:]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_guided_solver_step_matches_the_reference(prediction):
    chain = DPMSolverChain.build(NoiseSchedule.linear(1000), 12, order=3, stochastic=True)
    table, step = chain.table.float(), torch.tensor([0, 2, 7, 11])
    g = gen(2)
    x, z = torch.randn(B, *SHAPE, generator=g), torch.randn(B, *SHAPE, generator=g)
    for slots, stochastic, variance, dtype in itertools.product((0, 1, 2), (False, True), ("fixed_small", "learned_range"),
                                                                DTYPES):
        out, history = both_branches(variance, slots, dtype), torch.randn(slots, B, *SHAPE, generator=g)
        results = []
        for backend in (FUSED, REFERENCE):
            x_, h_ = x.clone(), history.clone()
            backend.solver_step(x_, out, step, chain.timesteps[step], table, h_, z, None, prediction, variance, True,
                                stochastic, 1.5)
            results.append((x_, h_))
        torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-6, atol=1e-6)


def test_guidance_zero_reads_the_unconditional_branch_alone(coef):
    """w = 0 gives exactly the step on the unconditional output (ε_u + 0 · (ε_c − ε_u) = ε_u), with the
    conditional branch's variance values."""
    x, t = torch.randn(B, *SHAPE, generator=gen(3)), torch.tensor([3, 0, 999, 40])
    out = both_branches("learned_range", 4)
    uncond = torch.cat([out[B:, :3], out[:B, 3:]], 1)
    key = rng.noise_key(1)
    for op in (FUSED, REFERENCE):
        assert torch.equal(op.reverse_step(x, out, t, coef.table, None, key, "v", "learned_range", True, None, 0.0),
                           op.reverse_step(x, uncond, t, coef.table, None, key, "v", "learned_range", True, None))


def test_opcheck_with_guidance(coef):
    x, t = torch.randn(B, *SHAPE, generator=gen(5)), torch.tensor([3, 0, 999, 40])
    torch.library.opcheck(FUSED.reverse_step, (x, both_branches("fixed_small", 6), t, coef.table, None,
                                               rng.noise_key(1), "eps", "fixed_small", True, None, 2.0))
    torch.library.opcheck(FUSED.reverse_step, (x, both_branches("learned_range", 6).to(memory_format=torch.channels_last),
                                               t, coef.table, torch.randn_like(x), None, "x0", "learned_range", False,
                                               0.3, 4.0))
    chain = DPMSolverChain.build(NoiseSchedule.linear(1000), 6, order=2, stochastic=True)
    step = torch.tensor([0, 1, 3, 5])
    torch.library.opcheck(FUSED.solver_step, (x.clone(), both_branches("learned_range", 7), step, chain.timesteps[step],
                                              chain.table.float(), torch.randn(1, B, *SHAPE), None, rng.noise_key(2),
                                              "eps", "learned_range", True, True, 3.0))


def test_bad_guidance_arguments_are_one_line_errors(coef):
    x, t = torch.zeros(B, *SHAPE), torch.tensor([0, 1, 2, 3])
    one_branch = torch.zeros(B, *SHAPE)
    cases = [
        (lambda: FUSED.reverse_step(x, one_branch, t, coef.table, None, rng.noise_key(0), "eps", "fixed_small", True,
                                    None, 2.0),
         r"reverse_step: model_out must be .* \(8, 3, 5, 7\) on cpu \(guidance: the conditional then the unconditional"),
        (lambda: FUSED.reverse_step(x, both_branches("fixed_small", 0), t, coef.table, None, rng.noise_key(0), "eps",
                                    "fixed_small", True, None, float("nan")), "guidance must be a finite number"),
        (lambda: FUSED.solver_step(x, one_branch, t, t, DPMSolverChain.build(NoiseSchedule.linear(1000), 4).table.float(),
                                   torch.zeros(0, B, *SHAPE), None, None, "eps", "fixed_small", True, False, 1.5),
         r"solver_step: model_out must be .* \(8, 3, 5, 7\)"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match) as raised:
            call()
        assert "\n" not in str(raised.value)


# ---- the sampler ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def conditional():
    """A small class-conditional U-Net with weights far from its (zero-output) initialization."""
    torch.manual_seed(0)
    model = UNet(UNetConfig(in_channels=1, resolution=8, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                            attn_resolutions=(), groups=8, num_classes=3, learned_variance=True)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.class_embed.weight.normal_()
    return model


def guided_by_hand(model, w, null):
    """The guided model as an eager function of (x, t, y): both branches in one call, combined by
    `reference.guided_output` — what the sampler's fused step must reproduce."""

    def guided(x, t, y):
        out = model(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, torch.full_like(y, null)]))
        return reference.guided_output(out, w, "learned_range")

    return guided


@pytest.mark.parametrize("solver", ["ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde"])
def test_guided_sampling_is_the_eager_chain_on_the_guided_model(conditional, solver):
    diffusion = GaussianDiffusion(NoiseSchedule.linear(100), variance="learned_range", loss="hybrid")
    steps = {"ddpm": 20, "ddim": 8, "dpmpp_2m": 6, "dpmpp_2m_sde": 6}[solver]
    calls = []
    hook = conditional.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    sampler = Sampler(conditional, diffusion, solver=solver, steps=steps, batch_size=10, progress=False,
                      classes="balanced", guidance=3.0)
    try:
        images = sampler.sample(5, seed=4, start=1)
    finally:
        hook.remove()
    assert calls == [10] * sampler.solver.num_steps  # one U-Net call of 2B a step, B = batch_size / 2
    labels = (1 + torch.arange(5)) % 3
    eager = GaussianDiffusion(diffusion.schedule, variance="learned_range", loss="hybrid", backend="reference")
    expected = eager.sample(guided_by_hand(conditional, 3.0, 3), (5, 1, 8, 8), solver=solver, steps=steps, seed=4,
                            sample_index=1, progress=False, model_kwargs={"y": labels})
    torch.testing.assert_close(images, expected, rtol=1e-5, atol=1e-5)
    # image k of a seed is the same in any batch, at any position (to the U-Net's float rounding: the
    # CPU convolutions block differently per batch size; the noise and the step are exact)
    alone = Sampler(conditional, diffusion, solver=solver, steps=steps, batch_size=3, progress=False,
                    classes="balanced", guidance=3.0).sample(2, seed=4, start=3)  # chains of 1
    torch.testing.assert_close(alone, images[2:4], rtol=0, atol=1e-5)


def test_guidance_zero_and_one_are_a_single_branch_exactly(conditional):
    diffusion = GaussianDiffusion(NoiseSchedule.linear(100), variance="learned_range", loss="hybrid")
    draw = lambda **kw: Sampler(conditional, diffusion, solver="dpmpp_2m", steps=5, batch_size=6,  # noqa: E731
                                progress=False, **kw).sample(6, seed=2)
    unconditional = draw()
    assert torch.equal(draw(classes="balanced", guidance=0), unconditional)
    conditional_images = draw(classes="balanced")
    assert torch.equal(draw(classes="balanced", guidance=1.0), conditional_images)
    assert torch.equal(draw(classes=torch.arange(6) % 3), conditional_images)  # labels per image
    assert not torch.equal(conditional_images, unconditional)
    assert not torch.equal(draw(classes="balanced", guidance=2.0), conditional_images)


@pytest.mark.parametrize("options, call, match", [
    (dict(guidance=2.0), None, "guidance 2.0 needs classes"),
    (dict(classes=3), None, r"classes must lie in \[0, 2\] \(the model's 3 classes\), got 3 to 3"),
    (dict(classes="all"), None, "classes must be a class index, 'balanced' or one integer label per image, got 'all'"),
    (dict(classes=torch.tensor([0.5])), None, "classes must be a class index, .* got torch.float32 \\(1,\\)"),
    (dict(classes=1, guidance=-1.0), None, r"guidance must be a finite number in \[0, inf\) or null, got -1.0"),
    (dict(classes=[0, 1]), dict(n=3), "classes holds 2 labels for 3 images"),
    (dict(classes=1), dict(n=2, model_kwargs={"y": torch.zeros(2, dtype=torch.long)}),
     r"give the labels as classes or as model_kwargs\['y'\], not both"),
])
def test_bad_classes_and_guidance_are_one_line_errors(conditional, options, call, match):
    diffusion = GaussianDiffusion(NoiseSchedule.linear(100), variance="learned_range", loss="hybrid")
    with pytest.raises(ValueError, match=match) as raised:
        Sampler(conditional, diffusion, steps=2, progress=False, **options).sample(**(call or dict(n=1)))
    assert "\n" not in str(raised.value)


def test_classes_need_a_class_conditional_model():
    model = UNet(UNetConfig(in_channels=1, resolution=8, ch=16, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(),
                            groups=8))
    with pytest.raises(ValueError, match="classes need a class-conditional model"):
        Sampler(model, GaussianDiffusion(NoiseSchedule.linear(10)), classes=0, progress=False)


def test_the_guided_batch_conditioning_and_the_labels_of_each_image():
    from fastddpm import conditioning

    y, embedding = torch.tensor([2, 0]), torch.randn(2, 5)
    both = conditioning.guided({"y": y, "context": embedding, "return_dict": False}, null_class=3)
    assert torch.equal(both["y"], torch.tensor([2, 0, 3, 3]))  # the labels, then the null class
    assert torch.equal(both["context"], torch.cat([embedding, embedding])) and both["return_dict"] is False
    # "balanced" and an index are functions of the image index; per-image labels are the n images' own
    assert torch.equal(conditioning.class_labels("balanced", 3, 4, 5), torch.tensor([1, 2, 0, 1, 2]))
    assert torch.equal(conditioning.class_labels(2, 3, 7, 2), torch.tensor([2, 2]))
    labels = conditioning.check_classes([1, 0, 2], 3)
    assert labels.dtype == torch.int64 and torch.equal(conditioning.class_labels(labels, 3, 10, 3), labels)
