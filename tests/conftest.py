import os
import sys

import pytest

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE_DIR = os.path.join(REPO_DIR, "bundle")
REAL_DATA_DIR = os.path.join(os.path.dirname(REPO_DIR), "shared", "data", "Task04_Hippocampus")

# make the bundle's `scripts` package importable from tests run at the repo root
sys.path.insert(0, BUNDLE_DIR)


@pytest.fixture(scope="session")
def synthetic_task(tmp_path_factory):
    """A small synthetic MSD task folder shared by the tests that only read it."""
    from scripts.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(str(tmp_path_factory.mktemp("synthetic") / "Task04_Hippocampus"), num_cases=12)
