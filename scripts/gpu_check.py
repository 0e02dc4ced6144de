#!/usr/bin/env python3
"""dogkit on a CUDA machine, checked in one command; every log and figure lands under OUTDIR.

    python scripts/gpu_check.py OUTDIR --sample PATH --dogs51 PATH          # on the GPU machine (planned: 8 min)
    python scripts/gpu_check.py OUTDIR --dry --sample PATH --dogs51 PATH    # tiny sizes on the CPU: the script itself

The steps, in order (suite, study and prepare at the same time: none of their times is a target; with --dry,
throughput, loader and graphs too), each printed with its time and stopped at the end of its slot, and all of them
at --budget:

  env         GPU, driver, versions, CPUs, and ImageNet ResNet50 weights already on the machine (torch hub,
              Hugging Face / timm caches): what is found is listed, and `study` starts regimes 1 and 2 from it
  suite       the test suite with the GPU visible (the sample given to it; pytest-xdist spreads it when there)
  study       `dogkit study --budget quick` on the sample, on the device, INT8 included
  prepare     the dogs51 folder prepared with --cache 128
  throughput  112 px, batch 64: the bare train step and `dogkit train --exp 1/2/3`, eager
  loader      the training loader alone on every CPU, light and strong augmentation, cache and JPEG decoding
  graphs      the bare step and `train --exp 1` in CUDA graphs (`--compile --set compile_mode=reduce-overhead`)
  dogs51      the regime-3 preset at 112 px on dogs51 for as many epochs as the budget leaves (at least 30):
              test top-1, macro precision and recall, epoch times

Each step has a slot, its planned time and its limit; a step is cut short only when the check is behind its plan,
so that every later step keeps its slot (dogs51 its minimum) and the measured steps come before the long run.
`--steps` takes any of them: one that needs the prepared dogs51 folder brings the prepare step when the work folder
lacks it. GPU utilisation is sampled (nvidia-smi) all along and averaged over each measurement and the dogs51
epochs.
The script installs nothing and needs nothing beyond the standard library itself: run it with the Python that
has dogkit's [train,serve,test] requirements (this checkout is put on its PYTHONPATH). summary.md and
summary.json hold the figures and the targets, met or not; summary.md is printed last.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEPS = ("env", "suite", "study", "prepare", "throughput", "loader", "graphs", "dogs51")
# Steps in one group run at the same time: the suite, the quick study and preparing dogs51 are checks of what
# works, so they share the machine; every speed figure is measured with the machine to itself.
GROUPS = (("env",), ("suite", "study", "prepare"), ("throughput",), ("loader",), ("graphs",), ("dogs51",))
NEEDS_DATA = ("throughput", "loader", "graphs", "dogs51")  # the prepared dogs51 folder, the prepare step's


@dataclass(frozen=True)
class Sizes:
    """What each step runs at. The real check and the dry one (which only proves the script runs end to end)."""

    arch: str
    size: int
    batch: int
    steps: int  # timed optimizer steps per throughput measurement
    cache: int  # `prepare --cache`
    compile_mode: str
    compile_exps: str  # the regimes also trained compiled
    min_epochs: int
    max_epochs: int  # the regime-3 preset's
    loader_batches: int
    suite: tuple[str, ...] = ()  # pytest arguments (tests to run); () for the whole suite
    study: tuple[str, ...] = ()  # extra `dogkit study` options
    slots: dict = field(default_factory=dict)  # seconds each step is planned to take and may take; dogs51's is
    # its minimum (it takes all that is left)
    compile_arch: str = ""  # the network the graphs step compiles (default: arch)
    groups: tuple[tuple[str, ...], ...] = GROUPS  # the steps, in order, each group's at the same time


# The plan for one 9-minute call on an H100-class GPU (510 s, 30 s left for starting and copying): 480 s of slots,
# from estimates, not yet measurements (BENCHMARKS.md): env about 10 s; the suite spread over the CPUs by
# pytest-xdist beside the quick study, capped; four eager measurements; the loader twice; two compiles (the bare
# step and regime 1, what the targets need); then dogs51 takes the rest, at least 100 s (30 epochs at 112 px).
FULL = Sizes("resnet50", 112, 64, 100, 128, "reduce-overhead", "1", 30, 120, 150,
             slots={"env": 30, "suite": 140, "study": 140, "prepare": 120, "throughput": 60, "loader": 40,
                    "graphs": 110, "dogs51": 100})
# Tiny: a 0.4 M-weight network at 32 px, one or two epochs, a few tests, no benchmark in the study (ResNet18 there,
# two steps an epoch: it exports faster); ResNet18 compiled in the default mode (no CUDA graphs on a CPU) for regime 1
# alone, as compiling is the same call for every regime and minutes on a CPU (the small network's many layers take
# five times as long to compile).
DRY = Sizes("shufflenet_v2_x0_5", 32, 8, 3, 40, "default", "1", 1, 2, 4,
            suite=("tests/test_metrics.py", "-k", "macro"),
            study=("--no-bench", *(f"--set={s}" for s in ("image_size=32", "arch=resnet18", "batch_size=16",
                                                          "epochs=1", "max_steps_per_epoch=2", "avg_window=4",
                                                          "avg_bn_images=32", "workers=0"))),
            slots={"env": 60, "suite": 120, "study": 400, "prepare": 120, "throughput": 240, "loader": 120,
                   "graphs": 400, "dogs51": 60}, compile_arch="resnet18",
            # its figures mean nothing, so the measurements share the machine too (dogs51 plans from theirs)
            groups=(("env",), ("suite", "study", "prepare"), ("throughput", "loader", "graphs"), ("dogs51",)))


def study_args(sample: Path, work: Path, device: str, extra: tuple[str, ...] | list[str]) -> list[str]:
    """The study step's `dogkit study` arguments: the quick study of the sample, prepared and run in ``work``."""
    return ["study", "--budget", "quick", "--source", str(sample.resolve()), "--data", str(work / "data" / "sample"),
            "--runs-dir", str(work / "study-runs"), "--out", str(work / "study-report"), "--set", f"device={device}",
            *extra]


