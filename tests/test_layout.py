"""The architecture, checked: the deploy core runs without PyTorch, the jobs depend on each other in one
direction, and the trainer stays a coordinator of small parts."""

import ast
import re
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
    assert shared == ["__init__", "__main__", "atomic", "calibration", "cli", "errors", "log", "metrics", "progress",
                      "regimes", "runs", "settings", "study", "system", "text", "variants"]


def test_every_deploy_and_data_module_imports_without_torch():
    """Each module of the deploy core (and the data job it reads images with) in a fresh interpreter where
    importing torch fails: none of them needs it, directly or through another module, and neither does the CLI,
    which imports the training job only in the commands that train."""
    names = [*modules("deploy"), *modules("data"), "dogkit.runs", "dogkit.regimes", "dogkit.log", "dogkit.system",
             "dogkit.variants"]
    code = NO_TORCH + (
        "import importlib\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m.startswith('dogkit.training')))\n"
        "importlib.import_module('dogkit.cli')\n"
        "print(sorted(m for m in sys.modules if m.startswith('dogkit.training')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["[]", "[]"]  # nothing of the training job came along
    assert len(names) >= 16


def imports(path: Path) -> set[str]:
    """Every dogkit module a module imports, at import time or inside a function."""
    package = ["dogkit", *path.relative_to(PACKAGE).parent.parts]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            # `from . import x` and `from dogkit import x` may name modules
            found.update({target, *(f"{target}.{a.name}" for a in node.names)})
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {t for t in found if t.startswith("dogkit")}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


# The floors of the house, from the bottom: shared modules, the four jobs, then the top (the study pipeline and the
# CLI). A module imports only from its own floor or below, lazily or not.
TOP = ("dogkit.study", "dogkit.cli", "dogkit.__main__")


def floor(module: str) -> int:
    parts = module.split(".")
    if module in TOP:
        return len(JOBS) + 1
    return JOBS.index(parts[1]) + 1 if len(parts) > 1 and parts[1] in JOBS else 0


def import_graph() -> dict[str, set[str]]:
    graph = {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}
    return {m: {t for t in targets if t in graph and t != m} for m, targets in graph.items()}


def test_no_import_runs_back_up_a_floor():
    """data ← deploy ← training ← analysis ← the study and the CLI, with the shared modules beneath all, read from
    every import in the code (function-level ones too). The one exception is the package's face,
    ``dogkit/__init__.py``, which lowers OpenCV's pixel cap before anything can load OpenCV."""
    up = [f"{m} imports {t}" for m, targets in import_graph().items() if m != "dogkit"
          for t in sorted(targets) if floor(t) > floor(m)]
    assert not up, up


def test_no_modules_import_each_other_in_a_circle():
    graph = import_graph()
    graph["dogkit"] = set()  # the package's face: importing any submodule runs it, which is no dependency
    circles, done = [], set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            circles.append(" -> ".join(path[path.index(module):] + [module]))
            return
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    assert not circles, circles


def test_importing_the_library_configures_no_logging():
    """Handlers are the application's choice: importing dogkit (here its deploy core and the trainer) adds none
    to the root logger or to dogkit's; the CLI, or ``dogkit.log.setup()``, adds the console's."""
    code = ("import logging, dogkit.deploy.predict, dogkit.deploy.serve, dogkit.training.trainer, dogkit.study\n"
            "print(len(logging.getLogger().handlers), len(logging.getLogger('dogkit').handlers))\n"
            "from dogkit.log import setup; setup(); print(len(logging.getLogger('dogkit').handlers))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0", "0", "1"]


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


def test_no_section_banner_heads_nothing():
    """A ``# ---- name`` banner is followed by code before the next banner or the end of its module."""
    empty = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        banners = [i for i, line in enumerate(lines) if re.match(r"# -{20,} ", line)]
        for i, start in enumerate(banners):
            end = banners[i + 1] if i + 1 < len(banners) else len(lines)
            if not any(line.strip() for line in lines[start + 1: end]):
                empty.append(f"{path.relative_to(PACKAGE)}:{start + 1} {lines[start].split(maxsplit=2)[-1]}")
    assert not empty, empty


def test_every_module_level_function_and_class_is_used_or_documented():
    """Dead code, found: each top-level function and class (decorated ones register themselves) is named in the
    package, the tests or the scripts beside its definition, or in the documentation as public API."""
    root = PACKAGE.parent
    defined: dict[str, str] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef) and not node.decorator_list:
                defined[node.name] = f"{path.relative_to(PACKAGE)}:{node.lineno}"
    named = set()
    for path in [*PACKAGE.rglob("*.py"), *(root / "tests").rglob("*.py"), *(root / "scripts").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Name):
                named.add(node.id)
            elif isinstance(node, ast.Attribute):
                named.add(node.attr)
            elif isinstance(node, ast.alias):
                named.add(node.name.rsplit(".", 1)[-1])
    docs = " ".join(p.read_text() for p in [root / "README.md", *(root / "docs").rglob("*.md")])
    named |= set(re.findall(r"\w+", docs))
    unused = sorted(f"{where} {name}" for name, where in defined.items() if name not in named)
    assert not unused, unused
