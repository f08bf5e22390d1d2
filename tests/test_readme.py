"""The README runs as written (issue 17): every ```python block is executed, in order, in one fresh
process on the shipped SmolLM2 (the blocks build on each other, as a reader's session would), and
every ``rope-ext`` command line in a ```bash block parses with the current command line interface.
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from rope_ext.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
SHELL = {">", ">>", "|", "&&", ";", "2>"}  # where a command line ends


def blocks(language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(README.read_text()) if lang == language]


def command_lines(script: str) -> list[list[str]]:
    """The ``rope-ext`` invocations of a shell block, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", script)
    lines = [shlex.split(line, comments=True) for line in joined.splitlines() if line.strip().startswith("rope-ext ")]
    return [argv[:next((i for i, word in enumerate(argv) if word in SHELL), len(argv))] for argv in lines]


def test_the_readme_has_python_and_command_examples() -> None:
    assert len(blocks("python")) >= 3
    assert len([argv for block in blocks("bash") for argv in command_lines(block)]) >= 5


@pytest.mark.parametrize("argv", [argv for block in blocks("bash") for argv in command_lines(block)],
                         ids=lambda argv: " ".join(argv[:3]))
def test_every_readme_command_parses(argv: list[str]) -> None:
    args = build_parser().parse_args(argv[1:])
    assert callable(args.func)


@pytest.mark.slow
def test_every_readme_python_block_runs(tmp_path: Path) -> None:
    program = "\n\n".join(f"# --- README block {i}\n{body}" for i, body in enumerate(blocks("python")))
    (tmp_path / "readme_blocks.py").write_text(program)
    done = subprocess.run([sys.executable, "readme_blocks.py"], cwd=tmp_path, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-4000:]
