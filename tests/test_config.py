"""The config tree: presets, overrides, validation messages, round trip."""

from __future__ import annotations


import pytest

from ilseg.config import (
    RunConfig,
    config_from_dict,
    dump_config,
    load_config,
    parse_overrides,
    preset_dir,
    resolve_config_path,
)
from ilseg.errors import IlsegError

PRESETS = sorted(preset_dir().glob("*.yaml"))


def test_presets_exist_for_every_published_setting():
    names = {p.stem for p in PRESETS}
    for task in ("15-5", "15-1", "10-1", "19-1"):
        for mode in ("disjoint", "ov"):
            assert f"voc-{task}-{mode}-ilt" in names
    for task in ("100-50", "100-10", "100-5"):
        for mode in ("disjoint", "ov"):
            assert f"ade-{task}-{mode}-ilt" in names
    for variant in ("ilt-kd-out", "ilt-kd-feat", "ilt-ef", "ilt-ef-kd-out", "ilt-kd-out-feat"):
        assert f"voc-19-1-disjoint-{variant}" in names
    assert {"voc-joint", "ade-joint", "voc-15-1-disjoint-finetune", "synth-demo"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    task = cfg.build_task()
    assert task.num_steps >= 1
    # The round trip through the run folder's config.yaml is lossless.
    assert config_from_dict(cfg.to_dict()) == cfg


def test_paper_recipe_values_in_a_preset():
    cfg = load_config(resolve_config_path("voc-15-1-ov-ilt"))
    assert cfg.data.overlap is True and cfg.data.task == "15-1"
    assert (cfg.optim.lr, cfg.optim.lr_next, cfg.optim.epochs, cfg.optim.batch_size) == (0.01, 0.001, 30, 24)
    assert cfg.optim.nesterov and cfg.optim.momentum == 0.9 and cfg.optim.poly_power == 0.9
    assert (cfg.method.kd_weight, cfg.method.fd_weight) == (100.0, 100.0)
    assert load_config(resolve_config_path("voc-10-1-disjoint-ilt")).optim.epochs_next == 10


def test_overrides_nested_and_typed(tmp_path):
    cfg = load_config(preset_dir() / "synth-demo.yaml",
                      ["optim.lr=0.5", "data.overlap=true", "method.name=ilt-kd-out", "method.kd_weight=2"])
    assert cfg.optim.lr == 0.5 and cfg.data.overlap is True
    assert cfg.method.name == "ilt-kd-out" and cfg.method.kd_weight == 2.0
    # the preset's other fields come along with the method name
    assert cfg.method.keep_old_labels is True
    assert parse_overrides(["a.b.c=[1, 2]"]) == {"a": {"b": {"c": [1, 2]}}}


def test_dump_and_reload(tmp_path):
    cfg = load_config(preset_dir() / "synth-demo.yaml", ["data.class_order=[0,3,1,2,4,5,6,7,8,9,10]",
                                                        "data.step_sizes=[7,2,2]"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    again = load_config(path)
    assert again == cfg and again.hash() == cfg.hash()
    assert again.build_task().order[:3] == (0, 3, 1)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["optim.lrr=0.1"], "did you mean 'lr'"),
        (["optimm.lr=0.1"], "unknown config key 'optimm'"),
        (["optim.lr=fast"], "optim.lr"),
        (["optim.lr=-1"], "optim.lr"),
        (["optim.epochs=1.5"], "optim.epochs"),
        (["data.dataset=coco"], "data.dataset"),
        (["data.task=15-2"], "unknown task '15-2'"),
        (["method.name=magic"], "unknown method 'magic'"),
        (["method.kd_weight=-3"], "kd_weight"),
        (["data.overlap=maybe"], "data.overlap"),
        (["optim.batch_size=0"], "optim.batch_size"),
        (["data.class_order=[0,1,2]"], "data.step_sizes"),
        (["lr"], "expected key=value"),
    ],
)
def test_bad_values_are_rejected_with_the_key_named(overrides, fragment):
    with pytest.raises(IlsegError, match=None) as info:
        load_config(preset_dir() / "voc-15-1-disjoint-ilt.yaml", overrides)
    assert fragment in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(IlsegError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(IlsegError, match="not valid YAML"):
        load_config(bad)
    code = tmp_path / "code.yaml"
    code.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(IlsegError, match="not valid YAML"):
        load_config(code)  # safe_load refuses to build Python objects
    with pytest.raises(IlsegError, match="neither a file nor a bundled preset"):
        resolve_config_path("voc-15-1-ilt-typo")


def test_defaults_are_the_paper_recipe():
    cfg = RunConfig()
    assert cfg.model.backbone == "resnet101" and cfg.model.output_stride == 16
    assert cfg.optim.optimizer == "sgd" and cfg.optim.weight_decay == 1e-4
    assert cfg.data.crop_size == 512 and cfg.data.scale == (0.5, 2.0)
