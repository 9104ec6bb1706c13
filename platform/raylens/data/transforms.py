"""Image transforms: seeded train augmentation that can be replayed, and eval resize/crop.

Transforms work on PIL RGB images and return ``uint8 [3, h, w]`` arrays; normalization
with the backbone's mean/std happens batched on the consumer (:func:`normalize`), so
uint8 — not float32 — crosses the object store.

Every train sample's augmentation is drawn from its own seed (``aug_seed``), returned
with the sample: feeding the same image and seed to :meth:`ImageTransform.__call__`
reproduces the same pixels exactly, in any process (distillation replays the teacher's
augmentation). The train pipeline is timm's order: random-resized-crop, flip, then
auto-augment or colour jitter, then random erasing (:mod:`raylens.data.augment`); with
those three off it draws and outputs exactly what it did before they existed.

Decoding only the pixels needed (``data.decode_reduce``): a transform resizes one region of
the image (the train crop, the eval center box) to ``size``; :func:`decode_transform` reads
the header, fixes that region from the size and the seed, and lets libjpeg decode a JPEG at
1/2, 1/4 or 1/8 scale when the region still has ``decode_reduce_gap`` x ``size`` pixels a
side at that scale (:func:`raylens.data.images.reduction_for`). The scale depends only on
the header, the seed and the settings, so the teacher pass, the student and any check
replay the same pixels; with no reduction the pixels are exactly the full decode's.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from raylens.config import ConfigError
from raylens.data.augment import (
    INTERPOLATIONS,
    auto_augment,
    check_auto_augment,
    color_jitter,
    erase_uint8,
    random_erasing,
    seeded,
)
from raylens.data.images import (
    ImageRejected,
    apply_draft,
    load_rgb,
    open_image,
    reduction_for,
)
from raylens.schema import DECODE_REDUCE_GAP, DataConfig, check_reduce_gap

SEED_BITS = 32  # 4 bytes a sample in a distillation store; plenty for augmentation draws

# (left, top, right, bottom) of the region a transform resizes, in full-resolution pixels
Box = tuple[float, float, float, float]


def sample_seed(base_seed: int, sample_id: str, epoch: int) -> int:
    """A stable 32-bit augmentation seed for (run seed, sample, epoch)."""
    digest = hashlib.blake2b(f"{base_seed}:{epoch}:{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> (64 - SEED_BITS)


def fresh_seeds(n: int) -> np.ndarray:
    """``n`` random 32-bit seeds from OS entropy (recorded, so still replayable)."""
    return np.random.default_rng().integers(0, 2**SEED_BITS, size=n, dtype=np.int64)


def rrc_box(
    rng: np.random.Generator,
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[int, int, int, int]:
    """Random-resized-crop box ``(left, top, w, h)`` (torchvision's sampling algorithm)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    # Fallback: a central crop at the nearest allowed aspect ratio.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


@dataclass(frozen=True)
class ImageTransform:
    """Train (seeded random-resized-crop + flip, then optional auto-augment or colour jitter,
    then optional random erasing) or eval (resize + center crop) transform.

    A frozen, picklable value shipped to Ray Data tasks: the library transform objects are
    built on first use in each process (:func:`train_ops`), never stored on the instance.
    """

    size: int
    train: bool
    crop_pct: float = 0.875
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (0.75, 4 / 3)
    hflip: float = 0.5
    interpolation: str = "bilinear"  # train crop resize and eval resize
    auto_augment: str | None = None  # timm-style string, see raylens.data.augment
    color_jitter: float | None = None  # only when auto_augment is None (timm)
    reprob: float = 0.0
    remode: str = "pixel"
    recount: int = 1
    mean: tuple[float, float, float] | None = None  # 0-1 scale: AA fill, erasing
    std: tuple[float, float, float] | None = None
    decode_reduce: bool = True  # data.decode_reduce: see decode_transform
    decode_reduce_gap: float = DECODE_REDUCE_GAP

    def __post_init__(self):
        check_reduce_gap(self.decode_reduce_gap)
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"config key 'data.interpolation': expected one of {sorted(INTERPOLATIONS)}, "
                f"got {self.interpolation!r}"
            )
        if self.auto_augment is not None:
            check_auto_augment(self.auto_augment)
        if self.train and (self.reprob > 0 or self.auto_augment) and None in (self.mean, self.std):
            raise ConfigError(
                "config keys 'data.mean'/'data.std' are null: data.reprob > 0 and "
                "data.auto_augment need the normalization; resolve preprocessing from the "
                "backbone first (raylens.preprocess), or set them"
            )

    @classmethod
    def from_config(cls, cfg: DataConfig, train: bool) -> ImageTransform:
        """The split's transform; ``train`` is the train transform when ``data.augment``.

        Raises:
            ConfigError: a value it needs is still null (``data.eval_crop_pct`` for an eval
                transform; ``data.mean``/``data.std`` for auto-augment or erasing):
                preprocessing must be resolved from the backbone first.
        """
        train = train and cfg.augment
        if not train and cfg.eval_crop_pct is None:
            raise ConfigError(
                "config key 'data.eval_crop_pct' is null: resolve preprocessing from the "
                "backbone first (raylens.preprocess), or set it"
            )
        common = {
            "size": cfg.image_size,
            "train": train,
            "decode_reduce": cfg.decode_reduce,
            "decode_reduce_gap": cfg.decode_reduce_gap,
        }
        if cfg.interpolation is not None:
            common["interpolation"] = cfg.interpolation
        if not train:
            return cls(**common, crop_pct=cfg.eval_crop_pct)
        return cls(
            **common,
            scale=tuple(cfg.rrc_scale),
            ratio=tuple(cfg.rrc_ratio),
            hflip=cfg.hflip,
            auto_augment=cfg.auto_augment,
            color_jitter=cfg.color_jitter,
            reprob=cfg.reprob,
            remode=cfg.remode,
            recount=cfg.recount,
            mean=None if cfg.mean is None else tuple(cfg.mean),
            std=None if cfg.std is None else tuple(cfg.std),
        )

    def __call__(self, img: Image.Image, seed: int | None = None) -> np.ndarray:
        """``uint8 [3, size, size]`` of a decoded image; train mode needs the sample's ``seed``."""
        box, rng = self.crop_box(img.width, img.height, seed)
        return self.apply(img, box, rng, seed)

    def crop_box(
        self, width: int, height: int, seed: int | None = None
    ) -> tuple[Box, np.random.Generator | None]:
        """The region of a ``width`` x ``height`` image (full resolution, as its header says)
        that this transform resizes to ``size``, and for train the sample's generator, past
        the crop's draws (:meth:`apply` draws the flip from it).

        Train: the seeded random-resized crop (integer bounds). Eval: the center box that
        resizing the short side to ``floor(size / crop_pct)`` and cropping ``size`` keeps.
        """
        if self.train:
            if seed is None:
                raise ValueError("train transform needs a per-sample seed")
            # The crop and flip keep their own generator (not augment.seeded), so runs and
            # stores made before the other ops existed replay unchanged.
            rng = np.random.default_rng(seed)
            left, top, w, h = rrc_box(rng, width, height, self.scale, self.ratio)
            return (left, top, left + w, top + h), rng
        nw, nh = self._eval_resized(width, height)
        left, top = (nw - self.size) // 2, (nh - self.size) // 2
        right, bottom = left + self.size, top + self.size
        # the same float operations as raylens.export.preprocess.reduced (bit-equal boxes)
        box = (left * width / nw, top * height / nh, right * width / nw, bottom * height / nh)
        return box, None

    def reduction(self, fmt: str | None, box: Box) -> int:
        """The DCT scale (1, 2, 4, 8) to decode a ``fmt`` image at when only ``box`` is used
        (:func:`raylens.data.images.reduction_for`; 1 with ``decode_reduce`` off)."""
        if not self.decode_reduce:
            return 1
        w, h = box[2] - box[0], box[3] - box[1]
        return reduction_for(fmt, w, h, self.size, self.size, self.decode_reduce_gap)

    def apply(
        self,
        img: Image.Image,
        box: Box,
        rng: np.random.Generator | None = None,
        seed: int | None = None,
        scale: int = 1,
    ) -> np.ndarray:
        """``uint8 [3, size, size]`` from ``img`` decoded at ``1 / scale`` of the size
        :meth:`crop_box` was given, with that call's ``box`` and ``rng`` (train: and the
        sample's ``seed``, for the auto-augment and erasing sub-seeds)."""
        resample = INTERPOLATIONS[self.interpolation]
        if not self.train and scale == 1:
            return self._eval_full(img, resample)
        # A reduced image's pixel j covers full-resolution [j * s, (j + 1) * s): the box
        # divides by s, kept fractional (Pillow resamples from fractional boxes).
        region = box if scale == 1 else tuple(v / scale for v in box)
        out = img.resize((self.size, self.size), resample, box=region)
        if not self.train:
            return np.asarray(out, dtype=np.uint8).transpose(2, 0, 1)
        if rng.random() < self.hflip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        if not (self.auto_augment or self.color_jitter or self.reprob > 0):
            return np.asarray(out, dtype=np.uint8).transpose(2, 0, 1)
        ops = train_ops(self)
        with seeded(seed) as use:
            for name, op in ops.pil:
                use(name)
                out = op(out)
            pixels = np.asarray(out, dtype=np.uint8).transpose(2, 0, 1)
            if ops.erasing is not None:
                use("random_erasing")
                pixels = erase_uint8(pixels, ops.erasing, self.mean, self.std)
        return pixels

    def _eval_resized(self, w: int, h: int) -> tuple[int, int]:
        short = int(math.floor(self.size / self.crop_pct))
        if w <= h:
            return short, max(short, int(round(h * short / w)))
        return max(short, int(round(w * short / h))), short

    def _eval_full(self, img: Image.Image, resample) -> np.ndarray:
        """Eval of a full decode: resize the whole image, then crop (the pixels raylens has
        always made: resizing only the box would differ by a level here and there)."""
        nw, nh = self._eval_resized(*img.size)
        if (nw, nh) != img.size:
            img = img.resize((nw, nh), resample)
        left, top = (nw - self.size) // 2, (nh - self.size) // 2
        out = img.crop((left, top, left + self.size, top + self.size))
        return np.asarray(out, dtype=np.uint8).transpose(2, 0, 1)


