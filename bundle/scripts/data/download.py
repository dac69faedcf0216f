"""Download MSD Task04_Hippocampus via monai.apps, failing fast and cleanly when offline."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from urllib.parse import urlparse

TASK = "Task04_Hippocampus"
CONNECT_TIMEOUT_S = 5.0  # connectivity check to the download host
SOCKET_TIMEOUT_S = 60.0  # per-read timeout during the download itself


def _check_reachable(url: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    parsed = urlparse(url)
    host = parsed.hostname
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise SystemExit(
            f"Cannot reach {host}:{port} to download {TASK} ({e.__class__.__name__}: {e}). "
            "Check the network, or use `python -m scripts.data.synthetic --output_dir DIR` for offline data."
        ) from None


def download(data_dir: str) -> str:
    """Download and extract MSD Task04_Hippocampus into `data_dir`/Task04_Hippocampus; returns that folder.

    Does nothing if the folder already holds dataset.json. Downloads into a temporary folder inside `data_dir`
    and moves the result into place only on success, so a failure leaves no partial folder or tar behind.
    """
    from monai.apps import download_and_extract
    from monai.apps.datasets import DecathlonDataset

    url = DecathlonDataset.resource[TASK]
    md5 = DecathlonDataset.md5[TASK]
    data_dir = os.path.abspath(os.path.expanduser(str(data_dir)))
    target = os.path.join(data_dir, TASK)
    if os.path.isfile(os.path.join(target, "dataset.json")):
        print(f"{TASK} already present at {target} (dataset.json found); nothing to do.")
        return target
    if os.path.exists(target):
        raise SystemExit(f"{target} exists but has no dataset.json; remove or move it, then retry.")

    _check_reachable(url)
    created_data_dir = not os.path.isdir(data_dir)
    os.makedirs(data_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{TASK}_download_", dir=data_dir)
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(SOCKET_TIMEOUT_S)
    ok = False
    try:
        download_and_extract(
            url, filepath=os.path.join(tmp, f"{TASK}.tar"), output_dir=tmp, hash_val=md5, hash_type="md5"
        )
        extracted = os.path.join(tmp, TASK)
        if not os.path.isfile(os.path.join(extracted, "dataset.json")):
            raise RuntimeError(f"archive did not contain {TASK}/dataset.json")
        os.replace(extracted, target)
        ok = True
    except Exception as e:  # network errors, hash mismatch, bad archive
        raise SystemExit(f"Download of {TASK} from {url} failed: {e.__class__.__name__}: {e}") from None
    finally:
        socket.setdefaulttimeout(old_timeout)
        shutil.rmtree(tmp, ignore_errors=True)
        if not ok and created_data_dir:
            try:
                os.rmdir(data_dir)  # only if we created it and it is still empty
            except OSError:
                pass
    print(f"{TASK} downloaded to {target}")
    return target


if __name__ == "__main__":
    import fire

    fire.Fire(download)
