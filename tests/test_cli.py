"""The ``metalab`` command: one-line errors without tracebacks, and tiny end-to-end runs."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from metalab.cli import main
from metalab.train.checkpoint import load_checkpoint
from metalab.train.logger import read_metrics

SINUSOID = str(REPO / "configs" / "maml_sinusoid.yaml")
PROTONET = str(REPO / "configs" / "protonet_omniglot_5w1s.yaml")
MAML_OMNIGLOT = str(REPO / "configs" / "maml_omniglot_5w1s.yaml")
TINY_SINUSOID_SET = [
    "train.steps=20",
    "train.meta_batch=5",
    "train.log_every=5",
    "train.eval_every=10",
    "train.eval_episodes=10",
    "train.checkpoint_every=10",
    "eval.episodes=20",
    "eval.batch=10",
    "maml.eval_inner_steps=2",
    "train.device=cpu",
]


def sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, *fragments: str) -> None:
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("metalab: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


def only_run_dir(runs: Path) -> Path:
    dirs = [p for p in runs.iterdir() if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


# ------------------------------------------------------------------------------------------- errors


def test_missing_config_file(capsys, tmp_path: Path) -> None:
    rc, _, err = run_cli(
        capsys, "train", str(tmp_path / "missing.yaml"), "--runs-dir", str(tmp_path / "runs")
    )
    assert_one_line_error(rc, err, "not found", "missing.yaml")
    assert not (tmp_path / "runs").exists()


def test_bad_yaml(capsys, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("algo: maml\ntrain: {steps: [1,\n")
    rc, _, err = run_cli(capsys, "train", str(bad))
    assert_one_line_error(rc, err, "not valid YAML", "bad.yaml")


def test_unknown_key(capsys, tmp_path: Path) -> None:
    rc, _, err = run_cli(capsys, "train", SINUSOID, "--set", "train.lrr=0.1", "--runs-dir", str(tmp_path))
    assert_one_line_error(rc, err, "train.lrr", "did you mean 'lr'")
    assert list(tmp_path.iterdir()) == []  # no run directory for a config that does not load


def test_bad_value(capsys, tmp_path: Path) -> None:
    rc, _, err = run_cli(capsys, "train", SINUSOID, "--set", "train.lr=-1", "--runs-dir", str(tmp_path))
    assert_one_line_error(rc, err, "'train.lr'")


def test_malformed_override(capsys, tmp_path: Path) -> None:
    rc, _, err = run_cli(capsys, "train", SINUSOID, "--set", "train.lr", "--runs-dir", str(tmp_path))
    assert_one_line_error(rc, err, "key=value")


def test_unknown_algorithm(capsys, tmp_path: Path) -> None:
    rc, _, err = run_cli(capsys, "train", SINUSOID, "--set", "algo=leo", "--runs-dir", str(tmp_path))
    assert_one_line_error(rc, err, "leo", "maml")


def test_train_needs_config_or_resume(capsys, tmp_path: Path) -> None:
    rc, _, err = run_cli(capsys, "train")
    assert_one_line_error(rc, err, "CONFIG", "--resume")
    rc, _, err = run_cli(capsys, "train", SINUSOID, "--resume", str(tmp_path))
    assert_one_line_error(rc, err, "not both")


def test_resume_of_a_dir_that_is_not_a_run(capsys, tmp_path: Path) -> None:
    rc, _, err = run_cli(capsys, "train", "--resume", str(tmp_path))
    assert_one_line_error(rc, err, "not a run directory")


def test_eval_of_a_dir_that_is_not_a_run(capsys, tmp_path: Path) -> None:
    rc, _, err = run_cli(capsys, "eval", str(tmp_path))
    assert_one_line_error(rc, err, "not a run directory", str(tmp_path))


def test_eval_of_a_run_without_checkpoint(capsys, tmp_path: Path, sinusoid_config) -> None:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(sinusoid_config()))
    rc, _, err = run_cli(capsys, "eval", str(tmp_path))
    assert_one_line_error(rc, err, "no checkpoint")


def test_plot_without_metrics(capsys, tmp_path: Path) -> None:
    rc, _, err = run_cli(capsys, "plot", str(tmp_path))
    assert_one_line_error(rc, err, "metrics.csv")


def test_unknown_dataset(capsys, tmp_path: Path) -> None:
    rc, _, err = run_cli(
        capsys, "--data-root", str(tmp_path / "root"), "data", "install", "mnist", "--from", str(tmp_path)
    )
    assert_one_line_error(rc, err, "unknown dataset", "mnist", "omniglot")


def test_install_of_a_corrupt_zip(capsys, tmp_path: Path) -> None:
    bad = tmp_path / "images_background.zip"
    bad.write_bytes(b"PK\x03\x04 this is no zip file")
    root = tmp_path / "root"
    rc, _, err = run_cli(capsys, "--data-root", str(root), "data", "install", "omniglot", "--from", str(bad))
    assert_one_line_error(rc, err, "images_background.zip", "not a readable zip")
    assert not (root / "omniglot" / "images_background.zip").exists()


def test_install_of_an_unsafe_zip(capsys, tmp_path: Path) -> None:
    bad = tmp_path / "images_background.zip"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("images_background/A/character01/0001_01.png", b"x")
        z.writestr("../evil.png", b"evil")
    rc, _, err = run_cli(
        capsys, "--data-root", str(tmp_path / "root"), "data", "install", "omniglot", "--from", str(bad)
    )
    assert_one_line_error(rc, err, "unsafe member", "../evil.png")
    assert not (tmp_path / "evil.png").exists()


def test_install_from_a_missing_folder(capsys, tmp_path: Path) -> None:
    rc, _, err = run_cli(
        capsys,
        "--data-root",
        str(tmp_path / "root"),
        "data",
        "install",
        "omniglot",
        "--from",
        str(tmp_path / "nowhere"),
    )
    assert_one_line_error(rc, err, "does not exist")


def test_data_info(capsys) -> None:
    rc, out, _ = run_cli(capsys, "data", "info")
    assert rc == 0
    assert "data root:" in out and "cache root:" in out and "omniglot" in out


# ---------------------------------------------------------------------------------------- smoke runs


@pytest.fixture(scope="module")
def sinusoid_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny MAML sinusoid run through the CLI, shared by the tests that inspect it."""
    runs = tmp_path_factory.mktemp("runs")
    assert main(["train", SINUSOID, *sets(TINY_SINUSOID_SET), "--runs-dir", str(runs)]) == 0
    return only_run_dir(runs)


