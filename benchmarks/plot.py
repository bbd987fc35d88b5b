"""`python -m benchmarks.plot`: one PNG per workload and device from results.csv — a bar per
provider · mode, grouped by size and dtype, with the p20–p80 range as an error bar; for
quality_vs_nfe, the distance and the speed of each solver against its network evaluations; for
guidance, each class's accuracy, the distance and the speed against the guidance w."""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

from .harness import RESULTS, read_rows


def plot(rows: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = defaultdict(list)
    for r in rows:
        groups[(r["workload"], r["device"])].append(r)
    written = []
    for (workload, device), mine in sorted(groups.items()):
        if workload in SPECIAL:
            written.append(SPECIAL[workload](plt, mine, device, out_dir))
            continue
        mine.sort(key=lambda r: (r["size"], r["dtype"], r["provider"], r["mode"]))
        labels = [f"{r['size']} {r['dtype']}\n{r['provider']} · {r['mode']}" for r in mine]
        median = [float(r["median"]) for r in mine]
        low = [m - float(r["p20"]) for m, r in zip(median, mine)]
        high = [float(r["p80"]) - m for m, r in zip(median, mine)]
        errors = [[abs(v) for v in low], [abs(v) for v in high]]
        colors = {"fused": "tab:green", "eager": "tab:gray", "diffusers": "tab:orange"}
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(mine) + 1.5))
        ax.barh(range(len(mine)), median, xerr=errors, color=[colors.get(r["provider"], "tab:blue") for r in mine])
        ax.set_yticks(range(len(mine)), labels, fontsize=7)
        ax.invert_yaxis()
        unit = mine[0]["unit"]
        ax.set_xlabel(f"{unit} ({'lower' if unit == 'ms' else 'higher'} is better)")
        if unit == "ms":
            ax.set_xscale("log")
        ax.set_title(f"{workload} — {device}", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"{workload}-{_slug(device)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _slug(device: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")


def _plot_quality(plt, rows: list[dict], device: str, out_dir: Path) -> Path:
    """Against NFE (log x), a line per solver with the p20–p80 range shaded: the distance of all
    n samples; their distance in sets of the floor's n, with the floor dashed; images/s."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    solvers = sorted({r["provider"] for r in rows if r["provider"] != "floor"})
    floor = next(r for r in rows if r["provider"] == "floor")
    floor_n, n = floor["size"].split("x")[0], next(r["size"] for r in rows if r["provider"] != "floor").split("x")[0]
    panels = ((axes[0], lambda r: r["unit"] == "distance" and "," not in r["mode"]),
              (axes[1], lambda r: r["mode"].endswith(f"sets of {floor_n}")),
              (axes[2], lambda r: r["unit"] == "img/s"))
    for solver in solvers:
        for ax, wanted in panels:
            mine = sorted((int(r["mode"].split()[0]), r) for r in rows if r["provider"] == solver and wanted(r))
            nfe = [k for k, _ in mine]
            ax.plot(nfe, [float(r["median"]) for _, r in mine], marker="o", label=solver)
            ax.fill_between(nfe, [float(r["p20"]) for _, r in mine], [float(r["p80"]) for _, r in mine], alpha=0.15)
    axes[1].axhline(float(floor["median"]), color="black", linestyle="--", linewidth=1,
                    label=f"floor: the {floor_n} held-out digits")
    axes[0].set(ylabel="distance (lower is better)", title=f"all {n} samples of a seed vs the training digits")
    axes[1].set(ylabel="distance (lower is better)", title=f"the same in sets of {floor_n}, beside the floor")
    axes[2].set(yscale="log", ylabel="images/s (higher is better)", title="speed")
    for ax in axes:
        ax.set(xscale="log", xlabel="network evaluations (NFE)")
    return _save(plt, fig, axes[:2], f"quality_vs_nfe — {device}", out_dir / f"quality_vs_nfe-{_slug(device)}.png")


def _plot_guidance(plt, rows: list[dict], device: str, out_dir: Path) -> Path:
    """Against the guidance w, medians with the p20–p80 range: each class's accuracy (thin), the
    worst class's and the mean; the distance in sets of the floor's n beside the floor and 2.5×
    it; images/s."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    floor = next(r for r in rows if r["provider"] == "floor")
    floor_n = floor["size"].split("x")[0]

    def line(ax, wanted, **style):
        mine = sorted((float(r["provider"].removeprefix("w=")), r) for r in rows if r["provider"] != "floor"
                      and r["mode"] == wanted)
        w = [k for k, _ in mine]
        ax.plot(w, [float(r["median"]) for _, r in mine], marker="o", **style)
        ax.fill_between(w, [float(r["p20"]) for _, r in mine], [float(r["p80"]) for _, r in mine], alpha=0.15)

    for mode in sorted({r["mode"] for r in rows if r["mode"].startswith("accuracy, class ")}):
        line(axes[0], mode, color="tab:gray", linewidth=0.6, markersize=2)
    line(axes[0], "accuracy, worst class", color="tab:red", label="worst class")
    line(axes[0], "accuracy, mean", color="tab:blue", label="mean (gray: each class)")
    axes[0].axhline(0.95, color="black", linestyle=":", linewidth=1, label="0.95")
    line(axes[1], f"distance, sets of {floor_n}", color="tab:green", label=f"samples, in sets of {floor_n}")
    axes[1].axhline(float(floor["median"]), color="black", linestyle="--", linewidth=1,
                    label=f"floor: the {floor_n} held-out digits")
    axes[1].axhline(2.5 * float(floor["median"]), color="black", linestyle=":", linewidth=1, label="2.5 × floor")
    line(axes[2], next(r["mode"] for r in rows if r["unit"] == "img/s"), color="tab:purple")
    axes[0].set(ylabel="the classifier's accuracy on the class asked for", title="accuracy")
    axes[1].set(ylabel="distance (lower is better)", title="distance to the training digits")
    axes[2].set(ylabel="images/s (higher is better)", title="speed (w = 0, 1: one branch; else both)", ylim=(0, None))
    for ax in axes:
        ax.set(xlabel="guidance w")
    return _save(plt, fig, axes[:2], f"classifier-free guidance, conditional digits job — {device}",
                 out_dir / f"guidance-{_slug(device)}.png")


def _save(plt, fig, legends, title: str, path: Path) -> Path:
    """Legends on the ``legends`` axes, the title, and the figure written to ``path``."""
    for ax in legends:
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


SPECIAL = {"quality_vs_nfe": _plot_quality, "guidance": _plot_guidance}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__)
    p.add_argument("--csv", type=Path, default=RESULTS)
    p.add_argument("--out", type=Path, default=RESULTS.parent)
    args = p.parse_args(argv)
    for path in plot(read_rows(args.csv), args.out):
        print(path)


if __name__ == "__main__":
    main()
