"""The ``metalab`` command: train, evaluate, plot, and manage data. Bad input ends with one line, never a traceback."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from metalab.errors import ConfigError, MetalabError

if TYPE_CHECKING:
    from metalab.experiment import RunConfig

log = logging.getLogger("metalab")

DATASETS = ("omniglot",)
MAX_PROCESSES = 256
"""Most processes ``metalab train --nproc`` starts on one machine."""


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one ``metalab: error: ...`` line (exit 2), like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"metalab: error: {message} (see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
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
    _add_train(sub, root)
    _add_eval(sub, root)
    pl = sub.add_parser("plot", help="draw a run's learning curves to RUN_DIR/metrics.png")
    pl.add_argument("run_dir")
    _add_report(sub)
    _add_data(sub, root)
    return p


Subparsers = argparse._SubParsersAction


def _add_train(sub: Subparsers, root: argparse.ArgumentParser) -> None:
    t = sub.add_parser(
        "train",
        parents=[root],
        help="train from a YAML config (or resume a run)",
        description="Train from CONFIG into a new run directory runs/<algo>-<task or env>-s<seed>-<time>/ "
        "(config.yaml, metrics.csv, tb/, checkpoint.pt, result.json, PNG plots). Ctrl-C saves a "
        "checkpoint; `metalab train --resume RUN_DIR` continues it exactly. A resume may change "
        "bookkeeping, evaluation and the rate or length of training (--set train.steps=N extends a run), "
        "never the model or the task: see RESUMABLE in metalab/cli.py and the README.",
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
    t.add_argument(
        "--schedule",
        choices=("continue", "restart"),
        help="with --resume and a new train.steps on a cosine schedule: continue (the old cosine ends where it "
        "was planned, then the rate holds at the rate of its last update) or restart (a new cosine from "
        "train.lr over the remaining steps)",
    )
    t.add_argument(
        "--retest",
        action="store_true",
        help="with --resume of a finished run: test it again (and rewrite result.json) instead of stopping",
    )
    t.add_argument("--runs-dir", default="runs", help="where new run directories go (default: runs)")
    t.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train data-parallel in N processes on this machine (the meta-batch split over them): runs "
        "`torchrun --standalone --nproc-per-node N -m metalab train ...`; for several machines call torchrun "
        "yourself (README, Scaling out)",
    )


def _add_eval(sub: Subparsers, root: argparse.ArgumentParser) -> None:
    e = sub.add_parser(
        "eval",
        parents=[root],
        help="evaluate a trained run on its test episodes",
        description="Load RUN_DIR's config and checkpoint and report mean and 95% CI over the "
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


def _add_report(sub: Subparsers) -> None:
    r = sub.add_parser(
        "report",
        help="write docs/results.md and README.md's headline table from benchmarks/results/*.json",
        description="Generate the results pages of a metalab checkout from its benchmark records: only records "
        "from committed code under the evaluation protocol are quoted, the rest listed as pending.",
    )
    r.add_argument("--repo", default=".", help="the checkout (default: the current folder)")
    r.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if a page differs from the records"
    )


def _add_data(sub: Subparsers, root: argparse.ArgumentParser) -> None:
    d = sub.add_parser("data", help="install data sets and show what is installed")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    di = dsub.add_parser(
        "install",
        parents=[root],
        help="install a data set from local files or by download",
        description="Install DATASET into the data root from a folder of its official files "
        "(--from) or by downloading them (--download). For omniglot, --from takes a folder with "
        "images_background.zip / images_evaluation.zip (and optionally splits/vinyals/*.txt) or one "
        "of the zips (that set alone). Each zip must match the official md5 or the official "
        "content digest of its images; it is extracted beside the target, counted, and only then "
        "renamed into place, so an interrupted install leaves the previous one.",
    )
    di.add_argument("dataset", help=f"one of: {', '.join(DATASETS)}")
    src = di.add_mutually_exclusive_group(required=True)
    src.add_argument("--from", dest="source", metavar="PATH", help="folder or zip with the official files")
    src.add_argument("--download", action="store_true", help="download from the official location")
    di.add_argument(
        "--no-verify",
        action="store_true",
        help="with --from: install zips that match no official digest (e.g. modified copies), "
        "marked unverified; `data info` and every load then say so",
    )
    dsub.add_parser(
        "info",
        parents=[root],
        help="show the data and cache roots, and which sets are installed, complete and verified",
    )
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
    ds.add_argument(
        "-o",
        "--output",
        help="PNG to write (default: <cache root>/show/omniglot-<split>-<part>-<ways>w<shots>s-seed<seed>.png)",
    )


def _data_root(args: argparse.Namespace, configured: str | None = None) -> Path:
    from metalab.data.root import data_root

    return data_root(args.data_root or configured)


RESUMABLE = (
    "train.steps",
    "train.lr",
    "train.max_minutes",
    "train.eval_every",
    "train.eval_episodes",
    "train.log_every",
    "train.checkpoint_every",
    "train.device",
    "train.grad_clip",
    "train.skip_nonfinite",
    "eval.*",
    "<algo>.eval_*",
)
"""Config keys ``train --resume`` may change: bookkeeping, evaluation-only settings (``eval.*`` and the
algorithm's ``eval_*`` keys), where to train, and the rate and length of training, which are applied to the
restored optimizer and schedule. Anything else (model, task, algorithm, batch, schedule kind, model selection)
shaped the checkpoint, so a change is refused: start a new run for it."""


class _FinishedRun(Exception):
    """Raised from fit's ``resumed`` hook to stop a resume of a finished run before anything is written."""

    def __init__(self, step: int):
        super().__init__(step)
        self.step = step


def _resumable(key: str, algo: str) -> bool:
    """Whether ``--resume`` may change config key ``key`` (dotted) of a run of ``algo``."""
    section, _, name = key.partition(".")
    return key in RESUMABLE or section == "eval" or (section == algo and name.startswith("eval_"))


def _flatten(data: dict, prefix: str = "") -> dict[str, object]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}``."""
    flat: dict[str, object] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


Changes = dict[str, tuple[object, object]]
"""Config changes, ``dotted key: (old value, new value)``."""


def _resume_changes(run_dir: Path, overrides: list[str]) -> tuple[RunConfig, Changes]:
    """The run of ``run_dir`` with ``overrides`` applied, and what they change (``key: (old, new)``); a change
    outside :data:`RESUMABLE` raises ConfigError naming every such key. Reads only."""
    from metalab.config import merge, parse_overrides
    from metalab.experiment import load_run_dir_config, run_config_from_dict

    saved = load_run_dir_config(run_dir)
    if not overrides:
        return saved, {}
    run = run_config_from_dict(merge(saved.to_yaml_dict(), parse_overrides(overrides)))
    before, after = _flatten(saved.to_yaml_dict()), _flatten(run.to_yaml_dict())
    keys = sorted(before.keys() | after.keys())
    changes = {k: (before.get(k), after.get(k)) for k in keys if before.get(k) != after.get(k)}
    refused = [k for k in changes if not _resumable(k, saved.algo)]
    if refused:
        what = ", ".join(f"{k} ({changes[k][0]} -> {changes[k][1]})" for k in refused)
        raise ConfigError(
            "",
            f"--resume {run_dir}: cannot change {what}: its checkpoint was trained with the saved value; start a "
            f"new run for that (a resume may change {', '.join(RESUMABLE)})",
        )
    return run, changes


def _train(args: argparse.Namespace) -> int:
    from metalab.experiment import load_run_config
    from metalab.train import distributed
    from metalab.utils import resolve_device

    if bool(args.config) == bool(args.resume):
        raise MetalabError("train needs either CONFIG or --resume RUN_DIR (not both)")
    if args.nproc is not None and not distributed.launched():
        return _launch(args.nproc, args.argv)
    if not args.resume and (args.schedule or args.retest):
        raise MetalabError("--schedule and --retest only apply with --resume RUN_DIR")
    changes: Changes = {}
    extend = None
    if args.resume:
        run_dir = Path(args.resume)
        run, changes = _resume_changes(run_dir, args.overrides)
        if "train.steps" in changes:
            extend = args.schedule
            if extend is None and run.train.lr_schedule == "cosine":
                raise ConfigError(
                    "train.steps",
                    f"changing it on a cosine schedule needs --schedule continue (the old cosine ends where it was "
                    f"planned, then holds the rate of its last update) or --schedule restart (a new cosine from "
                    f"train.lr over the remaining steps); {run_dir} is unchanged",
                )
        elif args.schedule:
            log.info("--schedule %s has no effect: train.steps is unchanged", args.schedule)
    else:
        run = load_run_config(args.config, args.overrides)
    device = resolve_device(run.train.device)
    world = distributed.init(device)
    try:
        code = _train_ranks(args, run, changes, extend, device, world)
    finally:  # every rank leaves the group together (rank 0 may still be testing), else gloo can abort at exit
        if world.distributed:
            try:
                distributed.barrier()
            except RuntimeError:  # a peer died: torchrun is stopping the job anyway
                pass
            distributed.shutdown()
    if world.distributed:
        _end_rank(code)
    return code


def _end_rank(code: int) -> NoReturn:
    """End a torchrun worker whose run is complete (results written, process group left) without the
    interpreter's teardown. In that teardown, after the last line of Python, gloo's transport threads made about
    one two-rank run in ten abort with ``terminate called without an active exception`` (SIGABRT; Python's
    faulthandler shows no Python frame), which torchrun reports as a failed job although every result was
    written. Nothing is left for the teardown to do: the logger closed its files and the ranks left the group."""
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _train_ranks(
    args: argparse.Namespace, run: RunConfig, changes: Changes, extend: str | None, device: Any, world: Any
) -> int:
    """The part of ``metalab train`` after the process group is joined (one rank, or each of several)."""
    import torch

    from metalab.experiment import RL_ALGORITHMS, algorithm, new_run_dir, write_run_config
    from metalab.train import distributed
    from metalab.train.loop import fit
    from metalab.train.plots import plot_metrics
    from metalab.utils import seed_everything

    run_dir = Path(args.resume) if args.resume else None
    if world.distributed:
        if run.algo in RL_ALGORITHMS:
            raise ConfigError(
                "algo", f"{run.algo} trains in one process; --nproc is for the few-shot learners"
            )
        device = torch.device("cuda", world.local_rank) if device.type == "cuda" else device
    seed_everything(run.seed)
    learner = algorithm(run.algo).build(run, _data_root(args, run.task.data_root), device)
    if not args.resume:
        run_dir = distributed.broadcast(new_run_dir(run, Path(args.runs_dir)) if world.main else None)
    if world.main:
        ranks = f", {world.size} processes" if world.distributed else ""
        log.info("run directory: %s (device %s%s)", run_dir, device, ranks)

    def resumed(step: int) -> None:
        """The checkpoint took the changes: save them, unless a finished run has nothing to do."""
        if step >= run.train.steps and not args.retest:
            raise _FinishedRun(step)
        if changes and world.main:
            write_run_config(run, run_dir)
            log.info("resume: %s", "; ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items()))

    try:
        result = fit(learner, run.train, run_dir, resume=bool(args.resume), extend=extend, resumed=resumed)
    except RuntimeError as e:  # a collective failed: another rank died (torchrun then stops this job)
        if not world.distributed:
            raise
        detail = _one_line(str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)[:200]
        raise MetalabError(
            f"rank {world.rank}: lost another training process ({detail}); {run_dir} keeps its last checkpoint"
        ) from None
    except _FinishedRun as done:
        if not world.main:
            return 0
        unsaved = " (the --set changes were not saved)" if changes else ""
        print(
            f"{run_dir} is finished at step {done.step} (train.steps={run.train.steps}): nothing to train{unsaved}. "
            f"Extend it with --set train.steps=N, or test it again with --retest."
        )
        return 0
    if not world.main:  # rank 0 plots, tests and writes the result
        return 130 if result.interrupted else 0
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


def _launch(nproc: int, argv: list[str]) -> int:
    """``metalab train --nproc N ...``: the same command in N processes under torchrun on this machine."""
    if not 1 <= nproc <= MAX_PROCESSES:
        raise ConfigError("--nproc", f"must be between 1 and {MAX_PROCESSES}, got {nproc}")
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    from torch.distributed.run import main as torchrun

    log.info("launching %d processes: torchrun --standalone --nproc-per-node %d -m metalab %s", nproc, nproc,
             " ".join(rest))  # fmt: skip
    try:
        torchrun(["--standalone", f"--nproc-per-node={nproc}", "-m", "metalab", *rest])
    except Exception as e:  # torchrun's ChildFailedError: a rank died; its own traceback is above
        raise MetalabError(
            f"a training process failed ({type(e).__name__}); the run directory keeps its last checkpoint: "
            f"resume it with --resume RUN_DIR"
        ) from None
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
    from metalab.config import MAX_EPISODES, merge, parse_overrides
    from metalab.errors import CheckpointError
    from metalab.experiment import algorithm, load_run_dir_config, run_config_from_dict
    from metalab.train.checkpoint import load_checkpoint, state_mismatch
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
        raise CheckpointError(f"{weights} does not fit the run's model: {state_mismatch(e)}") from None
    learner.model.eval()
    if args.episodes is not None and not 1 <= args.episodes <= MAX_EPISODES:
        raise MetalabError(f"--episodes must be in [1, {MAX_EPISODES}], got {args.episodes}")
    metrics = learner.evaluate(args.part, args.episodes or run.eval.episodes)
    which = f"step {state['step']}" + (f", selected by {run.train.keep_best}" if selected else "")
    print(f"{run_dir} ({which}): {_describe(metrics)}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from metalab.report import report

    paths = report(Path(args.repo), check=args.check)
    if args.check:
        for path in paths:
            print(f"{path} differs from the benchmark records: run `metalab report`", file=sys.stderr)
        return 1 if paths else 0
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from metalab.train.plots import plot_metrics

    print(plot_metrics(Path(args.run_dir)))
    return 0


def _data(args: argparse.Namespace) -> int:
    from metalab.data import omniglot, omniglot_install
    from metalab.data.root import cache_root

    root = _data_root(args)
    if args.data_command == "info":
        return _info(root, cache_root())
    if args.dataset not in DATASETS:
        raise MetalabError(f"unknown dataset {args.dataset!r}; choose one of: {', '.join(DATASETS)}")
    if args.data_command == "show":
        return _show(args, root)
    if args.download and args.no_verify:
        raise MetalabError(
            "--no-verify goes with --from; downloads are always checked against the official md5"
        )
    if args.download:
        done = omniglot_install.fetch(root)
    else:
        done = omniglot_install.install(Path(args.source), root, verify=not args.no_verify)
    for s in done:
        what = "already installed, unchanged" if s.unchanged else "installed"
        flag = "verified" if s.verified else "UNVERIFIED"
        print(f"omniglot {s.name}: {what}, {s.characters} characters, {flag} ({s.verified_by})")
    missing = [s for s in omniglot_install.status(root) if s.state in ("missing", "incomplete")]
    if missing:
        print(
            f"omniglot {missing[0].name} is {missing[0].state}: install it too "
            f"(`metalab data install omniglot --from ZIP`) before using Omniglot"
        )
        return 0
    data = omniglot.load(root)  # decodes once into the cache, so the first run does not
    print(
        f"omniglot ready in {omniglot_install.omniglot_dir(root)}: {data.images.shape[0]} characters, "
        f"{int(data.background.sum())} background / {int((~data.background).sum())} evaluation"
    )
    return 0


def _info(root: Path, cache: Path) -> int:
    from metalab.data import omniglot, omniglot_install

    print(f"data root:  {root}\ncache root: {cache}")
    base = omniglot_install.omniglot_dir(root)
    for s in omniglot_install.status(root):
        if s.state == "missing":
            print(f"omniglot {s.name}: missing ({s.detail})")
        elif s.state == "incomplete":
            print(f"omniglot {s.name}: INCOMPLETE, not installed ({s.detail}); re-install it")
        else:
            where = "installed" if s.state == "installed" else "zip only (read from the zip)"
            print(
                f"omniglot {s.name}: {where}, complete, {'verified' if s.verified else 'UNVERIFIED'} ({s.detail})"
            )
    lists = [p for p in omniglot_install.SPLIT_PARTS if (base / "splits" / "vinyals" / f"{p}.txt").is_file()]
    print(f"omniglot vinyals split lists: {', '.join(lists) or 'missing'}")
    folder = cache / "omniglot"
    caches = sorted(folder.glob("*.pt")) if folder.is_dir() else []
    try:
        current = omniglot.cache_path(root, 28).name
    except MetalabError:
        current = None
    names = [f"{p.name} (current, 28px)" if p.name == current else p.name for p in caches]
    print(f"omniglot decoded caches: {', '.join(names) or 'none'}")
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
    output = Path(args.output) if args.output else _show_path(args)
    output.parent.mkdir(parents=True, exist_ok=True)
    print(f"episode drawn to {plot_episode(sampler.sample(0, 1).task(0), output, title)}")
    return 0


def _show_path(args: argparse.Namespace) -> Path:
    """Where `data show` draws by default: under the cache root, never the current directory."""
    from metalab.data.root import cache_root

    name = f"{args.dataset}-{args.split}-{args.part}-{args.ways}w{args.shots}s-seed{args.seed}.png"
    return cache_root() / "show" / name


def _one_line(text: object) -> str:
    """``text`` with line breaks and other unprintable characters escaped (``\\n``): an error stays one line."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in str(text))


def _allocation_failure(e: BaseException) -> bool:
    """Whether ``e`` is a failed memory allocation (Python's, NumPy's, or torch's on the CPU or a GPU)."""
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None)
    if isinstance(e, MemoryError) or (isinstance(oom, type) and isinstance(e, oom)):
        return True
    return isinstance(e, RuntimeError) and "can't allocate memory" in str(e)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    commands = {"train": _train, "eval": _eval, "plot": _plot, "report": _report, "data": _data}
    try:
        return commands[args.command](args)
    except MetalabError as e:
        print(f"metalab: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # missing file, permission denied, full disk: the OS said no, nothing is broken here
        message = f"{e.strerror or e}: {e.filename or ''}".rstrip(": ")
        print(f"metalab: error: {_one_line(message)}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:  # a last line of defence: configs bound what they allocate
        if not _allocation_failure(e):
            raise
        detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        message = f"out of memory ({_one_line(detail)[:200]}); lower the config's sizes"
        print(f"metalab: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("metalab: interrupted", file=sys.stderr)
        return 130
