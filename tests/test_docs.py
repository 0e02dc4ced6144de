"""The documentation is checked like code: every link inside the repository resolves (file and anchor), the README
stays a short path for a user, its set-up commands are the ones CI runs, and every `dogkit …` command line the docs
show names a real command with real options. (The consumer recipes of docs/deploy.md run in test_preprocess.py and
test_explain.py.)"""

from __future__ import annotations

import re
import shlex
from functools import cache
from pathlib import Path

import pytest
from mdcode import FENCE, ROOT, code_blocks

DOCS = sorted(["README.md", "BENCHMARKS.md"] + [str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md")])
COMMAND_DOCS = ["README.md"] + [d for d in DOCS if d.startswith("docs/") and not d.startswith("docs/results/")]
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)\)")
SETUP = ('python3 -m venv .venv && .venv/bin/pip install -e ".[train]" && .venv/bin/dogkit study',
         'python3 -m venv .venv && .venv/bin/pip install -e ".[train,serve,test]" && .venv/bin/python -m pytest')


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation other than - and _ dropped, spaces as hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    """The anchors of a Markdown file's headings (outside code blocks), with GitHub's -1, -2 … for repeats."""
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", text, re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return frozenset(out)


def links(doc: str) -> list[str]:
    """The link and image targets of a Markdown file, outside code blocks and inline code."""
    text = FENCE.sub("", (ROOT / doc).read_text(encoding="utf-8"))
    return LINK.findall(re.sub(r"`[^`\n]*`", "", text))


def test_the_slug_rule_on_headings_this_repository_links_to():
    assert slug("## Results: the study on real photos (a stand-in for ImageNet)".lstrip("# ")) == \
        "results-the-study-on-real-photos-a-stand-in-for-imagenet"
    assert slug("The stand-in study on real photos, `--budget cpu` (CPU, 2 cores)") == \
        "the-stand-in-study-on-real-photos---budget-cpu-cpu-2-cores"
    assert slug("`best.pt` as a plain torchvision network") == "bestpt-as-a-plain-torchvision-network"


@pytest.mark.parametrize("doc", DOCS)
def test_every_link_inside_the_repository_resolves(doc: str):
    source = ROOT / doc
    broken = []
    targets = links(doc)
    for target in targets:
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: — outside the repository
            continue
        file_part, _, anchor = target.partition("#")
        path = (source.parent / file_part).resolve() if file_part else source
        if not path.exists():
            broken.append(f"{target}: no file {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
        elif not path.is_relative_to(ROOT):
            broken.append(f"{target}: outside the repository")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading with anchor #{anchor} in {path.relative_to(ROOT)}")
    assert not broken, f"{doc}: " + "; ".join(broken)
    if doc in ("README.md", "docs/deploy.md"):
        assert len(targets) > 5  # the pattern finds links at all


def test_a_broken_link_and_a_broken_anchor_are_caught(tmp_path: Path):
    page = tmp_path / "page.md"
    page.write_text("# Top\n\n[ok](#top) [gone](missing.md) [bad anchor](#nowhere)\n```\n[in code](nope.md)\n```\n")
    assert "top" in anchors(page) and "nowhere" not in anchors(page)
    found = LINK.findall(FENCE.sub("", page.read_text()))
    assert found == ["#top", "missing.md", "#nowhere"]


def test_the_readme_is_a_short_path_with_ci_s_set_up_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 350
    for command in SETUP:  # .ci/run and the set-up instructions depend on these, byte for byte
        assert command in text
    # The quickstart is in the first screenful: prepare → train → export → predict within the first 40 lines.
    head = "\n".join(text.splitlines()[:40])
    positions = [head.find(f"\ndogkit {step} ") for step in ("prepare", "train", "export", "predict")]
    assert -1 not in positions and positions == sorted(positions), positions


def dogkit_lines(doc: str) -> list[list[str]]:
    """Each `dogkit …` command of a doc's shell blocks, as argument lists (continuations joined, comments, pipes and
    redirections cut off)."""
    commands = []
    for block in code_blocks(doc, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            try:
                words = shlex.split(line, comments=True)
            except ValueError:
                continue
            for i, word in enumerate(words):
                if Path(word).name == "dogkit" and (i == 0 or words[i - 1] in ("-m", "&&")):
                    rest = words[i + 1:]
                    for stop in ("|", "&&", ">", "2>", ">>", ";"):
                        rest = rest[:rest.index(stop)] if stop in rest else rest
                    commands.append(rest)
                    break
    return commands


@cache
def cli_commands() -> dict[str, set[str]]:
    """Every dogkit command and the option strings it takes, read from the CLI itself."""
    import typer

    from dogkit.cli import app

    group = typer.main.get_command(app)
    return {name: {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
            for name, command in group.commands.items()}


@pytest.mark.parametrize("doc", COMMAND_DOCS)
def test_every_dogkit_command_in_the_docs_names_a_real_command_and_real_options(doc: str):
    commands = cli_commands()
    lines = dogkit_lines(doc)
    wrong = []
    for args in lines:
        if not args or args[0] not in commands:
            wrong.append(f"dogkit {' '.join(args)}: no such command")
            continue
        for word in args[1:]:
            option = word.split("=", 1)[0]
            if option.startswith("-") and option not in commands[args[0]] | {"--help"}:
                wrong.append(f"dogkit {' '.join(args)}: {args[0]} has no option {option}")
    assert not wrong, f"{doc}: " + "; ".join(wrong)
    if doc == "README.md":  # every command has its section with examples
        assert {args[0] for args in lines} >= set(commands), set(commands) - {args[0] for args in lines}


def test_a_wrong_command_or_option_is_caught(monkeypatch, tmp_path: Path):
    import mdcode

    (tmp_path / "x.md").write_text("```bash\ndogkit train --exp 1 --epoch 3   # typo\nnot dogkit\n"
                                   "dogkit fly\n.venv/bin/dogkit predict a.jpg | head\n```\n")
    monkeypatch.setattr(mdcode, "ROOT", tmp_path)
    assert dogkit_lines("x.md") == [["train", "--exp", "1", "--epoch", "3"], ["fly"], ["predict", "a.jpg"]]
    commands = cli_commands()
    assert "--epoch" not in commands["train"] and "--epochs" in commands["train"] and "fly" not in commands
