import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from dogkit.analysis.evaluate import evaluate
from dogkit.data.dataset import load_dataset
from dogkit.deploy.preprocess import PreprocessSpec
from dogkit.errors import DogkitError
from dogkit.training.checkpoint import load_checkpoint, rng_state, set_rng_state
from dogkit.training.config import resolve_config
from dogkit.training.models import build_model
from dogkit.training.optim import apply_freeze
from dogkit.training.trainer import Trainer, train

TIMING = {"epoch_time_s", "val_time_s", "img_per_s", "data_wait_share"}


# A network of 0.4 M weights with stages and a pooled linear head: a regime 2 checkpoint (the weights, Adam's
# moments and every average) is 14 MB where resnet18's is 315 MB, and the run three times faster.
ARCH = "shufflenet_v2_x0_5"


def tiny(prepared: Path, runs: Path, exp: int = 1, **overrides):
    """A small network at 32 px for a few steps: the real code paths at a fraction of the cost."""
    settings = {"data": str(prepared), "runs_dir": str(runs), "arch": ARCH, "pretrained": False,
                "image_size": 32, "batch_size": 16, "epochs": 2, "max_steps_per_epoch": 3, "amp": "off",
                "workers": 0}
    settings.update(overrides)
    return resolve_config(exp, None, settings)


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_averaged_adam_run_leaves_a_complete_run_folder(prepared_sample: Path, tmp_path: Path):
    cfg = tiny(prepared_sample, tmp_path, exp=2, avg_window=4, avg_bn_images=32)
    result = train(cfg)
    run = result.run_dir
    assert run == tmp_path / f"exp2-{ARCH}" and result.finished and result.epochs_done == 2
    for name in ("config.json", "environment.json", "metrics.csv", "last.pt", "best.pt", "test_metrics.json"):
        assert (run / name).is_file(), name
    assert json.loads((run / "config.json").read_text()) == cfg.to_dict()
    env = json.loads((run / "environment.json").read_text())
    dataset_info = json.loads((prepared_sample / "dataset.json").read_text())
    assert env["manifest_sha256"] == dataset_info["manifest_sha256"] and env["torch"] == torch.__version__
    rows = read_rows(run / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    # 3 steps an epoch, M = 4: P is made at each epoch's end, from every iterate so far (1..3), then the last 4.
    assert [(r["P_first_step"], r["P_last_step"], r["P_iterates"]) for r in rows] == [("1", "3", "3"), ("3", "6", "4")]
    n_val = len(load_dataset(prepared_sample).split("val"))
    for row in rows:
        for prefix in ("val", "P_val", "G0.99_val", "G0.999_val"):
            m = {k: float(row[f"{prefix}_{k}"]) for k in ("loss", "accuracy", "top5", "precision_macro",
                                                          "recall_macro", "f1_macro")}
            assert m["accuracy"] * n_val == pytest.approx(round(m["accuracy"] * n_val), abs=1e-3)  # a count
            assert 0 <= m["accuracy"] <= m["top5"] <= 1 and 0 < m["loss"] < 20, (prefix, m)
    test = json.loads((run / "test_metrics.json").read_text())
    assert set(test["final"]) == {"raw", "P", "G0.99", "G0.999"}
    assert (test["final"]["P"]["steps"], test["final"]["P"]["iterates"]) == ([3, 6], 4)
    best = load_checkpoint(run / "best.pt")
    assert best["variant"] == test["best"]["variant"] in {"raw", "P", "G0.99", "G0.999"}
    assert best["class_names"][0] == "Chihuahua" and best["preprocess"]["size"] == 32
    # The selected model was chosen on validation: its val loss is the lowest of all variants and epochs.
    all_val_losses = [float(r[f"{p}_loss"]) for r in rows for p in ("val", "P_val", "G0.99_val", "G0.999_val")
                      if r[f"{p}_loss"] != "nan"]
    assert best["val_metrics"]["loss"] == pytest.approx(min(all_val_losses), rel=1e-5)
    # best.pt holds what was measured: evaluated again from the file, it scores its metrics.csv row.
    row = rows[best["epoch"] - 1]
    prefix = "val" if best["variant"] == "raw" else f"{best['variant']}_val"
    again = evaluate("torch", run=run, split="val", out=tmp_path / "again", device="cpu").metrics
    for key in ("accuracy", "top5", "precision_macro", "recall_macro", "f1_macro"):
        assert again[key] == pytest.approx(float(row[f"{prefix}_{key}"]), abs=1e-5), key


def test_interrupted_run_resumes_bit_for_bit(prepared_sample: Path, tmp_path: Path, monkeypatch):
    # On the CPU even where a GPU is visible: dogkit's determinism on CUDA is best effort (docs/training.md), so a
    # bit-for-bit comparison there would fail on the GPU's kernels, not on dogkit (test_kill.py pins it too).
    cfg = tiny(prepared_sample, tmp_path, exp=2, epochs=3, avg_window=5, avg_bn_images=32, deterministic=True,
               device="cpu")
    straight = train(cfg).run_dir

    original = Trainer.train_epoch

    def interrupt_after_two(self):
        if self.state.epoch == 2:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "train_epoch", interrupt_after_two)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    resumed_dir = tmp_path / f"exp2-{ARCH}-2"
    assert load_checkpoint(resumed_dir / "last.pt")["epoch"] == 2
    monkeypatch.setattr(Trainer, "train_epoch", original)
    train(resume=resumed_dir)

    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(resumed_dir / "last.pt")
    assert a["epoch"] == b["epoch"] == 3 and a["global_step"] == b["global_step"] == 9
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    for name, state in a["averages"]["emas"].items():
        for key, tensor in state.items():
            assert torch.equal(tensor, b["averages"]["emas"][name][key]), (name, key)
    for key, tensor in a["averages"]["published"].items():
        assert torch.equal(tensor, b["averages"]["published"][key]), key
    rows_a, rows_b = read_rows(straight / "metrics.csv"), read_rows(resumed_dir / "metrics.csv")
    strip = [{k: v for k, v in r.items() if k not in TIMING} for r in rows_a]
    assert strip == [{k: v for k, v in r.items() if k not in TIMING} for r in rows_b]

    # run.log: what both processes printed, in order, as plain text (no Rich markup), one timestamp per line.
    lines = (resumed_dir / "run.log").read_text().splitlines()
    messages = [line.split(" ", 2)[2] for line in lines]
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", line) for line in lines)
    order = [next(i for i, m in enumerate(messages) if m.startswith(start)) for start in (
        "run folder: ", "epoch 1/3: ", "epoch 2/3: ", "interrupted (Ctrl-C)", "resuming ", "epoch 3/3: ",
        "test (")]
    assert order == sorted(order) and not any("[/" in m or "[green]" in m for m in messages)
    assert f"run folder: {resumed_dir}" in messages[0]


