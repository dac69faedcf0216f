"""Whole-head T1 inputs: MONAI has no atlas registration, so SimpleITK places each head on the MNI152 template and
the model segments one box per hippocampus, cut from the head and mapped back to its grid."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.transforms import Compose, EnsureChannelFirstd, Invertd, LoadImaged, SaveImage
from scipy import ndimage

from scripts import BUNDLE_DIR
from scripts.transforms import RejectInvalidImaged

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
# FreeSurfer's eTIV calibration for MNI305 space, where the ICBM152 2009a template also lies (Buckner et al. 2004):
# eTIV = constant / atlas scaling factor, the scaling factor being det(subject -> template).
ETIV_CONSTANT_MM3 = 1948106.0
SIDES = ("left", "right")
HEAD_LABELS = {"left": (1, 2), "right": (3, 4)}  # (anterior, posterior) for each side


class HeadError(ValueError):
    """A head that cannot be segmented reliably: the message is the reason reported for the case."""


def field_of_view_mm(path: str) -> np.ndarray:
    """The physical extent (mm) of each axis of a NIfTI file or DICOM series folder, from its header alone."""
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


def to_sitk(image: MetaTensor) -> sitk.Image:
    """A channel-first MONAI image (RAS affine) as a SimpleITK image (LPS physical space) with the same voxels."""
    array = image[0].detach().cpu().numpy().astype(np.float32)
    affine = RAS_TO_LPS @ np.asarray(image.affine, dtype=np.float64)[:3, :4]
    spacing = np.linalg.norm(affine[:, :3], axis=0)
    result = sitk.GetImageFromArray(array.transpose(2, 1, 0))
    result.SetSpacing(spacing.tolist())
    result.SetDirection((affine[:, :3] / spacing).flatten().tolist())
    result.SetOrigin(affine[:, 3].tolist())
    return result


def resample_isotropic(image: sitk.Image, spacing: float, interpolator=sitk.sitkLinear) -> sitk.Image:
    """`image` smoothed (anti-aliasing) and resampled to `spacing` mm in its own orientation."""
    sigmas = [max(spacing - s, 0.0) / 2 for s in image.GetSpacing()]
    if interpolator == sitk.sitkLinear and max(sigmas) > 0:
        image = sitk.SmoothingRecursiveGaussian(image, [max(s, 1e-3) for s in sigmas])
    size = [max(1, int(round(n * s / spacing))) for n, s in zip(image.GetSize(), image.GetSpacing())]
    return sitk.Resample(image, size, sitk.Transform(), interpolator, image.GetOrigin(), [spacing] * 3,
                         image.GetDirection(), 0.0, image.GetPixelID())


@dataclass
class Registration:
    """An affine map from template (MNI, RAS mm) to scan (RAS mm) points, and how well the images matched."""

    matrix: np.ndarray  # 3x3 linear part
    offset: np.ndarray  # translation
    mutual_information: float
    correlation: float  # of the registered head with the template in the brain: negative for a T2's contrast

    def __call__(self, points_mni: np.ndarray) -> np.ndarray:
        return points_mni @ self.matrix.T + self.offset

    @property
    def scales(self) -> np.ndarray:
        return np.linalg.svd(self.matrix, compute_uv=False)

    @property
    def rotation(self) -> np.ndarray:
        """The rotation closest to the linear part (polar decomposition)."""
        u, _, vt = np.linalg.svd(self.matrix)
        return u @ vt

    @property
    def etiv_mm3(self) -> float:
        """Estimated total intracranial volume from the atlas scaling factor (Buckner et al. 2004)."""
        return ETIV_CONSTANT_MM3 * abs(float(np.linalg.det(self.matrix)))


class TemplateRegistration:
    """Affine registration of a head to the MNI152 2009a T1 template: centres of mass; similarity stages from the
    header's orientation and from the best of 27 coarse rotations, the better kept; an affine stage. Mattes mutual
    information within the template's head mask, coarse to fine (8, 4, 2 mm), fixed random sampling (deterministic).

    Args:
        template_file: the template T1 (any resolution; registration runs at `spacing`).
        mask_file: where the metric is sampled on the template (brain and skull, not neck or background), 2 in the
            brain, where the T1 check correlates the registered head with the template.
        spacing: the finest registration grid, mm.
        min_mutual_information: below it the head does not match the template (noise, no head).
        min_correlation: below it the registered head's intensities do not follow a T1's (e.g. a T2 or FLAIR).
        scale_range: allowed scaling of each axis, template to scan; a human head lies well inside it.
    """

    def __init__(self, template_file: str, mask_file: str, spacing: float = 2.0, min_mutual_information: float = 0.15,
                 min_correlation: float = 0.2, scale_range: Sequence[float] = (0.7, 1.4)) -> None:
        self.spacing = spacing
        self.min_mutual_information = min_mutual_information
        self.min_correlation = min_correlation
        self.scale_range = tuple(scale_range)
        self.template_file = template_file
        self.mask_file = mask_file
        self.template: sitk.Image | None = None
        self.mask: sitk.Image | None = None
        self.brain: np.ndarray | None = None

    def _load_template(self) -> None:
        """Reads the template on first use, so that runs without heads never touch it."""
        self.template = resample_isotropic(sitk.ReadImage(self.template_file, sitk.sitkFloat32), self.spacing)
        labels = sitk.Resample(sitk.ReadImage(self.mask_file, sitk.sitkUInt8), self.template, sitk.Transform(),
                               sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        self.mask = labels > 0
        self.brain = sitk.GetArrayFromImage(labels) == 2

    def _method(self) -> sitk.ImageRegistrationMethod:
        method = sitk.ImageRegistrationMethod()
        method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
        method.SetMetricSamplingStrategy(method.RANDOM)
        method.SetMetricSamplingPercentage(0.1, 1)
        method.SetMetricFixedMask(self.mask)
        method.SetInterpolator(sitk.sitkLinear)
        return method

    def _initial_rotation(self, rigid: sitk.Euler3DTransform, moving: sitk.Image) -> None:
        """Sets `rigid` to the best of 27 rotations (0 and +-30 degrees about each axis) at 8 mm: gradient descent
        alone misses heads tilted by more than about 30 degrees."""
        method = self._method()
        method.SetOptimizerAsExhaustive(numberOfSteps=[1, 1, 1, 0, 0, 0], stepLength=np.pi / 6)
        method.SetOptimizerScales([1.0] * 6)
        method.SetShrinkFactorsPerLevel([4])
        method.SetSmoothingSigmasPerLevel([4.0])
        method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        method.SetInitialTransform(rigid, inPlace=True)
        method.Execute(self.template, moving)

    def _stage(self, transform: sitk.Transform, moving: sitk.Image, shrink: list[int], sigmas: list[float]):
        method = self._method()
        method.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3, numberOfIterations=100,
                                                        relaxationFactor=0.5)
        method.SetOptimizerScalesFromPhysicalShift()
        method.SetShrinkFactorsPerLevel(shrink)
        method.SetSmoothingSigmasPerLevel(sigmas)
        method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        method.SetInitialTransform(transform, inPlace=True)
        method.Execute(self.template, moving)
        return method

    def __call__(self, image: sitk.Image) -> Registration:
        if self.template is None:
            self._load_template()
        moving = resample_isotropic(image, self.spacing) if min(image.GetSpacing()) < self.spacing * 0.95 else image
        start = sitk.CenteredTransformInitializer(
            self.template, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS
        )
        rotated = sitk.Euler3DTransform(start)
        self._initial_rotation(rotated, moving)
        candidates = []
        for rigid in (start, rotated):  # the header's orientation, and the best coarse rotation: the better one wins
            similarity = sitk.Similarity3DTransform()
            similarity.SetCenter(rigid.GetCenter())
            similarity.SetMatrix(rigid.GetMatrix())
            similarity.SetTranslation(rigid.GetTranslation())
            candidates.append((self._stage(similarity, moving, [4, 2], [4.0, 2.0]).GetMetricValue(), similarity))
        similarity = min(candidates, key=lambda candidate: candidate[0])[1]
        affine = sitk.AffineTransform(3)
        affine.SetCenter(similarity.GetCenter())
        affine.SetMatrix(similarity.GetMatrix())
        affine.SetTranslation(similarity.GetTranslation())
        method = self._stage(affine, moving, [2, 1], [2.0, 0.0])
        # the transform maps template (fixed) LPS points to scan (moving) LPS points; express it in RAS
        matrix_lps = np.array(affine.GetMatrix()).reshape(3, 3)
        offset_lps = np.array(affine.TransformPoint((0.0, 0.0, 0.0)))
        registered = sitk.GetArrayViewFromImage(sitk.Resample(moving, self.template, affine, sitk.sitkLinear, 0.0))
        template = sitk.GetArrayViewFromImage(self.template)
        correlation = float(np.corrcoef(registered[self.brain], template[self.brain])[0, 1])
        registration = Registration(RAS_TO_LPS @ matrix_lps @ RAS_TO_LPS, RAS_TO_LPS @ offset_lps,
                                    -float(method.GetMetricValue()), correlation)
        self.check(registration)
        return registration

    def check(self, registration: Registration) -> None:
        if registration.mutual_information < self.min_mutual_information:
            raise HeadError(
                f"registration to the MNI152 template failed: mutual information {registration.mutual_information:.3f} "
                f"< {self.min_mutual_information} (is this a T1-weighted head?)"
            )
        if registration.correlation < self.min_correlation:
            raise HeadError(
                f"the head does not look like a T1 after registration: correlation with the T1 template "
                f"{registration.correlation:.2f} < {self.min_correlation}"
            )
        if np.linalg.det(registration.matrix) <= 0:
            raise HeadError("registration to the MNI152 template mirrors the head (is its header's left-right wrong?)")
        low, high = self.scale_range
        scales = registration.scales
        if scales.min() < low or scales.max() > high:
            raise HeadError(
                f"registration to the MNI152 template is implausible: scaling {np.round(scales, 2).tolist()} "
                f"outside [{low}, {high}] of a human head"
            )


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
        registration: a `TemplateRegistration`.
        box_centers: `{"left": [x, y, z], "right": [x, y, z]}`, MNI mm.
        box_size: box side lengths in mm for a head of the template's size.
        output_dir: where masks are written.
        data_root_dir: the input folder, whose sub-folders the masks' folders mirror.
        device: where the network runs.
        amp: fp16 autocast on CUDA.
        min_side_volume_mm3: a side whose hippocampus is smaller is reported as failed (empty segmentation).
        max_fragment_fraction: a side whose pieces beyond the largest hold more of it is reported as fragmented;
            smaller pieces are removed.
        min_box_coverage: the fraction of each box that must lie inside the scan's field of view.
    """

    def __init__(self, network: torch.nn.Module, inferer: Inferer, preprocessing: Compose,
                 registration: TemplateRegistration, box_centers: Mapping[str, Sequence[float]],
                 box_size: Sequence[float], output_dir: str, data_root_dir: str = "",
                 device: torch.device | str = "cpu", amp: bool = False,
                 min_side_volume_mm3: float = 1000.0, max_fragment_fraction: float = 0.1,
                 min_box_coverage: float = 0.9) -> None:
        self.network = network
        self.inferer = inferer
        self.box_preprocessing = Compose([t for t in preprocessing.transforms if not isinstance(t, LoadImaged)])
        self.registration = registration
        self.box_centers = {side: np.asarray(box_centers[side], dtype=np.float64) for side in SIDES}
        self.box_size = np.asarray(box_size, dtype=np.float64)
        self.device = torch.device(device)
        self.amp = amp
        self.min_side_volume_mm3 = min_side_volume_mm3
        self.max_fragment_fraction = max_fragment_fraction
        self.min_box_coverage = min_box_coverage
        self.load = Compose([LoadImaged("image"), EnsureChannelFirstd("image"), RejectInvalidImaged("image")])
        self.save = SaveImage(output_dir=output_dir, data_root_dir=data_root_dir, output_postfix="seg",
                              output_ext=".nii.gz", output_dtype=np.uint8, separate_folder=False, resample=False,
                              print_log=False)

    def __call__(self, path: str) -> dict:
        """Segments one head; returns its eTIV, registration details and time split. Raises for a bad case."""
        times = {}
        start = time.perf_counter()
        image = self.load({"image": path})["image"]
        head = to_sitk(image)
        times["read_s"] = time.perf_counter() - start

        start = time.perf_counter()
        registration = self.registration(head)
        times["registration_s"] = time.perf_counter() - start

        start = time.perf_counter()
        affine = np.asarray(image.affine, dtype=np.float64)
        labels = np.zeros(image.shape[1:], dtype=np.uint8)
        foreground = np.zeros(image.shape[1:], dtype=np.float32)
        confident = []  # top-class probabilities inside each box's hippocampus, as the model gave them (1 mm)
        for side in SIDES:
            box_affine, box_shape = self._box_in_scan(registration, side)
            probabilities = self._segment_box(head, box_affine, box_shape, side)
            confident.append(probabilities.max(0)[probabilities.argmax(0) > 0])
            self._paste(probabilities, box_affine, affine, labels, foreground, HEAD_LABELS[side])
        times["segmentation_s"] = time.perf_counter() - start

        start = time.perf_counter()
        self.save(MetaTensor(torch.from_numpy(labels)[None], meta=image.meta))
        times["writing_s"] = time.perf_counter() - start
        return {"etiv_mm3": registration.etiv_mm3, "mutual_information": registration.mutual_information,
                "confidence": float(np.concatenate(confident).mean()),
                "correlation": registration.correlation,
                "scales": registration.scales.tolist(), **times}

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

    def _segment_box(self, head: sitk.Image, box_affine: np.ndarray, shape: list[int], side: str) -> np.ndarray:
        """Softmax probabilities (3, *shape) on the box grid."""
        origin = (RAS_TO_LPS @ box_affine[:3, 3]).tolist()
        direction = (RAS_TO_LPS @ box_affine[:3, :3]).flatten().tolist()
        box = sitk.Resample(head, shape, sitk.Transform(), sitk.sitkLinear, origin, [1.0] * 3, direction, 0.0,
                            sitk.sitkFloat32)
        ones = sitk.Image(head.GetSize(), sitk.sitkUInt8) + 1
        ones.CopyInformation(head)
        inside = sitk.Resample(ones, shape, sitk.Transform(), sitk.sitkNearestNeighbor, origin, [1.0] * 3, direction, 0,
                               sitk.sitkUInt8)
        coverage = float(sitk.GetArrayViewFromImage(inside).mean())
        if coverage < self.min_box_coverage:
            raise HeadError(f"the {side} hippocampus box lies {100 * (1 - coverage):.0f}% outside the image")

        # to the model the box is a 1 mm RAS image: its rotation in the scan is applied when pasting back
        array = torch.from_numpy(sitk.GetArrayFromImage(box).transpose(2, 1, 0).copy())
        data = self.box_preprocessing({"image": MetaTensor(array[None], affine=torch.eye(4),
                                                           meta={"original_channel_dim": 0})})
        # fp16 on CUDA with `amp`, as the crop path's evaluator does (the inferer itself autocasts on CPU)
        with torch.no_grad(), torch.autocast("cuda", enabled=self.amp and self.device.type == "cuda"):
            logits = self.inferer(data["image"][None].to(self.device), self.network)
        data["pred"] = torch.softmax(logits[0].float(), 0).cpu()
        probabilities = Invertd("pred", self.box_preprocessing, orig_keys="image", nearest_interp=False)(data)["pred"]
        return self._keep_largest_piece(np.asarray(probabilities, dtype=np.float32), side)

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
            raise HeadError(f"the {side} hippocampus segmentation is fragmented: {count} pieces, "
                            f"{100 * stray:.0f}% outside the largest")
        outside = hippocampus & (pieces != largest)
        probabilities[1:, outside] = 0.0
        probabilities[0, outside] = 1.0
        return probabilities

    @staticmethod
    def _paste(probabilities: np.ndarray, box_affine: np.ndarray, affine: np.ndarray, labels: np.ndarray,
               foreground: np.ndarray, side_labels: tuple[int, int]) -> None:
        """Interpolates box probabilities at the scan's voxels inside the box and writes the side's labels where
        its hippocampus is more likely than background and than the other side's."""
        box_shape = np.array(probabilities.shape[1:])
        corners = np.array([[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)]) * (box_shape - 1)
        voxels = nib.affines.apply_affine(np.linalg.inv(affine) @ box_affine, corners)
        start = np.clip(np.floor(voxels.min(0)).astype(int), 0, labels.shape)
        stop = np.clip(np.ceil(voxels.max(0)).astype(int) + 1, 0, labels.shape)
        if np.any(stop <= start):
            return
        grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(start, stop)], indexing="ij"), -1)
        points = nib.affines.apply_affine(np.linalg.inv(box_affine) @ affine, grid.reshape(-1, 3))  # box voxels
        sampled = np.stack([
            ndimage.map_coordinates(channel, points.T, order=1, mode="constant", cval=1.0 if c == 0 else 0.0)
            for c, channel in enumerate(probabilities)
        ]).reshape(len(probabilities), *grid.shape[:3])
        region = tuple(slice(a, b) for a, b in zip(start, stop))
        side_foreground = 1.0 - sampled[0]
        winner = (sampled.argmax(0) > 0) & (side_foreground > foreground[region])
        side = np.where(sampled[2] > sampled[1], side_labels[1], side_labels[0]).astype(np.uint8)
        labels[region] = np.where(winner, side, labels[region])
        foreground[region] = np.where(winner, side_foreground, foreground[region])


def configured_segmenter(config_file: str, output_dir: str) -> HeadSegmenter:
    """The head segmenter of an inference config, with its weights loaded, writing to `output_dir` (no input folder
    to mirror): for the commands that segment heads outside a bundle run (`scripts.atlas`, `scripts.head_check`)."""
    from scripts.recipe import load

    parser = load(BUNDLE_DIR, [config_file], {"output_dir": output_dir, "head#segmenter#data_root_dir": ""})
    parser.get_parsed_content("handlers")  # its checkpoint loader puts the weights into the network
    return parser.get_parsed_content("head#segmenter")
