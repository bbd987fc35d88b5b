"""Tests for fastddpm.datasets (fast: everything is tiny and built in tmp_path)."""

import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastddpm.datasets import (  # noqa: E402
    DatasetError,
    ImageDataset,
    array_file,
    cifar10,
    digits,
    image_folder,
    load_dataset,
    load_heldout,
    quantize,
    to_float,
)


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path_factory, monkeypatch):
    """Image folders are decoded into a cache: keep it out of the home directory."""
    monkeypatch.setenv("FASTDDPM_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


# ---------------------------------------------------------------- digits


def test_digits_shapes_levels_and_values():
    tr, ho, al = digits("train"), digits("heldout"), digits("all")
    assert (len(tr), len(ho), len(al)) == (1500, 297, 1797)
    for ds in (tr, ho, al):
        assert ds.levels == 17
        assert ds.shape == (1, 8, 8)
        assert ds.codes.dtype == torch.uint8 and int(ds.codes.max()) <= 16
        assert ds.labels is not None and ds.labels.shape == (len(ds),)
    x = tr.tensor()
    assert x.dtype == torch.float32 and x.shape == (1500, 1, 8, 8)
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    allowed = torch.tensor([k / 16 * 2 - 1 for k in range(17)], dtype=torch.float32)
    assert torch.isin(x, allowed).all()  # values exactly k/16*2-1
    item = tr[5]
    assert item.dtype == torch.float32 and item.shape == (1, 8, 8)
    assert torch.equal(item, x[5])
    assert torch.equal(quantize(x, 17), tr.codes)
    assert "digits" in tr.name


def test_digits_split_disjoint_and_deterministic():
    al = digits("all").codes.reshape(1797, -1)
    with np.load(Path(__file__).resolve().parents[1] / "fastddpm/data/digits.npz") as f:
        held = torch.from_numpy(f["heldout"])
    assert torch.equal(digits("train").codes.reshape(-1, 64), al[~held])
    assert torch.equal(digits("heldout").codes.reshape(-1, 64), al[held])
    assert torch.equal(digits("train").codes, digits("train").codes)
    assert torch.equal(load_dataset(None).codes, digits("train").codes)
    assert torch.equal(load_dataset("digits").codes, digits("train").codes)
    assert torch.equal(load_heldout("digits").codes, digits("heldout").codes)
    with pytest.raises(ValueError):
        digits("test")
    with pytest.raises(DatasetError, match="8x8"):
        load_dataset("digits", size=32)
    assert len(load_dataset("digits", size=8)) == 1500


def test_dataloader_compatible():
    ds = digits("heldout")
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=16, shuffle=False)))
    assert batch.shape == (16, 1, 8, 8) and batch.dtype == torch.float32


def test_to_float_and_quantize_roundtrip():
    v = torch.arange(256, dtype=torch.uint8)
    x = to_float(v, 256)
    assert float(x[0]) == -1.0 and float(x[-1]) == 1.0
    assert torch.equal(quantize(x, 256), v)


def test_image_dataset_validation():
    with pytest.raises(TypeError):
        ImageDataset(torch.zeros(2, 1, 4, 4))  # float
    with pytest.raises(ValueError):
        ImageDataset(torch.zeros(2, 4, 4, dtype=torch.uint8))  # 3-d
    with pytest.raises(ValueError):
        ImageDataset(torch.full((1, 1, 2, 2), 20, dtype=torch.uint8), levels=17)


# ---------------------------------------------------------------- image folders


def _save(path, arr, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)


def _make_folder(root):
    rng = np.random.default_rng(0)
    _save(root / "b.png", rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))  # landscape
    _save(root / "a.JPG", rng.integers(0, 256, (50, 20, 3), dtype=np.uint8))  # portrait, upper-case ext
    _save(root / "sub" / "c.jpeg", rng.integers(0, 256, (16, 16), dtype=np.uint8))  # grayscale, upscaled
    _save(root / "sub" / "d.png", np.full((12, 12, 4), 200, dtype=np.uint8))  # RGBA, already size
    (root / "notes.txt").write_text("not an image")
    _save(root / ".hidden" / "x.png", np.zeros((5, 5, 3), np.uint8))  # hidden dir: skipped


def test_image_folder(tmp_path):
    _make_folder(tmp_path)
    ds = image_folder(tmp_path, 12)
    assert len(ds) == 4 and ds.shape == (3, 12, 12) and ds.levels == 256
    x = ds.tensor()
    assert x.dtype == torch.float32 and float(x.min()) >= -1 and float(x.max()) <= 1
    # sorted by relative path: a.JPG, b.png, sub/c.jpeg, sub/d.png
    assert torch.all(ds.codes[3] == round((200 * 200 + 255 * 55) / 255))  # the RGBA one, alpha 200 on white
    gray = ds.codes[2]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    # deterministic
    assert torch.equal(image_folder(tmp_path, 12).codes, ds.codes)
    # via load_dataset; size is required for folders
    assert torch.equal(load_dataset(str(tmp_path), 12).codes, ds.codes)
    assert load_heldout(str(tmp_path), 12) is None
    with pytest.raises(DatasetError, match="size"):
        load_dataset(str(tmp_path))
    assert ds.labels is None and ds.classes is None  # a.JPG and b.png lie at the top: no classes


