"""The ``dogkit`` command line: parses options and calls the library; all the work lives elsewhere."""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from .deploy.bench import MAPS_BACKENDS
from .errors import DogkitError, Terminated, one_line
from .progress import console, stdout
from .settings import SettingError
from .text import shown
from .variants import by_backend, by_flag, derived, in_study, opencv_backends, ort_backends

if TYPE_CHECKING:
    from .training.config import TrainConfig

try:  # Typer ships its own copy of click since 0.22; earlier releases use click itself
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException


def _name(value: object) -> str:
    """A name from outside (a path, a class, a reason quoting one) for a Rich line on the terminal: control
    characters escaped, markup shown as text."""
    return escape(shown(value))


app = typer.Typer(
    help="Train ResNet50 dog-breed classifiers on Stanford Dogs, export to ONNX, predict with ONNX Runtime.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Click's plain help: flags show no type, and it reads the same in every Typer version (the Rich panels'
    # rendering of types and arguments changed between them).
    rich_markup_mode=None,
)


# ----------------------------------------------------------------------------- translation
# Every value is checked by the settings dataclass it goes into (dogkit.settings); a refusal names the field, and
# the CLI names the option instead. These two only turn text into the values.


def _batch_sizes(text: str) -> list[int]:
    """``--batch-sizes 1,8,32`` → [1, 8, 32]."""
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise typer.BadParameter(f"takes comma-separated whole numbers like 1,8,32; got {text!r}") from None


def _seed_list(text: str | None) -> list[int] | None:
    """``--seeds 0,1,2`` → [0, 1, 2]."""
    if text is None:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise typer.BadParameter(f"takes comma-separated whole numbers, got {text!r}") from None


def _version(value: bool) -> None:
    if value:
        from . import __version__

        console.print(f"dogkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")]
    = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback of an unexpected error (also: "
                                        "DOGKIT_DEBUG=1). Without it, the traceback goes to a log file.")] = False,
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
                                                      "(default: <out>/downloads).")]
    = None,
    force: Annotated[bool, typer.Option(help="Rescan and rewrite even when the outputs are up to date.")] = False,
) -> None:
    """Get Stanford Dogs (or any class-folder dataset), check every image, and write a 70/15/15 manifest."""
    from .data.prepare import PrepareConfig
    from .data.prepare import prepare as run_prepare
    from .data.split import parse_ratios

    cfg = PrepareConfig(sources=list(source or []), out=out, seed=seed, ratios=parse_ratios(ratios), split=split,
                        crop=crop, cache_size=cache, workers=workers, download_dir=download_dir, force=force)
    result = run_prepare(cfg)

    if result.up_to_date:
        console.print(f"[green]Dataset in {_name(out)} is up to date[/] (same files and options); nothing "
                      "rescanned.")
    elif result.scanned:
        console.print(f"Scanned {result.scanned} files in {result.scan_seconds:.1f} s "
                      f"({result.scan_images_per_s:.0f} images/s).")
    table = Table(title=f"Prepared dataset: {_name(out)}")
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
            console.print(f"  {n:5d}  {_name(reason)}")
    if result.cache:
        c = result.cache
        verb = f"built in {c.seconds:.1f} s ({c.images_per_s:.0f} images/s)" if c.built else "up to date"
        console.print(f"Image cache {_name(c.path)} ({c.bytes / 2**20:.0f} MiB): {verb}.")
    console.print(f"\nNext: [bold]dogkit train --exp 1 --data {_name(out)}[/]")


# ----------------------------------------------------------------------------- train's options
# The settings used most are options of their own; every other TrainConfig field is --set KEY=VALUE. An option
# left out is None: the preset's, the file's, or on --resume the saved value stands. TrainConfig.validate checks
# every value, whichever way it came.


def _exp_help() -> str:
    from .regimes import TABLE, numbers

    return "Regime preset: " + ", ".join(f"{n} {TABLE[n].name}" for n in numbers()) + "."


def _choices(name: str) -> str:
    from .training import config

    allowed = getattr(config, name)
    return f"{', '.join(allowed[:-1])} or {allowed[-1]}."


def _given(settings: dict, set_: list[str] | None) -> tuple[dict, dict[str, str]]:
    """The overrides of the command line (options, then --set), and how each setting was given, for messages."""
    from .training.config import parse_set

    given = {k: str(v) if isinstance(v, Path) else v for k, v in settings.items() if v is not None}
    named = {k: "--" + k.replace("_", "-") for k in given}
    sets = parse_set(set_ or [])
    named.update({k.replace("-", "_"): f"--set {k}" for k in sets})
    return {**given, **sets}, named


