"""Every configuration in ``configs/`` trained for a few steps on one device, then evaluated on a few episodes.

    python -m benchmarks.device_smoke --device cuda                     # on a machine with a GPU
    python -m benchmarks.device_smoke --only maml_sinusoid dqn_her_bitflip --device cpu

The CPU path is what the test suite covers; this script is the check that each algorithm also runs end to end
on an accelerator (models, data, losses, replay buffers and evaluation all on the device, checkpoints written).
It is not a learning benchmark: a few steps teach nothing. Per configuration it records ``ok`` (1 or 0, with
the error when 0) and the seconds of the short training plus evaluation, in ``results/device_smoke.json``;
the last lines printed are a table.
"""

from __future__ import annotations

import tempfile
import time
import traceback
from pathlib import Path

from benchmarks.common import RESULTS, device_name, merge_results, parse_args, parser, record
from benchmarks.fewshot import build, config_path
from metalab.experiment import load_run_config
from metalab.train.loop import fit

BENCH = "device_smoke"
CONFIGS = sorted(p.stem for p in config_path("x").parent.glob("*.yaml"))
STEPS = 20
# Algorithms that collect experience before their first update: fewer warm-up steps, so updates happen too.
EXTRA = {
    "dqn": [f"train.steps={10 * STEPS}", "dqn.learning_starts=50"],
    "dream": ["dream.learning_starts=5"],
    "rl2": ["rl2.learning_starts=5"],
    "pearl": ["pearl.initial_steps=20"],
}


def smoke(name: str, device: str, episodes: int, runs: Path) -> tuple[dict, str]:
    """Train ``configs/<name>.yaml`` for a few steps on ``device`` and evaluate it: (record, one-line outcome)."""
    overrides = [
        f"train.steps={STEPS}",
        f"train.device={device}",
        f"train.eval_every={STEPS}",
        f"train.checkpoint_every={STEPS}",
        f"train.eval_episodes={episodes}",
        f"eval.episodes={episodes}",
    ]
    start = time.perf_counter()
    error, steps = "", None
    try:
        algo = load_run_config(config_path(name), overrides).algo
        learner, run, resolved = build(config_path(name), overrides + EXTRA.get(algo, []))
        fitted = fit(learner, run.train, runs / name, resume=False)
        steps = fitted.step
        learner.model.eval()
        metrics = learner.evaluate("test", episodes)
        outcome = f"{fitted.step} steps, " + ", ".join(
            f"{k}={v:.3g}" for k, v in list(metrics.items())[:2] if isinstance(v, float)
        )
        on = device_name(resolved)
    except Exception as e:  # a smoke run reports every failure and goes on
        traceback.print_exc()
        error, outcome, on = f"{type(e).__name__}: {e}", f"FAILED {type(e).__name__}: {e}", device
    seconds = time.perf_counter() - start
    rec = record(BENCH, name, "metalab", "ok", float(not error), unit="bool", steps=steps, seconds=seconds,
                 device=on, error=error or None)  # fmt: skip
    return rec, outcome


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0], CONFIGS)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--episodes", type=int, default=10, help="evaluation episodes per configuration")
    p.add_argument("--results-dir", type=Path, default=RESULTS, help="where device_smoke.json goes")
    args = parse_args(p, argv)
    rows, records = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or CONFIGS:
            rec, outcome = smoke(name, args.device, args.episodes, Path(tmp))
            records.append(rec)
            rows.append(f"{name:32s} {rec['seconds']:7.1f} s  {outcome}")
            print(rows[-1], flush=True)
    print(merge_results(BENCH, records, args.results_dir))
    print(
        f"\n{len(records) - sum(not r['value'] for r in records)}/{len(records)} ok on {records[0]['device']}"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
