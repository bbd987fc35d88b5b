"""Image datasets for fastddpm: small, in-memory, never downloaded.

Every loader returns an :class:`ImageDataset`, which holds the whole set as a
``uint8`` tensor ``[N, C, H, W]`` of *intensity codes* ``0 .. levels-1`` and
hands out ``float32`` images in ``[-1, 1]`` via the mapping::

    x = v / (levels - 1) * 2 - 1

``levels`` is 256 for ordinary 8-bit images and 17 for the digits set (its
pixels take the values 0..16).  Knowing ``levels`` lets a model report exact
discrete likelihoods (bits/dim) and lets samples be quantized back to the
data's own grid (:func:`quantize`).

Sources
-------
``digits(split)``
    The 8x8 handwritten digits bundled with this package
    (``fastddpm/data/digits.npz``: 1797 images, a fixed held-out split of
    297).  This is scikit-learn's bundled copy of the UCI "Optical Recognition
    of Handwritten Digits" data set (E. Alpaydin, C. Kaynak, 1998), licensed
    under CC BY 4.0: https://doi.org/10.24432/C50P49
``image_folder(path, size)``
    Every PNG/JPEG under a folder (recursive), RGB, resized so the shorter side
    is ``size`` and center-cropped to ``size x size``.
``cifar10(path, split)``
    CIFAR-10's "python version" pickled batches, read with a restricted
    unpickler that can only build numpy arrays (pickle can otherwise run
    arbitrary code).
``array_file(path)``
    A ``.npy`` / ``.npz`` file of ``uint8`` images.

``load_dataset(spec, size)`` picks one of these from a single string (the CLI's
``--data`` argument) and ``load_heldout(spec, size)`` returns the matching
held-out set, if the source has one.  Any problem with the data (missing path,
no images, corrupt file, wrong dtype/shape, unsafe pickle) raises
:class:`DatasetError`, a ``ValueError`` whose message is a single line naming the
path and the problem, suitable for printing as-is.
"""

from __future__ import annotations

import io
import os
import pickle
from importlib import resources
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "DatasetError",
    "ImageDataset",
    "to_float",
    "quantize",
    "digits",
    "image_folder",
    "cifar10",
    "array_file",
    "load_dataset",
    "load_heldout",
    "IMAGE_EXTENSIONS",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_FILES = ("test_batch",)
CIFAR_DIRNAME = "cifar-10-batches-py"

PathLike = Union[str, "os.PathLike[str]"]


class DatasetError(ValueError):
    """A dataset could not be loaded.  ``str(err)`` is one line naming the path
    and the problem (e.g. ``dataset path does not exist: /x/y``)."""


def _oneline(exc: BaseException) -> str:
    """A one-line description of an exception, for embedding in messages."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# ---------------------------------------------------------------------------
# value mapping
# ---------------------------------------------------------------------------


def to_float(codes: torch.Tensor, levels: int) -> torch.Tensor:
    """Map integer codes ``0..levels-1`` to float32 in ``[-1, 1]``:
    ``v / (levels - 1) * 2 - 1``."""
    return codes.to(torch.float32) / (levels - 1) * 2 - 1


def quantize(x: torch.Tensor, levels: int = 256) -> torch.Tensor:
    """Inverse of :func:`to_float`: float in ``[-1, 1]`` (clamped) to the
    nearest code ``0..levels-1`` as ``uint8``.  Use ``levels=256`` to get
    ordinary 8-bit pixels for saving a PNG, whatever the data's levels."""
    if not 2 <= levels <= 256:
        raise ValueError(f"levels must be in 2..256, got {levels}")
    v = torch.round((x.to(torch.float32).clamp(-1, 1) + 1) / 2 * (levels - 1))
    return v.to(torch.uint8)


# ---------------------------------------------------------------------------
# the dataset object
# ---------------------------------------------------------------------------


