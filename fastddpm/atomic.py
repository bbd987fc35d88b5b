"""Files written whole or not at all.

Each file is written under a temporary name beside its destination (``.<stem>.<pid>.tmp<suffix>``),
given the umask's mode as any other file (safetensors creates its files 0600), optionally flushed
to disk, and renamed into place: a kill mid-write leaves the previous file, or none, and at worst a stale temporary, which
`remove_stale` deletes when the next run starts.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path, durable: bool = False):
    """A temporary name beside ``path`` (same suffix) to write to; on success renamed to ``path``,
    after an fsync when ``durable``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale(folder, stem_pattern: str) -> list[Path]:
    """Delete the temporaries a killed writer left in ``folder`` for files whose stem matches the
    glob ``stem_pattern``; returns them."""
    stale = sorted(Path(folder).glob(f".{stem_pattern}.*tmp*"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