def test_rng_state_round_trips_every_stream_exactly(tmp_path: Path):
    import io
    import random

    import numpy as np

    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    np.random.normal(size=5)  # an odd number of Gaussians: numpy caches the next one (has_gauss = 1)
    random.gauss(0, 1)  # Python caches one too
    np.random.randint(0, 10, 7)  # and the Mersenne Twister position is mid-block, not 624
    buf = io.BytesIO()
    torch.save(rng_state(), buf)  # through a checkpoint, as resume does
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    def draw():
        return (np.random.normal(size=3).tolist(), np.random.randint(0, 1000, 5).tolist(), random.gauss(0, 1),
                random.random(), torch.rand(3).tolist())

    first = draw()
    set_rng_state(saved)
    assert draw() == first


def test_averaged_adam_refuses_a_warm_up():
    with pytest.raises(DogkitError, match="warmup_epochs=0"):
        resolve_config(2, None, {"warmup_epochs": 1})
    assert resolve_config(2, None, {}).warmup_epochs == 0


def test_averages_under_gradual_freeze_recompute_only_the_trainable_batchnorm(prepared_sample: Path, tmp_path: Path):
    cfg = tiny(prepared_sample, tmp_path, exp=2, avg_window=2, avg_bn_images=32, freeze="gradual", epochs=3,
                arch="resnet18")  # its layers are named below
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.state.epoch = 1  # head + layer4 trainable
    trainer.train_epoch()
    raw = trainer.model.state_dict()
    variants = dict(trainer.variants())
    assert set(variants) == {"raw", "P", "G0.99", "G0.999"}
    for name in ("P", "G0.99"):
        net = variants[name].state_dict()
        assert not variants[name].training
        # Frozen stem and stages: statistics never changed, kept as they are (in the raw model too).
        for key in ("net.bn1.running_mean", "net.layer3.1.bn2.running_var"):
            assert torch.equal(net[key], raw[key]), (name, key)
        # The trainable stage: recomputed for the averaged weights, a plain average over the batches.
        assert not torch.allclose(net["net.layer4.1.bn2.running_mean"], raw["net.layer4.1.bn2.running_mean"])
        assert int(net["net.layer4.1.bn2.num_batches_tracked"]) == 2  # 32 images in batches of 16


