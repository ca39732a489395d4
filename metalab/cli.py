"""The ``metalab`` command: train, evaluate, plot, and manage data. Bad input ends with one line, never a traceback."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

from metalab.errors import MetalabError

log = logging.getLogger("metalab")

DATASETS = ("omniglot",)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="metalab",
        description="Meta-learning and meta-RL on PyTorch. Each command has its own --help.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument(
        "--data-root", metavar="PATH", help="data root (default: $METALAB_DATA, else ~/.cache/metalab)"
    )
    # --data-root is accepted before or after the command name.
    root = argparse.ArgumentParser(add_help=False)
    root.add_argument("--data-root", metavar="PATH", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser(
        "train",
        parents=[root],
        help="train from a YAML config (or resume a run)",
        description="Train from CONFIG into a new run directory runs/<algo>-<task or env>-s<seed>-<time>/ "
        "(config.yaml, metrics.csv, tb/, checkpoint.pt, result.json, PNG plots). Ctrl-C saves a "
        "checkpoint; `metalab train --resume RUN_DIR` continues it exactly.",
    )
    t.add_argument("config", nargs="?", help="YAML config (see configs/)")
    t.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.steps=500 (repeatable)",
    )
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    t.add_argument("--runs-dir", default="runs", help="where new run directories go (default: runs)")

    e = sub.add_parser(
        "eval",
        parents=[root],
        help="evaluate a trained run on its test episodes",
        description="Load RUN_DIR's config and checkpoint and report mean and 95%% CI over the "
        "fixed test episodes (eval.episodes of them).",
    )
    e.add_argument("run_dir")
    e.add_argument("--part", choices=("test", "val"), default="test")
    e.add_argument(
        "--last",
        action="store_true",
        help="the final weights (checkpoint.pt) even when the run selected others with train.keep_best (best.pt)",
    )
    e.add_argument("--episodes", type=int, help="number of episodes (default: eval.episodes of the run)")
    e.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key for this evaluation, e.g. --set maml.eval_inner_steps=20",
    )
    e.add_argument(
        "--inner-steps",
        type=int,
        metavar="N",
        help="adapt with N inner gradient steps (gradient-based algorithms; short for --set <algo>.eval_inner_steps=N)",
    )

    pl = sub.add_parser("plot", help="draw a run's learning curves to RUN_DIR/metrics.png")
    pl.add_argument("run_dir")

    d = sub.add_parser("data", help="install data sets and show what is installed")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    di = dsub.add_parser(
        "install",
        parents=[root],
        help="install a data set from local files or by download",
        description="Install DATASET into the data root from a folder of its official files "
        "(--from) or by downloading them with md5 checks (--download). For omniglot, --from "
        "takes a folder with images_background.zip / images_evaluation.zip (and optionally "
        "splits/vinyals/*.txt) or one of the zips.",
    )
    di.add_argument("dataset", help=f"one of: {', '.join(DATASETS)}")
    src = di.add_mutually_exclusive_group(required=True)
    src.add_argument("--from", dest="source", metavar="PATH", help="folder or zip with the official files")
    src.add_argument("--download", action="store_true", help="download from the official location")
    dsub.add_parser("info", parents=[root], help="show the data and cache roots and what each holds")
    ds = dsub.add_parser(
        "show",
        parents=[root],
        help="draw one episode of a data set to a PNG, to look at it",
        description="Draw a sampled Omniglot episode (a row per class, support framed) to a PNG.",
    )
    ds.add_argument("dataset", help=f"one of: {', '.join(DATASETS)}")
    ds.add_argument("--split", choices=("vinyals", "lake"), default="vinyals")
    ds.add_argument("--part", choices=("train", "val", "trainval", "test"), default="train")
    ds.add_argument("--ways", type=int, default=5)
    ds.add_argument("--shots", type=int, default=1)
    ds.add_argument("--queries", type=int, default=5)
    ds.add_argument("--seed", type=int, default=0)
    ds.add_argument("-o", "--output", default="episode.png", help="PNG to write (default: episode.png)")
    return p


def _data_root(args: argparse.Namespace, configured: str | None = None) -> Path:
    from metalab.data.root import data_root

    return data_root(args.data_root or configured)


def _train(args: argparse.Namespace) -> int:
    import yaml

    from metalab.experiment import CONFIG_NAME, algorithm, load_run_config, load_run_dir_config, new_run_dir
    from metalab.train.loop import fit
    from metalab.train.plots import plot_metrics
    from metalab.utils import resolve_device, seed_everything

    if bool(args.config) == bool(args.resume):
        raise MetalabError("train needs either CONFIG or --resume RUN_DIR (not both)")
    if args.resume:
        run_dir = Path(args.resume)
        run = load_run_dir_config(run_dir)
        if args.overrides:
            from metalab.config import merge, parse_overrides
            from metalab.experiment import run_config_from_dict

            run = run_config_from_dict(merge(run.to_yaml_dict(), parse_overrides(args.overrides)))
            (run_dir / CONFIG_NAME).write_text(yaml.safe_dump(run.to_yaml_dict(), sort_keys=False))
    else:
        run = load_run_config(args.config, args.overrides)
    device = resolve_device(run.train.device)
    seed_everything(run.seed)
    learner = algorithm(run.algo).build(run, _data_root(args, run.task.data_root), device)
    if not args.resume:
        run_dir = new_run_dir(run, Path(args.runs_dir))
    log.info("run directory: %s (device %s)", run_dir, device)
    result = fit(learner, run.train, run_dir, resume=bool(args.resume))
    plot_metrics(run_dir)
    if result.interrupted:
        print(
            f"interrupted at step {result.step}; checkpoint saved. Continue with: metalab train --resume {run_dir}"
        )
        return 130
    learner.model.eval()
    test = learner.evaluate("test", run.eval.episodes)
    figures = [str(p) for p in (learner.figures(run_dir) if learner.figures else [])]
    summary = {"run_dir": str(run_dir), "step": result.step, "selected_step": result.best_step, **test}
    (run_dir / "result.json").write_text(json.dumps(_jsonable(summary), indent=2) + "\n")
    print(_describe(test))
    if result.best_step is not None:
        print(
            f"tested the weights of step {result.best_step}, selected by train.keep_best={run.train.keep_best}"
        )
    print(f"run directory: {run_dir} (metrics.png{''.join(', ' + Path(f).name for f in figures)})")
    return 0


def _jsonable(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def _describe(metrics: dict[str, float]) -> str:
    parts = []
    for key, value in metrics.items():
        if key.endswith("_ci95"):
            continue
        ci = metrics.get(f"{key}_ci95")
        parts.append(f"{key} = {value:.4f}" + (f" ± {ci:.4f} (95% CI)" if ci is not None else ""))
    return "; ".join(parts)


def _eval(args: argparse.Namespace) -> int:
    from metalab.config import merge, parse_overrides
    from metalab.errors import CheckpointError
    from metalab.experiment import algorithm, load_run_dir_config, run_config_from_dict
    from metalab.train.checkpoint import load_checkpoint
    from metalab.train.loop import BEST, CHECKPOINT, weights_file
    from metalab.utils import resolve_device

    run_dir = Path(args.run_dir)
    run = load_run_dir_config(run_dir)
    overrides = list(args.overrides)
    if args.inner_steps is not None:
        if not hasattr(run.params, "eval_inner_steps"):
            raise MetalabError(f"--inner-steps: {run.algo} has no inner loop to set the steps of")
        overrides.append(f"{run.algo}.eval_inner_steps={args.inner_steps}")
    if overrides:
        run = run_config_from_dict(merge(run.to_yaml_dict(), parse_overrides(overrides)))
    device = resolve_device(run.train.device)
    learner = algorithm(run.algo).build(run, _data_root(args, run.task.data_root), device)
    weights = run_dir / (CHECKPOINT if args.last else weights_file(run_dir, run.train))
    selected = weights.name == BEST
    state = load_checkpoint(weights, map_location=device)
    try:
        learner.model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"{weights} does not fit the run's model: {e}") from None
    learner.model.eval()
    if args.episodes is not None and args.episodes < 1:
        raise MetalabError(f"--episodes must be >= 1, got {args.episodes}")
    metrics = learner.evaluate(args.part, args.episodes or run.eval.episodes)
    which = f"step {state['step']}" + (f", selected by {run.train.keep_best}" if selected else "")
    print(f"{run_dir} ({which}): {_describe(metrics)}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from metalab.train.plots import plot_metrics

    print(plot_metrics(Path(args.run_dir)))
    return 0


def _data(args: argparse.Namespace) -> int:
    from metalab.data import omniglot
    from metalab.data.root import cache_root

    root = _data_root(args)
    if args.data_command == "info":
        print(f"data root:  {root}\ncache root: {cache_root()}")
        base = omniglot.omniglot_dir(root)
        for name in omniglot.SETS:
            where = [p.name for p in (base / name, base / f"{name}.zip") if p.exists()]
            print(f"omniglot {name}: {', '.join(where) or 'missing'}")
        lists = [p for p in omniglot.SPLIT_PARTS if (base / "splits" / "vinyals" / f"{p}.txt").is_file()]
        print(f"omniglot vinyals split lists: {', '.join(lists) or 'missing'}")
        caches = (
            sorted((cache_root() / "omniglot").glob("*.pt")) if (cache_root() / "omniglot").is_dir() else []
        )
        print(f"omniglot decoded caches: {', '.join(p.name for p in caches) or 'none'}")
        return 0
    if args.dataset not in DATASETS:
        raise MetalabError(f"unknown dataset {args.dataset!r}; choose one of: {', '.join(DATASETS)}")
    if args.data_command == "show":
        return _show(args, root)
    data = omniglot.fetch(root) if args.download else omniglot.install(Path(args.source), root)
    print(
        f"omniglot installed in {omniglot.omniglot_dir(root)}: {data.images.shape[0]} characters, "
        f"{int(data.background.sum())} background / {int((~data.background).sum())} evaluation"
    )
    return 0


def _show(args: argparse.Namespace, root: Path) -> int:
    from metalab.data import omniglot
    from metalab.data.episodes import EpisodeSampler
    from metalab.train.plots import plot_episode

    classes = omniglot.split_classes(omniglot.load(root), root, args.split, args.part)
    try:
        sampler = EpisodeSampler(classes.images, args.ways, args.shots, args.queries, seed=args.seed)
    except ValueError as e:
        raise MetalabError(str(e)) from None
    title = f"omniglot {args.split}/{args.part}: {args.ways}-way {args.shots}-shot (blue: support)"
    print(plot_episode(sampler.sample(0, 1).task(0), Path(args.output), title))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    commands = {"train": _train, "eval": _eval, "plot": _plot, "data": _data}
    try:
        return commands[args.command](args)
    except MetalabError as e:
        print(f"metalab: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # missing file, permission denied, full disk: the OS said no, nothing is broken here
        print(f"metalab: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("metalab: interrupted", file=sys.stderr)
        return 130
