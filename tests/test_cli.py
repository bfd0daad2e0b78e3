"""The informational and data commands of the CLI."""

from __future__ import annotations

import argparse
import json
import sys

import pytest

import processes
from ilseg.cli import COMMAND_GROUPS, build_parser, main
from ilseg.methods import METHOD_PRESETS


def test_tasks_lists_and_shows_steps_by_name(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert "15-1" in out and "100-50" in out and "6-2-2" in out
    assert main(["tasks", "voc", "15-5s"]) == 0
    out = capsys.readouterr().out
    assert "6 steps" in out and "step 5 (1 class, 21 outputs): 20:tvmonitor" in out  # "1 class", not "1 classes"
    assert "step 0 (16 classes, 16 outputs): 0:background, 1:aeroplane" in out


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["tasks", "--set", "a=1", "b=2", "--set", "c=3"], ["a=1", "b=2", "c=3"]),
        (["tasks", "--set", "a=1"], ["a=1"]),
        (["tasks"], []),
        (["train", "--config", "synth-demo", "--set", "a=1", "b=2", "--out", "run", "--set", "c=3", "--quiet"],
         ["a=1", "b=2", "c=3"]),
        (["splits", "--set", "a=1", "b=2", "--json"], ["a=1", "b=2"]),
        (["eval", "--run", "run", "--set", "a=1", "--set", "b=2", "c=3"], ["a=1", "b=2", "c=3"]),
    ],
)
def test_set_takes_several_items_and_repeats(argv, expected):
    args = build_parser().parse_args(argv)
    assert args.set == expected
    if argv[0] == "train":
        assert (args.out, args.quiet) == ("run", True)  # the options after the items are still read


def test_set_items_end_at_options_and_positionals_go_first(capsys):
    parser = build_parser()
    args = parser.parse_args(["tasks", "voc", "15-1", "--set", "a=1", "b=2"])
    assert (args.dataset, args.task, args.set) == ("voc", "15-1", ["a=1", "b=2"])
    args = parser.parse_args(["tasks", "--set", "a=1", "--", "voc", "15-1"])  # or after --
    assert (args.dataset, args.task, args.set) == ("voc", "15-1", ["a=1"])
    assert parser.parse_args(["tasks"]).set == []  # the default list is not shared between parses
    # Through the command: two items in one --set and a third in another all reach the config.
    assert main(["tasks", "--config", "synth-demo", "--set", "data.task=custom",
                 "data.class_order=[0,3,1,2,4,5,6,7,8,9,10]", "--set", "data.step_sizes=[7,2,2]"]) == 0
    out = capsys.readouterr().out
    assert "synth custom: 3 steps" in out and "step 0 (7 classes, 7 outputs): 0:background, 3:triangle, 1:disc" in out
    # A positional after --set is read as an item: the error says where positionals go.
    assert main(["tasks", "--config", "synth-demo", "--set", "data.task=6-2-2", "synth"]) == 2
    err = capsys.readouterr().err
    assert "--set 'synth': expected key=value" in err and "put positional arguments before --set" in err
    with pytest.raises(SystemExit):
        main(["tasks", "--help"])
    assert "the KEY=VALUE items end at the next option, so put positional arguments before --set" in " ".join(
        capsys.readouterr().out.split())


