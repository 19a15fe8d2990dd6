"""Config loading, overrides, validation and snapshot schedules (nctools/config.py)."""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from nctools.config.schema import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    diff_configs,
    load_config,
    snapshot_epochs,
    validate,
)
from nctools.runs.store import save_config


def write(tmp_path, text: str, name: str = "cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(tmp_path, text: str, overrides=()) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


# ---------------------------------------------------------------------------------------
# Round trips


def test_defaults_are_valid_and_round_trip(tmp_path):
    cfg = Config()
    validate(cfg)
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_changed_config_round_trips_exactly(tmp_path):
    cfg = Config(name="grid-7", seed=3)
    cfg.data.samples_per_class = 500
    cfg.train.lr = 0.1 / 3  # not a short decimal: YAML must keep every bit
    cfg.train.milestones = [0.25, 0.5, 0.75]
    cfg.train.device = "cuda:1"
    cfg.snapshot.epochs = [1, 2, 50, 150]
    cfg.snapshot.dtype = "float16"
    cfg.snapshot.splits = ["test"]
    save_config(cfg, tmp_path / "config.yaml")
    loaded = load_config(tmp_path / "config.yaml")
    assert loaded == cfg
    assert loaded.train.lr == 0.1 / 3
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic write left nothing behind


def test_partial_file_keeps_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "name: demo\ntrain: {epochs: 4}\nmodel:\n"))
    expected = Config(name="demo")
    expected.train.epochs = 4
    assert cfg == expected


def test_int_for_float_field_and_yaml11_exponent(tmp_path):
    # PyYAML reads `5e-4` (no dot) as a string; it is clearly meant as a number
    cfg = load_config(write(tmp_path, "train: {lr: 1, weight_decay: 5e-4}\n"))
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.weight_decay == 5e-4


# ---------------------------------------------------------------------------------------
# Overrides


@pytest.mark.parametrize(
    ("override", "section", "key", "value"),
    [
        ("train.epochs=3", "train", "epochs", 3),
        ("snapshot.epochs=all", "snapshot", "epochs", "all"),
        ("snapshot.epochs=log:5", "snapshot", "epochs", "log:5"),
        ("snapshot.epochs=[1,5,10]", "snapshot", "epochs", [1, 5, 10]),
        ("data.samples_per_class=null", "data", "samples_per_class", None),
        ("data.samples_per_class=20", "data", "samples_per_class", 20),
        ("train.lr=0.1", "train", "lr", 0.1),
        ("train.device=cuda:0", "train", "device", "cuda:0"),
        ("train.bf16=true", "train", "bf16", True),
        ("name=2024", None, "name", "2024"),  # a str field keeps the text as typed
        ("data.root=/data/1", "data", "root", "/data/1"),
    ],
)
def test_override_sets_typed_value(tmp_path, override, section, key, value):
    cfg = load_config(write(tmp_path, "train: {epochs: 20}\n"), [override])
    got = getattr(cfg if section is None else getattr(cfg, section), key)
    assert got == value and type(got) is type(value)


def test_overrides_apply_in_order_and_section_mapping_merges(tmp_path):
    path = write(tmp_path, "train: {epochs: 20, lr: 0.2}\n")
    cfg = load_config(path, ["train.epochs=3", "train.epochs=4"])
    assert (cfg.train.epochs, cfg.train.lr) == (4, 0.2)
    cfg = load_config(path, ["train={epochs: 5}"])
    assert (cfg.train.epochs, cfg.train.lr) == (5, 0.2)


# ---------------------------------------------------------------------------------------
# Errors name the file and the dotted key


