"""The ``dogkit`` command line: parses options and calls the library; all the work lives elsewhere."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .errors import DogkitError
from .progress import console

app = typer.Typer(
    help="Train ResNet50 dog-breed classifiers on Stanford Dogs, export to ONNX, predict with ONNX Runtime.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from . import __version__

        console.print(f"dogkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")]
    = False,
) -> None:
    """dogkit: prepare Stanford Dogs, train ResNet50 three ways, export to ONNX, evaluate, benchmark."""


@app.command()
def prepare(
    source: Annotated[
        list[Path] | None,
        typer.Option("--source", "-s", help="Extracted folder (Stanford layout or class folders) or archive(s) "
                     "(.tar, .tar.gz, .zip). Repeat for several archives. Default: download the official archives."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Output folder for manifest.csv, classes.json, rejects.csv, dataset.json.")]
    = Path("artifacts/data/stanford-dogs"),
    seed: Annotated[int, typer.Option(help="Seed of the split; the same inputs and seed give the same manifest.")] = 0,
    ratios: Annotated[str, typer.Option(help="train/val/test shares.")] = "70/15/15",
    split: Annotated[str, typer.Option(help="'random' (stratified) or 'official' (Stanford's train/test lists, "
                                       "val carved from train).")] = "random",
    crop: Annotated[str, typer.Option(help="'boxes': train and evaluate on the dog's bounding box; 'none': full "
                                      "image.")] = "none",
    cache: Annotated[int | None, typer.Option(help="Also cache every image shrunk to this shorter side (pixels) "
                                              "as raw uint8, so training never waits on JPEG decoding.")] = None,
    workers: Annotated[int | None, typer.Option(help="Decode threads (default: the CPUs this process may use).")]
    = None,
    download_dir: Annotated[Path | None, typer.Option(help="Where the official archives are downloaded "
                                                      "(default: <out>/downloads).")] = None,
    force: Annotated[bool, typer.Option(help="Rescan and rewrite even when the outputs are up to date.")] = False,
) -> None:
    """Get Stanford Dogs (or any class-folder dataset), check every image, and write a 70/15/15 manifest."""
    from .prepare import PrepareConfig
    from .prepare import prepare as run_prepare
    from .split import parse_ratios

    cfg = PrepareConfig(sources=list(source or []), out=out, seed=seed, ratios=parse_ratios(ratios), split=split,
                        crop=crop, cache_size=cache, workers=workers, download_dir=download_dir, force=force)
    result = run_prepare(cfg)

    if result.up_to_date:
        console.print(f"[green]Dataset in {out} is up to date[/] (same files and options); nothing rescanned.")
    elif result.scanned:
        console.print(f"Scanned {result.scanned} files in {result.scan_seconds:.1f} s "
                      f"({result.scan_images_per_s:.0f} images/s).")
    table = Table(title=f"Prepared dataset: {out}")
    table.add_column("")
    table.add_column("images", justify="right")
    for name in ("train", "val", "test", "total"):
        table.add_row(name, str(result.counts[name]))
    table.add_row("classes", str(result.classes))
    table.add_row("rejected files", str(sum(result.rejects.values())))
    table.add_row("duplicate groups", f"{result.duplicate_groups} ({result.duplicates_excluded} files excluded)")
    console.print(table)
    if result.rejects:
        console.print("Rejects by reason (details in rejects.csv):")
        for reason, n in result.rejects.items():
            console.print(f"  {n:5d}  {reason}")
    if result.cache:
        c = result.cache
        verb = f"built in {c.seconds:.1f} s ({c.images_per_s:.0f} images/s)" if c.built else "up to date"
        console.print(f"Image cache {c.path} ({c.bytes / 2**20:.0f} MiB): {verb}.")
    console.print(f"\nNext: [bold]dogkit train --exp 1 --data {out}[/]")


@app.command()
def train(
    exp: Annotated[int | None, typer.Option(help="Regime preset: 1 pretrained + Adam, 2 pretrained + Averaged Adam, "
                                            "3 from scratch + Adam.")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML or TOML file of settings (applied over the preset).")]
    = None,
    resume: Annotated[Path | None, typer.Option(help="Continue the run in this folder with its saved config.")]
    = None,
    data: Annotated[Path | None, typer.Option(help="Prepared dataset folder (from `dogkit prepare`).")] = None,
    name: Annotated[str | None, typer.Option(help="Run folder name under --runs-dir.")] = None,
    runs_dir: Annotated[Path | None, typer.Option(help="Where run folders go (default artifacts/runs).")] = None,
    arch: Annotated[str | None, typer.Option(help="Any torchvision classifier (default resnet50).")] = None,
    weights: Annotated[Path | None, typer.Option(help="Local state dict to start from instead of downloading "
                                                 "ImageNet weights.")] = None,
    optimizer: Annotated[str | None, typer.Option(help="adam, adamw, sgd, adamax or averaged-adam.")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate.")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="Weight decay.")] = None,
    schedule: Annotated[str | None, typer.Option(help="constant, cosine (with --warmup-epochs), step or plateau.")]
    = None,
    warmup_epochs: Annotated[float | None, typer.Option(help="Linear warm-up length in epochs.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size.")] = None,
    image_size: Annotated[int | None, typer.Option(help="Input size in pixels.")] = None,
    freeze: Annotated[str | None, typer.Option(help="none, linear-probe or gradual.")] = None,
    label_smoothing: Annotated[float | None, typer.Option(help="Label smoothing.")] = None,
    dropout: Annotated[float | None, typer.Option(help="Dropout before the head.")] = None,
    crop: Annotated[str | None, typer.Option(help="none or boxes (default: as prepared).")] = None,
    early_stopping: Annotated[int | None, typer.Option(help="Patience in epochs (0 = off).")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    amp: Annotated[str | None, typer.Option(help="auto, bf16, fp16 or off.")] = None,
    compile: Annotated[bool | None, typer.Option("--compile/--no-compile", help="torch.compile the model.")] = None,
    devices: Annotated[int | None, typer.Option(help="Processes (GPUs) on this node: relaunches under torchrun "
                                                "with DDP.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Any other setting as KEY=VALUE (repeatable).")]
    = None,
) -> None:
    """Train one regime; the run folder gets config, environment, metrics, checkpoints and test metrics."""
    if devices and devices > 1 and "WORLD_SIZE" not in os.environ:
        from .distributed import launch

        argv = sys.argv[1:]
        i = argv.index("--devices") if "--devices" in argv else None
        argv = argv[:i] + argv[i + 2:] if i is not None else [a for a in argv if not a.startswith("--devices=")]
        raise typer.Exit(launch(devices, argv))
    main_process = os.environ.get("RANK", "0") == "0"
    try:
        from .config import parse_set, resolve_config
        from .train import train as run_train
    except ModuleNotFoundError as e:
        raise DogkitError(f"training needs the [train] extra ({e.name} is missing): pip install -e '.[train]'") from e

    if resume is not None:
        result = run_train(resume=resume)
    else:
        options = {"data": data, "name": name, "runs_dir": runs_dir, "arch": arch, "weights": weights,
                   "optimizer": optimizer, "lr": lr, "weight_decay": weight_decay, "schedule": schedule,
                   "warmup_epochs": warmup_epochs, "epochs": epochs, "batch_size": batch_size,
                   "image_size": image_size, "freeze": freeze, "label_smoothing": label_smoothing, "dropout": dropout,
                   "crop": crop, "early_stopping": early_stopping, "seed": seed, "device": device, "amp": amp,
                   "compile": compile}
        overrides = {k: str(v) if isinstance(v, Path) else v for k, v in options.items() if v is not None}
        overrides.update(parse_set(set_ or []))
        result = run_train(resolve_config(exp, config, overrides))
    if not main_process:
        return
    console.print(f"\nRun folder: {result.run_dir}")
    if result.finished:
        console.print(f"Next: [bold]dogkit export {result.run_dir}[/] (ONNX), or compare regimes with the other --exp.")
    else:
        console.print(f"Next: [bold]dogkit train --resume {result.run_dir}[/]")


@app.command()
def export(
    run: Annotated[Path | None, typer.Argument(help="Run folder (default: the best finished run by validation "
                                               "accuracy).")] = None,
    runs_dir: Annotated[Path, typer.Option(help="Where runs are looked for.")] = Path("artifacts/runs"),
    data: Annotated[Path | None, typer.Option(help="Prepared dataset for the checks (default: the run's).")] = None,
    atol: Annotated[float, typer.Option(help="Parity gate: largest allowed |logit difference| vs PyTorch.")] = 1e-3,
    parity_images: Annotated[int, typer.Option(help="Validation images in the parity gate.")] = 64,
    int8: Annotated[bool, typer.Option("--int8", help="Also write a static INT8 model (QDQ, per-channel).")] = False,
    calibration_images: Annotated[int, typer.Option(help="Training images to calibrate INT8 on.")] = 256,
    max_drop: Annotated[float, typer.Option(help="Accuracy gate: largest allowed validation top-1 drop of the "
                                            "INT8/fp16 model, as a fraction (0.01 = one point).")] = 0.01,
    fp16: Annotated[bool, typer.Option("--fp16", help="Also write an fp16 model for GPU deployment.")] = False,
) -> None:
    """Export a run's best model to ONNX, checked against PyTorch on validation images."""
    try:
        from .export import export as run_export
    except ModuleNotFoundError as e:
        raise DogkitError(f"export needs the [train] extra ({e.name} is missing): pip install -e '.[train]'") from e
    result = run_export(run, runs_dir=runs_dir, data=data, atol=atol, parity_images=parity_images, int8=int8,
                        calibration_images=calibration_images, max_drop=max_drop, fp16=fp16)
    model = result.onnx_path
    console.print("\nNext:")
    console.print(f"  dogkit eval --backend onnx --model {model}")
    console.print(f"  dogkit predict PATH... --model {model}")
    console.print(f"  dogkit bench --model {model}")
    if result.int8:
        console.print(f"  (INT8: {model.with_name('model.int8.onnx')})")


