"""The bundle's Python is formatted as MONAI's model zoo requires of a pull request: its `runtests.sh --codeformat`
runs isort, black (`--skip-magic-trailing-comma`) and flake8 with the zoo's `setup.cfg` and `pyproject.toml`, read
here from ../shared/peers/monai-model-zoo as they are; skipped where that folder is absent."""

import os
import subprocess
import sys

import pytest

from conftest import BUNDLE_DIR, REPO_DIR

MODEL_ZOO = os.path.join(os.path.dirname(REPO_DIR), "shared", "peers", "monai-model-zoo")
CHECKS = {
    "isort": ["isort", "--settings-path", os.path.join(MODEL_ZOO, "setup.cfg"), "--check", "--diff", "."],
    "black": [
        "black",
        "--config",
        os.path.join(MODEL_ZOO, "pyproject.toml"),
        "--skip-magic-trailing-comma",
        "--check",
        "--diff",
        ".",
    ],
    "flake8": ["flake8", "--config", os.path.join(MODEL_ZOO, "setup.cfg"), "--count", "."],
}


@pytest.mark.skipif(not os.path.isfile(os.path.join(MODEL_ZOO, "setup.cfg")), reason=f"{MODEL_ZOO} is absent")
@pytest.mark.parametrize("tool", CHECKS)
def test_bundle_code_passes_the_model_zoo_format_check(tool):
    result = subprocess.run(
        [sys.executable, "-m", *CHECKS[tool]], cwd=BUNDLE_DIR, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
