"""`python -m benchmarks.gpu_check --dry`: the GPU check's every section at toy sizes on the CPU, so
the command is known to run before a GPU is lent."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.harness import read_rows

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry", "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    return out, result


def test_the_dry_run_passes_every_section_and_writes_rows(dry_run):
    tmp_path, result = dry_run
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    failed = {name: s.get("error") or s.get("skipped") for name, s in report["sections"].items() if not s["ok"]}
    assert result.returncode == 0 and not failed, (failed, result.stderr[-3000:])
    assert set(report["sections"]) == {"env", "tests", "sync_free", "kernels", "compile", "sampler", "guidance",
                                         "train"}
    assert report["sections"]["tests"]["triton_parity"]["summary"].startswith("1 passed")
    assert report["sections"]["train"]["heldout_nll_bpd"] > 0
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert rows[0].startswith("workload,provider,mode,size") and len(rows) > 10


def test_merge_adds_the_rows_to_the_results_csv(dry_run, tmp_path):
    out, _ = dry_run
    results = tmp_path / "results.csv"
    results.write_text((out / "results.csv").read_text().splitlines()[0] + "\n")  # the header alone
    gpu_check.merge(out, results)
    gpu_check.merge(out, results)  # again: the same keys are replaced, not repeated
    assert read_rows(results) == read_rows(out / "results.csv")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_the_real_run_says_so_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and "no CUDA device" in result.stderr
