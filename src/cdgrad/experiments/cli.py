"""The `cdgrad` command line: train one configuration, run a preset sweep, report, list, analyze.

cdgrad run demo                      # a few-minute Fashion-MNIST comparison, table and plot at the end
cdgrad list -v                       # presets (one per published table / figure) and what they run
cdgrad train --method sobolev --lam 1 --epochs 5 --seed 0
cdgrad run fig6-reduced --set data_root=/path/to/mnist --where dataset=mnist
cdgrad report fig6-reduced --out docs/results
cdgrad run fig6 --executor slurm --slurm-gpus-per-task 1 --slurm-time 4:00:00   # then: cdgrad status fig6
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sqlite3
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from cdgrad.experiments import sweeps
from cdgrad.experiments.config import RunConfig, parse_overrides, run_key
from cdgrad.experiments.config_cli import add_config_arguments, config_from_args
from cdgrad.experiments.tasks import get_task
from cdgrad.experiments.tracking import Tracker, add_tracking_arguments, tracker_from_args

if TYPE_CHECKING:
    from cdgrad.experiments.store import ResultStore, Run

DEFAULT_RESULTS = "results"


def _add_training(p: argparse.ArgumentParser) -> None:
    """The options of the commands that train (`train`, `run`)."""
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: only when stderr is a terminal)",
    )
    add_tracking_arguments(p)


def _add_common(p: argparse.ArgumentParser, sweep: bool) -> None:
    p.add_argument(
        "--results",
        default=DEFAULT_RESULTS,
        metavar="DIR",
        help=f"results folder holding results.sqlite and checkpoints (default: {DEFAULT_RESULTS})",
    )
    if sweep:
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="FIELD=VALUE",
            help="change a config field in every run of the preset, e.g. --set data_root=/data/mnist "
            "(repeatable; fields that change results change the runs' identity)",
        )
        p.add_argument(
            "--where",
            action="append",
            default=[],
            metavar="FIELD=VALUE",
            help="keep only the preset's runs whose config has this value, e.g. --where dataset=mnist",
        )
        p.add_argument(
            "--out",
            default=None,
            metavar="DIR",
            help="write <preset>.md and the plots here (run: default <results>/report)",
        )
        p.add_argument("--no-plots", action="store_true", help="do not write PNG plots")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cdgrad",
        description="Reproduce the experiments of channel-directed gradients (Lao et al.) and "
        "the related gradient transforms: train, run preset sweeps, report tables and plots.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="train one configuration for one seed and store the result",
        description="Train one configuration for one seed. Every option below is a field of the "
        "run config (cdgrad.experiments.config.RunConfig). The run is stored in the results "
        "folder (skipped if already there) and resumes from its checkpoint if interrupted.",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="random seed (model init, batch order, augmentation) (default: 0)"
    )
    _add_common(p, sweep=False)
    p.add_argument("--no-store", action="store_true", help="train without reading or writing the results folder")
    _add_training(p)
    add_config_arguments(p)

    p = sub.add_parser(
        "run",
        help="run a preset sweep (skips completed runs), then print its report",
        description="Run every configuration and seed of a preset that is not yet in the results "
        "folder, then print the report table and write the plots. Everything is checked (configs, "
        "data, results folder) before the first run starts. Interrupted runs resume from their "
        "checkpoints when the command is repeated. See `cdgrad list -v` for the presets.",
    )
    p.add_argument("preset", help="preset name (see `cdgrad list`)")
    _add_common(p, sweep=True)
    p.add_argument("--max-seeds", type=int, default=None, metavar="N", help="run at most N seeds per configuration")
    p.add_argument("--dry-run", action="store_true", help="list the runs (and whether they are done) and exit")
    _add_training(p)
    sweeps.add_executor_arguments(p)
    sweeps.add_status_parser(sub, _add_common)

    p = sub.add_parser(
        "report",
        help="print Markdown tables (and write plots) from stored results",
        description="For each preset: one table per setting with mean ± std of the final test "
        "accuracy, its 95%% Student-t confidence interval, the number of seeds, the error reduction "
        "(err_SGD - err)/err_SGD, Welch's t-test against SGD and the published number where the "
        "paper has one. Without a preset name: every preset that has stored runs.",
    )
    p.add_argument("presets", nargs="*", help="preset names (default: all presets with results)")
    _add_common(p, sweep=True)

    p = sub.add_parser(
        "list",
        help="list the presets (or the gradient methods)",
        description="List the presets, with what the reduced ones cut, or the gradient methods and "
        "their hyper-parameters.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="show each preset's configurations")
    p.add_argument("--methods", action="store_true", help="list the gradient methods instead")
    p.add_argument("--markdown", action="store_true", help="with --methods: as the Markdown table of the docs")

    p = sub.add_parser(
        "analyze",
        help="analyse a trained model's weights (channel correlations, spectra)",
        description="Analyse the weights of a trained model.",
    )
    try:
        from cdgrad.experiments.analyze import add_analyze_arguments
    except ImportError:
        p.set_defaults(analyze_missing=True)
    else:
        add_analyze_arguments(p)
    return parser


# ------------------------------------------------------------------------------------------------ commands


def cmd_train(args: argparse.Namespace) -> int:
    from cdgrad.experiments.launch import is_main_process
    from cdgrad.experiments.locks import RunLock, holder
    from cdgrad.experiments.runner import prepare
    from cdgrad.experiments.store import ResultStore
    from cdgrad.experiments.train import check_seed, train

    check_seed(args.seed, "--seed")
    config = config_from_args(args)
    store = None if args.no_store else ResultStore(args.results)
    tracker = tracker_from_args(args, None)
    datasets = prepare([(config, args.seed)], store)  # creates the results folder only once all is checked
    key = run_key(config, args.seed)
    main = is_main_process()
    if store is not None and key in store.done_keys():
        run = _stored_run(store, key)
        what = get_task(config.task).headline(run.final) if run.status == "completed" else run.status
        print(
            f"run {key} is already {'complete' if run.status == 'completed' else 'stored'}: {what} "
            f"(results: {store.path})"
        )
        return 0
    lock = RunLock(store.root, key) if store is not None and main else None
    claimed = lock.acquire() if lock is not None else True
    if _has_process_group():  # under torchrun every rank follows rank 0's lock
        shared = [claimed]
        sys.modules["torch.distributed"].broadcast_object_list(shared, src=0)
        claimed = shared[0]
    if not claimed:
        who = holder(store.root, key) if store is not None else None
        raise ValueError(
            f"run {key} is being trained by {who or 'another process'} on the same results folder; "
            "wait for it to finish"
        )
    try:
        metrics = train(
            config,
            args.seed,
            dataset=next(iter(datasets.values())),
            progress=args.progress,
            checkpoint=None if store is None else store.checkpoint_path(key),
            tracker=tracker,
        )
        if store is not None and main:
            store.save(config, args.seed, metrics)
    finally:
        if lock is not None:
            lock.release()
    if not main:  # under torchrun rank 0 alone stores and prints the run
        return 0
    c = metrics["curves"]
    for i, e in enumerate(c["epoch"]):
        print(f"epoch {e:3d}  {epoch_line(c, i)}")
    if metrics["status"] == "diverged":
        print(f"run {key} diverged at epoch {c['epoch'][-1]}: the training loss is not finite", file=sys.stderr)
    print(
        json.dumps({"key": key, **metrics["final"], "wall_s": round(metrics["wall_s"], 2), "status": metrics["status"]})
    )
    return 0


def _stored_run(store: ResultStore, key: str) -> Run:
    """The stored run `key` (known to be stored); ValueError naming the row when it cannot be used."""
    found = store.runs([key])
    if not found:
        raise ValueError(
            f"run {key} is stored in {store.path}, but its row cannot be used (unusable rows: "
            f"{', '.join(store.bad_rows)}); pass another folder with --results to train it again"
        )
    return found[0]


def _check_runs(runs: list[tuple[RunConfig, int]]) -> None:
    """Validate every config and seed as a real run does (TypeError / ValueError naming the field)."""
    from cdgrad.experiments.checks import validate
    from cdgrad.experiments.train import check_seed

    for config, seed in runs:
        validate(config)
        check_seed(seed)


def _preset_runs(args: argparse.Namespace, name: str) -> list[tuple[RunConfig, int]]:
    from cdgrad.experiments.presets import get_preset

    max_seeds = getattr(args, "max_seeds", None)
    if max_seeds is not None and max_seeds < 1:
        raise ValueError(f"--max-seeds must be at least 1 (leave it out to run every seed), got {max_seeds}")
    return get_preset(name).runs(
        parse_overrides(args.overrides), parse_overrides(args.where), getattr(args, "max_seeds", None)
    )


def _report(
    name: str, runs: list[tuple[RunConfig, int]], args: argparse.Namespace, out_dir: str | None, command: str
) -> str:
    from cdgrad.experiments.plots import make_plots
    from cdgrad.experiments.presets import get_preset
    from cdgrad.experiments.report import markdown, summarize
    from cdgrad.experiments.store import ResultStore

    preset = get_preset(name)
    store = ResultStore(args.results)
    found = store.runs([run_key(c, s) for c, s in runs])
    text = [f"## {preset.name}: {preset.title}\n"]
    if preset.cuts:
        text.append(f"Reduced protocol: {preset.cuts}.\n")
    if preset.published:
        text.append(f"Published: {preset.published}.\n")
    diverged = sum(run.status == "diverged" for run in found)
    stored = f"{len(found)} of {len(runs)} runs complete" + (f" ({diverged} diverged)" if diverged else "")
    metric = get_task(runs[0][0].task).primary.label if runs else "test accuracy (%)"
    text.append(f"{stored}. Metric: final {metric}. Produced by `{command}`.\n")
    settings = summarize(found)
    text.append(markdown(settings) if found else "(no completed runs yet)\n")
    if out_dir is not None and found:
        os.makedirs(out_dir, exist_ok=True)
        paths = [] if args.no_plots else make_plots(settings, out_dir, name, preset.plots, store.model_path)
        if paths:
            text.append("Plots: " + ", ".join(f"`{p}`" for p in paths) + "\n")
        _write_durably(os.path.join(out_dir, f"{name}.md"), "\n".join(text))
    return "\n".join(text)


def _write_durably(path: str, text: str) -> None:
    """Write `text` to `path` through a fsynced temporary file renamed over it."""
    from cdgrad._files import write_durably

    write_durably(path, lambda fh: fh.write(text.encode()))


def cmd_run(args: argparse.Namespace, command: str) -> int:
    from cdgrad.experiments.launch import is_main_process
    from cdgrad.experiments.methods import describe
    from cdgrad.experiments.runner import run_all
    from cdgrad.experiments.store import ResultStore

    runs = _preset_runs(args, args.preset)
    if not runs:
        raise ValueError(f"--where {args.where} matches none of preset {args.preset!r}'s runs")
    sweeps.executor_options(args)  # bad options are refused before anything is read or created
    store = ResultStore(args.results)
    if args.dry_run:
        _check_runs(runs)  # an invalid config is an error, as in a real run, not a run to do
        states = sweeps.run_states(runs, store)
        for config, seed in runs:
            key = run_key(config, seed)
            print(f"{states[key]:7s}  {key}  {config.dataset} {config.model} {describe(config)} seed {seed}")
        return 0
    if args.executor != "inline":
        out_dir = args.out or os.path.join(args.results, "report")
        report = lambda: print(_report(args.preset, runs, args, out_dir, command))
        return sweeps.run_with_executor(args, runs, store, report)
    tracker = tracker_from_args(args, args.preset)
    run_all(runs, store, progress=args.progress, retry_failed=args.retry_failed, tracker=tracker)
    if not is_main_process():  # under torchrun rank 0 alone writes the report
        return 0
    out_dir = args.out or os.path.join(args.results, "report")
    print(_report(args.preset, runs, args, out_dir, command))
    _log_report(tracker, args.preset, out_dir)
    return 0


def cmd_report(args: argparse.Namespace, command: str) -> int:
    from cdgrad.experiments.presets import PRESETS, get_preset
    from cdgrad.experiments.store import ResultStore

    names = args.presets
    for name in names:
        get_preset(name)
    if not names:
        done = ResultStore(args.results).done_keys()
        names = [n for n in PRESETS if any(run_key(c, s) in done for c, s in _preset_runs(args, n))]
        if not names:
            print(f"no results for any preset in {args.results!r}")
            return 0
    for name in names:
        print(_report(name, _preset_runs(args, name), args, args.out, command))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    if args.methods:
        from cdgrad.experiments.methods import method_listing, method_table

        print(method_table() if args.markdown else method_listing())
        return 0
    from cdgrad.experiments.presets import PRESETS, describe_preset

    for preset in PRESETS.values():
        print(describe_preset(preset, args.verbose))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    command = "cdgrad " + shlex.join(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from cdgrad.experiments.data import DatasetFormatError

    had_group = _has_process_group()
    try:
        sweeps.load_plugins()
        if args.command == "list":
            return cmd_list(args)
        if args.command == "train":
            return cmd_train(args)
        if args.command == "run":
            return cmd_run(args, command)
        if args.command == "report":
            return cmd_report(args, command)
        if args.command == "status":
            return sweeps.cmd_status(args, _preset_runs(args, args.preset))
        if getattr(args, "analyze_missing", False):
            print("cdgrad analyze is not available: cdgrad.experiments.analyze is not installed", file=sys.stderr)
            return 2
        from cdgrad.experiments.analyze import run_analyze

        return int(run_analyze(args) or 0)
    except FileNotFoundError as exc:
        hints = {
            "train": "\nOn the command line, give the data folder with --data-root DIR.",
            "analyze": "\nGive a checkpoint file, or a run key with --results DIR.",
        }
        hint = hints.get(args.command, "\nOn the command line, give the data folder with --set data_root=DIR.")
        print(f"cdgrad {args.command}: error: {exc}{hint}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, DatasetFormatError) as exc:
        print(f"cdgrad {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except sqlite3.DatabaseError as exc:
        print(
            f"cdgrad {args.command}: error: the results store in {getattr(args, 'results', '?')!r} cannot be used "
            f"({exc}); move results.sqlite aside or pass another folder with --results",
            file=sys.stderr,
        )
        return 2
    except BrokenPipeError:  # output piped into a command that stopped reading (`| head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:  # a folder that cannot be written, a full disk, ...
        print(f"cdgrad {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
    finally:
        if not had_group and _has_process_group():  # set up by `train` / `run` under torchrun
            sys.modules["torch.distributed"].destroy_process_group()


# ------------------------------------------------------------------------------------ live logging (--log)
def _log_report(tracker: Tracker | None, preset: str, out_dir: str) -> None:
    """The report's table and plots (those `_report` wrote for `preset` in `out_dir`) as the sweep's artifacts."""
    if tracker is None:
        return
    names = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
    paths = [
        os.path.join(out_dir, f)
        for f in names
        if f == f"{preset}.md" or (f.startswith(f"{preset}_") and f.endswith(".png"))
    ]
    if paths:
        tracker.log_artifacts(preset, paths)


def epoch_line(curves: dict[str, list[float]], i: int) -> str:
    """Epoch `i`'s training curves, and its evaluation if there was one, e.g. `train loss 0.4123 acc 85.10%  test
    loss 0.4410 acc 84.20%` (each metric of the run's task: `miou` for segmentation, `fid` for synthesis)."""

    def part(prefix: str, j: int) -> str:
        keys = [k for k in curves if k.startswith(prefix) and k != "test_epoch"]
        return " ".join(
            f"{k[len(prefix) :].replace('_loss', ' loss')} {curves[k][j]:.4f}"
            if "loss" in k or "fid" in k
            else f"{k[len(prefix) :]} {curves[k][j]:.2f}%"
            for k in keys
        )

    e = curves["epoch"][i]
    test = f"  test {part('test_', curves['test_epoch'].index(e))}" if e in curves["test_epoch"] else ""
    return f"train {part('train_', i)}{test}"


def _has_process_group() -> bool:
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


if __name__ == "__main__":
    sys.exit(main())
