"""The ``ilseg`` command line.

Every sub-command is a small function that parses its arguments and calls the
library.  An :class:`~ilseg.errors.IlsegError` becomes one line on stderr and
exit status 2; nothing else is caught.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import signal
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from ilseg import __version__
from ilseg.errors import (
    IlsegError,
    Interrupted,
    ReportedByMainRank,
    WriteError,
    one_line,
    plural,
)


# -- tasks / methods / presets -----------------------------------------------------
def cmd_tasks(args: argparse.Namespace) -> int:
    from ilseg.tasks import dataset_names, get_task, task_names

    if args.config:
        from ilseg.config import load_config, resolve_config_path

        print(load_config(resolve_config_path(args.config), args.set).build_task().describe())
        return 0
    datasets = [args.dataset] if args.dataset else list(dataset_names())
    if args.task:
        print(get_task(datasets[0], args.task).describe())
        return 0
    for ds in datasets:
        print(f"{ds}:")
        for name in task_names(ds):
            t = get_task(ds, name)
            print(f"  {name:<8} {plural(t.num_steps, 'step'):>8}, classes per step {list(t.step_sizes)}")
    print("Show a task's classes with: ilseg tasks DATASET TASK (e.g. ilseg tasks voc 15-1)")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from ilseg.methods import METHOD_PRESETS, describe_method

    for cfg in METHOD_PRESETS.values():
        print(describe_method(cfg))
    print("Formulas and sources: docs/methods.md; override any weight with --set method.FIELD=VALUE")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from ilseg.config import load_config, preset_dir
    from ilseg.methods import build_method

    for path in sorted(preset_dir().glob("*.yaml")):
        cfg = load_config(path)
        d = cfg.data
        mode = "all classes in one step" if build_method(cfg.method).all_classes_at_once else ("overlap" if d.overlap else "disjoint")
        print(f"{path.stem:<32} {cfg.method.name:<16} {d.dataset} {d.task} {mode}")
    print(f"(files in {preset_dir()}; use one with: ilseg train --config NAME --out RUN_DIR)")
    return 0


def cmd_config_restore(args: argparse.Namespace) -> int:
    from ilseg.runs.folder import CONFIG_FILE, restore_config

    source, kept = restore_config(Path(args.run))
    print(f"wrote {Path(args.run) / CONFIG_FILE} from {source}"
          + (f"; the damaged file is kept as {kept}" if kept is not None else ""))
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    import yaml

    from ilseg.config import config_changes, dump_config, load_config, resolve_config_path

    cfg = load_config(resolve_config_path(args.config), args.set)
    if not args.diff:
        print(dump_config(cfg), end="")
        return 0
    changes = config_changes(cfg, load_config(None))
    print(yaml.safe_dump(changes, sort_keys=False) if changes else "# every value is the default\n", end="")
    return 0


# -- data ----------------------------------------------------------------------------
def cmd_data_synth(args: argparse.Namespace) -> int:
    from ilseg.data.synth import generate_synth

    out = generate_synth(args.out, seed=args.seed, num_images=args.num_images, size=args.size, workers=args.workers)
    print(f"synthetic dataset written to {out} (VOC layout; use data.dataset=synth data.root={out})")
    return 0


def cmd_data_prepare_voc(args: argparse.Namespace) -> int:
    from ilseg.data.prepare import prepare_voc

    rerun = f"`ilseg data prepare voc --voc {shlex.quote(args.voc)} --sbd {shlex.quote(args.sbd)}`"
    summary = prepare_voc(args.voc, args.sbd, workers=args.workers, overwrite=args.overwrite,
                          progress=not args.quiet, rerun_hint=rerun)
    print("\n".join(summary.lines()))
    print(f"next: ilseg data check --dataset voc --root {shlex.quote(str(summary.voc_dir))}")
    return 0


def cmd_data_prepare_ade(args: argparse.Namespace) -> int:
    print(f"ADE20k needs no conversion: ilseg reads ADEChallengeData2016 as unpacked; checking the tree instead "
          f"(the same as `ilseg data check --dataset ade --root {shlex.quote(args.root)}`)")
    check_args = argparse.Namespace(dataset="ade", root=args.root, task=None, overlap=False, workers=args.workers,
                                    ignore_counts=args.ignore_counts, json=False, quiet=args.quiet)
    return cmd_data_check(check_args)


def cmd_data_check(args: argparse.Namespace) -> int:
    from ilseg.data.check import check_tree
    from ilseg.tasks import get_task

    if args.overlap and not args.task:
        raise IlsegError("--overlap chooses the mode of --task: give --task T too (without --task, every task with "
                         "published counts is counted in both modes)")
    task = get_task(args.dataset, args.task) if args.task else None
    report = check_tree(args.dataset, args.root, task=task, mode="overlap" if args.overlap else "disjoint",
                        workers=args.workers, ignore_counts=args.ignore_counts, progress=not (args.json or args.quiet))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        print(report.summary_line(), file=sys.stderr)
    else:
        print("\n".join(report.lines()))
        print(report.summary_line())
    return 1 if report.failed else 0


def cmd_splits(args: argparse.Namespace) -> int:
    from ilseg.data.datasets import build_dataset
    from ilseg.data.splits import split_report
    from ilseg.tasks import get_task

    if args.config:
        from ilseg.config import load_config, resolve_config_path

        cfg = load_config(resolve_config_path(args.config), args.set)
        task, dataset, root, overlap = cfg.build_task(), cfg.data.dataset, cfg.data.root, cfg.data.overlap
    else:
        if not args.task:
            raise IlsegError("ilseg splits needs --task (e.g. --task 15-1; --dataset and --root default to voc and "
                             "where `ilseg train` looks), or --config FILE")
        root = args.root or _default_root(args.dataset)  # the presets' data.root, as `ilseg train` reads it
        task, dataset, overlap = get_task(args.dataset, args.task), args.dataset, args.overlap
    ds = build_dataset(dataset, root, "train", list_file=args.list_file)
    report = split_report(ds, task, "overlap" if overlap else "disjoint", workers=args.workers,
                          cache_dir=args.cache_dir, progress=not args.json)
    report["list_file"] = str(ds.list_file) if ds.list_file is not None else None
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    source = f"from {ds.list_file}" if ds.list_file is not None else f"in {ds.root}"
    print(f"{dataset} {task.name} ({'overlapped' if overlap else 'disjoint'}): {report['total_images']} training "
          f"images {source}")
    if dataset == "voc" and ds.list_file is not None and ds.list_file.name == "train.txt":
        print(f"  note: {ds.list_file.with_name('train_aug.txt')} is missing, so VOC's own train.txt is used, not "
              f"the 10,582-image augmented list; make it with `ilseg data prepare voc --voc {ds.root} --sbd SBD_DIR` "
              "(docs/data.md)")
    for s in report["steps"]:
        check = ""
        if s.get("published") is not None:
            check = f"  published {s['published']}: {'match' if s['match'] else 'DIFFER'}"
        names = ", ".join(s["classes"])
        print(f"  step {s['step']}: {s['count']:>6} images{check}  [{names}]")
    if dataset == "voc" and all(s.get("published") is None for s in report["steps"]):
        print(f"  published counts are for the full train_aug list (10,582 images); to compare with them and check "
              f"the lists, labels and sizes of both splits: ilseg data check --dataset voc --root {ds.root}")
    return 0


# -- train / eval / predict / demo -------------------------------------------------
def cmd_launch(args: argparse.Namespace) -> int:
    from ilseg.engine.launch import launch

    command = [a for a in args.launched if a != "--"][:1]
    if args.nproc < 1:
        raise IlsegError(f"--nproc must be >= 1, got {args.nproc}")
    if command not in (["train"], ["eval"]):
        raise IlsegError(f"ilseg launch runs train or eval, got {' '.join(args.launched) or 'nothing'}; e.g. "
                         "ilseg launch --nproc 2 train --config synth-demo --out RUN_DIR")
    launched = list(args.launched)
    if launched[0] == "--":
        launched = launched[1:]
    if args.methods_from:
        launched = [option for module in args.methods_from for option in ("--methods-from", module)] + launched
    return launch(args.nproc, launched)


def cmd_train(args: argparse.Namespace) -> int:
    from ilseg.config import load_config, resolve_config_path
    from ilseg.engine.run import run_training
    from ilseg.runs.folder import read_run_config
    from ilseg.runs.results import summary_table

    if args.resume:
        run_dir = Path(args.resume)
        if args.config or args.out:
            raise IlsegError("--resume continues a run with its saved config; do not pass --config or --out "
                             "(--set may change the optimisation from the step being resumed, e.g. optim.lr_next)")
        cfg = read_run_config(run_dir, args.set)
    else:
        if not args.config or not args.out:
            raise IlsegError("ilseg train needs --config FILE and --out RUN_DIR (or --resume RUN_DIR)")
        cfg = load_config(resolve_config_path(args.config), args.set)
        run_dir = Path(args.out)
        if not Path(cfg.data.root).is_absolute():  # saved absolute: eval, predict and --resume work from anywhere
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(Path(cfg.data.root).resolve())))
    results = run_training(cfg, run_dir, steps=args.steps, resume=bool(args.resume), overwrite=args.overwrite,
                           init_from=args.init_from, quiet=args.quiet)
    if _rank_and_world()[0] == 0:  # under torchrun, only rank 0 prints
        print(summary_table(results))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ilseg.config import load_config, resolve_config_path
    from ilseg.engine.run import evaluate_checkpoint
    from ilseg.runs.folder import (
        finished_steps,
        last_finished_step,
        read_run_config,
        step_checkpoint,
    )
    from ilseg.runs.results import pct

    if args.run and args.checkpoint:
        raise IlsegError("give --run RUN_DIR [--step N] or --checkpoint FILE --config FILE, not both")
    if args.run:
        run_dir = Path(args.run)
        read_run_config(run_dir)  # one clear error if it is not a run folder
        step = last_finished_step(run_dir) if args.step is None else args.step
        cfg = read_run_config(run_dir, args.set, step=step)  # the settings that step was trained with
        ckpt = step_checkpoint(run_dir, step)
        if not ckpt.is_file():
            done = finished_steps(run_dir)
            raise IlsegError(f"{run_dir} has no finished step {step}; finished steps: "
                             f"{', '.join(map(str, done)) or 'none'}")
    elif args.checkpoint:
        if not args.config:
            raise IlsegError("--checkpoint needs --config FILE (the run's config.yaml or a preset)")
        cfg = load_config(resolve_config_path(args.config), args.set)
        ckpt, step = Path(args.checkpoint), args.step
    else:
        raise IlsegError("ilseg eval needs --run RUN_DIR or --checkpoint FILE --config FILE")
    scores = evaluate_checkpoint(cfg, ckpt, step=step, device=args.device)
    if args.json:
        print(json.dumps(scores, indent=2))
        return 0
    print(f"{ckpt} (step {scores['step']}, {scores['classes_seen']} classes): mIoU all {pct(scores['miou_all'])}, "
          f"old {pct(scores['miou_old'])}, new {pct(scores['miou_new'])}, pixel acc {pct(scores['pixel_accuracy'])}")
    for name, v in scores["iou_per_class"].items():
        print(f"  {name:<16} {pct(v)}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from ilseg.config import load_config, resolve_config_path
    from ilseg.importing.command import import_run
    from ilseg.runs.results import summary_table

    cfg = load_config(resolve_config_path(args.config), args.set)
    if not Path(cfg.data.root).is_absolute():  # saved absolute, as by train: eval and --resume work from anywhere
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(Path(cfg.data.root).resolve())))
    out = Path(args.out)
    summary = import_run(cfg, [Path(c) for c in args.checkpoints], out, fmt=args.format, evaluate=args.evaluate,
                         device=args.device, log=print)
    last = summary["steps"][-1]["step"]
    print(f"imported {plural(len(summary['steps']), 'step')} of {args.format} into {out}")
    if summary["results"] is not None:
        print(summary_table(summary["results"]))
    else:
        print(f"score a step with: ilseg eval --run {out} --step {last}; train the next steps with: "
              f"ilseg train --resume {out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from ilseg.visual.predict import parse_step_list, predict_images

    steps = parse_step_list(args.steps) if args.steps is not None else None
    written = predict_images(args.run, args.images, Path(args.out), step=args.step, steps=steps,
                             ground_truth=args.gt, ground_truth_dir=args.gt_dir, panel=args.panel,
                             device=args.device)
    masks = sum(p.name.endswith("_mask.png") for p in written)
    panels = sum(p.name.endswith("_panel.png") for p in written)
    what = []
    if masks:
        what.append(f"{plural(masks, 'mask')} and {plural(masks, 'overlay')}")
    if panels:
        what.append(f"{plural(panels, 'side-by-side panel')}")
    print(f"wrote {' and '.join(what)} to {args.out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ilseg.reports import write_report

    skipped: list[tuple[Path, str]] | None = [] if args.skip_bad else None
    written = write_report(args.runs, Path(args.out), skipped=skipped, selection=args.selection)
    print(f"wrote {written['markdown']}, {written['html']} (one self-contained page) and {written['json']}")
    for run, why in skipped or []:
        print(f"ilseg: left out {run} (--skip-bad): {why}", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ilseg.demo import run_demo

    run_demo(Path(args.out), quick=args.quick, quiet=args.quiet, methods=args.methods, processes=args.processes,
             seed=args.seed)
    return 0


# -- parser ----------------------------------------------------------------------------
# The top-level help lists the commands in these groups (argparse has no grouping of sub-commands of its own);
# tests/test_cli.py checks that every command is in exactly one group.
COMMAND_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("run", ("train", "launch", "eval", "predict", "demo")),
    ("inspect", ("presets", "methods", "tasks", "splits", "config")),
    ("compare", ("report", "import")),
    ("data", ("data",)),
)
TOP_EXAMPLES = (
    "examples:\n"
    "  ilseg demo                                         # joint vs fine-tuning vs ILT on the CPU, minutes\n"
    "  ilseg train --config voc-15-1-ov-ilt --out runs/ilt  # a preset (list them: ilseg presets)\n"
    "  ilseg report runs/ft runs/ilt --out report/        # compare finished runs\n"
    "\n"
    "`ilseg COMMAND --help` shows a command's options and examples; `ilseg` alone prints this help and exits "
    "with status 2 (no command given)."
)


class _Parser(argparse.ArgumentParser):
    """argparse's parser, with a hint when a positional argument was swallowed by a list option before it.

    ``ilseg predict --run R --gt M.png IMG.jpg`` reads ``IMG.jpg`` as a second
    ground-truth mask (``--gt`` takes every word up to the next option), so
    argparse only says "the following arguments are required: images"; this
    says where to put them.
    """

    _given: Sequence[str] = ()

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        self._given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        missing = message.removeprefix("the following arguments are required: ")
        lists = [option for a in self._actions if a.option_strings and a.nargs in ("+", "*")
                 for option in a.option_strings if option in self._given]
        positionals = {a.dest: a.metavar or a.dest for a in self._actions if not a.option_strings}
        names = [part.strip() for part in missing.split(",")]
        if missing != message and lists and any(n in positionals or n in positionals.values() for n in names):
            where = " or ".join(lists)
            message += (f": {where} reads every word up to the next option, so it took the words after it as its "
                        f"own values; put {', '.join(names)} before {where}, or after --, e.g. "
                        f"{self.prog} ... {names[0]} {lists[0]} ...")
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ilseg", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=TOP_EXAMPLES)
    p.add_argument("--version", action="version", version=f"ilseg {__version__}")
    p.add_argument("--methods-from", action="append", default=[], metavar="MODULE",
                   help="import this Python module first: it registers methods of your own with "
                        "ilseg.methods.register_method (docs/methods.md, 'Adding a method'); repeatable")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", help=argparse.SUPPRESS)  # listed in groups instead

    _add_inspect_commands(sub)
    _add_run_commands(sub)
    _add_output_commands(sub)
    p.description = command_overview(sub)
    return p


def command_overview(sub: argparse._SubParsersAction) -> str:
    """The top-level description: every command with its one-line help, in the groups of :data:`COMMAND_GROUPS`."""
    helps = {action.dest: action.help or "" for action in sub._choices_actions}
    lines = ["Class-incremental semantic segmentation: train and evaluate incremental steps (ILT, MiB, PLOP, "
             "fine-tuning, joint), compare runs, look at tasks and data."]
    for group, names in COMMAND_GROUPS:
        lines.append(f"\n{group}:")
        lines += [f"  {name:<9} {helps[name]}" for name in names]
    return "\n".join(lines)


def _command(sub: argparse._SubParsersAction, name: str, summary: str, examples: Sequence[str],
             description: str | None = None) -> argparse.ArgumentParser:
    """A sub-command whose help ends with ``examples`` (lines of ``command  # comment``), laid out as written."""
    return sub.add_parser(name, help=summary, description=_wrap(description or summary[:1].upper() + summary[1:]),
                          formatter_class=argparse.RawDescriptionHelpFormatter,
                          epilog="examples:\n" + "\n".join(f"  {line}" for line in examples))


def _add_set(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                    help="override config values, e.g. --set optim.lr=0.02 data.overlap=true; the KEY=VALUE "
                         "items end at the next option, so put positional arguments before --set (or after --); "
                         "repeatable")


def _add_device(sp: argparse.ArgumentParser, what: str) -> None:
    sp.add_argument("--device", choices=["auto", "cpu", "cuda"],
                    help=f"where to {what} (default: the run's runtime.device; auto: CUDA when there is one)")


def _default_root(dataset: str) -> str:
    """The ``data.root`` of the bundled presets of ``dataset``: where ``ilseg train`` looks by default."""
    from ilseg.config import load_config, preset_dir

    source = {"voc": None, "ade": preset_dir() / "base" / "ade.yaml", "synth": preset_dir() / "synth-demo.yaml"}
    return load_config(source[dataset]).data.root


def _add_inspect_commands(sub: argparse._SubParsersAction) -> None:
    """tasks, methods, presets, config, data, splits: looking at the protocol and the data."""
    _add_listing_commands(sub)
    _add_config_command(sub)
    _add_data_command(sub)
    _add_splits_command(sub)


def _add_listing_commands(sub: argparse._SubParsersAction) -> None:
    """tasks, methods, presets: what ilseg knows."""
    t = _command(sub, "tasks", "list incremental tasks, or show one task's steps", [
        "ilseg tasks                                   # every task of every dataset",
        "ilseg tasks voc 15-1                          # the classes of each step",
        "ilseg tasks --config my-run.yaml              # a custom class order or step sizes"])
    t.add_argument("dataset", nargs="?", help="voc, ade or synth")
    t.add_argument("task", nargs="?", help="e.g. 15-1")
    t.add_argument("--config", help="show the (custom) task of a config file")
    _add_set(t)
    t.set_defaults(func=cmd_tasks)

    m = _command(sub, "methods", "list the methods and their losses", [
        "ilseg methods                                 # every method preset with its loss weights",
        "ilseg config show voc-15-1-ov-mib --diff      # then a preset's settings"])
    m.set_defaults(func=cmd_methods)
    pr = _command(sub, "presets", "list the bundled config presets", [
        "ilseg presets                                 # name, method, dataset, task, mode",
        "ilseg presets | grep 15-1                     # the VOC 15-1 settings",
        "ilseg train --config voc-15-1-ov-ilt --out runs/ilt   # train one"])
    pr.set_defaults(func=cmd_presets)


def _add_config_command(sub: argparse._SubParsersAction) -> None:
    """config show | restore."""
    c = _command(sub, "config", "look at a run's settings before training, or restore a run's config.yaml", [
        "ilseg config show voc-15-1-ov-ilt",
        "ilseg config show voc-15-1-paper-ilt-kd-out --diff",
        "ilseg config restore runs/voc-15-1-ilt"])
    csub = c.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    cs = _command(csub, "show", "print a preset's or a config file's settings, fully resolved", [
        "ilseg config show voc-15-1-ov-ilt                    # every setting of a preset",
        "ilseg config show voc-15-1-paper-ilt-kd-out --diff   # only what differs from the defaults",
        "ilseg config show my-run.yaml --set optim.lr=0.02    # a file of yours, with an override"],
        description="Print the fully resolved config of a preset or a YAML file: its 'base:' files merged in, "
                    "--set applied, every default filled in; the YAML that 'ilseg train' writes to "
                    "RUN_DIR/config.yaml.")
    cs.add_argument("config", metavar="PRESET_OR_FILE",
                    help="a bundled preset name (see 'ilseg presets') or a YAML file")
    _add_set(cs)
    cs.add_argument("--diff", action="store_true",
                    help="print only the values that differ from the defaults (ilseg's VOC recipe), as nested YAML "
                         "in the shape of a config file")
    cs.set_defaults(func=cmd_config_show)
    cr = _command(csub, "restore", "write a run's damaged or lost config.yaml again from the run's own copy", [
        "ilseg config restore runs/voc-15-1-ilt         # config.yaml damaged or deleted",
        "ilseg train --resume runs/voc-15-1-ilt         # then continue the run"],
        description="Write RUN_DIR/config.yaml again from RUN_DIR/config-history.json (its last entry), or, for a "
                    "run whose settings never changed, from the config its checkpoints record. Refused when "
                    "config.yaml is readable; a damaged one is kept as config.yaml.damaged.")
    cr.add_argument("run", metavar="RUN_DIR", help="the run folder")
    cr.set_defaults(func=cmd_config_restore)


def _add_data_command(sub: argparse._SubParsersAction) -> None:
    """data synth | prepare | check."""
    d = _command(sub, "data", "dataset utilities: make the synthetic set, prepare and check VOC / ADE20k", [
        "ilseg data synth --out data/synth",
        "ilseg data prepare voc --voc data/VOCdevkit/VOC2012 --sbd data/benchmark_RELEASE",
        "ilseg data check --dataset voc --root data/VOCdevkit"])
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    s = _command(dsub, "synth", "write the synthetic benchmark in the VOC layout", [
        "ilseg data synth --out data/synth",
        "ilseg data synth --out data/synth-small --num-images 300 --size 32 --seed 1",
        "ilseg train --config synth-demo --set data.root=data/synth --out runs/synth-ilt"],
        description="Write the synthetic benchmark (coloured shapes on textured backgrounds, 10 classes) in the "
                    "VOC layout: JPEGImages, SegmentationClassAug, ImageSets.")
    s.add_argument("--out", required=True, metavar="DIR", help="the folder to write (created; use it as data.root)")
    s.add_argument("--seed", type=int, default=0, help="draws every image; the same seed writes the same set "
                                                       "(default: 0)")
    s.add_argument("--num-images", type=_positive_int, default=1500,
                   help="images in all, train and val together (default: 1500)")
    s.add_argument("--size", type=_positive_int, default=64, help="image side in pixels (default: 64)")
    s.add_argument("--workers", type=_positive_int, default=2, help="processes drawing images (default: 2)")
    s.set_defaults(func=cmd_data_synth)
    _add_data_prepare(dsub)
    _add_data_check(dsub)


def _add_splits_command(sub: argparse._SubParsersAction) -> None:
    """splits: per-step image counts."""
    sp = _command(sub, "splits", "per-step image counts of a task (compared with published counts on VOC)", [
        "ilseg splits --task 15-1                                    # VOC in data/VOCdevkit, as train reads it",
        "ilseg splits --dataset synth --root data/synth --task 6-2-2 --overlap",
        "ilseg splits --config voc-15-1-ov-ilt --json",
        "# to check a whole tree (lists, train/val overlap, labels and sizes of both splits, counts of every",
        "# published task): ilseg data check"])
    sp.add_argument("--dataset", choices=["voc", "ade", "synth"], default="voc",
                    help="the dataset (default: voc; ignored with --config)")
    sp.add_argument("--root", help=f"the dataset folder (default: where `ilseg train` looks, the presets' data.root: "
                                   f"{_default_root('voc')} for voc, {_default_root('ade')} for ade, "
                                   f"{_default_root('synth')} for synth)")
    sp.add_argument("--task", help="the incremental task, e.g. 15-1 (see `ilseg tasks`); needed without --config")
    sp.add_argument("--overlap", action="store_true",
                    help="count the overlapped setting (default: disjoint)")
    sp.add_argument("--config", help="take dataset, root, task, order and mode from a config")
    _add_set(sp)
    sp.add_argument("--list-file", help="training list file (default: the dataset's train list)")
    sp.add_argument("--workers", type=_positive_int, default=2, help="processes reading masks (default: 2)")
    sp.add_argument("--cache-dir", metavar="DIR",
                    help="where the per-step image lists are cached (default: $ILSEG_CACHE, else ~/.cache/ilseg, as in "
                         "training)")
    sp.add_argument("--json", action="store_true", help="print the counts as JSON")
    sp.set_defaults(func=cmd_splits)



def _wrap(text: str) -> str:
    """A description laid out for RawDescriptionHelpFormatter (which keeps the epilog's example lines as written)."""
    return textwrap.fill(text, width=100)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _workers_help() -> str:
    from ilseg.data.parallel import default_workers

    return f"processes reading and writing files (default: min(8, CPUs) = {default_workers()})"


def _add_data_prepare(dsub: argparse._SubParsersAction) -> None:
    """data prepare voc | ade: from the downloaded archives to what ilseg reads (docs/data.md)."""
    from ilseg.data.parallel import default_workers

    workers_help = _workers_help()
    pr = _command(dsub, "prepare", "build what ilseg reads from the downloaded archives (docs/data.md)", [
        "ilseg data prepare voc --voc data/VOCdevkit/VOC2012 --sbd data/benchmark_RELEASE",
        "ilseg data prepare ade --root data/ADEChallengeData2016"])
    psub = pr.add_subparsers(dest="prepare_dataset", required=True, metavar="DATASET")
    pv = _command(psub, "voc", "write SegmentationClassAug/*.png and train_aug.txt into VOC2012 from SBD's .mat files", [
        "ilseg data prepare voc --voc data/VOCdevkit/VOC2012 --sbd data/benchmark_RELEASE",
        "ilseg data prepare voc --voc data/VOCdevkit/VOC2012 --sbd data/benchmark_RELEASE/dataset --workers 16",
        "ilseg data check --dataset voc --root data/VOCdevkit     # then check the tree"],
        description="Convert SBD's dataset/cls/*.mat annotations into VOC2012/SegmentationClassAug/*.png (palette "
                    "PNGs), copy VOC's own SegmentationClass masks for the training ids SBD lacks and for every "
                    "validation id, and write ImageSets/Segmentation/train_aug.txt = (SBD train + SBD val + VOC "
                    "train) - VOC val. Masks already written are skipped, so an interrupted run continues where it "
                    "stopped. Needs SciPy: pip install 'ilseg[data]'.")
    pv.add_argument("--voc", required=True, metavar="VOC_DIR",
                    help="the VOC2012 folder unpacked from VOCtrainval_11-May-2012.tar (VOCdevkit or the folder "
                         "above it work too); SegmentationClassAug/ and train_aug.txt are written into it")
    pv.add_argument("--sbd", required=True, metavar="SBD_DIR",
                    help="SBD's dataset folder (cls/, train.txt, val.txt) unpacked from benchmark.tgz, or the "
                         "benchmark_RELEASE folder above it, or the folder holding benchmark_RELEASE; the command "
                         "says which it found")
    pv.add_argument("--workers", type=_positive_int, default=default_workers(), help=workers_help)
    pv.add_argument("--overwrite", action="store_true",
                    help="rewrite every mask, also those already written (default: skip them)")
    pv.add_argument("--quiet", action="store_true", help="no progress bar")
    pv.set_defaults(func=cmd_data_prepare_voc)

    pa = _command(psub, "ade", "ADE20k needs no conversion: check the unpacked tree (the same as data check --dataset "
                               "ade)", [
        "ilseg data prepare ade --root data/ADEChallengeData2016",
        "ilseg data prepare ade --root data --workers 16           # data/ holds ADEChallengeData2016/"],
        description="ilseg reads ADEChallengeData2016 exactly as ADEChallengeData2016.zip unpacks, so nothing is "
                    "converted: this runs `ilseg data check --dataset ade --root ROOT`.")
    pa.add_argument("--root", required=True, metavar="ADE_DIR",
                    help="the ADEChallengeData2016 folder, or the folder holding it")
    pa.add_argument("--workers", type=_positive_int, default=default_workers(), help=workers_help)
    pa.add_argument("--ignore-counts", action="store_true",
                    help="report image counts that differ from the published ones without failing")
    pa.add_argument("--quiet", action="store_true", help="no progress bar")
    pa.set_defaults(func=cmd_data_prepare_ade)


def _add_data_check(dsub: argparse._SubParsersAction) -> None:
    """data check: a VOC / ADE20k tree read as training reads it."""
    from ilseg.data.parallel import default_workers

    ck = _command(dsub, "check", "check a VOC / ADE20k tree: lists, train/val overlap, labels, sizes, published counts", [
        "ilseg data check --dataset voc --root data/VOCdevkit                  # every published task",
        "ilseg data check --dataset voc --root data/VOCdevkit --task 15-1 --overlap",
        "ilseg data check --dataset ade --root data/ADEChallengeData2016 --task 100-50 --json"],
        description="Read every file of both splits as training would and check: which list files and mask folders "
                    "are used (VOC: a missing train_aug.txt fails instead of falling back to train.txt), ids in "
                    "both the train and the val list, a missing image or mask, mask values outside the dataset's "
                    "classes (and 255), a mask whose size is not its image's, and the split sizes and per-step "
                    "image counts against the published ones, with what a difference usually means. Exit status 1 "
                    "when a check fails, 2 when the tree cannot be read at all.")
    ck.add_argument("--dataset", required=True, choices=["voc", "ade", "synth"],
                    help="the tree's layout and classes (synth: a tree written by `ilseg data synth`)")
    ck.add_argument("--root", required=True,
                    help="what data.root points to: VOCdevkit, VOC2012 or the folder above (voc, synth); "
                         "ADEChallengeData2016 or the folder holding it (ade)")
    ck.add_argument("--task", help="count this task's per-step images (default on voc: every task with published "
                                   "counts, both modes)")
    ck.add_argument("--overlap", action="store_true", help="count --task in the overlapped mode (default: disjoint)")
    ck.add_argument("--workers", type=_positive_int, default=default_workers(), help=_workers_help())
    ck.add_argument("--ignore-counts", action="store_true",
                    help="report counts that differ from the published ones without failing (a deliberate subset "
                         "or another release)")
    ck.add_argument("--json", action="store_true",
                    help="print the whole report as JSON (every problem, not only the first few); the summary line "
                         "goes to stderr")
    ck.add_argument("--quiet", action="store_true", help="no progress bar")
    ck.set_defaults(func=cmd_data_check)


def _add_run_commands(sub: argparse._SubParsersAction) -> None:
    """train, eval, import: making and scoring runs."""
    tr = _command(sub, "train", "train and evaluate every step of an incremental task", [
        "ilseg train --config voc-15-1-ov-ilt --out runs/voc-15-1-ilt",
        "ilseg train --config voc-15-1-ov-ilt --out runs/ilt-lr --set optim.lr=0.005 data.root=/data/VOCdevkit",
        "ilseg train --resume runs/voc-15-1-ilt                       # after a stop, a crash or Ctrl-C"])
    tr.add_argument("--config", help="a YAML file or a bundled preset name (see 'ilseg presets')")
    _add_set(tr)
    tr.add_argument("--out", metavar="RUN_DIR", help="the run folder (checkpoints, results, logs)")
    tr.add_argument("--steps", help="START:STOP or one step (default: all)")
    tr.add_argument("--resume", metavar="RUN_DIR",
                    help="continue an interrupted run (with --set optim.*=...: from the step being resumed, which "
                         "starts again)")
    tr.add_argument("--overwrite", action="store_true",
                    help="start the run in --out over: its checkpoints, results and logs are removed first (not "
                         "needed for a folder in which nothing was trained yet)")
    tr.add_argument("--init-from", metavar="RUN_DIR", help="take step 0 from another run (same task and model)")
    tr.add_argument("--quiet", action="store_true", help="no progress bars")
    tr.set_defaults(func=cmd_train)

    la = _command(sub, "launch", "run train or eval in N processes on this machine (DDP), one line if one fails", [
        "ilseg launch --nproc 4 train --config voc-15-1-ov-ilt --out runs/voc-15-1-ilt",
        "ilseg launch --nproc 2 train --resume runs/voc-15-1-ilt",
        "ilseg launch --nproc 2 train --config synth-demo --out runs/ddp --set runtime.backend=gloo   # on a CPU"],
        description="Start N processes of `ilseg COMMAND ...` with the environment torchrun gives them (one "
                    "machine; several machines: torchrun, docs/scaling.md). Their output goes through as it is; "
                    "when one fails, the others are stopped at once, so the job ends with ilseg's own line "
                    "within runtime.collective_timeout_s plus a few seconds, without torchrun's report. Ctrl-C "
                    "and SIGTERM reach every process, which save and stop.")
    la.add_argument("--nproc", type=int, required=True, metavar="N",
                    help="the number of processes (one per GPU; on a CPU, each uses cores / N threads)")
    la.add_argument("launched", nargs=argparse.REMAINDER, metavar="COMMAND ...",
                    help="the ilseg command to run in each process: train or eval, with its options")
    la.set_defaults(func=cmd_launch)

    ev = _command(sub, "eval", "evaluate a saved step", [
        "ilseg eval --run runs/voc-15-1-ilt                           # the last finished step",
        "ilseg eval --run runs/voc-15-1-ilt --step 2 --json",
        "ilseg eval --checkpoint runs/voc-15-1-ilt/step3.pth --config runs/voc-15-1-ilt/config.yaml"])
    ev.add_argument("--run", metavar="RUN_DIR", help="a run folder")
    ev.add_argument("--step", type=int, help="the step to evaluate (default: the last finished)")
    ev.add_argument("--checkpoint", metavar="FILE", help="a single step checkpoint (with --config)")
    ev.add_argument("--config", help="with --checkpoint: the run's config.yaml or a preset name")
    _add_set(ev)
    _add_device(ev, "evaluate")
    ev.add_argument("--json", action="store_true", help="print the scores as JSON (fractions, per class too)")
    ev.set_defaults(func=cmd_eval)

    im = _command(sub, "import", "turn MiB / PLOP / RCIL / cssegmentation step checkpoints into an ilseg run folder", [
        "ilseg import --format mib ckpts/15-5s-voc_MiB_{0,1,2,3,4,5}.pth --config voc-15-1-disjoint-mib "
        "--out runs/mib-published",
        "ilseg import --format plop ckpts/step{0,1}.pth --config voc-15-5-ov-plop --out runs/plop --evaluate",
        "ilseg import --format rcil ckpts/15-5s-voc_RCIL_overlap_{0,1,2,3,4,5}.pth --config voc-15-1-ov-rcil "
        "--out runs/rcil-published",
        "ilseg report runs/mib-published runs/voc-15-1-disjoint-mib --out report/   # then compare"])
    im.add_argument("--format", required=True, choices=["mib", "plop", "rcil", "cssegmentation"],
                    help="the tool that saved the checkpoints")
    im.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                    help="one file per step, in step order (MiB / PLOP file names and cssegmentation's task_id "
                         "give the step themselves)")
    im.add_argument("--config", required=True, help="the preset or YAML of the run the checkpoints come from")
    _add_set(im)
    im.add_argument("--out", required=True, metavar="RUN_DIR", help="a new run folder")
    im.add_argument("--evaluate", action="store_true",
                    help="score every imported step with ilseg's protocol and write results.json (needs the data)")
    _add_device(im, "evaluate (with --evaluate)")
    im.set_defaults(func=cmd_import)


