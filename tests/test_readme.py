"""The README's commands are what a newcomer pastes; CI must run the same install and tests.

The commands themselves run in tests/test_toy_pipeline.py (the first command, the demo command
and the Python example, on a CI-sized toy world); here: CI runs the README's second command.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.+?)\n```", (ROOT / "README.md").read_text(), flags=re.S)


def test_ci_runs_the_readme_install_and_test_command():
    tests = readme_blocks("bash")[1]
    install_and_test = tests.split(". .venv/bin/activate && ", 1)[1]  # after creating the venv
    ci = (ROOT / ".ci" / "run").read_text()
    assert install_and_test in ci.splitlines()
    assert "set -euo pipefail" in ci  # pytest's exit code 5 (no tests) must fail CI