def test_unknown_key_suggests_closest(tmp_path):
    path = write(tmp_path, "train:\n  epoch: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: train.epoch: unknown key (did you mean 'train.epochs'?)"


def test_unknown_section_suggests_closest(tmp_path):
    assert "trian: unknown key (did you mean 'train'?)" in error_of(tmp_path, "trian: {}\n")


def test_key_in_wrong_section_suggests_right_one(tmp_path):
    assert "lr: unknown key (did you mean 'train.lr'?)" in error_of(tmp_path, "lr: 0.1\n")


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path):
    msg = error_of(tmp_path, "snapshot: {zzzzzz: 1}\n")
    assert "snapshot.zzzzzz: unknown key; valid keys here: epochs, splits, dtype" in msg


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train: {epochs: ten}", "train.epochs: expected int, got str 'ten'"),
        ("train: {epochs: true}", "train.epochs: expected int, got bool True"),
        ("train: {epochs: 2.5}", "train.epochs: expected int, got float 2.5"),
        ("train: {lr: fast}", "train.lr: expected float, got str 'fast'"),
        ("train: {lr: true}", "train.lr: expected float, got bool True"),
        ("train: {bf16: 1}", "train.bf16: expected bool, got int 1"),
        ("train: {milestones: 0.5}",
         "train.milestones: expected list of float or str, got float 0.5"),
        ("train: {milestones: [0.5, true]}",
         "train.milestones: expected list of float or str, got list [0.5, True]"),
        ("data: {samples_per_class: 1.5}",
         "data.samples_per_class: expected int or list of int or null, got float 1.5"),
        ("name: null", "name: expected str, got null None"),
        ("snapshot: {epochs: 5}", "snapshot.epochs: expected str or list of int, got int 5"),
        ("train: 3", "train: expected a mapping, got int 3"),
    ],
)
def test_wrong_type_names_key(tmp_path, text, message):
    path = write(tmp_path, text + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: {message}"


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_config(path)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    msg = error_of(tmp_path, "name: demo\ntrain:\n  epochs: [1, 2\n  lr: 0.1\n")
    assert msg.startswith(f"{tmp_path / 'cfg.yaml'}: line ")
    assert "YAML syntax error" in msg
    line = int(msg.split("line ")[1].split(":")[0])
    assert 3 <= line <= 4  # the unclosed list


def test_duplicate_key_is_an_error(tmp_path):
    msg = error_of(tmp_path, "train:\n  lr: 0.1\n  epochs: 3\n  lr: 0.2\n")
    assert msg == f"{tmp_path / 'cfg.yaml'}: line 4: YAML syntax error: duplicate key 'lr'"


@pytest.mark.parametrize(("text", "got"), [("- a\n- b\n", "list ['a', 'b']"),
                                           ("", "an empty file"), ("42\n", "int 42")])
def test_top_level_must_be_mapping(tmp_path, text, got):
    msg = error_of(tmp_path, text)
    assert msg.startswith(f"{tmp_path / 'cfg.yaml'}: top level must be a mapping")
    assert msg.endswith(f"got {got}")


@pytest.mark.parametrize("bad", ["train.epochs", "=3", "train.epochs 3"])
def test_malformed_override(tmp_path, bad):
    msg = error_of(tmp_path, "name: x\n", [bad])
    assert msg == f"--set {bad!r}: expected KEY=VALUE, e.g. train.epochs=3"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epoch=3", "--set train.epoch=3: train.epoch: unknown key "
                          "(did you mean 'train.epochs'?)"),
        ("trian.epochs=3", "--set trian.epochs=3: trian: unknown key (did you mean 'train'?)"),
        ("name.x=3", "--set name.x=3: name.x: unknown key (name is a value, not a section)"),
        ("train.seed=3", "--set train.seed=3: train.seed: unknown key (did you mean 'seed'?)"),
        ("train.epochs=three", "--set train.epochs=three: train.epochs: expected int, "
                               "got str 'three'"),
        ("train.epochs=[1", "--set train.epochs=[1: train.epochs: cannot parse value '[1'"),
    ],
)
def test_override_errors_name_override_and_key(tmp_path, override, message):
    assert error_of(tmp_path, "name: x\n", [override]).startswith(message)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.epochs=0", "train.epochs"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.lr=0", "train.lr"),
        ("train.lr=-0.1", "train.lr"),
        ("train.lr=.nan", "train.lr"),
        ("train.momentum=1", "train.momentum"),
        ("train.momentum=-0.1", "train.momentum"),
        ("train.weight_decay=-1e-4", "train.weight_decay"),
        ("train.loss=hinge", "train.loss"),
        ("train.schedule=step", "train.schedule"),
        ("train.milestones=[0.5, 0.3]", "train.milestones"),
        ("train.milestones=[0, 0.5]", "train.milestones"),
        ("train.milestones=[0.5, 1.0]", "train.milestones"),
        ("train.milestones=[50, 40]", "train.milestones"),
        ("train.milestones=[10.5]", "train.milestones"),
        ("train.milestones=[10, 400]", "train.milestones"),
        ("train.tpt_accuracy=0", "train.tpt_accuracy"),
        ("train.tpt_accuracy=1.001", "train.tpt_accuracy"),
        ("data.pad_to=0", "data.pad_to"),
        ("model.classifier_init_scale=-1", "model.classifier_init_scale"),
        ("train.gamma=0", "train.gamma"),
        ("train.device=gpu", "train.device"),
        ("train.device=cuda:", "train.device"),
        ("snapshot.dtype=bfloat16", "snapshot.dtype"),
        ("snapshot.splits=[]", "snapshot.splits"),
        ("snapshot.splits=[val]", "snapshot.splits"),
        ("snapshot.splits=[train, train]", "snapshot.splits"),
        ("data.samples_per_class=0", "data.samples_per_class"),
        ("data.num_classes=1", "data.num_classes"),
        ("data.train_per_class=0", "data.train_per_class"),
        ("data.test_per_class=0", "data.test_per_class"),
        ("data.channels=0", "data.channels"),
        ("data.image_size=0", "data.image_size"),
        ("model.width=0", "model.width"),
        ("seed=-1", "seed"),
        ("name=' '", "name"),
        ("snapshot.epochs=[1, 99]", "snapshot.epochs"),
        ("snapshot.epochs=log:1", "snapshot.epochs"),
        ("snapshot.epochs=every:5", "snapshot.epochs"),
    ],
)
def test_invalid_value_names_key(tmp_path, override, key):
    path = write(tmp_path, "train: {epochs: 20}\n")
    msg = error_of(tmp_path, "train: {epochs: 20}\n", [override])
    assert msg.startswith(f"{path}: {key}: "), msg