def test_methods_and_presets_listing(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in METHOD_PRESETS:
        assert name in out
    assert "100" in out  # the ilt preset's weights are shown
    assert main(["presets"]) == 0
    assert "voc-15-1-ov-ilt" in capsys.readouterr().out


def test_data_synth_then_splits_json(tmp_path, capsys):
    root = tmp_path / "synth"
    assert main(["data", "synth", "--out", str(root), "--num-images", "80", "--size", "32", "--seed", "1"]) == 0
    capsys.readouterr()
    assert main(["splits", "--dataset", "synth", "--root", str(root), "--task", "6-2-2", "--json",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    disjoint = json.loads(capsys.readouterr().out)
    assert disjoint["dataset"] == "synth" and disjoint["task"] == "6-2-2" and disjoint["overlap"] is False
    assert [s["step"] for s in disjoint["steps"]] == [0, 1, 2]
    assert disjoint["steps"][1]["classes"] == ["diamond", "star"]
    assert all(isinstance(s["count"], int) for s in disjoint["steps"])
    assert main(["splits", "--dataset", "synth", "--root", str(root), "--task", "6-2-2", "--overlap", "--json",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    overlap = json.loads(capsys.readouterr().out)
    # overlapped keeps every disjoint image and more (future classes allowed)
    assert all(o["count"] >= d["count"] for o, d in zip(overlap["steps"], disjoint["steps"]))
    assert overlap["steps"][0]["count"] > disjoint["steps"][0]["count"]
    # the last step has no future class: both modes agree
    assert overlap["steps"][2]["count"] == disjoint["steps"][2]["count"]


def test_python_dash_m_entry_point_reports_errors_without_traceback():
    proc = processes.run([sys.executable, "-m", "ilseg", "tasks", "voc", "nope"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("ilseg: error: unknown task 'nope'") and "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv", [["data", "synth"], ["train", "--bogus"]])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2


def _parsers(parser: argparse.ArgumentParser, prog: str = "ilseg"):
    """Every parser under ``parser`` with its command line (``ilseg data prepare voc``), ``parser`` first."""
    yield prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{prog} {name}")


def test_every_option_of_every_command_says_what_it_does():
    missing = [f"{prog} {action.option_strings or action.dest}" for prog, parser in _parsers(build_parser())
               for action in parser._actions
               if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))
               and not (action.help or "").strip()]
    assert not missing, missing


def test_every_command_help_ends_with_real_examples():
    for prog, parser in _parsers(build_parser()):
        if any(isinstance(a, argparse._SubParsersAction) for a in parser._actions) and prog == "ilseg":
            continue
        text = parser.format_help()
        assert "examples:" in text, prog
        examples = [line.strip() for line in text.split("examples:")[-1].splitlines() if line.strip()]
        commands = [line for line in examples if line.startswith("ilseg ")]
        assert 2 <= len(commands) <= 4, (prog, examples)
        assert any(line.startswith(prog + " ") or line == prog for line in commands), (prog, commands)
        for line in commands:  # each example parses (shell braces and globs left as they are)
            argv = line.split("#")[0].split()[1:]
            if "|" in argv:
                argv = argv[:argv.index("|")]
            with_brace = [a for a in argv if "{" in a]
            argv = [a.replace("{", "").replace("}", "").split(",")[0] if a in with_brace else a for a in argv]
            assert build_parser().parse_args(argv).command == argv[0], line


def test_top_level_help_lists_every_command_in_one_group(capsys):
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    grouped = [name for _, names in COMMAND_GROUPS for name in names]
    assert sorted(grouped) == sorted(commands.choices) and len(grouped) == len(set(grouped))
    assert [group for group, _ in COMMAND_GROUPS] == ["run", "inspect", "compare", "data"]
    text = parser.format_help()
    for group, names in COMMAND_GROUPS:
        block = text.split(f"\n{group}:\n")[1].split("\n\n")[0]
        assert [line.split()[0] for line in block.splitlines()] == list(names), group
    # bare `ilseg`: that help on stdout, status 2 (no command given), as documented in its last line
    assert main([]) == 2
    out = capsys.readouterr().out
    assert out == text and "`ilseg` alone prints this help and exits with status 2" in " ".join(out.split())


def test_a_positional_swallowed_by_a_list_option_gets_a_hint(capsys):
    with pytest.raises(SystemExit) as info:
        main(["predict", "--run", "runs/ilt", "--gt", "a.png", "a.jpg", "--out", "preds"])
    assert info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "required: IMAGE: --gt reads every word up to the next option" in err
    assert "put IMAGE before --gt, or after --" in err
    with pytest.raises(SystemExit):  # no list option given: argparse's own message, without the hint
        main(["predict", "--run", "runs/ilt", "--out", "preds"])
    assert "reads every word" not in capsys.readouterr().err
    args = build_parser().parse_args(["predict", "--run", "r", "a.jpg", "--gt", "a.png", "--out", "o"])
    assert (args.images, args.gt) == (["a.jpg"], ["a.png"])


def test_splits_reads_the_data_root_train_reads(tmp_path, capsys, monkeypatch):
    from ilseg.config import load_config, preset_dir

    monkeypatch.chdir(tmp_path)
    assert main(["splits", "--dataset", "synth", "--task", "6-2-2"]) == 2
    demo_root = load_config(preset_dir() / "synth-demo.yaml").data.root
    assert f"dataset root {demo_root} does not exist" in capsys.readouterr().err
    assert main(["splits", "--task", "15-1"]) == 2
    assert f"dataset root {load_config(None).data.root} does not exist" in capsys.readouterr().err
    assert main(["splits"]) == 2
    assert "ilseg splits needs --task" in capsys.readouterr().err
