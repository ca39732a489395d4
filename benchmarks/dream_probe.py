"""Where a trained DREAM agent's exploration goes on CityGrid, and whether its decoder reads it right.

    python -m benchmarks.dream_probe RUN_DIR                      # the run's latest checkpoint
    python -m benchmarks.dream_probe RUN_DIR --problems 50        # fewer val problems

For the 53 training problems and ``--problems`` val ones (drawn with a fixed seed from the 100 val problems: held
out from training, never the test ones), one greedy meta-episode each: the exploration episode's length in steps and
whether the explorer ended it itself (``end_episode``, official action set only), its bus rides from a useful stop
and from a distracting stop, the distinct useful stops ridden, whether the decoded ``z`` is nearest to the ``F(mu)``
of a training problem with the same useful buses ("right"), next to the best any decoder can do from those rides on
a problem it has not memorised (``right_bound``: two distinct useful rides leave two permutations possible, one ride
six), and the exploitation return. Also how ``F(mu)`` clusters: the mean distance between training problems with the
same useful buses and with different ones. Prints a table and writes ``RUN_DIR/probe.json``.

This is the measurement behind docs/notes/dream.md's account of DREAM on the distracting buses: with the paper's reward the
explorer adds distracting rides whose pairing with useful ones it memorised on the training problems, so held-out
decodings go wrong; with the cross-fitted reward it rides useful buses only.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metalab.envs.citygrid import END_EPISODE, RIDE, CityLayout, decode_problem
from metalab.errors import CheckpointError, MetalabError
from metalab.experiment import CONFIG_NAME, load_run_config
from metalab.rl import dream
from metalab.rl.meta_episodes import (
    Policy,
    Step,
    make_problems,
    play_meta_episode,
    recurrent_policy,
    steps_to_sequence,
)
from metalab.train.checkpoint import load_checkpoint
from metalab.train.loop import BEST, CHECKPOINT, weights_file
from metalab.utils import atomic_path


def rides(steps: Sequence[Step], layout: CityLayout) -> tuple[int, int, int]:
    """``(useful rides, distracting rides, distinct useful stops ridden)`` of one episode: rides that moved the
    agent away from a useful or a distracting stop (rides back from a destination are neither)."""
    useful, distracting, seen = 0, 0, set()
    for s in steps:
        here, there = (int(s.obs[0]), int(s.obs[1])), (int(s.next_obs[0]), int(s.next_obs[1]))
        if s.action != RIDE or here == there:
            continue
        if here in layout.stops:
            useful += 1
            seen.add(here)
        elif here in layout.distractor_stops:
            distracting += 1
    return useful, distracting, len(seen)


def right_bound(distinct: int) -> float:
    """The best chance of naming the whole useful permutation after rides from ``distinct`` useful stops, for a
    problem whose distracting buses say nothing: 1 over the permutations still possible (two rides leave two,
    one ride six). A decoder can beat it only on problems it memorised (the training ones)."""
    return 1.0 / math.factorial(4 - min(distinct, 4))


def same_useful_buses(a: int, b: int) -> bool:
    return decode_problem(a)[0] == decode_problem(b)[0]


def clusters(encodings: torch.Tensor, problems: Sequence[int]) -> tuple[float, float]:
    """Mean distance between the encodings ``(P, Z)`` of problems with the same useful buses (pairs of distinct
    problems) and with different ones."""
    dist = torch.cdist(encodings, encodings).numpy()
    same = np.array([[same_useful_buses(a, b) for b in problems] for a in problems])
    off = ~np.eye(len(problems), dtype=bool)
    return float(dist[same & off].mean()) if (same & off).any() else float("nan"), float(dist[~same].mean())


def decoding_executor(
    model: dream.DREAM,
    n_actions: int,
    horizon: int,
    decoded: list[torch.Tensor],
    rng: np.random.Generator,
    device: torch.device,
) -> Callable[[list[Step]], Policy]:
    """DREAM's greedy exploitation (decode the exploration, act on it) that also appends the decoded ``z`` to
    ``decoded``."""

    def exploit(steps: list[Step]) -> Policy:
        decoded.append(dream.decode(model, steps_to_sequence([steps], n_actions, -1, horizon), device))
        return dream.exec_policy(model, decoded[-1], n_actions, 0.0, rng, device)

    return exploit


def probe(run_dir: Path, n_val: int = 100, checkpoint: str | None = None, seed: int = 0) -> dict[str, Any]:
    """The probe's numbers for the DREAM run in ``run_dir`` (see the module docstring), with the weights in
    ``checkpoint``: by default those the run selected (``best.pt``, with ``train.keep_best``), else its last."""
    if not (run_dir / CONFIG_NAME).is_file():
        raise CheckpointError(f"{run_dir} has no {CONFIG_NAME}: not a DREAM run directory")
    run = load_run_config(run_dir / CONFIG_NAME, [])
    if checkpoint is None:
        checkpoint = weights_file(run_dir, run.train)
    if not (run_dir / checkpoint).is_file():
        raise CheckpointError(f"{run_dir} has no {checkpoint}: not a trained DREAM run directory")
    if run.algo != "dream":
        raise CheckpointError(f"{run_dir} is a {run.algo} run; the probe reads DREAM runs")
    device = torch.device("cpu")
    env, _, n_actions, _, horizon, train_problems = make_problems(run.env, "DREAM", run.eval.episodes)
    model = dream.DREAM(len(train_problems), env.observation_space, n_actions, run.params, 0)
    state = load_checkpoint(run_dir / checkpoint)
    model.load_state_dict(state["model"])
    model.eval()
    layout = env.unwrapped.layout
    encodings = model.embedding.weight.detach()
    rng = np.random.default_rng(seed)
    val = env.unwrapped.problems("val")
    held_out = [int(p) for p in rng.choice(val, min(n_val, len(val)), replace=False)]
    same, different = clusters(encodings, train_problems)
    out: dict[str, Any] = {"step": int(state["step"]), "weights": checkpoint, "encoding_distance_same_useful": same,
                           "encoding_distance_different_useful": different}  # fmt: skip
    for split, pool in (("train", train_problems), ("val", held_out)):
        rows = []
        for i, problem in enumerate(pool):
            decoded: list[torch.Tensor] = []  # the decoded z, filled in by exploit()
            exploit = decoding_executor(model, n_actions, horizon, decoded, rng, device)
            explore = recurrent_policy(model.explorer, n_actions, 0.0, rng, device)
            episode = play_meta_episode(env, problem, 1000 + i, explore, exploit)
            nearest = train_problems[int(torch.cdist(decoded[0][None], encodings)[0].argmin())]
            useful, distracting, distinct = rides(episode.explore, layout)
            right = same_useful_buses(nearest, problem)
            stopped = any(step.action == END_EPISODE for step in episode.explore)
            rows.append(
                (useful, distracting, distinct, right, episode.exploit_return, len(episode.explore), stopped)
            )
        useful, distracting, distinct, right, ret, length, stopped = (
            np.array(c, dtype=float) for c in zip(*rows, strict=True)
        )
        out[split] = {
            "problems": len(pool),
            "ids": [int(q) for q in pool],
            "explore_steps": float(length.mean()),
            "explore_ended_by_agent": float(stopped.mean()),
            "useful_rides": float(useful.mean()),
            "distracting_rides": float(distracting.mean()),
            "distinct_useful_stops": float(distinct.mean()),
            "right": float(right.mean()),
            "right_bound": float(np.mean([right_bound(int(k)) for k in distinct])),
            "return": float(ret.mean()),
            "by_distinct_useful_stops": {
                int(k): {
                    "fraction": float((distinct == k).mean()),
                    "right": float(right[distinct == k].mean()),
                    "right_bound": right_bound(int(k)),
                    "return": float(ret[distinct == k].mean()),
                }
                for k in sorted(set(distinct.astype(int).tolist()))
            },
        }
    return out


def report(out: dict[str, Any]) -> str:
    lines = [
        f"step {out['step']}: F(mu) distance, same useful buses {out['encoding_distance_same_useful']:.3f}, "
        f"different {out['encoding_distance_different_useful']:.3f}"
    ]
    for split in ("train", "val"):
        s = out[split]
        lines.append(f"{split:5s} {s['problems']:4d} problems: exploration {s['explore_steps']:.1f} steps (ended by "
                     f"the agent {s['explore_ended_by_agent']:.2f}), useful rides {s['useful_rides']:.2f}, distracting "
                     f"{s['distracting_rides']:.2f}, distinct useful stops {s['distinct_useful_stops']:.2f}, "
                     f"right {s['right']:.2f} (bound {s['right_bound']:.2f}), return {s['return']:.3f}")  # fmt: skip
        for k, row in s["by_distinct_useful_stops"].items():
            lines.append(f"      {k} distinct useful stops: {row['fraction']:.2f} of episodes, right {row['right']:.2f} "
                         f"(bound {row['right_bound']:.2f}), return {row['return']:.3f}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path, help="a DREAM run directory (config.yaml and a checkpoint)")
    p.add_argument(
        "--problems", type=int, default=100, help="val problems to play (at most 100, the default)"
    )
    p.add_argument(
        "--checkpoint",
        help=f"weights file in RUN_DIR (default: {BEST} when the run selected weights, else {CHECKPOINT})",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    try:
        out = probe(args.run_dir, args.problems, args.checkpoint)
    except MetalabError as e:
        raise SystemExit(f"error: {e}") from None
    print(report(out))
    with atomic_path(args.run_dir / "probe.json") as tmp:
        tmp.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
