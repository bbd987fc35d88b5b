"""The benchmark harness's bookkeeping: rows replace rows with the same key, percentiles, and
the README table is generated between its markers (speeds themselves are never asserted)."""

import dataclasses

import pytest
import torch

from benchmarks import harness, table


def row(**overrides):
    base = dict(workload="reverse_step", provider="fused", mode="m", size="1x1", dtype="fp32", median=1.0, p20=0.9,
                p80=1.1, unit="ms", floor_pct=50.0, device="cpu", torch="t", triton="-", commit="c",
                date="2026-01-01")
    return harness.Row(**{**base, **overrides})


def test_a_row_measured_again_replaces_the_old_one(tmp_path):
    path = tmp_path / "r.csv"
    harness.store([row(), row(provider="eager", median=5.0)], path)
    harness.store([row(median=2.0), row(dtype="bf16", floor_pct=None)], path)
    rows = harness.read_rows(path)
    assert len(rows) == 3
    assert {(r["provider"], r["dtype"], r["median"], r["floor_pct"]) for r in rows} == {
        ("eager", "fp32", "5.0", "50.0"), ("fused", "fp32", "2.0", "50.0"), ("fused", "bf16", "1.0", "")}
    assert list(rows[0]) == [f.name for f in dataclasses.fields(harness.Row)]


def test_quantiles_and_floor_percent():
    assert harness.quantiles([5.0, 1.0, 3.0, 2.0, 4.0]) == (3.0, 2.0, 4.0)
    floors = harness.Floors.__new__(harness.Floors)
    floors.bandwidth, floors._peak = 100.0, {torch.float32: 1000.0}
    assert floors.percent(2.0, nbytes=100) == pytest.approx(50.0)  # 1 s floor / 2 s
    assert floors.percent(1.0, nbytes=10, flops=500.0) == pytest.approx(50.0)  # the larger floor counts
    assert floors.percent(1.0) is None


def test_the_readme_table_is_generated_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{table.BEGIN}\nold\n{table.END}\noutro\n")
    rows = [{k: ("" if v is None else str(v)) for k, v in dataclasses.asdict(row()).items()}]
    text = table.markdown(rows)
    table.write_readme(text, readme)
    content = readme.read_text()
    assert content.startswith("intro\n") and content.endswith("outro\n") and "old" not in content
    assert "| reverse_step | 1x1 | fp32 | fused · m | 1 ms | 0.9–1.1 | 50.0 |" in content
    unmarked = tmp_path / "unmarked.md"
    unmarked.write_text("no markers here\n")
    with pytest.raises(SystemExit, match="has no <!-- benchmarks:begin -->"):
        table.write_readme(text, unmarked)


def test_time_calls_takes_turns_and_times_every_function():
    order = []
    fns = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    times = harness.time_calls(fns, torch.device("cpu"), repeats=3, min_seconds=0.0)
    assert set(times) == {"a", "b"} and all(len(v) == 3 and min(v) > 0 for v in times.values())
    # after the warm-up and calibration calls (2 each), one call of each per repeat, in turns
    assert order[4:] == ["a", "b"] * 3
