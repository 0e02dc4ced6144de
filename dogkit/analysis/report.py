"""``dogkit report``: the regimes compared, as GitHub-readable markdown with PNG plots beside it.

Reads only what the runs wrote (config.json, environment.json, metrics.csv, test_metrics.json,
test_predictions.npz, export.json, bench.json) and, for thumbnails, the dataset's images. Numpy,
scikit-learn, SciPy and matplotlib: no torch.
"""

from __future__ import annotations

import contextlib
import csv
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np
from rich.markup import escape

from ..atomic import atomic_write_text
from ..calibration import ece, nll, probabilities, reliability
from ..data.dataset import load_dataset
from ..errors import DogkitError
from ..log import log
from ..metrics import confusion, macro_scores, per_class_report
from ..regimes import either, in_words, pretrained_numbers, regime
from ..runs import BASELINES_FILE, DEFAULT_RUNS_DIR, default_runs, read_json
from ..settings import at_least, writable
from ..text import json_text, shown
from ..variants import Variant, base, derived
from .explained import explained, gallery
from .plots import percent_axis, plot_confusion, points, pyplot, save
from .stats import bootstrap_ci, mcnemar, paired_difference


def regime_name(exp: object) -> str | None:
    """``1: pretrained + Adam``, from the regimes table; None for a run of no regime."""
    row = regime(exp)
    return row.label if row else None


def _pretrained() -> str:
    """The pretrained regimes' numbers, in words: ``1 and 2``."""
    return either(pretrained_numbers(), "and")


def caveat() -> str:
    return (f"Stanford Dogs was built from ImageNet images, so the ImageNet-pretrained regimes ({_pretrained()}) "
            "have very likely seen many of these test pictures during pre-training: their test scores are "
            "optimistic, and the gap to the from-scratch regime overstates what pre-training buys on new photos.")


@dataclass
class Run:
    path: Path
    config: dict
    env: dict
    history: list[dict]
    test: dict
    predictions: dict | None = None
    export: dict | None = None
    bench: dict | None = None
    extras: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        exp = self.config.get("exp")
        regime = regime_name(exp) or f"custom ({self.config.get('optimizer')})"
        return f"{regime} — {md(self.path.name)}"

    @property
    def plain(self) -> str:
        """The run's short name as plots show it."""
        if "short" in self.extras:  # set by the report when a regime has several seeds
            return self.extras["short"]
        return f"exp{self.config['exp']}" if self.config.get("exp") else shown(self.path.name)

    @property
    def short(self) -> str:
        """The short name as report.md shows it (``md``)."""
        return md(self.plain)

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    @property
    def setup(self) -> dict:
        """What two runs must share for their numbers to be compared: the data (by manifest), the image size,
        the crop, and whether either is a smoke test (epochs cut to a few steps, or a quick-budget run)."""
        data = self.env.get("manifest_sha256") or self.config.get("data")
        return {"data": data, "image size": self.config.get("image_size"), "crop": self.config.get("crop"),
                "smoke test": self.smoke}

    @property
    def smoke(self) -> bool:
        """A run that can only show the pipeline works: capped epochs, or one or two epochs."""
        return bool(self.config.get("max_steps_per_epoch")) or int(self.config.get("epochs") or 0) <= 2

    @property
    def start(self) -> dict:
        """Where the run's weights started: ImageNet, random, a file, or another dogkit run (a stand-in)."""
        weights = self.config.get("weights")
        if not weights:
            if self.config.get("pretrained"):
                return {"kind": "imagenet", "source": self.env.get("imagenet_weights")}
            return {"kind": "random"}
        source = Path(weights).parent
        config, test = read_json(source / "config.json"), read_json(source / "test_metrics.json")
        if config is None:
            return {"kind": "file", "name": shown(Path(weights).name)}
        out = {"kind": "run", "run": shown(source.name), "data": shown(Path(config.get("data", "?")).name),
               "epochs": config.get("epochs"), "image_size": config.get("image_size")}
        with contextlib.suppress(TypeError, KeyError, ValueError):  # an unfinished or damaged pretraining run
            out["test_top1"] = float(test["best"]["test"]["accuracy"])
        return out


def load_run(path: Path) -> Run:
    config, test = read_json(path / "config.json"), read_json(path / "test_metrics.json")
    if config is None or test is None:
        raise DogkitError(f"{path} is not a finished dogkit run (config.json or test_metrics.json missing)")
    with open(path / "metrics.csv", newline="", encoding="utf-8") as f:
        history = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]
    predictions = None
    if (path / "test_predictions.npz").is_file():
        with np.load(path / "test_predictions.npz") as npz:
            predictions = {k: npz[k] for k in npz.files}
    return Run(path, config, read_json(path / "environment.json") or {}, history, test, predictions,
               read_json(path / "export.json"), read_json(path / "bench.json"))


def _number(value: str):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


# ----------------------------------------------------------------------------- plots


def plot_learning_curves(runs: list[Run], out: Path) -> str:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    smoothed = False
    for run in runs:
        epochs = [r["epoch"] for r in run.history]
        # Like with like: the plain training cross-entropy where the run logged it (label smoothing alone puts a
        # floor under the loss it optimises); for older runs the smoothed one, and the legend says so.
        plain = all(isinstance(r.get("train_loss_plain"), float) for r in run.history)
        smoothing = 0.0 if plain else float(run.config.get("label_smoothing") or 0)
        smoothed |= smoothing > 0
        train = f"train (augmented, smoothing {smoothing:g})" if smoothing else "train (augmented)"
        for key, style, name in (("train", "--", train), ("val", "-", "val")):
            column = "train_loss_plain" if key == "train" and plain else f"{key}_loss"
            line = axes[0].plot(epochs, [r[column] for r in run.history], style, marker=points(len(epochs)), ms=4,
                                label=f"{run.plain} {name}")
            axes[1].plot(epochs, [r[f"{key}_accuracy"] for r in run.history], style, color=line[0].get_color(),
                         marker=points(len(epochs)), ms=4, label=f"{run.plain} {name}")
    titles = ("loss (training: label-smoothed cross-entropy)" if smoothed else "loss", "top-1 accuracy")
    percent_axis(axes[1].yaxis)
    for ax, title in zip(axes, titles):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save(fig, out / "learning_curves.png")