@app.command()
def predict(
    paths: Annotated[list[str], typer.Argument(help="Image files, folders (searched recursively) or glob patterns.")],
    model: Annotated[Path | None, typer.Option(help="ONNX model (default: model.onnx of the best exported run).")]
    = None,
    top_k: Annotated[int, typer.Option(help="Breeds to list per image.")] = 5,
    out: Annotated[Path | None, typer.Option(help="Write predictions to a .csv or .json file.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per ONNX Runtime call.")] = 32,
    device: Annotated[str, typer.Option(help="cpu, or cuda with onnxruntime-gpu and a GPU.")] = "cpu",
    runs_dir: Annotated[Path, typer.Option(help="Where the default model is looked for.")] = Path("artifacts/runs"),
) -> None:
    """Top-k dog breeds for images, with ONNX Runtime alone (no PyTorch)."""
    from .predict import collect_paths, write_predictions
    from .predict import predict as run_predict
    from .runs import best_run
    from .runtime import OnnxClassifier

    classifier = OnnxClassifier(model or best_run(runs_dir, need="model.onnx") / "model.onnx", device=device)
    files = collect_paths(paths)
    if not files:
        raise DogkitError(f"no files found in {', '.join(paths)}")
    predictions, failures = run_predict(classifier, files, top_k=top_k, batch_size=batch_size)
    for path, reason in failures:
        console.print(f"[yellow]skipped[/] {path}: {reason}")
    if out is not None:
        write_predictions(predictions, out)
        console.print(f"{len(predictions)} predictions → {out}")
    if out is None or len(predictions) <= 20:
        table = Table(title=f"{classifier.path.name}: top-{top_k}")
        table.add_column("image", overflow="fold")
        table.add_column("breed")
        table.add_column("probability", justify="right")
        for p in predictions[:200]:
            for rank, (label, prob) in enumerate(zip(p.labels, p.probs)):
                table.add_row(p.path if rank == 0 else "", label, f"{prob:.1%}")
        console.print(table)
        if len(predictions) > 200:
            console.print(f"… {len(predictions) - 200} more; use --out FILE for all of them")
    console.print(f"{len(predictions)} images predicted, {len(failures)} skipped")


