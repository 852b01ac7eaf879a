"""Download public datasets with checksum verification into a cache.

Only archives whose checksums are published by their authors are listed. A download goes to a
temporary file that is renamed only after its MD5 matches, so a cut connection or an HTML error
page never ends up looking like a dataset.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.request
from collections.abc import Callable
from pathlib import Path

from cxrtool.errors import DataError, UnknownNameError

_ZENODO = "https://zenodo.org/records/10519652/files/{}?download=1"

#: name -> (url, md5, description); MD5s as published in MedMNIST's INFO (medmnist/info.py)
DATASETS: dict[str, tuple[str, str, str]] = {
    "pneumoniamnist": (_ZENODO.format("pneumoniamnist.npz"), "28209eda62fecd6e6a2d98b1501bb15f",
                       "PneumoniaMNIST 28 px (MedMNIST v2, CC BY 4.0): 4,708 train / 524 val / 624 test"),
    "pneumoniamnist_64": (_ZENODO.format("pneumoniamnist_64.npz"), "8f4eceb4ccffa70c672198ea285246c6",
                          "PneumoniaMNIST 64 px (MedMNIST+, CC BY 4.0)"),
    "chestmnist": (_ZENODO.format("chestmnist.npz"), "02c8a6516a18b556561a56cbdd36c4a8",
                   "ChestMNIST 28 px (NIH ChestX-ray14, 14 multi-label findings)"),
}


def cache_dir() -> Path:
    env = os.environ.get("CXRTOOL_DATA_DIR")
    return Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cxrtool" / "data"


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(name: str, dest_dir: Path | None = None, progress: Callable[[int, int | None], None] | None = None) -> Path:
    """Download dataset ``name`` (or reuse a verified cached copy); returns the file path."""
    if name not in DATASETS:
        raise UnknownNameError("dataset", name, list(DATASETS))
    url, md5, _ = DATASETS[name]
    dest_dir = dest_dir or cache_dir()
    dest = dest_dir / f"{name}.npz"
    if dest.is_file() and md5sum(dest) == md5:
        return dest
    dest_dir.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".npz.part")
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as fh:
            total = resp.headers.get("Content-Length")
            total = int(total) if total and total.isdigit() else None
            while True:
                chunk = resp.read(1 << 20)
                if not chunk:
                    break
                fh.write(chunk)
                if progress:
                    progress(len(chunk), total)
    except (OSError, ValueError) as exc:  # URLError, timeouts, refused connections
        tmp.unlink(missing_ok=True)
        raise DataError(f"could not download {name} from {url}: {exc}; offline? copy the file to {dest}") from None
    got = md5sum(tmp)
    if got != md5:
        tmp.unlink(missing_ok=True)
        raise DataError(f"{name}: checksum mismatch (MD5 {got}, expected {md5}); the download was discarded")
    shutil.move(tmp, dest)
    return dest
