"""Typed training configuration, the three experiment presets, and overrides from files and the CLI.

Resolution order: defaults → ``--exp`` preset → ``--config`` file (YAML or TOML) → command-line
options and ``--set key=value``. The resolved config is saved in the run folder and is what
``--resume`` reads back.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import shlex
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from .. import regimes
from ..atomic import writable_problem
from ..errors import DogkitError
from ..runs import is_run, run_name_problem
from ..text import not_a_file, shown

OPTIMIZERS = ("adam", "adamw", "sgd", "adamax", "averaged-adam")
SCHEDULES = ("constant", "cosine", "step", "plateau")
FREEZE_MODES = ("none", "linear-probe", "gradual")
HEAD_INITS = ("random", "imagenet")
BATCHNORM_MODES = ("train", "frozen")
AUGMENTS = ("light", "strong")
AMP_MODES = ("auto", "bf16", "fp16", "off")
MONITORS = ("loss", "accuracy")
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 2048
MAXIMA = {"epochs": 100_000, "batch_size": 65_536, "workers": 256, "accumulate": 65_536, "probe_epochs": 100_000,
          "step_size": 100_000, "avg_window": 10**9, "avg_bn_images": 10**9, "sync_every": 10**9,
          "early_stopping": 100_000, "plateau_patience": 100_000, "seed": 2**63 - 1, "max_steps_per_epoch": 10**12}
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
# torch.compile modes: reduce-overhead captures the train step in CUDA graphs (pays off on a GPU at small
# batches, where kernel launches bound the step); max-autotune also searches kernels (long warm-up).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


@dataclass
class TrainConfig:
    exp: int | None = None
    name: str | None = None
    data: str = "artifacts/data/stanford-dogs"
    runs_dir: str = "artifacts/runs"
    # model
    arch: str = "resnet50"  # a torchvision classifier, or a timm one as timm/<name>
    pretrained: bool = True
    weights: str | None = None
    dropout: float = 0.0
    # imagenet: the new head starts as the ImageNet head's rows of the dataset's synsets (class folders named
    # n########-…, as Stanford Dogs' are), so training starts where the untrained network already answers
    head_init: str = "random"
    # frozen: every BatchNorm layer normalises with its pretrained statistics (eval mode) while its scale and shift
    # still train: small batches of zoomed crops then cannot move the statistics the next layers were trained on
    batchnorm: str = "train"
    # optimisation
    optimizer: str = "adam"
    lr: float = 1e-4
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    step_size: int = 10  # step schedule: epochs between decays
    gamma: float = 0.1  # step / plateau decay factor
    plateau_patience: int = 2  # plateau: epochs without a better validation `monitor` before the rate is cut
    epochs: int = 15
    # Under torchrun the global batch is batch_size × processes × accumulate.
    batch_size: int = 64
    accumulate: int = 1  # micro-batches per optimizer step (gradient accumulation)
    label_smoothing: float = 0.0
    # linear-probe: head only for `probe_epochs`, then all; gradual: one stage more per epoch
    freeze: str = "none"
    probe_epochs: int = 1
    # On the monitored validation metric.
    early_stopping: int = 0
    monitor: str = "loss"  # validation loss (lower is better) or accuracy (higher)
    # Averaged Adam (optimizer = averaged-adam)
    avg_window: int = 1000  # M: P, made at every epoch's end, is the mean of the last M iterates (averaging.md)
    avg_ema: list[float] = field(default_factory=lambda: [0.99, 0.999])
    avg_bn_images: int = 2048  # training images used to recompute each average's BatchNorm statistics
    # data
    image_size: int = 224
    crop: str | None = None
    augment: str = "light"
    cache: bool = True  # read training images from `prepare --cache` when one is current
    workers: int | None = None
    max_steps_per_epoch: int | None = None  # cap for smoke tests
    # execution
    device: str = "auto"
    amp: str = "auto"
    channels_last: bool = True
    compile: bool = False
    compile_mode: str = "default"  # with compile: default | reduce-overhead (CUDA graphs) | max-autotune
    sync_every: int = 50  # optimizer steps between host-device synchronisations (loss, accuracy, NaN check)
    # A recovery checkpoint inside an epoch once this much training has passed since the last save (checked every
    # sync_every steps; 0 = off): an interruption then loses minutes, not an epoch. Runs with shorter epochs never
    # write one.
    recovery_minutes: float = 5.0
    sync_bn: bool = False  # under torchrun: BatchNorm statistics synchronised across processes
    deterministic: bool = False
    seed: int = 0
    tensorboard: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> TrainConfig:
        for key, allowed in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("freeze", FREEZE_MODES),
                             ("augment", AUGMENTS), ("amp", AMP_MODES), ("monitor", MONITORS),
                             ("compile_mode", COMPILE_MODES), ("head_init", HEAD_INITS),
                             ("batchnorm", BATCHNORM_MODES)):
            value = getattr(self, key)
            if value not in allowed:
                raise DogkitError(f"{key} must be one of {', '.join(allowed)}, got {value!r}{_suggest(value, allowed)}")
        if self.name is not None and (problem := run_name_problem(self.name)):
            raise DogkitError(f"name (the run folder) {problem}")
        if self.crop not in (None, "none", "boxes"):
            raise DogkitError(f"crop must be none or boxes, got {self.crop!r}")
        for key in ("epochs", "batch_size", "image_size", "avg_window", "accumulate", "probe_epochs", "step_size",
                    "avg_bn_images", "sync_every"):
            if getattr(self, key) < 1:
                raise DogkitError(f"{key} must be at least 1, got {getattr(self, key)}")
        for key in ("early_stopping", "plateau_patience", "seed", "workers", "max_steps_per_epoch"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                raise DogkitError(f"{key} must be 0 or more, got {getattr(self, key)}")
        # Upper bounds far beyond any real run, so that a hand-edited config.json cannot ask for a terabyte batch,
        # a training that never ends or a hundred thousand worker processes.
        for key, high in MAXIMA.items():
            if getattr(self, key) is not None and getattr(self, key) > high:
                raise DogkitError(f"{key} must be at most {high:,}, got {getattr(self, key):,}")
        # ResNets downsample 32×; beyond 2048 px one image is megabytes per channel and layer.
        if not MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE:
            raise DogkitError(f"image_size must be between {MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE} pixels, "
                              f"got {self.image_size}")
        for key, low, high in (("lr", 0, 10), ("weight_decay", 0, 10), ("momentum", 0, 1), ("gamma", 0, 1),
                               ("warmup_epochs", 0, 1e6), ("label_smoothing", 0, 1), ("dropout", 0, 1),
                               ("recovery_minutes", 0, 1e6)):
            value = getattr(self, key)
            positive = key in ("lr", "gamma")
            if not (math.isfinite(value) and (value > low if positive else value >= low) and value <= high
                    and (value < 1 if key in ("label_smoothing", "dropout") else True)):
                bounds = f"({low:g}, {high:g}]" if positive else f"[{low:g}, {high:g}" + (
                    ")" if key in ("label_smoothing", "dropout") else "]")
                raise DogkitError(f"{key} must be a finite number in {bounds}, got {value}")
        if not all(math.isfinite(g) and 0 < g < 1 for g in self.avg_ema):
            raise DogkitError(f"avg_ema must be decays strictly between 0 and 1, got {self.avg_ema}")
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise DogkitError(f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        if self.optimizer == "averaged-adam" and self.schedule != "constant":
            raise DogkitError("averaged-adam runs Adam at a constant learning rate (the averaging replaces the decay); "
                              f"set schedule=constant instead of {self.schedule}")
        if self.head_init == "imagenet" and (not self.pretrained or self.weights):
            raise DogkitError("head_init=imagenet starts the head from the ImageNet weights' own head: it needs "
                              "pretrained=true and no --weights file")
        if self.schedule == "plateau" and self.warmup_epochs > 0:
            # ReduceLROnPlateau owns the rate from the first epoch; a warm-up under it would fight its decisions.
            raise DogkitError("the plateau schedule has no warm-up; set warmup_epochs=0 instead of "
                              f"{self.warmup_epochs:g}, or use the cosine, step or constant schedule")
        if self.optimizer == "averaged-adam" and self.warmup_epochs > 0:
            # The averages would fold in the warm-up's small steps (G from θ_0 on); the method assumes one rate.
            raise DogkitError("averaged-adam runs Adam at one constant learning rate from the first step; "
                              f"set warmup_epochs=0 instead of {self.warmup_epochs:g}")
        return self


class _Presets(Mapping):
    """{regime number: its settings}, read from the regimes table each time (a row added there is a preset)."""

    def __getitem__(self, number: int) -> Mapping[str, object]:
        return regimes.TABLE[number].settings

    def __iter__(self) -> Iterator[int]:
        return iter(regimes.numbers())

    def __len__(self) -> int:
        return len(regimes.TABLE)


PRESETS: Mapping[int, Mapping[str, object]] = _Presets()


# Other tools' names for dogkit's settings (timm, Ultralytics, Keras), so a near miss of any of them is understood.
ALIASES = {"learning_rate": "lr", "lr0": "lr", "wd": "weight_decay", "batch": "batch_size", "bs": "batch_size",
           "imgsz": "image_size", "img_size": "image_size", "input_size": "image_size", "size": "image_size",
           "epoch": "epochs", "scheduler": "schedule", "sched": "schedule", "lr_scheduler": "schedule",
           "warmup": "warmup_epochs", "patience": "early_stopping", "optim": "optimizer", "opt": "optimizer",
           "model": "arch", "architecture": "arch", "num_workers": "workers", "smoothing": "label_smoothing",
           "drop": "dropout", "drop_rate": "dropout", "accum_steps": "accumulate", "amp_dtype": "amp"}


def _suggest(value, allowed) -> str:
    allowed = [str(a) for a in allowed]
    names = allowed + [alias for alias, key in ALIASES.items() if key in allowed]
    close = difflib.get_close_matches(str(value), names, n=1)
    return f" (did you mean {ALIASES.get(close[0], close[0])!r}?)" if close else ""


def _field_types() -> dict[str, object]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in fields(TrainConfig)}


def _coerce(key: str, value, hint):
    """Turn a file or command-line value into the field's type, with a clear error."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        hint = next(a for a in args if a is not type(None))
        # An empty value unsets a number (`--set workers=`); an empty name, path or choice is refused as given.
        empty = ("none", "null") if hint is str else ("none", "null", "")
        if value is None or (isinstance(value, str) and value.lower() in empty):
            return None
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    try:
        if origin is list:
            items = value if isinstance(value, list) else [v for v in str(value).split(",") if v.strip()]
            return [args[0](v) for v in items]
        if hint is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"not a boolean: {value!r}")
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"not an integer: {value!r}")
        if hint in (int, float) and isinstance(value, bool):  # JSON's true is no number, though Python's is
            raise ValueError(f"not a number: {value!r}")
        if hint is str and not isinstance(value, str):  # a file's 5 or [..] for a name
            raise ValueError(f"not text: {value!r}")
        return hint(value)
    except (TypeError, ValueError) as e:
        raise DogkitError(f"bad value for {key}: {e}") from e


