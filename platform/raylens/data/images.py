"""Image bytes → validated RGB pixels, with a named reason for every rejection.

Reasons (the values written to ``dataset.json``):
``zero_bytes``, ``too_large`` (file bytes or pixel count), ``undecodable``,
``unsupported_mode``, ``missing_label``, ``unknown_class``.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, features

# Pillow's own bomb check fires at 2x this; we check pixel counts ourselves first.
Image.MAX_IMAGE_PIXELS = None

# Modes converted to RGB at decode (see to_rgb); anything else is rejected.
CONVERTIBLE_MODES = frozenset(
    {
        "1",
        "L",
        "LA",
        "La",
        "P",
        "PA",
        "RGB",
        "RGBA",
        "RGBa",
        "RGBX",
        "CMYK",
        "YCbCr",
        "LAB",
        "HSV",
        "I",
        "I;16",
        "I;16B",
        "I;16L",
        "I;16N",
    }
)
SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})


class ImageRejected(ValueError):
    """An input image cannot be used; ``reason`` is one of the documented reason codes."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    mode: str
    format: str

    @property
    def conversion(self) -> str | None:
        """How decoding changes this image's pixels, when it loses or maps information.

        None for RGB and 8-bit grayscale (L), whose conversion to RGB is exact.
        """
        return conversion_note(self.mode)


def conversion_note(mode: str) -> str | None:
    if mode in ("RGB", "L"):
        return None
    if mode in SIXTEEN_BIT_MODES:
        return f"{mode} -> RGB: 16-bit values scaled to 8 bits"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return f"{mode} -> RGB: alpha composited on white"
    if mode == "CMYK":
        return "CMYK -> RGB: colour-space conversion"
    if mode in ("P", "1"):
        return f"{mode} -> RGB: palette/bilevel expanded"
    return f"{mode} -> RGB"


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Opens encoded bytes as a PIL image (not yet decoded), refusing empty, undecodable or
    over-``max_pixels`` input with :class:`ImageRejected` (its reason and a message)."""
    if len(data) == 0:
        raise ImageRejected("zero_bytes", "the file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageRejected("too_large", str(err)) from None
    except Exception as err:  # PIL raises many types for garbage input
        raise ImageRejected("undecodable", f"{type(err).__name__}: {err}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise ImageRejected("too_large", f"{w}x{h} = {w * h} pixels > limit {max_pixels}")
    if w < 1 or h < 1:
        raise ImageRejected("undecodable", f"degenerate size {w}x{h}")
    if img.mode not in CONVERTIBLE_MODES:
        raise ImageRejected("unsupported_mode", f"mode {img.mode!r} has no defined RGB conversion")
    return img


# Formats whose decoder can scale by 1/2, 1/4 or 1/8 while decoding (libjpeg's DCT scaling,
# through Pillow's Image.draft); MPO is Pillow's JPEG with extra frames.
REDUCIBLE_FORMATS = frozenset({"JPEG", "MPO"})
REDUCTIONS = (8, 4, 2)  # the scales Pillow's JPEG draft offers, largest first


def reduction_for(
    fmt: str | None, box_w: float, box_h: float, out_w: int, out_h: int, gap: float
) -> int:
    """The DCT scale (1, 2, 4 or 8) at which to decode an image of format ``fmt`` when only
    its ``box_w`` x ``box_h`` region (full-resolution pixels) is resized to ``out_w`` x
    ``out_h``: the largest ``s`` in 8, 4, 2 that leaves the region at least ``gap`` times
    the output in both directions (``box_w / s >= gap * out_w``, same for h), else 1; always
    1 for formats other than JPEG/MPO.

    A pure function of its arguments (header size, the seeded crop box, the settings), so
    every process that replays a sample picks the same scale. ``gap`` works like Pillow's
    ``reducing_gap``: about 1 is fastest, larger keeps closer to a full decode.
    """
    if fmt not in REDUCIBLE_FORMATS:
        return 1
    for s in REDUCTIONS:
        if box_w / s >= gap * out_w and box_h / s >= gap * out_h:
            return s
    return 1


def apply_draft(img: Image.Image, scale: int) -> int:
    """Makes the not-yet-loaded ``img`` decode at ``1 / scale`` (libjpeg DCT scaling); returns
    the scale in effect: ``scale``, or 1 when it is 1, the format cannot scale, the image is
    already loaded or smaller than ``scale``.

    Read the full size first: after a reduction ``img.size`` is the reduced one,
    ``ceil(W / scale)`` x ``ceil(H / scale)``, and full-resolution coordinate ``x`` is
    ``x / scale`` in it (keep it float: flooring shifts the crop by up to a reduced pixel).
    """
    w, h = img.size
    if scale == 1 or img.format not in REDUCIBLE_FORMATS or w < scale or h < scale:
        return 1
    # Asking for (W // s, H // s) makes Pillow pick exactly s: W // (W // s) lies in [s, 2s).
    if img.draft(None, (w // scale, h // scale)) is None:  # already loaded or drafted
        return 1
    return scale


def decoder_version() -> str | None:
    """The libjpeg-turbo version Pillow decodes JPEGs with (None when it is plain libjpeg).
    Scaled decoding's pixels may differ between builds, so replayable records keep it."""
    return features.version("libjpeg_turbo")