@app.command("eval")
def eval_(
    backend: Annotated[str, typer.Option(help="onnx (ONNX Runtime, no PyTorch) or torch (the run's best.pt).")]
    = "onnx",
    model: Annotated[Path | None, typer.Option(help="ONNX model (default: the best exported run's model.onnx).")]
    = None,
    run: Annotated[Path | None, typer.Option(help="Run folder (default: the best finished run).")] = None,
    data: Annotated[Path | None, typer.Option(help="Prepared dataset, or a folder of class folders (default: the "
                                              "run's dataset).")] = None,
    split: Annotated[str, typer.Option(help="train, val or test.")] = "test",
    out: Annotated[Path | None, typer.Option(help="Report folder (default: <run>/eval/<backend>-<model>-<split>).")]
    = None,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 32,
    device: Annotated[str | None, typer.Option(help="cpu or cuda.")] = None,
    runs_dir: Annotated[Path, typer.Option(help="Where runs are looked for.")] = Path("artifacts/runs"),
) -> None:
    """Accuracy, top-5, precision, recall, F1, per-class report and confusion matrix of a model."""
    from .evaluate import evaluate

    evaluate(backend, model=model, run=run, data=data, split=split, out=out, batch_size=batch_size, device=device,
             runs_dir=runs_dir)


