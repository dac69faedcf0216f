"""Any file a folder holds: headers of a synthetic crop and head mutated field by field, truncated and with a wrong
magic or a gzip stream that ends early (a seeded campaign of a few hundred files), each refused by name before its
voxels are read, named as unreadable, or read as a sane image; a sample of them beside good crops through the
command line, in bounded memory."""

import gzip
import os
import sys
import tracemalloc

import nibabel as nib
import numpy as np
import pytest

from conftest import template_crop
from scripts.data.headers import MAX_VOXELS, HeaderError, check_header
from scripts.inference.cases import failure_reason, time_limit
from scripts.labels import mask_name
from test_inference import run_inference

# (field, index or None, values): each value in turn, one field at a time
FIELDS = [
    ("dim", 0, [0, -1, 2, 8]),
    *[("dim", i, [0, -1, 32767]) for i in (1, 2, 3)],
    ("dim", 4, [0, -1, 32767]),
    ("datatype", None, [0, -1, 1, 32, 128, 2304]),
    ("bitpix", None, [0, -1, 128]),
    *[("pixdim", i, [0.0, -1.0, np.nan, 1e30]) for i in (1, 2, 3)],
    ("pixdim", 0, [0.0, np.nan]),
    ("vox_offset", None, [0.0, -1.0, np.nan, 1e9]),
    ("scl_slope", None, [0.0, np.nan, np.inf, 1e30]),
    ("scl_inter", None, [np.nan, np.inf]),
    ("quatern_b", None, [np.nan, 2.0]),
    ("qoffset_x", None, [np.nan, 1e30]),
    *[("srow_x", i, [0.0, np.nan, 1e30]) for i in (0, 1, 2)],
    ("srow_z", 3, [np.nan]),
    ("sform_code", None, [-1, 99]),
    ("qform_code", None, [-1]),
    ("sizeof_hdr", None, [0, -1, 540]),
    ("magic", None, [b"xxxx", b"ni1\x00"]),
]
RANDOM_COPIES = 40  # per base file: 1-4 random header bytes set to random values
MAX_TRACED_BYTES = 64 * 2**20  # what reading any one of these files may allocate (the good ones hold under 1 MB)
BASELINE_HEADROOM_KB = 2 * 2**20  # a run with hostile files may take this much more memory than one without


def _base_images():
    """A Task04-like crop of the template and a small whole head (the template at 4 mm), both float32."""
    from tools.head_check import TEMPLATE, resampled

    template = nib.load(TEMPLATE)
    head = resampled(template, (4.0, 4.0, 4.0))
    return {
        "crop": nib.Nifti1Image(template_crop(), np.diag([1.0, 1.0, 1.0, 1.0])),
        "head": nib.Nifti1Image(head.get_fdata(dtype=np.float32), head.affine),
    }


def _raw(image: nib.Nifti1Image, header: nib.Nifti1Header) -> bytes:
    """A single-file NIfTI's bytes: `header` as given (no validation) and the image's voxels after it."""
    data = np.asarray(image.dataobj, dtype=np.float32).tobytes(order="F")
    return header.binaryblock + b"\x00" * 4 + data


