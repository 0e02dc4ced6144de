"""``dogkit export``: a run's best model → one self-describing ONNX file, trusted only after it agrees
with PyTorch on real validation images.

The file takes uint8 RGB NHWC images (dynamic batch) and returns logits; its ``metadata_props``
carry the class names, the preprocessing spec, the architecture, the run and its metrics. A model
that fails the parity gate is never left where a valid one would be. The graph is plain operators
(no shape-computing subgraph), so OpenCV's DNN module opens it too. ``--int8`` adds a static INT8
model (QDQ from the first convolution on, per-channel, calibrated on training images) behind an
accuracy gate, ``--fp16`` a half-precision model for GPUs (``quantize`` builds both); either failing
is one line naming the cause, and ``dogkit study`` goes on without it. Each derived model is a row of
``dogkit.variants`` and a builder here, in ``BUILDERS`` under the row's name. Every file carries a temperature
and "unsure" threshold fitted on its own validation logits (``own_calibration``), checked as a runtime reads them
(``check_unsure``): INT8 and fp16 answer differently from fp32, so fp32's would promise nothing about them.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from rich.markup import escape
from torch import nn

from .. import __version__
from ..atomic import atomic_write_text, pid_tag, remove_stale
from ..calibration import TARGET_PRECISION, calibrate, probabilities
from ..data.dataset import Dataset, load_dataset
from ..deploy.evaluate import onnx_logits as split_logits
from ..deploy.explain import normalise
from ..deploy.preprocess import PreprocessSpec, eval_transform
from ..deploy.quantize import cause, keep_used_opsets, quantize_int8, to_fp16
from ..deploy.runtime import (
    GRAPH_OPTIMIZATION,
    META_PREFIX,
    OnnxClassifier,
    read_metadata,
    stored_calibration,
    stored_temperature,
    stored_threshold,
)
from ..errors import DogkitError
from ..log import log, run_log
from ..runs import best_run
from ..settings import at_least, positive, within
from ..text import shown
from ..variants import Variant, base, derived, names
from .cam import MAPS_OUTPUT, WithMaps, maps_problem
from .checkpoint import load_best
from .config import TrainConfig
from .models import NHWCInput

OPSET = 18


class ParityError(DogkitError):
    pass


class MapsParityError(ParityError):
    """The logits passed; the activation maps did not."""


@dataclass
class ExportResult:
    run_dir: Path
    onnx_path: Path
    parity: dict
    derived: dict[str, dict] = field(default_factory=dict)  # variant name → its gate's report, or {"error": …}


def validation_batch(dataset: Dataset, spec: PreprocessSpec, split: str, limit: int | None) -> tuple[np.ndarray, ...]:
    records = dataset.split(split)[:limit] if limit else dataset.split(split)
    if not records:
        raise DogkitError(f"{dataset.root} has no {split} images to check the export against")
    images = np.stack([eval_transform(dataset.load_rgb(r, spec.box_crop, spec.orients), spec) for r in records])
    return images, np.array([r.label for r in records])


def torch_logits(model: nn.Module, images: np.ndarray, batch: int = 32) -> np.ndarray:
    wrapped = NHWCInput(model).eval()
    with torch.inference_mode():
        return np.concatenate([wrapped(torch.from_numpy(images[i: i + batch])).numpy()
                               for i in range(0, len(images), batch)])


def torch_maps(model: nn.Module, images: np.ndarray, batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Every class's map of each image and, per image and class, the largest term size over its pixels
    (``WithMaps.term_sizes``): what float32 rounding of that map is relative to."""
    wrapped = WithMaps(model).eval()
    maps, sizes = [], []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            _, features = wrapped.features(torch.from_numpy(images[i: i + batch]))
            maps.append(nn.functional.conv2d(features, wrapped.head.weight[:, :, None, None]).numpy())
            sizes.append(wrapped.term_sizes(features).amax(dim=(2, 3)).numpy())
    return np.concatenate(maps), np.concatenate(sizes)


def onnx_logits(path: Path, images: np.ndarray, batch: int = 32) -> np.ndarray:
    runner = OnnxClassifier(path)
    return np.concatenate([runner.run(images[i: i + batch]) for i in range(0, len(images), batch)])


