"""The README's two commands are what a newcomer pastes; CI must run the same install and tests."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text)[:2]


def test_readme_opens_with_the_two_commands():
    main, tests = _readme_commands()
    # The embedded default, end to end: one process per core of a 2-core machine (torchrun).
    assert main.endswith("torchrun --standalone --nproc_per_node=2 train.py --dataset toy")
    assert tests.endswith("python -m pytest -q")


def test_ci_runs_the_readme_install_and_test_command():
    _, tests = _readme_commands()
    install_and_test = tests.split(". .venv/bin/activate && ", 1)[1]  # after creating the venv
    ci = (ROOT / ".ci" / "run").read_text()
    assert install_and_test in ci
    assert "set -euo pipefail" in ci  # pytest's exit code 5 (no tests) must fail CI
