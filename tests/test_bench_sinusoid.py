"""benchmarks.sinusoid's figure: a run of one method keeps the panels of the methods run before it."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from benchmarks import sinusoid


def _fits(runs: Path, config: str, shade: float) -> None:
    (runs / config).mkdir(parents=True)
    plt.imsave(runs / config / "sinusoid_fits.png", np.full((40, 120, 3), shade))


def test_the_stack_keeps_earlier_panels_in_method_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs, results = tmp_path / "runs", tmp_path / "results"
    monkeypatch.setattr(sinusoid, "RUNS", runs)
    monkeypatch.setattr(sinusoid, "RESULTS", results)
    assert sinusoid.plot(5) is None  # nothing run yet
    _fits(runs, "imaml-k5", 0.2)
    one = plt.imread(sinusoid.plot(5))
    panel = plt.imread(results / "sinusoid_fits" / "imaml-k5.png")
    assert one.shape == panel.shape
    # A later sitting runs MAML only: the iMAML panel stays, below MAML's (METHODS order).
    (runs / "imaml-k5" / "sinusoid_fits.png").unlink()
    _fits(runs, "maml-k5", 0.8)
    both = plt.imread(sinusoid.plot(5))
    rows = panel.shape[0]
    assert both.shape == (2 * rows, *panel.shape[1:])
    np.testing.assert_array_equal(both[rows:], panel)
    np.testing.assert_array_equal(both[:rows], plt.imread(results / "sinusoid_fits" / "maml-k5.png"))
    assert not (results / "sinusoid_k10.png").exists()
