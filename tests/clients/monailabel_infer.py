"""MONAI Label's BundleInferTask, unpatched, segments one image with this bundle's folder, as MONAI Label's server
does for an annotator; the label it writes is copied to OUT. Run in MONAI Label's own environment
(tests/clients/setup_monailabel.sh):
    .venv-monailabel/bin/python tests/clients/monailabel_infer.py BUNDLE IMAGE OUT
Prints the label names and version the task read from the bundle, as JSON."""

import json
import shutil
import sys

from monailabel.tasks.infer.bundle import BundleInferTask


def main(bundle: str, image: str, output: str) -> None:
    task = BundleInferTask(bundle, {})
    if not task.is_valid():
        raise SystemExit(f"MONAI Label did not take the bundle in {bundle}")
    label, _ = task({"image": image, "device": "cpu", "result_extension": ".nii.gz"})
    shutil.copy(label, output)
    print(json.dumps({"labels": task.labels, "version": task.version}))


if __name__ == "__main__":
    main(*sys.argv[1:])