def apply_overrides(cfg: TrainConfig, overrides: dict, source: str) -> TrainConfig:
    """Set fields from a mapping; unknown keys are an error naming the closest valid key."""
    types_ = _field_types()
    values = {}
    for raw_key, value in overrides.items():
        key = str(raw_key).replace("-", "_")
        if key not in types_:
            raise DogkitError(f"unknown setting {raw_key!r} in {source}{_suggest(key, list(types_))}")
        values[key] = _coerce(key, value, types_[key])
    return dataclasses.replace(cfg, **values)


def parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise DogkitError(f"--set takes KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


MAX_CONFIG_BYTES = 2**20  # a config is a few hundred bytes; /dev/zero or a huge file is refused before reading


def read_config_file(path: Path) -> dict:
    if problem := not_a_file(path, MAX_CONFIG_BYTES):
        raise DogkitError(f"cannot read config {shown(path)}: {problem}")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DogkitError(f"cannot read config {shown(path)}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise DogkitError(f"cannot read config {shown(path)}: not UTF-8 text (byte {e.start})") from e
    try:
        data = _parse(text, path.suffix.lower())
    except Exception as e:  # each parser has its own error type; all mean "fix the file"
        raise DogkitError(f"cannot read config {shown(path)}: {parse_problem(e)}") from e
    if not isinstance(data, dict):
        raise DogkitError(f"{shown(path)} must hold a mapping of settings, got {type(data).__name__}")
    return data


def _parse(text: str, suffix: str):
    if suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        return tomllib.loads(text)
    if suffix == ".json":
        return json.loads(text)
    import yaml

    return yaml.safe_load(text) or {}


def parse_problem(e: Exception) -> str:
    """A parser's complaint as '<problem> at line L, column C' (1-based). YAML's own message spans lines, with
    the offending line quoted and a caret under it: its last line alone would read '^'."""
    mark = getattr(e, "problem_mark", None)  # yaml.MarkedYAMLError
    if mark is not None:
        return f"{getattr(e, 'problem', None) or type(e).__name__} at line {mark.line + 1}, column {mark.column + 1}"
    if isinstance(e, json.JSONDecodeError):
        return f"{e.msg} at line {e.lineno}, column {e.colno}"
    first = next((line.strip() for line in str(e).split("\n") if line.strip()), type(e).__name__)
    toml = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", first)  # tomllib's wording
    return f"{toml[1]} at line {toml[2]}, column {toml[3]}" if toml else first


def resolve_config(exp: int | None = None, file: Path | None = None, overrides: dict | None = None) -> TrainConfig:
    cfg = TrainConfig()
    file_data = read_config_file(file) if file else {}
    exp = exp if exp is not None else file_data.get("exp")
    if exp is not None:
        if problem := regimes.exp_problem(int(exp)):
            raise DogkitError(f"--exp {problem}")
        cfg = apply_overrides(cfg, {"exp": int(exp), **PRESETS[int(exp)]}, f"preset {exp}")
    if file_data:
        cfg = apply_overrides(cfg, file_data, str(file))
    if overrides:
        cfg = apply_overrides(cfg, overrides, "the command line")
    if problem := writable_problem(Path(cfg.runs_dir), folder=True):  # a new run's folder: before any work
        raise DogkitError(f"runs_dir {problem}")
    return cfg.validate()


# What a resumed run may change: how long it runs and where and how fast it computes. Everything else
# (the data, the model, the optimisation, the seed) is what makes it the run it is; a change there is a new run.
RESUME_SETTINGS = ("epochs", "workers", "device", "sync_every", "recovery_minutes", "compile", "compile_mode",
                   "tensorboard")


def defining_changes(old: dict, new: dict) -> list[str]:
    """The settings (present in both) that differ between two configs and make them different runs."""
    return sorted(k for k in old if k in new and k not in RESUME_SETTINGS and old[k] != new[k])


def _resumable() -> str:
    return ("--epochs, --workers, --device, --compile and, with --set, "
            + ", ".join(k for k in RESUME_SETTINGS if k not in ("epochs", "workers", "device", "compile")))


def resume_refusal(saved: TrainConfig, overrides: dict, named: Mapping[str, str] | None = None,
                   run: Path | None = None) -> str | None:
    """The one line refusing the overrides that change what defines the run, each named as it was given
    (``named``: setting → ``--lr`` or ``--set lr``); None when a resumed run takes them all. The same value
    again is no change."""
    changed = apply_overrides(saved, overrides, "the command line")
    refused = defining_changes(saved.to_dict(), changed.to_dict())
    if not refused:
        return None
    names = ", ".join((named or {}).get(k, k) for k in refused)
    config = shlex.quote(shown(run / "config.json")) if run is not None else "<run>/config.json"
    one = len(refused) == 1
    return (f"{names} cannot change on --resume: {'it defines' if one else 'they define'} the run (start a new run "
            f"with `--config {config}` and the change, or leave {'it' if one else 'them'} out; --resume can change "
            f"only {_resumable()})")


def check_resume(run: Path, overrides: dict, named: Mapping[str, str]) -> None:
    """Refuse what a resumed run cannot take before anything is written (and before torch is imported)."""
    if not is_run(run):
        raise DogkitError(f"{shown(run)} is not a dogkit run folder (no config.json)")
    if problem := resume_refusal(load_config(run / "config.json"), overrides, named, run):
        raise DogkitError(problem)


def resume_config(saved: TrainConfig, overrides: dict, done_epochs: int) -> TrainConfig:
    """The saved config with the overrides a resumed run accepts; any other changed setting is refused in one
    line that names them all."""
    if problem := resume_refusal(saved, overrides):
        raise DogkitError(problem)
    changed = apply_overrides(saved, overrides, "the command line")
    if changed.epochs < done_epochs:
        raise DogkitError(f"the run has done {done_epochs} epochs already; --epochs {changed.epochs} would undo "
                          "them (give at least that many)")
    return changed.validate()


def load_config(path: Path) -> TrainConfig:
    """The resolved config a run saved (config.json)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DogkitError(f"cannot read {path} ({e}); the run folder is damaged: restore config.json or start a "
                          "new run") from e
    if not isinstance(data, dict):
        raise DogkitError(f"{path} does not hold a dogkit config (a JSON object); restore it or start a new run")
    try:
        return apply_overrides(TrainConfig(), data, str(path)).validate()
    except DogkitError as e:
        raise DogkitError(f"{shown(path)}: {e}; the run folder was edited or damaged: restore config.json or start "
                          "a new run") from None