@dataclass
class TracedGraph:
    """A traced, not yet optimised ONNX graph and what it was traced from. Tracing is most of an export (2.1 of
    2.5 s for ResNet18 at 32 px), and a study exports several models of one structure: the next one's weights are
    put into this graph instead (``torch.onnx.ONNXProgram.apply_weights``), then optimised and saved as a fresh
    trace would be, so the file is the same bytes either way."""

    key: tuple
    program: torch.onnx.ONNXProgram
    weights: tuple[str, ...]  # its initializers, each a parameter or buffer of the module, by name


_traced: TracedGraph | None = None  # the last graph traced; one at a time bounds the memory it holds


def module_tensors(wrapped: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (non-persistent ones too: they are in the graph) under each of its names."""
    return {**dict(wrapped.named_parameters(remove_duplicate=False)),
            **dict(wrapped.named_buffers(remove_duplicate=False))}


def graph_key(wrapped: nn.Module, tensors: dict[str, torch.Tensor], size: int) -> tuple:
    """What a traced graph depends on besides the weights' values: the modules and their settings (``repr``),
    every weight's name, shape and type, and the input size."""
    return repr(wrapped), size, tuple((name, tuple(t.shape), t.dtype) for name, t in tensors.items())


def traced_graph(wrapped: nn.Module, tensors: dict[str, torch.Tensor], size: int, maps: bool) -> TracedGraph:
    """Dynamo trace at batch 2 with a dynamic batch axis, unoptimised; the last one again when ``wrapped`` has the
    same structure."""
    global _traced
    key = graph_key(wrapped, tensors, size)
    if _traced is not None and _traced.key == key:
        return _traced
    _traced = None  # let the old graph go before tracing the next
    example = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(wrapped, (example,), input_names=["images"],
                                output_names=["logits", MAPS_OUTPUT] if maps else ["logits"],
                                dynamic_shapes={"images": {0: batch}}, opset_version=OPSET, dynamo=True,
                                optimize=False, verbose=False)
    program.exported_program = None  # the PyTorch side is not needed again
    initializers = list(program.model.graph.initializers)
    traced = TracedGraph(key, program, tuple(name for name in initializers if name in tensors))
    # Kept only when every initializer is a weight put in anew: any other value is the traced model's alone.
    _traced = traced if len(traced.weights) == len(initializers) else None
    return traced


def export_onnx(model: nn.Module, spec: PreprocessSpec, path: Path, maps: bool = False) -> None:
    """One ONNX file, no external data, a dynamic batch axis; with ``maps``, a second output of every class's
    activation map (``dogkit.training.cam``). Optimised as ``torch.onnx.export`` does (onnxscript's optimizer:
    constant folding, batch norm folded into the convolutions), after the weights are in."""
    import onnxscript.optimizer

    wrapped = (WithMaps(model) if maps else NHWCInput(model)).eval()
    tensors = module_tensors(wrapped)
    try:
        traced = traced_graph(wrapped, tensors, spec.size, maps)
        traced.program.apply_weights({name: tensors[name].detach() for name in traced.weights})
        onnx.save_model(onnxscript.optimizer.optimize(traced.program.model_proto), str(path))
    except Exception as e:  # the exporter raises many types; all mean "this model did not export"
        raise DogkitError(f"ONNX export failed: {e}") from e


def add_metadata(path: Path, metadata: dict[str, object]) -> None:
    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key = META_PREFIX + key
        entry.value = value if isinstance(value, str) else json.dumps(value)
    keep_used_opsets(model)
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)


# The maps' parity gate: every map's largest |ONNX - PyTorch| within MAP_TOL of the size of the terms it sums
# (Σ_c |W[k, c] · F[c]|), which is what float32 rounding is relative to. Relative to the map's own range instead,
# a barely trained network's flat, cancelled maps failed on rounding alone (1.08e-4 against 1e-4).
MAP_TOL = 1e-4