def test_an_image_folders_subfolders_are_its_classes(tmp_path):
    for name in ("dog/1.png", "cat/2.png", "dog/nested/3.png", "cat/4.png", "zebra/5.png"):
        _save(tmp_path / name, np.zeros((8, 8, 3), np.uint8))
    ds = image_folder(tmp_path, 8)  # sorted: cat/2, cat/4, dog/1, dog/nested/3, zebra/5
    assert ds.classes == ["cat", "dog", "zebra"] and ds.labels.tolist() == [0, 0, 1, 1, 2]


def test_a_npz_labels_array_gives_the_labels(tmp_path):
    images = np.zeros((4, 8, 8, 1), np.uint8)
    np.savez(tmp_path / "a.npz", images=images, labels=np.array([3, 0, 1, 3]))
    ds = load_dataset(str(tmp_path / "a.npz"))
    assert ds.labels.tolist() == [3, 0, 1, 3] and ds.classes == ["0", "1", "2", "3"]
    np.savez(tmp_path / "bad.npz", images=images, labels=np.array([0.5, 1, 2, 3]))
    with pytest.raises(DatasetError, match=r"'labels' in .*bad.npz must be 4 non-negative integers, one an image; "
                                           r"got float64 \(4,\)"):
        load_dataset(str(tmp_path / "bad.npz"))
    assert load_dataset(str(tmp_path / "a.npz")).codes.shape == (4, 1, 8, 8)


def test_image_folder_center_crop(tmp_path):
    # 20x40 (w x h) image: top half black, middle white, bottom black.
    arr = np.zeros((40, 20, 3), np.uint8)
    arr[10:30] = 255
    _save(tmp_path / "tall.png", arr)
    ds = image_folder(tmp_path, 20)  # no resize; crop rows 10..30 -> all white
    assert ds.shape == (3, 20, 20)
    assert torch.all(ds.codes == 255)


# ---------------------------------------------------------------- CIFAR-10


def _write_cifar(root, n=4, protocol=2):
    rng = np.random.default_rng(1)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data, b"filenames": [b"x.png"] * n}
        with open(d / name, "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
        batches[name] = (data, labels)
    return d, batches


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_roundtrip(tmp_path, protocol):
    d, batches = _write_cifar(tmp_path, protocol=protocol)
    for path in (tmp_path, d):  # parent or the batches folder itself
        tr = cifar10(path, "train")
        assert len(tr) == 20 and tr.shape == (3, 32, 32) and tr.levels == 256
        want = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
        assert np.array_equal(tr.codes.numpy().reshape(20, 3072), want)
        # row-major 3x32x32: first 1024 values are the red plane
        assert np.array_equal(tr.codes[0, 0].numpy().ravel(), want[0, :1024])
        assert tr.labels.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
        assert tr.classes[0] == "airplane" and tr.classes[9] == "truck"
        te = cifar10(path, "test")
        assert np.array_equal(te.codes.numpy().reshape(4, 3072), batches["test_batch"][0])
    assert torch.equal(load_dataset(str(tmp_path)).codes, tr.codes)
    assert torch.equal(load_heldout(str(d)).codes, te.codes)
    assert len(load_dataset(str(tmp_path), 32)) == 20


def test_cifar_numpy1_style_pickle(tmp_path):
    # The real CIFAR-10 files were written by numpy 1.x: globals live in numpy.core.
    d, batches = _write_cifar(tmp_path, protocol=2)
    raw = (d / "test_batch").read_bytes()
    assert b"numpy._core.multiarray\n" in raw
    (d / "test_batch").write_bytes(raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    te = cifar10(d, "test")
    assert np.array_equal(te.codes.numpy().reshape(4, 3072), batches["test_batch"][0])


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_malicious_pickle_refused(tmp_path):
    d, _ = _write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    with open(d / "data_batch_3", "wb") as f:
        pickle.dump({b"data": _Evil(marker), b"labels": []}, f, protocol=2)
    with pytest.raises(DatasetError, match="data_batch_3") as ei:
        cifar10(tmp_path)
    assert "system" in str(ei.value) and "\n" not in str(ei.value)
    assert not marker.exists()
    # test split is unaffected
    assert len(cifar10(tmp_path, "test")) == 4


def test_cifar_codecs_only_latin1(tmp_path):
    import _codecs

    class _Sneaky:
        def __reduce__(self):
            return (_codecs.encode, ("abc", "rot13"))

    d, _ = _write_cifar(tmp_path)
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": _Sneaky(), b"labels": []}, f, protocol=2)
    with pytest.raises(DatasetError, match="test_batch"):
        cifar10(tmp_path, "test")


def test_cifar_errors(tmp_path):
    d, _ = _write_cifar(tmp_path)
    (d / "data_batch_4").unlink()
    with pytest.raises(DatasetError, match="data_batch_4"):
        cifar10(tmp_path)
    (d / "data_batch_2").write_bytes(b"\x80\x02garbage")
    (d / "data_batch_4").write_bytes(b"")
    with pytest.raises(DatasetError, match="data_batch_2"):
        cifar10(tmp_path)
    (d / "test_batch").unlink()
    assert load_heldout(str(tmp_path)) is None
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no CIFAR-10 batches"):
        cifar10(empty)


# ---------------------------------------------------------------- arrays


def test_array_layouts(tmp_path):
    rng = np.random.default_rng(2)
    nhwc = rng.integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    nchw = np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2))
    np.save(tmp_path / "nhwc.npy", nhwc)
    np.savez(tmp_path / "nchw.npz", images=nchw, labels=np.arange(5))
    np.savez_compressed(tmp_path / "single.npz", nhwc)  # arr_0
    a, b, c = array_file(tmp_path / "nhwc.npy"), array_file(tmp_path / "nchw.npz"), array_file(tmp_path / "single.npz")
    for ds in (a, b, c):
        assert ds.shape == (3, 6, 7) and ds.levels == 256 and len(ds) == 5
        assert torch.equal(ds.codes, torch.from_numpy(nchw))
    nhw = rng.integers(0, 256, (4, 9, 9), dtype=np.uint8)
    np.save(tmp_path / "nhw.npy", nhw)
    ds = load_dataset(str(tmp_path / "nhw.npy"))
    assert ds.shape == (1, 9, 9) and torch.equal(ds.codes[:, 0], torch.from_numpy(nhw))
    np.save(tmp_path / "gray.npy", nhw[..., None])
    assert array_file(tmp_path / "gray.npy").shape == (1, 9, 9)
    assert load_heldout(str(tmp_path / "nhw.npy")) is None
    with pytest.raises(DatasetError, match="9x9"):
        load_dataset(str(tmp_path / "nhw.npy"), 32)