def _add_output_commands(sub: argparse._SubParsersAction) -> None:
    """predict, report, demo: what people look at."""
    pd = _command(sub, "predict", "write colour masks and overlays for images, or side-by-side panels comparing "
                                  "runs, steps and ground truth", [
        "ilseg predict --run runs/ilt a.jpg b.jpg --out preds/                       # masks and overlays",
        "ilseg predict --run runs/ft --run runs/ilt a.jpg --gt-dir masks/ --out cmp/  # panels with ground truth",
        "ilseg predict --run runs/ilt --steps all a.jpg --gt masks/a.png --out steps/ # images before --gt"])
    pd.add_argument("--run", required=True, action="append", metavar="RUN_DIR",
                    help="a run folder; repeat it to compare runs (of one dataset) side by side")
    pd.add_argument("--step", type=int, help="the step of every run (default: each run's last finished step)")
    pd.add_argument("--steps", metavar="LIST",
                    help="several steps of each run side by side (how forgetting is seen): 'all' finished steps "
                         "or a comma-separated list")
    pd.add_argument("images", nargs="+", metavar="IMAGE",
                    help="the photos to segment (JPEG or PNG); put them before --gt")
    pd.add_argument("--gt", nargs="+", default=[], metavar="MASK",
                    help="ground-truth masks (index PNGs of dataset class ids), matched to the images by file "
                         "name; put the images before --gt")
    pd.add_argument("--gt-dir", metavar="DIR", help="a folder with the ground-truth mask <image name>.png of "
                                                    "every image (e.g. a dataset's SegmentationClassAug)")
    pd.add_argument("--panel", action="store_true",
                    help="also write <name>_panel.png for one run without ground truth (written anyway when "
                         "comparing runs, steps or ground truth)")
    pd.add_argument("--out", required=True, metavar="DIR", help="the folder for the masks, overlays and panels")
    _add_device(pd, "predict")
    pd.set_defaults(func=cmd_predict)

    rp = _command(sub, "report", "compare finished runs: tables, seed mean ± std, forgetting, plots, HTML", [
        "ilseg report runs/voc-15-1-ov-finetune runs/voc-15-1-ov-ilt runs/voc-joint --out report/",
        "ilseg report seed-*/runs --out report/        # a folder without results.json stands for its runs",
        "ilseg report ilseg-demo/runs --out demo-report/"])
    rp.add_argument("runs", nargs="+", metavar="RUN_DIR",
                    help="run folders of one dataset and task (a folder of run folders stands for all of them); "
                         "runs that differ only by seed are grouped")
    rp.add_argument("--out", required=True, help="the report folder (report.md, report.html, report.json, PNGs)")
    rp.add_argument("--skip-bad", action="store_true",
                    help="leave out the runs whose results or config cannot be read, or that are unfinished, "
                         "instead of refusing (each is named on stderr and listed in the report)")
    rp.add_argument("--selection", choices=["final", "best-on-test"], default="final",
                    help="each step's scores: its final model's (default: what the next step starts from, what "
                         "MiB and PLOP publish), or best-on-test: the best evaluation during the step (runs "
                         "trained with eval.every), chosen on the test set as cssegmentation publishes; the "
                         "report says so on every page")
    rp.set_defaults(func=cmd_report)

    dm = _command(sub, "demo", "joint vs fine-tuning vs ILT on the synthetic benchmark (CPU, minutes)", [
        "ilseg demo                                    # into ./ilseg-demo; run again to continue",
        "ilseg demo --quick --out /tmp/demo            # a smoke test (numbers not meaningful)",
        "ilseg demo --methods joint finetune ilt mib plop --seed 1"])
    dm.add_argument("--out", default="ilseg-demo", metavar="DIR",
                    help="the folder for the data, the runs and the report (default: ilseg-demo)")
    dm.add_argument("--quick", action="store_true", help="a much shorter run (smoke test, numbers not meaningful)")
    dm.add_argument("--methods", nargs="+", metavar="METHOD",
                    help="a subset of the demo's methods or other method presets (see `ilseg methods`)")
    dm.add_argument("--seed", type=int, default=0,
                    help="draws the synthetic data and the training; the README's table is seed 0")
    dm.add_argument("--processes", type=int,
                    help="methods trained at once, each in its own process with one thread (default: all of them "
                         "on a CPU with 2 or more cores); 1: one after another in this process, with progress bars")
    dm.add_argument("--quiet", action="store_true", help="no progress bars (with --processes 1)")
    dm.set_defaults(func=cmd_demo)