def check_parity(model: nn.Module, path: Path, images: np.ndarray, atol: float) -> dict:
    """fp32 ONNX vs PyTorch on the same uint8 images: max |Δlogit| within ``atol`` and every top-1 equal; for an
    explainable model, also every class's activation map within ``MAP_TOL`` of its term size (a constant factor
    or offset fails). ``max_abs_map_diff`` reports the top-1 map as it is drawn (normalised to 0..1), for scale."""
    expected = torch_logits(model, images)
    runner = OnnxClassifier(path)
    batches = range(0, len(images), 32)
    if runner.explains:  # logits and maps from the same runs
        outputs = [runner.run_maps(images[i: i + 32]) for i in batches]
        got, have = np.concatenate([o[0] for o in outputs]), np.concatenate([o[1] for o in outputs])
    else:
        got = np.concatenate([runner.run(images[i: i + 32]) for i in batches])
    diff = float(np.abs(expected - got).max())
    agree = float((expected.argmax(1) == got.argmax(1)).mean())
    report = {"images": len(images), "max_abs_logit_diff": diff, "atol": atol, "top1_agreement": agree}
    if not (diff <= atol and agree == 1.0):
        raise ParityError(f"ONNX and PyTorch disagree on {len(images)} validation images: max |Δlogit| {diff:.3g} "
                          f"(allowed {atol:g}), top-1 agreement {agree:.2%} (required 100%). No model was written; "
                          "if this model's logits are unusually large, --atol allows more.")
    if runner.explains:
        want, sizes = torch_maps(model, images)
        rel = float((np.abs(want - have).max(axis=(2, 3)) / np.maximum(sizes, 1e-30)).max())
        drawn = max(float(np.abs(normalise(want[n, k]) - normalise(have[n, k])).max())
                    for n, k in enumerate(expected.argmax(1)))
        report.update(max_rel_map_diff=rel, max_abs_map_diff=drawn, map_tol=MAP_TOL)
        if rel > MAP_TOL:
            raise MapsParityError(f"ONNX and PyTorch activation maps disagree on {len(images)} validation images: max "
                              f"|Δ| {rel:.3g} of the size of the terms each map sums (allowed {MAP_TOL:g}; drawn, "
                              f"{drawn:.3g} of the colour scale). No model was written; `dogkit export --no-explain` "
                              "writes it without maps.")
    return report


def batch_sizes_ok(path: Path, spec: PreprocessSpec, sizes=(1, 3, 8)) -> None:
    """Some exporter versions silently fix the batch to the traced one: run each size for real."""
    runner = OnnxClassifier(path)
    for n in sizes:
        out = runner.run(np.zeros((n, spec.size, spec.size, 3), np.uint8))
        if out.shape[0] != n:
            raise DogkitError(f"the exported model returned {out.shape[0]} rows for a batch of {n}")


def copy_metadata(src: Path, dst: Path, extra: dict) -> None:
    meta = {p.key.removeprefix(META_PREFIX): p.value for p in onnx.load(str(src)).metadata_props}
    add_metadata(dst, {**meta, **extra})


MIN_AGREEMENT = 0.97  # a derived model must give fp32's top-1 on this share of validation images


def accuracy_gate(ref: np.ndarray, got: np.ndarray, labels: np.ndarray, name: str, max_drop: float,
                  min_agreement: float = MIN_AGREEMENT) -> dict:
    """The candidate file ``name``, by its logits ``got``, against the fp32 model's ``ref`` on the same validation
    images: it may lose at most ``max_drop`` accuracy and must agree with fp32's top-1 on at least
    ``min_agreement`` of them. Accuracy alone is not enough: a model that changes a third of the answers can keep
    the same accuracy."""
    acc_ref, acc = float((ref.argmax(1) == labels).mean()), float((got.argmax(1) == labels).mean())
    agreement = float((ref.argmax(1) == got.argmax(1)).mean())
    report = {"images": len(labels), "top1_agreement_with_fp32": agreement, "min_agreement": min_agreement,
              "accuracy_fp32": acc_ref, "accuracy": acc, "accuracy_change": acc - acc_ref, "max_drop": max_drop}
    if acc_ref - acc > max_drop:
        raise DogkitError(
            f"{name} loses {100 * (acc_ref - acc):.2f} accuracy points on {len(labels)} validation images "
            f"({acc_ref:.2%} → {acc:.2%}; top-1 agreement {agreement:.2%}), more than the "
            f"allowed {100 * max_drop:.2f}; it was not kept. Raise --max-drop to accept it."
        )
    if agreement < min_agreement:
        raise DogkitError(
            f"{name} gives fp32's top-1 on only {agreement:.2%} of {len(labels)} validation images "
            f"(required {min_agreement:.0%}; accuracy {acc_ref:.2%} → {acc:.2%}); it was not kept. A model this "
            "unsure of its answers flips them under quantization; lower --min-agreement to accept it."
        )
    return report