class ImageDataset(Dataset):
    """An in-memory image set.

    Attributes
    ----------
    codes : torch.Tensor
        ``uint8`` ``[N, C, H, W]``, values in ``0..levels-1`` (the raw data).
    levels : int
        Number of intensity levels (256 for 8-bit images, 17 for digits).
    name : str
        Human-readable description (e.g. ``"digits/train"``).
    labels : torch.Tensor or None
        ``int64`` ``[N]`` class labels when the source has them (digits,
        CIFAR-10), else ``None``.  Not returned by ``__getitem__``.

    ``ds[i]`` is a ``float32`` ``[C, H, W]`` tensor in ``[-1, 1]`` (an image
    only, no label), so the object works with ``torch.utils.data.DataLoader``.
    ``ds.tensor()`` returns the whole set as one ``float32`` ``[N, C, H, W]``
    tensor in ``[-1, 1]`` (small sets are trained from memory).
    """

    def __init__(
        self,
        codes: Union[torch.Tensor, np.ndarray],
        levels: int = 256,
        name: str = "",
        labels: Union[torch.Tensor, np.ndarray, Sequence[int], None] = None,
    ):
        if isinstance(codes, np.ndarray):
            codes = torch.from_numpy(np.ascontiguousarray(codes))
        if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
            raise TypeError("ImageDataset needs a uint8 tensor [N, C, H, W]")
        if codes.ndim != 4:
            raise ValueError(f"ImageDataset needs [N, C, H, W], got shape {tuple(codes.shape)}")
        if not 2 <= int(levels) <= 256:
            raise ValueError(f"levels must be in 2..256, got {levels}")
        levels = int(levels)
        if codes.numel() and levels < 256 and int(codes.max()) > levels - 1:
            raise ValueError(f"values up to {int(codes.max())} exceed levels-1 = {levels - 1}")
        self.codes = codes.contiguous()
        self.levels = levels
        self.name = name
        if labels is not None:
            labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64).reshape(-1)
            if labels.shape[0] != codes.shape[0]:
                raise ValueError(f"{labels.shape[0]} labels for {codes.shape[0]} images")
        self.labels = labels

    def __len__(self) -> int:
        return self.codes.shape[0]

    def __getitem__(self, index) -> torch.Tensor:
        return to_float(self.codes[index], self.levels)

    @property
    def shape(self) -> tuple:
        """``(C, H, W)`` of one image."""
        return tuple(self.codes.shape[1:])

    def tensor(self, device: Union[str, torch.device, None] = None) -> torch.Tensor:
        """The whole set as ``float32`` ``[N, C, H, W]`` in ``[-1, 1]``
        (a new tensor each call; optionally moved to ``device``)."""
        codes = self.codes if device is None else self.codes.to(device)
        return to_float(codes, self.levels)

    def __repr__(self) -> str:
        c, h, w = self.shape
        return f"ImageDataset({self.name!r}, n={len(self)}, shape=({c}, {h}, {w}), levels={self.levels})"


# ---------------------------------------------------------------------------
# digits (bundled)
# ---------------------------------------------------------------------------


def _digits_bytes() -> bytes:
    try:
        ref = resources.files(__package__ or "fastddpm") / "data" / "digits.npz"
        return ref.read_bytes()
    except (ModuleNotFoundError, TypeError, AttributeError):  # pragma: no cover
        # e.g. an unusual import setup: fall back to the file next to this module
        return (Path(__file__).resolve().parent / "data" / "digits.npz").read_bytes()


def digits(split: str = "train") -> ImageDataset:
    """The bundled 8x8 digits: ``split`` is ``"train"`` (1500 images),
    ``"heldout"`` (the fixed 297) or ``"all"`` (1797).  ``[N, 1, 8, 8]``,
    ``levels=17``, with labels."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"digits split must be 'train', 'heldout' or 'all', got {split!r}")
    try:
        with np.load(io.BytesIO(_digits_bytes()), allow_pickle=False) as f:
            images, labels, heldout = f["images"], f["labels"], f["heldout"].astype(bool)
    except (OSError, ValueError, KeyError) as e:
        raise DatasetError(f"cannot read bundled digits data: {_oneline(e)}") from e
    if split == "train":
        keep = ~heldout
    elif split == "heldout":
        keep = heldout
    else:
        keep = np.ones_like(heldout)
    return ImageDataset(images[keep][:, None], levels=17, name=f"digits/{split}", labels=labels[keep])


# ---------------------------------------------------------------------------
# image folders
# ---------------------------------------------------------------------------


def _list_images(root: Path) -> list:
    """Image files under ``root``, recursive, sorted by relative path.  Hidden
    files and folders (name starting with ".", e.g. macOS ``._x.png``) are
    skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for fn in filenames:
            if not fn.startswith(".") and fn.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(dirpath) / fn)
    return sorted(found, key=lambda p: p.relative_to(root).parts)