def test_train_writes_a_complete_run_dir(sinusoid_run: Path) -> None:
    for name in (
        "config.yaml",
        "metrics.csv",
        "checkpoint.pt",
        "metrics.png",
        "result.json",
        "sinusoid_fits.png",
    ):
        assert (sinusoid_run / name).is_file(), name
        assert (sinusoid_run / name).stat().st_size > 0, name
    assert sinusoid_run.name.startswith("maml-sinusoid-10s-s0-")
    config = yaml.safe_load((sinusoid_run / "config.yaml").read_text())
    assert (
        config["train"]["steps"] == 20 and config["maml"]["eval_inner_steps"] == 2
    )  # resolved, overrides in
    result = json.loads((sinusoid_run / "result.json").read_text())
    assert result["step"] == 20
    assert result["test/mse"] > 0 and result["test/mse_ci95"] > 0
    assert load_checkpoint(sinusoid_run / "checkpoint.pt")["step"] == 20
    keys = {k for _, k, _ in read_metrics(sinusoid_run / "metrics.csv")}
    assert {"train/loss", "train/mse", "train/lr", "val/mse"} <= keys


def test_eval_and_plot_a_run(capsys, sinusoid_run: Path) -> None:
    rc, out, err = run_cli(capsys, "eval", str(sinusoid_run), "--episodes", "50")
    assert rc == 0, err
    assert "(step 20)" in out and "test/mse" in out
    rc, again, _ = run_cli(capsys, "eval", str(sinusoid_run), "--episodes", "50")
    assert rc == 0 and again == out  # the test episodes are fixed
    rc, other, _ = run_cli(capsys, "eval", str(sinusoid_run), "--episodes", "20")
    assert rc == 0 and other != out
    png = sinusoid_run / "metrics.png"
    png.unlink()
    rc, out, _ = run_cli(capsys, "plot", str(sinusoid_run))
    assert rc == 0 and png.is_file() and str(png) in out