def gated_variant(final: Path, path: Path, build: Build, extra_metadata: dict, reference: np.ndarray,
                  images: np.ndarray, labels: np.ndarray, max_drop: float, min_agreement: float,
                  variant: Variant, target_precision: float) -> dict:
    """Build a derived model (``variant``: INT8, fp16) from ``final`` in a temporary folder; keep it only if it
    passes the accuracy gate, with its own temperature and "unsure" threshold fitted on the logits the gate
    computed, stored in its metadata and checked (``check_unsure``). On any failure a file left by an earlier
    export is removed too: it was derived from another ``model.onnx``. Returns the gate's report with the file's
    calibration record."""
    try:
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".export-{pid_tag()}-{path.stem}-") as tmp:
            candidate = Path(tmp) / path.name
            build(candidate)
            copy_metadata(final, candidate, extra_metadata)
            logits = onnx_logits(candidate, images)
            report = accuracy_gate(reference, logits, labels, candidate.name, max_drop, min_agreement)
            record = own_calibration(variant, logits, labels, target_precision)
            copy_metadata(candidate, candidate, {"calibration": record})  # in place of fp32's, copied above
            check_unsure(candidate, logits, labels)
            os.replace(candidate, path)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    log.info(f"{path.name}: validation accuracy {report['accuracy_fp32']:.2%} → {report['accuracy']:.2%}, "
             f"top-1 agreement with fp32 {report['top1_agreement_with_fp32']:.2%} → {escape(shown(path))}")
    log.info(f"{path.name}: {calibration_line(record)}")
    return {**report, "calibration": record}


def own_calibration(variant: Variant, logits: np.ndarray, labels: np.ndarray, target_precision: float) -> dict:
    """The calibration record a file carries, fitted on its own validation logits; ``fitted_for`` names the variant
    it was fitted for, so that a runtime tells it from a record copied from another file (``stored_calibration``)."""
    return {**calibrate(logits, labels, target_precision), "split": "val", "fitted_for": variant.name}


def check_unsure(path: Path, logits: np.ndarray, labels: np.ndarray) -> None:
    """The "unsure" promise checked as it will be served: the temperature and threshold read back from ``path``'s
    metadata the way the runtime reads them, applied to the file's own validation ``logits``, must give answers at
    least the stored target precision right; a threshold that misses it is refused (``DogkitError``). A null
    threshold (``met: false``, no threshold reached the target) passes: the file then says it has none and every
    answer is unsure."""
    stored = stored_calibration(read_metadata(path))
    threshold, target = stored_threshold(stored), (stored.get("selective") or {}).get("target_precision")
    if threshold is None or target is None:
        raise DogkitError(f"{path.name} carries no \"unsure\" threshold of its own")
    cal = probabilities(logits, stored_temperature(stored))
    answered = cal.max(1) >= threshold
    precision = float((cal.argmax(1) == labels)[answered].mean()) if answered.any() else None
    if threshold != float("inf") and (precision is None or precision < target):
        got = f"{precision:.2%} precision" if precision is not None else "no answer"
        raise DogkitError(f"{path.name}'s \"unsure\" threshold {threshold:.4g} gives {got} on {len(labels)} "
                          f"validation images ({int(answered.sum())} answered), below its target {target:.0%}; "
                          "it was not kept")


def run_metadata(run_dir: Path, ckpt: dict, spec: PreprocessSpec) -> dict[str, object]:
    """What the ONNX file carries: classes, preprocessing, architecture, the run and its metrics."""
    test_metrics = {}
    if (run_dir / "test_metrics.json").is_file():
        test_metrics = json.loads((run_dir / "test_metrics.json").read_text())["best"].get("test", {})
    return {
        "class_names": ckpt["class_names"], "preprocess": spec.to_json(), "arch": ckpt["arch"],
        "run": run_dir.name, "variant": ckpt.get("variant", "raw"), "epoch": ckpt.get("epoch"),
        "val_metrics": ckpt.get("val_metrics", {}), "test_metrics": test_metrics, "dogkit_version": __version__,
        "input": "images: uint8 RGB, NHWC, batch x size x size x 3; normalisation is inside the model",
    }


@dataclass
class Fp32:
    path: Path
    parity: dict
    calibration: dict
    val_logits: np.ndarray  # the model's logits on the whole validation split, in the split's order