def test_validate_message_is_exact():
    cfg = Config()
    cfg.train.momentum = 1.0
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert str(info.value) == "train.momentum: must be in [0, 1), got 1.0"


def test_validate_checks_types_of_a_config_built_in_code():
    cfg = Config()
    cfg.train.epochs = "3"
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert str(info.value) == "train.epochs: expected int, got str '3'"


def test_valid_edge_values_pass():
    cfg = Config()
    cfg.train.momentum = 0.0
    cfg.train.weight_decay = 0.0
    cfg.train.milestones = []
    cfg.train.epochs = 1
    cfg.snapshot.epochs = "log:30"
    cfg.snapshot.splits = ["test", "train"]
    validate(cfg)


# ---------------------------------------------------------------------------------------
# Snapshot schedule


def test_schedule_all_and_list():
    assert snapshot_epochs("all", 4) == [1, 2, 3, 4]
    assert snapshot_epochs([5, 1, 5, 3], 5) == [1, 3, 5]


def test_schedule_log_decades():
    assert snapshot_epochs("log:4", 1000) == [1, 10, 100, 1000]
    assert snapshot_epochs("log:3", 10000) == [1, 100, 10000]


@given(epochs=st.integers(1, 3000), count=st.integers(2, 200))
@settings(max_examples=300, deadline=None)
def test_schedule_log_properties(epochs, count):
    sched = snapshot_epochs(f"log:{count}", epochs)
    assert sched[0] == 1 and sched[-1] == epochs
    assert len(sched) == min(count, epochs)
    assert all(a < b for a, b in itertools.pairwise(sched))
    # independent reference: where rounding a geomspace collides nothing, it is the schedule
    ref = np.unique(np.rint(np.geomspace(1, epochs, count)).astype(int))
    if len(ref) == count:
        assert sched == ref.tolist()


