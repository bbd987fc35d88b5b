"""The decoded cache of an image folder: uint8 [N, C, H, W] in a memory-mapped .npy beside a
small JSON index, so a folder is decoded once and never has to fit in memory.

The cache of a folder lives in ``cache_dir`` (else $FASTDDPM_CACHE, else
~/.cache/fastddpm/folders) as ``<key>.npy`` and ``<key>.json``. The key is a hash of the format
version, the file list (each file's path under the folder, mtime and byte size) and the decode
settings (image size, background, channels as asked), so a changed, added or removed file, or
other settings, make a new cache, and a run with the same folder and settings opens the old one
without decoding anything. A build decodes into a temporary file in parallel over the CPU cores
(a process pool, in chunks, with a progress report), then renames it into place, and writes the
index last: an interrupted build leaves no index, so nothing that looks like a cache. A
successful build deletes the caches it supersedes (the same folder and settings, other files).
Under torch.distributed the first process of each machine (LOCAL_RANK 0) builds while the others
wait at a barrier, then every process opens the memory map.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import socket
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import torch.distributed as dist

from .dataset import DatasetError, PathLike, _oneline

VERSION = 1  # the format of the cache: a change makes new keys
ENV = "FASTDDPM_CACHE"
CHUNK = 64  # images a task decodes (at most): small enough for an even spread and a lively progress report
# a smaller folder is decoded in this process by default: there the pool's start (fork, the header scan's round
# trip) costs more than it saves (results.csv: data_loader, the Adwaita icons with 1 and 2 processes)
PARALLEL_FROM = 1024


def default_cache_dir() -> Path:
    """$FASTDDPM_CACHE, else ~/.cache/fastddpm/folders."""
    return Path(os.path.expanduser(os.environ.get(ENV) or "~/.cache/fastddpm/folders"))


def default_workers() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (macOS, Windows)
        return os.cpu_count() or 1


def cache_key(root: Path, names: list[str], settings: dict) -> tuple[str, list]:
    """(the key, the index's file entries [path under root, mtime in ns, bytes])."""
    entries = []
    for name in names:
        try:
            st = os.stat(os.path.join(root, name))
        except OSError as e:
            raise DatasetError(f"cannot read image {os.path.join(root, name)}: {_oneline(e)}") from e
        entries.append([name, st.st_mtime_ns, st.st_size])
    text = json.dumps({"version": VERSION, "files": entries, **settings}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32], entries


def cached_images(root: Path, names: list[str], settings: dict, plan: Callable, *, cache_dir: PathLike | None = None,
                  workers: int | None = None, progress: bool = True) -> tuple[np.ndarray, dict]:
    """The decoded images of the files ``names`` (paths under ``root``) as a memory map of uint8
    [N, C, H, W] (copy on write: nothing is loaded until read, nothing is written back), and the
    cache's index.

    ``workers`` processes decode (default: one a core, or 1 for fewer than `PARALLEL_FROM` images).
    On a miss, ``plan(pool_map)`` says how to build: it returns ``(decode, (C, H, W))`` where
    ``decode(path)`` (picklable) gives one image as uint8 [C, H, W]; ``pool_map(fn)`` runs ``fn``
    on chunks of the files' paths in the build's process pool (e.g. to read their headers) and
    returns its results.
    """
    folder = Path(os.path.expanduser(os.fspath(cache_dir))) if cache_dir is not None else default_cache_dir()
    key, entries = cache_key(root, names, settings)
    stem = folder / key
    if workers is None:
        workers = default_workers() if len(names) >= PARALLEL_FROM else 1
    workers = max(1, int(workers))
    shared = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    codes, index = _open(stem, key)
    if codes is not None and not shared:
        return codes, index
    builder = not shared or int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0
    failure = None
    if builder and codes is None:
        try:
            _build(stem, key, root, [os.path.join(root, name) for name in names], entries, settings, plan, workers,
                   progress)
        except BaseException as e:  # the waiting ranks must still be released from the barrier
            failure = e
    if shared:
        dist.barrier()  # every rank passes here once, whether it found the cache or not
    if failure is not None:
        raise failure
    if codes is None:
        codes, index = _open(stem, key)
    if codes is None:
        raise DatasetError(f"the image cache of {root} was not built (see the error of local rank 0)")
    return codes, index


def _open(stem: Path, key: str) -> tuple[np.ndarray | None, dict | None]:
    """The cache at ``stem`` if it is complete and matches ``key``, else (None, None)."""
    try:
        index = json.loads(stem.with_suffix(".json").read_text())
        if index.get("version") != VERSION or index.get("key") != key:
            return None, None
        codes = np.load(stem.with_suffix(".npy"), mmap_mode="c")  # "c": writable in memory, never written back
    except (OSError, ValueError):
        return None, None
    if codes.dtype != np.uint8 or list(codes.shape) != index.get("shape"):
        return None, None
    return codes, index


def _build(stem, key, root, files, entries, settings, plan, workers, progress) -> None:
    from ..progress import bar

    try:
        stem.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DatasetError(f"cannot create the image cache folder {stem.parent}: {_oneline(e)} (set {ENV})") from e
    _remove_dead_temporaries(stem)
    started = time.perf_counter()
    n = len(files)
    chunk = max(1, min(CHUNK, math.ceil(n / (4 * workers))))
    workers = min(workers, math.ceil(n / chunk))
    pool = _pool(workers) if workers > 1 else None

    def pool_map(fn):
        parts = [files[i : i + chunk] for i in range(0, n, chunk)]
        return list(pool.map(fn, parts)) if pool is not None else [fn(p) for p in parts]

    tmp = stem.parent / f"{stem.name}.{_owner()}.npy.tmp"
    try:
        decode, shape = plan(pool_map)
        np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, *shape))  # a sparse file: tasks fill rows
        tasks = [(tmp, start, files[start : start + chunk], decode) for start in range(0, n, chunk)]
        with bar(total=n, desc=f"decoding {root}", unit="img", disable=not progress) as report:
            if pool is None:
                for task in tasks:
                    report.update(_decode_rows(*task))
            else:
                pending = {pool.submit(_decode_rows, *task) for task in tasks}
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        report.update(future.result())  # a task's DatasetError names its file
        _fsync(tmp)
        os.replace(tmp, stem.with_suffix(".npy"))
    except BrokenProcessPool as e:
        tmp.unlink(missing_ok=True)
        raise DatasetError(f"a process decoding {root} died ({_oneline(e)}); out of memory?") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    index = {"version": VERSION, "key": key, "root": str(root), **settings, "shape": [n, *shape],
             "workers": workers, "build_seconds": round(time.perf_counter() - started, 3), "files": entries}
    written = stem.parent / f"{stem.name}.{_owner()}.json.tmp"
    written.write_text(json.dumps(index, separators=(",", ":")))
    _fsync(written)
    os.replace(written, stem.with_suffix(".json"))  # last: from here on the cache is complete
    _remove_superseded(stem, index)


