"""``preprocess.json``: what an edge runtime does to image bytes before ``model.onnx``, and a
reference implementation of it in NumPy + Pillow (no torch).

    spec = build_spec(image_size=28, crop_pct=1.0, mean=(0.286,) * 3, std=(0.353,) * 3)
    pixels, x = preprocess([png_bytes, jpeg_bytes], spec)  # uint8 / float32 [n, 3, s, s]

The spec states the platform's eval transform (``raylens.data.images.decode_rgb``, then
``ImageTransform(train=False)``, then ``normalize``) as numbers and rules:

1. decode to 8-bit RGB: grayscale replicated to 3 channels; alpha composited on white;
   16-bit grayscale scaled ``v * 255 // 65535``; palette, CMYK and other modes converted
   by Pillow. EXIF orientation is not applied (pixels as stored).
2. resize so the shorter side is ``resize.shorter_side`` (``floor(image_size / crop_pct)``)
   and the longer ``max(shorter_side, round(long * shorter_side / short))`` (round half to
   even), with Pillow's ``resize.interpolation`` filter (the run's ``data.interpolation``:
   bilinear, bicubic or nearest); Pillow's bilinear and bicubic antialias when downscaling
   (the filter widened by the scale factor: OpenCV's ``INTER_LINEAR``/``INTER_CUBIC`` do
   not, and differ); no resize when the image already has that size.
3. crop ``image_size`` x ``image_size`` at ``((w - image_size) // 2, (h - image_size) // 2)``.
4. float32, NCHW, RGB: ``(pixel * scale - mean[c]) / std[c]`` with ``scale = 1 / 255``.

With ``decode.reduce`` (the run's ``data.decode_reduce``), a JPEG whose center box (the
region steps 2-3 keep, in the file's pixels) is at least ``gap`` x ``image_size`` a side at
1/2, 1/4 or 1/8 scale is decoded at the largest such scale (libjpeg DCT scaling) and the box
divided by it is resized straight to ``image_size`` (steps 2-3 in one resize).

This module imports neither torch nor any other part of raylens, so it can be copied to a
device as it is; ``jobs.export`` checks that it reproduces the PyTorch input on real images.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

FORMAT = "raylens.preprocess/1"
INTERPOLATION = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}
SIXTEEN_BIT = ("I", "I;16", "I;16B", "I;16L", "I;16N")
REDUCIBLE = ("JPEG", "MPO")  # formats libjpeg decodes at 1/2, 1/4, 1/8 (Pillow's draft)
ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


def build_spec(
    *,
    image_size: int,
    crop_pct: float,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bilinear",
    input_name: str = "pixels",
    reduce_gap: float | None = None,
) -> dict[str, Any]:
    """The ``decode``/``resize``/``crop``/``normalize``/``input`` sections of preprocess.json
    for an eval transform (``data.image_size``, ``data.eval_crop_pct``,
    ``data.interpolation``, ``data.mean/std``; ``reduce_gap``: ``data.decode_reduce_gap``
    when ``data.decode_reduce`` is on, else None)."""
    if interpolation not in INTERPOLATION:
        raise ValueError(
            f"interpolation {interpolation!r}: expected one of {sorted(INTERPOLATION)}"
        )
    shorter = int(math.floor(image_size / crop_pct))
    pil = f"Image.{interpolation.upper()}"
    antialias = interpolation != "nearest"
    return {
        "format": FORMAT,
        "decode": {
            "output": "8-bit RGB",
            "grayscale": "L: the gray value replicated to R, G and B",
            "alpha": {
                "modes": [*ALPHA, "P with a transparency entry"],
                "composite_on": [255, 255, 255],
            },
            "sixteen_bit": {
                "modes": list(SIXTEEN_BIT),
                "rule": "v * 255 // 65535 (integer); mode I whose maximum is <= 255: v as is",
            },
            "other_modes": "Pillow Image.convert('RGB') (palette, bilevel, CMYK, YCbCr, ...)",
            "exif_orientation": "not applied: pixels as stored in the file",
            "reduce": None
            if reduce_gap is None
            else {
                "formats": list(REDUCIBLE),
                "gap": float(reduce_gap),
                "box": "the center box in the file's pixels: with (nw, nh) the resize size "
                "and (left, top) the crop offset, (left * w / nw, top * h / nh, "
                "(left + size) * w / nw, (top + size) * h / nh)",
                "scale": "the largest s in 8, 4, 2 with box width / s >= gap * size and box "
                "height / s >= gap * size; none: decode and resize as usual",
                "implementation": "Pillow Image.draft(None, (w // s, h // s)) before loading "
                "(libjpeg DCT scaling to ceil(w / s) x ceil(h / s)), then "
                "Image.resize((size, size), interpolation, box=box / s) (float box)",
            },
        },
        "resize": {
            "policy": "shorter side to shorter_side, aspect ratio kept, then center crop",
            "shorter_side": shorter,
            "longer_side": "max(shorter_side, round(long * shorter_side / short)), "
            "round half to even",
            "interpolation": interpolation,
            "antialias": antialias,
            "implementation": f"Pillow Image.resize((w, h), {pil})"
            + (
                ": antialiased when downscaling (the filter widened by the scale factor); "
                "not OpenCV's cv2.resize"
                if antialias
                else ""
            ),
            "skip_when_same_size": True,
        },
        "crop": {
            "size": [image_size, image_size],
            "position": "center",
            "offset": "left = (w - size) // 2, top = (h - size) // 2",
        },
        "normalize": {
            "scale": 1.0 / 255.0,
            "mean": [float(m) for m in mean],
            "std": [float(s) for s in std],
            "formula": "(pixel * scale - mean[c]) / std[c]",
        },
        "input": {
            "name": input_name,
            "dtype": "float32",
            "layout": "NCHW",
            "shape": ["batch", 3, image_size, image_size],
            "channel_order": "RGB",
        },
    }


def reduced(data: bytes, spec: dict[str, Any]) -> np.ndarray | None:
    """``uint8 [3, s, s]`` by the spec's ``decode.reduce`` rule, or None when it does not
    apply (no rule, not a JPEG, a box too small to reduce)."""
    rule = spec["decode"].get("reduce")
    img = Image.open(io.BytesIO(data))
    if rule is None or img.format not in rule["formats"]:
        return None
    w, h = img.size
    size = spec["crop"]["size"][0]
    nw, nh = _resized(w, h, spec["resize"]["shorter_side"])
    left, top = (nw - size) // 2, (nh - size) // 2
    box = (left * w / nw, top * h / nh, (left + size) * w / nw, (top + size) * h / nh)
    need = rule["gap"] * size
    scale = next((s for s in (8, 4, 2) if min(box[2] - box[0], box[3] - box[1]) / s >= need), 1)
    if scale == 1 or min(w, h) < scale:
        return None
    img.draft(None, (w // scale, h // scale))
    out = _to_rgb(img, spec).resize(
        (size, size),
        INTERPOLATION[spec["resize"]["interpolation"]],
        box=tuple(v / scale for v in box),
    )
    return np.ascontiguousarray(np.asarray(out, dtype=np.uint8).transpose(2, 0, 1))


def _resized(w: int, h: int, short: int) -> tuple[int, int]:
    if w <= h:
        return short, max(short, round(h * short / w))
    return max(short, round(w * short / h)), short


def decode(data: bytes, spec: dict[str, Any]) -> Image.Image:
    """Image bytes → 8-bit RGB, by the spec's ``decode`` rules (full resolution)."""
    return _to_rgb(Image.open(io.BytesIO(data)), spec)


