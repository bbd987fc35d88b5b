"""CIFAR-10 from its "python version" pickled batches, read with an unpickler that can only
build numpy arrays, since pickle can otherwise run arbitrary code. Nothing is downloaded."""

from __future__ import annotations

import importlib
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from .dataset import DatasetError, ImageDataset, PathLike, _oneline

CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_FILES = ("test_batch",)
CIFAR_DIRNAME = "cifar-10-batches-py"


# ---- the numpy-only unpickler --------------------------------------------------------------------


def _numpy_global(*candidates):
    """The first importable ``module:attr`` of ``candidates`` (numpy 1.x keeps its internals in
    numpy.core, numpy 2.x in numpy._core)."""
    for spec in candidates:
        mod, _, attr = spec.partition(":")
        try:
            return getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError):
            continue
    return None


def _latin1_encode(obj, encoding="latin1", errors="strict"):
    # Protocol-2 pickles written by Python 3 hold bytes as _codecs.encode("...", "latin1"):
    # only that codec is allowed.
    if encoding.lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"codec {encoding!r} is not allowed")
    return str(obj).encode("latin1", errors)


def _allowed_globals() -> dict:
    reconstruct = _numpy_global("numpy._core.multiarray:_reconstruct", "numpy.core.multiarray:_reconstruct")
    scalar = _numpy_global("numpy._core.multiarray:scalar", "numpy.core.multiarray:scalar")
    frombuffer = _numpy_global("numpy._core.numeric:_frombuffer", "numpy.core.numeric:_frombuffer")
    table = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[(mod, "_reconstruct")] = reconstruct
        table[(mod, "scalar")] = scalar
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        table[(mod, "_frombuffer")] = frombuffer
    return {k: v for k, v in table.items() if v is not None}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays, dtypes, scalars and plain Python containers and
    refuses every other global, so a malicious file cannot run code."""

    def __init__(self, file, source: Path):
        super().__init__(file, encoding="bytes")
        self._source = source
        self._allowed = _allowed_globals()

    def find_class(self, module, name):
        obj = self._allowed.get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from {self._source}")
        return obj


# ---- CIFAR-10 batches ----------------------------------------------------------------------------


def _read_cifar_batch(path: Path):
    try:
        with open(path, "rb") as f:
            batch = _NumpyOnlyUnpickler(f, path).load()
    except pickle.UnpicklingError as e:
        msg = _oneline(e)
        if msg.startswith("refusing"):
            raise DatasetError(f"unsafe pickle {path}: {msg.split(' from ')[0]} (only numpy arrays are allowed)") from e
        raise DatasetError(f"cannot read CIFAR-10 batch {path}: {msg}") from e
    except Exception as e:  # truncated / garbage files raise many types
        raise DatasetError(f"cannot read CIFAR-10 batch {path}: {_oneline(e)}") from e
    if not isinstance(batch, dict):
        raise DatasetError(f"not a CIFAR-10 batch {path}: expected a dict, got {type(batch).__name__}")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        what = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"not a CIFAR-10 batch {path}: 'data' must be uint8 [N, 3072], got {what}")
    try:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise DatasetError(f"not a CIFAR-10 batch {path}: bad 'labels': {_oneline(e)}") from e
    if labels.shape[0] != data.shape[0]:
        raise DatasetError(f"not a CIFAR-10 batch {path}: {labels.shape[0]} labels for {data.shape[0]} images")
    return data.reshape(-1, 3, 32, 32), labels


CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")  # label order


def _cifar_dir(path: Path) -> Path | None:
    """The folder holding the batches: ``path`` itself or its cifar-10-batches-py subfolder;
    None if neither holds any batch."""
    for d in (path, path / CIFAR_DIRNAME):
        if d.is_dir() and any((d / n).is_file() for n in CIFAR_TRAIN_FILES + CIFAR_TEST_FILES):
            return d
    return None


def cifar10(path: PathLike, split: str = "train") -> ImageDataset:
    """CIFAR-10, [N, 3, 32, 32] with levels=256 and labels: split "train" reads data_batch_1..5
    (50000 images), "test" reads test_batch (10000). ``path`` is the cifar-10-batches-py
    folder or its parent."""
    if split not in ("train", "test"):
        raise ValueError(f"cifar10 split must be 'train' or 'test', got {split!r}")
    root = Path(os.path.expanduser(os.fspath(path)))
    if not root.exists():
        raise DatasetError(f"dataset path does not exist: {root}")
    d = _cifar_dir(root)
    if d is None:
        raise DatasetError(f"no CIFAR-10 batches (data_batch_1..5, test_batch) in {root}")
    names = CIFAR_TRAIN_FILES if split == "train" else CIFAR_TEST_FILES
    missing = [n for n in names if not (d / n).is_file()]
    if missing:
        raise DatasetError(f"CIFAR-10 folder {d} lacks {', '.join(missing)}")
    parts = [_read_cifar_batch(d / n) for n in names]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return ImageDataset(torch.from_numpy(data), levels=256, name=f"cifar10/{split}", labels=labels, classes=CLASSES)
