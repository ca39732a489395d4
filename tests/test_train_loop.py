"""The trainer: exact resume, a stop on NaN that keeps the last good checkpoint, and Ctrl-C that checkpoints."""

from __future__ import annotations

import io
import logging
import math
import os
import re
import shutil
import signal
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from metalab.errors import CheckpointError, ConfigError, NonFiniteLossError
from metalab.experiment import RunConfig, run_config_from_dict
from metalab.meta import maml
from metalab.train import loop
from metalab.train.checkpoint import load_checkpoint
from metalab.train.logger import read_metrics
from metalab.train.loop import CHECKPOINT, Learner, fit
from metalab.utils import seed_everything

Hook = Callable[[int, Learner], None]


def make_learner(
    run: RunConfig, hook: Hook | None = None, bad_at: int | set[int] | None = None, bad: float = math.nan
) -> Learner:
    """A fresh MAML learner (seeded like the CLI does) whose loss calls ``hook(step)`` and is ``bad`` at a step
    (or at each of a set of steps)."""
    seed_everything(run.seed)
    learner = maml.build(run, Path("unused-data-root"), torch.device("cpu"))
    inner = learner.loss

    def loss(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        if hook is not None:
            hook(step, learner)
        value, metrics = inner(step)
        if step == bad_at or (isinstance(bad_at, set) and step in bad_at):
            value = value + bad  # still part of the graph, like a real divergence
        return value, metrics

    learner.loss = loss
    return learner


def new_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def params_of(learner: Learner) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in learner.model.named_parameters()}


def assert_same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"parameter {k} differs"


def logged(run_dir: Path) -> list[tuple[int, str, float]]:
    """The metrics CSV rows, without wall-clock timings (the only values a resume may change)."""
    return [r for r in read_metrics(run_dir / "metrics.csv") if not r[1].startswith("time/")]


def interrupt_at(step_to_stop: int, times: int = 1) -> Hook:
    def hook(step: int, learner: Learner) -> None:
        if step == step_to_stop:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)

    return hook


@pytest.fixture
def run(sinusoid_config) -> RunConfig:
    # A cosine schedule and clipping make resume depend on the scheduler and the optimizer state too.
    return run_config_from_dict(sinusoid_config(train={"lr_schedule": "cosine", "grad_clip": 5.0}))


@pytest.fixture
def reference(
    run: RunConfig, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, torch.Tensor], Path]:
    """Parameters and run directory of an uninterrupted 20-step run."""
    run_dir = tmp_path_factory.mktemp("reference")
    learner = make_learner(run)
    result = fit(learner, run.train, run_dir)
    assert (result.step, result.interrupted) == (20, False)
    assert set(result.metrics) == {"val/mse", "val/mse_ci95"}
    return params_of(learner), run_dir


def test_training_changes_parameters_and_writes_files(run: RunConfig, reference, tmp_path: Path) -> None:
    final, run_dir = reference
    initial = params_of(make_learner(run))
    assert any(not torch.equal(initial[k], final[k]) for k in final)
    state = load_checkpoint(run_dir / CHECKPOINT)
    assert state["step"] == 20
    assert_same_params({k: v for k, v in state["model"].items()}, final)
    rows = read_metrics(run_dir / "metrics.csv")
    steps = sorted({s for s, k, _ in rows if k == "train/loss"})
    assert steps == list(range(1, 21))  # log_every = 1
    assert sorted(s for s, k, _ in rows if k == "val/mse") == [10, 20]
    # The same seed gives the same run.
    again = make_learner(run)
    fit(again, run.train, tmp_path)
    assert_same_params(params_of(again), final)


