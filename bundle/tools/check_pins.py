"""Which Python versions each pinned package installs on, as the package index lists it: the pins of
configs/metadata.json (what the model zoo's CI installs: monai, torch, numpy and `required_packages_version`) and
those of the repository's requirements.txt. Needs the package index.

    python -m tools.check_pins --pythons 3.10,3.11,3.12,3.13
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from scripts import BUNDLE_DIR


def metadata_pins() -> dict[str, str]:
    """The packages and versions the model zoo's CI installs for the bundle (`ci/get_bundle_requirements.py`)."""
    with open(os.path.join(BUNDLE_DIR, "configs", "metadata.json")) as f:
        metadata = json.load(f)
    pins = {
        name: metadata[f"{key}_version"] for name, key in (("monai", "monai"), ("torch", "pytorch"), ("numpy", "numpy"))
    }
    return {**pins, **metadata.get("required_packages_version", {})}


def requirement_pins(path: str) -> dict[str, str]:
    """`name==version` lines of a requirements file."""
    with open(path) as f:
        return dict(re.findall(r"^([A-Za-z0-9_.\-]+)==([^\s#]+)", f.read(), flags=re.MULTILINE))


def installs_on(name: str, version: str, python: str) -> bool:
    """Whether the index offers `name==version` to `python` (its Requires-Python and wheels)."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", name, "--python-version", python],
        capture_output=True,
        text=True,
    )
    listed = re.search(r"Available versions: (.*)", result.stdout)
    return bool(listed) and version in [v.strip() for v in listed.group(1).split(",")]


def main(pythons: str = "3.10,3.11,3.12,3.13") -> None:
    versions = [str(p) for p in (pythons.split(",") if isinstance(pythons, str) else pythons)]
    pins = {**requirement_pins(os.path.join(os.path.dirname(BUNDLE_DIR), "requirements.txt")), **metadata_pins()}
    print("| package | " + " | ".join(versions) + " |")
    print("|---|" + "---|" * len(versions))
    failing = []
    for name, version in sorted(pins.items()):
        works = [installs_on(name, version, python) for python in versions]
        failing += [f"{name}=={version} on {python}" for python, ok in zip(versions, works) if not ok]
        print(f"| {name}=={version} | " + " | ".join("yes" if ok else "**no**" for ok in works) + " |")
    print("every pin installs on every version" if not failing else "not offered: " + ", ".join(failing))


if __name__ == "__main__":
    import fire

    fire.Fire(main)
