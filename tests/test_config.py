import json
from pathlib import Path

import pytest

from dogkit.errors import DogkitError
from dogkit.training.config import PRESETS, TrainConfig, load_config, parse_set, resolve_config


def test_presets_define_the_three_regimes():
    one, two, three = (resolve_config(k) for k in (1, 2, 3))
    assert (one.pretrained, one.optimizer, one.schedule) == (True, "adam", "cosine")
    assert (two.pretrained, two.optimizer, two.schedule, two.avg_window, two.avg_ema) == (
        True, "averaged-adam", "constant", 1000, [0.99, 0.999])
    assert (three.pretrained, three.optimizer, three.augment) == (False, "adam", "strong")
    assert three.epochs > one.epochs and three.warmup_epochs > 0 and three.label_smoothing > 0
    assert resolve_config(2).arch == "resnet50"
    assert set(PRESETS) == {1, 2, 3}


def test_file_then_command_line_override_the_preset(tmp_path: Path):
    yml = tmp_path / "run.yaml"
    yml.write_text("lr: 0.0003\nepochs: 4\navg_ema: [0.9]\ncrop: boxes\n")
    cfg = resolve_config(2, yml, parse_set(["epochs=6", "avg-window=50"]))
    assert (cfg.lr, cfg.epochs, cfg.avg_ema, cfg.avg_window, cfg.crop) == (3e-4, 6, [0.9], 50, "boxes")
    toml = tmp_path / "run.toml"
    toml.write_text('exp = 3\narch = "resnet18"\nweights = "none"\ncompile = true\n')
    cfg = resolve_config(None, toml)
    assert (cfg.exp, cfg.arch, cfg.weights, cfg.compile, cfg.pretrained) == (3, "resnet18", None, True, False)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"weight_decy": 0.1}, "unknown setting 'weight_decy' in the command line (did you mean 'weight_decay'?)"),
        ({"optimizer": "adamm"}, "did you mean 'adam'"),
        ({"schedule": "cosin"}, "did you mean 'cosine'"),
        ({"epochs": "three"}, "bad value for epochs"),
        ({"epochs": 0}, "epochs must be at least 1"),
        ({"pretrained": "maybe"}, "not a boolean"),
    ],
)
def test_typos_and_bad_values_get_clear_errors(overrides, message):
    with pytest.raises(DogkitError) as info:
        resolve_config(1, None, overrides)
    assert message in str(info.value)


def test_typo_in_a_file_names_the_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("label_smoothng: 0.1\n")
    expected = r"unknown setting 'label_smoothng' in .*bad.yaml \(did you mean 'label_smoothing'"
    with pytest.raises(DogkitError, match=expected):
        resolve_config(1, bad)


def test_averaged_adam_needs_a_constant_learning_rate():
    with pytest.raises(DogkitError, match="constant learning rate"):
        resolve_config(2, None, {"schedule": "cosine"})


def test_saved_config_round_trips(tmp_path: Path):
    cfg = resolve_config(2, None, {"lr": 2e-4, "avg_ema": "0.95,0.995"})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert load_config(path) == cfg
    assert isinstance(load_config(path), TrainConfig)
    # The report's promise: `dogkit train --config <run>/config.json` repeats the run's settings.
    assert resolve_config(None, path) == cfg


def test_resume_accepts_only_settings_that_do_not_change_what_the_run_computes():
    from dogkit.training.config import resume_config

    saved = resolve_config(1, None, {"epochs": 10})
    longer = resume_config(saved, parse_set(["epochs=20", "workers=4", "sync_every=10"]), done_epochs=10)
    assert (longer.epochs, longer.workers, longer.sync_every, longer.lr) == (20, 4, 10, saved.lr)
    assert resume_config(saved, {"lr": saved.lr}, done_epochs=3) == saved  # the same value is no change
    with pytest.raises(DogkitError) as info:
        resume_config(saved, {"lr": 3e-4, "seed": 5, "epochs": 12}, done_epochs=3)
    assert str(info.value).startswith("lr, seed cannot change on --resume: they define the run")
    assert "can change only --epochs, --workers, --device, --compile and, with --set, sync_every" in str(info.value)
    with pytest.raises(DogkitError, match="has done 6 epochs already"):
        resume_config(saved, {"epochs": 5}, done_epochs=6)


def test_the_plateau_schedule_refuses_a_warm_up_instead_of_ignoring_it():
    with pytest.raises(DogkitError, match="plateau schedule has no warm-up"):
        resolve_config(1, None, {"schedule": "plateau"})  # preset 1 warms up for an epoch
    assert resolve_config(1, None, {"schedule": "plateau", "warmup_epochs": 0}).schedule == "plateau"


def test_the_step_schedule_warms_up_then_matches_torch_steplr():
    import torch

    from dogkit.training.optim import build_scheduler

    def rates(cfg, steps_per_epoch=5, epochs=9):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
        scheduler, when = build_scheduler(cfg, opt, steps_per_epoch)
        assert when == "step"
        out = []
        for _ in range(steps_per_epoch * epochs):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            scheduler.step()
        return out

    cfg = resolve_config(1, None, {"schedule": "step", "step_size": 3, "gamma": 0.5, "warmup_epochs": 0,
                                   "lr": 0.1})
    reference_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    reference = torch.optim.lr_scheduler.StepLR(reference_opt, step_size=3, gamma=0.5)  # stepped per epoch
    expected = []
    for _ in range(9):
        expected += [reference_opt.param_groups[0]["lr"]] * 5
        reference_opt.step()
        reference.step()
    assert rates(cfg) == pytest.approx(expected, rel=1e-12)
    warm = rates(resolve_config(1, None, {"schedule": "step", "step_size": 3, "gamma": 0.5, "warmup_epochs": 1,
                                          "lr": 0.1}))
    assert warm[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])  # the warm-up is no longer ignored
    assert warm[5:] == pytest.approx(expected[5:])


def test_a_study_names_a_finished_run_it_keeps_with_other_settings(tmp_path: Path, capsys):
    from dogkit.study import _warn_if_other_settings

    cfg = resolve_config(1, None, {"lr": 3e-4})
    (tmp_path / "config.json").write_text(json.dumps({**cfg.to_dict(), "lr": 1e-4, "workers": 3}))
    _warn_if_other_settings(cfg, tmp_path)
    err = capsys.readouterr().err
    assert "trained with other settings: lr 0.0001 (now 0.0003)" in err and "workers" not in err
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    _warn_if_other_settings(cfg, tmp_path)
    assert "other settings" not in capsys.readouterr().err


def test_a_config_file_that_does_not_parse_names_the_line_and_column(tmp_path: Path):
    cases = {"run.toml": ('epochs = 3\nlr = \n', "Invalid value at line 2, column 6"),
             "run.json": ('{"epochs": 3,\n "lr": }', "Expecting value at line 2, column 8"),
             "run.yaml": ("epochs: 3\nlr: 1e-4: 2\n", "mapping values are not allowed here at line 2, column 9")}
    for name, (text, problem) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DogkitError) as info:
            resolve_config(1, tmp_path / name)
        assert str(info.value) == f"cannot read config {tmp_path / name}: {problem}"


def test_a_run_name_from_a_file_must_stay_inside_the_runs_folder(tmp_path: Path):
    (tmp_path / "run.yaml").write_text("name: ../../elsewhere\n")
    with pytest.raises(DogkitError, match="name .the run folder. must be one folder name inside --runs-dir"):
        resolve_config(1, tmp_path / "run.yaml")