@dataclass(frozen=True)
class TrainOps:
    """The library ops a train transform applies after crop + flip: ``pil`` as
    ``(name, op)`` pairs (the name keys the op's sub-seed), then ``erasing`` (or None)."""

    pil: tuple[tuple[str, object], ...]
    erasing: object | None


@functools.lru_cache(maxsize=32)
def train_ops(tf: ImageTransform) -> TrainOps:
    """``tf``'s library ops, built once per process and transform (the transform is a frozen,
    hashable value; the ops hold no per-call state)."""
    pil = []
    if tf.auto_augment is not None:
        aa = auto_augment(
            tf.auto_augment, size=tf.size, mean=tf.mean, interpolation=tf.interpolation
        )
        pil.append(("auto_augment", aa))
    elif tf.color_jitter:  # timm: no colour jitter with auto-augment on
        pil.append(("color_jitter", color_jitter(tf.color_jitter)))
    erasing = random_erasing(tf.reprob, tf.remode, tf.recount) if tf.reprob > 0 else None
    return TrainOps(tuple(pil), erasing)


def decode_transform(
    data: bytes,
    transforms: Sequence[ImageTransform],
    seed: int | None = None,
    *,
    max_pixels: int = 64_000_000,
) -> list[np.ndarray]:
    """Decodes one image once and applies each of ``transforms`` to it (train ones with the
    sample's ``seed``): ``uint8 [3, size, size]`` per transform.

    The header gives the full size; each transform fixes its region from it (and the seed);
    a JPEG then decodes at the smallest reduction any transform asks for (:meth:`reduction`),
    so with one transform, or several that agree, each gets exactly the pixels it gets in any
    other process. The public entry for decoding outside a batch (e.g. one served request
    for the eval transforms of several models).

    Raises:
        ImageRejected: when the bytes are not a usable image.
    """
    img = open_image(data, max_pixels)
    width, height = img.size  # before any draft: it changes img.size
    plans = [(t, *t.crop_box(width, height, seed)) for t in transforms]
    scale = apply_draft(img, min((t.reduction(img.format, box) for t, box, _ in plans), default=1))
    img = load_rgb(img)
    return [t.apply(img, box, rng, seed, scale) for t, box, rng in plans]


