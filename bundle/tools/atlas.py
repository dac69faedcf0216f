"""Builds the MNI152 files that whole-head inference needs (MONAI ships no brain template), from the ICBM 2009a
files inside the nilearn wheel, and measures where the shipped model finds the hippocampi on the template.

    pip download --no-deps nilearn==0.14.1 && unzip -o nilearn-0.14.1-py3-none-any.whl 'nilearn/datasets/data/*'
    python -m tools.atlas build --nilearn_data nilearn/datasets/data
    python -m tools.atlas centres
"""

from __future__ import annotations

import os
import shutil
import tempfile

import fire
import nibabel as nib
import numpy as np
import SimpleITK as sitk  # noqa: N813 (SimpleITK's own convention)
from scripts.head.localisation import BrainExtraction
from scripts.imaging import resample
from scripts.labels import HEAD_LABELS, mask_name
from tools.head_check import configured_segmenter

TEMPLATE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
BRAIN_MASK = "mni_icbm152_brain_mask_2mm.nii.gz"


def build(nilearn_data: str, output_dir: str = "atlas") -> None:
    """Copies the template T1 and writes its brain mask on a 2 mm grid, as the head path's brain extraction (deepbet)
    finds it: the registration matches each scan's extracted brain to this one."""
    os.makedirs(output_dir, exist_ok=True)
    shutil.copyfile(os.path.join(nilearn_data, TEMPLATE), os.path.join(output_dir, TEMPLATE))
    _, mask = BrainExtraction()(sitk.ReadImage(os.path.join(output_dir, TEMPLATE), sitk.sitkFloat32))
    mask = resample(mask, 2.0, sitk.sitkNearestNeighbor)
    sitk.WriteImage(mask, os.path.join(output_dir, BRAIN_MASK), useCompression=True)
    print(
        f"wrote {output_dir}/{TEMPLATE} and {output_dir}/{BRAIN_MASK} ({int(sitk.GetArrayViewFromImage(mask).sum())} "
        "voxels of 8 mm3)"
    )


def centres(config_file: str = "configs/inference.yaml", template: str = f"atlas/{TEMPLATE}") -> dict:
    """Segments the template as a head with the configured model and boxes, and returns the centroid (MNI mm) of
    each side's hippocampus: the values of `head#box_centers` in configs/inference.yaml."""
    with tempfile.TemporaryDirectory() as output_dir:
        configured_segmenter(config_file, output_dir)(template)
        mask = nib.load(os.path.join(output_dir, mask_name(TEMPLATE)))
        labels = np.asarray(mask.dataobj)
    result = {}
    for side, side_labels in HEAD_LABELS.items():
        voxels = np.argwhere(np.isin(labels, side_labels))
        result[side] = np.round(nib.affines.apply_affine(mask.affine, voxels.mean(0)), 1).tolist()
    return result


if __name__ == "__main__":
    fire.Fire({"build": build, "centres": centres})
