import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

from dogkit.deploy.preprocess import PreprocessSpec
from dogkit.errors import DogkitError
from dogkit.training.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from dogkit.training.models import build_model

SPEC = PreprocessSpec.for_size(64)


def test_local_state_dict_loads_strictly_except_the_replaced_head(tmp_path: Path):
    torch.manual_seed(0)
    imagenet_like = torchvision.models.resnet50(num_classes=1000)
    path = tmp_path / "resnet50.pth"
    torch.save(imagenet_like.state_dict(), path)
    model = build_model("resnet50", 120, spec=SPEC, weights=path, dropout=0.2)
    assert torch.equal(model.net.conv1.weight, imagenet_like.conv1.weight)
    assert torch.equal(model.net.layer4[2].bn3.running_var, imagenet_like.layer4[2].bn3.running_var)
    assert model.net.fc[1].out_features == 120 and model.net.fc[0].p == 0.2
    out = model(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
    assert out.shape == (2, 120)


def test_weights_of_another_architecture_are_refused(tmp_path: Path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(DogkitError, match="do not fit"):
        build_model("resnet50", 120, spec=SPEC, weights=path)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(DogkitError, match="cannot load weights"):
        build_model("resnet50", 120, spec=SPEC, weights=tmp_path / "junk.pth")


def test_imagenet_weights_come_from_the_hub_cache_and_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    cached = tmp_path / "hub" / "checkpoints" / Path(weights.url).name

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torch.hub.urlopen", offline)
    with pytest.raises(DogkitError) as info:
        build_model("resnet18", 120, spec=SPEC, pretrained=True)
    assert cached.name in str(info.value) and str(cached.parent) in str(info.value)
    # With the file where the message says, no network is needed.
    cached.parent.mkdir(parents=True, exist_ok=True)
    assert not cached.exists()  # the failed download left nothing that looks like weights
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), cached)
    model = build_model("resnet18", 120, spec=SPEC, pretrained=True)
    assert torch.equal(model.net.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)


def test_unknown_architecture_suggests_the_closest():
    with pytest.raises(DogkitError, match="did you mean resnet50"):
        build_model("resnet05", 10, spec=SPEC)


def test_model_normalises_uint8_input_itself():
    model = build_model("resnet18", 5, spec=SPEC).eval()
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    mean = torch.tensor(SPEC.mean).view(1, 3, 1, 1)
    std = torch.tensor(SPEC.std).view(1, 3, 1, 1)
    manual = model.net((x.float() / 255 - mean) / std)
    torch.testing.assert_close(model(x), manual, rtol=1e-4, atol=1e-4)


def test_checkpoint_save_is_atomic_under_a_crash(tmp_path: Path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)

    def crash(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half a checkpoint")
        raise RuntimeError("power cut")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(DogkitError, match=r"cannot write .*last.pt \(power cut; .* MB free on its disk\); the previous "
                                          r"checkpoint is kept"):
        save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, path)
    ckpt = load_checkpoint(path, header=False)
    assert ckpt["epoch"] == 1 and torch.equal(ckpt["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_mismatched_checkpoint_is_a_clear_error(tmp_path: Path):
    with pytest.raises(DogkitError, match="holds a resnet18 with 10 classes, but this run needs a resnet50 with 120"):
        check_compatible({"arch": "resnet18", "num_classes": 10}, "resnet50", 120, tmp_path / "last.pt")
    (tmp_path / "bad.pt").write_bytes(b"\x00" * 10)
    with pytest.raises(DogkitError, match="cannot load checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")


def test_weights_from_a_dogkit_checkpoint_warm_start_a_new_run(tiny_run: Path, tmp_path: Path):
    best = load_checkpoint(tiny_run / "best.pt")
    spec = PreprocessSpec.from_dict(best["preprocess"])
    # Same classes: every weight, head included, is the run's (the `net.` prefix and normalisation handled).
    model = build_model("resnet18", 120, spec=spec, weights=tiny_run / "best.pt")
    own = model.state_dict()
    assert own.keys() == best["model"].keys()
    for key, tensor in best["model"].items():
        assert torch.equal(own[key], tensor), key
    # Other classes and a dropout head: the backbone is the run's, the head is new.
    other = build_model("resnet18", 7, spec=spec, weights=tiny_run / "best.pt", dropout=0.2)
    assert torch.equal(other.net.layer4[1].bn2.running_mean, best["model"]["net.layer4.1.bn2.running_mean"])
    assert other.net.fc[1].weight.shape == (7, 512)
    # A head saved under dropout loads into a head without it.
    state = {k.removeprefix("net."): v for k, v in best["model"].items() if k.startswith("net.")}
    state["fc.1.weight"], state["fc.1.bias"] = state.pop("fc.weight"), state.pop("fc.bias")
    torch.save({"model": state}, tmp_path / "dropout-head.pt")
    plain = build_model("resnet18", 120, spec=spec, weights=tmp_path / "dropout-head.pt")
    assert torch.equal(plain.net.fc.weight, best["model"]["net.fc.weight"])