def test_resume_a_finished_run_for_more_steps(capsys, sinusoid_run: Path, tmp_path: Path) -> None:
    import shutil

    run_dir = tmp_path / sinusoid_run.name
    shutil.copytree(sinusoid_run, run_dir)
    rc, _, err = run_cli(capsys, "train", "--resume", str(run_dir), "--set", "train.steps=25")
    assert rc == 0, err
    assert json.loads((run_dir / "result.json").read_text())["step"] == 25
    assert load_checkpoint(run_dir / "checkpoint.pt")["step"] == 25
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["steps"] == 25
    assert max(s for s, _, _ in read_metrics(run_dir / "metrics.csv")) == 25


def test_protonet_omniglot_smoke(capsys, omniglot_data, tmp_path: Path) -> None:
    overrides = [
        "train.steps=3",
        "train.log_every=1",
        "train.eval_every=3",
        "train.eval_episodes=4",
        "train.checkpoint_every=3",
        "eval.episodes=4",
        "eval.batch=4",
        "protonet.hidden=8",
        "task.train_ways=10",
        "train.device=cpu",
    ]
    rc, out, err = run_cli(capsys, "train", PROTONET, *sets(overrides), "--runs-dir", str(tmp_path))
    assert rc == 0, err
    run_dir = only_run_dir(tmp_path)
    assert run_dir.name.startswith("protonet-omniglot-5w1s-s0-")
    result = json.loads((run_dir / "result.json").read_text())
    assert result["step"] == 3 and 0.0 <= result["test/acc"] <= 1.0
    assert "test/acc" in out
    rc, out, err = run_cli(capsys, "eval", str(run_dir), "--episodes", "4")
    assert rc == 0, err
    assert "(step 3)" in out and "test/acc" in out


def test_maml_omniglot_smoke(capsys, omniglot_data, tmp_path: Path) -> None:
    overrides = [
        "train.steps=2",
        "train.meta_batch=2",
        "train.eval_every=2",
        "train.eval_episodes=2",
        "eval.episodes=2",
        "eval.batch=2",
        "maml.hidden=8",
        "maml.eval_inner_steps=1",
        "train.device=cpu",
    ]
    rc, _, err = run_cli(capsys, "train", MAML_OMNIGLOT, *sets(overrides), "--runs-dir", str(tmp_path))
    assert rc == 0, err
    result = json.loads((only_run_dir(tmp_path) / "result.json").read_text())
    assert result["step"] == 2 and 0.0 <= result["test/acc"] <= 1.0


# ---------------------------------------------------------------------------------------- processes


