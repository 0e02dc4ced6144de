"""The code blocks of the project's Markdown files, for the tests that run or check them as they are written."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def code_blocks(doc: str, lang: str | None = None) -> list[str]:
    """The fenced code blocks of ``doc`` (a path from the repository root), in order; only ``lang``'s if given."""
    return [body for tag, body in FENCE.findall((ROOT / doc).read_text(encoding="utf-8")) if lang in (None, tag)]


def python_block(doc: str, containing: str) -> str:
    """The one Python block of ``doc`` that contains ``containing``."""
    hits = [block for block in code_blocks(doc, "python") if containing in block]
    assert len(hits) == 1, f"{doc}: {len(hits)} Python blocks contain {containing!r}"
    return hits[0]


def run_block(doc: str, containing: str, namespace: dict, cwd: Path | None = None) -> dict:
    """Execute that block as written (in ``cwd`` when given) into ``namespace``, and return the namespace."""
    code = compile(python_block(doc, containing), f"{doc} ({containing})", "exec")
    here = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        exec(code, namespace)
    finally:
        os.chdir(here)
    return namespace
