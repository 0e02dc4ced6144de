"""Run folders: how a run folder is named, which folders are runs, which run a command picks, and what a
run holds. No torch here.

A run folder (``artifacts/runs/<name>``) is one whose ``config.json`` training wrote; it is finished once
``test_metrics.json`` is there. ``best_run`` and ``default_runs`` pick runs by validation accuracy, and
``run_lock`` keeps two processes from training the same folder at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
from collections.abc import Iterator
from pathlib import Path

from . import regimes
from .errors import DogkitError
from .text import shown
from .variants import base, derived

DEFAULT_RUNS_DIR = Path("artifacts/runs")
# The study's baselines, in the report folder: `dogkit study` writes it, the report reads it.
BASELINES_FILE = "baselines.json"
MAX_NAME = 100  # characters of a run name: room for the "-N" of a taken one within any file system's limit


def read_json(path: Path) -> dict | None:
    """A JSON file a run wrote, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def run_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a run folder, or None: it must be one plain folder name, so that the run lands
    in --runs-dir (``../x`` or ``a/b`` would put it elsewhere) and prints as it is."""
    if not name.strip():
        return "must be a folder name, got an empty one"
    if name in (".", "..") or "/" in name or "\\" in name:
        return f"must be one folder name inside --runs-dir, without / or \\ and not . or ..; got '{shown(name)}'"
    if shown(name) != name:
        return f"must be printable (no control characters or bidi overrides, UTF-8); got '{shown(name)}'"
    if len(name) > MAX_NAME:
        return f"must be at most {MAX_NAME} characters, got {len(name)}"
    return None


def resume_command(run_dir: Path | str) -> str:
    """The command that continues the run in ``run_dir``, ready to paste into a shell."""
    return f"dogkit train --resume {shlex.quote(shown(run_dir))}"


def new_run_dir(runs_dir: Path | str, *, name: str | None, exp: int | None, arch: str) -> Path:
    """Creates and returns ``<runs_dir>/<name>`` (by default ``exp<N>-<arch>``, or ``<arch>`` outside the
    presets), or ``<name>-2``, ``-3`` … when taken: a finished or different run is never overwritten. The
    folder is claimed by creating it, so two runs started at once with one name get two folders."""
    arch = arch.replace("/", "-")  # timm/<name> → timm-<name>: one folder
    base = name or (f"exp{exp}-{arch}" if exp else arch)
    if problem := run_name_problem(base):
        raise DogkitError(f"run name {problem}")
    runs = Path(runs_dir)
    runs.mkdir(parents=True, exist_ok=True)
    candidate, k = runs / base, 2
    while True:
        try:
            candidate.mkdir()  # atomic: exactly one process succeeds for each name
            return candidate
        except FileExistsError:
            candidate, k = runs / f"{base}-{k}", k + 1


def is_run(path: Path) -> bool:
    """A dogkit run folder, finished or not: training wrote its resolved ``config.json`` there first."""
    return (Path(path) / "config.json").is_file()


def run_folders(runs_dir: Path) -> list[Path]:
    """The folders directly under ``runs_dir``, in name order (the candidates for a run)."""
    return sorted(p for p in Path(runs_dir).glob("*") if p.is_dir())


def run_score(run_dir: Path) -> float | None:
    """Validation top-1 of the run's best model, from test_metrics.json (written when a run finishes)."""
    try:
        report = json.loads((run_dir / "test_metrics.json").read_text(encoding="utf-8"))
        return float(report["best"]["val"]["accuracy"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_data(run_dir: Path | None) -> Path | None:
    """The prepared dataset the run was trained on, from its config.json; None when unknown."""
    try:
        return Path(json.loads((run_dir / "config.json").read_text())["data"]) if run_dir else None
    except (OSError, ValueError, KeyError):
        return None


def best_run(runs_dir: Path = DEFAULT_RUNS_DIR, need: str = "best.pt") -> Path:
    """The finished run with the highest validation accuracy that holds ``need`` (e.g. model.onnx)."""
    runs_dir = Path(runs_dir)
    scored = []
    for run in run_folders(runs_dir):
        score = run_score(run)
        if score is not None and (run / need).is_file():
            scored.append((score, run.name, run))
    if not scored:
        what = "trained runs" if need == "best.pt" else f"runs with {need}"
        hint = "dogkit train --exp 1" if need == "best.pt" else "dogkit export"
        raise DogkitError(f"no finished {what} in {shown(runs_dir)}; run `{hint}` first, or name one explicitly")
    return max(scored)[2]


def default_runs(runs_dir: Path) -> list[Path]:
    """For each regime, its finished run with the best validation accuracy."""
    best: dict[int, tuple[float, Path]] = {}
    for run in run_folders(runs_dir):
        score, config = run_score(run), read_json(run / "config.json")
        if score is None or not config or regimes.regime(config.get("exp")) is None:
            continue
        if config["exp"] not in best or score > best[config["exp"]][0]:
            best[config["exp"]] = (score, run)
    if not best:
        first, *rest = regimes.numbers()
        raise DogkitError(f"no finished runs in {shown(runs_dir)}; train with `dogkit train --exp {first}` "
                          f"({', '.join(map(str, rest))}) first")
    return [best[k][1] for k in sorted(best)]


def exported_model(run: Path | None, runs_dir: Path = DEFAULT_RUNS_DIR) -> Path:
    """The run's ``model.onnx``; without a run, that of the best finished run, the one every command takes by
    default (``eval --backend torch`` its best.pt): a better run not exported yet is named, not passed over."""
    run = run or best_run(runs_dir, need="best.pt")
    if not (run / "model.onnx").is_file():
        raise DogkitError(f"{shown(run)} has no model.onnx; `dogkit export {shown(run)}` writes it (or pass --model)")
    return run / "model.onnx"


def model_run(model: Path, need: str = "config.json") -> Path | None:
    """The run folder a model file sits in, when that folder holds ``need`` (``config.json``: it is a run;
    ``best.pt``: its PyTorch model is there too); else None (a model copied elsewhere)."""
    return model.parent if (model.parent / need).is_file() else None


def _export_report(run: Path) -> dict | None:
    """export.json when model.onnx is newer than best.pt and came from an export that fitted its calibration (one
    made before exports did is not current: it has no temperature, threshold or maps)."""
    try:
        report = json.loads((run / "export.json").read_text())
        fresh = (run / base().file).stat().st_mtime >= (run / "best.pt").stat().st_mtime
    except (OSError, ValueError):
        return None
    return report if fresh and isinstance(report, dict) and "calibration" in report else None


def fp32_export_current(run: Path) -> bool:
    return _export_report(run) is not None


def export_current(run: Path) -> bool:
    """``fp32_export_current``, with the outcome of each derived model the study asks for (INT8: the model with its
    own calibration, or why there is none; one from an export that copied fp32's calibration is not current)."""
    report = _export_report(run)
    return report is not None and all(
        report.get(v.name) is not None and ("error" in report[v.name] or (
            (run / v.file).is_file() and "calibration" in report[v.name]))
        for v in derived() if v.study)


LOCK_NAME = ".lock"


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``<run>/.lock`` while training, so a second process (say, a ``--resume`` started while the
    first still runs) stops with a clear error instead of writing the same checkpoints.

    An OS lock, not a marker file: it is released when the process ends, however it ends, so a killed run never
    leaves its folder locked. A POSIX record lock (lockf), not flock: the data loader's worker processes, forked
    with the lock's file open, do not hold it, so a resume started right after a kill does not find the folder
    locked by workers still winding down. Under torchrun only process 0 takes it."""
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        yield
        return
    run_dir = Path(run_dir)
    fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            raise DogkitError(f"{shown(run_dir)} is being trained by process {holder} right now; wait for it to finish "
                              "or stop it before resuming (two processes would overwrite each other's "
                              "checkpoints)") from e
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
