"""scripts/gpu_check.py, the one-command CUDA check: its planning and its verdicts on known figures, its
timeouts on a real child process, and a dry run of its steps end to end on the CPU (tiny sizes), so that the
run on a GPU machine cannot fail on the script itself."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
from conftest import gpu_check_script

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.py"


gpu_check = gpu_check_script()


def summary_with(**steps) -> dict:
    return {"steps": steps, "targets": [], "dry": False, "started": "now", "sizes": {"size": 112}}


def row(what, rate, exp=None, compile_mode=None, start=0.0, timed_start=0.0, **labels):
    return {"what": what, "img_per_s": rate, "exp": exp, "compile_mode": compile_mode, "start": start,
            "timed_start": timed_start, **labels}


def test_epochs_fill_the_time_left_with_a_fifth_in_hand():
    s = gpu_check.FULL
    # 4,685 training and 1,000 validation images at 2,000 img/s: 2.34 + 0.17 + 1 s = 3.51 s an epoch, × 1.2.
    assert gpu_check.epochs_for(300, 4685, 1000, 2000.0, 0.0, s) == 71
    # A compiled run pays its warm-up first.
    assert gpu_check.epochs_for(300, 4685, 1000, 6000.0, 60.0, s) == 108
    assert gpu_check.epochs_for(10, 4685, 1000, 2000.0, 60.0, s) == 0
    assert gpu_check.epochs_for(300, 4685, 1000, None, 0.0, s) == s.min_epochs  # nothing measured


def test_targets_are_ratios_of_the_figures_measured_in_the_run():
    throughput = {"results": [row("bare step", 2000.0), row("train", 1900.0, exp=1), row("train", 1500.0, exp=2),
                              row("train", 1800.0, exp=3)]}
    graphs = {"results": [row("bare step", 2100.0), row("bare step", 7000.0, compile_mode="reduce-overhead"),
                          row("train", 5000.0, exp=1, compile_mode="reduce-overhead")]}
    loader = {"results": [row("loader", 9000.0, source="prepare cache", augment="light", workers=16),
                          row("loader", 800.0, source="JPEG decode", augment="light", workers=16)]}
    check = object.__new__(gpu_check.Check)
    check.sizes = gpu_check.FULL
    check.summary = summary_with(suite={"status": "ok", "failures": 0, "errors": 0, "pytest": "459 passed"},
                                 throughput=throughput, graphs=graphs, loader=loader,
                                 dogs51={"status": "ok", "gpu_util_percent": 71.5})
    check.targets()
    verdicts = {t["target"].split(" ≥")[0]: (t["met"], t["figure"]) for t in check.summary["targets"]}
    assert verdicts["the suite passes with the GPU visible"] == (True, "459 passed")
    assert verdicts["`train --exp 1` / bare step (eager)"] == (True, "0.95 (1,900 / 2,000 img/s)")
    # 1500 / 1900 = 0.79: 12 % short of 0.9.
    assert verdicts["`train --exp 2` / `train --exp 1` (eager)"] == (False, "0.79 (1,500 / 1,900 img/s); 12% short")
    # The compiled regime 1 against regime 1's own eager figure.
    assert verdicts["`train --exp 1 --compile` (CUDA graphs) / `train --exp 1` (eager)"][0] is True
    assert verdicts["loader, light augmentation, every CPU / bare step in CUDA graphs"] == \
        (True, "1.29 (9,000 / 7,000 img/s)")
    assert verdicts["GPU utilisation during the dogs51 epochs"] == (False, "71.5 %")
    text = gpu_check.markdown(check.summary)
    assert "| `train --exp 2` / `train --exp 1` (eager) ≥ 0.9 | NO | 0.79 (1,500 / 1,900 img/s); 12% short |" in text


def test_a_missing_figure_is_a_missed_target_not_a_crash():
    check = object.__new__(gpu_check.Check)
    check.sizes = gpu_check.FULL
    check.summary = summary_with(throughput={"results": [row("bare step", 2000.0),
                                                         {"what": "train", "exp": 1, "error": "RuntimeError: x"}]})
    check.targets()
    first = check.summary["targets"][0]
    assert first["met"] is False and first["figure"] == "not measured"


def check_for(tmp_path: Path, budget: float = 60) -> object:
    args = Namespace(outdir=tmp_path / "out", work=None, dry=True, device="cpu", budget=budget, steps=[],
                     python=sys.executable, sample=tmp_path, dogs51=tmp_path, overrun=45)
    return gpu_check.Check(args)


@pytest.fixture
def ctrl_c_ignored():
    """Ctrl-C (SIGINT) ignored, as a program started in the background by a shell script (`… &`, as CI may be)
    has it, and passes it on to what it starts."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGINT, before)


