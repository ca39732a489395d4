"""benchmarks.unsupervised: the configuration grid (CACTUs, oracle and scratch rows for the four cells), how a
configuration's name reads, and a tiny run of the from-scratch row writing a record in the agreed shape, every
configuration of a cell configured for the same test episodes."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType

import pytest
from conftest import REPO

from metalab.experiment import load_run_config

CELLS = ("5w1s", "5w5s", "20w1s", "20w5s")


@pytest.fixture
def unsupervised(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(
        str(REPO)
    )  # benchmarks/ is a top-level package beside metalab/, not installed
    return importlib.import_module("benchmarks.unsupervised")


def test_every_cell_has_cactus_oracle_and_scratch_rows(unsupervised: ModuleType) -> None:
    for cell in CELLS:
        for name in (f"cactus-protonet-{cell}", f"cactus-maml-{cell}", f"oracle-protonet-{cell}",
                     f"oracle-maml-{cell}", f"scratch-{cell}"):  # fmt: skip
            assert name in unsupervised.CONFIGS
    assert unsupervised.cell_parts("protonet-umtra-5w1s") == ("protonet", "umtra", "5w1s")
    assert unsupervised.cell_parts("cactus-maml-20w5s") == ("maml", "cactus", "20w5s")
    assert unsupervised.cell_parts("oracle-protonet-5w5s") == ("protonet", "oracle", "5w5s")
    assert unsupervised.cell_parts("scratch-20w1s") == ("scratch", "support", "20w1s")


@pytest.mark.parametrize("cell", CELLS)
def test_a_cells_rows_are_tested_on_the_same_episodes(unsupervised: ModuleType, cell: str) -> None:
    """The test episodes are fixed by ways, shots, queries, split, eval seed and eval batch (batch ``i`` of
    ``eval.batch`` tasks is drawn from the seed and ``i``): the same for CACTUs-ProtoNet, its oracle and the
    scratch row (the scratch row's 320 episodes are the first 20 batches of the others' 1000), and for
    CACTUs-MAML and its oracle. The oracle reads labels; CACTUs builds its tasks from clusters."""
    groups = {
        "protonet": (f"cactus-protonet-{cell}", f"oracle-protonet-{cell}", f"scratch-{cell}"),
        "maml": (f"cactus-maml-{cell}", f"oracle-maml-{cell}"),
    }
    ways, shots = (int(x) for x in cell[:-1].split("w"))
    runs = {}
    for names in groups.values():
        for name in names:
            stem, sets = unsupervised.CELLS[name]
            runs[name] = load_run_config(REPO / "configs" / f"{stem}.yaml", sets)
        seen = {(r.task.ways, r.task.shots, r.task.queries, r.task.split, r.eval.seed, r.eval.batch)
                for name, r in runs.items() if name in names}  # fmt: skip
        assert len(seen) == 1 and next(iter(seen))[:4] == (ways, shots, 15, "vinyals"), (names, seen)
    assert 320 % runs[f"scratch-{cell}"].eval.batch == 0
    for method in groups:
        assert runs[f"cactus-{method}-{cell}"].task.construction == "cactus"
        assert runs[f"oracle-{method}-{cell}"].task.construction != "cactus"
    assert runs[f"scratch-{cell}"].params.finetune_backbone


def test_the_scratch_row_fits_an_untrained_network_and_records_it(
    unsupervised: ModuleType, omniglot_root: Path, tmp_path: Path
) -> None:
    args = [
        "--only", "scratch-5w1s", "--test-episodes", "2", "--set", "transfer.finetune_steps=2",
        "--set", "train.device=cpu", "--results-dir", str(tmp_path), "--runs-dir", str(tmp_path / "runs"),
        "--allow-dirty",
    ]  # fmt: skip
    unsupervised.main(args)
    (rec,) = json.loads((tmp_path / "unsupervised.json").read_text())
    assert rec["method"] == "scratch-support" and rec["task"] == "omniglot-vinyals-5w1s"
    assert rec["steps"] == 0 and rec["test_episodes"] == 2 and rec["finetune_steps"] == 2
    assert 0 <= rec["value"] <= 100 and rec["ci95"] is not None
    assert not (tmp_path / "runs").exists()  # nothing was trained
