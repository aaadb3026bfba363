"""The user documentation (README.md and docs/*.md) is executable and self-contained.

* Every fenced ```python block runs. The blocks of one file run in order in one namespace
  (a fresh namespace per file, so a later block may use the `model` an earlier block built),
  in-process, with a temporary working directory (examples write `out/`, `folded/`, ...).
  A block fenced as ```python no-test is not run: it needs the network (the Hugging Face Hub)
  or hours. Such blocks are allowed only where `NO_TEST` lists them, so a new unmarked block
  that fails, or a new no-test block nobody accounted for, fails this test.
* The README stays a short user guide: at most `README_MAX_LINES` lines.
* No issue-tracker references ("issue #12", "Issue 7", "#12") and no internal notes.
* Every relative link (markdown links and images) points to a file of this repository (and
  to a heading of it, for `file.md#anchor` links), and so does every `benchmarks/...`,
  `docs/...` or `tests/...` path quoted in backticks.
* Every `modelfold COMMAND --option` and `make TARGET` line of a ```bash block names a command,
  option or target that exists.
"""

from __future__ import annotations

import re
import shlex
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 220
DOC_FILES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
# file (relative to the root) -> number of ```python no-test blocks it may hold
NO_TEST = {"docs/llm.md": 1}

FENCE = re.compile(r"^( *)```([^\n`]*)\n(.*?)^\1```[ \t]*$", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE_PATH = re.compile(r"`((?:benchmarks|docs|tests)/[^`\s*<>]+)`")
ISSUE_REFS = [
    re.compile(r"\bissues?\s*(?:#|no\.?|number)?\s*\d+", re.IGNORECASE),
    re.compile(r"(?<![\w/&])#\d+\b"),
]
FORBIDDEN = ["DESIGN.md", "shared/reference", "anchor_fmnist", "anchor_llm"]


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _blocks(path: Path) -> list[tuple[str, str]]:
    """(info string, code) of every fenced block."""
    return [(m.group(2).strip(), textwrap.dedent(m.group(3)))
            for m in FENCE.finditer(path.read_text())]


def _python_blocks(path: Path) -> tuple[list[str], int]:
    run, skipped = [], 0
    for info, code in _blocks(path):
        words = info.split()
        if not words or words[0] != "python":
            continue
        if "no-test" in words[1:]:
            skipped += 1
        else:
            run.append(code)
    return run, skipped


def test_doc_files_exist():
    names = {_rel(p) for p in DOC_FILES}
    for name in ("README.md", "docs/method.md", "docs/llm.md", "docs/benchmarks.md",
                 "docs/cli.md", "docs/design.md", "docs/api.md", "docs/ablations.md"):
        assert name in names


@pytest.mark.parametrize("path", DOC_FILES, ids=_rel)
def test_python_blocks_run(path, tmp_path, monkeypatch):
    code_blocks, skipped = _python_blocks(path)
    assert skipped == NO_TEST.get(_rel(path), 0), (
        f"{_rel(path)} has {skipped} ```python no-test block(s); NO_TEST allows "
        f"{NO_TEST.get(_rel(path), 0)}")
    if not code_blocks:
        pytest.skip("no python blocks")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {"__name__": f"docs_{path.stem}"}
    for i, code in enumerate(code_blocks, 1):
        try:
            exec(compile(code, f"{_rel(path)}:block{i}", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"python block {i} of {_rel(path)} failed:\n{code}") from exc


def test_readme_has_runnable_quick_starts():
    code_blocks, skipped = _python_blocks(ROOT / "README.md")
    assert len(code_blocks) >= 2 and skipped == 0
    text = (ROOT / "README.md").read_text()
    first_screen = "\n".join(text.splitlines()[:40])
    assert "make demo" in first_screen and "make test" in first_screen


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


@pytest.mark.parametrize("path", DOC_FILES, ids=_rel)
def test_no_issue_references_or_outside_files(path):
    text = path.read_text()
    for pattern in ISSUE_REFS:
        hits = pattern.findall(text)
        assert not hits, f"{_rel(path)} mentions {hits}"
    for word in FORBIDDEN:
        assert word not in text, f"{_rel(path)} mentions {word}"


def _anchors(path: Path) -> set[str]:
    """GitHub's ids of the headings of a markdown file (outside code blocks)."""
    text = FENCE.sub("", path.read_text())
    ids = set()
    for title in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, re.MULTILINE):
        ids.add(re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-"))
    return ids


@pytest.mark.parametrize("path", DOC_FILES, ids=_rel)
def test_relative_links_exist(path):
    text = path.read_text()
    targets = [t for t in LINK.findall(text)
               if not re.match(r"^[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]
    bad = []
    for target in targets:
        name, _, anchor = target.partition("#")
        file = (path.parent / name).resolve()
        missing = not file.exists() or ROOT not in file.parents
        if missing or (anchor and file.suffix == ".md" and anchor not in _anchors(file)):
            bad.append(target)
    for quoted in CODE_PATH.findall(text):
        if not (ROOT / quoted.rstrip(".,:;")).exists():
            bad.append(quoted)
    assert not bad, f"{_rel(path)} points to missing files: {bad}"


def _commands():
    import typer

    from modelfold.cli import app

    group = typer.main.get_command(app)
    return {name: {opt for param in cmd.params for opt in (*param.opts, *param.secondary_opts)}
            for name, cmd in group.commands.items()}


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w-]*):", text, re.MULTILINE))


def _shell_lines(code: str) -> list[str]:
    joined = re.sub(r"\\\n", " ", code)
    return [line.split(" #")[0].strip() for line in joined.splitlines()
            if line.strip() and not line.strip().startswith("#")]


@pytest.mark.parametrize("path", DOC_FILES, ids=_rel)
def test_bash_blocks_name_real_commands(path):
    commands, targets = _commands(), _make_targets()
    bad = []
    for info, code in _blocks(path):
        if info.split()[:1] != ["bash"]:
            continue
        for line in _shell_lines(code):
            words = shlex.split(line, comments=True)
            if not words:
                continue
            if words[0] == "make":
                bad += [w for w in words[1:] if "=" not in w and w not in targets]
            elif words[0] == "modelfold" and len(words) > 1 and not words[1].startswith("-"):
                if words[1] not in commands:
                    bad.append(words[1])
                    continue
                opts = commands[words[1]] | {"--help"}
                bad += [w.split("=")[0] for w in words[2:]
                        if w.startswith("--") and w.split("=")[0] not in opts]
    assert not bad, f"{_rel(path)}: unknown commands/options/targets {bad}"

