"""The measuring half of the benchmark suite: timers, the roofline floors, and the results CSV.

A row is one (workload, provider, mode, size, dtype) measured on one device: the median and the
20th/80th percentiles of its time, and its "% of floor" — the time the row's bytes would take
at the device's measured copy bandwidth, or its FLOPs at the measured matmul peak in its
precision (whichever is longer), over the measured time. Rows go to results/results.csv; a row
measured again replaces the old one with the same key (workload, provider, mode, size, dtype,
device).
"""

from __future__ import annotations

import csv
import ctypes
import datetime
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "results.csv"
KEY = ("workload", "provider", "mode", "size", "dtype", "device")


@dataclass
class Row:
    workload: str
    provider: str
    mode: str
    size: str
    dtype: str
    median: float
    p20: float
    p80: float
    unit: str  # "ms" (time per call) or "img/s"
    floor_pct: float | None  # % of the roofline floor (None: not defined for the row)
    device: str
    torch: str
    triton: str
    commit: str
    date: str


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} ({platform.machine()}), {torch.get_num_threads()} threads"


def _versions() -> tuple[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "-"
    return torch.__version__, triton_version


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
        return out.stdout.strip() or "-"
    except OSError:
        return "-"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def steady_allocator() -> bool:
    """Keeps freed memory in glibc's heap (mmap and trim thresholds at 32 MiB, glibc's largest),
    so that every provider's temporaries are reused instead of being mapped, faulted in page by
    page and unmapped again on each call. Without it diffusers' DDPMScheduler.step at 64×3×32×32
    took 100–200 page faults per call, which moved it between 0.93 and 2.2 ms from run to run;
    the fused kernels allocate one output and took none. True where it applied (glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 32 << 20))


def time_calls(fns: dict, device: torch.device, repeats: int, min_seconds: float = 0.05) -> dict:
    """Seconds per call of each function in ``fns`` (name → fn), one figure per repeat, after a
    warm-up. Each repeat runs enough calls of a function to last ``min_seconds`` (timer
    resolution and launch jitter average out), and the functions take turns within every repeat,
    so a slower or faster spell of a shared machine falls on all of them alike (the ratio of two
    rows is what a speedup claim compares). On CUDA, events bracket the calls."""
    calls = {}
    for name, fn in fns.items():
        fn()
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        calls[name] = max(1, int(min_seconds / max(time.perf_counter() - start, 1e-7)))
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                for _ in range(calls[name]):
                    fn()
                end.record()
                end.synchronize()
                times[name].append(begin.elapsed_time(end) / 1e3 / calls[name])
            else:
                t0 = time.perf_counter()
                for _ in range(calls[name]):
                    fn()
                times[name].append((time.perf_counter() - t0) / calls[name])
    return times


def time_call(fn, device: torch.device, repeats: int, min_seconds: float = 0.05) -> list[float]:
    """`time_calls` of one function."""
    return time_calls({"": fn}, device, repeats, min_seconds)[""]


def quantiles(times: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80) of ``times``."""
    ordered = sorted(times)
    pick = lambda q: ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]  # noqa: E731
    return statistics.median(ordered), pick(0.2), pick(0.8)


class Floors:
    """The device's measured copy bandwidth (bytes/s) and matmul peak (FLOP/s) per dtype."""

    def __init__(self, device: torch.device, quick: bool):
        self.device, self.quick = device, quick
        self._peak: dict[torch.dtype, float] = {}
        n = (1 << 24) if device.type == "cuda" else (1 << 22)  # 64 MiB / 16 MiB of float32: past the caches
        src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
        seconds = statistics.median(time_call(lambda: dst.copy_(src), device, 5))
        self.bandwidth = 2 * n * 4 / seconds

    def peak(self, dtype: torch.dtype) -> float:
        if dtype not in self._peak:
            n = 4096 if self.device.type == "cuda" else (512 if self.quick else 1024)
            a = torch.randn(n, n, device=self.device, dtype=dtype)
            b = torch.randn(n, n, device=self.device, dtype=dtype)
            seconds = statistics.median(time_call(lambda: a @ b, self.device, 5))
            self._peak[dtype] = 2 * n**3 / seconds
        return self._peak[dtype]

    def percent(self, seconds: float, nbytes: int = 0, flops: float = 0.0, dtype=torch.float32) -> float | None:
        """% of the roofline floor for a call of ``seconds`` moving ``nbytes`` and doing ``flops``."""
        floor = max(nbytes / self.bandwidth if nbytes else 0.0, flops / self.peak(dtype) if flops else 0.0)
        return None if floor == 0.0 else 100.0 * floor / seconds


def make_row(workload, provider, mode, size, dtype, times, unit, floor_pct, device) -> Row:
    median, p20, p80 = quantiles(times)
    torch_version, triton_version = _versions()
    return Row(workload, provider, mode, size, dtype, median, p20, p80, unit,
               None if floor_pct is None else round(floor_pct, 1), device_name(device), torch_version,
               triton_version, _commit(), datetime.date.today().isoformat())


def read_rows(path: Path = RESULTS) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def store(rows: list[Row], path: Path = RESULTS) -> None:
    """Append ``rows`` to the CSV, replacing rows with the same key."""
    new = [{k: ("" if v is None else v) for k, v in asdict(r).items()} for r in rows]
    keys = {tuple(str(r[k]) for k in KEY) for r in new}
    kept = [r for r in read_rows(path) if tuple(r[k] for k in KEY) not in keys]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[field.name for field in fields(Row)])
        writer.writeheader()
        writer.writerows(kept + new)
    os.replace(tmp, path)
