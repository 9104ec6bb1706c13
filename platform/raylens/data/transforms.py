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
"""

from __future__ import annotations

import functools
import hashlib
import math
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
from raylens.data.images import ImageRejected, decode_rgb
from raylens.schema import DataConfig

SEED_BITS = 32  # 4 bytes a sample in a distillation store; plenty for augmentation draws


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

    def __post_init__(self):
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
        common = {"size": cfg.image_size, "train": train}
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
        """``uint8 [3, size, size]``; train mode needs the sample's ``seed``."""
        resample = INTERPOLATIONS[self.interpolation]
        if self.train:
            if seed is None:
                raise ValueError("train transform needs a per-sample seed")
            # The crop and flip keep their own generator (not augment.seeded), so runs and
            # stores made before the other ops existed replay unchanged.
            rng = np.random.default_rng(seed)
            left, top, w, h = rrc_box(rng, img.width, img.height, self.scale, self.ratio)
            out = img.resize((self.size, self.size), resample, box=(left, top, left + w, top + h))
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
        short = int(math.floor(self.size / self.crop_pct))
        w, h = img.size
        if w <= h:
            nw, nh = short, max(short, int(round(h * short / w)))
        else:
            nw, nh = max(short, int(round(w * short / h))), short
        if (nw, nh) != (w, h):
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


def decode_and_transform(
    images: list[bytes],
    transform: ImageTransform,
    seeds: np.ndarray | None,
    max_pixels: int = 64_000_000,
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
    """Decodes and transforms a batch.

    Returns:
        ``(pixels uint8 [n_ok, 3, s, s], kept row indices [n_ok], failures [(row, reason)])``.
        A row that fails to decode is dropped and reported, never raised.
    """
    out = np.empty((len(images), 3, transform.size, transform.size), dtype=np.uint8)
    kept, failures = [], []
    for i, data in enumerate(images):
        try:
            img = decode_rgb(data, max_pixels=max_pixels)
        except ImageRejected as rej:
            failures.append((i, f"{rej.reason}: {rej.detail}"))
            continue
        out[len(kept)] = transform(img, None if seeds is None else int(seeds[i]))
        kept.append(i)
    return out[: len(kept)], np.asarray(kept, dtype=np.int64), failures


def normalize(pixels, mean, std):
    """``uint8 [b, 3, h, w]`` tensor → float32 normalized with per-channel mean/std (0-1 scale)."""
    import torch

    mean_t = torch.tensor(mean, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1) * 255.0
    std_t = torch.tensor(std, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1) * 255.0
    return (pixels.float() - mean_t) / std_t
