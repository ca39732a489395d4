"""metalab.progress: a tqdm bar on a terminal, plain log lines (count, rate, ETA) everywhere else."""

from __future__ import annotations

import logging

import pytest
from tqdm import tqdm

from metalab.progress import LogProgress, progress


class Clock:
    """A hand-driven clock for LogProgress."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_log_progress_lines(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    with caplog.at_level(logging.INFO, logger="metalab.progress"):
        with LogProgress(1000, "decode", "img", every=5.0, clock=clock) as bar:
            clock.now += 1
            bar.update(100)  # 1 s in: too early for a line
            assert caplog.messages == []
            clock.now += 4
            bar.update(150)  # 5 s in, 250 done: 50 img/s, 750 left -> 15 s
            bar.set_postfix(loss=0.123456)
            clock.now += 5
            bar.update(250)  # 10 s in, 500 done
    assert caplog.messages[0] == "decode: 250/1000 img (25%), 50 img/s, ETA 15s"
    assert caplog.messages[1] == "decode: 500/1000 img (50%), 50 img/s, ETA 10s, loss=0.1235"
    assert caplog.messages[2] == "decode: 500/1000 img in 10s (50 img/s), loss=0.1235"
    assert len(caplog.messages) == 3  # close() logs once, even when called again
    bar.close()
    assert len(caplog.messages) == 3


def test_log_progress_without_total_and_scaled_units(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    with caplog.at_level(logging.INFO, logger="metalab.progress"):
        bar = LogProgress(None, "download x.zip", "B", every=1.0, unit_scale=True, clock=clock)
        clock.now += 2
        bar.update(3_400_000)
    assert caplog.messages == ["download x.zip: 3.4M B, 1.7M B/s"]


def test_progress_picks_plain_lines_without_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("METALAB_PROGRESS", raising=False)
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    with progress(10, "x") as bar:
        assert isinstance(bar, LogProgress)
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    with progress(10, "x") as bar:
        assert isinstance(bar, tqdm) and not bar.disable
    monkeypatch.setenv("METALAB_PROGRESS", "plain")
    assert isinstance(progress(10, "x"), LogProgress)
    off = progress(10, "x", mode="off")
    assert isinstance(off, tqdm) and off.disable
    with pytest.raises(ValueError, match="progress mode"):
        progress(10, mode="loud")  # type: ignore[arg-type]