def _decode_rows(path: Path, start: int, files: list, decode: Callable) -> int:
    """Decodes ``files`` into rows start… of the .npy at ``path``; returns how many."""
    out = np.load(path, mmap_mode="r+")
    for i, f in enumerate(files):
        out[start + i] = decode(f)
    return len(files)  # no msync: the rows are in the page cache, and the build fsyncs the file once


def _fsync(path: Path) -> None:
    """Puts the file on disk before it is renamed into place (a crash must not leave a named cache
    with unwritten rows)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pool(workers: int) -> ProcessPoolExecutor:
    # fork on Linux: a worker starts in milliseconds, without importing torch again (spawn's ~2 s)
    context = multiprocessing.get_context("fork") if sys.platform.startswith("linux") else None
    return ProcessPoolExecutor(workers, mp_context=context)


def _owner() -> str:
    """This process in a temporary file's name: pid@host (a cache folder may be shared by machines)."""
    return f"{os.getpid()}@{socket.gethostname()}"


def _remove_dead_temporaries(stem: Path) -> None:
    """Deletes the temporary files of this key left by killed builds on this machine (their process
    is gone)."""
    for tmp in stem.parent.glob(f"{stem.name}.*.tmp"):
        pid, _, host = tmp.name[len(stem.name) + 1 :].rsplit(".", 2)[0].partition("@")
        if host != socket.gethostname():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except (ValueError, PermissionError):  # not a name of ours, or another user's live process
            pass


def _remove_superseded(stem: Path, index: dict) -> None:
    """Deletes the other caches of the same folder and settings: their files have changed since."""
    same = ("root", "size", "background", "channels")
    for other in stem.parent.glob("*.json"):
        if other.stem == stem.name:
            continue
        try:
            with open(other) as f:
                head = json.loads(f.read())
        except (OSError, ValueError):
            continue
        if all(head.get(k) == index.get(k) for k in same):
            other.unlink(missing_ok=True)
            other.with_suffix(".npy").unlink(missing_ok=True)
