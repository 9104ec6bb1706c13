"""Real encoded test images, made in memory (JPEG/PNG via Pillow), and planted bad files."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

PALETTE = [
    (220, 40, 40),
    (40, 200, 60),
    (40, 60, 220),
    (230, 200, 30),
    (150, 40, 170),
    (20, 20, 20),
]


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def class_image(cls: int, i: int, size: int = 24, fmt: str = "PNG") -> bytes:
    """An image whose dominant colour identifies its class, with per-sample noise."""
    rng = np.random.default_rng(cls * 100_003 + i)
    base = np.array(PALETTE[cls % len(PALETTE)], dtype=np.int16)
    arr = np.clip(base + rng.integers(-30, 30, size=(size, size, 3)), 0, 255).astype(np.uint8)
    return encode(Image.fromarray(arr), fmt, **({"quality": 90} if fmt == "JPEG" else {}))


def photo(width: int, height: int, seed: int = 0, noise: float = 4.0) -> Image.Image:
    """A photo-like RGB image: smooth colour gradients and blobs plus Gaussian noise (so it
    compresses like a photo, not like a flat drawing)."""
    rng = np.random.default_rng(seed)
    # Content drawn at 1/8 size and upscaled: cheap at 12 MP, still smooth like a photo.
    sw, sh = max(1, width // 8), max(1, height // 8)
    y, x = np.mgrid[0:sh, 0:sw].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=3)
    small = np.stack(
        [
            128 + 90 * np.sin(x / sw * np.pi * rng.uniform(1, 4) + phase[0]),
            110 + 80 * np.sin(y / sh * np.pi * rng.uniform(1, 4) + phase[1]),
            100 + 70 * np.cos((x + y) / (sw + sh) * np.pi * 3 + phase[2]),
        ],
        axis=-1,
    )
    for _ in range(12):
        cy, cx, r = rng.uniform(0, sh), rng.uniform(0, sw), rng.uniform(2, sw / 6 + 2)
        blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))[..., None]
        small += blob * rng.uniform(-90, 90, size=3)
    img = Image.fromarray(np.clip(small, 0, 255).astype(np.uint8)).resize(
        (width, height), Image.BICUBIC
    )
    grain = rng.standard_normal(size=(height, width, 3), dtype=np.float32) * np.float32(noise)
    return Image.fromarray(np.clip(np.asarray(img) + grain, 0, 255).astype(np.uint8))


def huge_png(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 1-bit PNG of ``width x height`` (400 M pixels at the default), a few KB on disk."""
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def bad_files() -> dict[str, tuple[bytes, str, str]]:
    """``{file name: (bytes, "rejected"|"converted", reason or source mode)}``."""
    good_jpeg = class_image(0, 0, size=64, fmt="JPEG")
    rgba = Image.new("RGBA", (16, 16), (10, 20, 30, 128))
    png16 = Image.fromarray(np.arange(256, dtype=np.uint16).reshape(16, 16) * 256)
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))
    return {
        "truncated.jpg": (good_jpeg[: len(good_jpeg) // 2], "rejected", "undecodable"),
        "empty.jpg": (b"", "rejected", "zero_bytes"),
        "notes.png": (b"this is a text file, not an image\n" * 4, "rejected", "undecodable"),
        "huge.png": (huge_png(), "rejected", "too_large"),
        "cmyk.jpg": (encode(cmyk, "JPEG"), "converted", "CMYK"),
        "deep16.png": (encode(png16, "PNG"), "converted", "I;16"),
        "alpha.png": (encode(rgba, "PNG"), "converted", "RGBA"),
    }