def plot_averages(run: Run, out: Path, name: str = "averaged_adam.png") -> str | None:
    names = ["val"] + [k[: -len("_val_loss")] + "_val" for k in run.history[0] if k.endswith("_val_loss")
                       and k != "val_loss"]
    if len(names) == 1:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    epochs = [r["epoch"] for r in run.history]
    for prefix in names:
        label = "raw Adam iterate" if prefix == "val" else prefix[: -len("_val")]
        axes[0].plot(epochs, [r[f"{prefix}_loss"] for r in run.history], marker="o", label=label)
        axes[1].plot(epochs, [r[f"{prefix}_accuracy"] for r in run.history], marker="o", label=label)
    percent_axis(axes[1].yaxis)
    for ax, title in zip(axes, ("validation loss", "validation top-1")):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("epoch")
        ax.set_title(f"{run.plain}: {title}, one trajectory")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save(fig, out / name)


def plot_per_class(rows: list[dict], out: Path) -> str:
    plt = pyplot()
    worst = sorted(rows, key=lambda r: (r["f1"], r["recall"]))[:10]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    y = np.arange(len(worst))
    ax.barh(y - 0.2, [r["precision"] for r in worst], 0.4, label="precision")
    ax.barh(y + 0.2, [r["recall"] for r in worst], 0.4, label="recall")
    ax.set_yticks(y, [r["class"] for r in worst], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    percent_axis(ax.xaxis)
    ax.set_title("Ten worst breeds (by F1) of the best model")
    ax.legend()
    return save(fig, out / "worst_breeds.png")


def plot_per_breed_recall(runs: list[Run], names: list[str], out: Path) -> str | None:
    """Test recall of every breed, one bar per regime (its first run), breeds sorted by the first regime's recall:
    where pretraining helps, and which breeds no regime gets."""
    firsts = {}
    for run in runs:
        if run.predictions is not None and run.config.get("exp") not in firsts:
            firsts[run.config.get("exp")] = run
    if not firsts:
        return None
    recalls = {exp: [r["recall"] for r in per_class_report(run.predictions["labels"],
                                                          run.predictions["logits"].argmax(1), names)]
               for exp, run in firsts.items()}
    order = np.argsort(-np.asarray(next(iter(recalls.values()))), kind="stable")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, max(4.0, 0.16 * len(names) * len(firsts) / 2 + 1)))
    height = 0.8 / len(firsts)
    y = np.arange(len(names))
    for k, (exp, values) in enumerate(recalls.items()):
        ax.barh(y + (k - (len(firsts) - 1) / 2) * height, np.asarray(values)[order], height,
                label=firsts[exp].label.split(" — ")[0])
    ax.set_yticks(y, [names[i] for i in order], fontsize=6 if len(names) > 60 else 7)
    ax.set_ylim(len(names) - 0.5, -0.5)  # the best-recalled breed on top, no empty margin
    ax.set_xlim(0, 1)
    percent_axis(ax.xaxis)
    ax.set_xlabel("test recall")
    ax.set_title("Recall per breed (test split)")
    ax.legend(fontsize=7, loc="lower right")
    return save(fig, out / "per_breed_recall.png")


def plot_reliability(cal: dict, out: Path, title: str) -> str:
    """The reliability diagram before and after temperature scaling, side by side (one panel when only the raw
    logits are known): accuracy per confidence bin against the diagonal of perfect calibration."""
    plt = pyplot()
    panels = [("reliability_raw", "raw softmax", "ece_raw")]
    if cal.get("reliability") is not None:
        panels.append(("reliability", f"temperature {cal['temperature']:.2f}", "ece"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 4.5), squeeze=False)
    for ax, (key, name, ece_key) in zip(axes[0], panels):
        rows = cal[key]
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax.bar([(b["lo"] + b["hi"]) / 2 for b in rows], [b["accuracy"] for b in rows],
               width=[b["hi"] - b["lo"] for b in rows], alpha=0.7, edgecolor="k", label="accuracy per bin")
        ax.plot([b["confidence"] for b in rows], [b["accuracy"] for b in rows], "o", ms=3, color="C3",
                label="(mean confidence, accuracy) of the bin")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        percent_axis(ax.xaxis)
        percent_axis(ax.yaxis)
        ax.set_title(f"{name} (ECE {cal[ece_key]:.3f})")
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(title)
    return save(fig, out / "reliability.png")