def hostile_files(folder, seed: int = 0) -> dict[str, str]:
    """Writes the campaign's files to `folder`: {file name: what was done}."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    made = {}

    def write(name: str, raw: bytes, what: str, compress: bool = True) -> None:
        path = os.path.join(folder, name + (".nii.gz" if compress else ".nii"))
        with open(path, "wb") as f:
            f.write(gzip.compress(raw, compresslevel=1, mtime=0) if compress else raw)
        made[os.path.basename(path)] = what

    for base, image in _base_images().items():
        header = image.header.copy()
        header.set_data_dtype(np.float32)
        header["vox_offset"] = 352
        good = _raw(image, header)
        for field, index, values in FIELDS:
            for value in values:
                mutated = image.header.copy()
                mutated.set_data_dtype(np.float32)
                mutated["vox_offset"] = 352
                if index is None:
                    mutated[field] = value
                else:
                    mutated[field][index] = value
                write(f"{base}_{field}{'' if index is None else index}_{value!s}", _raw(image, mutated), field)
        for offset in (1, 10, 100, 347, 348, 352, 452, len(good) // 2, len(good) - 1):
            write(f"{base}_truncated_{offset}", good[:offset], f"cut at byte {offset}", compress=offset % 2 == 0)
        compressed = gzip.compress(good, compresslevel=1, mtime=0)
        for offset in (10, 30, len(compressed) // 2, len(compressed) - 8, len(compressed) - 1):
            path = os.path.join(folder, f"{base}_gzip_ends_at_{offset}.nii.gz")
            with open(path, "wb") as f:
                f.write(compressed[:offset])
            made[os.path.basename(path)] = f"gzip cut at byte {offset}"
        for copy in range(RANDOM_COPIES):
            raw = bytearray(good)
            for _ in range(int(rng.integers(1, 5))):
                raw[int(rng.integers(0, 348))] = int(rng.integers(0, 256))
            write(f"{base}_random_{copy}", bytes(raw), "random header bytes")
        write(f"{base}_good", good, "unchanged")
    return made


def _read_like_inference(path: str):
    """The inference preprocessing's reading steps: the header check, then MONAI's LoadImaged and its checks."""
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    from scripts.data.transforms import RejectInvalidImaged

    check_header(path, MAX_VOXELS)
    return Compose([LoadImaged("image"), EnsureChannelFirstd("image"), RejectInvalidImaged("image")])({"image": path})[
        "image"
    ]


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    return folder, hostile_files(str(folder))


def test_every_hostile_file_is_refused_named_or_read_as_a_sane_image(campaign):
    folder, made = campaign
    assert len(made) > 250
    outcomes = {"refused": 0, "unreadable": 0, "read": 0}
    for name in sorted(made):
        path = str(folder / name)
        tracemalloc.start()
        try:
            with time_limit(10):
                image = _read_like_inference(path)
        except HeaderError:
            outcomes["refused"] += 1
            continue
        except Exception as e:  # named by the run as `failure_reason` words it
            reason = failure_reason(e)
            assert reason and "no message" not in reason, (name, made[name], repr(e))
            outcomes["unreadable"] += 1
            continue
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert peak < MAX_TRACED_BYTES, (name, made[name], peak)
        outcomes["read"] += 1
        affine = np.asarray(image.affine, dtype=np.float64)
        assert image.ndim == 4 and image.shape[0] == 1, (name, image.shape)
        assert np.isfinite(affine).all() and abs(np.linalg.det(affine[:3, :3])) > 1e-6, (name, affine)
        assert bool(np.isfinite(np.asarray(image)).all()), name
    assert outcomes["refused"] > 50 and outcomes["read"] > 2, outcomes
    assert "crop_good.nii.gz" in made and "head_good.nii.gz" in made


# runs the command after it and prints its largest resident memory (kB), measured in a process of its own
MEASURE_PEAK_RSS = (
    sys.executable,
    "-c",
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
    "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
    "sys.exit(r.returncode)",
)


def _inference(input_dir, output_dir):
    """The single-model inference command line on `input_dir` and its peak resident memory (kB)."""
    result = run_inference(input_dir, output_dir, "--ensemble", "false", "--report", "false", prefix=MEASURE_PEAK_RSS)
    peak = [line for line in result.stderr.splitlines() if line.startswith("PEAK_RSS_KB")][-1]
    return result, int(peak.split()[1])


def test_hostile_files_beside_good_crops_through_the_command_line(campaign, tmp_path):
    folder, made = campaign
    good_dir, mixed = tmp_path / "good", tmp_path / "mixed"
    good_dir.mkdir()
    mixed.mkdir()
    crop = (folder / "crop_good.nii.gz").read_bytes()
    good_names = ["crop.nii.gz", "a crop with spaces.nii.gz", "-leading-dash.nii.gz", "crop_ünïcode.nii.gz"]
    for name in good_names:
        (good_dir / name).write_bytes(crop)
        (mixed / name).write_bytes(crop)
    rng = np.random.default_rng(1)
    hostile = sorted(name for name in made if not name.endswith("_good.nii.gz"))
    sample = [hostile[i] for i in rng.choice(len(hostile), 16, replace=False)]
    for name in sample:
        (mixed / name).write_bytes((folder / name).read_bytes())
    # the file: a header that claims 1500^3 float32 voxels (13.5 GB) over 4 KB of data
    liar = nib.Nifti1Header()
    liar.set_data_dtype(np.float32)
    liar.set_data_shape((1500, 1500, 1500))
    (mixed / "liar_1500cubed.nii.gz").write_bytes(gzip.compress(liar.binaryblock + b"\x00" * 4 + b"x" * 4096))
    (mixed / "empty.nii.gz").write_bytes(b"")
    os.symlink(tmp_path / "nowhere.nii.gz", mixed / "dangling.nii.gz")

    baseline, baseline_kb = _inference(good_dir, tmp_path / "good_out")
    assert baseline.returncode == 0, baseline.stderr[-3000:]
    result, peak_kb = _inference(mixed, tmp_path / "mixed_out")
    log = result.stdout + result.stderr
    assert "Traceback" not in log, log[-5000:]
    assert result.returncode == 1
    failed_lines = [line for line in log.splitlines() if "FAILED" in line]
    written = {name for name in os.listdir(tmp_path / "mixed_out") if name.endswith("_seg.nii.gz")}
    for name in good_names:
        assert mask_name(name) in written, (name, log[-3000:])
    for name in [*sample, "liar_1500cubed.nii.gz", "empty.nii.gz", "dangling.nii.gz"]:
        if mask_name(name) in written:
            continue  # a mutation that leaves a readable image is segmented
        assert any(name in line for line in failed_lines), (name, made.get(name), log[-3000:])
    assert any("liar_1500cubed.nii.gz" in line and "max_voxels" in line for line in failed_lines), failed_lines
    assert peak_kb < baseline_kb + BASELINE_HEADROOM_KB, (peak_kb, baseline_kb)
