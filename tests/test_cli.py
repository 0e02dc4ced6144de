import csv
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

from imagegen import encode, pattern


def run_dogkit(*args: str, env_extra: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "dogkit", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def test_prepare_prints_a_summary_and_the_next_step(tmp_path: Path):
    for k, name in enumerate(("cats", "dogs")):
        (tmp_path / "src" / name).mkdir(parents=True)
        for i in range(6):
            (tmp_path / "src" / name / f"{i}.jpg").write_bytes(encode(pattern(seed=10 * k + i), "JPEG"))
    (tmp_path / "src" / "dogs" / "broken.jpg").write_bytes(b"")
    proc = run_dogkit("prepare", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--cache", "32")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout + proc.stderr
    # 12 good images of 2 classes split 70/15/15 per class (6 → 4/1/1), the empty file rejected with its reason.
    for label, count in (("train", 8), ("val", 2), ("test", 2), ("total", 12), ("classes", 2), ("rejected files", 1)):
        assert re.search(rf"^\W*{label}\W+{count}\W*$", text, re.MULTILINE), (label, count, text)
    assert re.search(r"^\s*1\s+empty file$", text, re.MULTILINE)
    assert f"Image cache {tmp_path / 'out' / 'cache' / '32px-none'}" in text
    assert text.rstrip().endswith(f"Next: dogkit train --exp 1 --data {tmp_path / 'out'}")
    with open(tmp_path / "out" / "manifest.csv", newline="") as f:
        splits = Counter(row["split"] for row in csv.DictReader(f))
    assert splits == {"train": 8, "val": 2, "test": 2}  # the summary tells what was written
    again = run_dogkit("prepare", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "out"))
    assert again.returncode == 0 and "up to date" in again.stdout + again.stderr


def test_errors_are_one_clean_line_not_a_traceback(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    proc = run_dogkit("prepare", "--source", str(tmp_path / "empty"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "no class folders" in proc.stderr and "Traceback" not in proc.stderr


def test_offline_download_says_how_to_use_source(tmp_path: Path, closed_port: int):
    proc = run_dogkit("prepare", "--out", str(tmp_path / "out"),
                      env_extra={"DOGKIT_STANFORD_DOGS_URL": f"http://127.0.0.1:{closed_port}/"})
    assert proc.returncode == 2
    assert "--source" in proc.stderr and "Traceback" not in proc.stderr


def test_help_reads_like_a_unix_usage_line():
    proc = run_dogkit("predict", "--help", env_extra={"COLUMNS": "100"})
    assert proc.returncode == 0, proc.stderr
    # The required argument as each Typer writes it ({PATHS}... since 0.2x, PATHS before); flags take no value, so
    # show no type; options show theirs (<int> since 0.2x, INTEGER before).
    assert re.search(r"Usage: dogkit predict \[OPTIONS\] (\{PATHS\}\.\.\.|PATHS)\n", proc.stdout), proc.stdout
    assert "<bool>" not in proc.stdout and "╭" not in proc.stdout  # plain help, no panels
    assert re.search(r"--json\s+Predictions as JSON", proc.stdout)
    assert re.search(r"--top-k (<int>|INTEGER)\s+Breeds to list per image", proc.stdout)


def test_the_cli_patches_nothing_in_typer():
    import typer.core

    before = {k: getattr(typer.core.TyperOption, k, None) for k in dir(typer.core.TyperOption)}
    before_arg = {k: getattr(typer.core.TyperArgument, k, None) for k in dir(typer.core.TyperArgument)}
    import importlib

    import dogkit.cli

    importlib.reload(dogkit.cli)
    assert before == {k: getattr(typer.core.TyperOption, k, None) for k in dir(typer.core.TyperOption)}
    assert before_arg == {k: getattr(typer.core.TyperArgument, k, None) for k in dir(typer.core.TyperArgument)}


def test_other_tools_setting_names_and_a_missing_exp_are_explained(tmp_path: Path, capsys):
    for typo, meant in (("learnin_rate", "lr"), ("imgsz", "image_size"), ("patiance", "early_stopping")):
        code, err = run_main(capsys, "train", "--exp", "1", "--set", f"{typo}=1")
        assert code == 2 and f"unknown setting '{typo}'" in err and "Traceback" not in err, err
        assert f"(did you mean '{meant}'?)" in err
    # Without --exp the run is none of the regimes: said before anything else happens (here: no dataset).
    code, err = run_main(capsys, "train", "--data", str(tmp_path / "nothing"), "--runs-dir", str(tmp_path / "runs"))
    assert code != 0
    assert "no --exp: training dogkit's base settings (resnet50, ImageNet weights, adam 0.0001, cosine, 15 " \
           "epochs), none of the study's three regimes" in " ".join(err.split())


# ----------------------------------------------------------------------------- train's options, --resume, regimes


def run_main(capsys, *args: str) -> tuple[int, str]:
    """`dogkit ARGS…` in this process: exit code and stderr."""
    import pytest

    from dogkit.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
        raise SystemExit(0)
    return exit_info.value.code or 0, capsys.readouterr().err


def fake_trainer(monkeypatch) -> list[dict]:
    """Replaces the trainer (and with it torch): each call's arguments are kept, and it returns an unfinished run."""
    import types

    calls = []

    def train(cfg=None, *, resume=None, overrides=None):
        calls.append({"cfg": cfg, "resume": resume, "overrides": overrides})
        return types.SimpleNamespace(run_dir=Path("run"), finished=False)

    monkeypatch.setitem(sys.modules, "dogkit.training.trainer", types.SimpleNamespace(train=train))
    return calls


def test_train_options_and_the_settings_table_cover_every_config_field():
    """Each option of `dogkit train` sets the TrainConfig field of its name and defaults to "not given"; the
    settings table of docs/training.md lists every field, with its option where it has one."""
    import dataclasses

    import typer.main

    from dogkit.cli import app
    from dogkit.training.config import TrainConfig

    command = typer.main.get_command(app).commands["train"]
    options = {p.name: p for p in command.params if p.name not in ("exp", "config", "resume", "devices", "set_")}
    settings = {f.name for f in dataclasses.fields(TrainConfig)} - {"exp"}
    assert set(options) <= settings
    for name, option in options.items():
        flag = "--" + name.replace("_", "-")
        assert flag in option.opts and option.default is None, name
    table = (Path(__file__).parents[1] / "docs" / "training.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `(\w+)` \| (`--[\w-]+`)? ?\|", table, re.M))
    assert set(rows) == settings
    assert {k for k, flag in rows.items() if flag} == set(options)
    assert all(flag == f"`--{k.replace('_', '-')}`" for k, flag in rows.items() if flag)


def test_every_train_option_reaches_the_config(tmp_path: Path, capsys, monkeypatch):
    calls = fake_trainer(monkeypatch)
    code, err = run_main(capsys, "train", "--exp", "2", "--workers", "3", "--device", "mps", "--compile",
                         "--data", str(tmp_path / "data/"), "--lr", "3e-4", "--set", "avg_window=50")
    assert code == 0, err
    cfg = calls[0]["cfg"]
    assert (cfg.workers, cfg.device, cfg.compile, cfg.data, cfg.lr, cfg.avg_window, cfg.optimizer) == (
        3, "mps", True, str(tmp_path / "data"), 3e-4, 50, "averaged-adam")
    code, err = run_main(capsys, "train", "--lr", "nan")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "lr must be a finite number" in err


def saved_run(tmp_path: Path) -> Path:
    from dogkit.training.config import resolve_config

    run = tmp_path / "run"
    run.mkdir()
    cfg = resolve_config(1, None, {"data": str(tmp_path / "data"), "runs_dir": str(tmp_path)})
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    return run


def test_resume_takes_what_a_resumed_run_may_change(tmp_path: Path, capsys, monkeypatch):
    calls, run = fake_trainer(monkeypatch), saved_run(tmp_path)
    code, err = run_main(capsys, "train", "--resume", str(run), "--epochs", "20", "--workers", "2", "--device", "cpu",
                         "--no-compile", "--lr", "1e-4", "--set", "sync_every=10", "--set", "tensorboard=true")
    assert code == 0, err
    assert calls == [{"cfg": None, "resume": run, "overrides": {
        "epochs": 20, "workers": 2, "device": "cpu", "compile": False, "lr": 1e-4,  # the saved lr: no change
        "sync_every": "10", "tensorboard": "true"}}]


def test_resume_refuses_what_defines_the_run_by_name_before_anything_is_written(tmp_path: Path, capsys,
                                                                                monkeypatch):
    calls, run = fake_trainer(monkeypatch), saved_run(tmp_path)
    for args, names in ((["--lr", "3e-4"], "--lr cannot change on --resume: it defines the run"),
                        (["--set", "seed=4", "--batch-size", "8", "--epochs", "30"],
                         "--batch-size, --set seed cannot change on --resume: they define the run"),
                        (["--data", str(tmp_path / "other")], "--data cannot change")):
        code, err = run_main(capsys, "train", "--resume", str(run), *args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {names}"), err
        assert "can change only --epochs, --workers, --device, --compile" in lines[0]
    assert calls == [] and sorted(p.name for p in run.iterdir()) == ["config.json"]  # not even a lock file


def test_a_regime_added_to_the_table_is_one_everywhere(tmp_path: Path, capsys, monkeypatch):
    from dogkit import regimes
    from dogkit.analysis.report import Run
    from dogkit.runs import default_runs
    from dogkit.training.config import PRESETS, resolve_config

    monkeypatch.setitem(regimes.TABLE, 4, regimes.Regime(4, "from scratch + SGD", {
        "pretrained": False, "optimizer": "sgd", "lr": 0.05, "epochs": 30}))
    calls = fake_trainer(monkeypatch)
    code, err = run_main(capsys, "train", "--exp", "4")
    assert code == 0, err
    assert (calls[0]["cfg"].exp, calls[0]["cfg"].optimizer, calls[0]["cfg"].lr) == (4, "sgd", 0.05)
    assert list(PRESETS) == [1, 2, 3, 4] and resolve_config(4).pretrained is False
    code, err = run_main(capsys, "train", "--exp", "5")
    assert code == 2 and "--exp must be 1, 2, 3 or 4, got 5" in err, err
    assert Run(tmp_path / "r4", {"exp": 4}, {}, [], {}).label == "4: from scratch + SGD — r4"
    (tmp_path / "r4").mkdir()
    (tmp_path / "r4" / "config.json").write_text('{"exp": 4}')
    (tmp_path / "r4" / "test_metrics.json").write_text('{"best": {"val": {"accuracy": 0.5}}}')
    assert default_runs(tmp_path) == [tmp_path / "r4"]  # a run of regime 4 is a regime's run
    from dogkit.analysis.report import caveat

    assert "regimes (1 and 2)" in caveat()  # 4 starts from scratch