def _rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes under torchrun; ``(0, 1)`` without it."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _resume_hint(args: argparse.Namespace) -> str:
    """The real resume command when a run folder is known, else where to look."""
    run = getattr(args, "resume", None) or (getattr(args, "out", None) if getattr(args, "func", None) is cmd_train
                                           else None)
    if run and (Path(run) / "config.yaml").is_file():
        return f"continue with: ilseg train --resume {Path(run).resolve()}"
    return "nothing to resume"


def _is_collective_failure(exc: RuntimeError) -> bool:
    """Whether ``exc`` is a collective that failed because a peer process died (gloo / NCCL wording)."""
    text = str(exc)
    markers = ("Connection closed by peer", "Connection reset by peer", "NCCL", "Gloo", "gloo",
               "ProcessGroup", "Broken pipe", "timed out")
    return any(m in text for m in markers) or type(exc).__name__ == "DistBackendError"


def import_method_modules(modules: Sequence[str]) -> None:
    """``--methods-from MODULE``: import each module (from the current folder or the Python path), whose
    import registers its methods; the user names the module on the command line, no config file can."""
    import importlib

    if modules and "" not in sys.path:
        sys.path.insert(0, "")  # `python -m` does this; the `ilseg` script does not
    for module in modules:
        try:
            importlib.import_module(module.removesuffix(".py"))
        except ImportError as exc:
            raise IlsegError(f"--methods-from {module}: cannot import it ({exc}); give a module name on the "
                             "Python path or in the current folder, e.g. --methods-from my_kd for ./my_kd.py") from None