Opt = typer.Option  # the options below, one a line


@app.command(epilog="Every other setting (Averaged Adam's avg_window, avg_ema, avg_bn_images; augment, "
                    "momentum, monitor, accumulate, compile_mode, deterministic, …): --set KEY=VALUE, listed with "
                    "their meaning in docs/training.md.")
def train(
    exp: Annotated[int | None, Opt(help=_exp_help())] = None,
    config: Annotated[Path | None, Opt(help="YAML or TOML file of settings (applied over the preset).")] = None,
    resume: Annotated[Path | None, Opt(help="Continue the run in this folder with its saved config; it may change "
                                       "--epochs, --workers, --device, --compile and, with --set, sync_every, "
                                       "recovery_minutes, compile_mode, tensorboard.")] = None,
    name: Annotated[str | None, Opt(help="Run folder name under --runs-dir (default exp<N>-<arch>).")] = None,
    data: Annotated[Path | None, Opt(help="Prepared dataset folder (default artifacts/data/stanford-dogs).")] = None,
    runs_dir: Annotated[Path | None, Opt(help="Where run folders go (default artifacts/runs).")] = None,
    arch: Annotated[str | None, Opt(help="Any torchvision classifier, or a timm one as timm/<name> (e.g. "
                                    "timm/tf_efficientnet_lite0; default resnet50).")] = None,
    weights: Annotated[Path | None, Opt(help="Local state dict to start from instead of downloading ImageNet "
                                        "weights.")] = None,
    epochs: Annotated[int | None, Opt(help="Epochs (on --resume: more, or fewer than planned but not fewer than "
                                      "done).")] = None,
    image_size: Annotated[int | None, Opt(help="Input size in pixels.")] = None,
    batch_size: Annotated[int | None, Opt(help="Batch size, per process.")] = None,
    lr: Annotated[float | None, Opt(help="Learning rate.")] = None,
    optimizer: Annotated[str | None, Opt(help=_choices("OPTIMIZERS"))] = None,
    weight_decay: Annotated[float | None, Opt(help="Weight decay.")] = None,
    schedule: Annotated[str | None, Opt(help="constant, cosine (with --warmup-epochs), step or plateau.")] = None,
    warmup_epochs: Annotated[float | None, Opt(help="Linear warm-up length in epochs.")] = None,
    label_smoothing: Annotated[float | None, Opt(help="Label smoothing.")] = None,
    dropout: Annotated[float | None, Opt(help="Dropout before the head.")] = None,
    freeze: Annotated[str | None, Opt(help=_choices("FREEZE_MODES"))] = None,
    early_stopping: Annotated[int | None, Opt(help="Patience in epochs (0 = off).")] = None,
    crop: Annotated[str | None, Opt(help="none or boxes (default: what `dogkit prepare --crop` chose).")] = None,
    workers: Annotated[int | None, Opt(help="Data-loader worker processes (default: the CPUs available, at most "
                                       "8).")] = None,
    device: Annotated[str | None, Opt(help="auto, cpu, cuda, cuda:N or mps.")] = None,
    amp: Annotated[str | None, Opt(help=_choices("AMP_MODES"))] = None,
    compile: Annotated[bool | None, Opt("--compile/--no-compile", help="torch.compile the model.")] = None,
    seed: Annotated[int | None, Opt(help="Random seed.")] = None,
    devices: Annotated[int | None, Opt(help="Processes (GPUs) on this node: relaunches under torchrun with DDP.",
                                       min=1)]
    = None,
    set_: Annotated[list[str] | None, Opt("--set", help="Any other setting as KEY=VALUE (repeatable).")] = None,
) -> None:
    """Train one regime; the run folder gets config, environment, metrics, checkpoints and test metrics."""
    from .training.config import check_resume, resolve_config

    settings = dict(name=name, data=data, runs_dir=runs_dir, arch=arch, weights=weights, epochs=epochs,
                    image_size=image_size, batch_size=batch_size, lr=lr, optimizer=optimizer,
                    weight_decay=weight_decay, schedule=schedule, warmup_epochs=warmup_epochs,
                    label_smoothing=label_smoothing, dropout=dropout, freeze=freeze, early_stopping=early_stopping,
                    crop=crop, workers=workers, device=device, amp=amp, compile=compile, seed=seed)
    # Settings are checked (config.validate; on --resume against the saved run) before torch is even imported,
    # and before torchrun is started.
    overrides, named = _given(settings, set_)
    cfg = None
    if resume is None:
        cfg = resolve_config(exp, config, overrides)
    elif exp is not None or config is not None:
        raise DogkitError("--resume continues a run with its saved config; --exp and --config start a new one")
    else:
        check_resume(resume, overrides, named)
    if devices and devices > 1 and "WORLD_SIZE" not in os.environ:
        _launch(devices)
    main_process = os.environ.get("RANK", "0") == "0"
    if cfg is not None and cfg.exp is None and main_process:
        _base_settings_note(cfg)
    result = _run_training(cfg, resume, overrides, main_process)
    if not main_process:
        return
    run_dir = _name(result.run_dir)
    console.print(f"\nRun folder: {run_dir}")
    if result.finished:
        console.print(f"Next: [bold]dogkit export {run_dir}[/] (ONNX), or compare regimes with the other --exp.")
    else:
        console.print(f"Next: [bold]dogkit train --resume {run_dir}[/]")