def explain_metadata(model: nn.Module, spec: PreprocessSpec, wanted: bool) -> dict:
    """The ``explain`` entry: how the maps output was made, or why there is none."""
    if not wanted:
        return {"unavailable": "exported with --no-explain"}
    problem = maps_problem(model, spec.size)
    if problem:
        log.warning(f"[yellow]no activation maps for this model: {escape(problem)}; model.onnx returns logits only[/]")
        return {"unavailable": problem}
    return {"output": MAPS_OUTPUT, "method": "class activation map (Zhou et al., CVPR 2016)",
            "definition": "cams[n, k] = sum over c of W[k, c] * F[n, c]: F the feature map entering global average "
                          "pooling, W the head's weights; logits[n, k] = mean(cams[n, k]) + bias[k]",
            "covers": "the seen square of the photo (preprocess: the centre crop before resizing)"}


def calibration_line(record: dict) -> str:
    sel = record["selective"]
    unsure = (f"unsure below {sel['threshold']:.3f} (precision {sel['precision']:.1%} on {sel['coverage']:.1%} of "
              "validation)" if sel["met"] else f"no threshold reaches {sel['target_precision']:.0%} precision on "
              "validation: every answer will say unsure unless --min-confidence is given")
    return (f"calibration on {record['images']} validation images: temperature {record['temperature']:.3f}, ECE "
            f"{record['ece_raw']:.2%} → {record['ece']:.2%}, NLL {record['nll_raw']:.3f} → {record['nll']:.3f}; "
            f"{unsure}")


def export_fp32(model: nn.Module, ckpt: dict, spec: PreprocessSpec, metadata: dict, run_dir: Path,
                images: np.ndarray, atol: float, data: Path, target_precision: float = TARGET_PRECISION,
                validation: tuple[np.ndarray, np.ndarray] | None = None) -> Fp32:
    """``<run>/model.onnx``, built in a temporary folder and moved into place only once it passes the parity
    gate on ``images``; its temperature and selective threshold are fitted on the whole validation split of
    ``data`` and stored in its metadata before it is moved. ``validation``: that split's images and labels, when
    they are in memory already (the accuracy gates need them), so that it is not decoded twice."""
    final = run_dir / base().file
    with tempfile.TemporaryDirectory(dir=run_dir, prefix=f".export-{pid_tag()}-") as tmp:
        candidate = Path(tmp) / final.name
        log.info(f"exporting {escape(shown(run_dir / 'best.pt'))} ({ckpt['arch']}, {ckpt.get('variant', 'raw')}) "
                 "to ONNX …")
        export_onnx(model, spec, candidate, maps="output" in metadata["explain"])
        add_metadata(candidate, metadata)
        batch_sizes_ok(candidate, spec)
        parity = check_parity(model, candidate, images, atol)
        if validation is not None:
            logits, labels = onnx_logits(candidate, validation[0]), validation[1]
        else:
            logits, labels, _, _ = split_logits(candidate, data, "val", 32)
        record = own_calibration(base(), logits, labels, target_precision)
        add_metadata(candidate, {**metadata, "calibration": record})
        check_unsure(candidate, logits, labels)
        os.replace(candidate, final)
    maps = (f", max |Δmap| {parity['max_rel_map_diff']:.1e} of its terms ({parity['max_abs_map_diff']:.1e} drawn)"
            if "max_rel_map_diff" in parity else "")
    log.info(f"parity: max |Δlogit| {parity['max_abs_logit_diff']:.2e}{maps} on {parity['images']} validation "
             f"images, top-1 agreement {parity['top1_agreement']:.0%} → {escape(shown(final))}")
    log.info(calibration_line(record))
    return Fp32(final, parity, record, logits)


def calibration_batch(dataset: Dataset, spec: PreprocessSpec, count: int) -> np.ndarray:
    """Calibrate on exactly what the model will be fed: uint8 images from the evaluation transform, a fixed
    random pick of ``count`` training images."""
    train_records = dataset.split("train")
    pick = np.random.default_rng(0).permutation(len(train_records))[:count]
    return np.stack([eval_transform(dataset.load_rgb(train_records[i], spec.box_crop, spec.orients), spec)
                     for i in sorted(pick)])


@dataclass(frozen=True)
class Source:
    """What a builder may read: the gated fp32 model and the training images to calibrate on."""

    final: Path
    dataset: Dataset
    spec: PreprocessSpec
    calibration_images: int