def test_a_step_past_its_timeout_gets_ctrl_c_and_its_output_is_kept(tmp_path, ctrl_c_ignored):
    check = check_for(tmp_path)
    child = ("import time\ntry:\n    print('working', flush=True)\n    time.sleep(60)\nexcept KeyboardInterrupt:\n"
             "    print('stopped cleanly', flush=True)\n    raise SystemExit(130)\n")
    for timeout in (2, 8, 30):
        outcome = check.command("slow", [sys.executable, "-c", child], timeout=timeout)
        # Ctrl-C before the child was inside its `try` (a slow start on a busy machine) is not what is tested here.
        if outcome.lines and outcome.lines[0][1] == "working":
            break
    assert outcome.timed_out and outcome.rc == 130
    assert outcome.seconds < timeout + 20  # stopped by the Ctrl-C, not by the SIGTERM 20 s after it
    assert [text for _, text in outcome.lines] == ["working", "stopped cleanly"]
    log = (tmp_path / "out" / "logs" / "slow.log").read_text()
    assert "stopped cleanly" in log and "(timed out)" in log
    record = {}
    assert not check.finish(record, outcome, "the child")
    assert record["status"] == "timed out"


def test_a_failing_step_reports_its_last_line(tmp_path):
    check = check_for(tmp_path)
    outcome = check.command("bad", [sys.executable, "-c", "print('one'); print('error: the reason'); exit(2)"], 30)
    record = {}
    assert not check.finish(record, outcome, "the child")
    assert record == {"status": "failed", "why": "the child exit 2: error: the reason"}


def test_steps_are_cut_to_leave_the_later_steps_their_slots(tmp_path):
    check = check_for(tmp_path, budget=200)
    check.args.steps = ["suite", "dogs51"]
    check.sizes = gpu_check.FULL
    assert 88 <= check.timeout("suite") <= 90  # 200 s left: 100 kept for dogs51, 10 for the summary
    check.args.steps = ["suite"]
    assert check.timeout("suite") == 140  # its slot
    check.args.steps = ["suite", "graphs", "dogs51"]
    # A budget short of the plan: the first step gives up its time (under 5 s: skipped), the later ones keep theirs.
    assert check.timeout("suite") < 5 and 88 <= check.timeout("graphs") <= 90
    assert 189 <= check.timeout("dogs51") <= 190  # the last has all that is left


def test_the_plan_fits_one_call_and_gives_every_step_its_slot_at_the_h100_estimates(tmp_path):
    """Each step taking what BENCHMARKS.md estimates for an H100 (the suite its whole cap), in the default budget:
    no step is cut, every target's step is measured, and dogs51 has more than its minimum."""
    estimates = {"env": 10, "suite": 140, "study": 120, "prepare": 40, "throughput": 60, "loader": 30, "graphs": 100}
    check = check_for(tmp_path, budget=510)
    check.sizes, check.args.steps = gpu_check.FULL, list(gpu_check.STEPS)
    assert sum(max(gpu_check.FULL.slots[s] for s in group) for group in gpu_check.FULL.groups) <= 510 - 30
    elapsed = 0
    for group in gpu_check.FULL.groups:
        check.deadline = time.monotonic() + 510 - elapsed  # as if every earlier step took its estimate
        if group == ("dogs51",):
            assert check.timeout("dogs51") >= 140 > gpu_check.FULL.slots["dogs51"]
            break
        for step in group:
            assert check.timeout(step) == gpu_check.FULL.slots[step] >= estimates[step], step
        elapsed += max(estimates[step] for step in group)


