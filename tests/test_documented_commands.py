"""Every command the README and docs/ show runs as written from a fresh clone.

Commands are read from the code of the Markdown files (inline code and fenced blocks), not from prose.
Each first-party Python entry point (``python -m research.step1_sweep``, ``python scripts/ablations.py``,
``python -m bench``, ...) is started from the repository root exactly as a reader would type it, with no
``PYTHONPATH``, and must answer ``--help`` and know every ``--option`` the docs pass it. A
``python stages/<name>.py`` must be the command of a ``dvc.yaml`` stage, a ``make`` target must exist,
and a ``tris-*`` command must be a declared console script.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FIRST_PARTY = ("pipeline", "research", "scripts", "bench")

_FENCED = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
_INLINE = re.compile(r"`([^`]+)`")  # a span may wrap onto the next line
_PYTHON = re.compile(r"\bpython3? (?:-m (?P<module>[\w.]+)|(?P<script>[\w./-]+\.py))(?P<args>[^`|;&\n]*)")
_MAKE = re.compile(r"^\s*make (?P<target>[\w-]+)")
_CONSOLE = re.compile(r"^\s*(?P<command>tris-[\w-]+)")


def code_of(text: str) -> list[str]:
    """The code lines of a Markdown text: fenced blocks line by line, then inline code spans."""
    blocks = [line for block in _FENCED.findall(text) for line in block.splitlines()]
    prose = _FENCED.sub("", text)
    return blocks + [" ".join(span.split()) for span in _INLINE.findall(prose)]


def documented() -> dict[str, dict[str, set[str]]]:
    """``{"python": {entry: options}, "make": {target: where}, "console": {command: where}}``."""
    found: dict[str, dict[str, set[str]]] = {"python": defaultdict(set), "make": defaultdict(set),
                                              "console": defaultdict(set)}
    for doc in DOCS:
        for line in code_of(doc.read_text()):
            for m in _PYTHON.finditer(line):
                entry = f"-m {m['module']}" if m["module"] else m["script"]
                found["python"][entry] |= set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", m["args"]))
            if (m := _MAKE.match(line)) is not None:
                found["make"][m["target"]].add(doc.name)
            if (m := _CONSOLE.match(line)) is not None:
                found["console"][m["command"]].add(doc.name)
    return found


COMMANDS = documented()
STAGE_CMDS = {stage["cmd"] for stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values()}


def first_party(entry: str) -> bool:
    name = entry[3:] if entry.startswith("-m ") else entry
    return name.replace("/", ".").split(".")[0] in FIRST_PARTY


RUNNABLE = sorted(e for e in COMMANDS["python"] if first_party(e))


def test_the_docs_show_the_commands_this_test_is_for():
    """A change to how commands are written must not empty the check."""
    expected = {"-m research.step1_sweep", "scripts/ablations.py", "-m bench", "-m pipeline.predict"}
    assert expected <= set(RUNNABLE)


@pytest.mark.parametrize("entry", RUNNABLE)
def test_a_documented_entry_point_runs_as_written(entry):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, *entry.split(), "--help"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"python {entry} --help failed:\n{result.stderr[-2000:]}"
    unknown = sorted(o for o in COMMANDS["python"][entry] if o not in result.stdout)
    assert unknown == [], f"the docs pass python {entry} options its --help does not know: {unknown}"


def test_a_documented_stage_command_is_a_dvc_stage():
    stages = [e for e in COMMANDS["python"] if e.startswith("stages/")]
    assert [e for e in stages if f"python {e}" not in STAGE_CMDS] == []


def test_documented_make_targets_exist():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    assert {"repro", "test", "test-fast"} <= set(COMMANDS["make"])
    assert sorted(set(COMMANDS["make"]) - targets) == []


def test_documented_console_commands_are_declared():
    section = (ROOT / "pyproject.toml").read_text().split("[project.scripts]\n", 1)[1].split("\n[", 1)[0]
    declared = set(re.findall(r"^([\w-]+) = ", section, re.M))
    assert sorted(set(COMMANDS["console"]) - set(declared)) == []