def plot_risk_coverage(cal: dict, validation: dict | None, out: Path) -> str:
    """Precision against the share of test images answered, as the threshold on calibrated confidence falls; the
    stored threshold's test point marked, and the precision it was chosen for on validation."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.5))
    curve = cal["risk_coverage"]
    ax.plot([p["coverage"] for p in curve], [p["precision"] for p in curve], "-", label="test")
    target = (validation or {}).get("selective", {}).get("target_precision")
    if target is not None:
        ax.axhline(target, color="k", ls=":", lw=1, label=f"validation target {100 * target:.0f}%")
    chosen = cal.get("selective") or {}
    if chosen.get("threshold") is not None and chosen.get("precision") is not None:
        ax.plot([chosen["coverage"]], [chosen["precision"]], "o", color="C3", ms=8,
                label=f"stored threshold {chosen['threshold']:.2f}")
    ax.set_xlim(0, 1)
    ax.set_xlabel("coverage (share of images answered)")
    ax.set_ylabel("precision of the answers")
    percent_axis(ax.xaxis)
    percent_axis(ax.yaxis)
    ax.set_title("Risk–coverage on test (calibrated confidence)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, out / "risk_coverage.png")


def plot_confused_pairs(pairs: list[dict], run: Run, out: Path) -> str | None:
    """One test image per most-confused pair: true breed, predicted breed."""
    try:
        dataset = load_dataset(run.config["data"])
    except DogkitError:
        return None
    by_path = {r.path: r for r in dataset.records}
    examples = [(p, by_path.get(p["example"])) for p in pairs if p.get("example") in by_path]
    if not examples:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(examples), figsize=(2.6 * len(examples), 3.2), squeeze=False)
    for ax, (pair, rec) in zip(axes[0], examples):
        ax.imshow(dataset.load_rgb(rec))
        ax.set_title(f"{pair['true']}\n→ {pair['predicted']} ({pair['count']}×)", fontsize=8)
        ax.axis("off")
    return save(fig, out / "confused_pairs.png")


# ----------------------------------------------------------------------------- analysis


def summarise(run: Run, resamples: int) -> dict:
    best = run.test["best"]
    row = {"variant": best["variant"], "best_epoch": best["epoch"], "test": best["test"],
           # Training steps plus validation (which, with averaging, includes every average's BatchNorm pass).
           "train_time_s": sum(r.get("epoch_time_s", 0) + (r.get("val_time_s") or 0) for r in run.history),
           "img_per_s": float(np.mean([r.get("img_per_s", 0) for r in run.history])),
           "parameters": run.env.get("parameters")}
    if run.predictions is not None:
        labels, preds = run.predictions["labels"], run.predictions["logits"].argmax(1)
        num_classes = run.predictions["logits"].shape[1]
        intervals = bootstrap_ci(labels, preds, lambda y, p: macro_scores(y, p, num_classes), resamples=resamples)
        for key, ci in zip(("accuracy", "precision_macro", "recall_macro", "f1_macro"), intervals):
            row[f"{key}_ci"] = ci
        k = min(5, num_classes)
        top5 = (np.argsort(-run.predictions["logits"], axis=1)[:, :k] == labels[:, None]).any(axis=1)
        row["top5_ci"] = bootstrap_ci(labels, top5, lambda _, hit: float(hit.mean()), resamples=resamples)
    return row


def confused_pairs(labels, preds, paths, class_names, top: int = 6) -> list[dict]:
    cm = confusion(labels, preds, len(class_names))
    np.fill_diagonal(cm, 0)
    pairs = []
    for flat in np.argsort(-cm, axis=None)[:top]:
        i, j = np.unravel_index(flat, cm.shape)
        if cm[i, j] == 0:
            break
        hit = np.flatnonzero((labels == i) & (preds == j))
        pairs.append({"true": class_names[i], "predicted": class_names[j], "count": int(cm[i, j]),
                      "example": str(paths[hit[0]]) if len(hit) else None})
    return pairs


def _fmt(value, ci=None) -> str:
    if value is None:
        return "–"
    text = f"{100 * value:.1f}"
    return f"{text} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else text


@dataclass(frozen=True)
class ReportSettings:
    """Where ``report`` writes and how many bootstrap resamples its intervals take, checked before any run is read."""

    out: Path = Path("artifacts/report")
    resamples: int = 1000

    def __post_init__(self) -> None:
        writable(self, "out", folder=True)
        at_least(self, 1, "resamples")


def report(run_dirs: list[Path] | None = None, out: Path = ReportSettings.out, *,
           runs_dir: Path = DEFAULT_RUNS_DIR, resamples: int = ReportSettings.resamples, quick: bool = False) -> Path:
    """``report.md`` with its plots and ``summary.json`` in ``out``: the runs compared on the test split, the
    significance of their differences, learning curves, the best model's breeds, confusions and calibration,
    deployment figures and what reproduces it all."""
    ReportSettings(Path(out), resamples)
    runs = [load_run(Path(p)) for p in (run_dirs or default_runs(runs_dir))]
    out.mkdir(parents=True, exist_ok=True)
    _name_runs(runs)
    summaries = [summarise(r, resamples) for r in runs]
    best = runs[max(range(len(runs)), key=lambda i: runs[i].test["best"]["val"]["accuracy"])]
    regimes = sorted({r.config.get("exp") for r in runs if r.config.get("exp")})
    what = (f"{in_words(len(regimes))} training regime{'s' if len(regimes) != 1 else ''} compared"
            if len(regimes) == len({r.config.get("exp") for r in runs}) else f"{len(runs)} runs compared")
    lines = [f"# Dog-breed classification on Stanford Dogs: {what}", ""]
    smoke = [r.short for r in runs if r.smoke]
    if quick or smoke:
        source = ("comes from `dogkit study --budget quick`: small images and a couple of epochs" if quick else
                  f"includes smoke-test runs ({', '.join(smoke)}: one or two epochs, or epochs capped to a few "
                  "steps)")
        lines += [f"> **Smoke test.** This report {source}. Its numbers show that the pipeline works, not how the "
                  "regimes compare.", ""]
    lines += _comparability(runs)
    lines += _caveats(runs)
    lines += _summary(runs, summaries, resamples)
    lines += _across_seeds(runs)
    lines += _baselines(runs, read_json(out / BASELINES_FILE))
    lines += _significance(runs)
    lines += _per_breed(runs, best, out)
    lines += _curves(runs, out)
    lines += ["", f"## The best model: {best.label}", ""]
    if best.predictions is not None:
        lines += _best_model(best, out)
    found = {r.path: explained(r.path) for r in runs}
    lines += _calibration(runs, best, out, found)
    lines += _selective(best, out, found[best.path])
    lines += _files_calibration(best)
    lines += _localisation(runs, found)
    lines += _gallery(best, out, found[best.path])
    lines += _deployment(runs)
    lines += _study_times(out)
    lines += _reproducibility(runs)
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    seeds = _seed_table(runs)
    atomic_write_text(out / "summary.json", json_text({**{r.path.name: s for r, s in zip(runs, summaries)},
                                                        **({"across_seeds": seeds} if seeds else {})},
                                                       indent=2, default=str) + "\n")
    log.info(f"report: {escape(shown(path))}")
    return path


def _name_runs(runs: list[Run]) -> None:
    """Short names: ``exp1``, or ``exp1-seed2`` when a regime has runs with several seeds."""
    for run in runs:
        same = [r for r in runs if r.config.get("exp") == run.config.get("exp")]
        if run.config.get("exp") and len({r.seed for r in same}) > 1:
            run.extras["short"] = f"exp{run.config['exp']}-seed{run.seed}"


def _differences(a: Run, b: Run) -> list[str]:
    """The settings that make two runs' numbers incomparable, as 'image size 96 vs 64'."""
    sa, sb = a.setup, b.setup
    named = {"data": "different data", "smoke test": "one is a smoke test"}
    return [named.get(key, f"{key} {sa[key]} vs {sb[key]}") for key in sa if sa[key] != sb[key]]