def _final_line(args: argparse.Namespace, line: str) -> None:
    """Print the command's last line (an error or a stop) on stderr; for ``ilseg train`` by rank 0 also at the
    end of the run's train.log, which is what a batch job's user reads."""
    print(line, file=sys.stderr)
    run = getattr(args, "resume", None) or getattr(args, "out", None)
    if getattr(args, "func", None) is cmd_train and run and _rank_and_world()[0] == 0:
        from ilseg.runs.folder import log_final_line

        log_final_line(Path(run), line)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # bare `ilseg`: the grouped command list, and status 2 (no command was given)
        parser.print_help()
        return 2
    rank, world = _rank_and_world()
    where = f" (rank {rank} of {world})" if rank > 0 else ""
    try:
        import_method_modules(args.methods_from)
        return int(args.func(args) or 0)
    except ReportedByMainRank:
        return 2  # rank 0 prints the message; torchrun then ends every process
    except Interrupted as exc:
        if rank == 0:
            _final_line(args, f"ilseg: {exc}")
        return 128 + exc.signal_number
    except IlsegError as exc:
        hint = f"; {_resume_hint(args)}" if isinstance(exc, WriteError) and args.func is cmd_train else ""
        _final_line(args, f"ilseg: error{where}: {one_line(exc)}{hint}")
        return 2
    except KeyboardInterrupt:
        _final_line(args, f"ilseg: interrupted{where}; {_resume_hint(args)}")
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which closed early
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # a file-system fault outside ilseg's own writes (e.g. a folder removed mid-run)
        name = f" {exc.filename}" if exc.filename else ""
        _final_line(args, f"ilseg: error{where}: cannot use{name} ({exc.strerror or exc}); {_resume_hint(args)}")
        return 2
    except RuntimeError as exc:
        if "DataLoader worker" in str(exc):  # e.g. killed by the OOM killer
            _final_line(args, f"ilseg: error{where}: {str(exc).strip().splitlines()[0]} (out of memory? lower "
                              f"data.workers); {_resume_hint(args)}")
            return 2
        if world > 1 and _is_collective_failure(exc):
            cause = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).strip().splitlines()[0]).split(". ")[0][:160]
            print(f"ilseg: error{where}: another process of this job stopped or stopped responding, so this one "
                  f"cannot go on ({cause}); that process's own output says why; {_resume_hint(args)}", file=sys.stderr)
            return 2
        raise


def run_command_line() -> NoReturn:
    """The ``ilseg`` command and ``python -m ilseg``: :func:`main`, then exit with its status.

    After a run stopped by a signal (status 130 or 143, its state saved and its line printed), further
    SIGINT / SIGTERM are ignored while the interpreter shuts down: a Ctrl-C pressed twice, or a scheduler
    signalling the whole process group again, would otherwise interrupt the clean-up and print its traceback.
    """
    from ilseg.engine.signals import ignore_signals_after_a_stop

    ignore_signals_after_a_stop()
    code = main()
    if code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
    raise SystemExit(code)


if __name__ == "__main__":
    run_command_line()
