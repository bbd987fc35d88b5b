"""The guidance benchmark workload on a briefly trained conditional digits run: a row per w and
measure, values in range (accuracy in [0, 1], the unconditional w = 0 at chance-level labels is
not asserted: a 2-step model is noise), its plot, and the refusal of a run it cannot score."""

import pytest
import torch

from benchmarks import workloads
from benchmarks.harness import Floors
from benchmarks.plot import plot
from fastddpm.config import preset
from fastddpm.trainer import Trainer


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    small = dict(steps=2, timesteps=20, batch_size=16, samples=10, nll_images=0, quality_images=0, device="cpu",
                 sample_steps=2)
    Trainer(preset("digits", class_cond=True, **small), root / "cond").fit()
    Trainer(preset("digits", **small), root / "plain").fit()
    return root


def context(checkpoint):
    floors = Floors.__new__(Floors)
    floors.bandwidth, floors._peak = 1.0, {}
    return workloads.Context(torch.device("cpu"), True, floors, cond_checkpoint=checkpoint)


def test_a_row_per_guidance_and_measure_and_the_plot(runs, tmp_path, monkeypatch):
    monkeypatch.setattr(workloads, "GUIDANCES", (0.0, 2.0))
    rows = workloads.guidance(context(runs / "cond"))
    by_key = {(r.provider, r.mode): r for r in rows}
    assert by_key["floor", "held-out digits"].median == pytest.approx(6.404, abs=1e-3)
    for w in ("w=0", "w=2"):
        modes = {mode for provider, mode in by_key if provider == w}
        assert modes == {*(f"accuracy, class {k}" for k in range(10)), "accuracy, worst class", "accuracy, mean",
                         "distance", "distance, sets of 297", "speed, U-Net batch 300"}
        accuracy = [by_key[w, f"accuracy, class {k}"].median for k in range(10)]
        assert all(0 <= a <= 1 for a in accuracy) and by_key[w, "accuracy, worst class"].median == min(accuracy)
        assert by_key[w, "accuracy, mean"].median == pytest.approx(sum(accuracy) / 10)
        assert by_key[w, "distance"].median > 0 and by_key[w, "speed, U-Net batch 300"].median > 0
        assert by_key[w, "distance, sets of 297"].size == "300x1x8x8"
    paths = plot([vars(r) | {k: str(getattr(r, k)) for k in ("median", "p20", "p80")} for r in rows], tmp_path)
    assert len(paths) == 1 and paths[0].name.startswith("guidance-") and paths[0].stat().st_size > 10_000


def test_a_run_without_classes_is_refused(runs):
    with pytest.raises(ValueError, match="guidance scores the conditional digits job"):
        workloads.guidance(context(runs / "plain"))