def _launch(devices: int) -> None:
    from .training.distributed import launch

    try:
        code = launch(devices, sys.argv[1:])
    except KeyboardInterrupt:
        _interrupted["next_step"] = "the training processes said above what they kept"
        raise
    raise typer.Exit(code)


def _base_settings_note(cfg: TrainConfig) -> None:
    from .regimes import either, in_words, numbers

    console.print(f"[yellow]no --exp[/]: training dogkit's base settings ({cfg.arch}, "
                  f"{'ImageNet weights' if cfg.pretrained else 'from scratch'}, {cfg.optimizer} {cfg.lr:g}, "
                  f"{cfg.schedule}, {cfg.epochs} epochs), none of the study's {in_words(len(numbers()))} regimes; "
                  f"--exp {either(numbers())} starts from one of them")


def _run_training(cfg: TrainConfig | None, resume: Path | None, overrides: dict, main_process: bool):
    try:
        from .training.trainer import train as run_train
    except ModuleNotFoundError as e:
        raise DogkitError(f"training needs the [train] extra ({e.name} is missing): pip install -e '.[train]'") from e
    try:
        return run_train(resume=resume, overrides=overrides) if resume is not None else run_train(cfg)
    except KeyboardInterrupt as e:  # Typer turns it into a bare exit code: what the run kept is said here
        from .runs import resume_command

        kept = f"`{resume_command(resume)}` continues it" if resume is not None else \
            "no run folder had been made yet: nothing to resume"
        _interrupted["next_step"] = getattr(e, "next_step", None) or (kept if main_process else "")
        raise


@app.command()
def export(
    run: Annotated[Path | None, typer.Argument(help="Run folder (default: the best finished run by validation "
                                               "accuracy).", metavar="RUN")] = None,
    runs_dir: Annotated[Path, typer.Option(help="Where runs are looked for.")] = Path("artifacts/runs"),
    data: Annotated[Path | None, typer.Option(help="Prepared dataset for the checks (default: the run's).")] = None,
    atol: Annotated[float, typer.Option(help="Parity gate: largest allowed |logit difference| vs PyTorch.")] = 1e-3,
    parity_images: Annotated[int, typer.Option(help="Validation images in the parity gate.")] = 64,
    int8: Annotated[bool, typer.Option("--int8", help=f"Also write {by_flag('--int8').description}.")] = False,
    calibration_images: Annotated[int, typer.Option(help="Training images to calibrate INT8 on.")] = 256,
    max_drop: Annotated[float, typer.Option(help="Accuracy gate: largest allowed validation top-1 drop of the "
                                            "INT8/fp16 model, as a fraction (0.01 = one point).")] = 0.01,
    min_agreement: Annotated[float, typer.Option(help="Accuracy gate: smallest allowed share of validation images "
                                                 "on which the INT8/fp16 model gives fp32's top-1.")] = 0.97,
    fp16: Annotated[bool, typer.Option("--fp16", help=f"Also write {by_flag('--fp16').description}.")] = False,
    explain: Annotated[bool, typer.Option(help="A second output of class activation maps (where the model "
                                          "looked), for networks that end in global pooling and a linear head.")
                       ] = True,
    target_precision: Annotated[float, typer.Option(help="Selective prediction: the validation precision the "
                                                    "stored confidence threshold must reach; below it answers say "
                                                    "unsure.")] = 0.95,
) -> None:
    """Export a run's best model to ONNX, checked against PyTorch on validation images, with its temperature and
    "unsure" threshold fitted on validation."""
    try:
        from .training.export import export as run_export
    except ModuleNotFoundError as e:
        raise DogkitError(f"export needs the [train] extra ({e.name} is missing): pip install -e '.[train]'") from e
    asked = [by_flag(flag).name for flag, on in (("--int8", int8), ("--fp16", fp16)) if on]
    result = run_export(run, runs_dir=runs_dir, data=data, atol=atol, parity_images=parity_images, variants=asked,
                        calibration_images=calibration_images, max_drop=max_drop, min_agreement=min_agreement,
                        explain=explain, target_precision=target_precision, keep_going=True)
    model = _name(result.onnx_path)
    console.print("\nNext:")
    console.print(f"  dogkit eval --backend onnx --model {model}")
    console.print(f"  dogkit predict PATH... --model {model}")
    console.print(f"  dogkit bench --model {model}")
    for v in derived():
        if v.name in result.derived and "error" not in result.derived[v.name]:
            console.print(f"  ({v.label}: {_name(result.onnx_path.with_name(v.file))})")
    # A refused variant was said once, above, with its reason; the fp32 model stands (export.json records both).
    refused = [v.file for v in derived() if "error" in (result.derived.get(v.name) or {})]
    if refused:
        console.print(f"[yellow]not written[/]: {', '.join(refused)} (refused above); {model} was written")