def test_schedule_log_fills_collisions_with_nearest_unused():
    # geomspace(1, 10, 8) rounds to 1 1 2 3 4 5 7 10: one collision near 1
    assert snapshot_epochs("log:8", 10) == [1, 2, 3, 4, 5, 6, 7, 10]
    assert snapshot_epochs("log:50", 10) == list(range(1, 11))


EXPECTED = "snapshot.epochs: expected 'all', 'log:K', 'papyan' or a list of ints,"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("log:1", "snapshot.epochs: log:K needs K >= 2"),
        ("log:x", f"{EXPECTED} got 'log:x'"),
        ("every", f"{EXPECTED} got 'every'"),
        ([], "snapshot.epochs: empty list"),
        ([0, 3], "snapshot.epochs: epoch 0 is outside [1, 10]"),
        ([11], "snapshot.epochs: epoch 11 is outside [1, 10]"),
        ([1, True], "snapshot.epochs: list items must be ints, got True"),
        (3.5, f"{EXPECTED} got 3.5"),
    ],
)
def test_schedule_errors_name_key(spec, message):
    with pytest.raises(ConfigError) as info:
        snapshot_epochs(spec, 10)
    assert str(info.value).startswith(message)


# ---------------------------------------------------------------------------------------
# Diff


def test_diff_configs_lines_and_ignore():
    a = Config()
    b = dataclasses.replace(a, train=dataclasses.replace(a.train, lr=0.1, device="cpu"),
                            snapshot=dataclasses.replace(a.snapshot, epochs=[1, 2]))
    assert diff_configs(a, a) == []
    assert diff_configs(a, b) == [
        "train.lr: 0.05 -> 0.1",
        "train.device: auto -> cpu",
        "snapshot.epochs: log:30 -> [1, 2]",
    ]
    assert diff_configs(a, b, ignore=["train.device", "snapshot"]) == ["train.lr: 0.05 -> 0.1"]


def test_saved_yaml_is_plain(tmp_path):
    save_config(Config(), tmp_path / "c.yaml")
    data = yaml.safe_load((tmp_path / "c.yaml").read_text())
    assert list(data) == ["name", "seed", "data", "model", "train", "snapshot"]
    assert math.isclose(data["train"]["milestones"][0], 1 / 3, rel_tol=0, abs_tol=0)


# ---------------------------------------------------------------------------------------
# Learning-rate milestones: fractions of the run, or whole epochs


def test_paper_configs_shortened_keep_the_schedule_shape():
    """The example of `nctools train --help`: 30 epochs drop at 10 and 20 (floor(30/3),
    floor(60/3)); the full 350 give the notebook's 350 // 3 = 116 and 700 // 3 = 233."""
    from nctools.config.schema import milestone_epochs

    grid = Path(__file__).resolve().parents[2] / "configs" / "papyan2020"
    short = load_config(grid / "mnist-resnet18.yaml", ["train.epochs=30"])
    assert short.train.milestones == ["1/3", "2/3"]
    assert milestone_epochs(short.train.milestones, 30) == [10, 20]
    full = load_config(grid / "mnist-resnet18.yaml")
    assert milestone_epochs(full.train.milestones, full.train.epochs) == [116, 233]
    imagenet = load_config(grid / "imagenet-resnet50.yaml")
    assert milestone_epochs(imagenet.train.milestones, imagenet.train.epochs) == [100, 200]
    assert milestone_epochs(imagenet.train.milestones, 31) == [10, 20]