def _python_m(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "metalab", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_python_m_metalab_help() -> None:
    proc = _python_m("--help")
    assert proc.returncode == 0, proc.stderr
    for command in ("train", "eval", "plot", "data"):
        assert command in proc.stdout


def test_error_in_a_real_process_is_one_line(tmp_path: Path) -> None:
    proc = _python_m("train", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"metalab: error: config file not found: {tmp_path / 'missing.yaml'}"
    ]
    assert proc.stdout == ""


def test_keep_best_is_what_train_tests_and_eval_loads(capsys, tmp_path: Path) -> None:
    # The worst validation MSE (keep_best_mode=max) is an early one: the selected weights are not the last.
    keep = ["train.eval_every=5", "train.keep_best=val/mse", "train.keep_best_mode=max"]
    rc, out, err = run_cli(
        capsys, "train", SINUSOID, *sets(TINY_SINUSOID_SET + keep), "--runs-dir", str(tmp_path)
    )
    assert rc == 0, err
    run_dir = only_run_dir(tmp_path)
    selected = load_checkpoint(run_dir / "best.pt")["step"]
    assert selected < 20 and f"weights of step {selected}" in out
    result = json.loads((run_dir / "result.json").read_text())
    assert result["selected_step"] == selected
    rc, best, _ = run_cli(capsys, "eval", str(run_dir))
    assert rc == 0 and f"(step {selected}, selected by val/mse)" in best
    assert f"test/mse = {result['test/mse']:.4f}" in best  # train's test scored the same weights
    rc, last, _ = run_cli(capsys, "eval", str(run_dir), "--last")
    assert rc == 0 and "(step 20)" in last and last.split(":", 1)[1] != best.split(":", 1)[1]


# ------------------------------------------------------------------------------ resuming with changes

RUN_FILES = ("config.yaml", "checkpoint.pt", "metrics.csv", "result.json")


def copied(run_dir: Path, tmp_path: Path) -> Path:
    """A copy of a finished run to change."""
    return Path(shutil.copytree(run_dir, tmp_path / run_dir.name))


def contents(run_dir: Path) -> dict[str, bytes]:
    return {name: (run_dir / name).read_bytes() for name in RUN_FILES}


def rates(run_dir: Path) -> dict[int, float]:
    return {s: v for s, k, v in read_metrics(run_dir / "metrics.csv") if k == "train/lr"}


@pytest.fixture(scope="module")
def cosine_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run on a cosine schedule (20 steps, rate logged every step)."""
    runs = tmp_path_factory.mktemp("cosine-runs")
    extra = ["train.lr_schedule=cosine", "train.log_every=1"]
    assert main(["train", SINUSOID, *sets(TINY_SINUSOID_SET + extra), "--runs-dir", str(runs)]) == 0
    return only_run_dir(runs)


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (["maml.mlp_hidden=[80,80]"], ["cannot change maml.mlp_hidden ([40, 40] -> [80, 80])"]),
        (["train.lr=0.0005", "task.shots=5", "train.meta_batch=7"], ["task.shots", "train.meta_batch"]),
        (["seed=3"], ["seed (0 -> 3)"]),
        (["train.lr_schedule=cosine"], ["train.lr_schedule"]),
        (["train.steps=10"], ["'train.steps'", "below the 20 steps"]),
    ],
)
def test_resume_refuses_changes_its_checkpoint_does_not_fit(
    capsys, sinusoid_run: Path, tmp_path: Path, overrides: list[str], fragments: list[str]
) -> None:
    run_dir = copied(sinusoid_run, tmp_path)
    before = contents(run_dir)
    rc, out, err = run_cli(capsys, "train", "--resume", str(run_dir), *sets(overrides))
    assert rc == 2
    assert_one_line_error(rc, err, *fragments)
    assert contents(run_dir) == before  # nothing written, not even the allowed train.lr
    rc, out, err = run_cli(capsys, "eval", str(run_dir), "--episodes", "5")
    assert rc == 0 and "(step 20)" in out, err


def test_resume_with_a_new_rate_trains_at_it(capsys, sinusoid_run: Path, tmp_path: Path) -> None:
    run_dir = copied(sinusoid_run, tmp_path)
    rc, _, err = run_cli(
        capsys, "train", "--resume", str(run_dir), *sets(["train.steps=25", "train.lr=0.0005"])
    )
    assert rc == 0, err
    state = load_checkpoint(run_dir / "checkpoint.pt")
    assert state["step"] == 25
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [0.0005]  # the restored optimizer's rate
    assert rates(run_dir)[20] == 0.001 and rates(run_dir)[25] == 0.0005
    config = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]
    assert (config["lr"], config["steps"]) == (0.0005, 25)


def test_extending_a_cosine_run_asks_how(capsys, cosine_run: Path, tmp_path: Path) -> None:
    run_dir = copied(cosine_run, tmp_path)
    before = contents(run_dir)
    rc, _, err = run_cli(capsys, "train", "--resume", str(run_dir), "--set", "train.steps=30")
    assert_one_line_error(rc, err, "'train.steps'", "--schedule continue", "--schedule restart")
    assert rc == 2 and contents(run_dir) == before


@pytest.mark.parametrize("how", ["continue", "restart"])
def test_extending_a_finished_cosine_run(capsys, cosine_run: Path, tmp_path: Path, how: str) -> None:
    run_dir = copied(cosine_run, tmp_path)
    args = ["train", "--resume", str(run_dir), "--set", "train.steps=30", "--schedule", how]
    rc, _, err = run_cli(capsys, *args)
    assert rc == 0, err
    added = [rates(run_dir)[s] / 0.001 for s in range(21, 31)]
    if how == "continue":  # hold the rate of the old cosine's last update
        assert added == pytest.approx([0.5 * (1 + math.cos(math.pi * 19 / 20))] * 10)
    else:  # a new cosine over the 10 added steps
        assert added == pytest.approx([0.5 * (1 + math.cos(math.pi * k / 10)) for k in range(1, 11)])
    assert json.loads((run_dir / "result.json").read_text())["step"] == 30


def test_resuming_a_finished_run_does_not_test_it_again(capsys, sinusoid_run: Path, tmp_path: Path) -> None:
    run_dir = copied(sinusoid_run, tmp_path)
    before = contents(run_dir)
    stamp = (run_dir / "result.json").stat().st_mtime_ns
    rc, out, err = run_cli(capsys, "train", "--resume", str(run_dir))
    assert rc == 0, err
    assert "finished at step 20" in out and "--retest" in out
    rc, out, err = run_cli(capsys, "train", "--resume", str(run_dir), "--set", "eval.episodes=10")
    assert rc == 0 and "not saved" in out, err
    assert contents(run_dir) == before and (run_dir / "result.json").stat().st_mtime_ns == stamp
    (run_dir / "result.json").unlink()
    rc, out, err = run_cli(capsys, "train", "--resume", str(run_dir), "--retest", "--set", "eval.episodes=10")
    assert rc == 0, err
    assert json.loads((run_dir / "result.json").read_text())["step"] == 20
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["eval"]["episodes"] == 10


def test_schedule_and_retest_need_resume(capsys, tmp_path: Path) -> None:
    rc, _, err = run_cli(capsys, "train", SINUSOID, "--retest", "--runs-dir", str(tmp_path))
    assert_one_line_error(rc, err, "--retest", "--resume")
    assert list(tmp_path.iterdir()) == []


def test_resume_after_a_torn_metrics_row(capsys, sinusoid_run: Path, tmp_path: Path) -> None:
    run_dir = copied(sinusoid_run, tmp_path)
    with open(run_dir / "metrics.csv", "a") as f:
        f.write("15000,train/lo")  # killed mid-write
    rc, _, err = run_cli(capsys, "train", "--resume", str(run_dir), "--set", "train.steps=25")
    assert rc == 0, err
    rows = read_metrics(run_dir / "metrics.csv")
    assert max(s for s, _, _ in rows) == 25 and "train/lo" not in {k for _, k, _ in rows}


@pytest.mark.parametrize("command", ["eval", "train"])
def test_a_truncated_checkpoint_is_one_line(capsys, sinusoid_run: Path, tmp_path: Path, command: str) -> None:
    run_dir = copied(sinusoid_run, tmp_path)
    checkpoint = run_dir / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:5000])
    args = [command, str(run_dir)] if command == "eval" else [command, "--resume", str(run_dir)]
    rc, _, err = run_cli(capsys, *args)
    assert_one_line_error(rc, err, str(checkpoint), "truncated or corrupt")
    assert "weights_only" not in err and "Errno" not in err


def test_run_dirs_asked_for_at_the_same_instant_are_distinct(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sinusoid_config
) -> None:
    from metalab.experiment import new_run_dir, run_config_from_dict

    run = run_config_from_dict(sinusoid_config())
    monkeypatch.setattr(time, "strftime", lambda fmt, *args: "20260101-000000")
    real_mkdir = Path.mkdir
    raced: list[Path] = []

    def rival_first(self: Path, *args, **kwargs) -> None:
        """Another process takes the first name after this one saw it free, before it creates it."""
        if self.parent == tmp_path / "runs" and not raced:
            raced.append(self)
            real_mkdir(self)
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", rival_first)
    path = new_run_dir(run, tmp_path / "runs")
    assert path.name == f"{raced[0].name}-2" and (path / "config.yaml").is_file()
    monkeypatch.setattr(Path, "mkdir", real_mkdir)

    start = threading.Barrier(6)
    made: list[Path] = []

    def claim() -> None:
        start.wait()
        made.append(new_run_dir(run, tmp_path / "threads"))

    threads = [threading.Thread(target=claim) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(made)) == 6 and all((p / "config.yaml").is_file() for p in made)


def test_eval_help_shows_a_plain_percent_sign(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["eval", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "95% CI" in text and "%%" not in text


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "x.yaml", "--bogus"],
        ["frob"],
        ["eval"],
        ["data", "install", "omniglot"],
        ["eval", "r", "--episodes", "x"],
    ],
)
def test_usage_errors_are_one_line(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("metalab: error: ") and err.count("\n") == 1, err
