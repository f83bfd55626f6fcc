"""The README as a new user reads it: no issue numbers to resolve, the "Use" snippet runs as
written, and every command it shows parses as the arguments of its command line (the package's,
or a front end of the project's tooling in benchmarks/)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from benchmarks import plot, report
from fusedconvlstm.cli import build_parser

# The project's tooling run as modules from the repository root: their parsers.
TOOLING = {"benchmarks.report": report.build_parser, "benchmarks.plot": plot.build_parser}

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_readme_cites_no_issue_numbers():
    assert not re.findall(r"\bissues? #?\d+|(?<![\w/.-])#\d+\b", README, flags=re.I)


def test_readme_use_snippet_runs_as_written():
    section = README.split("## Use", 1)[1]
    (snippet,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)[:1]
    namespace: dict = {}
    exec(compile(snippet, "README.md (Use)", "exec"), namespace)  # noqa: S102
    assert tuple(namespace["y"].shape) == (8, 45, 512)
    assert tuple(namespace["probs"].shape) == (4, 1)


def _commands() -> list[list[str]]:
    commands = []
    for block in _blocks("sh"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("python -m fusedconvlstm"):
                commands.append(shlex.split(line)[3:])
    return commands


@pytest.mark.parametrize("argv", _commands(), ids=" ".join)
def test_readme_commands_parse(argv):
    build_parser().parse_args(argv)


def _tooling_commands() -> list[tuple[str, list[str]]]:
    commands = []
    for block in _blocks("sh"):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line.split("#", 1)[0].strip())
            if argv[:2] == ["python", "-m"] and argv[2].startswith("benchmarks"):
                commands.append((argv[2], argv[3:]))
    return commands


def test_readme_shows_the_tooling_commands():
    assert {module for module, _ in _tooling_commands()} == set(TOOLING)


@pytest.mark.parametrize("module,argv", _tooling_commands(), ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_readme_tooling_commands_parse(module, argv):
    TOOLING[module]().parse_args(argv)


def test_readme_train_commands_match_the_defaults():
    parser = build_parser()
    train = [argv for argv in _commands() if argv[0] == "train"]
    assert parser.parse_args(train[0]).path == "fused"
    assert parser.parse_args(train[1]).path == "reference"
    assert "python -m fusedconvlstm train --path reference       # the same on the plain-torch twin" in README
