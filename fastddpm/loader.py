"""Training batches read row by row from a uint8 image set, for sets whose float32 copy should not
be held on the device (the trainer's ``data_memory_mb``): an image folder's codes are its cache's
memory map, so a batch reads only its own rows from the page cache or the disk.

`BatchLoader(dataset, device, indices)` gives the batch of step s: rows ``indices(s)`` of the
set's codes as float32 in [-1, 1] on ``device``, the values `ImageDataset.tensor` gives them.
The rows are gathered in ascending order (the memory map is read forwards, as the disk's
read-ahead likes) and put back in the batch's order. On CUDA a background thread gathers the next
step's rows into a pinned host buffer while the device runs this step, and the copy to the
device is non-blocking, so the step waits for data only when the disk is slower than the step;
on the CPU the batch is gathered when asked for (a thread would take a core from the step).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .datasets import ImageDataset, to_float


def gather(codes: torch.Tensor, indices: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``codes[indices]`` (rows of [N, ...]), read in ascending index order, into ``out`` if given."""
    ascending, order = torch.sort(indices)
    rows = codes.index_select(0, ascending)  # rows[j] = codes[indices[order[j]]]
    if out is None:
        out = torch.empty_like(rows)
    return out.index_copy_(0, order, rows)


class BatchLoader:
    """Batches of ``dataset`` on ``device``: ``loader(step)`` is float32 [b, C, H, W] of the rows
    ``indices(step)`` (an int64 host tensor of b indices, computed on the calling thread).
    ``prefetch`` (default: on CUDA) gathers step + 1 in a background thread; a step asked for out
    of turn (the first, or after a resume) is gathered at once."""

    def __init__(self, dataset: ImageDataset, device: str | torch.device,
                 indices: Callable[[int], torch.Tensor], prefetch: bool | None = None):
        self.codes, self.levels = dataset.codes, dataset.levels
        self.device, self.indices = torch.device(device), indices
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.prefetch = self.device.type == "cuda" if prefetch is None else prefetch
        if self.prefetch:
            # the thread's CUDA calls on this rank's GPU: left at GPU 0, they would make a context there
            cuda = (torch.cuda.set_device, (self.device,)) if self.device.type == "cuda" else (None, ())
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="fastddpm-loader", initializer=cuda[0],
                                              initargs=cuda[1])
            self._buffers: dict[int, torch.Tensor] = {}  # two pinned host buffers, by step parity
            self._copied: dict[int, torch.cuda.Event] = {}  # the last copy out of each buffer
            self._next: tuple[int, Future] | None = None

    def __call__(self, step: int) -> torch.Tensor:
        if not self.prefetch:
            return to_float(gather(self.codes, self.indices(step)).to(self.device), self.levels)
        ahead, self._next = self._next, None
        if ahead is not None and ahead[0] == step:
            host = ahead[1].result()
        else:
            if ahead is not None:
                ahead[1].result()  # it may be filling the buffer this step needs
            host = self._fill(step, self.indices(step))
        x = host.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            self._copied[step % 2] = torch.cuda.Event()
            self._copied[step % 2].record()
        self._next = (step + 1, self._thread.submit(self._fill, step + 1, self.indices(step + 1)))
        return to_float(x, self.levels)

    def _fill(self, step: int, indices: torch.Tensor) -> torch.Tensor:
        """Gathers ``indices`` into the host buffer of ``step``'s parity once its last copy is done."""
        slot = step % 2
        buffer = self._buffers.get(slot)
        if buffer is None or buffer.shape[0] != len(indices):
            buffer = torch.empty((len(indices), *self.codes.shape[1:]), dtype=torch.uint8,
                                 pin_memory=self.device.type == "cuda")
            self._buffers[slot] = buffer
        elif slot in self._copied:
            self._copied[slot].synchronize()
        return gather(self.codes, indices, out=buffer)

    def close(self) -> None:
        """Waits for the batch in flight and stops the thread."""
        if self.prefetch:
            self._next = None
            self._thread.shutdown(wait=True)
