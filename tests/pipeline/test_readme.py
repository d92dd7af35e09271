"""The README's commands work as typed: every command in its bash blocks resolves in the project environment.

Each line of a ```bash block is split into commands (``&&``); ``make <target>`` must be a Makefile target, a
``dvc``/``python``/``mlflow``/``prefect`` command must be an executable of the environment (``.venv/bin/`` or the
activated PATH), ``python -m <module>`` an importable module whose ``--help`` works, and ``dvc <command>`` a DVC
command. A stage run by a ``python`` without the project's packages stops with one line that says what to do.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.pipeline

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TOOLS = {"dvc", "python", "mlflow", "prefect"}


def readme_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        logical = block.replace("\\\n", " ")
        for line in logical.splitlines():
            line = line.split("  #", 1)[0].strip()
            if not line or line.startswith("#"):
                continue
            for part in line.split("&&"):
                commands.append(shlex.split(part.strip(), comments=True))
    return commands


def _tool(token: str) -> str | None:
    name = token.removeprefix(".venv/bin/").removeprefix("$PWD/.venv/bin/")
    return name if name in TOOLS else None


def test_readme_has_commands() -> None:
    assert len(readme_commands()) > 20


def test_every_readme_command_resolves() -> None:
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    dvc_commands: set[str] = set()
    modules: set[str] = set()
    for cmd in readme_commands():
        head = cmd[0]
        if head in ("source", "CUDA_VISIBLE_DEVICES=0"):
            continue
        if head == "git":  # the one system tool the README uses (a pool run pins a commit)
            assert shutil.which("git") and cmd[1] in ("commit", "push", "clone"), cmd
            continue
        if head == "make":
            assert cmd[1] in targets, f"make {cmd[1]}: no such target"
            continue
        tool = _tool(head)
        assert tool is not None, f"README command {' '.join(cmd)!r}: {head} is not a project tool"
        assert (BIN / tool).exists(), f"{tool} is not in the environment ({BIN})"
        if tool == "python" and cmd[1:2] == ["-m"]:
            modules.add(cmd[2])
        elif tool == "dvc":
            dvc_commands.add(cmd[1])
    for module in sorted(modules):
        assert importlib.util.find_spec(module) is not None, f"python -m {module}: no such module"
    for sub in sorted(dvc_commands):
        proc = subprocess.run([str(BIN / "dvc"), sub, "--help"], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, f"dvc {sub}: {proc.stderr[-500:]}"


@pytest.mark.parametrize("module", ["pipeline.orchestrate", "pipeline.flow"])
def test_runner_clis_answer_help(module: str) -> None:
    proc = subprocess.run([sys.executable, "-m", module, "run", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and "usage" in proc.stdout


def test_a_stage_without_the_environment_says_what_to_do() -> None:
    """`python -S` has no site-packages: the stage's first import of numpy/omegaconf fails, in one line."""
    proc = subprocess.run([sys.executable, "-S", "-m", "stages.dataset"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not installed" in lines[0] and "source .venv/bin/activate" in lines[0], lines
