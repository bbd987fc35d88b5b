"""The results CSV as Markdown tables, one per device; `--readme` writes them into README.md
between the benchmark markers (generated from the CSV, never typed by hand)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .harness import RESULTS, read_rows

README = Path(__file__).parent.parent / "README.md"
BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"
ORDER = ["reverse_step", "train_loss", "vlb_terms", "sample_e2e", "train_e2e", "nll", "quality_vs_nfe", "guidance"]


def _number(text: str) -> str:
    value = float(text)
    return f"{value:.4g}" if value < 1000 else f"{value:,.0f}"


def markdown(rows: list[dict]) -> str:
    """A table per device: workload, size, dtype, provider/mode, median (p20–p80), % of floor."""
    out = []
    for device in sorted({r["device"] for r in rows}):
        mine = [r for r in rows if r["device"] == device]
        first = mine[0]
        counts = {c: sum(r["commit"] == c for r in mine) for c in sorted({r["commit"] for r in mine})}
        commits = ", ".join(f"{c} ({n} rows)" for c, n in counts.items()) if len(counts) > 1 else f"{first['commit']}"
        out.append(f"**{device}** — torch {first['torch']}, triton {first['triton']}, "
                   f"commit {commits}, {max(r['date'] for r in mine)}\n")
        out.append("| workload | size | dtype | provider · mode | median | p20–p80 | % of floor |")
        out.append("| --- | --- | --- | --- | --- | --- | --- |")
        mine.sort(key=lambda r: (ORDER.index(r["workload"]) if r["workload"] in ORDER else 99, r["size"], r["dtype"],
                                 r["provider"], r["mode"]))
        for r in mine:
            floor = f"{float(r['floor_pct']):.1f}" if r["floor_pct"] else "–"
            out.append(f"| {r['workload']} | {r['size']} | {r['dtype']} | {r['provider']} · {r['mode']} | "
                       f"{_number(r['median'])} {r['unit']} | {_number(r['p20'])}–{_number(r['p80'])} | {floor} |")
        out.append("")
    return "\n".join(out)


def write_readme(text: str, readme: Path = README) -> None:
    content = readme.read_text()
    if BEGIN not in content or END not in content:
        raise SystemExit(f"{readme} has no {BEGIN} … {END} section")
    head, rest = content.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.table", description=__doc__)
    p.add_argument("--csv", type=Path, default=RESULTS)
    p.add_argument("--readme", action="store_true", help="write the tables into README.md")
    args = p.parse_args(argv)
    text = markdown(read_rows(args.csv))
    if args.readme:
        write_readme(text)
    print(text)


if __name__ == "__main__":
    main()