@app.command()
def predict(
    paths: Annotated[list[str], typer.Argument(help="Image files, folders (searched recursively) or glob patterns.",
                                               metavar="PATHS")],
    model: Annotated[Path | None, typer.Option(help="ONNX model (default: model.onnx of the best finished run).")]
    = None,
    top_k: Annotated[int, typer.Option(help="Breeds to list per image.")] = 5,
    out: Annotated[Path | None, typer.Option(help="Write predictions to a .csv or .json file; - writes CSV to "
                                             "stdout (with --json, JSON).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Predictions as JSON on stdout.")] = False,
    batch_size: Annotated[int, typer.Option(help="Images per ONNX Runtime call.")] = 32,
    device: Annotated[str, typer.Option(help="cpu, or cuda with onnxruntime-gpu and a GPU.")] = "cpu",
    runs_dir: Annotated[Path, typer.Option(help="Where the default model is looked for.")] = Path("artifacts/runs"),
    raw: Annotated[bool, typer.Option("--raw", help="Show the plain softmax, not the probabilities calibrated on "
                                      "validation (which answers are unsure does not change).")] = False,
    min_confidence: Annotated[float | None, typer.Option(help="Answer 'unsure' below this calibrated top-1 "
                                                         "confidence instead of the model's stored threshold (0: "
                                                         "never unsure).")] = None,
    explain: Annotated[Path | None, typer.Option(help="Write an overlay PNG per image here: where the model "
                                                 "looked for its top breed (OUTDIR/<path below the inputs' common "
                                                 "folder, extension dropped>.png).")]
    = None,
    explain_top_k: Annotated[int, typer.Option(help="With --explain: overlays for each of the top N breeds "
                                               "(<name>.<rank>-<breed>.png).")] = 1,
) -> None:
    """Top-k dog breeds for images, with ONNX Runtime alone (no PyTorch)."""
    from .deploy.predict import PredictionWriter, answer_threshold, predict_inputs

    # Piped or asked for: machine-readable rows on stdout as they are made, not a table drawn for a terminal.
    to_stdout = str(out) == "-" or as_json or (out is None and not stdout.is_terminal)
    stream = PredictionWriter(sys.stdout, "json" if as_json else "csv", explain_top_k if explain else 0) \
        if to_stdout else None
    try:
        classifier, predictions, skipped = predict_inputs(
            paths, model, runs_dir=runs_dir, device=device, top_k=top_k, batch_size=batch_size, raw=raw,
            min_confidence=min_confidence, explain=explain, explain_top_k=explain_top_k, out=out,
            on_prediction=stream.add if stream else None)
    except BrokenPipeError:  # the reader has what it wanted (`dogkit predict … | head -3`): stop, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush must not fail again
        raise typer.Exit(0) from None
    # Results on stdout; everything else (progress, skipped files, counts) on stderr.
    for path, reason in skipped:
        console.print(f"[yellow]skipped[/] {_name(path)}: {_name(reason)}")
    if stream is not None:
        stream.close(skipped)
    elif out is not None:  # written by predict_inputs
        console.print(f"{len(predictions)} predictions → {_name(out)}"
                      + (f" (and the {len(skipped)} skipped, with their reasons)" if skipped else ""))
    if not to_stdout and (out is None or len(predictions) <= 20):
        listed = min(top_k, len(classifier.class_names))
        threshold = answer_threshold(classifier, min_confidence)
        rule = ("" if threshold is None else ", every answer unsure" if threshold == math.inf
                else f", unsure below {threshold:.1%}")
        table = Table(title=f"{_name(classifier.path.name)}: top-{listed}, "
                            f"{'raw softmax' if raw or not classifier.calibration else 'calibrated'}{rule}")
        table.add_column("image", overflow="fold")
        table.add_column("answer")
        table.add_column("breed")
        table.add_column("probability", justify="right")
        for p in predictions[:200]:
            for rank, (label, prob) in enumerate(zip(p.labels, p.probs)):
                table.add_row(_name(p.path) if rank == 0 else "", _name(p.answer) if rank == 0 else "",
                              _name(label), f"{prob:.1%}")
        stdout.print(table)
        if len(predictions) > 200:
            console.print(f"… {len(predictions) - 200} more; use --out FILE for all of them")
    unsure = sum(p.unsure for p in predictions)
    if explain is not None:
        console.print(f"{sum(len(p.explain) for p in predictions)} overlays → {_name(explain)}")
    console.print(f"{len(predictions)} images predicted, {len(skipped)} skipped"
                  + (f"; {unsure} unsure (below the confidence threshold)" if unsure else ""))