@pytest.mark.parametrize(("milestones", "epochs", "expected"), [
    (["1/3", "2/3"], 350, [116, 233]),  # floor, not round (117)
    (["1/3", "2/3"], 300, [100, 200]),
    ([1 / 3, 2 / 3], 300, [100, 200]),  # the default's floats are thirds exactly
    ([1 / 3, 2 / 3], 10, [3, 6]),
    ([0.333333, 0.666667], 350, [116, 233]),
    ([0.333333, 0.666667], 300, [99, 200]),  # six decimals are not a third
    ([0.5], 400, [200]), ([0.75], 100, [75]),  # configs/demo.yaml, minority-collapse.yaml
    (["1/3"], 2, [1]),  # never before the first epoch
    ([116, 233], 350, [116, 233]), ([116, 233], 1000, [116, 233]),  # whole epochs stay
    ([" 1 / 4 ", "3/4"], 8, [2, 6]),
])
def test_milestone_epochs(milestones, epochs, expected):
    from nctools.config.schema import milestone_epochs

    assert milestone_epochs(milestones, epochs) == expected
    cfg = Config()
    cfg.train.epochs, cfg.train.milestones = epochs, milestones
    validate(cfg)


FRACTIONS_OR_EPOCHS = ("fractions of the run in (0, 1) (1/3 or 0.5), or whole epochs in "
                      "[1, train.epochs)")


@pytest.mark.parametrize(("milestones", "shown"), [
    ("['1/3', x]", "['1/3', 'x']"), ("[1/0]", "['1/0']"), ("[3/3]", "['3/3']"),
    ("[1/3, 200]", "['1/3', 200.0]"), ("[0/3]", "['0/3']"), ("[-1/3]", "['-1/3']"),
    ("[.inf]", "[inf]"),
])
def test_bad_milestones_name_the_key(tmp_path, milestones, shown):
    message = error_of(tmp_path, "train: {epochs: 300}\n", [f"train.milestones={milestones}"])
    assert message.endswith(f"train.milestones: must be {FRACTIONS_OR_EPOCHS}, got {shown}")


def test_decreasing_milestones_are_refused(tmp_path):
    message = error_of(tmp_path, "train: {milestones: [2/3, 0.5]}\n")
    assert message.endswith("train.milestones: must be increasing, got ['2/3', 0.5]")


def _alias_bomb(levels: int, width: int) -> str:
    """``train.milestones``: a list whose every level repeats the previous one ``width``
    times by alias (``width ** levels`` leaves from (levels - 1) * width aliases)."""
    rows = [f"    - &l0 [{', '.join(['lol'] * width)}]"]
    for level in range(1, levels):
        rows.append(f"    - &l{level} [{', '.join([f'*l{level - 1}'] * width)}]")
    return "train:\n  milestones:\n" + "\n".join(rows) + "\n"


def test_yaml_alias_bomb_is_refused_naming_the_file(tmp_path):
    """A "billion laughs" config: 5 levels of 30 aliases (24 million leaves) is refused at
    its 101st alias, on line 7, before anything walks the values."""
    path = write(tmp_path, _alias_bomb(levels=5, width=30))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (f"{path}: line 7: more than 100 YAML aliases (*name); refused "
                               "(nested aliases can take gigabytes of memory)")
    # 100 aliases are within the budget: the file reaches the type check
    message = error_of(tmp_path, _alias_bomb(levels=2, width=100))
    assert message.startswith(f"{tmp_path / 'cfg.yaml'}: train.milestones: expected list of")
    item = "train.milestones=[&a [1], " + ", ".join(["*a"] * 101) + "]"
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "name: x\n"), [item])
    assert str(info.value) == (f"--set {item}: train.milestones: more than 100 YAML aliases "
                               "(*name); refused (nested aliases can take gigabytes of memory)")
