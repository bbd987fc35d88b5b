"""fastddpm.metrics: the Fréchet distance against closed forms for Gaussians, precision/recall on
constructed point sets, the shipped digit classifier and its floor, and the FID pipeline with a
randomly initialised Inception (the real weights are never downloaded)."""

import importlib.util
import math
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fastddpm.datasets import digits
from fastddpm.metrics import (
    digit_features,
    digit_floor,
    digit_quality,
    frechet_distance,
    load_digit_classifier,
    precision_recall,
)
from fastddpm.metrics import classifier, fid, train_classifier
from fastddpm.metrics.frechet import frechet_distance_gaussians, gaussian_fit
from fastddpm.metrics.manifold import knn_radii

F64 = torch.float64


def uniform_noise(n, seed=0):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---- Fréchet distance ----------------------------------------------------------------------------


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(7, generator=g, dtype=F64), torch.randn(7, generator=g, dtype=F64)
    a, b = torch.rand(7, generator=g, dtype=F64) + 0.1, torch.rand(7, generator=g, dtype=F64) * 5
    expected = (mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum()  # diagonal: (Σ1Σ2)^½ = √a√b
    d2 = frechet_distance_gaussians(mu1, torch.diag(a), mu2, torch.diag(b))
    assert d2 == pytest.approx(expected.item(), rel=1e-12)


def test_frechet_distance_of_non_commuting_covariances_is_the_closed_form():
    # For 2x2 matrices, Tr √M = √λ1 + √λ2 = √(Tr M + 2 √det M), here with M = Σ1 Σ2 (not symmetric).
    s1 = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=F64)
    s2 = torch.tensor([[1.0, -0.3], [-0.3, 3.0]], dtype=F64)
    m = s1 @ s2
    trace_sqrt = math.sqrt(m.trace().item() + 2 * math.sqrt(torch.det(s1).item() * torch.det(s2).item()))
    expected = 1.0**2 + 2.0**2 + s1.trace().item() + s2.trace().item() - 2 * trace_sqrt
    mu1, mu2 = torch.tensor([0.0, 0.0], dtype=F64), torch.tensor([1.0, -2.0], dtype=F64)
    assert frechet_distance_gaussians(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-12)
    # Σ2 = c² Σ1: d² = (1 − c)² Tr Σ1, here for a singular Σ1 too (rank 2 of 4).
    v = torch.randn(4, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    s = v @ v.T
    d2 = frechet_distance_gaussians(torch.zeros(4), s, torch.zeros(4), 9 * s)
    assert d2 == pytest.approx(4 * s.trace().item(), rel=1e-9)


def test_frechet_distance_of_feature_sets_fits_gaussians():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(500, 16, generator=g, dtype=F64) @ torch.randn(16, 16, generator=g, dtype=F64)
    mu, sigma = gaussian_fit(x)
    torch.testing.assert_close(sigma, torch.cov(x.T), rtol=1e-12, atol=1e-12)  # unbiased, as FID
    assert 0 <= frechet_distance(x, x) < 1e-12 * sigma.trace().item()
    delta = torch.linspace(-1, 2, 16, dtype=F64)
    assert frechet_distance(x, x + delta) == pytest.approx(delta.square().sum().item(), rel=1e-9)
    c = 0.5  # scaled about the mean: Σ → c²Σ
    assert frechet_distance(x, mu + c * (x - mu)) == pytest.approx((1 - c) ** 2 * sigma.trace().item(), rel=1e-9)


# ---- precision and recall ------------------------------------------------------------------------


def grid(n, offset=0.0):
    """n×n points of the integer grid in the plane, moved by ``offset``."""
    i = torch.arange(n, dtype=F64)
    return torch.stack(torch.meshgrid(i, i, indexing="ij"), -1).reshape(-1, 2) + offset


def test_knn_radii_are_kth_neighbour_distances():
    line = torch.arange(6, dtype=F64)[:, None]
    assert knn_radii(line, 1).tolist() == [1.0] * 6
    assert knn_radii(line, 2).tolist() == [2.0, 1.0, 1.0, 1.0, 1.0, 2.0]
    assert knn_radii(line, 3).tolist() == [3.0, 2.0, 2.0, 2.0, 2.0, 3.0]


def test_precision_recall_on_constructed_sets():
    a, far = grid(6), grid(6, offset=1000.0)
    assert precision_recall(a, a) == (1.0, 1.0)
    assert precision_recall(a, far) == (0.0, 0.0)
    # fake covers one of real's two clusters: all fakes are real (precision 1), half the reals are found
    assert precision_recall(torch.cat([a, far]), a, k=3) == (1.0, 0.5)
    # a point exactly on a ball's boundary is inside: the corner's 1st neighbour is at distance 1
    fake = torch.tensor([[-1.0, 0.0], [-1.0, -1.0], [50.0, 50.0]], dtype=F64)  # on the boundary, just outside, far
    assert precision_recall(a, fake, k=1)[0] == pytest.approx(1 / 3)


# ---- the digit classifier and its floor ----------------------------------------------------------


def test_shipped_classifier_accuracy_and_record():
    model = load_digit_classifier()
    heldout = digits("heldout")
    accuracy = (model(heldout.tensor()).argmax(1) == heldout.labels).double().mean().item()
    assert accuracy >= 0.97
    record = classifier.weights_metadata()
    assert record["heldout_accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert record["recipe"]["data"] == "digits/train" and record["recipe"]["seed"] == 0
    assert classifier.weights_path().stat().st_size < 200_000


def test_shipped_weights_load_without_pickle(monkeypatch):
    path = classifier.weights_path()
    header = int.from_bytes(path.read_bytes()[:8], "little")
    assert path.read_bytes()[8 : 8 + header].startswith(b"{")  # a safetensors JSON header, then raw tensors

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling while loading the digit classifier")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    load_digit_classifier.cache_clear()
    model = load_digit_classifier()
    assert not model.training and all(not p.requires_grad for p in model.parameters())
    assert digit_features(digits("heldout").tensor()[:4]).shape == (4, classifier.FEATURES)


def test_floor_is_small_beside_noise_and_recorded_with_the_weights():
    floor = digit_floor()
    assert floor["n"] == 297 and math.isfinite(floor["distance"]) and floor["distance"] > 0
    assert floor["distance"] == pytest.approx(classifier.weights_metadata()["floor"], rel=1e-6)
    assert floor["precision"] > 0.8 and floor["recall"] > 0.8
    noise = digit_quality(uniform_noise(1500))
    assert noise["floor"] == floor["distance"] and noise["floor_n"] == 297 and noise["reference"] == "digits/train"
    assert noise["n"] == 1500 and noise["sets_at_floor_n"] == 5
    assert noise["distance"] > 20 * floor["distance"] and noise["distance_at_floor_n"] > 20 * floor["distance"]
    assert noise["recall"] < 0.1 and noise["precision"] < 0.5


def test_training_digits_score_as_themselves():
    result = digit_quality(digits("train").tensor())
    assert 0 <= result["distance"] < 1e-9  # the features' Tr Σ is ~500: relative error < 2e-12
    assert (result["precision"], result["recall"], result["n"]) == (1.0, 1.0, 1500)


def test_held_out_digits_score_the_floor_and_sets_are_disjoint_297s():
    heldout = digits("heldout").tensor()
    floor = digit_floor()
    result = digit_quality(heldout)
    assert (result["distance"], result["precision"], result["recall"]) == (
        floor["distance"], floor["precision"], floor["recall"])
    assert result["sets_at_floor_n"] == 1 and result["distance_at_floor_n"] == floor["distance"]
    tail = digit_quality(torch.cat([heldout, heldout[:296]]))  # one whole set of 297, the 296 left over unused
    assert tail["sets_at_floor_n"] == 1 and tail["distance_at_floor_n"] == floor["distance"]
    assert tail["recall_at_floor_n"] == floor["recall"] and tail["distance"] != floor["distance"]
    two = digit_quality(torch.cat([heldout, heldout.flip(0)]))  # two sets: the mean of equal scores
    assert two["sets_at_floor_n"] == 2 and two["distance_at_floor_n"] == pytest.approx(floor["distance"], rel=1e-12)
    few = digit_quality(heldout[:100])
    assert few["sets_at_floor_n"] == 0 and few["distance_at_floor_n"] is None and few["recall_at_floor_n"] is None


def test_samples_are_quantized_to_the_digits_levels():
    x = digits("heldout").tensor()
    jitter = (torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) - 0.5) * (1 / 16 - 1e-4)
    close = (x + jitter).clamp(-1, 1)  # within half a level (1/16) of the data's own values
    assert not torch.equal(close, x)
    assert torch.equal(digit_features(close), digit_features(x))
    one_level = (x + 2 / 16).clamp(-1, 1)
    assert not torch.equal(digit_features(one_level), digit_features(x))


@pytest.mark.parametrize("images, words", [
    (digits("heldout").codes, "float tensor"),
    (torch.zeros(4, 3, 8, 8), "shape [N, 1, 8, 8]"),
    (torch.zeros(1, 1, 8, 8), "N >= 2"),
    (torch.full((4, 1, 8, 8), 16.0), "[-1, 1]"),
    (torch.full((4, 1, 8, 8), float("nan")), "[-1, 1]"),
])
def test_bad_images_are_one_line_errors(images, words):
    with pytest.raises(ValueError, match="^images ") as info:
        digit_quality(images)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_bad_features_are_one_line_errors():
    x = torch.randn(10, 4, dtype=F64)
    for call, words in [
        (lambda: frechet_distance(x, torch.randn(10, 5, dtype=F64)), "same feature size"),
        (lambda: frechet_distance(x.long(), x), "a must be a float tensor"),
        (lambda: frechet_distance(x, x[:1]), "b must have shape [N, D] with N >= 2"),
        (lambda: precision_recall(x, x, k=10), "real must have shape [N, D] with N >= 11"),
        (lambda: precision_recall(x, x, k=0), "k must be a positive integer"),
        (lambda: digit_quality(digits("heldout").tensor(), k=True), "k must be a positive integer"),
    ]:
        with pytest.raises(ValueError) as info:
            call()
        assert words in str(info.value) and "\n" not in str(info.value)


# ---- training the classifier ---------------------------------------------------------------------


def test_training_is_reproducible_and_recorded(tmp_path):
    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    first = train_classifier.train(seed=0, epochs=1).state_dict()
    again = train_classifier.train(seed=0, epochs=1).state_dict()
    other = train_classifier.train(seed=1, epochs=1).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (threads, strict)
    out = tmp_path / "c.safetensors"
    train_classifier.main(["--out", str(out), "--epochs", "1"])
    written = load_file(str(out))
    assert all(torch.equal(written[k], first[k]) for k in first)
    record = classifier.weights_metadata(out)
    assert record["recipe"]["epochs"] == 1 and 0 < record["heldout_accuracy"] <= 1 and record["floor"] > 0


@pytest.mark.slow
def test_training_reproduces_the_shipped_weights():
    record = classifier.weights_metadata()
    if record["torch"] != torch.__version__:
        pytest.skip(f"the weights were trained with torch {record['torch']}")
    trained = train_classifier.train(record["recipe"]["seed"], record["recipe"]["epochs"]).state_dict()
    shipped = load_file(str(classifier.weights_path()))
    assert all(torch.equal(trained[k], shipped[k]) for k in shipped)


# ---- FID in Inception features (the fid extra) ---------------------------------------------------

HAS_FID = all(importlib.util.find_spec(m) is not None for m in ("torchmetrics", "torch_fidelity"))
needs_fid = pytest.mark.skipif(not HAS_FID, reason="the fid extra (torchmetrics, torch-fidelity) is not installed")


def test_fid_libraries_are_imported_only_on_use():
    code = ("import sys, fastddpm, fastddpm.metrics, fastddpm.metrics.fid; "
            "print(sorted(m for m in sys.modules if m.startswith(('torchmetrics', 'torch_fidelity'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_missing_fid_libraries_name_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # import of it fails
    with pytest.raises(ImportError, match=r"pip install fastddpm\[fid\]") as info:
        fid.inception(64)
    assert "\n" not in str(info.value)


def test_missing_inception_weights_say_what_to_download_and_where(tmp_path, monkeypatch):
    monkeypatch.delenv(fid.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        fid.weights_path()
    message = str(info.value)
    assert str(tmp_path / ".cache/fastddpm" / fid.WEIGHTS_NAME) in message and fid.WEIGHTS_URL in message
    assert "\n" not in message
    monkeypatch.setenv(fid.WEIGHTS_ENV, str(tmp_path / "w.pth"))
    with pytest.raises(FileNotFoundError, match="w.pth"):
        fid.weights_path()
    (tmp_path / "w.pth").write_bytes(b"")
    assert fid.weights_path() == tmp_path / "w.pth"


@needs_fid
def test_fid_pipeline_with_random_inception(tmp_path):
    torch.manual_seed(0)
    net = fid.inception(64)  # untrained: PyTorch's default init gives ~1e-8 features, so widen the convs
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight)
    weights = tmp_path / "inception.pth"
    torch.save(net.state_dict(), weights)
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8, generator=g)
    darker = (a // 2).numpy()  # numpy arrays are taken too

    score = fid.InceptionFID(weights, feature=64)
    score.add(a, real=True)
    score.add(a, real=False)
    same = score.compute()
    score.reset_fake()  # keeps the real images
    score.add(darker, real=False)
    different = score.compute()
    assert abs(same) < 1e-6 * different and different > 1.0
    assert fid.fid(a, darker, weights, feature=64) == pytest.approx(different, rel=1e-5)
    with pytest.raises(ValueError, match=r"^fake must be uint8"):
        fid.fid(a, a.float(), weights, feature=64)
    with pytest.raises(ValueError, match=r"^feature must be one of 64, 192, 768, 2048"):
        fid.inception(100)
