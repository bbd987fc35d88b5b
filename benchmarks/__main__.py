"""`python -m benchmarks [--quick] [--device D] [--only W ...]`: run the suite, append its rows
to benchmarks/results/results.csv, redraw the plots, and print this run's table last."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .harness import Floors, steady_allocator, store
from .plot import plot
from .table import markdown
from .workloads import WORKLOADS, Context


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats: about 2 minutes on a CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", nargs="+", choices=sorted(WORKLOADS), default=None, help="run these workloads only")
    p.add_argument("--checkpoint", type=Path, default=Path("runs/digits"),
                   help="quality_vs_nfe: the default digits job's run directory (fastddpm train)")
    p.add_argument("--cond-checkpoint", type=Path, default=Path("runs/digits-cond"),
                   help="guidance: the conditional digits job's run directory (fastddpm train --class-cond)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("python -m benchmarks: error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if not steady_allocator():
        print("note: not glibc; allocation page faults are left in the timings", file=sys.stderr)
    names = args.only or list(WORKLOADS)
    for workload, run, flag, job in (("quality_vs_nfe", args.checkpoint, "--checkpoint", "fastddpm train"),
                                     ("guidance", args.cond_checkpoint, "--cond-checkpoint",
                                      "fastddpm train --class-cond")):
        if workload in names and not run.exists():
            print(f"python -m benchmarks: error: {workload} needs the run {run}: train it with `{job}` or pass "
                  f"{flag}", file=sys.stderr)
            return 2
    ctx = Context(device, args.quick, Floors(device, args.quick), args.checkpoint, args.cond_checkpoint)
    print(f"copy bandwidth {ctx.floors.bandwidth / 1e9:.1f} GB/s, fp32 matmul peak "
          f"{ctx.floors.peak(torch.float32) / 1e9:.1f} GFLOP/s on {device}", file=sys.stderr)
    rows = []
    for name in names:
        print(f"running {name} …", file=sys.stderr)
        new = WORKLOADS[name](ctx)
        store(new)
        rows += new
    plot([vars(r) | {"median": str(r.median), "p20": str(r.p20), "p80": str(r.p80)} for r in rows], _results_dir())
    print(markdown([{k: ("" if v is None else str(v)) for k, v in vars(r).items()} for r in rows]))
    return 0


def _results_dir():
    from .harness import RESULTS

    return RESULTS.parent


if __name__ == "__main__":
    sys.exit(main())
