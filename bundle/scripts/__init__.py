"""Python that MONAI lacks for this bundle; importable as `scripts` when run from the bundle folder."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from typing import IO

BUNDLE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METADATA_FILE = os.path.join(BUNDLE_DIR, "configs", "metadata.json")
# MONAI warns at every image loader's creation that nvImageCodec (a CUDA DICOM decoder) is missing: not news to a user
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register")


class BundleError(Exception):
    """A problem with the user's input (a file, a folder, a flag) that the message explains in full.

    It is an ordinary exception for a host that runs the workflow in its own process (MONAI Label, MONAI Deploy);
    on the command line, where MONAI wraps it in `Failed to evaluate ...` errors, `python -m monai.bundle` prints
    only its message and exits with status 1.
    """


def find_bundle_error(error: BaseException | None) -> BundleError | None:
    """The BundleError that caused `error` (MONAI wraps errors of configs in its own), if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, BundleError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _print_bundle_errors(kind: type, error: BaseException, traceback) -> None:
    cause = find_bundle_error(error)
    if cause is None:
        _default_excepthook(kind, error, traceback)
    else:
        print(f"error: {cause}", file=sys.stderr)


_default_excepthook = sys.excepthook
sys.excepthook = _print_bundle_errors


def read_metadata(metadata_file: str = METADATA_FILE) -> dict:
    """The bundle's metadata (configs/metadata.json): its name, version, changelog."""
    with open(metadata_file, encoding="utf-8") as f:
        return json.load(f)


def as_bool(value: object) -> bool:
    """A config flag as a bool: command-line overrides such as `--amp false` arrive as strings."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off", ""):
            return False
        raise ValueError(f"expected true or false, got {value!r}.")
    return bool(value)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb", exclusive: bool = False) -> Iterator[IO]:
    """Write `path` through a temporary file in the same folder and a rename: readers (and a process killed
    while writing) never see a partial file. The folder must exist. With `exclusive`, a file already at `path`
    stays: of processes writing it at once, the first to finish writes it (a hard link, which never replaces)."""
    fd, tmp = tempfile.mkstemp(
        dir=os.path.dirname(os.path.abspath(path)), prefix=f".{os.path.basename(path)}.", suffix=".tmp"
    )
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        if not exclusive:
            os.replace(tmp, path)
        elif not os.path.exists(path):
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            except OSError:  # a file system without hard links: the same content, replaced atomically
                os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