def _to_rgb(img: Image.Image, spec: dict[str, Any]) -> Image.Image:
    img.load()
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in spec["decode"]["sixteen_bit"]["modes"]:
        arr = np.asarray(img, dtype=np.int64)
        top = 255 if mode == "I" and arr.max(initial=0) <= 255 else 65535
        gray = np.clip(arr * 255 // top, 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))
    if mode == "L":
        gray = np.asarray(img, dtype=np.uint8)
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))
    if mode in ALPHA or (mode == "P" and "transparency" in img.info):
        white = Image.new("RGBA", img.size, (*spec["decode"]["alpha"]["composite_on"], 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


def resize_and_crop(img: Image.Image, spec: dict[str, Any]) -> np.ndarray:
    """RGB image → ``uint8 [3, s, s]``: the spec's ``resize`` and ``crop``."""
    r, size = spec["resize"], spec["crop"]["size"][0]
    w, h = img.size
    nw, nh = _resized(w, h, r["shorter_side"])
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), INTERPOLATION[r["interpolation"]])
    arr = np.asarray(img, dtype=np.uint8)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.ascontiguousarray(arr[top : top + size, left : left + size].transpose(2, 0, 1))


def normalize(pixels: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """``uint8 [..., 3, s, s]`` → float32: the spec's ``normalize``."""
    n = spec["normalize"]
    mean = np.asarray(n["mean"], dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(n["std"], dtype=np.float32).reshape(3, 1, 1)
    return ((pixels.astype(np.float32) * np.float32(n["scale"]) - mean) / std).astype(np.float32)


def preprocess(images: Sequence[bytes], spec: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Encoded images → ``(uint8 [n, 3, s, s], float32 [n, 3, s, s])``, the model's input.

    Raises:
        OSError, ValueError: an image Pillow cannot decode.
    """
    pixels = np.stack([_pixels(b, spec) for b in images])
    return pixels, normalize(pixels, spec)


def _pixels(data: bytes, spec: dict[str, Any]) -> np.ndarray:
    small = reduced(data, spec)
    return resize_and_crop(decode(data, spec), spec) if small is None else small