def test_steps_that_need_the_prepared_data_bring_the_prepare_step(tmp_path, monkeypatch):
    """`--steps graphs,dogs51` on a fresh machine: without the prepared dogs51 folder they would only be skipped."""
    check = check_for(tmp_path)
    check.args.steps = ["graphs", "dogs51"]
    ran = []
    monkeypatch.setattr(check, "step", lambda step, together: ran.append(step))
    check.run()
    assert ran == ["prepare", "graphs", "dogs51"]
    assert "graphs, dogs51 need the prepared dogs51 folder" in (tmp_path / "out" / "gpu_check.log").read_text()
    (check.work / "data" / "dogs51").mkdir(parents=True)
    (check.work / "data" / "dogs51" / "manifest.csv").write_text("path,label,split\n")
    check.args.steps, ran[:] = ["loader"], []
    check.run()  # prepared by an earlier check: not again
    assert ran == ["loader"]


def test_dry_run_of_every_step_on_the_cpu(tmp_path, sample_dir, quick_study):
    """The steps' real commands at tiny sizes; the suite step runs a few tests, the graphs step compiles
    ResNet18 in the default mode (no CUDA graphs on a CPU). The work folder is the session's quick study, made with
    the study step's own command: that step is a rerun of it here (every run finished, every file current), as a
    rerun of the check on the GPU machine would be."""
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), "--dry", "--sample", str(sample_dir),
                           "--dogs51", str(sample_dir), "--budget", "1500", "--work", str(quick_study[2])],
                          capture_output=True, text=True, timeout=1800)
    summary = json.loads((out / "summary.json").read_text())
    steps = summary["steps"]
    assert proc.returncode == 0, (proc.stdout[-3000:], {k: v.get("why") for k, v in steps.items()})
    assert list(steps) == list(gpu_check.STEPS)
    assert all(s["status"] == "ok" for s in steps.values())
    assert steps["env"]["versions"]["torch"] and steps["env"]["cpus"] >= 1
    assert steps["suite"]["tests"] >= 1 and steps["suite"]["failures"] == 0
    assert steps["study"]["int8"] and (out / "study" / "report.md").is_file()
    assert (out / "logs" / "study.log").read_text().count("is finished; skipping") == 3
    assert steps["prepare"]["images"] == {"train": 720, "val": 120, "test": 120}
    rates = [r for name in ("throughput", "graphs", "loader") for r in steps[name]["results"]]
    assert len(rates) == 4 + 3 + 4 and all(r["img_per_s"] > 0 for r in rates)
    dogs51 = steps["dogs51"]
    assert dogs51["epochs_done"] == dogs51["epochs"] >= 1
    assert 0 <= dogs51["test"]["accuracy"] <= 1 and (out / "dogs51" / "test_metrics.json").is_file()
    text = (out / "summary.md").read_text()
    assert text in proc.stdout and "| target | met | figure |" in text


