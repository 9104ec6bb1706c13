"""Fashion-MNIST IDX files: locate, verify, parse.

Checksums are SHA-256 of the *decompressed* IDX payloads, so they hold for the official
gzip files and for repackaged ones (Debian recompresses them, changing the .gz bytes).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import urllib.request
from pathlib import Path

import numpy as np

CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
OFFICIAL_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
ALIASES = ("fashion-mnist", "fashion_mnist")


class ChecksumError(ValueError):
    pass


def default_dir() -> str:
    """The Debian package's folder when installed, else a download into the user cache."""
    if all(os.path.exists(os.path.join(DEBIAN_DIR, f + ".gz")) for f in FILES.values()):
        return DEBIAN_DIR
    cache = (
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "raylens" / "fashion-mnist"
    )
    download(cache)
    return str(cache)


def download(target: Path) -> None:
    """Downloads the four official files into ``target`` (skipping ones already verified)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in FILES.values():
        dest = target / f"{name}.gz"
        if dest.exists():
            try:
                verify(name, gzip.decompress(dest.read_bytes()))
                continue
            except ChecksumError:
                dest.unlink()
        tmp = dest.with_suffix(".gz.part")
        try:
            urllib.request.urlretrieve(OFFICIAL_URL + name + ".gz", tmp)
        except OSError as err:
            raise OSError(
                f"Fashion-MNIST is not installed (Debian package dataset-fashion-mnist at "
                f"{DEBIAN_DIR}) and downloading {OFFICIAL_URL}{name}.gz failed: {err}"
            ) from None
        verify(name, gzip.decompress(tmp.read_bytes()))
        tmp.replace(dest)


def verify(name: str, payload: bytes) -> bool:
    """Checks a decompressed IDX payload; True when known and matching, False when unknown.

    Raises:
        ChecksumError: the file is a known Fashion-MNIST file whose contents differ.
    """
    expected = SHA256.get(name)
    if expected is None:
        return False
    actual = hashlib.sha256(payload).hexdigest()
    if actual != expected:
        raise ChecksumError(f"{name}: sha256 {actual} does not match Fashion-MNIST's {expected}")
    return True


def parse_idx(payload: bytes) -> np.ndarray:
    """Parses an IDX payload (ubyte data only) into a numpy array of its shape."""
    if len(payload) < 4 or payload[0] != 0 or payload[1] != 0:
        raise ValueError("not an IDX file: bad magic number")
    dtype_code, ndim = payload[2], payload[3]
    if dtype_code != 0x08:
        raise ValueError(f"IDX dtype 0x{dtype_code:02x} not supported (expected 0x08 ubyte)")
    shape = tuple(int.from_bytes(payload[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    data = np.frombuffer(payload, dtype=np.uint8, offset=offset)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"IDX payload has {data.size} values, header says {shape}")
    return data.reshape(shape)


def maybe_decompress(name: str, data: bytes) -> bytes:
    return gzip.decompress(data) if name.endswith(".gz") else data