def _comparability(runs: list[Run]) -> list[str]:
    """A loud notice when the runs were not made on the same footing; McNemar then skips such pairs."""
    ref = runs[0]
    odd = {r.short: _differences(r, ref) for r in runs[1:] if _differences(r, ref)}
    if not odd:
        return []
    rows = "; ".join(f"{name} against {ref.short}: {', '.join(diff)}" for name, diff in odd.items())
    return [f"> **Not comparable.** These runs were not made on the same footing ({rows}). Their numbers are shown "
            "side by side, but a difference between them says nothing about the regimes; McNemar's test is not run "
            "on such pairs. Compare runs from one `dogkit study` budget, or pass runs made alike to `dogkit "
            "report`.", ""]


def _start_text(start: dict) -> str:
    if start["kind"] == "run":
        score = f", its test top-1 {_fmt(start['test_top1'])}%" if "test_top1" in start else ""
        return (f"the best model of dogkit run `{start['run']}`, trained from scratch on {start['data']} "
                f"({start['epochs']} epoch{'s' if start['epochs'] != 1 else ''} at {start['image_size']} px{score})")
    if start["kind"] == "imagenet":
        return f"ImageNet weights ({md(start['source'])})" if start.get("source") else "ImageNet weights"
    return "random weights" if start["kind"] == "random" else f"the weights file `{start.get('name')}`"


def _caveats(runs: list[Run]) -> list[str]:
    """The ImageNet caveat, or, when the pretrained runs started from another dogkit run, the stand-in's."""
    pretrained = pretrained_numbers()
    starts = {_start_text(r.start): r.start for r in runs if r.config.get("exp") in pretrained}
    standin = [s for s in starts.values() if s["kind"] == "run"]
    lines = []
    if standin:
        lines += [f"> **Stand-in for ImageNet.** The pretrained regimes ({_pretrained()}) did not start from ImageNet "
                  f"weights but from {'; '.join(_start_text(s) for s in standin)}. This is transfer learning of the "
                  "same shape (pretrained on related images, fine-tuned on new classes) at a far smaller scale than "
                  "ImageNet: read \"pretrained\" below as \"pretrained on that set\". These are not ImageNet "
                  "results.", ""]
    random = sorted(r.short for r in runs if r.config.get("exp") in pretrained and r.start["kind"] == "random")
    if random:
        lines += [f"> **No pretrained weights.** {', '.join(random)} started from random weights (no ImageNet "
                  "weights were given or could be downloaded): \"pretrained\" regimes here are trained from scratch "
                  "with their own optimiser settings, so this is no test of transfer.", ""]
    imagenet = sorted(text for text, s in starts.items() if s["kind"] == "imagenet")
    if imagenet:
        lines += [f"> **Weights.** The pretrained regimes ({_pretrained()}) started from {'; '.join(imagenet)}. "
                  f"**Caveat.** {caveat()}", ""]
    return lines


def _summary(runs: list[Run], summaries: list[dict], resamples: int) -> list[str]:
    lines = ["## Summary (test split)", "",
             "Test metrics of each run's best model (chosen on validation), in %, with bootstrap 95% intervals "
             f"({resamples} resamples of the test images).", "",
             "| regime | model | top-1 | macro precision | macro recall | macro F1 | top-5 | best epoch "
             "| train time (with validation) | train img/s | parameters |",
             "|---|---|---|---|---|---|---|---:|---:|---:|---:|"]
    for run, s in zip(runs, summaries):
        t = s["test"]
        params = f"{s['parameters'] / 1e6:.1f} M" if s["parameters"] else "–"
        lines.append(f"| {run.label} | {s['variant']} | {_fmt(t['accuracy'], s.get('accuracy_ci'))} | "
                     f"{_fmt(t['precision_macro'], s.get('precision_macro_ci'))} | "
                     f"{_fmt(t['recall_macro'], s.get('recall_macro_ci'))} | "
                     f"{_fmt(t['f1_macro'], s.get('f1_macro_ci'))} | {_fmt(t['top5'], s.get('top5_ci'))} | "
                     f"{s['best_epoch']} | "
                     f"{s['train_time_s'] / 60:.1f} min | "
                     f"{s['img_per_s']:.1f} | {params} |")
    return lines


SEED_METRICS = (("accuracy", "top-1"), ("precision_macro", "macro precision"), ("recall_macro", "macro recall"),
                ("f1_macro", "macro F1"), ("top5", "top-5"))


def _seed_table(runs: list[Run]) -> dict:
    """Per regime: each seed's test metrics, their mean and sd; per pair of regimes: the paired differences in
    macro precision and recall over the seeds both have. Empty unless some regime has several seeds."""
    regimes: dict[int, dict[int, dict]] = {}
    for r in runs:
        if r.config.get("exp"):
            regimes.setdefault(r.config["exp"], {})[r.seed] = r.test["best"]["test"]
    if not any(len(seeds) > 1 for seeds in regimes.values()):
        return {}
    table = {"regimes": {}, "paired": []}
    for exp, by_seed in sorted(regimes.items()):
        values = {k: np.array([m[k] for m in by_seed.values()]) for k, _ in SEED_METRICS}
        table["regimes"][exp] = {"seeds": sorted(by_seed), **{
            k: {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else None}
            for k, v in values.items()}}
    for a, b in combinations(sorted(regimes), 2):
        common = sorted(set(regimes[a]) & set(regimes[b]))
        if len(common) < 2:
            continue
        for key in ("precision_macro", "recall_macro"):
            diff = paired_difference([regimes[a][s][key] for s in common], [regimes[b][s][key] for s in common])
            table["paired"].append({"a": a, "b": b, "metric": key, "seeds": common, **diff})
    return table


