"""Where the hippocampi of a real head lie: MONAI has neither brain extraction nor atlas registration, so deepbet
(a brain-extraction network that ships its weights) finds the brain and SimpleITK registers it to the MNI152 brain."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk  # noqa: N813 (SimpleITK's own convention)
import torch
import torch.nn.functional as F
from scripts.imaging import RAS_TO_LPS, nonzero_box, resample


class HeadError(ValueError):
    """A head that cannot be segmented reliably: the message is the reason reported for the case."""


class BrainExtraction:
    """deepbet 1.0.2 (Fisch et al. 2024, MIT; its TorchScript weights come inside its wheel) on a head resampled to
    1 mm in RAS voxel order, as it was trained, so thick slices and 0.5 mm scans look alike to it.

    Args:
        device: where deepbet's networks run.
        amp: mixed precision: fp16 on CUDA, bf16 on CPU (give it only where the CPU has native bf16).
        threshold: deepbet's probability threshold for the brain.
        grid_size: the side (voxels) of the cube the brain's box is resampled to for deepbet's large network
            (deepbet's own: 256).
    """

    def __init__(
        self, device: torch.device | str = "cpu", amp: bool = False, threshold: float = 0.5, grid_size: int = 256
    ) -> None:
        self.device = torch.device(device)
        self.amp = bool(amp)
        self.threshold = threshold
        self.grid_size = grid_size
        self._networks = None

    def _load(self):
        """deepbet's networks, loaded on first use so that runs without heads never read them."""
        if self._networks is None:
            from deepbet.bet import BrainExtraction as DeepBet

            self._networks = DeepBet(no_gpu=self.device.type != "cuda")
            for network in (self._networks.model, self._networks.bbox_model):
                network.to(self.device)
        return self._networks

    def __call__(self, head: sitk.Image) -> tuple[sitk.Image, sitk.Image]:
        """The head at 1 mm with its voxel axes along S, A, R and its brain mask (uint8) on the same grid."""
        # SimpleITK's arrays list axes last to first: this one's are along R, A, S, as deepbet was trained
        canonical = sitk.DICOMOrient(resample(head, 1.0), "SAR")
        array = sitk.GetArrayFromImage(canonical).astype(np.float32, copy=False)
        try:
            mask = self._brain(torch.from_numpy(array))
        except (AssertionError, ValueError):  # deepbet asserts (or fails in argmax) when it finds no brain at all
            raise HeadError("brain extraction found no brain (is this a T1-weighted head?)") from None
        result = sitk.GetImageFromArray(mask.astype(np.uint8))
        result.CopyInformation(canonical)
        return canonical, result

    @torch.no_grad()
    def _brain(self, image: torch.Tensor) -> np.ndarray:
        """deepbet's `run_model` and `postprocess` (a box from its small network at 128^3, the brain from its large
        one at `grid_size`^3 in the box), with the intensity percentiles from `kthvalue`: `torch.quantile` took 0.5 s.
        """
        from deepbet.utils import keep_largest_connected_component, normalize

        networks = self._load()
        image = torch.nan_to_num(image).to(self.device)
        autocast = torch.autocast(
            self.device.type, dtype=torch.float16 if self.device.type == "cuda" else torch.bfloat16, enabled=self.amp
        )
        small = F.interpolate(image[None, None], (128,) * 3, mode="nearest-exact")[0, 0]
        values = small.flatten()
        low, high = (values.kthvalue(int(round(q * (values.numel() - 1))) + 1).values for q in (0.005, 0.995))
        with autocast:
            box_probability = networks.bbox_model(normalize(small, low, high)[None, None])[0, 1].float()
        box_mask = keep_largest_connected_component((box_probability > 0.5).float().cpu().numpy())
        # deepbet's postprocess reads the box from its `bbox`
        networks.bbox = box = networks.get_bbox_with_margin(torch.from_numpy(box_mask), image.shape, 0.1)
        inside = F.interpolate(image[box][None, None], (self.grid_size,) * 3, mode="nearest-exact")[0, 0]
        with autocast:
            probability = networks.model(normalize(inside, low, high)[None, None])[0, 1].float()
        brain = torch.zeros_like(image)
        brain[box] = F.interpolate(probability[None, None], brain[box].shape, mode="nearest-exact")[0, 0]
        return networks.postprocess((brain > self.threshold).cpu().numpy())


# the world direction (RAS axis, sign) of each face of a field of view, in words
FACE_NAMES = {(0, 1): "right", (0, -1): "left", (1, 1): "front", (1, -1): "back", (2, 1): "top", (2, -1): "bottom"}


@dataclass
class Registration:
    """An affine map from template (MNI, RAS mm) to scan (RAS mm) points, how well the brains matched, and the
    intracranial volume measured on the scan: the brain mask's volume, None where the scan's field of view cuts the
    brain."""

    matrix: np.ndarray  # 3x3 linear part
    offset: np.ndarray  # translation
    mutual_information: float
    correlation: float  # of the registered brain with the template's: negative for a T2's contrast
    etiv_mm3: float | None
    brain_mask_mm3: float = 0.0  # deepbet's mask inside the field of view (the brain and its CSF)
    brain_outside_fov: float = 0.0  # the share of the registered template brain beyond the faces that cut the brain
    cut_faces: dict[str, float] = field(default_factory=dict)  # that share per face ("top", "left", ...)

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


def _normalised_brain(image: sitk.Image, mask: sitk.Image, spacing: float) -> tuple[sitk.Image, sitk.Image]:
    """The brain's intensities scaled to its 99th percentile (0 outside the mask), and the mask, at `spacing` mm,
    in the mask's bounding box with a margin of `spacing`."""
    inside = sitk.GetArrayViewFromImage(mask) > 0  # not empty: the eTIV range check comes first
    box = nonzero_box(inside)
    start = np.maximum([s.start - 2 for s in box], 0)[::-1]  # numpy z, y, x -> SimpleITK x, y, z
    size = np.minimum([s.stop + 2 for s in box], inside.shape)[::-1] - start
    image, mask = (sitk.RegionOfInterest(i, size.tolist(), start.tolist()) for i in (image, mask))
    values = sitk.GetArrayViewFromImage(image)[sitk.GetArrayViewFromImage(mask) > 0]
    high = float(np.percentile(values[:: max(1, values.size // 200_000)], 99)) or 1.0
    brain = sitk.Cast(sitk.Mask(image, sitk.Cast(mask, sitk.sitkUInt8)), sitk.sitkFloat32) / high
    return resample(brain, spacing), resample(sitk.Cast(mask, sitk.sitkFloat32), spacing) > 0.5


def field_of_view_cuts(
    head: sitk.Image, mask: sitk.Image, min_section: float = 0.1
) -> tuple[tuple[slice, ...], dict[tuple[int, int], str]]:
    """The scan's field of view on `head`'s grid (numpy slices: the box of its voxels that are not exactly zero, as a
    padded or conformed file holds a cut scan) and the faces of it that cut the brain: those where `mask`'s
    cross-section, within 3 voxels of the face, is at least `min_section` of its largest along that axis (a brain
    that ends inside the field of view, a skull-stripped one too, narrows to a few voxels there). Faces are
    {(SimpleITK axis, -1 for its first voxels or 1 for its last): name}."""
    box = nonzero_box(sitk.GetArrayViewFromImage(head) != 0)
    brain = sitk.GetArrayViewFromImage(mask)[box] > 0
    direction = np.asarray(head.GetDirection()).reshape(3, 3)
    faces = {}
    for axis in range(3):  # SimpleITK's axis; numpy's is 2 - axis
        sections = brain.sum(axis=tuple(a for a in range(3) if a != 2 - axis))
        if sections.size < 8 or sections.max() == 0:
            continue
        for side, near in ((-1, sections[:3]), (1, sections[-3:])):
            if near.max() >= min_section * sections.max():
                world = RAS_TO_LPS @ direction[:, axis] * side
                faces[(axis, side)] = FACE_NAMES[
                    (int(np.argmax(np.abs(world))), int(np.sign(world[np.argmax(np.abs(world))])))
                ]
    return box, faces


class TemplateRegistration:
    """An affine registration of a scan's extracted brain to the MNI152 2009a template's brain (the same network's
    mask of the template): centres of mass of the two masks; the best of 27 coarse rotations (0 and
    +-30 degrees about each axis, for tilted heads); a similarity, then an affine stage. Mattes mutual information
    near the template's brain, coarse to fine, fixed random sampling (deterministic). Neck, shoulders, fat or a
    missing skull do not reach the metric.

    Where the brain mask reaches a face of the scan's field of view (`field_of_view_cuts`) and at least
    `min_brain_outside` of the registered template brain lies beyond it, the field of view cuts the brain: the share
    beyond each cutting face is recorded and the eTIV is withheld (the registered template brain beyond the cut
    recovers only about half of the brain that is missing: docs/heads.md, "Fields of view that cut the brain"). Where
    the mask reaches a face and the whole-brain registration is implausible or its mutual information under
    `min_cut_mutual_information` (a slab), the part of the brain the scan holds is registered to the template
    instead (every voxel near the scan's brain in the metric, the template whole around it), after a search of
    translations along the cut axes (the held part's centre of mass is not the brain's).

    Args:
        template_file: the template T1 (any resolution; registration runs at `spacing`).
        brain_mask_file: the template's brain mask (`python -m tools.atlas build`).
        spacing: the finest registration grid, mm.
        min_mutual_information: below it the brain does not match the template's.
        min_correlation: below it the registered brain's intensities do not follow a T1's (e.g. a T2 or FLAIR).
        scale_range: allowed scaling of each axis, template to scan; a human brain lies well inside it.
        etiv_range_mm3: an eTIV outside it is no head's intracranial volume (a failed extraction).
        min_cut_section: a face of the field of view cuts the brain where the brain's cross-section near it is at
            least this share of its largest (`field_of_view_cuts`).
        min_brain_outside: a face cuts the brain where at least this share of the registered template brain lies
            beyond it (a field of view that grazes the brain moved the eTIV by under 1%).
        min_held_brain_mm3: less brain than this inside a cut field of view is too little to place the hippocampi.
        min_cut_mutual_information: a head whose brain the field of view may cut keeps its whole-brain registration
            only where the mutual information reaches this (real heads as acquired: 0.49-0.64); else it is
            registered by the part it holds.
    """

    def __init__(
        self,
        template_file: str,
        brain_mask_file: str,
        spacing: float = 2.0,
        min_mutual_information: float = 0.25,
        min_correlation: float = 0.2,
        scale_range: Sequence[float] = (0.7, 1.4),
        etiv_range_mm3: Sequence[float] = (600_000.0, 2_600_000.0),
        min_cut_section: float = 0.1,
        min_brain_outside: float = 0.005,
        min_held_brain_mm3: float = 300_000.0,
        min_cut_mutual_information: float = 0.4,
    ) -> None:
        self.template_file = template_file
        self.brain_mask_file = brain_mask_file
        self.spacing = spacing
        self.min_mutual_information = min_mutual_information
        self.min_correlation = min_correlation
        self.scale_range = tuple(scale_range)
        self.etiv_range_mm3 = tuple(etiv_range_mm3)
        self.min_cut_section = min_cut_section
        self.min_brain_outside = min_brain_outside
        self.min_held_brain_mm3 = min_held_brain_mm3
        self.min_cut_mutual_information = min_cut_mutual_information
        self.template: sitk.Image | None = None

    def _load_template(self) -> None:
        """Reads the template on first use, so that runs without heads never touch it."""
        template = sitk.ReadImage(self.template_file, sitk.sitkFloat32)
        mask = sitk.Resample(
            sitk.ReadImage(self.brain_mask_file, sitk.sitkUInt8),
            template,
            sitk.Transform(),
            sitk.sitkNearestNeighbor,
            0,
            sitk.sitkUInt8,
        )
        self.template, self.template_mask = _normalised_brain(template, mask, self.spacing)
        self.metric_mask = sitk.BinaryDilate(self.template_mask, [2] * 3)  # the brain's edge counts too
        self.brain = sitk.GetArrayFromImage(self.template_mask) > 0
        # the template brain's voxels as LPS points, for what of it a registered scan holds
        index = np.argwhere(self.brain)[:, ::-1].astype(np.float64)  # numpy z, y, x -> SimpleITK x, y, z
        grid = np.asarray(self.template_mask.GetDirection()).reshape(3, 3) * np.asarray(self.template_mask.GetSpacing())
        self.brain_points = index @ grid.T + np.asarray(self.template_mask.GetOrigin())

    def _method(self, images: tuple) -> sitk.ImageRegistrationMethod:
        """The metric of `images` (fixed, moving, fixed mask, dense): random samples of the fixed mask, or all of
        its voxels where `dense` (a held part of a brain: random samples of it placed cut heads at random)."""
        method = sitk.ImageRegistrationMethod()
        method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
        method.SetMetricSamplingStrategy(method.NONE if images[3] else method.RANDOM)
        method.SetMetricSamplingPercentage(0.1, 1)
        method.SetMetricFixedMask(images[2])
        method.SetInterpolator(sitk.sitkLinear)
        return method

    def _search(self, rigid: sitk.Euler3DTransform, images: tuple, steps: Sequence[int], scales: Sequence[float]):
        """Sets `rigid` to the best of an exhaustive grid (`steps` each way along each parameter, `scales` apart) at
        8 mm; `images` are (fixed, moving, fixed mask, dense)."""
        method = self._method(images)
        method.SetOptimizerAsExhaustive(numberOfSteps=list(steps), stepLength=1.0)
        method.SetOptimizerScales(list(scales))
        method.SetShrinkFactorsPerLevel([4])
        method.SetSmoothingSigmasPerLevel([4.0])
        method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        method.SetInitialTransform(rigid, inPlace=True)
        method.Execute(*images[:2])

    def _initial_rotation(self, rigid: sitk.Euler3DTransform, images: tuple) -> None:
        """Sets `rigid` to the best of 27 rotations (0 and +-30 degrees about each axis) at 8 mm: gradient descent
        alone misses heads tilted by more than about 30 degrees."""
        self._search(rigid, images, [1, 1, 1, 0, 0, 0], [np.pi / 6] * 3 + [1.0] * 3)

    def _stage(self, transform: sitk.Transform, images: tuple, shrink: list[int], sigmas: list[float]):
        method = self._method(images)
        method.SetMetricSamplingPercentagePerLevel([0.2 if level > 1 else 0.1 for level in shrink], 1)
        method.SetOptimizerAsRegularStepGradientDescent(
            learningRate=2.0, minStep=1e-3, numberOfIterations=50, relaxationFactor=0.5
        )
        method.SetOptimizerScalesFromPhysicalShift()
        method.SetShrinkFactorsPerLevel(shrink)
        method.SetSmoothingSigmasPerLevel(sigmas)
        method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        method.SetInitialTransform(transform, inPlace=True)
        method.Execute(*images[:2])
        return method

    def _similarity(self, images: tuple, masks: tuple, search_axes: Sequence[int]) -> sitk.AffineTransform:
        rigid = sitk.CenteredTransformInitializer(
            *(sitk.Cast(mask, sitk.sitkFloat32) for mask in masks),
            sitk.Euler3DTransform(),
            sitk.CenteredTransformInitializerFilter.MOMENTS,
        )
        if len(search_axes):
            self._search(
                rigid, images, [0, 0, 0, *(5 if a in search_axes else 0 for a in range(3))], [1.0] * 3 + [8.0] * 3
            )
        self._initial_rotation(rigid, images)
        similarity = sitk.Similarity3DTransform()
        similarity.SetCenter(rigid.GetCenter())
        similarity.SetMatrix(rigid.GetMatrix())
        similarity.SetTranslation(rigid.GetTranslation())
        self._stage(similarity, images, [4], [4.0])
        affine = sitk.AffineTransform(3)
        affine.SetCenter(similarity.GetCenter())
        affine.SetMatrix(similarity.GetMatrix())
        affine.SetTranslation(similarity.GetTranslation())
        return affine

    def _affine(self, images: tuple, masks: tuple, search_axes: Sequence[int] = ()):
        """The affine transform from `images[0]`'s (fixed) points to `images[1]`'s, its final method and the
        correlation of the registered brains over the fixed brain: from the centres of mass of `masks` (fixed,
        moving), translations along `search_axes` (LPS axes, +-40 mm), rotations and a similarity; then an affine
        stage at 4 and 2 mm."""
        affine = self._similarity(images, masks, search_axes)
        method = self._stage(affine, images, [2, 1], [2.0, 0.0])
        fixed, moving = images[:2]
        registered = sitk.GetArrayViewFromImage(sitk.Resample(moving, fixed, affine, sitk.sitkLinear, 0.0))
        inside = sitk.GetArrayViewFromImage(masks[0]) > 0
        correlation = float(np.corrcoef(registered[inside], sitk.GetArrayViewFromImage(fixed)[inside])[0, 1])
        return affine, method, correlation

    def __call__(self, head: sitk.Image, mask: sitk.Image) -> Registration:
        """Registers `head`'s brain, where `mask` (on the same grid, from `BrainExtraction`) is non-zero."""
        if self.template is None:
            self._load_template()
        box, candidates = field_of_view_cuts(head, mask, self.min_cut_section)
        held = sitk.GetArrayFromImage(mask)
        outside_box = np.ones(held.shape, dtype=bool)
        outside_box[box] = False
        if outside_box.any():  # what deepbet found in a padded file's zeros is no brain
            held[outside_box] = 0
            held = sitk.GetImageFromArray(held)
            held.CopyInformation(mask)
            mask = held
        brain_mask_mm3 = float(sitk.GetArrayViewFromImage(mask).sum()) * float(np.prod(mask.GetSpacing()))
        self._check_brain_volume(brain_mask_mm3, self.min_held_brain_mm3 if candidates else None)
        moving, moving_mask = _normalised_brain(head, mask, self.spacing)
        affine, method, correlation = self._affine(
            (self.template, moving, self.metric_mask, False), (self.template_mask, moving_mask)
        )
        # the transform maps template (fixed) LPS points to scan (moving) LPS points
        registration = self._registration(affine, method, correlation, brain_mask_mm3, head, box, candidates)
        whole_brain_failed = registration.mutual_information < self.min_cut_mutual_information
        if candidates and (whole_brain_failed or not self._plausible(registration)):
            # too little of the template's brain in the scan (a slab): what the scan holds, searched for along the
            # cut axes
            direction = np.asarray(head.GetDirection()).reshape(3, 3)
            axes = sorted({int(np.argmax(np.abs(direction[:, axis]))) for axis, _ in candidates})
            scan_to_template, method, correlation = self._affine(
                (moving, self.template, sitk.BinaryDilate(moving_mask, [2] * 3), True),
                (moving_mask, self.template_mask),
                axes,
            )
            registration = self._registration(
                scan_to_template.GetInverse(), method, correlation, brain_mask_mm3, head, box, candidates
            )
        if registration.etiv_mm3 is not None:
            self._check_brain_volume(brain_mask_mm3)
        self.check(registration)
        return registration

    def _check_brain_volume(self, brain_mm3: float, low: float | None = None) -> None:
        """A brain mask outside `etiv_range_mm3` (its lower end `low` where the field of view may cut the brain) is
        a failed extraction."""
        low, high = low or self.etiv_range_mm3[0], self.etiv_range_mm3[1]
        if not low <= brain_mm3 <= high:
            raise HeadError(
                f"brain extraction found {brain_mm3 / 1000:.0f} cm3 of brain, outside {low / 1000:.0f}-"
                f"{high / 1000:.0f} cm3 of a human head (is this a T1-weighted head?)"
            )

    def _plausible(self, registration: Registration) -> bool:
        try:
            self.check(registration)
        except HeadError:
            return False
        return True

    def _registration(self, affine, method, correlation, brain_mask_mm3, head, box, candidates) -> Registration:
        """The `Registration` of a template-to-scan `affine`, the faces of `candidates` beyond which at least
        `min_brain_outside` of its template brain lies counted as cutting the brain (eTIV None)."""
        matrix_lps = np.array(affine.GetMatrix()).reshape(3, 3)
        offset_lps = np.array(affine.TransformPoint((0.0, 0.0, 0.0)))
        beyond = self._beyond_faces(head, box, candidates, matrix_lps, offset_lps)
        shares = {name: float(points.mean()) for name, points in beyond.items()}
        cut = {name: share for name, share in shares.items() if share >= self.min_brain_outside}
        outside = float(np.any([beyond[name] for name in cut], axis=0).mean()) if cut else 0.0
        return Registration(
            RAS_TO_LPS @ matrix_lps @ RAS_TO_LPS,
            RAS_TO_LPS @ offset_lps,
            -float(method.GetMetricValue()),
            correlation,
            None if cut else brain_mask_mm3,
            brain_mask_mm3,
            outside,
            cut,
        )

    def _beyond_faces(self, head: sitk.Image, box, faces: dict, matrix_lps: np.ndarray, offset_lps: np.ndarray):
        """{face name: which of the registered template brain's points lie beyond that face of the field of view},
        for the candidate `faces` (`field_of_view_cuts`)."""
        if not faces:
            return {}
        grid = np.asarray(head.GetDirection()).reshape(3, 3) * np.asarray(head.GetSpacing())
        points = self.brain_points @ matrix_lps.T + offset_lps
        index = (points - np.asarray(head.GetOrigin())) @ np.linalg.inv(grid).T
        beyond = {}
        for (axis, side), name in faces.items():
            edge = box[2 - axis]
            hit = index[:, axis] < edge.start - 0.5 if side < 0 else index[:, axis] > edge.stop - 0.5
            beyond[name] = hit | beyond.get(name, False)
        return beyond

    def check(self, registration: Registration) -> None:
        if registration.mutual_information < self.min_mutual_information:
            raise HeadError(
                f"registration to the MNI152 brain failed: mutual information {registration.mutual_information:.3f} "
                f"< {self.min_mutual_information} (is this a T1-weighted head?)"
            )
        if not registration.correlation >= self.min_correlation:
            raise HeadError(
                f"the brain does not look like a T1 after registration: correlation with the T1 template "
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