@app.command("bench")
def bench_(
    model: Annotated[Path | None, typer.Option(help="ONNX model (default: the best exported run's).")] = None,
    run: Annotated[Path | None, typer.Option(help="Run folder: its best.pt for the torch backends and its "
                                             "model*.onnx files.")] = None,
    backends: Annotated[str, typer.Option(help="Comma-separated: torch, torch-bf16, torch-compile, onnx, onnx-int8, "
                                          "onnx-fp16, opencv, opencv-int8 (OpenCV DNN on model.onnx, "
                                          "model.int8.onnx).")] = "torch,torch-bf16,torch-compile,onnx,onnx-int8",
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8,32",
    threads: Annotated[int | None, typer.Option(help="Threads per backend (default: the CPUs available).")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    images: Annotated[Path | None, typer.Option(help="Also time decode + preprocess + inference over these "
                                                "images, as `dogkit predict` does.")] = None,
    min_time: Annotated[float, typer.Option(help="Seconds each configuration is timed for, at least.")] = 2.0,
    min_runs: Annotated[int, typer.Option(help="Timed runs per configuration, at least.")] = 10,
    warmup: Annotated[int, typer.Option(help="Untimed warm-up runs.")] = 3,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON.")] = None,
    markdown_out: Annotated[Path | None, typer.Option("--markdown", help="Write a markdown table (for "
                                                      "BENCHMARKS.md).")] = None,
    runs_dir: Annotated[Path, typer.Option(help="Where runs are looked for.")] = Path("artifacts/runs"),
) -> None:
    """Latency and throughput of PyTorch and ONNX Runtime backends, each in its own process."""
    from .bench import bench, save

    result = bench(model=model, run=run, backends=[b.strip() for b in backends.split(",") if b.strip()],
                   batch_sizes=[int(b) for b in batch_sizes.split(",")], threads=threads, device=device,
                   images=images, warmup=warmup, min_runs=min_runs, min_time=min_time, runs_dir=runs_dir)
    table = Table(title=f"dogkit bench: {result['threads']} threads, {result['device']}")
    for col, justify in (("backend", "left"), ("what ran", "left"), ("batch", "right"), ("p50 ms", "right"),
                         ("p90 ms", "right"), ("p99 ms", "right"), ("images/s", "right"), ("peak MB", "right")):
        table.add_column(col, justify=justify)
    for r in result["rows"]:
        table.add_row(r["backend"] + (" e2e" if r["end_to_end"] else ""), r["variant"], str(r["batch"]),
                      f"{r['p50_ms']:.1f}", f"{r['p90_ms']:.1f}", f"{r['p99_ms']:.1f}", f"{r['images_per_s']:.1f}",
                      f"{r['peak_mem_mb']:.0f}")
    console.print(table)
    for backend, why in result["skipped"].items():
        console.print(f"[yellow]skipped[/] {backend}: {why}")
    save(result, json_out, markdown_out)


@app.command("report")
def report_(
    runs: Annotated[list[Path] | None, typer.Argument(help="Run folders (default: each regime's best finished run).")]
    = None,
    out: Annotated[Path, typer.Option(help="Folder for report.md and its plots.")] = Path("artifacts/report"),
    runs_dir: Annotated[Path, typer.Option(help="Where runs are looked for.")] = Path("artifacts/runs"),
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% intervals.")] = 1000,
) -> None:
    """The regimes compared: markdown with intervals, McNemar tests, curves, per-breed errors, calibration."""
    from .report import report

    path = report(runs or None, out, runs_dir=runs_dir, resamples=resamples)
    console.print(f"Open {path} (GitHub renders it with its plots).")


@app.command()
def study(
    budget: Annotated[str, typer.Option(help="full: the presets, meant for a GPU; quick: minutes on a CPU, a smoke "
                                        "test.")] = "full",
    source: Annotated[list[Path] | None, typer.Option("--source", "-s", help="Dataset folder or archives for "
                                                      "`prepare` (default: download).")] = None,
    data: Annotated[Path, typer.Option(help="Prepared dataset folder.")] = Path("artifacts/data/stanford-dogs"),
    runs_dir: Annotated[Path, typer.Option(help="Where the three runs go.")] = Path("artifacts/runs"),
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("artifacts/report"),
    weights: Annotated[Path | None, typer.Option(help="Local ImageNet state dict for regimes 1 and 2 (offline).")]
    = None,
    bench: Annotated[bool, typer.Option("--bench/--no-bench", help="Benchmark the exported model.")] = True,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Training setting KEY=VALUE for all three runs.")]
    = None,
) -> None:
    """prepare → train regimes 1, 2, 3 → export the best → evaluate on ONNX → benchmark → report."""
    from .config import parse_set
    from .study import study as run_study

    run_study(budget, sources=source, data=data, runs_dir=runs_dir, out=out, weights=weights,
              overrides=parse_set(set_ or []), bench=bench)


def main() -> None:
    try:
        app()
    except DogkitError as e:
        console.print(f"[bold red]error:[/] {e}")
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]; finished work is kept and the next run picks up from it.")
        sys.exit(130)


if __name__ == "__main__":
    main()
