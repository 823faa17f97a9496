"""The training settings exist once: flags, widget fields, plans and the search derive from
TrainConfig's field metadata."""

from __future__ import annotations

import dataclasses

import pytest

from napari_meshchop.cli import build_parser
from napari_meshchop.cli.train import train_config
from napari_meshchop.errors import InputError, MeshchopError
from napari_meshchop.studies import plan as plan_mod
from napari_meshchop.studies import space
from napari_meshchop.training import config as _config
from napari_meshchop.training.config import TrainConfig, load_params


def _parse(*argv):
    return build_parser().parse_args(list(argv))


def test_every_flagged_setting_is_a_flag_of_train_experiment_and_hpo_with_its_default():
    flagged = [n for n, (_, s) in _config.settings().items() if s.flag]
    assert {"channels", "lr", "amp", "device", "crop", "workers"} <= set(flagged)
    for command in (["train", "--out", "x"], ["experiment", "--out", "x"], ["hpo", "--out", "x"]):
        args = _parse(*command)
        for name in flagged:
            assert getattr(args, name) == _config.default(name), (command, name)
    # A flag given on the command line reaches the config, typed as the field is.
    args = _parse("train", "--out", "x", "--channels", "7", "--class-weights", "0.2", "1",
                  "--crop", "64", "--amp", "off", "--memory-gb", "3.5")
    config = train_config(args)
    assert (config.channels, config.class_weights, config.crop, config.amp,
            config.memory_gb) == (7, (0.2, 1.0), 64, "off", 3.5)


def test_choices_and_bounds_come_from_the_metadata():
    with pytest.raises(SystemExit):  # argparse refuses a device that is not a choice
        _parse("train", "--out", "x", "--device", "tpu")
    with pytest.raises(MeshchopError, match="lesion_crop_share must lie in"):
        TrainConfig(lesion_crop_share=1.5)
    with pytest.raises(MeshchopError, match="amp must be one of"):
        TrainConfig(amp="maybe")


def test_params_file_is_checked_against_the_same_fields(tmp_path):
    good = tmp_path / "good.json"
    good.write_text('{"params": {"channels": 9, "lr": 0.002}}')
    assert load_params(good) == {"channels": 9, "lr": 0.002}
    bad = tmp_path / "bad.json"
    bad.write_text('{"chanels": 9}')
    with pytest.raises(InputError, match="unknown parameters chanels"):
        load_params(bad)
    args = _parse("train", "--out", "x", "--params", str(good), "--lr", "0.005")
    config = train_config(args)
    assert (config.channels, config.lr) == (9, 0.005)  # the flag given wins over the file


def test_an_experiment_accepts_other_machine_settings_and_refuses_another_recipe(tmp_path):
    import arc_replica

    from napari_meshchop import events
    from napari_meshchop.data import arc, folds

    data = tmp_path / "arc"
    events.run(arc.download(data, source=arc_replica.build(tmp_path / "replica"),
                            folds=False))
    folds.make(data, outer=2, inner=2)
    base = TrainConfig(channels=2, epochs=1, data_dir=str(data))
    out = tmp_path / "exp"
    plan_mod.settle(out, plan_mod.plan(base, (0,), 1))
    assert set(plan_mod.HOW) == set(_config.names("machine"))
    for name in _config.names("machine"):
        value = {"device": "cpu", "activation_checkpointing": "on", "memory_gb": 2.0,
                 "workers": 1}[name]
        other = dataclasses.replace(base, **{name: value})
        settled = plan_mod.settle(out, plan_mod.plan(other, (0,), 1))
        assert getattr(settled.config, name) == value  # this session's, accepted
    for name, value in (("amp", "off"), ("lr", 0.01), ("crop", 32)):
        with pytest.raises(InputError, match=name):
            plan_mod.settle(out, plan_mod.plan(dataclasses.replace(base, **{name: value}),
                                               (0,), 1))


def test_the_search_space_and_its_flags_come_from_the_searched_settings():
    dims = space.dimensions()
    searched = {name for name, _ in dims.values()}
    assert searched == set(_config.searched()) - {"epochs"}
    args = _parse("hpo", "--out", "x", "--lr-range", "0.001", "0.01",
                  "--background-weight-range", "0.1", "0.9", "--pct-start-choices", "0.05")
    assert args.space_lr == [0.001, 0.01] and args.space_pct_start == [0.05]
    chosen = space.Space({p: getattr(args, f"space_{p}") for p in dims})
    fields = chosen.config_fields({"channels": 7, "lr": 0.002, "weight_decay": 0.001,
                                   "background_weight": 0.3, "pct_start": 0.05})
    assert fields["class_weights"] == [0.3, 1.0] and fields["channels"] == 7
    TrainConfig(**{k: v for k, v in fields.items()})  # every field a valid setting
    recipe = space.recipe(TrainConfig())
    assert not set(recipe) & (set(_config.searched()) | set(space.LOCAL))
    assert "amp" in recipe and "label_smoothing" in recipe  # shared by every trial
