"""``train.autocast``: bfloat16 autocast of the metric learners' and SNAIL's forward passes stays close to float32
(loss and gradients from the same weights on the same episode), is really applied, and is refused where a
learner does not take it."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from metalab.errors import ConfigError
from metalab.experiment import algorithm, load_run_config
from metalab.train import loop, precision
from metalab.train.loop import fit

REPO = Path(__file__).resolve().parents[1]
SHAPES = {
    "protonet_omniglot_5w1s": ["task.train_ways=5", "task.train_queries=2", "protonet.hidden=16"],
    "relation_omniglot_5w1s": ["task.queries=2"],
    "snail_omniglot_5w1s": ["train.meta_batch=2", "task.queries=2"],
    "matching_omniglot_5w1s": ["train.meta_batch=1", "task.queries=2"],
    "baselinepp_omniglot_5w1s": ["transfer.batch_size=16"],  # the transfer baselines' own pretraining loss
}


def first_step(config: str, autocast: str, root: Path) -> tuple[float, torch.Tensor, list[torch.Tensor]]:
    """Loss, the conv trunk's output dtype and gradients of training step 0 from seed-0 weights."""
    overrides = [*SHAPES[config], f"train.autocast={autocast}", "train.device=cpu"]
    run = load_run_config(REPO / "configs" / f"{config}.yaml", overrides)
    torch.manual_seed(0)
    learner = algorithm(run.algo).build(run, root, torch.device("cpu"))
    conv = next(m for m in learner.model.modules() if isinstance(m, torch.nn.Conv2d))
    seen: list[torch.dtype] = []
    handle = conv.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    learner.model.train()
    loss, _ = learner.loss(0)
    handle.remove()
    loss.backward()
    grads = [p.grad.flatten() for p in learner.model.parameters() if p.grad is not None]
    return loss.item(), seen[0], grads


@pytest.mark.parametrize("config", sorted(SHAPES))
def test_bf16_autocast_is_applied_and_close_to_float32(config: str, omniglot_root: Path) -> None:
    loss32, dtype32, grads32 = first_step(config, "none", omniglot_root)
    loss16, dtype16, grads16 = first_step(config, "bf16", omniglot_root)
    assert (dtype32, dtype16) == (torch.float32, torch.bfloat16)
    assert loss16 != loss32  # the bfloat16 path really ran
    assert loss16 == pytest.approx(loss32, rel=2e-2)
    g32, g16 = torch.cat(grads32), torch.cat(grads16)
    # bfloat16 keeps 8 mantissa bits: on one small episode the gradients agree to a cosine of about 0.97-0.99
    # (measured), the conv biases before BatchNorm aside (their true gradient is 0: both are rounding noise)
    assert torch.nn.functional.cosine_similarity(g32, g16, dim=0) > 0.95


def test_shipped_fewshot_configs_autocast() -> None:
    # the throughput benchmark measured the win on these learners; MAML keeps float32 (1.09x, second order)
    for stem in ("protonet_omniglot_5w5s", "relation_omniglot_20w5s", "snail_omniglot_5w1s"):
        assert load_run_config(REPO / "configs" / f"{stem}.yaml").train.autocast == "bf16"
    assert load_run_config(REPO / "configs" / "maml_omniglot_5w1s.yaml").train.autocast == "none"


def test_bad_autocast_value_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"train\.autocast"):
        load_run_config(REPO / "configs" / "maml_sinusoid.yaml", ["train.autocast=fp16"])


def test_fit_refuses_autocast_for_a_learner_without_it(tmp_path: Path) -> None:
    run = load_run_config(REPO / "configs" / "maml_sinusoid.yaml", ["train.steps=1", "train.device=cpu"])
    learner = algorithm(run.algo).build(run, Path("unused"), torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"train\.autocast.*metric learners and SNAIL"):
        fit(learner, replace(run.train, autocast="bf16"), tmp_path)
    assert not (tmp_path / loop.CHECKPOINT).exists()


@pytest.mark.parametrize(("flags", "warned"), [([], True), (["amx_bf16"], False), (None, False)])
def test_emulated_bf16_cpu_warns(
    flags: list[str] | None, warned: bool, omniglot_root: Path, tmp_path: Path, monkeypatch, caplog
) -> None:
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: flags)
    overrides = [
        *SHAPES["protonet_omniglot_5w1s"],
        "train.steps=1",
        "train.eval_episodes=2",
        "train.device=cpu",
    ]
    run = load_run_config(REPO / "configs" / "protonet_omniglot_5w1s.yaml", overrides)
    learner = algorithm(run.algo).build(run, omniglot_root, torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger=loop.log.name):
        fit(learner, run.train, tmp_path)
    assert ("CPU without native bfloat16" in caplog.text) == warned