Build = Callable[[Path], None]  # writes the candidate file it is given
# A variant's builder: prepares from the source (outside the gate, so that unreadable training images stop the
# export as before) and returns the build and the metadata the file adds to fp32's, its precision entry among them.
Builder = Callable[[Source], tuple[Build, dict[str, object]]]


def build_int8(src: Source) -> tuple[Build, dict[str, object]]:
    calibration = calibration_batch(src.dataset, src.spec, src.calibration_images)
    return (lambda out: quantize_int8(src.final, out, calibration)), {
        "quantization": f"static int8 QDQ from the first convolution on, per-channel, uint8 activations, "
                        f"{len(calibration)} calibration images",
        # Where its gate ran, hence where it is known to be right (OpenCV 4 gives wrong logits, OpenCV 5 and
        # onnx's reference evaluator refuse it).
        "validated_on": [{"runtime": "onnxruntime", "provider": "CPUExecutionProvider",
                          "graph_optimization_level": GRAPH_OPTIMIZATION, "version": ort_version()}]}


def build_fp16(src: Source) -> tuple[Build, dict[str, object]]:
    return (lambda out: to_fp16(src.final, out)), {"precision": "fp16 weights and activations, fp32 logits"}


BUILDERS: dict[str, Builder] = {"int8": build_int8, "fp16": build_fp16}  # keyed by the row's name


def asked(wanted: Collection[str]) -> list[Variant]:
    """The derived variants named, in table order (fp32 is always written); an unknown name is refused."""
    unknown = sorted(set(wanted) - set(names()))
    if unknown:
        raise DogkitError(f"unknown export variant(s) {', '.join(unknown)}; choose from {', '.join(names())}")
    return [v for v in derived() if v.name in wanted]


def derive_variants(source: Source, result: ExportResult, wanted: list[Variant], val_images: np.ndarray,
                    val_labels: np.ndarray, max_drop: float, min_agreement: float = MIN_AGREEMENT,
                    reference: np.ndarray | None = None, target_precision: float = TARGET_PRECISION
                    ) -> list[DogkitError]:
    """The derived models asked for, each behind the accuracy gate and calibrated on its own logits for
    ``target_precision``, into ``result.derived`` (the gate's report with the file's calibration record, export.json
    keeps it under the variant's name; or ``{"error": …}``); returns the failures. ``reference``: fp32's logits on
    ``val_images``, when known."""
    final = source.final
    if wanted and reference is None:
        reference = onnx_logits(final, val_images)
    failures = []
    for variant in wanted:
        build, extra = BUILDERS[variant.name](source)
        path = final.with_name(variant.file)
        try:
            result.derived[variant.name] = gated_variant(final, path, build, extra, reference, val_images,
                                                         val_labels, max_drop, min_agreement, variant,
                                                         target_precision)
        except Exception as e:  # "for any reason": quantizer, converter, checker or gate
            error = e if isinstance(e, DogkitError) else DogkitError(f"{path.name} failed: {cause(e)}")
            failures.append(error)
            log.warning(f"[yellow]{escape(shown(path.name))} not written: {escape(shown(error))}[/]")
            result.derived[variant.name] = {"error": str(error)}
    return failures


def is_finished(run_dir: Path, ckpt: dict, cfg: TrainConfig) -> bool:
    """Whether the run is finished (tested); an export of one that is not says so."""
    if (run_dir / "test_metrics.json").is_file():
        return True
    log.warning(f"[yellow]{escape(shown(run_dir.name))} is not finished: exporting its best so far (epoch "
                f"{ckpt.get('epoch')} of {cfg.epochs}, no test metrics yet); `dogkit train --resume "
                f"{escape(shown(run_dir))}` finishes it[/]")
    return False


@dataclass(frozen=True)
class ExportSettings:
    """The gates and calibration of ``export``, checked where they are made."""

    atol: float = 1e-3  # parity gate: largest |logit difference| against PyTorch
    parity_images: int = 64  # validation images in the parity gate
    calibration_images: int = 256  # training images INT8 is calibrated on
    max_drop: float = 0.01  # accuracy gate of a derived file: largest validation top-1 drop, as a fraction
    min_agreement: float = MIN_AGREEMENT  # and smallest share of validation images with fp32's top-1
    target_precision: float = TARGET_PRECISION  # the validation precision the "unsure" threshold must reach

    def __post_init__(self) -> None:
        positive(self, "atol")
        at_least(self, 1, "parity_images", "calibration_images")
        within(self, "max_drop", 0, 1)
        within(self, "min_agreement", 0, 1)
        within(self, "target_precision", 0, 1, open_low=True)