@app.command("eval")
def eval_(
    backend: Annotated[str, typer.Option(help="onnx (ONNX Runtime, no PyTorch) or torch (the run's best.pt).")]
    = "onnx",
    model: Annotated[Path | None, typer.Option(help="ONNX model (default: the best finished run's model.onnx).")]
    = None,
    run: Annotated[Path | None, typer.Option(help="Run folder (default: the best finished run).")] = None,
    data: Annotated[Path | None, typer.Option(help="Prepared dataset, or a folder of class folders (default: the "
                                              "run's dataset).")] = None,
    split: Annotated[str, typer.Option(help="train, val or test.")] = "test",
    out: Annotated[Path | None, typer.Option(help="Report folder (default: <run>/eval/<backend>-<model>-<split>).")]
    = None,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 32,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (torch also: auto, cuda:N).")] = None,
    runs_dir: Annotated[Path, typer.Option(help="Where runs are looked for.")] = Path("artifacts/runs"),
    as_json: Annotated[bool, typer.Option("--json", help="Print metrics.json on stdout instead of the summary.")]
    = False,
    localise: Annotated[bool, typer.Option(help="onnx: score the activation maps against the dataset's dog boxes "
                                           "(in the same pass as the logits).")] = True,
) -> None:
    """Accuracy, top-5, precision, recall, F1, calibration, per-class report and confusion matrix of a model, and
    whether its activation maps find the dogs."""
    from .analysis.evaluate import evaluate

    result = evaluate(backend, model=model, run=run, data=data, split=split, out=out, batch_size=batch_size,
                      device=device, runs_dir=runs_dir, localise=localise)
    # The results on stdout (the log line above went to stderr with the rest).
    if as_json:
        print((result.out_dir / "metrics.json").read_text(encoding="utf-8"), end="")
    else:
        m = result.metrics
        print("\t".join(f"{k}={m[k]:.4f}" for k in ("accuracy", "top5", "precision_macro", "recall_macro",
                                                     "f1_macro")) + f"\timages={len(result.labels)}\t"
              f"report={result.out_dir}")


# The ONNX backends and their files come from the variants table; the PyTorch ones run best.pt.
BACKENDS_HELP = (f"Comma-separated: torch, torch-bf16, torch-compile, {', '.join(ort_backends() + opencv_backends())} "
                 f"(OpenCV DNN on {', '.join(by_backend(b).file for b in opencv_backends())}); what the activation "
                 f"maps cost: {', '.join(f'{k} ({v})' for k, v in MAPS_BACKENDS.items())}.")
DEFAULT_BACKENDS = ",".join(("torch", "torch-bf16", "torch-compile", *(v.ort_backend for v in in_study())))