def _across_seeds(runs: list[Run]) -> list[str]:
    table = _seed_table(runs)
    if not table:
        return []
    lines = ["", "## Across seeds: which recipe is better", "",
             "Each regime was trained once per seed on the same split (seeds change the initial head, the batch "
             "order and the augmentation). Mean ± standard deviation over seeds of each run's test metrics, in %; "
             "the rows above are the single runs.", "",
             "| regime | seeds | " + " | ".join(name for _, name in SEED_METRICS) + " |",
             "|---|---|" + "---:|" * len(SEED_METRICS)]
    for exp, row in table["regimes"].items():
        cells = [f"{100 * row[k]['mean']:.1f} ± {100 * row[k]['sd']:.1f}" if row[k]["sd"] is not None
                 else _fmt(row[k]["mean"]) for k, _ in SEED_METRICS]
        lines.append(f"| {regime_name(exp) or exp} | {', '.join(map(str, row['seeds']))} | {' | '.join(cells)} |")
    if table["paired"]:
        lines += ["", "Paired comparison over seeds: the difference A − B of each seed's test score, its mean with a "
                  "95% t interval, and the paired t-test. This answers \"which recipe is better\" (with this many "
                  "seeds only a large, consistent difference is significant); McNemar below answers \"which model "
                  "is better on these test images\".", "",
                  "| A | B | metric | per-seed A − B (points) | mean | 95% interval | paired t-test p |",
                  "|---|---|---|---|---:|---:|---:|"]
        for d in table["paired"]:
            ci = f"[{100 * d['ci'][0]:+.1f}, {100 * d['ci'][1]:+.1f}]" if d["ci"] else "–"
            p = f"{d['p_value']:.3g}" if d["p_value"] is not None else "–"
            per_seed = ", ".join(f"{100 * x:+.1f}" for x in d["differences"])
            lines.append(f"| exp{d['a']} | exp{d['b']} | {d['metric'].replace('_macro', '')} | {per_seed} | "
                         f"{100 * d['mean']:+.1f} | {ci} | {p} |")
    return lines




def _baselines(runs: list[Run], baselines: dict | None) -> list[str]:
    """What fine-tuning adds: the untrained ImageNet head restricted to the dataset's synsets and a linear probe
    on frozen features, beside the mean of each pretrained regime's runs."""
    if not baselines:
        return []
    rows, notes = [], []
    for r in (baselines.get("zero_shot") or {}).get("results", []):
        rows.append((f"zero-shot: the ImageNet head restricted to the {r['classes']} breeds' synsets", "nothing",
                     r["size"], r["test"]))
        notes.append(f"{100 * r['accuracy_imagenet']:.1f}% at {r['size']} px")
    if probe := baselines.get("linear_probe"):
        rows.append((f"linear probe (`{md(probe['run'])}`)", f"a new head on frozen features, {probe['epochs']} "
                     f"epochs at {probe['lr']:g}", probe["size"], probe["test"]))
    for exp in pretrained_numbers():
        same = [r for r in runs if r.config.get("exp") == exp]
        if same:
            mean = {k: float(np.mean([r.test["best"]["test"][k] for r in same])) for k, _ in SEED_METRICS}
            what = f"mean of {len(same)} seeds" if len(same) > 1 else md(same[0].path.name)
            rows.append((f"{regime_name(exp)} ({what})", f"fine-tuned, {same[0].config.get('epochs')} epochs",
                         same[0].config.get("image_size"), mean))
    lines = ["", "## Baselines: what fine-tuning adds", "",
             "The same test images, in %: the ImageNet network with no training on this dataset (its own 1000-class "
             "head, answering among the dataset's breeds only), a linear probe (a new head trained on the frozen "
             "network), and the fine-tuned regimes.", "",
             "| | trains | image size | " + " | ".join(name for _, name in SEED_METRICS) + " |",
             "|---|---|---:|" + "---:|" * len(SEED_METRICS)]
    lines += [f"| {name} | {trains} | {size} | " + " | ".join(_fmt(metrics.get(k)) for k, _ in SEED_METRICS) + " |"
              for name, trains, size, metrics in rows]
    if notes:
        lines += ["", f"The untrained head's top-1 among all 1000 ImageNet classes: {', '.join(notes)}. "
                  f"{caveat()}"]
    return lines


def _per_breed(runs: list[Run], best: Run, out: Path) -> list[str]:
    scored = [r for r in runs if r.predictions is not None]
    if not scored:
        return []
    plot = plot_per_breed_recall(runs, _class_names(best, scored[0].predictions["logits"].shape[1]), out)
    return ["", "## Recall per breed", "", f"![recall per breed]({plot})"] if plot else []


def _study_times(out: Path) -> list[str]:
    """How long each step of `dogkit study` took, when the report was written by one."""
    times = read_json(out / "study_times.json")
    if not times or not times.get("steps"):
        return []
    lines = ["", "## Time per step", "", f"`dogkit study --budget {times.get('budget')}`, wall time of each step (a "
             "training run resumed after an interruption: the sum of its invocations):", "", "| step | minutes |",
             "|---|---:|"]
    lines += [f"| {step} | {seconds / 60:.1f} |" for step, seconds in times["steps"].items()]
    return lines + [f"| **total** | **{times.get('total_s', 0) / 60:.1f}** |"]


