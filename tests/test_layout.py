"""The architecture, checked: the deploy core runs without PyTorch, the jobs depend on each other in one
direction, and the trainer stays a coordinator of small parts."""

import ast
import subprocess
import sys
from pathlib import Path

from torchless import NO_TORCH

import dogkit

PACKAGE = Path(dogkit.__file__).parent
JOBS = ("data", "deploy", "training", "analysis")


def modules(folder: str) -> list[str]:
    return sorted(f"dogkit.{folder}.{p.stem}".removesuffix(".__init__") for p in (PACKAGE / folder).glob("*.py"))


def test_the_package_listing_is_the_four_jobs_and_a_few_shared_modules():
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file())
    assert folders == sorted(JOBS)
    shared = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert shared == ["__init__", "__main__", "atomic", "cli", "errors", "log", "progress", "runs", "system", "text"]


def test_every_deploy_and_data_module_imports_without_torch():
    """Each module of the deploy core (and the data job it reads images with) in a fresh interpreter where
    importing torch fails: none of them needs it, directly or through another module."""
    names = [*modules("deploy"), *modules("data"), "dogkit.runs", "dogkit.log", "dogkit.system", "dogkit.cli"]
    code = NO_TORCH + (
        "import importlib\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m.startswith('dogkit.training')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"  # nothing of the training job came along
    assert len(names) >= 16


def top_level_imports(path: Path) -> set[str]:
    """The dogkit modules a module imports when it is imported (function-level imports excluded)."""
    tree = ast.parse(path.read_text())
    package = ["dogkit", *path.relative_to(PACKAGE).parent.parts]
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            found.add(target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {t for t in found if t.startswith("dogkit")}


def test_jobs_depend_on_each_other_in_one_direction():
    """data ← deploy ← training ← analysis, with the shared modules beneath all: a job's module never imports a
    later job at import time (a command may still call one lazily, e.g. ``bench``'s PyTorch backends)."""
    allowed = {
        "data": ("data",),
        "deploy": ("data", "deploy"),
        "training": ("data", "deploy", "training", "analysis.metrics"),
        "analysis": JOBS,
    }
    wrong = []
    for job, ok in allowed.items():
        for path in (PACKAGE / job).glob("*.py"):
            for target in top_level_imports(path):
                parts = target.split(".")
                if len(parts) > 1 and parts[1] in JOBS and not any(
                        target == f"dogkit.{a}" or target.startswith(f"dogkit.{a}.") for a in ok):
                    wrong.append(f"{path.relative_to(PACKAGE)} imports {target}")
    assert not wrong, wrong


def test_no_function_in_the_training_job_is_over_60_lines():
    long = []
    for path in sorted((PACKAGE / "training").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


def test_every_module_says_what_it_owns():
    missing = [str(p.relative_to(PACKAGE)) for p in sorted(PACKAGE.rglob("*.py"))
               if p.name != "__main__.py" and not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, missing
