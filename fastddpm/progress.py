"""Progress reports: a tqdm bar on a terminal; elsewhere (a log file, CI) a plain line each time
another 5% of the work is done, since a bar redrawn into a file leaves one line per update
(about 1,800 of them in a redirected `fastddpm train`).

`bar(...)` takes tqdm's arguments and gives the part of tqdm's interface the library uses:
iteration, ``update``, ``set_postfix``, ``close`` and ``with``.
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

EVERY = 0.05  # the fraction of the total between two plain lines


def bar(iterable=None, *, total=None, desc="", unit="it", initial=0, disable=False, file=None):
    """A tqdm bar when ``file`` (default stderr) is a terminal, else `Lines`."""
    file = sys.stderr if file is None else file
    if disable or _isatty(file):
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable, file=file)
    return Lines(iterable, total=total, desc=desc, unit=unit, initial=initial, file=file)


def _isatty(file) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


class Lines:
    """tqdm's line (``tqdm.format_meter``) written whole, once per `EVERY` of ``total`` and at the end
    (without a total: once per update); closed early, it ends on the count reached."""

    def __init__(self, iterable=None, *, total=None, desc="", unit="it", initial=0, file=None):
        self.iterable, self.desc, self.unit, self.file = iterable, desc, unit, file or sys.stderr
        self.total = len(iterable) if total is None and hasattr(iterable, "__len__") else total
        self.n = self.initial = initial
        self.postfix = None
        self.started = time.perf_counter()
        self._next = self._after(initial)
        self._written = None  # the count of the last line
        self._closed = False

    def _after(self, n) -> float:
        """The count at which the next line is due."""
        if not self.total:
            return n + 1
        step = EVERY * self.total
        return (int(n / step) + 1) * step

    def _write(self) -> None:
        line = tqdm.format_meter(self.n, self.total, time.perf_counter() - self.started, ncols=0, prefix=self.desc,
                                 unit=self.unit, postfix=self.postfix, initial=self.initial)
        self.file.write(line + "\n")
        self.file.flush()
        self._written = self.n

    def update(self, n=1) -> None:
        self.n += n
        if self.n >= self._next and (not self.total or self.n < self.total):
            self._write()
            self._next = self._after(self.n)

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._written != self.n:
                self._write()

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