def export(run_dir: Path | None = None, *, runs_dir: Path = Path("artifacts/runs"), data: Path | None = None,
           atol: float = ExportSettings.atol, parity_images: int = ExportSettings.parity_images,
           variants: Collection[str] = (), calibration_images: int = ExportSettings.calibration_images,
           max_drop: float = ExportSettings.max_drop, min_agreement: float = ExportSettings.min_agreement,
           keep_going: bool = False, explain: bool = True, target_precision: float = ExportSettings.target_precision
           ) -> ExportResult:
    """fp32 ``model.onnx`` behind the parity gate, then the derived models named in ``variants`` (``"int8"``,
    ``"fp16"``: rows of ``dogkit.variants``), each behind the accuracy gate. A derived model that cannot be
    built or fails its gate is recorded in ``export.json`` as ``{"error": …}``; with ``keep_going`` that is all
    (``dogkit study`` goes on with fp32), else the error is raised once ``export.json`` is written. With
    ``keep_going``, maps refused by their parity gate are left out of a model written without them.

    ``explain``: a second output of activation maps where the network has exact ones. Each file carries the temperature
    and "unsure" threshold for ``target_precision`` fitted on its own validation logits (ExportSettings: the rest)."""
    ExportSettings(atol, parity_images, calibration_images, max_drop, min_agreement, target_precision)
    wanted = asked(variants)
    run_dir = Path(run_dir) if run_dir else best_run(runs_dir, need="best.pt")
    if not (run_dir / "best.pt").is_file():  # checked before run_log, which would create the folder's run.log
        raise DogkitError(f"no checkpoint at {run_dir / 'best.pt'}")
    with run_log(run_dir):  # the export's lines join the run's log
        start = time.perf_counter()
        model, ckpt, cfg = load_best(run_dir)
        finished = is_finished(run_dir, ckpt, cfg)
        remove_stale(run_dir, ".export-*")  # left by an export that was killed
        spec = PreprocessSpec.from_dict(ckpt["preprocess"])
        data = Path(data or cfg.data)
        dataset = load_dataset(data)
        # The accuracy gates use the whole validation split; the parity gate alone needs only a few images.
        val_images, val_labels = validation_batch(dataset, spec, "val", None if wanted else parity_images)
        metadata = {**run_metadata(run_dir, ckpt, spec), "explain": explain_metadata(model, spec, explain)}
        fp32_args = (ckpt, spec, metadata, run_dir, val_images[:parity_images], atol, data, target_precision,
                     (val_images, val_labels) if wanted else None)
        try:
            fp32 = export_fp32(model, *fp32_args)
        except MapsParityError as e:
            if not keep_going:
                raise
            # The classifier is sound: `dogkit study` goes on with a model without maps, and says why.
            log.warning(f"[yellow]{escape(str(e).replace('No model was written; ', ''))}: exporting without "
                        "them[/]")
            metadata["explain"] = {"unavailable": f"refused by the maps' parity gate: {e}"}
            fp32 = export_fp32(model, *fp32_args)
        result = ExportResult(run_dir, fp32.path, fp32.parity)
        source = Source(fp32.path, dataset, spec, calibration_images)
        failures = derive_variants(source, result, wanted, val_images, val_labels, max_drop, min_agreement,
                                   reference=fp32.val_logits if wanted else None, target_precision=target_precision)
        report = {"model": fp32.path.name, "seconds": time.perf_counter() - start, "opset": OPSET,
                  "run_finished": finished,
                  # The level every gate ran at, and the one eval, predict and bench use.
                  "onnxruntime": {"version": ort_version(), "graph_optimization_level": GRAPH_OPTIMIZATION},
                  "parity": fp32.parity, "calibration": fp32.calibration,
                  **{v.name: result.derived.get(v.name) for v in derived()},
                  "metadata": {k: v for k, v in metadata.items() if k != "class_names"}}
        atomic_write_text(run_dir / "export.json", json.dumps(report, indent=2, default=str) + "\n")
        if failures and not keep_going:
            raise failures[0] from None
        return result


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
