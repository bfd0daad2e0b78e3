"""Presets as data: each resolves to the values it always had; ``base:`` inheritance; ``ilseg config show``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ilseg.cli import main
from ilseg.config import (
    RunConfig,
    config_changes,
    config_from_dict,
    dump_config,
    load_config,
    preset_dir,
    read_config_file,
    resolve_config_path,
)
from ilseg.errors import IlsegError
from ilseg.methods import METHOD_PRESETS

SNAPSHOT_FILE = Path(__file__).parent / "data" / "preset-snapshot.json"
SNAPSHOT = json.loads(SNAPSHOT_FILE.read_text())
DEFAULTS = "<defaults>"  # the snapshot's key for load_config(None)
PRESETS = sorted(preset_dir().glob("*.yaml"))
BASES = sorted((preset_dir() / "base").glob("*.yaml"))
# Keys that name a setting rather than restate a default (as in test_config.py).
DEFINING = {("data", "dataset"), ("data", "task"), ("data", "overlap"), ("method", "name")}


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# -- every preset resolves to its snapshot --------------------------------------------
def test_the_presets_are_those_of_the_snapshot():
    assert {p.stem for p in PRESETS} | {DEFAULTS} == set(SNAPSHOT), (
        f"the bundled presets differ from the keys of {SNAPSHOT_FILE.name}: a preset added (or removed) must be "
        "added to (or removed from) the snapshot deliberately, its value being RunConfig.to_dict() of the preset "
        "once its values are checked")


# Values changed on purpose since the snapshot was taken, each with its reason; every other value of every
# preset is the snapshot's.
DELIBERATE_CHANGES: dict[str, tuple[dict[str, dict[str, object]], str]] = {
    stem: ({"model": {"frozen_bn_affine": False}},
           "the ILT paper's code trains BatchNorm's scale and offset (docs/fidelity.md)")
    for stem in SNAPSHOT if "-paper-" in stem
}


def _with_changes(section_values: dict, changes: dict) -> dict:
    return {k: ({**v, **changes[k]} if k in changes else v) for k, v in section_values.items()}


@pytest.mark.parametrize("stem", sorted(SNAPSHOT))
def test_every_preset_resolves_to_its_snapshot(stem):
    path = None if stem == DEFAULTS else preset_dir() / f"{stem}.yaml"
    changes, _why = DELIBERATE_CHANGES.get(stem, ({}, ""))
    assert load_config(path) == config_from_dict(_with_changes(SNAPSHOT[stem], changes))


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_a_preset_does_not_restate_what_its_bases_give(path, tmp_path):
    written = yaml.safe_load(path.read_text())
    if "base" not in written:
        return  # test_config.py checks such a preset against the defaults
    bases = written["base"] if isinstance(written["base"], list) else [written["base"]]
    found = [str(path.parent / b) if (path.parent / b).is_file() else b for b in bases]
    given = load_config(_write(tmp_path / "only-the-bases.yaml", yaml.safe_dump({"base": found})))
    cfg = load_config(path)
    for section, values in written.items():
        if section in ("name", "base"):
            continue
        reference = METHOD_PRESETS[cfg.method.name] if section == "method" else getattr(given, section)
        for key in values:
            if (section, key) not in DEFINING:
                value = getattr(getattr(cfg, section), key)
                assert value != getattr(reference, key), f"{path.name} restates {section}.{key}: {value!r}"


@pytest.mark.parametrize("path", BASES, ids=[p.stem for p in BASES])
def test_a_shared_base_is_used_states_no_default_and_is_no_preset(path):
    used_by = [p.stem for p in PRESETS if f"base/{path.name}" in p.read_text()]
    used_by += [b.stem for b in BASES if f"base: {path.name}" in b.read_text()]
    assert used_by, f"nothing builds on {path.name}"
    written, cfg, defaults = yaml.safe_load(path.read_text()), load_config(path), RunConfig()
    assert "name" not in written, "a base has no name: each preset gives its own"
    for section, values in written.items():
        if section == "base":
            continue
        for key in values:
            if (section, key) not in DEFINING:
                value = getattr(getattr(cfg, section), key)
                assert value != getattr(getattr(defaults, section), key), f"{path.name} restates {section}.{key}"


def test_the_paper_and_ade_presets_build_on_the_shared_bases():
    paper = [p for p in PRESETS if "-paper-" in p.stem]
    ade = [p for p in PRESETS if p.stem.startswith("ade-")]
    assert len(paper) == 21 and len(ade) == 29
    for path in paper:
        written = yaml.safe_load(path.read_text())
        assert written["base"] in ("base/ilt-paper.yaml", "base/ilt-paper-incremental.yaml")
        assert "model" not in written, f"{path.name}: the paper's model is the base's"
    for path in ade:
        assert yaml.safe_load(path.read_text())["base"] == "base/ade.yaml"


def test_a_preset_built_on_bases_dumps_resolved_without_base():
    cfg = load_config(preset_dir() / "voc-15-1-paper-ilt-kd-out.yaml")
    dumped = yaml.safe_load(dump_config(cfg))
    assert "base" not in dumped and dumped["model"]["head"] == "aspp_v2"
    assert config_from_dict(dumped) == cfg


# -- base: on files written here ----------------------------------------------------------
def test_a_chain_of_two_bases_resolves_depth_first(tmp_path):
    _write(tmp_path / "grand.yaml", "optim: {lr: 0.02, epochs: 5, batch_size: 4}\nmodel: {backbone: resnet50}\n")
    _write(tmp_path / "parent.yaml", "base: grand.yaml\nname: parent\noptim: {epochs: 6}\n")
    child = _write(tmp_path / "child.yaml", "base: parent.yaml\nname: child\noptim: {batch_size: 8}\n")
    cfg = load_config(child)
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.optim.batch_size) == (0.02, 6, 8)
    assert cfg.model.backbone == "resnet50" and cfg.name == "child"
    assert "base" not in read_config_file(child)


def test_a_list_of_bases_merges_in_order_and_the_file_wins(tmp_path):
    _write(tmp_path / "one.yaml", "optim: {lr: 0.02, epochs: 5}\ndata: {task: 10-1}\n")
    _write(tmp_path / "two.yaml", "optim: {lr: 0.03}\nmodel: {backbone: resnet50}\n")
    child = _write(tmp_path / "child.yaml", "base: [one.yaml, two.yaml]\nname: child\noptim: {epochs: 7}\n")
    cfg = load_config(child)
    assert (cfg.optim.lr, cfg.optim.epochs) == (0.03, 7)  # the later base wins, the file over both
    assert cfg.data.task == "10-1" and cfg.model.backbone == "resnet50"
    swapped = _write(tmp_path / "swapped.yaml", "base: [two.yaml, one.yaml]\n")
    assert load_config(swapped).optim.lr == 0.02


def test_a_relative_base_is_found_from_the_file_that_names_it(tmp_path, monkeypatch):
    _write(tmp_path / "shared" / "deeper" / "model.yaml", "model: {backbone: resnet34}\n")
    _write(tmp_path / "shared" / "common.yaml", "base: deeper/model.yaml\noptim: {lr: 0.05}\n")
    child = _write(tmp_path / "runs" / "exp.yaml", "base: ../shared/common\nname: exp\n")  # .yaml may be left out
    monkeypatch.chdir(_write(tmp_path / "elsewhere" / "x", "").parent)
    cfg = load_config(child)
    assert (cfg.model.backbone, cfg.optim.lr) == ("resnet34", 0.05)


def test_a_base_can_be_a_bundled_preset_or_a_shared_base(tmp_path):
    child = _write(tmp_path / "mine.yaml", "base: voc-15-1-ov-ilt\noptim: {epochs: 3}\n")
    cfg = load_config(child)
    expected = load_config(resolve_config_path("voc-15-1-ov-ilt"), ["optim.epochs=3", "name=mine"])
    assert cfg == expected
    paper = _write(tmp_path / "paper.yaml", "base: base/ilt-paper\nname: paper\n")
    assert load_config(paper).model.head == "aspp_v2"


def test_name_is_never_inherited_from_a_base(tmp_path):
    _write(tmp_path / "common.yaml", "name: common\noptim: {lr: 0.02}\n")
    assert load_config(_write(tmp_path / "forgot-name.yaml", "base: common.yaml\n")).name == "forgot-name"
    assert load_config(_write(tmp_path / "named.yaml", "base: common.yaml\nname: mine\n")).name == "mine"
    assert load_config(_write(tmp_path / "plain.yaml", "optim: {lr: 0.02}\n")).name == "run"  # as before bases


def test_nested_mappings_merge_key_by_key(tmp_path):
    _write(tmp_path / "common.yaml", "method: {name: ilt, kd_weight: 3}\n"
                                     "data: {dataset: ade, root: data/ADEChallengeData2016, task: 100-50}\n")
    child = _write(tmp_path / "child.yaml", "base: common.yaml\nmethod: {fd_weight: 4}\ndata: {overlap: true}\n")
    cfg = load_config(child)
    assert (cfg.method.name, cfg.method.kd_weight, cfg.method.fd_weight) == ("ilt", 3.0, 4.0)
    assert (cfg.data.dataset, cfg.data.root, cfg.data.task, cfg.data.overlap) == \
        ("ade", "data/ADEChallengeData2016", "100-50", True)
    short = _write(tmp_path / "short.yaml", "base: common.yaml\nmethod: mib\n")  # a method given by name alone
    assert load_config(short).method.name == "mib"


def test_set_overrides_apply_after_the_bases(tmp_path):
    _write(tmp_path / "common.yaml", "optim: {lr: 0.02, epochs: 5}\n")
    child = _write(tmp_path / "child.yaml", "base: common.yaml\noptim: {lr: 0.03}\n")
    cfg = load_config(child, ["optim.lr=0.05", "optim.epochs=9", "name=override"])
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.name) == (0.05, 9, "override")


def test_a_cycle_of_bases_is_refused_naming_the_chain(tmp_path):
    _write(tmp_path / "a.yaml", "base: b.yaml\n")
    _write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(IlsegError, match=r"cycle: a\.yaml -> b\.yaml -> a\.yaml"):
        load_config(tmp_path / "a.yaml")
    _write(tmp_path / "self.yaml", "base: self.yaml\n")
    with pytest.raises(IlsegError, match=r"self\.yaml -> self\.yaml"):
        load_config(tmp_path / "self.yaml")


def test_the_same_base_reached_twice_is_no_cycle(tmp_path):
    _write(tmp_path / "root.yaml", "optim: {lr: 0.02}\n")
    _write(tmp_path / "left.yaml", "base: root.yaml\noptim: {epochs: 5}\n")
    _write(tmp_path / "right.yaml", "base: root.yaml\nmodel: {backbone: resnet50}\n")
    cfg = load_config(_write(tmp_path / "both.yaml", "base: [left.yaml, right.yaml]\n"))
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.model.backbone) == (0.02, 5, "resnet50")


def test_a_missing_base_names_the_file_that_asked_for_it(tmp_path):
    _write(tmp_path / "common.yaml", "base: nowhere.yaml\n")
    child = _write(tmp_path / "child.yaml", "base: common.yaml\n")
    with pytest.raises(IlsegError, match=r"common\.yaml names base 'nowhere\.yaml', which is neither a file"):
        load_config(child)
    typo = _write(tmp_path / "typo.yaml", "base: base/ilt-papr\n")
    with pytest.raises(IlsegError, match="Did you mean: base/ilt-paper"):
        load_config(typo)


@pytest.mark.parametrize("value", ["3", "[]", "{a: 1}", "['']", "null"])
def test_a_base_that_is_no_name_or_path_is_refused(tmp_path, value):
    with pytest.raises(IlsegError, match="'base' must be a preset name or a path"):
        load_config(_write(tmp_path / "bad.yaml", f"base: {value}\n"))


# -- ilseg config show ----------------------------------------------------------------
def test_config_show_prints_what_a_run_folder_would_hold(capsys):
    assert main(["config", "show", "voc-15-1-paper-ilt-kd-out"]) == 0
    out = capsys.readouterr().out
    assert out == dump_config(load_config(resolve_config_path("voc-15-1-paper-ilt-kd-out")))
    shown = yaml.safe_load(out)
    assert "base" not in shown and shown["model"]["frozen_bn"] is True and shown["optim"]["lr_next"] == 5e-5


def test_config_show_applies_set_and_reads_files(tmp_path, capsys):
    _write(tmp_path / "common.yaml", "optim: {lr: 0.02}\n")
    mine = _write(tmp_path / "mine.yaml", "base: [common.yaml, voc-10-1-ov-ilt]\n")
    assert main(["config", "show", str(mine), "--set", "optim.epochs=3", "runtime.seed=7"]) == 0
    shown = config_from_dict(yaml.safe_load(capsys.readouterr().out))
    assert (shown.name, shown.data.task, shown.optim.lr, shown.optim.epochs, shown.runtime.seed) == \
        ("mine", "10-1", 0.02, 3, 7)


def test_config_show_diff_prints_only_what_differs_from_the_defaults(capsys):
    assert main(["config", "show", "voc-15-1-paper-ilt-kd-out", "--diff"]) == 0
    diff = yaml.safe_load(capsys.readouterr().out)
    assert diff["name"] == "voc-15-1-paper-ilt-kd-out"
    assert diff["data"] == {"crop_size": 321}  # VOC 15-1 is the default task
    assert diff["model"] == {"output_stride": 8, "head": "aspp_v2", "frozen_bn": True, "frozen_bn_affine": False,
                             "activation": "relu"}
    assert diff["optim"]["iterations"] == 16000 and "momentum" not in diff["optim"]
    assert diff["method"]["name"] == "ilt-kd-out" and "runtime" not in diff and "eval" not in diff
    assert main(["config", "show", "synth-demo", "--set", "runtime.seed=42", "--diff"]) == 0
    assert "seed" not in yaml.safe_load(capsys.readouterr().out)["runtime"]  # 42 is the default


def test_config_show_diff_of_the_defaults_says_so(tmp_path, capsys):
    assert main(["config", "show", str(_write(tmp_path / "plain.yaml", "name: run\n")), "--diff"]) == 0
    assert capsys.readouterr().out == "# every value is the default\n"


def test_config_changes_is_nested_like_a_config_file():
    changed = load_config(None, ["optim.lr=0.02", "data.scale=[0.5, 1.5]", "model.pretrained=null"])
    assert config_changes(changed, load_config(None)) == {
        "data": {"scale": [0.5, 1.5]}, "model": {"pretrained": None}, "optim": {"lr": 0.02}}
    assert config_changes(load_config(None), load_config(None)) == {}


def test_config_show_of_an_unknown_preset_is_one_line_with_close_matches(capsys):
    assert main(["config", "show", "voc-15-1-ilt"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ilseg: error:")
    assert "Did you mean: voc-15-1-ov-ilt" in err and "ilseg presets" in err


def test_config_show_of_a_cycle_is_one_line(tmp_path, capsys):
    _write(tmp_path / "a.yaml", "base: b.yaml\n")
    _write(tmp_path / "b.yaml", "base: a.yaml\n")
    assert main(["config", "show", str(tmp_path / "a.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "a.yaml -> b.yaml -> a.yaml" in err


def test_config_show_help_explains_every_option_with_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["config", "show", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "--diff" in out and "ilseg config show voc-15-1-ov-ilt" in out
    assert "PRESET_OR_FILE" in out and "override config values" in out