def test_finished_run_is_not_trained_again(prepared_sample: Path, tmp_path: Path, capsys):
    run = train(tiny(prepared_sample, tmp_path, epochs=1)).run_dir
    before = (run / "last.pt").stat().st_mtime_ns
    result = train(resume=run)
    assert result.finished and result.epochs_done == 1
    assert (run / "last.pt").stat().st_mtime_ns == before
    assert "is finished" in capsys.readouterr().err


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(prepared_sample, tmp_path, monkeypatch):
    import dogkit.training.loop as train_module

    real_ce = torch.nn.functional.cross_entropy
    calls = {"train": 0}

    def poisoned(logits, target, *args, **kwargs):
        loss = real_ce(logits, target, *args, **kwargs)
        if "label_smoothing" in kwargs:  # only training steps pass label smoothing
            calls["train"] += 1
            if calls["train"] == 5:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(train_module.F, "cross_entropy", poisoned)
    with pytest.raises(DogkitError, match=r"loss became nan at epoch 2, step 2 \(global step 5\)"):
        train(tiny(prepared_sample, tmp_path, epochs=3))
    assert (tmp_path / f"exp1-{ARCH}" / "run.log").read_text().splitlines()[-1].endswith(
        "error: loss became nan at epoch 2, step 2 (global step 5); training stopped. The last good checkpoint is "
        f"kept in {tmp_path / f'exp1-{ARCH}' / 'last.pt'}. Lower the learning rate (--lr) or check the data.")
    ckpt = load_checkpoint(tmp_path / f"exp1-{ARCH}" / "last.pt")
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_freeze_schedules_keep_the_stem_frozen():
    cfg = resolve_config(1, None, {"freeze": "gradual"})
    model = build_model("resnet18", 10, spec=PreprocessSpec.for_size(32))

    def trainable():
        return {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad}

    apply_freeze(cfg, model, 0)
    assert trainable() == {"fc"}
    apply_freeze(cfg, model, 2)
    assert trainable() == {"fc", "layer4", "layer3"}
    apply_freeze(cfg, model, 10)
    assert trainable() == {"fc", "layer4", "layer3", "layer2", "layer1"}
    probe = resolve_config(1, None, {"freeze": "linear-probe", "probe_epochs": 1})
    apply_freeze(probe, model, 0)
    assert trainable() == {"fc"}
    apply_freeze(probe, model, 1)
    assert trainable() == {"conv1", "bn1", "fc", "layer1", "layer2", "layer3", "layer4"}


def test_real_resnet50_trains_end_to_end_on_cpu(prepared_sample: Path, tmp_path: Path):
    """The real network, local 'ImageNet' weights, bf16 autocast where the CPU has it, a few steps at 64 px."""
    weights = tmp_path / "resnet50-imagenet.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50().state_dict(), weights)
    cfg = tiny(prepared_sample, tmp_path, arch="resnet50", weights=str(weights), image_size=64, batch_size=8,
               epochs=1, max_steps_per_epoch=2, amp="auto")
    result = train(cfg)
    test = result.test["best"]["test"]
    assert set(test) >= {"accuracy", "top5", "precision_macro", "recall_macro", "f1_macro"}
    best = load_checkpoint(result.run_dir / "best.pt")
    assert best["model"]["net.fc.weight"].shape == (120, 2048)


def test_cli_trains_regime_3_and_resume_reports_finished(prepared_sample: Path, tmp_path: Path):
    def dogkit(*args):
        return subprocess.run([sys.executable, "-m", "dogkit", "train", *args], capture_output=True, text=True,
                              timeout=600)

    proc = dogkit("--exp", "3", "--data", str(prepared_sample), "--runs-dir", str(tmp_path), "--arch", ARCH,
                  "--image-size", "32", "--epochs", "1", "--batch-size", "16", "--set", "max_steps_per_epoch=2",
                  "--set", "workers=0", "--amp", "off")
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / f"exp3-{ARCH}"
    assert (run / "test_metrics.json").is_file() and f"dogkit export {run}" in proc.stderr
    again = dogkit("--resume", str(run))
    assert again.returncode == 0 and "is finished" in again.stderr
    typo = dogkit("--exp", "1", "--set", "lr_schedule=cosine")
    assert typo.returncode == 2 and "unknown setting 'lr_schedule'" in typo.stderr and "Traceback" not in typo.stderr