def _significance(runs: list[Run]) -> list[str]:
    """McNemar's test for every pair of runs with per-image test predictions."""
    paired = [r for r in runs if r.predictions is not None]
    if len(paired) < 2:
        return []
    several = len({r.seed for r in paired}) > 1
    lines = ["", "### Is the difference real? McNemar's test on the same test images", "",
             "Each row compares two trained models on the same test images: it answers \"which of these two models "
             "is better on these images\", not which recipe is better in general."
             + (" With several seeds, each pair of regimes is compared seed by seed." if several else ""), "",
             "| A | B | only A right | only B right | p-value |", "|---|---|---:|---:|---:|"]
    for a, b in combinations(paired, 2):
        if several and (a.seed != b.seed or a.config.get("exp") == b.config.get("exp")):
            continue
        if not np.array_equal(a.predictions["paths"], b.predictions["paths"]):
            lines.append(f"| {a.short} | {b.short} | – | – | different test images |")
            continue
        if differ := _differences(a, b):
            lines.append(f"| {a.short} | {b.short} | – | – | not compared: {', '.join(differ)} |")
            continue
        ya = a.predictions["logits"].argmax(1) == a.predictions["labels"]
        yb = b.predictions["logits"].argmax(1) == b.predictions["labels"]
        m = mcnemar(ya, yb)
        lines.append(f"| {a.short} | {b.short} | {m['only_a_correct']} | {m['only_b_correct']} | "
                     f"{m['p_value']:.3g} |")
    return lines + ["", "A p-value below 0.05 means the two models' errors differ more than chance would explain."]


def _curves(runs: list[Run], out: Path) -> list[str]:
    lines = ["", "## Learning curves", "", f"![learning curves]({plot_learning_curves(runs, out)})"]
    averaged = [r for r in runs if r.history and any(k.endswith("_val_loss") and k != "val_loss" for k in r.history[0])]
    for run in runs:
        file = "averaged_adam.png" if len(averaged) < 2 else f"averaged_adam-{run.short}.png"
        if run.history and (name := plot_averages(run, out, file)):
            lines += ["", f"### Averaged Adam ({run.short}): the raw iterate and its averages, one trajectory", "",
                      f"![averaged Adam]({name})", ""] + _variants_table(run)
    return lines