def decode_and_transform(
    images: list[bytes],
    transform: ImageTransform,
    seeds: np.ndarray | None,
    max_pixels: int = 64_000_000,
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
    """Decodes and transforms a batch (each image as :func:`decode_transform` does: large
    JPEGs at a reduced scale when ``transform.decode_reduce``).

    Returns:
        ``(pixels uint8 [n_ok, 3, s, s], kept row indices [n_ok], failures [(row, reason)])``.
        A row that fails to decode is dropped and reported, never raised.
    """
    out = np.empty((len(images), 3, transform.size, transform.size), dtype=np.uint8)
    kept, failures = [], []
    for i, data in enumerate(images):
        seed = None if seeds is None else int(seeds[i])
        try:
            (out[len(kept)],) = decode_transform(data, [transform], seed, max_pixels=max_pixels)
        except ImageRejected as rej:
            failures.append((i, f"{rej.reason}: {rej.detail}"))
            continue
        kept.append(i)
    return out[: len(kept)], np.asarray(kept, dtype=np.int64), failures


def normalize(pixels, mean, std, *, channels_last: bool = False):
    """``uint8 [b, 3, h, w]`` tensor → float32 normalized with per-channel mean/std (0-1 scale).

    One float32 tensor is allocated (in ``channels_last`` layout if asked) and the uint8 →
    float conversion, the subtraction and the division all write into it: bit-identical to
    ``(pixels.float() - mean * 255) / (std * 255)`` (tests/test_transforms.py), without its
    two temporaries (~0.4 ms vs ~0.1 ms per [64, 3, 224, 224] batch, issue 23).
    """
    import torch

    mean_t = torch.tensor(mean, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1) * 255.0
    std_t = torch.tensor(std, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1) * 255.0
    fmt = torch.channels_last if channels_last and pixels.dim() == 4 else torch.contiguous_format
    out = torch.empty(pixels.shape, dtype=torch.float32, device=pixels.device, memory_format=fmt)
    out.copy_(pixels)
    return out.sub_(mean_t).div_(std_t)