def test_resume_after_ctrl_c_is_exact(run: RunConfig, reference, tmp_path: Path) -> None:
    final, ref_dir = reference
    previous_handler = signal.getsignal(signal.SIGINT)
    learner = make_learner(run, hook=interrupt_at(7))
    result = fit(learner, run.train, tmp_path)
    assert result.interrupted and result.step == 8  # the step in progress finishes, then it stops
    assert signal.getsignal(signal.SIGINT) is previous_handler  # the trainer's handler is removed again
    state = load_checkpoint(tmp_path / CHECKPOINT)
    assert state["step"] == result.step
    assert_same_params(dict(state["model"]), params_of(learner))
    assert any(not torch.equal(final[k], state["model"][k]) for k in final)  # not already the end state

    resumed = make_learner(run)
    seed_everything(123)  # whatever the fresh process did to the global RNGs, the checkpoint restores them
    out = fit(resumed, run.train, tmp_path, resume=True)
    assert (out.step, out.interrupted) == (20, False)
    assert_same_params(params_of(resumed), final)
    assert load_checkpoint(tmp_path / CHECKPOINT)["step"] == 20
    # The metrics log reads as if the run had never stopped.
    assert logged(tmp_path) == logged(ref_dir)


def test_resume_from_periodic_checkpoint_after_a_crash(run: RunConfig, reference, tmp_path: Path) -> None:
    """Copy the run directory at step 12 (last checkpoint: step 10), as if the process had died then."""
    final, ref_dir = reference
    crashed = tmp_path / "crashed"

    def snapshot(step: int, learner: Learner) -> None:
        if step == 12:
            shutil.copytree(tmp_path / "live", crashed, ignore=shutil.ignore_patterns("tb"))

    fit(make_learner(run, hook=snapshot), run.train, new_dir(tmp_path / "live"))
    assert load_checkpoint(crashed / CHECKPOINT)["step"] == 10
    assert max(s for s, _, _ in read_metrics(crashed / "metrics.csv")) == 12  # rows the crash left behind

    resumed = make_learner(run)
    fit(resumed, run.train, crashed, resume=True)
    assert_same_params(params_of(resumed), final)
    rows = read_metrics(crashed / "metrics.csv")
    assert len(rows) == len({(s, k) for s, k, _ in rows})  # steps 11 and 12 are not logged twice
    assert [r for r in rows if not r[1].startswith("time/")] == logged(ref_dir)


