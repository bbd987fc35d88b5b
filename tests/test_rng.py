"""The noise contract's definition: Philox known answers, the layout, and the statistics."""

import math

import numpy as np
import pytest
import torch

from fastddpm import rng


def test_philox_known_answers():
    """Random123's published known-answer vectors for philox4x32-10."""
    zero = torch.zeros(1, dtype=torch.int64)
    ones = torch.full((1,), 0xFFFFFFFF, dtype=torch.int64)
    assert [int(w) for w in rng.philox4x32(zero, zero, zero, zero, 0)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert [int(w) for w in rng.philox4x32(ones, ones, ones, ones, 2**64 - 1)] == [
        0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD,
    ]
    pi = [torch.tensor([v]) for v in (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)]
    assert [int(w) for w in rng.philox4x32(*pi, 0x299F31D0A4093822)] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def test_mul32_matches_exact_integer_products():
    a = np.random.default_rng(0).integers(0, 2**32, 10_000, dtype=np.uint64)
    for b in (0xD2511F53, 0xCD9E8D57, 0xFFFFFFFF, 1):
        exact = a * np.uint64(b)
        hi, lo = rng._mul32(torch.from_numpy(a.astype(np.int64)), b)
        assert (hi.numpy().astype(np.uint64) == exact >> np.uint64(32)).all()
        assert (lo.numpy().astype(np.uint64) == exact & np.uint64(0xFFFFFFFF)).all()


def test_layout_quarters_and_float_conversion():
    shape = (3, 5, 7)  # 105 elements: Q = 27, last quarter short
    seed, samples, step, stream = 1234, torch.tensor([0, 9]), 17, rng.STREAM_REVERSE
    z = rng.normal(seed, samples, step, stream, shape).reshape(2, -1)
    q = 27
    for b, s in enumerate(samples.tolist()):
        for e in (0, 1, 26, 27, 53, 80, 104):
            j, g = divmod(e, q)
            words = [int(w) for w in rng.philox4x32(*(torch.tensor([v]) for v in (g, s, step, stream)), seed)]
            u = []
            for w in words:
                x = w - 2**32 if w >= 2**31 else w
                u.append(float(np.float32(-x - 1 if x < 0 else x) * np.float32(4.6566127342e-10)))
            pair = (u[0], u[1]) if j < 2 else (u[2], u[3])
            r = math.sqrt(-2 * math.log(max(pair[0], 1e-7)))
            expected = r * (math.cos if j % 2 == 0 else math.sin)(2 * math.pi * pair[1])
            assert z[b, e].item() == pytest.approx(expected, abs=1e-5)


def test_sample_k_is_the_same_in_any_batch():
    alone = rng.normal(7, torch.tensor([5]), 3, rng.STREAM_TRAIN, (1, 8, 8))
    batch = rng.normal(7, torch.arange(8), 3, rng.STREAM_TRAIN, (1, 8, 8))
    assert torch.equal(alone[0], batch[5])


@pytest.fixture
def big():
    return rng.normal(2024, torch.arange(64), 0, rng.STREAM_PRIOR, (4096,))


def test_moments_and_ks(big):
    x = big.double().flatten()
    n = x.numel()
    assert abs(x.mean().item()) < 4.5 / math.sqrt(n)
    assert abs(x.var().item() - 1) < 4.5 * math.sqrt(2 / n)
    # Kolmogorov–Smirnov against Φ, α = 0.001: D < 1.95 / √n
    xs = torch.sort(x).values
    cdf = 0.5 * (1 + torch.erf(xs / math.sqrt(2)))
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    d = torch.maximum(grid - cdf, cdf - (grid - 1 / n)).max().item()
    assert d < 1.95 / math.sqrt(n)


def test_no_correlation_between_steps_samples_streams_and_quarters():
    n = 1 << 16
    base = rng.normal(99, torch.tensor([0]), 10, rng.STREAM_REVERSE, (n,))[0].double()
    others = {
        "next step": rng.normal(99, torch.tensor([0]), 11, rng.STREAM_REVERSE, (n,))[0],
        "next sample": rng.normal(99, torch.tensor([1]), 10, rng.STREAM_REVERSE, (n,))[0],
        "other stream": rng.normal(99, torch.tensor([0]), 10, rng.STREAM_TRAIN, (n,))[0],
        "other seed": rng.normal(100, torch.tensor([0]), 10, rng.STREAM_REVERSE, (n,))[0],
    }
    bound = 4.5 / math.sqrt(n)
    for name, other in others.items():
        corr = torch.corrcoef(torch.stack([base, other.double()]))[0, 1].item()
        assert abs(corr) < bound, name
    q = base.reshape(4, -1)  # the two Box–Muller pairs and the quarters of one sample
    for i in range(4):
        for j in range(i + 1, 4):
            assert abs(torch.corrcoef(q[[i, j]])[0, 1].item()) < 4.5 / math.sqrt(q.shape[1]), (i, j)


def test_bad_seed():
    for seed in (-1, 2**64, 1.5, True):
        with pytest.raises(ValueError, match="seed must be an integer"):
            rng.normal(seed, torch.tensor([0]), 0, 0, (4,))


def test_per_sample_steps():
    both = rng.normal(3, torch.tensor([0, 1]), torch.tensor([7, 9]), rng.STREAM_REVERSE, (10,))
    assert torch.equal(both[0], rng.normal(3, torch.tensor([0]), 7, rng.STREAM_REVERSE, (10,))[0])
    assert torch.equal(both[1], rng.normal(3, torch.tensor([1]), 9, rng.STREAM_REVERSE, (10,))[0])