# ----------------------------------------------------------------------------- throughput: syncs, compile, loader


def test_nan_is_caught_at_the_next_sync_and_names_the_exact_step(prepared_sample, tmp_path, monkeypatch):
    import dogkit.training.loop as train_module

    real_ce = torch.nn.functional.cross_entropy
    calls = {"train": 0}

    def poisoned(logits, target, *args, **kwargs):
        loss = real_ce(logits, target, *args, **kwargs)
        if "label_smoothing" in kwargs:
            calls["train"] += 1
            if calls["train"] == 3:
                return loss * float("inf")
        return loss

    monkeypatch.setattr(train_module.F, "cross_entropy", poisoned)
    cfg = tiny(prepared_sample, tmp_path, epochs=1, max_steps_per_epoch=6, batch_size=8, sync_every=2)
    with pytest.raises(DogkitError, match=r"loss became inf at epoch 1, step 3 \(global step 3\)"):
        train(cfg)
    assert calls["train"] == 4  # the host looked at step 4, the first sync point after the bad step


def test_train_epoch_reads_the_device_once_per_sync_not_per_step(prepared_sample, tmp_path, monkeypatch):
    """Every host read of a tensor made by the training loop (item, float, int, bool) is a wait for the GPU."""
    import sys as sys_module

    reads = {"n": 0}
    for name in ("item", "__float__", "__int__", "__bool__", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            if sys_module._getframe(1).f_code.co_filename.endswith(str(Path("dogkit", "training", "loop.py"))):
                reads["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def reads_in_one_epoch(sync_every: int) -> int:
        cfg = tiny(prepared_sample, tmp_path, exp=2, epochs=1, max_steps_per_epoch=8, batch_size=8,
                   sync_every=sync_every, avg_window=2)
        trainer = Trainer(cfg, tmp_path)
        reads["n"] = 0
        row = trainer.train_epoch()
        assert trainer.state.global_step == 8 and math.isfinite(row["train_loss"]) and 0 <= row["train_accuracy"] <= 1
        return reads["n"]

    once = reads_in_one_epoch(50)
    assert once <= 5  # the end-of-epoch sync: NaN check, progress text, the two loss sums and the correct count
    assert reads_in_one_epoch(2) == once + 3 * 2  # syncs after steps 2, 4, 6 add two reads each; 8 is the end


def test_compile_modes_reach_torch_compile_and_adam(prepared_sample, tmp_path, monkeypatch):
    from dogkit.training.device import compile_settings
    from dogkit.training.optim import build_optimizer

    seen = []
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: seen.append(kwargs) or model)
    trainer = Trainer(tiny(prepared_sample, tmp_path, compile=True, compile_mode="reduce-overhead"), tmp_path)
    # No CUDA graphs on the CPU: compiled in the default mode, Adam as usual.
    assert seen == [{"mode": "default"}] and not trainer.cuda_graphs
    assert trainer.optimizer.defaults["capturable"] is False
    Trainer(tiny(prepared_sample, tmp_path, compile=True, compile_mode="max-autotune"), tmp_path)
    assert seen[-1] == {"mode": "max-autotune"}
    Trainer(tiny(prepared_sample, tmp_path), tmp_path)
    assert len(seen) == 2  # no --compile, no torch.compile

    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    for mode, expected in (("default", ("default", False)), ("reduce-overhead", ("reduce-overhead", True)),
                           ("max-autotune", ("max-autotune", True))):
        assert compile_settings(resolve_config(1, None, {"compile": True, "compile_mode": mode}), cuda) == expected
    assert compile_settings(resolve_config(1, None, {"compile_mode": "reduce-overhead"}), cuda)[1] is False
    model = build_model("resnet18", 10, spec=PreprocessSpec.for_size(32))
    for optimizer in ("adam", "averaged-adam", "adamw"):
        cfg = resolve_config(None, None, {"optimizer": optimizer, "schedule": "constant"})
        assert build_optimizer(cfg, model, capturable=True).defaults["capturable"] is True
    with pytest.raises(DogkitError, match="compile_mode must be one of default, reduce-overhead, max-autotune"):
        resolve_config(1, None, {"compile_mode": "reduce_overhead"})


def test_cuda_graph_steps_are_marked_once_per_micro_step(prepared_sample, tmp_path, monkeypatch):
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    trainer = Trainer(tiny(prepared_sample, tmp_path, max_steps_per_epoch=2, batch_size=8, accumulate=2), tmp_path)
    trainer.cuda_graphs = True  # as compile_settings sets it on a GPU with reduce-overhead
    trainer.train_epoch()
    assert len(marks) == 4


def test_loader_batches_do_not_depend_on_workers_or_persistence(prepared_sample: Path):
    from dogkit.data.dataset import load_dataset
    from dogkit.training.loaders import ManifestImages, make_loader
    from dogkit.training.transforms import AugmentFn, train_augment

    dataset = load_dataset(prepared_sample)
    spec = PreprocessSpec.for_size(32)
    images = ManifestImages(dataset, dataset.split("train")[:40], AugmentFn(train_augment(spec, "strong")), "none")

    def epochs(workers: int, persistent: bool) -> list[list[tuple]]:
        loader = make_loader(images, 8, shuffle=True, workers=workers, seed=3, drop_last=True, persistent=persistent)
        out = []
        for epoch in (0, 1):
            loader.batch_sampler.set_epoch(epoch)
            out.append([(x.clone(), y.clone()) for x, y in loader])
        # Persistent workers write into the shared ring (a slot per batch, reused): the batches are its views.
        ring = images.ring
        assert (ring is not None) == persistent
        if persistent:
            x, _ = next(iter(loader))
            assert x.untyped_storage().data_ptr() == ring.untyped_storage().data_ptr()
        return out

    reference = epochs(0, False)
    assert len(reference[0]) == 5 and reference[0][0][0].shape == (8, 32, 32, 3)
    assert not torch.equal(reference[0][0][0], reference[1][0][0])  # a new epoch, new order and augmentations
    for workers, persistent in ((2, True), (1, False)):
        other = epochs(workers, persistent)
        for a, b in zip(reference, other, strict=True):
            for (xa, ya), (xb, yb) in zip(a, b, strict=True):
                assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_image_cache_pickles_without_its_pixels(prepared_sample: Path, tmp_path: Path):
    import pickle
    import shutil

    from dogkit.data.cache import ImageCache, build_cache
    from dogkit.data.dataset import load_dataset

    copy = tmp_path / "prepared"
    shutil.copytree(prepared_sample, copy)
    dataset = load_dataset(copy)
    build_cache(dataset, 24)
    cache = ImageCache(dataset, 24)
    first = np.array(cache[5])
    blob = pickle.dumps(cache)
    assert (cache.path / "images.u8").stat().st_size > 1_000_000 and len(blob) < 100_000
    assert np.array_equal(pickle.loads(blob)[5], first)


def test_albumentations_never_looks_for_updates():
    code = (
        "import importlib.abc, os, sys\n"
        "seen = []\n"
        "class Spy(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'albumentations':\n"
        "            seen.append(os.environ.get('NO_ALBUMENTATIONS_UPDATE'))\n"
        "sys.meta_path.insert(0, Spy())\n"
        "import dogkit.training.loaders\n"
        "print(seen)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['1']"


def test_two_runs_started_at_once_with_one_name_get_two_folders(tmp_path: Path):
    from concurrent.futures import ThreadPoolExecutor

    from dogkit.runs import new_run_dir

    with ThreadPoolExecutor(8) as pool:
        folders = list(pool.map(lambda _: new_run_dir(tmp_path, name="same", exp=1, arch="resnet50"), range(8)))
    assert len(set(folders)) == 8 and all(f.is_dir() for f in folders)
    assert sorted(f.name for f in folders) == sorted(["same", *(f"same-{k}" for k in range(2, 9))])


def test_the_plain_training_loss_is_logged_beside_the_smoothed_one(prepared_sample: Path, tmp_path: Path):
    smoothed = read_rows(train(tiny(prepared_sample, tmp_path / "a", epochs=1, label_smoothing=0.3)).run_dir
                         / "metrics.csv")[0]
    plain = read_rows(train(tiny(prepared_sample, tmp_path / "b", epochs=1, label_smoothing=0.0)).run_dir
                      / "metrics.csv")[0]
    # Without smoothing the two columns are one loss; with it they are two (the smoothed one's floor only shows
    # once the model is confident, which three steps from random weights are not).
    assert float(plain["train_loss_plain"]) == pytest.approx(float(plain["train_loss"]), rel=1e-6)
    assert abs(float(smoothed["train_loss"]) - float(smoothed["train_loss_plain"])) > 1e-3


def test_resume_with_more_epochs_trains_a_finished_run_on_and_keeps_its_first_results(prepared_sample: Path,
                                                                                     tmp_path: Path):
    run = train(tiny(prepared_sample, tmp_path, epochs=1)).run_dir
    first = json.loads((run / "test_metrics.json").read_text())
    result = train(resume=run, overrides={"epochs": 2})
    assert result.finished and result.epochs_done == 2 and len(read_rows(run / "metrics.csv")) == 2
    assert json.loads((run / "test_metrics.1-epochs.json").read_text()) == first
    assert json.loads((run / "config.json").read_text())["epochs"] == 2
    with pytest.raises(DogkitError, match="^lr cannot change on --resume: it defines the run"):
        train(resume=run, overrides={"lr": 1.0})


def test_resume_with_as_many_epochs_as_done_finishes_the_run_once(prepared_sample: Path, tmp_path: Path,
                                                                  monkeypatch, capsys):
    """A 3-epoch run stopped inside epoch 2 and resumed with --epochs 1 ends at epoch 1 (last.pt, not the recovery
    checkpoint inside the epoch no longer planned), tested once, then done: it was tested again on every later
    resume, and never said so."""
    import dogkit.training.loop as loop

    real_step = loop.optimizer_step

    def interrupted(parts, global_step):
        if global_step == 4:  # epoch 2's second step, after the recovery checkpoint of its first
            raise KeyboardInterrupt
        return real_step(parts, global_step)

    monkeypatch.setattr(loop, "optimizer_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(prepared_sample, tmp_path, epochs=3, sync_every=1, recovery_minutes=1e-9))
    run = tmp_path / f"exp1-{ARCH}"
    assert load_checkpoint(run / "recovery.pt")["global_step"] == 4
    monkeypatch.setattr(loop, "optimizer_step", real_step)
    result = train(resume=run, overrides={"epochs": 1})
    assert result.finished and result.epochs_done == 1 and result.test["best"]["epoch"] == 1
    last = load_checkpoint(run / "last.pt")
    assert (last["epochs"], last["epoch"], last["global_step"], last["stopped"], last["tested"]) == (1, 1, 3, False,
                                                                                                    True)
    assert not (run / "recovery.pt").exists() and len(read_rows(run / "metrics.csv")) == 1
    before = ((run / "last.pt").stat().st_mtime_ns, (run / "test_metrics.json").stat().st_mtime_ns)
    capsys.readouterr()
    again = train(resume=run)
    assert again.finished and "is finished" in capsys.readouterr().err
    assert ((run / "last.pt").stat().st_mtime_ns, (run / "test_metrics.json").stat().st_mtime_ns) == before


def test_the_run_state_says_what_a_resume_does():
    from dogkit.training.runstate import RunState

    def after(state: RunState, epochs: int) -> tuple[bool, bool, bool, bool]:
        trains_on = state.replan(epochs)
        return trains_on, state.finished, state.done, state.stopped

    assert after(RunState(3, epoch=3, tested=True), 3) == (False, True, True, False)  # done: nothing to do
    assert after(RunState(3, epoch=3, tested=True), 5) == (True, False, False, False)  # given more: trains on
    assert after(RunState(4, epoch=2), 2) == (False, True, False, False)  # as many as done: test, then done
    assert after(RunState(4, epoch=2), 3) == (False, False, False, False)
    stopped = RunState(6, epoch=3, stopped=True, tested=True)
    assert after(stopped, 6) == (False, True, True, True)  # stopped early stays stopped
    assert after(stopped, 8) == (True, False, False, False)  # unless given more epochs
    state = RunState(5, epoch=2, global_step=6, best={"epoch": 1}, history=[{"epoch": 1}, {"epoch": 2}])
    ckpt = state.to_checkpoint(position={"micro": 3})
    again = RunState.from_checkpoint(ckpt, Path("last.pt"))
    assert again == RunState(5, epoch=2, global_step=6, best={"epoch": 1}, history=[{"epoch": 1}, {"epoch": 2}],
                             position={"micro": 3}) and state.position is None
    with pytest.raises(DogkitError, match=r"^last.pt was saved by an older dogkit, before the run-state record"):
        RunState.from_checkpoint({**ckpt, "run_format": 1}, Path("last.pt"))


def test_the_plateau_schedule_follows_monitor_with_its_own_patience():
    from dogkit.training.optim import build_scheduler, step_plateau

    def lrs(monitor: str, rows: list[tuple[float, float]]) -> list[float]:
        cfg = resolve_config(1, None, {"schedule": "plateau", "warmup_epochs": 0, "monitor": monitor,
                                       "plateau_patience": 1, "gamma": 0.5, "lr": 1.0})
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
        scheduler, when = build_scheduler(cfg, optimizer, 10)
        assert when == "plateau"
        out = []
        for loss, accuracy in rows:
            step_plateau(scheduler, cfg, {"val_loss": loss, "val_accuracy": accuracy})
            out.append(optimizer.param_groups[0]["lr"])
        return out

    # Accuracy and loss both rise (an overconfident model): on accuracy nothing stalls; on loss, one epoch of
    # patience is spent at epoch 2 and the rate is cut at epoch 3.
    rising = [(1.0, 0.2), (1.1, 0.3), (1.2, 0.4), (1.3, 0.5)]
    assert lrs("accuracy", rising) == [1.0, 1.0, 1.0, 1.0]
    assert lrs("loss", rising) == [1.0, 1.0, 0.5, 0.5]
    assert lrs("accuracy", [(1.0, 0.4), (1.0, 0.4), (1.0, 0.4), (1.0, 0.4)]) == [1.0, 1.0, 0.5, 0.5]
    assert resolve_config(1, None, {}).plateau_patience == 2
    with pytest.raises(DogkitError, match="plateau_patience must be 0 or more, got -1"):
        resolve_config(1, None, {"plateau_patience": -1})


def test_early_stopping_ends_with_the_mean_of_the_last_m_iterates(prepared_sample: Path, tmp_path: Path,
                                                                  monkeypatch):
    # Only the first epoch counts as an improvement: patience 2 stops the 6-epoch run after epoch 3 (step 9).
    monkeypatch.setattr("dogkit.training.trainer.is_better", lambda value, best, monitor: best is None)
    cfg = tiny(prepared_sample, tmp_path, exp=2, epochs=6, early_stopping=2, avg_window=4, avg_bn_images=32)
    result = train(cfg)
    assert result.finished and result.epochs_done == 3
    assert "early stopping" in (result.run_dir / "run.log").read_text()
    test = json.loads((result.run_dir / "test_metrics.json").read_text())
    # Not the window of the planned end (steps 15..18), nor a block of it: the last 4 steps taken.
    assert (test["final"]["P"]["steps"], test["final"]["P"]["iterates"]) == ([6, 9], 4)
    assert test["averages"]["P"] == "P: mean of the 4 iterates of steps 6–9"
    assert [r["P_last_step"] for r in read_rows(result.run_dir / "metrics.csv")] == ["3", "6", "9"]


def test_sigterm_ends_training_as_ctrl_c_does_logged_and_resumable(prepared_sample: Path, tmp_path: Path):
    """docker stop, Kubernetes and SLURM send SIGTERM: the run says so (console and run.log), exits 143 and resumes."""
    run = tmp_path / "runs" / "term"
    proc = subprocess.Popen([sys.executable, "-m", "dogkit", "train", "--exp", "3", "--data", str(prepared_sample),
                             "--runs-dir", str(tmp_path / "runs"), "--name", "term", "--arch", ARCH,
                             "--image-size", "32", "--batch-size", "16", "--epochs", "20", "--set", "amp=off",
                             "--set", "workers=0", "--set", "max_steps_per_epoch=2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run / "last.pt").exists():  # an epoch is done: there is work to keep
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    said = f"interrupted (SIGTERM); `dogkit train --resume {run}` continues it"
    assert err.strip().splitlines()[-1] == said and "Traceback" not in err, err
    assert (run / "run.log").read_text().splitlines()[-1].endswith(said)
    done = load_checkpoint(run / "last.pt")["epoch"]
    assert 1 <= done < 20
