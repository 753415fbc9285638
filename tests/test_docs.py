"""The README and the pages under docs/ cannot rot: the site builds with ``mkdocs build --strict`` (every link
between pages and every API reference resolves), every ```python example runs, and every ``torchdora`` command and
option in a shell example exists.

An example that cannot run here (it needs a GPU, several processes or a network) is marked on the line directly
above its fence with ``<!-- not-run: the reason -->``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"^\s*<!--\s*not-run:\s*(?P<reason>.*?)\s*-->\s*$")
SHELL = {"bash", "sh", "shell", "console"}


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    not_run: str | None  # the reason given by a marker directly above, else None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def fenced_blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a markdown page (``` fences at the start of a line, as the pages write them)."""
    lines, blocks, i = page.read_text().splitlines(), [], 0
    while i < len(lines):
        opening = re.match(r"^```\s*([\w+-]*)", lines[i])
        if opening is None:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"{page.relative_to(ROOT)}:{i + 1}: a code fence is never closed"
        marker = NOT_RUN.match(lines[i - 1]) if i > 0 else None
        blocks.append(Block(page, i + 1, opening.group(1).lower(), "\n".join(lines[i + 1:end]) + "\n",
                            None if marker is None else marker.group("reason")))
        i = end + 1
    return blocks


BLOCKS = [block for page in PAGES for block in fenced_blocks(page)]
PYTHON = [block for block in BLOCKS if block.language == "python"]


def test_the_pages_have_examples_to_check():
    """Guards the extraction: a change to the fence syntax that found no blocks would pass every test below."""
    assert any(b.page.name == "README.md" for b in PYTHON) and any(b.page.name == "library.md" for b in PYTHON)
    assert any(b.page.name == "cli.md" and b.language in SHELL for b in BLOCKS)


@pytest.mark.parametrize("block", [b for b in PYTHON if b.not_run is None], ids=lambda b: b.where)
def test_python_example_runs(block, tmp_path, monkeypatch):
    """Each example runs on its own (a fresh namespace) in an empty folder, as a reader would paste it."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    exec(compile(block.code, block.where, "exec"), {"__name__": "__main__"})


def test_not_run_markers_give_a_reason_and_sit_above_a_python_block():
    lines = [(page, n, text) for page in PAGES for n, text in enumerate(page.read_text().splitlines(), 1)]
    markers = {(page, n + 1) for page, n, text in lines if NOT_RUN.match(text)}
    marked = {(b.page, b.line) for b in PYTHON if b.not_run is not None}
    assert markers == marked, f"markers not directly above a ```python fence: {sorted(markers - marked)}"
    assert all(b.not_run for b in PYTHON if b.not_run is not None), "a not-run marker must say why"


# ---- shell examples: the commands and options they name exist --------------------------------------------------
def torchdora_calls(code: str) -> list[tuple[str, list[str]]]:
    """``(command, [--options])`` for every torchdora call in shell lines (``torchdora c``, ``-m torchdora c``,
    ``scripts/train.sh``); comments and continuation lines handled as the shell would."""
    calls = []
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        for i, word in enumerate(words):
            called = i == 0 or words[i - 1] in ("-m", "bash", "exec") or "=" in words[i - 1]
            if called and (word == "scripts/train.sh" or word == "torchdora" and i + 1 < len(words)):
                command, rest = ("train", words[i + 1:]) if word.endswith(".sh") else (words[i + 1], words[i + 2:])
                rest = rest[:next((k for k, w in enumerate(rest) if w in ("|", "&&", "||", ";")), len(rest))]
                calls.append((command, [w.split("=", 1)[0] for w in rest if w.startswith("--")]))
    return calls


def help_text(argv: list[str], capsys) -> str:
    """What ``torchdora <argv>`` prints (the same entry point as the installed script, in this process)."""
    from torchdora.app import cli

    try:
        cli.main(argv)
    except SystemExit as stop:  # argparse's --help
        assert stop.code in (0, None)
    return capsys.readouterr().out


def listed_commands(capsys) -> list[str]:
    """The commands ``torchdora --help`` lists."""
    return re.findall(r"^  (\S+)  ", help_text(["--help"], capsys).split("commands:", 1)[1], flags=re.M)


def test_calls_are_found_in_shell_lines():
    """The parser of shell lines, on the forms the pages use."""
    code = ("torchdora train --rank 8 lr=1e-4   # --not-an-option in a comment\n"
            "OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 -m torchdora train \\\n    --sharding fsdp\n"
            "python -m torchdora eval --adapter 'a b' --split=test | tee log\nbash scripts/train.sh --steps 10\n"
            "pip install torchdora\n")
    assert torchdora_calls(code) == [("train", ["--rank"]), ("train", ["--sharding"]),
                                     ("eval", ["--adapter", "--split"]), ("train", ["--steps"])]


def test_shell_examples_use_commands_and_options_that_exist(capsys):
    shell = [b for b in BLOCKS if b.language in SHELL]
    calls = [(b.where, command, options) for b in shell for command, options in torchdora_calls(b.code)]
    assert len(calls) > 10, calls
    commands = set(listed_commands(capsys))
    unknown = [(where, command) for where, command, _ in calls if command not in commands]
    assert unknown == [], f"commands that `torchdora --help` does not list: {unknown}"
    known = {command: set(re.findall(r"--[\w-]+", help_text([command, "--help"], capsys)))
             for command in {command for _, command, _ in calls}}
    wrong = [(where, command, option) for where, command, options in calls for option in options
             if option not in known[command]]
    assert wrong == [], f"options that the command's --help does not list: {wrong}"


def test_every_command_has_its_section_in_the_cli_guide(capsys):
    """docs/cli.md has a ``## `torchdora <command>` `` section for each command that ``torchdora --help`` lists."""
    commands = listed_commands(capsys)
    sections = set(re.findall(r"^## `torchdora ([\w-]+)`", (ROOT / "docs" / "cli.md").read_text(), flags=re.M))
    assert commands and [c for c in commands if c not in sections] == []


# ---- links and the site ------------------------------------------------------------------------------------------
def test_the_readme_links_to_files_that_exist():
    """The README is not part of the site (mkdocs checks the pages' links), so its relative links are checked here."""
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", (ROOT / "README.md").read_text())
    local = [t for t in targets if "://" not in t]
    assert local and [t for t in local if not (ROOT / t).exists()] == []


def test_the_site_builds_strict(tmp_path):
    """``mkdocs build --strict``: a broken link or anchor between pages, a page left out of the nav, or a docstring
    the API reference cannot parse fails the build."""
    for package in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        pytest.importorskip(package, reason="the docs extra is not installed: pip install -e '.[docs]'")
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(site)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    api = (site / "api" / "index.html").read_text()
    # the reference was generated from the docstrings, not left as ::: lines
    assert ":::" not in api and "torchdora.functional.dora_scale" in api and "merge_and_unload" in api