def _variants_table(run: Run) -> list[str]:
    """Test metrics of the final raw iterate and of every average, and which one validation selected."""
    best, described = run.test["best"], run.test.get("averages", {})
    last = int(run.history[-1]["epoch"]) if run.history else "?"
    monitor = run.config.get("monitor", "loss")
    chosen_by = f"{'lowest' if monitor == 'loss' else 'highest'} validation {monitor}"
    lines = [f"The final epoch's (epoch {last}) raw iterate and averages, on test, in % — not the best epoch's; "
             f"the model this run reports above is the one validation selected: **{best['variant']}** from epoch "
             f"{best['epoch']}, {chosen_by} over every epoch and "
             "variant:", "",
             "| variant | what it is | top-1 | macro precision | macro recall | macro F1 | top-5 | loss |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for k, v in run.test.get("final", {}).items():
        what = "the Adam iterate itself" if k == "raw" else described.get(k, k).partition(": ")[2]
        lines.append(f"| {k} | {what} | {_fmt(v['accuracy'])} | {_fmt(v['precision_macro'])} | "
                     f"{_fmt(v['recall_macro'])} | {_fmt(v['f1_macro'])} | {_fmt(v['top5'])} | {v['loss']:.3f} |")
    return lines


def _best_model(best: Run, out: Path) -> list[str]:
    """The best model's weakest breeds, most-confused pairs, confusion matrix and calibration."""
    logits, labels, paths = best.predictions["logits"], best.predictions["labels"], best.predictions["paths"]
    names = _class_names(best, logits.shape[1])
    preds = logits.argmax(1)
    rows = per_class_report(labels, preds, names)
    lines = [f"![worst breeds]({plot_per_class(rows, out)})", "", "| breed | precision | recall | F1 | images |",
             "|---|---:|---:|---:|---:|"]
    worst = sorted(rows, key=lambda r: (r["f1"], r["recall"]))[:10]
    lines += [f"| {md(r['class'])} | {_fmt(r['precision'])} | {_fmt(r['recall'])} | {_fmt(r['f1'])} | "
              f"{r['support']} |" for r in worst]
    pairs = confused_pairs(labels, preds, paths, names)
    if pairs:
        lines += ["", "### Most-confused breeds", "", "| true | predicted as | times |", "|---|---|---:|"]
        lines += [f"| {md(p['true'])} | {md(p['predicted'])} | {p['count']} |" for p in pairs]
        if thumbs := plot_confused_pairs(pairs, best, out):
            lines += ["", f"![confused pairs]({thumbs})"]
    heatmap = plot_confusion(confusion(labels, preds, len(names)), names, out / "confusion.png")
    lines += ["", "### Confusion matrix", "", f"![confusion matrix]({heatmap})"]
    return lines


# ----------------------------------------------------------------------------- calibration and maps (explain.json)


def _calibration(runs: list[Run], best: Run, out: Path, found: dict) -> list[str]:
    """Per run: test ECE and NLL of the raw softmax and at the temperature fitted on validation at export; the best
    model's reliability diagram before and after. A run with no exported model shows its raw numbers (from the
    training's test predictions) and says why there is no calibrated one."""
    lines = ["", "## Calibration", "",
             "Expected calibration error (ECE, 15 equal-width confidence bins) and negative log-likelihood (NLL) "
             "of each run's exported model on the test split, raw and after temperature scaling (one temperature, "
             "fitted on the validation split at export, divides the logits: the top-1 answers do not change).", "",
             "| run | test images | ECE raw → calibrated | NLL raw → calibrated | temperature |",
             "|---|---:|---|---|---:|"]
    notes = []
    for run in runs:
        record, why = found[run.path]
        if record is not None:
            c = record["calibration"]
            t = f"{c['temperature']:.3f}" if record.get("validation") else "none (exported before calibration)"
            lines.append(f"| {run.short} | {c['images']} | {c['ece_raw']:.3f} → {c['ece']:.3f} | "
                         f"{c['nll_raw']:.3f} → {c['nll']:.3f} | {t} |")
            continue
        if run.predictions is not None:
            logits, labels = run.predictions["logits"], run.predictions["labels"]
            lines.append(f"| {run.short} | {len(labels)} | {ece(probabilities(logits), labels):.3f} → – | "
                         f"{nll(logits, labels):.3f} → – | – |")
        else:
            lines.append(f"| {run.short} | – | – | – | – |")
        notes.append(f"No calibrated numbers for {run.short}: {why}.")
    lines += [""] + notes if notes else []
    record, why = found[best.path]
    if record is not None:
        cal = record["calibration"]
    elif best.predictions is not None:
        logits, labels = best.predictions["logits"], best.predictions["labels"]
        raw = probabilities(logits)
        cal = {"reliability_raw": reliability(raw, labels), "ece_raw": ece(raw, labels)}
    else:
        return lines
    plot = plot_reliability(cal, out, f"{best.plain}: reliability on test, before and after temperature scaling"
                            if "reliability" in cal else f"{best.plain}: reliability on test (raw softmax)")
    return lines + ["", f"![reliability diagram]({plot})"]


def _selective(best: Run, out: Path, found: tuple) -> list[str]:
    """The best model's risk–coverage curve on test and what its stored "unsure" threshold gives there, against
    the precision it was chosen for on validation."""
    lines = ["", "## Selective prediction", ""]
    record, why = found
    selective = (record or {}).get("calibration", {}).get("selective")
    validation = ((record or {}).get("validation") or {}).get("selective")
    if record is None or selective is None or not validation:
        reason = why or "its model was exported before dogkit stored an \"unsure\" threshold; export it again"
        return lines + [f"No risk–coverage curve for {best.short}: {reason}."]
    target = 100 * validation["target_precision"]
    lines += [f"![risk-coverage curve]({plot_risk_coverage(record['calibration'], record['validation'], out)})", "",
              f"The model answers only when its calibrated confidence reaches a threshold chosen on the validation "
              f"split as the lowest one whose answers are at least {target:.0f}% right; below it the answer is "
              "\"unsure\"."]
    if selective["threshold"] is None:
        return lines + [f"**The validation target of {target:.0f}% precision was unreachable**: no threshold met it "
                        f"on validation, so {best.short} answers \"unsure\" to every image (coverage 0% on test)."]
    val = (f"on validation {100 * validation['precision']:.1f}% precision at {100 * validation['coverage']:.1f}% "
           "coverage")
    if selective["precision"] is None:
        test = "on test it answers no image (coverage 0%)"
    else:
        test = (f"on test {100 * selective['precision']:.1f}% precision at {100 * selective['coverage']:.1f}% "
                f"coverage ({selective['answered']} of {record['calibration']['images']} images answered)")
        if selective["precision"] < validation["target_precision"]:
            test += f", below the {target:.0f}% target"
    return lines + [f"At the stored threshold {selective['threshold']:.3f}: {val}; {test}."]


def _files_calibration(best: Run) -> list[str]:
    """The best run's exported files side by side on validation (export.json): each file's own temperature and
    "unsure" threshold, fitted on its own logits, and whether the threshold meets its target there."""
    export = best.export or {}
    if not export.get("calibration"):
        return []
    lines = ["", f"### Each exported file's own calibration ({best.short}, validation)", "",
             "Each file `dogkit export` writes fits its own temperature and \"unsure\" threshold on its own "
             f"validation logits (an INT8 or fp16 model answers differently from {base().label}); export keeps no "
             "file whose threshold's answers miss the target there.", "",
             "| model | file | temperature | ECE raw → calibrated | NLL raw → calibrated | threshold | precision "
             "| coverage |", "|---|---|---:|---|---|---:|---:|---:|"]
    verdicts = []
    for v in (base(), *derived()):
        record = export.get("calibration") if v == base() else export.get(v.name)
        if not record:
            continue
        if "error" in record:
            verdicts.append(f"- No {v.label} model was written: its export failed (\"ONNX export and speed\" says "
                            "why).")
            continue
        cal = record if v == base() else record.get("calibration")
        if not cal:
            verdicts.append(f"- {v.label} was exported before each file had its own calibration: it carried "
                            f"{base().label}'s, never checked on its own answers (dogkit now ignores it); export "
                            "it again.")
            continue
        sel = cal["selective"]
        shown_sel = (f"{sel['threshold']:.3f} | {_fmt(sel['precision'])}% | {_fmt(sel['coverage'])}%" if sel["met"]
                     else "none | – | 0.0%")
        lines.append(f"| {v.label} | {v.file} | {cal['temperature']:.3f} | {cal['ece_raw']:.3f} → {cal['ece']:.3f} "
                     f"| {cal['nll_raw']:.3f} → {cal['nll']:.3f} | {shown_sel} |")
        target = f"{100 * sel['target_precision']:.0f}%"
        if sel["met"]:
            answered = round(sel["coverage"] * cal["images"])
            verdicts.append(f"- {v.label}'s own threshold {sel['threshold']:.3f} meets the {target} target on "
                            f"validation: {_fmt(sel['precision'])}% of its {answered} answers (of {cal['images']} "
                            "images) are right.")
        else:
            verdicts.append(f"- No threshold reaches the {target} target on {v.label}'s validation answers: it has "
                            "no \"unsure\" threshold, so it answers \"unsure\" to every image unless "
                            "`--min-confidence` is given.")
    return lines + [""] + verdicts


def _localisation(runs: list[Run], found: dict) -> list[str]:
    """Per run: its true-class maps scored against the dogs' boxes, next to a centred Gaussian that knows nothing
    about the image (``dogkit.deploy.localise``), and whether the maps beat it."""
    lines = ["", "## Where the model looked", "",
             "Each test image's activation map of its true breed, against the dogs' boxes: the share of the map's "
             "mass inside the boxes, and the box around the map's largest region at 20% of its peak — a hit when "
             "its IoU with a true box is at least 0.5 (\"GT-known loc\"; \"top-1 loc\" also needs the top-1 answer "
             "right). The baseline scores a centred Gaussian in place of every map.", "",
             "| run | images with boxes | energy in boxes | GT-known loc | top-1 loc | baseline energy | "
             "baseline GT-known loc |", "|---|---:|---:|---:|---:|---:|---:|"]
    verdicts, missing = [], []
    for run in runs:
        record, why = found[run.path]
        loc = (record or {}).get("localisation") or {}
        if not loc.get("images"):
            missing.append(f"No maps scored for {run.short}: {loc.get('unavailable') or why}.")
            continue
        b = loc["baseline"]
        lines.append(f"| {run.short} | {loc['images']} | {_fmt(loc['energy_in_boxes'])}% | "
                     f"{_fmt(loc['gt_known_loc'])}% | {_fmt(loc['top1_loc'])}% | {_fmt(b['energy_in_boxes'])}% | "
                     f"{_fmt(b['gt_known_loc'])}% |")
        verdicts.append(f"{run.short}'s maps {'beat' if loc['beats_baseline'] else 'do not beat'} the centred "
                        "baseline" + ("" if loc["beats_baseline"] else " (they must beat it on both energy in "
                                      "boxes and GT-known loc)") + ".")
    if not verdicts:
        lines = lines[:2]
    return lines + ([""] + verdicts if verdicts else []) + ([""] + missing if missing else [])


def _gallery(best: Run, out: Path, found: tuple) -> list[str]:
    """The best model's most confident wrong answers on test, each with the map of the breed it answered and of
    the true one."""
    lines = ["", "## Gallery: the most confident mistakes", ""]
    record, why = found
    if record is None:
        return lines + [f"No gallery for {best.short}: {why}."]
    names = _class_names(best, 0)  # [] without the dataset: the gallery then says why it has no images
    try:
        rows, why = gallery(best.path, out / "gallery.png", names)
    except DogkitError as e:  # a model file that went bad since explain.json was written
        rows, why = [], str(e)
    if not rows:
        return lines + [f"No gallery for {best.short}: {why}."]
    lines += [f"The {len(rows)} test images {best.short} got wrong with the highest calibrated confidence: on the "
              "left the map of the breed it answered, on the right the map of the true breed (red: the strongest "
              "evidence for that breed).", "", "![most confident mistakes](gallery.png)", "",
              "| image | true | answered | confidence | probability of the true breed |", "|---|---|---|---:|---:|"]
    return lines + [f"| {md(r['path'])} | {md(r['true'])} | {md(r['predicted'])} | {_fmt(r['confidence'])}% | "
                    f"{_fmt(r['true_probability'])}% |" for r in rows]


_MARKDOWN = str.maketrans({"\\": "\\\\", "|": "\\|", "<": "&lt;", ">": "&gt;", "&": "&amp;", "[": "\\[",
                           "]": "\\]", "`": "\\`"})


def md(text: object) -> str:
    """A name from outside (a class, a file, a run folder) as Markdown text: control characters escaped (``shown``),
    and what would end a table cell (``|``), open HTML (``<img onerror>``, ``<script>``) or a link spelled out."""
    return shown(text).translate(_MARKDOWN)


def _class_names(run: Run, n: int) -> list[str]:
    """The breeds as the report shows them (plot labels; tables pass them through ``md``): names from a dataset's
    folders, with any control characters escaped."""
    try:
        return [shown(name) for name in load_dataset(run.config["data"]).class_names]
    except DogkitError:
        return [str(i) for i in range(n)]


def _gate_cells(r: Run, v: Variant, missing: list[str]) -> str:
    """A derived model's two cells (accuracy change, top-1 agreement with fp32); says below the table why it is
    missing when its export failed."""
    q = r.export.get(v.name)
    if q and "error" in q:
        missing.append(f"\nNo {v.label} model for {r.short}, so only its {base().label} model runs: {q['error']}")
        return "not written | –"
    if q:
        return f"{100 * q['accuracy_change']:+.1f} pt | {100 * q['top1_agreement_with_fp32']:.1f}%"
    return "– | –"


def _deployment(runs: list[Run]) -> list[str]:
    exported = [r for r in runs if r.export]
    if not exported:
        return []
    shown_variants = [v for v in derived() if v.study]  # the study's, as the report is the study's
    header = ["run", "parity: max abs logit diff", "parity top-1 agreement"]
    header += [f"{v.label} {what}" for v in shown_variants
               for what in ("accuracy change", f"top-1 agreement with {base().label}")]
    lines = ["", "## ONNX export and speed", "", f"| {' | '.join(header)} |", "|---|" + "---:|" * (len(header) - 1)]
    missing: list[str] = []
    for r in exported:
        p = r.export["parity"]
        cells = [r.short, f"{p['max_abs_logit_diff']:.2e}", f"{100 * p['top1_agreement']:.1f}%",
                 *(_gate_cells(r, v, missing) for v in shown_variants)]
        lines.append(f"| {' | '.join(cells)} |")
    lines += missing
    levels = sorted({r.export["onnxruntime"]["graph_optimization_level"] for r in exported
                     if "onnxruntime" in r.export})
    if levels:
        lines.append(f"\nThe gates ran in ONNX Runtime at graph optimisation level {', '.join(levels)}, the level "
                     "`dogkit eval`, `predict` and `bench` use.")
    for r in exported:
        if r.bench:
            from ..deploy.bench import markdown

            lines += ["", f"Benchmark of {r.short}:", "", markdown(r.bench)]
    return lines


def _reproducibility(runs: list[Run]) -> list[str]:
    lines = ["", "## Reproducibility", "", "| run | seed | optimizer | lr | schedule | epochs | batch | image size | "
             "weights | commit | manifest SHA-256 | torch |", "|---|---:|---|---:|---|---:|---:|---:|---|---|---|---|"]
    for r in runs:
        c, e = r.config, r.env
        weights = shown(c.get("weights") or ("ImageNet" if c.get("pretrained") else "random"))
        lines.append(f"| {md(r.path.name)} | {c['seed']} | {c['optimizer']} | {c['lr']:g} | {c['schedule']} | "
                     f"{c['epochs']} | {c['batch_size']} | {c['image_size']} | {weights} | "
                     f"{(e.get('git_commit') or '–')[:10]} | {(e.get('manifest_sha256') or '–')[:12]} | "
                     f"{e.get('torch', '–')} |")
    lines += ["", "Each run folder holds its full resolved `config.json` and `environment.json`; "
              "`dogkit train --config <run>/config.json` repeats a run."]
    return lines