def _load(img: Image.Image) -> None:
    try:
        img.load()
    except Exception as err:
        raise ImageRejected("undecodable", f"{type(err).__name__}: {err}") from None


def inspect_image(
    data: bytes, *, max_pixels: int = 64_000_000, max_bytes: int | None = None
) -> ImageInfo:
    """Fully decodes ``data`` (so truncation is caught) and returns its size and mode.

    Raises:
        ImageRejected: with the reason the image cannot be used.
    """
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageRejected("too_large", f"{len(data)} bytes > limit {max_bytes}")
    img = open_image(data, max_pixels)
    _load(img)
    return ImageInfo(img.size[0], img.size[1], img.mode, img.format or "unknown")


def to_rgb(img: Image.Image) -> Image.Image:
    """Converts any supported mode to 8-bit RGB.

    16-bit grayscale is scaled (not clipped) to 8 bits; transparency is composited on
    white so transparent areas don't turn black.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in SIXTEEN_BIT_MODES:
        arr = np.asarray(img, dtype=np.int64)
        top = 65535 if mode != "I" or arr.max(initial=0) > 255 else 255
        arr8 = np.clip(arr * 255 // top, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8).convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_rgb(img: Image.Image) -> Image.Image:
    """Decodes an opened image (:func:`open_image`, after any :func:`apply_draft`) into an
    8-bit RGB PIL image.

    Raises:
        ImageRejected: when its pixel data cannot be decoded (e.g. a truncated file).
    """
    _load(img)
    return to_rgb(img)


def decode_rgb(data: bytes, *, max_pixels: int = 64_000_000) -> Image.Image:
    """Decodes image bytes into an 8-bit RGB PIL image, at full resolution.

    Raises:
        ImageRejected: when the bytes are not a usable image.
    """
    return load_rgb(open_image(data, max_pixels))


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of a ``[h, w]`` (L) or ``[h, w, 3]`` (RGB) uint8 array."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# prepare.max_side: what a shrunk image is saved as. JPEG is saved at this quality (Pillow's
# default is 75; 90 keeps photos close to their source), with the source's chroma
# subsampling; other formats are saved as they were (lossless ones stay lossless). MPO is
# Pillow's JPEG with extra frames: its first frame is saved as a JPEG. A format Pillow
# cannot write is saved as PNG.
SHRINK_JPEG_QUALITY = 90
_SAVE_AS = {"MPO": "JPEG"}


@dataclass(frozen=True)
class Shrunk:
    data: bytes
    width: int
    height: int
    format: str


def shrink_to_fit(data: bytes, max_side: int, *, max_pixels: int = 64_000_000) -> Shrunk | None:
    """``data`` re-encoded so that its longer side is ``max_side`` (aspect ratio kept), or
    None when it already fits (the caller keeps the bytes as they are).

    The size is read from the header (no decode) to decide. A JPEG is decoded at the
    largest DCT reduction that still leaves at least the target size (Pillow's ``draft``),
    then resized with Lanczos; the pixel mode is kept. Saved as in :data:`SHRINK_JPEG_QUALITY`.

    Raises:
        ImageRejected: when the bytes cannot be decoded.
    """
    img = open_image(data, max_pixels)
    w, h = img.size
    if max(w, h) <= max_side:
        return None
    scale = max_side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    fmt = img.format or "PNG"
    save_kw: dict = {}
    if fmt in REDUCIBLE_FORMATS:
        from PIL import JpegImagePlugin

        save_kw = {
            "quality": SHRINK_JPEG_QUALITY,
            "subsampling": JpegImagePlugin.get_sampling(img),
        }
        img.draft(None, size)  # a reduced decode, never below the target size
    if img.info.get("icc_profile"):
        save_kw["icc_profile"] = img.info["icc_profile"]
    _load(img)
    small = img.resize(size, Image.Resampling.LANCZOS)
    fmt = _SAVE_AS.get(fmt, fmt)
    Image.init()
    if fmt not in Image.SAVE:
        fmt = "PNG"
    if save_kw.get("subsampling", 0) < 0:  # unknown: let Pillow choose
        save_kw.pop("subsampling")
    buf = io.BytesIO()
    small.save(buf, format=fmt, **save_kw)
    return Shrunk(buf.getvalue(), size[0], size[1], fmt)


def decoded_nbytes(data: bytes) -> int:
    """Bytes a full decode of ``data`` will take (width x height x bands x bytes per band),
    from its header alone; 0 when the header does not read (decoding then fails early)."""
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        depth = 2 if img.mode in SIXTEEN_BIT_MODES else 4 if img.mode in ("I", "F") else 1
        return w * h * len(img.getbands()) * depth
    except Exception:  # noqa: BLE001 - any unreadable header: decoding reports it
        return 0