def test_resume_without_checkpoint_is_an_error(run: RunConfig, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint"):
        fit(make_learner(run), run.train, tmp_path, resume=True)


def test_resume_of_a_finished_run_does_nothing(run: RunConfig, reference) -> None:
    final, ref_dir = reference
    learner = make_learner(run)
    result = fit(learner, run.train, ref_dir, resume=True)
    assert result.step == 20 and not result.interrupted
    assert_same_params(params_of(learner), final)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(
    run: RunConfig, tmp_path: Path, bad: float
) -> None:
    k = 12
    learner = make_learner(run, bad_at=k, bad=bad)
    with pytest.raises(NonFiniteLossError) as info:
        fit(learner, run.train, new_dir(tmp_path / "run"))
    message = str(info.value)
    assert f"step {k}" in message and str(tmp_path / "run" / CHECKPOINT) in message
    state = load_checkpoint(tmp_path / "run" / CHECKPOINT)
    assert state["step"] < k and state["step"] == 10
    assert all(bool(torch.isfinite(v).all()) for v in state["model"].values())
    # The checkpoint is the genuine step-10 state of this run (as saved by a run stopped by Ctrl-C at step 10).
    stopped = make_learner(run, hook=interrupt_at(9))
    assert fit(stopped, run.train, new_dir(tmp_path / "stopped10")).step == 10
    assert_same_params(dict(state["model"]), params_of(stopped))
    # The model itself was not stepped with the bad loss: it holds the finite state after steps 0..11.
    assert all(bool(torch.isfinite(p).all()) for p in learner.model.parameters())
    stopped = make_learner(run, hook=interrupt_at(k - 1))
    assert fit(stopped, run.train, new_dir(tmp_path / "stopped12")).step == k
    assert_same_params(params_of(learner), params_of(stopped))


def test_non_finite_loss_before_any_checkpoint(run: RunConfig, tmp_path: Path) -> None:
    with pytest.raises(NonFiniteLossError, match="none yet"):
        fit(make_learner(run, bad_at=0), run.train, tmp_path)
    assert not (tmp_path / CHECKPOINT).exists()


def test_skip_nonfinite_skips_isolated_bad_steps(sinusoid_config, tmp_path: Path) -> None:
    """With ``skip_nonfinite: 1`` one bad step leaves the weights as they were and training goes on (counted in
    ``train/skipped_steps``); two bad steps in a row still stop it."""
    run = run_config_from_dict(sinusoid_config(train={"grad_clip": 5.0, "skip_nonfinite": 1, "log_every": 1}))
    seen: dict[int, dict[str, torch.Tensor]] = {}

    def record(step: int, learner: Learner) -> None:
        seen[step] = params_of(learner)

    result = fit(
        make_learner(run, hook=record, bad_at=12, bad=math.inf), run.train, new_dir(tmp_path / "one")
    )
    assert result.step == 20 and not result.interrupted
    assert_same_params(seen[13], seen[12])  # step 12's update was skipped ...
    assert any(not torch.equal(seen[14][k], seen[13][k]) for k in seen[13])  # ... and step 13's was not
    skipped = {
        step: v for step, k, v in read_metrics(tmp_path / "one" / "metrics.csv") if k == "train/skipped_steps"
    }
    assert min(skipped) == 13 and set(skipped.values()) == {1.0}  # logged from step 12 (logged as 13) on
    with pytest.raises(NonFiniteLossError, match="2 non-finite in a row"):
        fit(make_learner(run, bad_at={12, 13}), run.train, new_dir(tmp_path / "two"))


def test_second_ctrl_c_aborts_at_once(run: RunConfig, tmp_path: Path) -> None:
    previous_handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        fit(make_learner(run, hook=interrupt_at(3, times=2)), run.train, tmp_path)
    assert signal.getsignal(signal.SIGINT) is previous_handler
    assert not (tmp_path / CHECKPOINT).exists()  # aborted before the step-5 checkpoint


def test_interrupt_on_a_checkpoint_step(run: RunConfig, tmp_path: Path) -> None:
    result = fit(make_learner(run, hook=interrupt_at(4)), run.train, tmp_path)
    assert result.interrupted and result.step == 5
    assert load_checkpoint(tmp_path / CHECKPOINT)["step"] == 5


def selecting(sinusoid_config, mode: str, metric: str = "val/mse") -> RunConfig:
    """The resume tests' run, evaluated every 2 steps and keeping the best weights by ``metric``."""
    train = {
        "lr_schedule": "cosine",
        "grad_clip": 5.0,
        "eval_every": 2,
        "keep_best": metric,
        "keep_best_mode": mode,
    }
    return run_config_from_dict(sinusoid_config(train=train))


def evaluations(run_dir: Path) -> dict[int, float]:
    return {s: v for s, k, v in read_metrics(run_dir / "metrics.csv") if k == "val/mse"}


@pytest.mark.parametrize("mode", ["min", "max"])
def test_keep_best_ends_with_the_weights_of_the_best_evaluation(
    sinusoid_config, reference, tmp_path: Path, mode: str
) -> None:
    final, _ = reference
    run = selecting(sinusoid_config, mode)
    seen: dict[int, dict[str, torch.Tensor]] = {}  # weights after each step's updates, by steps done

    def record(step: int, learner: Learner) -> None:
        seen[step] = params_of(learner)

    learner = make_learner(run, hook=record)
    result = fit(learner, run.train, tmp_path)
    seen[20] = final  # the last step has no hook call after it
    values = evaluations(tmp_path)
    assert sorted(values) == list(range(2, 21, 2))
    pick = min if mode == "min" else max
    best = pick(values.values())
    expected = max(s for s, v in values.items() if v == best)  # ties go to the later evaluation
    assert (result.best_step, result.best_value) == (expected, best)
    assert_same_params(params_of(learner), seen[expected])
    assert load_checkpoint(tmp_path / "best.pt")["step"] == expected
    # Selection only watches: training itself is the run without it (the evaluation schedule aside).
    assert_same_params(dict(load_checkpoint(tmp_path / CHECKPOINT)["model"]), final)
    if mode == "max":  # the worst MSE is early on: the learner really went back to older weights
        assert expected < 20


def test_keep_best_survives_resume(sinusoid_config, tmp_path: Path) -> None:
    run = selecting(sinusoid_config, "max")
    whole = make_learner(run)
    expected = fit(whole, run.train, new_dir(tmp_path / "whole"))
    stopped = fit(make_learner(run, hook=interrupt_at(9)), run.train, new_dir(tmp_path / "cut"))
    assert stopped.interrupted and stopped.best_step is None
    resumed = make_learner(run)
    out = fit(resumed, run.train, tmp_path / "cut", resume=True)
    assert (out.best_step, out.best_value) == (expected.best_step, expected.best_value)
    assert_same_params(params_of(resumed), params_of(whole))
    again = make_learner(run)  # a finished run comes back with its selected weights too
    assert fit(again, run.train, tmp_path / "cut", resume=True).best_step == expected.best_step
    assert_same_params(params_of(again), params_of(whole))


def scripted(run: RunConfig, peak_at: int, hook: Hook | None = None) -> Learner:
    """A learner whose evaluation reads 1.0 except 2.0 after ``peak_at`` steps."""
    done = [0]

    def count(step: int, learner: Learner) -> None:
        done[0] = step + 1
        if hook is not None:
            hook(step, learner)

    learner = make_learner(run, hook=count)
    learner.evaluate = lambda part, episodes: {"val/mse": 2.0 if done[0] == peak_at else 1.0}
    return learner


def test_keep_best_resume_trusts_the_checkpoint_over_best_pt(sinusoid_config, tmp_path: Path) -> None:
    """A crash after ``best.pt`` was written for a new evaluation but before the checkpoint that records it: the
    resume must take the checkpoint's selection (a replay need not reach that evaluation's value again)."""
    run = selecting(sinusoid_config, "max")
    whole = scripted(run, peak_at=4)
    assert fit(whole, run.train, new_dir(tmp_path / "whole")).best_step == 4
    cut = new_dir(tmp_path / "cut")
    assert fit(scripted(run, peak_at=4, hook=interrupt_at(9)), run.train, cut).interrupted
    stray = {k: torch.zeros_like(v) for k, v in whole.model.state_dict().items()}
    torch.save({"step": 10, "metric": "val/mse", "value": 3.0, "model": stray}, cut / "best.pt")
    resumed = scripted(run, peak_at=4)
    out = fit(resumed, run.train, cut, resume=True)
    assert (out.best_step, out.best_value) == (4, 2.0)
    assert_same_params(params_of(resumed), params_of(whole))
    exported = load_checkpoint(cut / "best.pt")  # best.pt was put back in line with the selection
    assert exported["step"] == 4
    assert_same_params(dict(exported["model"]), params_of(whole))


def test_keep_best_reads_checkpoints_without_the_selected_weights(sinusoid_config, tmp_path: Path) -> None:
    """Checkpoints written before they carried the selected weights: best.pt holds them, and must agree."""
    run = selecting(sinusoid_config, "max")
    whole = make_learner(run)
    expected = fit(whole, run.train, tmp_path)
    state = load_checkpoint(tmp_path / CHECKPOINT)
    del state["best_model"]
    torch.save(state, tmp_path / CHECKPOINT)
    again = make_learner(run)
    assert fit(again, run.train, tmp_path, resume=True).best_step == expected.best_step
    assert_same_params(params_of(again), params_of(whole))
    exported = load_checkpoint(tmp_path / "best.pt")
    torch.save({**exported, "step": expected.best_step + 2}, tmp_path / "best.pt")
    with pytest.raises(CheckpointError, match=r"best\.pt holds step .* the run's checkpoint says"):
        fit(make_learner(run), run.train, tmp_path, resume=True)


def test_keep_best_names_a_metric_the_run_evaluates(sinusoid_config, tmp_path: Path) -> None:
    run = selecting(sinusoid_config, "max", metric="val/accuracy")
    with pytest.raises(ConfigError, match=r"'train\.keep_best'.*it has: val/mse"):
        fit(make_learner(run), run.train, tmp_path)
    with pytest.raises(ConfigError, match=r"'train\.keep_best': must name a validation or training metric"):
        selecting(sinusoid_config, "max", metric="accuracy")


def test_keep_best_ties_go_to_the_later_weights(sinusoid_config, tmp_path: Path) -> None:
    run = selecting(sinusoid_config, "max")
    learner = make_learner(run)
    learner.evaluate = lambda part, episodes: {"val/mse": 1.0}  # a plateau: every evaluation ties
    assert fit(learner, run.train, tmp_path).best_step == 20


# ------------------------------------------------------------------------------ resuming with changes


def rates(run_dir: Path) -> dict[int, float]:
    """The logged ``train/lr`` of each step: the rate of the update after it."""
    return {s: v for s, k, v in read_metrics(run_dir / "metrics.csv") if k == "train/lr"}


def cosine(lr: float, done: int, length: int) -> float:
    return lr * 0.5 * (1 + math.cos(math.pi * min(done, length) / length))


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_a_new_rate_on_resume_is_the_rate_the_optimizer_trains_at(
    sinusoid_config, tmp_path: Path, schedule: str
) -> None:
    run = run_config_from_dict(sinusoid_config(train={"lr_schedule": schedule}))
    assert fit(make_learner(run, hook=interrupt_at(7)), run.train, tmp_path).step == 8
    lr = run.train.lr / 4
    seen: list[int] = []
    fit(make_learner(run), replace(run.train, lr=lr), tmp_path, resume=True, resumed=seen.append)
    assert seen == [8]
    logged_rates = rates(tmp_path)
    factor = (lambda s: 1.0) if schedule == "constant" else (lambda s: cosine(1.0, s, 20))
    assert logged_rates[8] == pytest.approx(run.train.lr * factor(8))  # the first session's
    for s in range(9, 21):
        assert logged_rates[s] == pytest.approx(lr * factor(s)), s
    state = load_checkpoint(tmp_path / CHECKPOINT)
    assert [g["initial_lr"] for g in state["optimizer"]["param_groups"]] == [lr]
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [pytest.approx(lr * factor(20))]
    assert state["scheduler"]["base_lrs"] == [lr]


@pytest.mark.parametrize("how", ["continue", "restart"])
def test_extending_a_finished_cosine_run(run: RunConfig, reference, tmp_path: Path, how: str) -> None:
    _, ref_dir = reference
    lr, longer = run.train.lr, replace(run.train, steps=30)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    shutil.copytree(ref_dir, whole)
    shutil.copytree(ref_dir, cut)
    fit(make_learner(run), longer, whole, resume=True, extend=how)
    got = rates(whole)
    assert {s: got[s] for s in range(1, 21)} == rates(ref_dir)  # the finished part is as it was
    added = [got[s] for s in range(21, 31)]
    if how == "continue":  # the cosine ended at update 20: hold the rate of its last update (the 20th)
        assert added == pytest.approx([cosine(lr, 19, 20)] * 10)
        assert 0 < added[0] < lr / 100
    else:  # a new cosine from lr over the 10 added steps; after k of them the next rate is cosine(lr, k, 10)
        assert added == pytest.approx([cosine(lr, k, 10) for k in range(1, 11)])
    # The choice is saved: a later resume (no extend given) follows the same rates.
    assert fit(make_learner(run, hook=interrupt_at(24)), longer, cut, resume=True, extend=how).interrupted
    fit(make_learner(run), longer, cut, resume=True)
    assert rates(cut) == got


def test_extending_a_cosine_run_needs_a_choice(run: RunConfig, reference, tmp_path: Path) -> None:
    _, ref_dir = reference
    before = (ref_dir / CHECKPOINT).read_bytes()
    seen: list[int] = []
    with pytest.raises(ConfigError, match=r"'train\.steps'.*continue.*restart"):
        fit(make_learner(run), replace(run.train, steps=30), ref_dir, resume=True, resumed=seen.append)
    with pytest.raises(ConfigError, match=r"'train\.steps': 10 is below the 20 steps"):
        fit(make_learner(run), replace(run.train, steps=10), ref_dir, resume=True, resumed=seen.append)
    with pytest.raises(ConfigError, match=r"'train\.lr_schedule'"):
        fit(make_learner(run), replace(run.train, lr_schedule="constant"), ref_dir, resume=True)
    assert seen == [] and (ref_dir / CHECKPOINT).read_bytes() == before


# ------------------------------------------------------------------------------ torn metrics, progress


def test_resume_drops_a_torn_last_metrics_row(
    run: RunConfig, reference, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, ref_dir = reference
    assert fit(make_learner(run, hook=interrupt_at(7)), run.train, tmp_path).interrupted
    with open(tmp_path / "metrics.csv", "a") as f:
        f.write("15000,train/lo")  # the process died in the middle of a row
    assert max(s for s, _, _ in read_metrics(tmp_path / "metrics.csv")) == 8  # reading skips it
    with caplog.at_level(logging.WARNING, logger="metalab.train.logger"):
        fit(make_learner(run), run.train, tmp_path, resume=True)
    assert any(
        "torn last row" in r.getMessage() and "15000,train/lo" in r.getMessage() for r in caplog.records
    )
    assert "train/lo\n" not in (tmp_path / "metrics.csv").read_text()
    assert logged(tmp_path) == logged(ref_dir)


def test_a_bad_metrics_row_before_the_last_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text("step,key,value\n1,train/loss,0.5\n2,train/lo\n3,train/loss,0.25\n")
    with pytest.raises(CheckpointError, match=r"metrics\.csv line 3 is not a step,key,value row"):
        read_metrics(path)
    path.write_text("step,key,value\n1,train/loss,0.5\n2,train/loss,0.2")  # no newline: cut short
    assert read_metrics(path) == [(1, "train/loss", 0.5)]


def test_progress_lines_without_a_terminal(
    run: RunConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(loop, "PROGRESS_SECONDS", 0.0)
    monkeypatch.delenv("METALAB_PROGRESS", raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    with caplog.at_level(logging.INFO, logger="metalab.progress"):
        fit(make_learner(run), run.train, tmp_path)
    lines = [r.getMessage() for r in caplog.records if r.name == "metalab.progress"]
    assert len(lines) >= 19, lines
    middle = next(line for line in lines if re.search(r"\b10/20 step\b", line))
    assert tmp_path.name in middle and "step/s" in middle and "ETA" in middle and "loss=" in middle


def test_resuming_a_run_whose_time_budget_is_spent_takes_no_step(sinusoid_config, tmp_path: Path) -> None:
    """A run that stopped on train.max_minutes stays where it stopped when resumed (a benchmark re-testing it
    tests the weights it trained), and goes on once the budget is raised."""
    run = run_config_from_dict(sinusoid_config(train={"max_minutes": 1e-9, "steps": 50}))
    first = fit(make_learner(run), run.train, tmp_path)
    assert first.step == 1  # the budget is checked after each step
    again = make_learner(run)
    resumed = fit(again, run.train, tmp_path, resume=True)
    assert resumed.step == 1 and resumed.metrics == {}
    saved = load_checkpoint(tmp_path / CHECKPOINT)["model"]
    assert all(
        torch.equal(v, saved[k]) for k, v in again.model.state_dict().items()
    )  # the checkpoint's weights