@app.command("bench")
def bench_(
    model: Annotated[Path | None, typer.Option(help="ONNX model (default: the best finished run's).")] = None,
    run: Annotated[Path | None, typer.Option(help="Run folder: its best.pt for the torch backends and its "
                                             "model*.onnx files.")] = None,
    backends: Annotated[str, typer.Option(help=BACKENDS_HELP)] = DEFAULT_BACKENDS,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.", callback=_batch_sizes)] = "1,8,32",
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
    from .deploy.bench import bench, save

    result = bench(model=model, run=run, backends=[b.strip() for b in backends.split(",") if b.strip()],
                   batch_sizes=batch_sizes, threads=threads, device=device,
                   images=images, warmup=warmup, min_runs=min_runs, min_time=min_time, runs_dir=runs_dir)
    table = Table(title=f"dogkit bench: {_name(result['model']['what'])}; {result['threads']} threads, "
                        f"{result['device']}")
    for col, justify in (("backend", "left"), ("what ran", "left"), ("batch", "right"), ("p50 ms", "right"),
                         ("p90 ms", "right"), ("p99 ms", "right"), ("images/s", "right"), ("peak MB", "right")):
        table.add_column(col, justify=justify)
    for r in result["rows"]:
        table.add_row(r["backend"] + (" e2e" if r["end_to_end"] else ""), r["variant"], str(r["batch"]),
                      f"{r['p50_ms']:.1f}", f"{r['p90_ms']:.1f}", f"{r['p99_ms']:.1f}", f"{r['images_per_s']:.1f}",
                      f"{r['peak_mem_mb']:.0f}")
    stdout.print(table)
    for backend, why in result["skipped"].items():
        console.print(f"[yellow]skipped[/] {_name(backend)}: {_name(why)}")
    save(result, json_out, markdown_out)


@app.command()
def serve(
    model: Annotated[Path | None, typer.Argument(help="ONNX model (default: model.onnx of the best finished run).",
                                                 metavar="MODEL")]
    = None,
    host: Annotated[str, typer.Option(help="Address to listen on; 127.0.0.1 keeps it to this machine (put a "
                                      "reverse proxy in front to expose it).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: any free one).")] = 8000,
    max_batch: Annotated[int, typer.Option(help="Images per ONNX Runtime call, at most.")] = 32,
    max_wait_ms: Annotated[float, typer.Option(help="How long a batch may wait for images still being decoded.")] = 5.0,
    max_queue: Annotated[int, typer.Option(help="Images accepted but not yet run; beyond it requests get 503.")] = 256,
    max_images: Annotated[int, typer.Option(help="Images per request; more is 413.")] = 16,
    max_body_mb: Annotated[float, typer.Option(help="Request body size limit in MB; larger is 413.")] = 32.0,
    timeout: Annotated[float, typer.Option(help="Seconds a request may take once accepted; later is 503.")] = 30.0,
    workers: Annotated[int | None, typer.Option(help="Decode threads (default: the CPUs available).")] = None,
    threads: Annotated[int | None, typer.Option(help="ONNX Runtime threads (default: the CPUs available).")] = None,
    body_budget_mb: Annotated[float, typer.Option(help="MB of request bodies held at once, all requests together; "
                                                  "beyond it 503.")] = 256.0,
    decode_budget_mb: Annotated[float | None, typer.Option(
        help="MB of images being decoded at once (default: DOGKIT_DECODE_MB, else 512).")] = None,
    header_timeout: Annotated[float, typer.Option(help="Seconds for a request's headers; then the connection "
                                                  "closes.")] = 10.0,
    body_timeout: Annotated[float, typer.Option(help="Seconds for a request's body once its headers are in; then "
                                                "the connection closes.")] = 30.0,
    keep_alive: Annotated[float, typer.Option(help="Seconds an idle connection stays open between requests.")] = 5.0,
    max_connections: Annotated[int, typer.Option(help="Open connections; requests on more get 503.")] = 1000,
    allowed_host: Annotated[list[str] | None, typer.Option(
        help="A Host header to answer (repeatable; * for any). Default: the --host address and localhost; with "
             "--host 0.0.0.0 also this machine's name and IP addresses. Others get 421.")] = None,
    device: Annotated[str, typer.Option(help="cpu, or cuda with onnxruntime-gpu and a GPU.")] = "cpu",
    runs_dir: Annotated[Path, typer.Option(help="Where the default model is looked for.")] = Path("artifacts/runs"),
) -> None:
    """The model behind an HTTP API and a web page, with dynamic batching (ONNX Runtime, no PyTorch)."""
    try:
        from .deploy.serve import ServeConfig
        from .deploy.serve import serve as run_serve
    except ImportError as e:
        raise DogkitError(f"dogkit serve needs the [serve] extra ({e.name or 'a module'} is missing): "
                          "pip install -e '.[serve]'") from e

    run_serve(model, host=host, port=port, device=device, runs_dir=runs_dir,
              config=ServeConfig(max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                                 max_images=max_images, max_body_mb=max_body_mb, timeout_s=timeout, workers=workers,
                                 threads=threads, body_budget_mb=body_budget_mb, decode_budget_mb=decode_budget_mb,
                                 header_timeout_s=header_timeout, body_timeout_s=body_timeout,
                                 keep_alive_s=keep_alive, max_connections=max_connections,
                                 allowed_hosts=tuple(allowed_host) if allowed_host else None))


@app.command("report")
def report_(
    runs: Annotated[list[Path] | None, typer.Argument(help="Run folders (default: each regime's best finished run).",
                                                      metavar="RUNS")]
    = None,
    out: Annotated[Path, typer.Option(help="Folder for report.md and its plots.")]
    = Path("artifacts/report"),
    runs_dir: Annotated[Path, typer.Option(help="Where runs are looked for.")] = Path("artifacts/runs"),
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% intervals.")] = 1000,
) -> None:
    """The regimes compared: markdown with intervals, McNemar tests, curves, per-breed errors, calibration."""
    from .analysis.report import report

    path = report(runs or None, out, runs_dir=runs_dir, resamples=resamples)
    console.print("Open it (GitHub renders it with its plots):")
    print(path)  # the result, alone on stdout: `xdg-open "$(dogkit report)"`


@app.command()
def study(
    budget: Annotated[str, typer.Option(help="full: the presets, meant for a GPU; quick: minutes on a CPU, a smoke "
                                        "test; lite0: EfficientNet-Lite0 from ImageNet, three seeds and baselines, "
                                        "about 40 min on a 2-core CPU; cpu: ResNet50 at 64 px; gpu: 112 px, three "
                                        "seeds.")] = "full",
    source: Annotated[list[Path] | None, typer.Option("--source", "-s", help="Dataset folder or archives for "
                                                      "`prepare` (default: download).")] = None,
    data: Annotated[Path, typer.Option(help="Prepared dataset folder.")] = Path("artifacts/data/stanford-dogs"),
    runs_dir: Annotated[Path, typer.Option(help="Where the runs go.")] = Path("artifacts/runs"),
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("artifacts/report"),
    weights: Annotated[Path | None, typer.Option(help="Local ImageNet state dict for regimes 1 and 2 (offline).")]
    = None,
    pretrain_source: Annotated[list[Path] | None, typer.Option(
        "--pretrain-source", help="Instead of ImageNet weights: a dataset of other classes to pretrain on from "
        "scratch (a stand-in); its best model starts regimes 1 and 2.")] = None,
    pretrain_data: Annotated[Path | None, typer.Option(help="Prepared folder of the pretraining set (default: "
                                                       "artifacts/data/<source folder name>).")] = None,
    seeds: Annotated[str | None, typer.Option(help="Comma-separated seeds: each regime is trained once per seed "
                                              "on the same split (default: the budget's).", callback=_seed_list)]
    = None,
    bench: Annotated[bool, typer.Option("--bench/--no-bench", help="Benchmark the exported model.")] = True,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Training setting KEY=VALUE for every run.")]
    = None,
) -> None:
    """prepare → (pretrain) → train regimes 1, 2, 3 per seed → export the best → evaluate on ONNX → bench → report."""
    from .study import study as run_study
    from .training.config import parse_set

    run_study(budget, sources=source, data=data, runs_dir=runs_dir, out=out, weights=weights,
              overrides=parse_set(set_ or []), bench=bench, seeds=seeds,
              pretrain_sources=pretrain_source, pretrain_data=pretrain_data)


# Modules of the [train] extra: a command that needs one says which install brings it.
TRAIN_MODULES = ("torch", "torchvision", "albumentations", "onnx", "onnxscript", "matplotlib", "yaml")


# What an interrupted command kept and how to go on. `train` says it itself, with its run folder (_interrupted).
NEXT_STEP = {
    "prepare": "the same command again resumes a cut download and reuses the finished downloads and extractions",
    "study": "finished work is kept: the same command again skips the steps done and resumes an unfinished "
             "training run",
}
_interrupted: dict[str, str] = {}


# Settings whose option is named otherwise; every other one is its field's name: --top-k for top_k.
OPTION_OF = {"sources": "source", "cache_size": "cache", "timeout_s": "timeout", "header_timeout_s": "header_timeout",
             "body_timeout_s": "body_timeout", "keep_alive_s": "keep_alive", "allowed_hosts": "allowed_host"}


def _option(setting: str) -> str:
    return "--" + OPTION_OF.get(setting, setting).replace("_", "-")


def _say(message: str) -> None:
    console.print(f"[bold red]error:[/] {escape(one_line(message))}")


def _one_line(text: str) -> str:
    """The last meaningful line: what an error not of dogkit's own says last is what went wrong."""
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _log_traceback() -> Path | None:
    """Write the current exception's traceback to artifacts/logs (or the temp folder); return the file."""
    import tempfile
    import time
    import traceback

    text = f"dogkit {' '.join(sys.argv[1:])}\n\n{traceback.format_exc()}"
    name = f"dogkit-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    for folder in (Path("artifacts/logs"), Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text, encoding="utf-8")
            return folder / name
        except OSError:
            continue
    return None


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; every failure ends as one line on stderr and a non-zero exit code.

    DogkitError and bad options: the message, exit 2. Ctrl-C: exit 130; SIGTERM: the same, exit 143. Anything
    unexpected: one line saying where the full traceback was written (or the traceback itself with --debug), exit 1.
    """
    from .log import setup

    setup()
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("DOGKIT_DEBUG", "").lower() in ("1", "true", "yes")
    args = [a for a in args if a != "--debug"]
    stopped = {"by": None}
    _interrupted.clear()

    def on_sigterm(signum, frame) -> None:
        # What docker stop, Kubernetes and SLURM send: raised where the work is, so it ends as Ctrl-C does.
        stopped["by"] = "SIGTERM"
        raise Terminated()

    previous = (signal.signal(signal.SIGTERM, on_sigterm) if threading.current_thread() is threading.main_thread()
                else None)
    try:
        _run(args, debug, stopped)
    finally:
        if previous is not None:  # main() called in a process of its own making (tests) leaves it as it was
            signal.signal(signal.SIGTERM, previous)


def _run(args: list[str], debug: bool, stopped: dict) -> None:
    try:
        # Not standalone: errors come back here instead of being printed by Typer as a boxed panel.
        code = app(args=args, prog_name="dogkit", standalone_mode=False)
    except (KeyboardInterrupt, typer.Abort):
        code = 130
    except ClickException as e:  # bad options: click names the option and what is wrong
        command = f"dogkit {e.ctx.command_path.split(' ', 1)[1]}" if getattr(e, "ctx", None) and " " in \
            e.ctx.command_path else "dogkit"
        _say(f"{e.format_message()} (see `{command} --help`)")
        sys.exit(e.exit_code)
    except SettingError as e:  # refused by a settings dataclass: named as the option that gave it
        command = args[0] if args and not args[0].startswith("-") else ""
        _say(f"Invalid value for '{_option(e.setting)}': {e.problem} (see `dogkit {command} --help`)")
        sys.exit(2)
    except DogkitError as e:
        _say(str(e))  # one line, every line of it kept (a worker's traceback: its original error)
        sys.exit(2)
    except OSError as e:
        import errno

        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            _unexpected(e, debug)
        from .atomic import write_problem

        # Wherever the disk filled (a metrics row, a log line, a plot): one line; what was written before stands.
        _say(f"{write_problem(e.filename or '.', e)}; free some space and run the same command again")
        sys.exit(2)
    except ImportError as e:
        name = getattr(e, "name", None) or ""
        if debug:
            raise
        if name.split(".")[0] in TRAIN_MODULES or "torch" in str(e):
            _say(f"this command needs the [train] extra ({name or 'a module'} is missing: {_one_line(str(e))}): "
                 "pip install -e '.[train]'")
            sys.exit(2)
        _report_unexpected(e)
    except Exception as e:
        _unexpected(e, debug)
    if code == 130 and stopped["by"]:  # Click turns the interruption into Abort: the handler says which it was
        code = 143  # 128 + SIGTERM, as a process ended by the signal reports
    if code in (130, 143):  # Typer turns Ctrl-C into a bare exit code 130
        command = args[0] if args and not args[0].startswith("-") else ""
        step = _interrupted.get("next_step", NEXT_STEP.get(command))
        console.print(f"[yellow]interrupted[/] ({stopped['by'] or 'Ctrl-C'}){'; ' + escape(step) if step else ''}")
    if isinstance(code, int) and code:
        sys.exit(code)


def _unexpected(e: BaseException, debug: bool) -> None:
    """An error dogkit did not raise itself: an unreadable image is still one line; anything else is reported with
    its traceback kept (shown with --debug)."""
    from .data.images import ImageError

    if isinstance(e, ImageError) or type(e).__name__ == "ImageError":
        _say(one_line(e).removeprefix(f"{ImageError.__module__}.{ImageError.__name__}: "))
        sys.exit(2)
    if debug:
        raise e
    _report_unexpected(e)


def _report_unexpected(e: BaseException) -> None:
    log = _log_traceback()
    where = f"full traceback in {log}" if log else "run again with --debug for the traceback"
    _say(f"unexpected {type(e).__name__}: {_one_line(str(e)) or 'no message'} ({where}; --debug shows it)")
    sys.exit(1)


if __name__ == "__main__":
    main()
