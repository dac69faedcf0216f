"""Whole-head T1 inputs: MONAI segments no whole heads, so the model segments one box per hippocampus, placed by
`scripts.head.localisation`, cut from the head along its own axes and mapped back to its grid."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence

import nibabel as nib
import numpy as np
import SimpleITK as sitk  # noqa: N813 (SimpleITK's own convention)
import torch
from monai.data import FolderLayoutBase, MetaTensor
from monai.inferers import Inferer
from monai.transforms import Compose, EnsureChannelFirstd, Invertd, LoadImaged, SaveImage
from scipy import ndimage
from scripts.data.headers import MAX_VOXELS, check_header
from scripts.data.transforms import CheckHeaderd, RejectInvalidImaged, image_reader
from scripts.head.localisation import BrainExtraction, HeadError, Registration, TemplateRegistration
from scripts.imaging import RAS_TO_LPS, sample_near, to_sitk
from scripts.labels import HEAD_LABELS, PARTS, SIDES, structure_name


def field_of_view_mm(path: str) -> np.ndarray:
    """The physical extent (mm) of each axis of a NIfTI or FreeSurfer file or DICOM series folder, from its header."""
    if os.path.isdir(path):
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(path)
        if not files:
            raise ValueError("no DICOM series found")
        first, last = (_image_information(f) for f in (files[0], files[-1]))
        in_plane = np.array(first.GetSize()[:2]) * np.array(first.GetSpacing()[:2])
        through_plane = np.linalg.norm(np.subtract(last.GetOrigin(), first.GetOrigin())) + first.GetSpacing()[2]
        return np.array([*in_plane, through_plane])
    header = nib.load(path).header
    return np.array(header.get_data_shape()[:3]) * np.array(header.get_zooms()[:3])


def _image_information(path: str) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    return reader


def input_kind(path: str, max_crop_mm: float = 100.0) -> str:
    """`crop` when every side of the field of view is under `max_crop_mm` (Task04's crops are at most 43x58x47 mm),
    `head` otherwise. An unreadable header counts as a crop, whose reader then reports the problem."""
    try:
        return "crop" if field_of_view_mm(path).max() < max_crop_mm else "head"
    except Exception:
        return "crop"


def _coverage(box_to_scan: np.ndarray, box_shape: Sequence[int], scan_shape: Sequence[int]) -> float:
    """The fraction of a box's voxels whose nearest scan voxel lies inside the scan (`box_to_scan`: box voxel to scan
    voxel, 4x4)."""
    index = box_to_scan[:3, 3].reshape(3, 1, 1, 1)
    for axis, n in enumerate(box_shape):
        steps = np.arange(n).reshape([-1 if a == axis else 1 for a in range(3)])
        index = index + box_to_scan[:3, axis].reshape(3, 1, 1, 1) * steps
    index = np.rint(index)
    return float(np.all((index >= 0) & (index < np.reshape(scan_shape, (3, 1, 1, 1))), axis=0).mean())


class HeadSegmenter:
    """Segments both hippocampi of a whole-head scan and writes `<case>_seg.nii.gz` on the scan's own grid with
    labels 1 left anterior, 2 left posterior, 3 right anterior, 4 right posterior.

    For each side, a box centred on the registration's image of `box_centers[side]` (MNI mm, RAS), `box_size` mm
    scaled to the head's size, along the head's own axes (the registration's rotation), is resampled from the scan
    at 1 mm, preprocessed as the model was trained (`preprocessing` without its loader), segmented, and its
    probabilities are mapped back to the head's grid.

    Args:
        network: the segmentation network (weights loaded by the caller).
        inferer: the inference inferer (flip averaging, autocast) shared with crop inputs.
        preprocessing: the recipe's deterministic preprocessing; its `LoadImaged` is skipped (boxes are in memory).
        brain_extraction: a `BrainExtraction`.
        registration: a `TemplateRegistration` of the extracted brain.
        box_centers: `{"left": [x, y, z], "right": [x, y, z]}`, MNI mm.
        box_size: box side lengths in mm for a head of the template's size.
        folder_layout: where each head's mask is written (`scripts.inference.inputs.Inputs` in a bundle run).
        device: where the network runs.
        amp: fp16 autocast on CUDA.
        min_side_volume_mm3: a side whose hippocampus is smaller is reported as failed (empty segmentation).
        max_fragment_fraction: a side whose pieces beyond the largest hold more of it is reported as fragmented;
            smaller pieces are removed.
        min_box_coverage: the fraction of each box that must lie inside the scan's field of view.
        agreement_shift_mm: the shift (whole mm along the box's axes) of a second box per side, segmented for QC
            only: the Dice of its hippocampus with the box's, where they overlap, is the side's agreement under
            test-time augmentation.
        max_voxels: a scan whose header claims more voxels is refused before it is read
            (`scripts.data.headers.check_header`).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        inferer: Inferer,
        preprocessing: Compose,
        brain_extraction: BrainExtraction,
        registration: TemplateRegistration,
        box_centers: Mapping[str, Sequence[float]],
        box_size: Sequence[float],
        folder_layout: FolderLayoutBase,
        device: torch.device | str = "cpu",
        amp: bool = False,
        min_side_volume_mm3: float = 1000.0,
        max_fragment_fraction: float = 0.1,
        min_box_coverage: float = 0.9,
        agreement_shift_mm: Sequence[int] = (2, 2, 2),
        max_voxels: int = MAX_VOXELS,
    ) -> None:
        self.network = network
        self.inferer = inferer
        self.box_preprocessing = Compose(
            [t for t in preprocessing.transforms if not isinstance(t, (CheckHeaderd, LoadImaged))]
        )
        self.max_voxels = int(max_voxels)
        self.brain_extraction = brain_extraction
        self.registration = registration
        self.box_centers = {side: np.asarray(box_centers[side], dtype=np.float64) for side in SIDES}
        self.box_size = np.asarray(box_size, dtype=np.float64)
        self.device = torch.device(device)
        self.amp = amp
        self.min_side_volume_mm3 = min_side_volume_mm3
        self.max_fragment_fraction = max_fragment_fraction
        self.min_box_coverage = min_box_coverage
        self.agreement_shift_mm = np.asarray(agreement_shift_mm, dtype=int)
        self.load = LoadImaged("image")
        self.checked = Compose([EnsureChannelFirstd("image"), RejectInvalidImaged("image")])
        self.save = SaveImage(
            folder_layout=folder_layout, output_ext=".nii.gz", output_dtype=np.uint8, resample=False, print_log=False
        )

    def __call__(self, path: str) -> dict:
        """Segments one head; returns its eTIV, each part's volume on the 1 mm boxes, registration details and time
        split. Raises for a bad case."""
        times = {}
        start = time.perf_counter()
        check_header(path, self.max_voxels)
        image = self.checked(self.load({"image": path}, image_reader(path)))["image"]
        head = to_sitk(image)
        times["read_s"] = time.perf_counter() - start

        start = time.perf_counter()
        brain = self.brain_extraction(head)
        times["extraction_s"] = time.perf_counter() - start

        start = time.perf_counter()
        registration = self.registration(*brain)
        times["registration_s"] = time.perf_counter() - start

        start = time.perf_counter()
        affine = np.asarray(image.affine, dtype=np.float64)
        labels = np.zeros(image.shape[1:], dtype=np.uint8)
        foreground = np.zeros(image.shape[1:], dtype=np.float32)
        confident = {}  # top-class probabilities inside each box's hippocampus, as the model gave them (1 mm)
        agreement = {}
        box_volumes = {}  # mm3 of each part on the 1 mm box grid, whatever the scan's voxels
        for side in SIDES:
            box_affine, box_shape = self._box_in_scan(registration, side)
            coverage = _coverage(np.linalg.inv(affine) @ box_affine, box_shape, labels.shape)
            if coverage < self.min_box_coverage:
                raise HeadError(f"the {side} hippocampus box lies {100 * (1 - coverage):.0f}% outside the image")
            probabilities = self._keep_largest_piece(self._segment_box(head, box_affine, box_shape), side)
            parts = probabilities.argmax(0)
            hippocampus = parts > 0
            box_volumes.update(
                {structure_name(side, part): float((parts == c).sum()) for c, part in enumerate(PARTS, 1)}
            )
            confident[side] = probabilities.max(0)[hippocampus]
            agreement[side] = self._agreement(head, box_affine, box_shape, hippocampus)
            self._paste(probabilities, box_affine, affine, labels, foreground, HEAD_LABELS[side])
        times["segmentation_s"] = time.perf_counter() - start

        start = time.perf_counter()
        self.save(MetaTensor(torch.from_numpy(labels)[None], meta=image.meta))
        times["writing_s"] = time.perf_counter() - start
        return {
            "etiv_mm3": registration.etiv_mm3,
            "brain_mask_mm3": registration.brain_mask_mm3,
            "brain_outside_fov": registration.brain_outside_fov,
            "cut_faces": registration.cut_faces,
            "mutual_information": registration.mutual_information,
            "confidence": float(np.concatenate(list(confident.values())).mean()),
            "side_confidence": {side: float(values.mean()) for side, values in confident.items()},
            "side_agreement": agreement,
            "box_volumes_mm3": box_volumes,
            "correlation": registration.correlation,
            "scales": registration.scales.tolist(),
            **times,
        }

    def _box_in_scan(self, registration: Registration, side: str) -> tuple[np.ndarray, list[int]]:
        """The box's voxel-to-scan affine (RAS mm) and shape: 1 mm voxels along the head's own right, anterior and
        superior axes (the registration's rotation), centred on the side's hippocampus, `box_size` scaled to the
        head's size."""
        rotation = registration.rotation
        scale = abs(float(np.linalg.det(registration.matrix))) ** (1 / 3)
        shape = [int(round(n)) for n in self.box_size * scale]
        centre = registration(self.box_centers[side][None])[0]
        box_affine = np.eye(4)
        box_affine[:3, :3] = rotation
        box_affine[:3, 3] = centre - rotation @ (np.array(shape) - 1) / 2
        return box_affine, shape

    def _segment_box(self, head: sitk.Image, box_affine: np.ndarray, shape: list[int]) -> np.ndarray:
        """Softmax probabilities (3, *shape) on the box grid."""
        origin = (RAS_TO_LPS @ box_affine[:3, 3]).tolist()
        direction = (RAS_TO_LPS @ box_affine[:3, :3]).flatten().tolist()
        box = sitk.Resample(
            head, shape, sitk.Transform(), sitk.sitkLinear, origin, [1.0] * 3, direction, 0.0, sitk.sitkFloat32
        )

        # to the model the box is a 1 mm RAS image: its rotation in the scan is applied when pasting back
        array = torch.from_numpy(sitk.GetArrayFromImage(box).transpose(2, 1, 0).copy())
        data = self.box_preprocessing(
            {"image": MetaTensor(array[None], affine=torch.eye(4), meta={"original_channel_dim": 0})}
        )
        # fp16 on CUDA with `amp`, as the crop path's evaluator does (the inferer itself autocasts on CPU)
        with torch.no_grad(), torch.autocast("cuda", enabled=self.amp and self.device.type == "cuda"):
            logits = self.inferer(data["image"][None].to(self.device), self.network)
        data["pred"] = torch.softmax(logits[0].float(), 0).cpu()
        probabilities = Invertd("pred", self.box_preprocessing, orig_keys="image", nearest_interp=False)(data)["pred"]
        return np.asarray(probabilities, dtype=np.float32)

    def _agreement(self, head: sitk.Image, box_affine: np.ndarray, shape: list[int], hippocampus: np.ndarray) -> float:
        """Dice of `hippocampus` (the side's mask on the box grid) with that of the box moved by
        `agreement_shift_mm`, where the two boxes overlap."""
        shift = self.agreement_shift_mm
        moved = box_affine.copy()
        moved[:3, 3] += box_affine[:3, :3] @ shift
        shifted = self._segment_box(head, moved, shape).argmax(0) > 0
        # voxel v of the moved box is voxel v + shift of this one
        here = tuple(slice(max(s, 0), n + min(s, 0)) for s, n in zip(shift, shape))
        there = tuple(slice(max(-s, 0), n - max(s, 0)) for s, n in zip(shift, shape))
        a, b = hippocampus[here], shifted[there]
        return float(2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1))

    def _keep_largest_piece(self, probabilities: np.ndarray, side: str) -> np.ndarray:
        """Checks the side's hippocampus (1 mm box grid) and removes pieces apart from its largest one."""
        hippocampus = probabilities.argmax(0) > 0
        pieces, count = ndimage.label(hippocampus, structure=np.ones((3, 3, 3)))
        sizes = np.bincount(pieces.ravel())[1:]
        volume = float(sizes.sum())
        if volume < self.min_side_volume_mm3:
            raise HeadError(f"the {side} hippocampus segmentation is empty or too small ({volume:.0f} mm3)")
        largest = int(sizes.argmax()) + 1
        stray = 1 - sizes.max() / volume
        if stray > self.max_fragment_fraction:
            raise HeadError(
                f"the {side} hippocampus segmentation is fragmented: {count} pieces, "
                f"{100 * stray:.0f}% outside the largest"
            )
        outside = hippocampus & (pieces != largest)
        probabilities[1:, outside] = 0.0
        probabilities[0, outside] = 1.0
        return probabilities

    @staticmethod
    def _paste(
        probabilities: np.ndarray,
        box_affine: np.ndarray,
        affine: np.ndarray,
        labels: np.ndarray,
        foreground: np.ndarray,
        side_labels: tuple[int, int],
    ) -> None:
        """Interpolates box probabilities at the scan's voxels inside the box and writes the side's labels where
        its hippocampus is more likely than background and than the other side's."""
        whole_box = tuple(slice(0, n) for n in probabilities.shape[1:])
        channels = [
            sample_near(channel, box_affine, affine, labels.shape, whole_box, cval=1.0 if c == 0 else 0.0)
            for c, channel in enumerate(probabilities)
        ]
        if channels[0] is None:
            return
        region = channels[0][0]
        sampled = np.stack([samples for _, samples in channels])
        side_foreground = 1.0 - sampled[0]
        winner = (sampled.argmax(0) > 0) & (side_foreground > foreground[region])
        side = np.where(sampled[2] > sampled[1], side_labels[1], side_labels[0]).astype(np.uint8)
        labels[region] = np.where(winner, side, labels[region])
        foreground[region] = np.where(winner, side_foreground, foreground[region])