def probe(tmp_path: Path, *roots: Path) -> dict:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home"), "TORCH_HOME": str(tmp_path / "torch")}
    proc = subprocess.run([sys.executable, "-c", gpu_check.ENV_PROBE, str(tmp_path), *map(str, roots)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_imagenet_weights_on_the_machine_are_found_checked_and_used(tmp_path):
    import torch
    import torchvision

    state = torchvision.models.resnet50().state_dict()
    models = tmp_path / "models" / "hub" / "models--timm--resnet50.a1_in1k"
    models.mkdir(parents=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, models / "pytorch_model.bin")
    other = torchvision.models.resnet18(num_classes=10).state_dict()
    torch.save(other, tmp_path / "models" / "resnet50-finetuned.pth")
    found = probe(tmp_path, tmp_path / "models")
    assert found["versions"]["torch"] == torch.__version__
    weights = found["weights"]
    verdicts = {Path(w["path"]).name: w["verdict"] for w in weights["found"]}
    assert verdicts["resnet50-finetuned.pth"] == "not an ImageNet ResNet50 in torchvision's layout"
    assert verdicts["pytorch_model.bin"].startswith("an ImageNet ResNet50 in torchvision's layout: used for")
    # Saved as a plain state dict that `--weights` (a weights_only load) takes, equal to the one found.
    used = torch.load(weights["use"], weights_only=True)
    assert used.keys() == state.keys() and torch.equal(used["fc.weight"], state["fc.weight"])
    assert weights["summary"] == f"--weights {weights['use']}"


def test_weights_in_the_torch_hub_cache_are_left_for_dogkit_to_find(tmp_path):
    import torch
    import torchvision

    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    name = Path(torchvision.models.ResNet50_Weights.DEFAULT.url).name
    torch.save(torchvision.models.resnet50().state_dict(), hub / name)
    elsewhere = tmp_path / "models" / "resnet50.pth"
    elsewhere.parent.mkdir()
    torch.save(torchvision.models.resnet50().state_dict(), elsewhere)
    weights = probe(tmp_path, tmp_path / "models")["weights"]
    assert weights["use"] is None and weights["summary"] == "torch hub cache (dogkit finds it itself)"
    verdicts = {Path(w["path"]).name: w["verdict"] for w in weights["found"]}
    assert verdicts[name].endswith("dogkit finds it itself (torch hub cache)")
    assert verdicts["resnet50.pth"] == "an ImageNet ResNet50 in torchvision's layout"  # listed, not needed


def test_gpu_utilisation_is_read_from_nvidia_smi_and_averaged_over_a_window(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    # What `nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 250` prints.
    fake.write_text("#!/bin/sh\nfor u in 10 90 90 90; do echo \"$u, 2048\"; sleep 0.2; done\necho 'N/A, N/A'\n"
                    "sleep 30\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:/usr/bin:/bin")
    start = time.time()
    sampler = gpu_check.GpuSampler(tmp_path / "util.csv")
    time.sleep(1.5)
    sampler.stop()
    assert [u for _, u, _ in sampler.samples] == [10, 90, 90, 90]  # the unreadable line is left out
    assert sampler.mean(start, time.time()) == 70.0
    assert sampler.mean(sampler.samples[1][0], time.time()) == 90.0
    assert sampler.mean(0, 1) is None
    assert (tmp_path / "util.csv").read_text().count("\n") == 5


def test_sigterm_stops_the_running_step_and_still_writes_the_summary(tmp_path, sample_dir, ctrl_c_ignored):
    """What a hard time limit around the check (`timeout 570 …`) sends: the step running gets Ctrl-C, and
    summary.md says the check was stopped and what it had done."""
    for attempt in range(3):
        out = tmp_path / f"check{attempt}"
        proc = subprocess.Popen([sys.executable, str(SCRIPT), str(out), "--dry", "--steps", "prepare,dogs51",
                                 "--sample", str(sample_dir), "--dogs51", str(sample_dir)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # wait until the dogs51 run has made its folder and is training
            log = out / "logs" / "dogs51.log"
            if log.is_file() and "run folder:" in log.read_text():
                break
            time.sleep(0.2)
        else:
            proc.kill()
            pytest.fail("the dogs51 run never started")
        proc.terminate()
        stdout, _ = proc.communicate(timeout=120)
        # The one-epoch run lasts seconds after its first line; should it still end before the check's Ctrl-C
        # reaches it (a machine busier than that), nothing was left to stop, and the check is run again.
        if json.loads((out / "summary.json").read_text())["steps"].get("dogs51", {}).get("status") != "ok":
            break
    assert proc.returncode == 130
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] == "SIGTERM"
    assert summary["steps"]["prepare"]["status"] == "ok"
    assert summary["steps"]["dogs51"]["status"] == "interrupted"
    assert "Stopped before the end (SIGTERM)" in (out / "summary.md").read_text()
    # The training run itself was stopped as Ctrl-C stops it: its folder says how to resume.
    assert "dogkit train --resume" in (out / "logs" / "dogs51.log").read_text()