# ---------------------------------------------------------------- errors


def _one_line(err):
    s = str(err.value)
    assert "\n" not in s
    return s


def test_error_missing_path(tmp_path):
    p = tmp_path / "does" / "not" / "exist"
    with pytest.raises(DatasetError, match="does not exist") as ei:
        load_dataset(str(p), 32)
    assert str(p) in _one_line(ei)
    with pytest.raises(DatasetError, match="does not exist"):
        load_heldout(str(p))
    assert issubclass(DatasetError, ValueError)


def test_error_empty_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(DatasetError, match="no PNG/JPEG images under") as ei:
        load_dataset(str(tmp_path), 32)
    assert str(tmp_path) in _one_line(ei)


def test_error_corrupt_image(tmp_path):
    _save(tmp_path / "ok.png", np.zeros((8, 8, 3), np.uint8))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    with pytest.raises(DatasetError, match="cannot read image") as ei:
        load_dataset(str(tmp_path), 8)
    assert str(bad) in _one_line(ei)
    # truncated JPEG (valid header, missing data)
    bad.unlink()
    _save(tmp_path / "t.jpg", np.full((64, 64, 3), 128, np.uint8))
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(DatasetError, match="t.jpg"):
        image_folder(tmp_path, 8)


def test_error_float_npz(tmp_path):
    p = tmp_path / "float.npz"
    np.savez(p, images=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(DatasetError, match="float32") as ei:
        load_dataset(str(p))
    assert str(p) in _one_line(ei)


def test_error_npz_several_unnamed(tmp_path):
    p = tmp_path / "multi.npz"
    np.savez(p, np.zeros((2, 4, 4), np.uint8), np.zeros((2,), np.uint8))
    with pytest.raises(DatasetError, match="arr_0, arr_1") as ei:
        load_dataset(str(p))
    assert str(p) in _one_line(ei)


def test_error_bad_files(tmp_path):
    p = tmp_path / "junk.npz"
    p.write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match="junk.npz"):
        load_dataset(str(p))
    q = tmp_path / "obj.npy"
    np.save(q, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DatasetError, match="obj.npy"):
        load_dataset(str(q))
    r = tmp_path / "shape.npy"
    np.save(r, np.zeros((2, 5, 5, 4), np.uint8))
    with pytest.raises(DatasetError, match="shape.npy"):
        load_dataset(str(r))
    s = tmp_path / "data.csv"
    s.write_text("1,2,3")
    with pytest.raises(DatasetError, match="data.csv"):
        load_dataset(str(s))
