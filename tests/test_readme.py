"""The README's commands are real: the Makefile targets exist and do what the README says."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_the_two_commands_are_make_targets_that_build_and_test() -> None:
    block = re.search(r"## The two commands\s+```bash\n(.*?)```", README, re.S)
    assert block, "the README must show the two commands in a bash block"
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]
    assert commands == ["make build", "make test"]
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    for target, expected in (
        ("build", "tforge build models/minilm.yaml"),
        ("test", "python -m pytest"),
    ):
        plan = subprocess.run(
            ["make", "-n", "-B", target], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
        assert expected in plan
        assert "torch==2.13.0" in plan  # torch first, so no CUDA build is pulled


def test_ci_runs_the_readme_test_command() -> None:
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_the_recipe_shown_is_the_shipped_one() -> None:
    block = re.search(r"`models/minilm.yaml`:\n\n```yaml\n(.*?)```", README, re.S)
    assert block
    shown = yaml.safe_load(block.group(1))
    shipped = yaml.safe_load((ROOT / "models" / "minilm.yaml").read_text())
    assert shown == shipped