@dataclass
class Outcome:
    rc: int | None
    seconds: float
    timed_out: bool
    lines: list[tuple[float, str]]  # (wall-clock time it was printed, the line)


class GpuSampler:
    """`nvidia-smi` utilisation every 250 ms in the background, kept with the wall-clock time it was read."""

    def __init__(self, path: Path):
        self.samples: list[tuple[float, float, float]] = []
        self.proc = None
        if shutil.which("nvidia-smi") is None:
            return
        self.proc = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits", "-lms", "250"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.file = path.open("w", encoding="utf-8")
        self.file.write("time,utilization_gpu_percent,memory_used_mib\n")
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            parts = [p.strip() for p in line.split(",")]
            try:
                util, mem = float(parts[0]), float(parts[1])
            except (ValueError, IndexError):
                continue
            now = time.time()
            self.samples.append((now, util, mem))
            self.file.write(f"{now:.2f},{util:g},{mem:g}\n")
            self.file.flush()

    def mean(self, start: float, end: float) -> float | None:
        """Mean utilisation (%) of the samples read between two wall-clock times; None without samples."""
        inside = [u for t, u, _ in self.samples if start <= t <= end]
        return round(sum(inside) / len(inside), 1) if inside else None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


class Check:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.sizes = DRY if args.dry else FULL
        self.out = args.outdir.resolve()
        self.work = (args.work or self.out / "work").resolve()
        self.logs = self.out / "logs"
        for folder in (self.out, self.work, self.logs):
            folder.mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + args.budget
        self.python = args.python
        self.console = (self.out / "gpu_check.log").open("a", encoding="utf-8")
        self.lock = threading.RLock()
        self.children: set[subprocess.Popen] = set()  # running now: stopped with the check if it is stopped
        self.summary: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "dry": args.dry,
                              "device": args.device, "budget_s": args.budget, "sizes": asdict(self.sizes),
                              "steps": {}, "targets": []}
        self.gpu = GpuSampler(self.out / "gpu_util.csv") if args.device.startswith("cuda") else None
        unignore_ctrl_c()
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200",
                    "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
                    "DOGKIT_SAMPLE": str(args.sample.resolve())}

    # -- running things
    def say(self, text: str) -> None:
        with self.lock:  # steps that run together print from their own threads
            print(text, flush=True)
            self.console.write(text + "\n")
            self.console.flush()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def command(self, name: str, argv: list[str], timeout: float, env: dict | None = None,
                shown: str | None = None) -> Outcome:
        """Run ``argv`` from the checkout's root, its output (with each line's seconds) in logs/<name>.log.
        Past ``timeout`` it gets Ctrl-C (dogkit and pytest stop cleanly and keep what they did), then SIGTERM,
        then SIGKILL."""
        timeout = max(1.0, timeout)
        log_path = self.logs / f"{name}.log"
        lines: list[tuple[float, str]] = []
        start = time.time()
        with log_path.open("a", encoding="utf-8") as log_file:
            log_file.write(f"$ {shown or ' '.join(argv)}\n")
            proc = subprocess.Popen(argv, cwd=REPO, env=env or self.env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
            self.children.add(proc)

            def read() -> None:
                for line in proc.stdout:
                    now = time.time()
                    lines.append((now, line.rstrip("\n")))
                    log_file.write(f"[{now - start:7.1f}s] {line}")
                    log_file.flush()

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                stop(proc)
            finally:
                self.children.discard(proc)
            reader.join(timeout=10)
            seconds = time.time() - start
            log_file.write(f"# exit {proc.returncode} after {seconds:.1f} s{' (timed out)' if timed_out else ''}\n")
        return Outcome(proc.returncode, seconds, timed_out, lines)

    def dogkit(self, name: str, args: list[str], timeout: float) -> Outcome:
        return self.command(name, [self.python, "-m", "dogkit", *args], timeout)

    def timeout(self, step: str) -> float:
        """The step's slot, cut only when the check is behind its plan: every later group keeps its slot (the
        longest of its steps asked for; dogs51 its minimum), 10 s stay for the summary, nothing passes --budget.
        dogs51, last, has all that is left."""
        index = next(i for i, group in enumerate(self.sizes.groups) if step in group)
        later = sum(max((self.sizes.slots[s] for s in group if s in self.args.steps), default=0)
                    for group in self.sizes.groups[index + 1:])
        left = self.left() - later - 10
        return left if step == "dogs51" else min(self.sizes.slots[step], left)

    def prepared(self) -> bool:
        return (self.work / "data" / "dogs51" / "manifest.csv").is_file()

    def run(self) -> int:
        needing = [s for s in self.args.steps if s in NEEDS_DATA]
        if needing and "prepare" not in self.args.steps and not self.prepared():
            self.args.steps = [*self.args.steps, "prepare"]  # its group comes before theirs
            self.say(f"{', '.join(needing)} need the prepared dogs51 folder, which {self.work} lacks: the prepare "
                     "step runs too")
        self.say(f"gpu_check: {', '.join(s for s in STEPS if s in self.args.steps)}; budget "
                 f"{self.args.budget:.0f} s; out {self.out}" + (" (dry: tiny sizes)" if self.args.dry else ""))
        interrupted, threads, steps = None, [], []
        try:
            for group in self.sizes.groups:
                steps = [step for step in group if step in self.args.steps]
                if len(steps) > 1:
                    self.say(f"\n== {', '.join(steps)}: at the same time ("
                             + ("a dry run: its figures are not measurements)" if self.args.dry else
                                "no figure of theirs is a speed target)"))
                threads = [threading.Thread(target=self.step, args=(step, len(steps) > 1), daemon=True)
                           for step in steps]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    while thread.is_alive():  # a timed join: Ctrl-C and SIGTERM reach the main thread
                        thread.join(timeout=0.5)
        except KeyboardInterrupt as e:
            # Ctrl-C, or SIGTERM (a hard time limit around the check): the running steps are stopped as a step
            # past its timeout is, they record what they got, and the summary still says what was done.
            interrupted = str(e) or "Ctrl-C"
            for proc in list(self.children):
                stop(proc)
            for thread in threads:
                thread.join(timeout=30)
            self.summary["interrupted"] = interrupted
            for step in steps:  # the ones running when it came
                record = self.summary["steps"].setdefault(step, {})
                if record.get("status") != "ok":
                    record.update(status="interrupted", why=f"the check was stopped ({interrupted})")
        if self.gpu is not None:
            self.gpu.stop()
        with self.lock:
            self.targets()
            text = self.write_summary()
        self.say("\n" + text)
        if interrupted:
            return 130
        return 0 if all(s.get("status") == "ok" for s in self.summary["steps"].values()) else 1

    def step(self, step: str, together: bool) -> None:
        record = self.summary["steps"].setdefault(step, {})
        begin = time.monotonic()
        if not together:
            self.say(f"\n== {step} ({self.left():.0f} s of the budget left)")
        if step in NEEDS_DATA and not self.prepared():
            record.update(status="skipped", why="no prepared dogs51 (the prepare step)")
        elif self.timeout(step) < 5:
            record.update(status="skipped", why="no time left in the budget")
        else:
            try:
                getattr(self, f"step_{step}")(record)
            except Exception as e:  # a broken step is reported; the ones after it still run
                record.update(status="failed", why=f"{type(e).__name__}: {e}")
        record["seconds"] = round(time.monotonic() - begin, 1)
        self.say(f"-- {step}: {record.get('status')} in {record['seconds']:.1f} s"
                 + (f" ({record['why']})" if record.get("why") else ""))
        with self.lock:
            self.write_summary()

    def finish(self, record: dict, outcome: Outcome, what: str) -> bool:
        """The step's status from its command; True when it ran to the end with exit code 0."""
        if outcome.timed_out:
            record.update(status="timed out", why=f"{what} stopped after {outcome.seconds:.0f} s")
        elif outcome.rc != 0:
            last = next((text for _, text in reversed(outcome.lines) if text.strip()), "")
            record.update(status="failed", why=f"{what} exit {outcome.rc}: {last.strip()[:300]}")
        else:
            record["status"] = "ok"
        return record["status"] == "ok"

    # -- the steps
    def step_env(self, record: dict) -> None:
        probe = self.command("env", [self.python, "-c", ENV_PROBE, str(self.work)], self.timeout("env"),
                             shown=f"{self.python} -c <the environment probe> {self.work}")
        found = next((text for _, text in reversed(probe.lines) if text.startswith("{")), None)
        if found is None:
            self.finish(record, probe, "the environment probe")
            if record["status"] == "ok":
                record.update(status="failed", why="the environment probe printed nothing")
            return
        env = json.loads(found)
        if shutil.which("nvidia-smi"):
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,"
                                  "power.limit", "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            env["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        env["cpus"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        record.update(status="ok", **env)
        (self.out / "env.json").write_text(json.dumps(env, indent=2) + "\n")
        weights = env.get("weights") or {}
        for item in weights.get("found", []):
            self.say(f"   ImageNet weights? {item['path']}: {item['verdict']}")
        if not weights.get("found"):
            self.say("   no ImageNet ResNet50 weights on this machine: the quick study's regimes 1 and 2 start from "
                     "random weights (it says so)")
        cuda = env.get("cuda") or {}
        self.say(f"   torch {env['versions'].get('torch')}, {cuda.get('name', 'no CUDA device')}, "
                 f"{env['cpus']} CPUs, onnxruntime {env['versions'].get('onnxruntime')}")
        if self.args.device.startswith("cuda") and not cuda:
            record.update(status="failed", why="--device cuda, but PyTorch sees no CUDA device")

    def step_suite(self, record: dict) -> None:
        junit = self.out / "suite-junit.xml"
        argv = [self.python, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", f"--junitxml={junit}",
                "--durations=15"]
        cpus = self.summary["steps"].get("env", {}).get("cpus") or os.cpu_count() or 1
        modules = self.summary["steps"].get("env", {}).get("versions", {})
        env = dict(self.env)
        if modules.get("xdist") and cpus > 4:
            workers = cpus - 2  # the study (on the GPU) and prepare run beside it
            argv += ["-n", str(workers)]
            env["OMP_NUM_THREADS"] = "2"  # a few threads each: the workers share the CPUs
        if modules.get("pytest_timeout"):  # a test that hangs fails alone, inside the step's own timeout
            argv += ["--timeout", str(int(self.sizes.slots["suite"] * 0.75))]
        outcome = self.command("suite", argv + list(self.sizes.suite), self.timeout("suite"), env)
        self.finish(record, outcome, "pytest")
        if junit.is_file():
            root = ET.parse(junit).getroot()
            suites = [root] if root.tag == "testsuite" else list(root)
            counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
            record.update(counts)
            record["failed_tests"] = [f"{case.get('classname')}::{case.get('name')}: "
                                      f"{(bad.get('message') or '').strip()[:200]}"
                                      for case in root.iter("testcase") for bad in case
                                      if bad.tag in ("failure", "error")][:30]
            record["skip_reasons"] = sorted({(bad.get("message") or "")[:160] for case in root.iter("testcase")
                                             for bad in case if bad.tag == "skipped"})[:30]
        summary_line = next((t for _, t in reversed(outcome.lines) if " passed" in t or " failed" in t), "")
        record["pytest"] = summary_line.strip("= ")
        self.say(f"   {record['pytest']}")

    def step_study(self, record: dict) -> None:
        weights = self.summary["steps"].get("env", {}).get("weights", {}).get("use")
        args = study_args(self.args.sample, self.work, self.args.device, self.sizes.study)
        if weights:
            args += ["--weights", weights]
            record["weights"] = weights
        outcome = self.dogkit("study", args, self.timeout("study"))
        self.finish(record, outcome, "dogkit study")
        times = self.work / "study-report" / "study_times.json"
        if times.is_file():
            record["times"] = json.loads(times.read_text())["steps"]
        int8 = {}  # the runs exported with INT8 (the best one): its gate's report, or why it failed
        for export in sorted((self.work / "study-runs").glob("*/export.json")):
            report = json.loads(export.read_text())
            if report.get("int8") is not None:
                int8[export.parent.name] = report["int8"]
        record["int8"] = int8
        copies = self.out / "study"
        copies.mkdir(exist_ok=True)
        for name in ("report.md", "study_times.json"):
            if (self.work / "study-report" / name).is_file():
                shutil.copy2(self.work / "study-report" / name, copies / name)
        good = [name for name, r in int8.items() if isinstance(r, dict) and "error" not in r]
        if record["status"] == "ok" and not good:
            record.update(status="failed", why=f"the study ran but built no INT8 model: {json.dumps(int8)[:300]}")
        elif good:
            self.say(f"   INT8 built and gated for {', '.join(good)}")

    def step_prepare(self, record: dict) -> None:
        folder = self.work / "data" / "dogs51"
        outcome = self.dogkit("prepare", ["prepare", "--source", str(self.args.dogs51.resolve()), "--out",
                                          str(folder), "--cache", str(self.sizes.cache)], self.timeout("prepare"))
        if self.finish(record, outcome, "dogkit prepare"):
            record["images"] = split_counts(folder)
            self.say(f"   {record['images']}")

    def throughput(self, name: str, record: dict, extra: list[str]) -> None:
        s = self.sizes
        path = self.out / f"{name}.json"
        argv = [self.python, "scripts/train_throughput.py", "--data", str(self.work / "data" / "dogs51"),
                "--device", self.args.device, "--arch", s.arch, "--sizes", str(s.size), "--batch", str(s.batch),
                "--steps", str(s.steps), "--json", str(path), *extra]
        outcome = self.command(name, argv, self.timeout(name))
        self.finish(record, outcome, "scripts/train_throughput.py")
        if path.is_file():
            results = json.loads(path.read_text())["results"]
            for r in results:
                if self.gpu is not None and "img_per_s" in r:
                    r["gpu_util_percent"] = self.gpu.mean(r["timed_start"], r["timed_end"])
            record["results"] = results
            for r in results:
                self.say(f"   {describe(r)}: {r.get('img_per_s', r.get('error'))}"
                         + (f" img/s, GPU {r['gpu_util_percent']} %" if r.get("gpu_util_percent") is not None else ""))

    def step_throughput(self, record: dict) -> None:
        self.throughput("throughput", record, ["--exps", "1,2,3", "--workers", ""])

    def step_graphs(self, record: dict) -> None:
        self.throughput("graphs", record, ["--exps", "", "--workers", "", "--compile-mode", self.sizes.compile_mode,
                                           "--compile-exps", self.sizes.compile_exps,
                                           "--arch", self.sizes.compile_arch or self.sizes.arch])

    def step_loader(self, record: dict) -> None:
        cpus = self.summary["steps"].get("env", {}).get("cpus") or os.cpu_count() or 1
        self.throughput("loader", record, ["--no-bare", "--exps", "", "--workers", str(cpus), "--augments",
                                           "light,strong", "--batches", str(self.sizes.loader_batches)])

    def step_dogs51(self, record: dict) -> None:
        s = self.sizes
        images = split_counts(self.work / "data" / "dogs51")  # prepared by this check, or by an earlier one
        train, val = images["train"], images["val"]
        eager = rate(measured(self.summary, "throughput", exp=3))
        # Compiled, regime 3 runs the network and step regime 1 was measured with (only the loader differs).
        graphs = (measured(self.summary, "graphs", exp=3, compile_mode=s.compile_mode)
                  or measured(self.summary, "graphs", exp=1, compile_mode=s.compile_mode))
        available = self.left() - 40  # start-up, the test pass and copying the results
        plan = {"eager": epochs_for(available, train, val, eager, 0.0, s)}
        if graphs:
            # Its warm-up (compiling, capturing the graphs) is what the measurement took before its timed epoch.
            plan["compiled"] = epochs_for(available, train, val, graphs["img_per_s"],
                                          graphs["timed_start"] - graphs["start"], s)
        way = max(plan, key=lambda k: plan[k])
        epochs = max(s.min_epochs, min(s.max_epochs, plan[way]))
        record.update(plan={k: int(v) for k, v in plan.items()}, way=way, epochs=epochs,
                      rates_used={"eager": eager, "compiled": rate(graphs)})
        self.say(f"   {epochs} epochs, {way} (the budget allows {', '.join(f'{v} {k}' for k, v in plan.items())})")
        runs = self.work / "runs"
        args = ["train", "--exp", "3", "--data", str(self.work / "data" / "dogs51"), "--image-size", str(s.size),
                "--epochs", str(epochs), "--name", "dogs51-exp3", "--runs-dir", str(runs), "--arch", s.arch,
                "--set", f"device={self.args.device}"]
        if way == "compiled":
            args += ["--compile", "--set", f"compile_mode={s.compile_mode}"]
        run = runs / "dogs51-exp3"
        if run.exists():  # a rerun of the check trains anew
            shutil.rmtree(run)
        # Short of time for its minimum epochs, the run may pass the budget by --overrun rather than end untested.
        limit = self.left() - 10 + (self.args.overrun if plan[way] < s.min_epochs else 0)
        outcome = self.dogkit("dogs51", args, limit)
        self.finish(record, outcome, "dogkit train")
        copies = self.out / "dogs51"
        copies.mkdir(exist_ok=True)
        for name in ("config.json", "environment.json", "metrics.csv", "test_metrics.json", "run.log"):
            if (run / name).is_file():
                shutil.copy2(run / name, copies / name)
        if (run / "metrics.csv").is_file():
            with (run / "metrics.csv").open(newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
            times = [float(r["epoch_time_s"]) for r in rows]
            record.update(epochs_done=len(rows), epoch_time_s={"first": round(times[0], 2),
                                                               "median": round(sorted(times)[len(times) // 2], 2),
                                                               "sum": round(sum(times), 1)},
                          img_per_s_median=round(sorted(float(r["img_per_s"]) for r in rows)[len(rows) // 2], 1),
                          data_wait_median=round(sorted(float(r["data_wait_share"]) for r in rows)[len(rows) // 2],
                                                 3),
                          val_top1_last=float(rows[-1]["val_accuracy"]))
        if (run / "test_metrics.json").is_file():
            test = json.loads((run / "test_metrics.json").read_text())["best"]
            record["test"] = {k: test["test"][k] for k in ("accuracy", "top5", "precision_macro", "recall_macro",
                                                           "f1_macro") if k in test["test"]}
            record["best_epoch"] = test.get("epoch")
            self.say(f"   test top-1 {record['test']['accuracy']:.3f}, macro precision "
                     f"{record['test']['precision_macro']:.3f}, recall {record['test']['recall_macro']:.3f} "
                     f"(best epoch {record['best_epoch']} of {record.get('epochs_done')})")
        # Each epoch's summary line (not its progress lines) marks its end.
        ends = [t for t, text in outcome.lines if text.lstrip().startswith("epoch ") and "val top-1" in text]
        record["train_s"] = round(ends[-1] - outcome.lines[0][0], 1) if ends and outcome.lines else None
        if self.gpu is not None and len(ends) >= 2:
            # From the end of epoch 1 (start-up, cudnn search, compiling) to the end of the last epoch.
            record["gpu_util_percent"] = self.gpu.mean(ends[0], ends[-1])

    # -- the report
    def targets(self) -> None:
        steps, add = self.summary["steps"], self.summary["targets"].append
        suite = steps.get("suite", {})
        if suite:
            add(target("the suite passes with the GPU visible", suite.get("status") == "ok"
                       and not suite.get("failures") and not suite.get("errors"), suite.get("pytest") or
                       suite.get("why")))
        study = steps.get("study", {})
        if study:
            add(target("the quick study completes on the device, INT8 included", study.get("status") == "ok",
                       study.get("why") or "INT8 for " + ", ".join(
                           name for name, r in study.get("int8", {}).items() if "error" not in r)))
        mode = self.sizes.compile_mode
        bare = rate(measured(self.summary, "throughput", what="bare step"))
        exp = {e: rate(measured(self.summary, "throughput", exp=e)) for e in (1, 2, 3)}
        graphs = {e: rate(measured(self.summary, "graphs", exp=e, compile_mode=mode)) for e in (1, 2, 3)}
        bare_graphs = rate(measured(self.summary, "graphs", what="bare step", compile_mode=mode))
        if "throughput" in steps:  # each target is judged where the steps it needs were asked for
            ratio("`train --exp 1` / bare step (eager)", exp[1], bare, 0.9, add)
            ratio("`train --exp 2` / `train --exp 1` (eager)", exp[2], exp[1], 0.9, add)
        if "graphs" in steps:
            ratio("`train --exp 1 --compile` (CUDA graphs) / `train --exp 1` (eager)", graphs[1], exp[1], 2.5, add)
        light = [r["img_per_s"] for r in steps.get("loader", {}).get("results", [])
                 if r.get("augment") == "light" and r.get("source") == "prepare cache" and "img_per_s" in r]
        if "loader" in steps:
            ratio("loader, light augmentation, every CPU / bare step in CUDA graphs", light[0] if light else None,
                  bare_graphs, 1.0, add)
        util = steps.get("dogs51", {}).get("gpu_util_percent")
        if util is not None or "dogs51" in steps:
            add(target("GPU utilisation during the dogs51 epochs ≥ 80 %", util is not None and util >= 80,
                       f"{util} %" if util is not None else "not sampled"))

    def write_summary(self) -> str:
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=2, default=str) + "\n")
        text = markdown(self.summary)
        (self.out / "summary.md").write_text(text)
        return text


def stop(proc: subprocess.Popen) -> None:
    """Ctrl-C to the process group (dogkit and pytest stop cleanly and keep what they did), then SIGTERM, then
    SIGKILL, each after a grace period."""
    for sig, grace in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def unignore_ctrl_c() -> None:
    """Started in the background by a shell script (`… &`), the check has Ctrl-C (SIGINT) ignored, and its steps
    would inherit that: a step past its timeout would not hear the Ctrl-C that stops it cleanly, and would be
    terminated 20 s later having kept nothing. A handler, unlike an ignored signal, is not passed on to a program
    started from here, so one is set (from the main thread, the only one that may)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt("SIGTERM")


def describe(r: dict) -> str:
    if r["what"] == "loader":
        return f"loader {r['source']}, {r['augment']}, {r['workers']} workers"
    name = "bare step" if r["what"] == "bare step" else f"train --exp {r['exp']}"
    return name + (f" --compile ({r['compile_mode']})" if r.get("compile_mode") else " (eager)")


def measured(summary: dict, step: str, what: str = "train", exp: int | None = None,
             compile_mode: str | None = None) -> dict | None:
    """One throughput measurement that produced a figure: its row (img/s, windows), or None."""
    for r in summary["steps"].get(step, {}).get("results", []):
        if r["what"] == what and r.get("exp") == exp and r.get("compile_mode") == compile_mode and "img_per_s" in r:
            return r
    return None


def rate(row: dict | None) -> float | None:
    return row["img_per_s"] if row else None


def split_counts(folder: Path) -> dict[str, int]:
    """Images per split of a prepared dataset, from its manifest."""
    with (folder / "manifest.csv").open(newline="", encoding="utf-8") as f:
        splits = [row["split"] for row in csv.DictReader(f)]
    return {s: splits.count(s) for s in ("train", "val", "test")}


def epochs_for(seconds: float, train: int, val: int, rate: float | None, warmup: float, s: Sizes) -> int:
    """Epochs that fit in ``seconds`` at ``rate`` img/s: each one trains, evaluates validation (about three times
    faster than training) and saves a checkpoint (about a second), with a fifth kept in hand."""
    if not rate:
        return s.min_epochs
    epoch = train / rate + val / (3 * rate) + 1.0
    return max(0, math.floor((seconds - warmup) / (1.2 * epoch)))


def fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def target(what: str, met: bool, figure) -> dict:
    return {"target": what, "met": bool(met), "figure": str(figure)}


def ratio(what: str, numerator: float | None, denominator: float | None, least: float, add) -> None:
    if not numerator or not denominator:
        add(target(f"{what} ≥ {least:g}", False, "not measured"))
        return
    value = numerator / denominator
    add(target(f"{what} ≥ {least:g}", value >= least, f"{value:.2f} ({numerator:,.0f} / {denominator:,.0f} img/s)"
               + ("" if value >= least else f"; {1 - value / least:.0%} short")))


def markdown(summary: dict) -> str:
    steps = summary["steps"]
    env = steps.get("env", {})
    lines = [f"# gpu_check {'(dry) ' if summary['dry'] else ''}{summary['started']}", ""]
    if summary.get("interrupted"):
        lines += [f"**Stopped before the end ({summary['interrupted']})**: what follows is what was done.", ""]
    if env.get("versions"):
        cuda = env.get("cuda") or {}
        lines += [f"- machine: {cuda.get('name', 'no CUDA device')} ({env.get('nvidia_smi', '')}), "
                  f"{env.get('cpus')} CPUs, Python {env.get('python')}",
                  "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v),
                  f"- ImageNet weights: {(env.get('weights') or {}).get('summary', 'not looked for')}", ""]
    lines += ["| step | status | seconds | notes |", "|---|---|---:|---|"]
    for name, r in steps.items():
        note = r.get("why") or {"suite": r.get("pytest"), "prepare": r.get("images"),
                                "dogs51": f"{r.get('epochs_done')} epochs ({r.get('way')})"}.get(name) or ""
        lines.append(f"| {name} | {r.get('status')} | {r.get('seconds', '')} | {str(note).replace('|', '/')} |")
    rows = [r for name in ("throughput", "graphs", "loader") for r in steps.get(name, {}).get("results", [])]
    if rows:
        lines += ["", "| measurement | img/s | GPU util % |", "|---|---:|---:|"]
        lines += [f"| {describe(r)} | {r.get('img_per_s', r.get('error'))} | {r.get('gpu_util_percent', '')} |"
                  for r in rows]
    d = steps.get("dogs51", {})
    if d.get("test") or d.get("epochs_done"):
        t = d.get("test", {})
        lines += ["", f"dogs51, regime-3 preset at {summary['sizes']['size']} px, {d.get('way')}: "
                  f"{d.get('epochs_done')} of {d.get('epochs')} epochs in {d.get('train_s')} s "
                  f"(epoch median {d.get('epoch_time_s', {}).get('median')} s, first "
                  f"{d.get('epoch_time_s', {}).get('first')} s; {d.get('img_per_s_median')} img/s; data wait "
                  f"{d.get('data_wait_median')}); test top-1 {fmt(t.get('accuracy'))}, top-5 {fmt(t.get('top5'))}, "
                  f"macro precision {fmt(t.get('precision_macro'))}, recall {fmt(t.get('recall_macro'))}, F1 "
                  f"{fmt(t.get('f1_macro'))}; GPU utilisation {d.get('gpu_util_percent')} %"]
    if summary["targets"]:
        lines += ["", "| target | met | figure |", "|---|---|---|"]
        lines += [f"| {t['target']} | {'yes' if t['met'] else 'NO'} | {t['figure'].replace('|', '/')} |"
                  for t in summary["targets"]]
    suite = steps.get("suite", {})
    for title, items in (("failed tests", suite.get("failed_tests")), ("skip reasons", suite.get("skip_reasons"))):
        if items:
            lines += ["", f"{title}:", *(f"- {i}" for i in items)]
    return "\n".join(lines) + "\n"


# Run with the Python that has torch: versions, the CUDA device, and ImageNet ResNet50 weights on the machine.
ENV_PROBE = r'''
import importlib, json, os, platform, sys, time
from pathlib import Path
work = Path(sys.argv[1])
versions = {}
for name in ("torch", "torchvision", "onnxruntime", "cv2", "numpy", "onnx", "onnxscript", "albumentations", "sklearn",
             "scipy", "typer", "rich", "starlette", "uvicorn", "multipart", "matplotlib", "pytest", "xdist",
             "pytest_timeout", "timm", "safetensors"):
    try:
        module = importlib.import_module(name)
        versions[name] = getattr(module, "__version__", "present")
    except Exception as e:
        versions[name] = None
out = {"python": platform.python_version(), "versions": versions}
import torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    out["cuda"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1),
                   "multiprocessors": p.multi_processor_count, "cuda": torch.version.cuda,
                   "cudnn": torch.backends.cudnn.version(), "bf16": torch.cuda.is_bf16_supported(),
                   "devices": torch.cuda.device_count()}
try:
    import onnxruntime
    out["onnxruntime_providers"] = onnxruntime.get_available_providers()
except Exception:
    pass

def state_of(path):
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return {k.removeprefix("module."): v for k, v in state.items()} if isinstance(state, dict) else None

hub = Path(torch.hub.get_dir()) / "checkpoints"
import torchvision
canonical = hub / Path(torchvision.models.ResNet50_Weights.DEFAULT.url).name
hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
roots = [hub, Path(os.environ.get("HF_HUB_CACHE", hf_home / "hub")), Path.home() / ".cache", Path("/models"),
         Path("/data"), Path("/workspace"), Path("/mnt"), Path("/srv"), Path("/opt")]
roots = [hub, *map(Path, sys.argv[2:])] if sys.argv[2:] else roots  # other folders to look in, instead
skip = {"site-packages", "dist-packages", "node_modules", ".git", "proc", "sys", "include", "lib64"}
seen, found, stop = set(), [], time.monotonic() + 8
for root in roots:
    if not root.is_dir():
        continue
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip] if folder.count(os.sep) - str(root).count(os.sep) < 6 else []
        if time.monotonic() > stop:
            break
        for f in files:
            name = f.lower()
            if ("resnet50" in name or "resnet-50" in name or "resnet_50" in name or "resnet50" in folder.lower()) \
                    and name.endswith((".pth", ".pt", ".safetensors", ".bin", ".ckpt")):
                path = Path(folder, f).resolve()
                if path not in seen:
                    seen.add(path)
                    found.append(path)
weights = {"found": [], "use": None, "hub_file": str(canonical)}
found.sort(key=lambda path: path != canonical.resolve())  # the hub's own file first: dogkit needs no --weights for it
for path in found[:20]:
    try:
        state = state_of(path)
        fc, conv = state.get("fc.weight"), state.get("conv1.weight")
        ok = fc is not None and conv is not None and tuple(fc.shape) == (1000, 2048) \
            and tuple(conv.shape) == (64, 3, 7, 7)
        verdict = ("an" if ok else "not an") + " ImageNet ResNet50 in torchvision's layout"
    except Exception as e:
        ok, verdict = False, f"unreadable ({type(e).__name__}: {str(e)[:100]})"
    if ok and weights["use"] is None and not weights.get("hub"):
        if path == canonical.resolve():
            verdict += ": dogkit finds it itself (torch hub cache)"
            weights["hub"] = True
        else:
            target = work / "imagenet-resnet50.pt"
            torch.save({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, target)
            weights["use"] = str(target)
            verdict += f": used for regimes 1 and 2 (--weights, saved as {target})"
    weights["found"].append({"path": str(path), "verdict": verdict})
weights["summary"] = ("torch hub cache (dogkit finds it itself)" if weights.get("hub") else
                      f"--weights {weights['use']}" if weights["use"] else
                      f"none usable among {len(found)} files found" if found else "none found")
out["weights"] = weights
print(json.dumps(out))
'''


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outdir", type=Path, help="where every log and figure goes (created)")
    parser.add_argument("--sample", type=Path, default=REPO.parent / "shared" / "data" / "stanford-dogs-sample",
                        help="the Stanford Dogs sample (the suite's and the quick study's data)")
    parser.add_argument("--dogs51", type=Path, default=REPO.parent / "shared" / "data" / "dogs51",
                        help="the dogs51 folder (prepare, throughput, loader and the real training run)")
    parser.add_argument("--device", default=None, help="where the study, the throughput and the dogs51 run "
                        "train: cuda, cuda:N or cpu (default: cuda; cpu with --dry)")
    parser.add_argument("--dry", action="store_true", help="tiny sizes (small networks, 32 px, an epoch, a few tests): "
                        "proves the script runs, on any machine")
    parser.add_argument("--budget", type=float, default=510, help="seconds for everything (default 510: the "
                        "steps are sized to end inside 9 minutes on an H100-class GPU)")
    parser.add_argument("--overrun", type=float, default=45, help="seconds the dogs51 run may pass the budget "
                        "by when the budget is short of its minimum epochs (default 45)")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"which steps, comma-separated ({', '.join(STEPS)})")
    parser.add_argument("--work", type=Path, default=None, help="prepared data and runs (default OUTDIR/work)")
    parser.add_argument("--python", default=sys.executable, help="the Python that runs dogkit and the tests")
    args = parser.parse_args()
    args.device = args.device or ("cpu" if args.dry else "cuda")
    args.steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = sorted(set(args.steps) - set(STEPS))
    if unknown:
        parser.error(f"unknown steps {', '.join(unknown)}; the steps are {', '.join(STEPS)}")
    if not args.steps:  # nothing run is no success
        parser.error(f"--steps names no step; the steps are {', '.join(STEPS)}")
    if not (math.isfinite(args.budget) and args.budget > 0):
        parser.error(f"--budget must be a positive number of seconds, got {args.budget}")
    if not (math.isfinite(args.overrun) and args.overrun >= 0):
        parser.error(f"--overrun must be a number of seconds, 0 or more, got {args.overrun}")
    for name, folder in (("OUTDIR", args.outdir), ("--work", args.work)):
        if folder is not None and folder.exists() and not folder.is_dir():
            parser.error(f"{name} {folder} exists and is not a folder")
    for name, path in (("--sample", args.sample), ("--dogs51", args.dogs51)):
        if not (path / "Images").is_dir():
            parser.error(f"{name} {path} has no Images/ folder")
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        check = Check(args)
    except OSError as e:  # OUTDIR below a file, a read-only place: one line, as for the other arguments
        parser.error(f"cannot create {e.filename}: {e.strerror or e}")
    return check.run()


if __name__ == "__main__":
    sys.exit(main())
