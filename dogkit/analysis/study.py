"""``dogkit study``: the whole study in one command, resumable step by step.

prepare (if needed) → train regimes 1, 2, 3 → export the best (fp32 + INT8) → evaluate it with ONNX
Runtime → benchmark → report. A step whose output exists is skipped; an interrupted training run is
resumed from its last checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.markup import escape

from ..data.dataset import load_dataset
from ..errors import DogkitError
from ..log import log
from ..runs import REGIMES, export_current, is_run, run_score
from ..training.config import resolve_config

BUDGETS = {
    # The presets as they are: meant for a GPU (regime 3 alone is 120 epochs).
    "full": {},
    # Minutes on a laptop CPU: small images, two epochs, short averaging window. A smoke test.
    "quick": {"image_size": 96, "epochs": 2, "batch_size": 32, "warmup_epochs": 0.0, "avg_window": 20,
              "avg_bn_images": 256},
}


def _step(title: str) -> None:
    log.info(f"\n[bold]== {title}[/]")


def estimate_minutes(cfg, images: int) -> float:
    """Time real training steps of the chosen network, then scale to ``images`` training images seen."""
    import torch
    import torch.nn.functional as F

    from ..deploy.preprocess import PreprocessSpec
    from ..training.device import autocast_dtype, resolve_device, to_input
    from ..training.models import build_model

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
    per_image = min(times[1:]) / cfg.batch_size
    # Validation, the averages' BatchNorm passes and testing add roughly half again.
    return 1.5 * per_image * images / 60


def study(budget: str = "quick", *, sources: list[Path] | None = None,
          data: Path = Path("artifacts/data/stanford-dogs"), runs_dir: Path = Path("artifacts/runs"),
          out: Path = Path("artifacts/report"), weights: Path | None = None, overrides: dict | None = None,
          bench: bool = True) -> Path:
    """prepare → train the three regimes → export the best → evaluate it with ONNX Runtime → bench → report.
    Each step skips what is already done and current, so an interrupted study picks up where it stopped."""
    # Imported before any step runs: without the [train] extra the study stops here, not after prepare.
    from ..training.export import export
    from ..training.trainer import train
    from .report import report

    if budget not in BUDGETS:
        raise DogkitError(f"--budget must be one of {', '.join(BUDGETS)}, got {budget!r}")
    start = time.perf_counter()
    _step("1/6 prepare")
    dataset = _prepare(data, sources)
    settings = {**BUDGETS[budget], **(overrides or {}), "data": str(data), "runs_dir": str(runs_dir)}
    run_dirs = [runs_dir / f"study-{budget}-exp{exp}" for exp in REGIMES]
    first = resolve_config(1, None, settings)
    epochs = sum(resolve_config(e, None, settings).epochs for e in REGIMES)
    minutes = estimate_minutes(first, len(dataset.split("train")) * epochs)
    log.info(f"budget {budget}: {first.arch} at {first.image_size} px; expected training time about "
             f"{minutes:.0f} min on {first.device if first.device != 'auto' else 'this machine'}")
    if budget == "quick":
        log.warning("[yellow]quick budget: a smoke test — its numbers say the pipeline works, not which regime "
                    "wins[/]")
    for exp, run_dir in zip(REGIMES, run_dirs):
        _step(f"2/6 train regime {exp}")
        _train(train, exp, run_dir, settings, weights)
    best = max(run_dirs, key=lambda r: run_score(r) or -1.0)
    _step(f"3/6 export the best run ({best.name}, by validation top-1)")
    _export(export, best, budget)
    _step("4/6 evaluate the exported model with ONNX Runtime on test")
    _evaluate(best)
    _step("5/6 benchmark")
    _bench(best, budget, bench)
    _step("6/6 report")
    path = report(run_dirs, out, quick=budget == "quick", resamples=1000 if budget == "full" else 200)
    minutes = (time.perf_counter() - start) / 60
    log.info(f"\nstudy finished in {minutes:.1f} min; the report is {escape(str(path))}")
    return path


def _prepare(data: Path, sources: list[Path] | None):
    from ..data.prepare import PrepareConfig, prepare

    if (data / "dataset.json").is_file() and not sources:
        log.info(f"{escape(str(data))} is prepared; skipping")
    else:
        prepare(PrepareConfig(sources=list(sources or []), out=data))
    return load_dataset(data)


def _train(train, exp: int, run_dir: Path, settings: dict, weights: Path | None) -> None:
    if run_score(run_dir) is not None:  # finished runs have test metrics
        log.info(f"{escape(str(run_dir))} is finished; skipping")
    elif is_run(run_dir):  # started, not finished
        train(resume=run_dir)
    else:
        per_run = {**settings, "name": run_dir.name}
        if weights is not None and exp in (1, 2):
            per_run["weights"] = str(weights)
        train(resolve_config(exp, None, per_run))


def _export(export, best: Path, budget: str) -> None:
    if export_current(best):
        log.info(f"{escape(str(best / 'model.onnx'))} is current; skipping")
        return
    # A two-epoch smoke-test model is too close to chance for the one-point INT8 gate to mean anything.
    # An INT8 model that cannot be built or fails its gate does not stop the study: the fp32 model goes on,
    # and export.json (hence the report) says why INT8 is missing.
    export(best, int8=True, calibration_images=256 if budget == "full" else 64,
           max_drop=1.0 if budget == "quick" else 0.01, keep_going=True)


def _evaluate(best: Path) -> None:
    from .evaluate import evaluate

    evaluation = best / "eval" / "onnx-model-test" / "metrics.json"
    if evaluation.is_file() and evaluation.stat().st_mtime >= (best / "model.onnx").stat().st_mtime:
        log.info(f"{escape(str(evaluation.parent))} is current; skipping")
    else:
        evaluate("onnx", model=best / "model.onnx")


def _bench(best: Path, budget: str, enabled: bool) -> None:
    from ..deploy.bench import bench, save

    out = best / "bench.json"
    if not enabled:
        log.info("skipped (--no-bench)")
    elif out.is_file() and out.stat().st_mtime >= (best / "model.onnx").stat().st_mtime:
        log.info(f"{escape(str(out))} is current; skipping")
    else:
        full = budget == "full"
        result = bench(run=best, backends=["torch", "torch-bf16", "onnx", "onnx-int8"] +
                       (["torch-compile"] if full else []), batch_sizes=[1, 8, 32] if full else [1, 8],
                       min_time=2.0 if full else 0.3, min_runs=10 if full else 3, warmup=3 if full else 1)
        save(result, out, None)
