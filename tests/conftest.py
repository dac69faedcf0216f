import os
import sys

import pytest

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE_DIR = os.path.join(REPO_DIR, "bundle")
REAL_DATA_DIR = os.path.join(os.path.dirname(REPO_DIR), "shared", "data", "Task04_Hippocampus")


def files_under(*folders):
    """(path, modification time) of every file under `folders` (caches left out): to show that nothing was written."""
    return {(os.path.join(d, f), os.stat(os.path.join(d, f)).st_mtime_ns)
            for folder in folders for d, _, names in os.walk(folder) if "__pycache__" not in d for f in names}


# make the bundle's `scripts` package importable from tests run at the repo root
sys.path.insert(0, BUNDLE_DIR)


@pytest.fixture(scope="session")
def synthetic_task(tmp_path_factory):
    """A small synthetic MSD task folder shared by the tests that only read it."""
    from scripts.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(str(tmp_path_factory.mktemp("synthetic") / "Task04_Hippocampus"), num_cases=12)