def _load_square(path: Path, size: int) -> np.ndarray:
    """One image as ``uint8`` ``[size, size, 3]``: shorter side resized to
    ``size`` (bicubic), then center crop."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")  # also forces the full decode
            w, h = img.size
            s = size / min(w, h)
            nw, nh = max(size, round(w * s)), max(size, round(h * s))
            if (nw, nh) != (w, h):
                img = img.resize((nw, nh), Image.Resampling.BICUBIC)
            left, top = (nw - size) // 2, (nh - size) // 2
            img = img.crop((left, top, left + size, top + size))
            arr = np.asarray(img, dtype=np.uint8)
    except Exception as e:  # PIL raises many types for corrupt files
        raise DatasetError(f"cannot read image {path}: {_oneline(e)}") from e
    return arr


def image_folder(path: PathLike, size: int) -> ImageDataset:
    """Every ``.png``/``.jpg``/``.jpeg`` (any case) under ``path``, recursive,
    in sorted order, as RGB ``[N, 3, size, size]``, ``levels=256``.

    Each image is converted to RGB (grayscale is replicated, alpha is
    dropped), resized so its shorter side is ``size`` and center-cropped.
    Resampling is PIL's BICUBIC: PIL widens the filter support by the
    downscale factor, so it is properly anti-aliased when shrinking (no need
    for a BOX pre-pass), sharper than BOX/BILINEAR, with less ringing than
    LANCZOS, and it is the filter most DDPM codebases (e.g. improved-diffusion)
    use for this step.
    """
    root = Path(os.path.expanduser(os.fspath(path)))
    size = _check_size(size, root)
    if not root.exists():
        raise DatasetError(f"dataset path does not exist: {root}")
    if not root.is_dir():
        raise DatasetError(f"not a folder: {root}")
    try:
        files = _list_images(root)
    except OSError as e:  # pragma: no cover
        raise DatasetError(f"cannot list {root}: {_oneline(e)}") from e
    if not files:
        raise DatasetError(f"no PNG/JPEG images under {root}")
    out = np.empty((len(files), size, size, 3), dtype=np.uint8)
    for i, f in enumerate(files):
        out[i] = _load_square(f, size)
    codes = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
    return ImageDataset(codes, levels=256, name=f"folder:{root}")


def _check_size(size, where) -> int:
    if size is None:
        raise DatasetError(f"an image size is required to load the image folder {where}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise DatasetError(f"invalid image size {size!r} for {where}: must be a positive integer")
    return int(size)


# ---------------------------------------------------------------------------
# CIFAR-10 (python pickle batches)
# ---------------------------------------------------------------------------


def _numpy_global(*candidates):
    """The first importable ``module:attr`` of ``candidates`` (numpy 1.x keeps
    its internals in ``numpy.core``, numpy 2.x in ``numpy._core``)."""
    import importlib

    for spec in candidates:
        mod, _, attr = spec.partition(":")
        try:
            return getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError):
            continue
    return None


def _latin1_encode(obj, encoding="latin1", errors="strict"):
    # ``_codecs.encode`` appears in protocol-2 pickles written by Python 3, as
    # ``encode("...", "latin1")``.  Only that codec is allowed.
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
    """Unpickler that can build numpy arrays, dtypes, scalars and plain Python
    containers, and nothing else: any other global is refused, so a
    malicious file cannot run code."""

    def __init__(self, file, source: Path):
        super().__init__(file, encoding="bytes")
        self._source = source
        self._allowed = _allowed_globals()

    def find_class(self, module, name):
        obj = self._allowed.get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from {self._source}")
        return obj


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


def _cifar_dir(path: Path) -> Optional[Path]:
    """The folder holding the batches: ``path`` itself or its
    ``cifar-10-batches-py`` subfolder; None if neither has any batch."""
    for d in (path, path / CIFAR_DIRNAME):
        if d.is_dir() and any((d / n).is_file() for n in CIFAR_TRAIN_FILES + CIFAR_TEST_FILES):
            return d
    return None


def cifar10(path: PathLike, split: str = "train") -> ImageDataset:
    """CIFAR-10 from its python-pickle batches: ``split="train"`` reads
    ``data_batch_1..5`` (50000 images), ``"test"`` reads ``test_batch``
    (10000).  ``path`` is the ``cifar-10-batches-py`` folder or its parent.
    ``[N, 3, 32, 32]``, ``levels=256``, with labels.  Nothing is downloaded."""
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
    return ImageDataset(torch.from_numpy(data), levels=256, name=f"cifar10/{split}", labels=labels)


# ---------------------------------------------------------------------------
# .npy / .npz arrays
# ---------------------------------------------------------------------------


def _to_nchw(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.ndim == 3:  # N x H x W
        return arr[:, None]
    if arr.ndim == 4:
        if arr.shape[3] in (1, 3):  # N x H x W x C (checked first: numpy/PIL convention)
            return arr.transpose(0, 3, 1, 2)
        if arr.shape[1] in (1, 3):  # N x C x H x W
            return arr
    raise DatasetError(
        f"cannot interpret array shape {arr.shape} in {path}: expected N×H×W, N×H×W×C or N×C×H×W with C = 1 or 3"
    )


def array_file(path: PathLike) -> ImageDataset:
    """Images from a ``.npy`` or ``.npz`` file (loaded with
    ``allow_pickle=False``), ``levels=256``.

    From a ``.npz`` the array named ``images`` is used if present, else the
    only array; several arrays and none named ``images`` is an error.  The
    array must be ``uint8`` (values 0..255; floats are refused rather than
    guessing their range) with layout N×H×W (one channel), N×H×W×C or
    N×C×H×W, C in (1, 3).  The layout is decided by which axis is 1 or 3; if
    both the last and the second axis are, N×H×W×C is assumed.
    """
    p = Path(os.path.expanduser(os.fspath(path)))
    if not p.exists():
        raise DatasetError(f"dataset path does not exist: {p}")
    suffix = p.suffix.lower()
    if suffix not in (".npy", ".npz"):
        raise DatasetError(f"not a .npy/.npz file: {p}")
    try:
        if suffix == ".npy":
            arr = np.load(p, allow_pickle=False)
        else:
            with np.load(p, allow_pickle=False) as f:
                keys = list(f.files)
                if "images" in keys:
                    key = "images"
                elif len(keys) == 1:
                    key = keys[0]
                elif not keys:
                    raise DatasetError(f"no arrays in {p}")
                else:
                    raise DatasetError(
                        f"several arrays in {p} ({', '.join(keys)}) and none named 'images'"
                    )
                arr = f[key]
    except DatasetError:
        raise
    except Exception as e:  # bad zip, truncated file, object arrays, ...
        raise DatasetError(f"cannot read array file {p}: {_oneline(e)}") from e
    if not isinstance(arr, np.ndarray):
        raise DatasetError(f"cannot read array file {p}: not an array")
    if arr.dtype != np.uint8:
        raise DatasetError(f"array in {p} has dtype {arr.dtype}; only uint8 images (0..255) are supported")
    arr = _to_nchw(arr, p)
    if arr.shape[0] == 0:
        raise DatasetError(f"no images in {p}")
    return ImageDataset(torch.from_numpy(np.ascontiguousarray(arr)), levels=256, name=f"array:{p}")


# ---------------------------------------------------------------------------
# one-string selection (the CLI's --data)
# ---------------------------------------------------------------------------


def _check_native_size(ds: ImageDataset, size: Optional[int], spec: str) -> ImageDataset:
    if size is not None:
        _, h, w = ds.shape
        if (h, w) != (size, size):
            raise DatasetError(
                f"dataset {spec} has {h}x{w} images and cannot be resized; size {size} was requested (omit it)"
            )
    return ds


def load_dataset(spec: Optional[str] = None, size: Optional[int] = None) -> ImageDataset:
    """The training set named by ``spec``:

    * ``None`` or ``"digits"`` — the bundled digits, train split (8x8, 1 channel).
    * a folder holding CIFAR-10 batches (``data_batch_1`` …), or whose
      ``cifar-10-batches-py`` subfolder does — CIFAR-10 train split.
    * any other folder — :func:`image_folder`; ``size`` is required.
    * a ``.npz`` / ``.npy`` file — :func:`array_file`.

    (To use a folder literally named ``digits``, write ``./digits``.)
    ``size`` is only used to resize image folders; for fixed-size sources it
    may be omitted, and if given must equal the native size.
    Raises :class:`DatasetError` (one line, naming the path) on any problem.
    """
    if spec is None or spec == "digits":
        return _check_native_size(digits("train"), size, "digits")
    if not isinstance(spec, (str, os.PathLike)) or not os.fspath(spec):
        raise DatasetError(f"invalid dataset spec: {spec!r}")
    p = Path(os.path.expanduser(os.fspath(spec)))
    if not p.exists():
        raise DatasetError(f"dataset path does not exist: {p}")
    if p.is_dir():
        if _cifar_dir(p) is not None:
            return _check_native_size(cifar10(p, "train"), size, str(p))
        return image_folder(p, _check_size(size, p))
    if p.suffix.lower() in (".npy", ".npz"):
        return _check_native_size(array_file(p), size, str(p))
    if p.name.lower().endswith((".tar.gz", ".tgz", ".tar", ".zip")):
        raise DatasetError(f"archives are not read directly; extract {p} and pass the folder")
    raise DatasetError(
        f"unsupported dataset path {p}: expected 'digits', a folder of PNG/JPEG images, "
        f"a CIFAR-10 batches folder, or a .npz/.npy file"
    )


def load_heldout(spec: Optional[str] = None, size: Optional[int] = None) -> Optional[ImageDataset]:
    """The held-out (evaluation) set matching ``load_dataset(spec, size)``:
    the digits ``heldout`` split; the CIFAR-10 ``test`` split (None if the
    folder has no ``test_batch``); ``None`` for image folders and array files,
    which have no defined held-out split."""
    if spec is None or spec == "digits":
        return _check_native_size(digits("heldout"), size, "digits")
    p = Path(os.path.expanduser(os.fspath(spec)))
    if not p.exists():
        raise DatasetError(f"dataset path does not exist: {p}")
    if p.is_dir():
        d = _cifar_dir(p)
        if d is not None:
            if not (d / CIFAR_TEST_FILES[0]).is_file():
                return None
            return _check_native_size(cifar10(p, "test"), size, str(p))
    return None
