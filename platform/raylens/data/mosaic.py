"""Multi-label mosaics from a single-label source (``prepare.mosaic_grid``).

Each mosaic is a ``grid × grid`` tile of images drawn from one split of the source (so
val/test mosaics never reuse a train image), its labels the set of classes present. The
k-th class (in the source's class order) is drawn with weight ``skew ** k``, so later
classes are rare, as object classes are in xView-style tiles; a cell is left empty
(black) with probability ``empty``. The draw is seeded: the same source and settings give
the same mosaics.

Listing is cheap: a mosaic :class:`~raylens.data.sources.Record` carries its member
records in ``parts``, and :func:`compose` builds the pixels when prepare checks the
record (in its thread pool, bounded memory).
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
from PIL import Image

from raylens.data.images import ImageRejected, decode_rgb, encode_png
from raylens.data.sources import SPLITS, Record
from raylens.schema import PrepareConfig
from raylens.storage import Storage


def class_weights(classes: list[str], skew: float) -> np.ndarray:
    """Draw probability of each class: ``skew ** k`` normalized."""
    w = np.power(float(skew), np.arange(len(classes), dtype=np.float64))
    return w / w.sum()


def build_mosaics(
    records: list[Record],
    splits: dict[str, str],
    classes: list[str],
    cfg: PrepareConfig,
    seed: int,
) -> list[Record]:
    """Mosaic records (multi-label, split set) from single-label ``records``.

    Per split, ``round(mosaic_ratio × n / grid²)`` mosaics (at least one when the split has
    images), so each source image is used about ``mosaic_ratio`` times.
    """
    if any(r.label is None for r in records):
        raise ValueError("prepare.mosaic_grid needs a single-label source (label per image)")
    grid, cells = cfg.mosaic_grid, cfg.mosaic_grid**2
    probs = class_weights(classes, cfg.mosaic_skew)
    out: list[Record] = []
    for split in SPLITS:
        by_class: dict[str, list[Record]] = defaultdict(list)
        for r in records:
            if splits[r.id] == split:
                by_class[r.label].append(r)
        n = sum(len(v) for v in by_class.values())
        if not n:
            continue
        present = [i for i, c in enumerate(classes) if by_class.get(c)]
        p = probs[present] / probs[present].sum()
        rng = np.random.default_rng([seed, SPLITS.index(split), 7919])
        count = max(1, round(cfg.mosaic_ratio * n / cells))
        width = len(str(count))
        for m in range(count):
            empty = rng.random(cells) < cfg.mosaic_empty
            if empty.all():
                empty[rng.integers(cells)] = False
            parts: list[Record | None] = []
            for cell in range(cells):
                if empty[cell]:
                    parts.append(None)
                    continue
                pool = by_class[classes[present[rng.choice(len(present), p=p)]]]
                parts.append(pool[rng.integers(len(pool))])
            labels = sorted({r.label for r in parts if r}, key=classes.index)
            out.append(
                Record(
                    id=f"mosaic-{split}-{m:0{width}d}",
                    uri=f"mosaic:{split}/{m}",
                    labels=labels,
                    split=split,
                    meta={"members": ";".join(r.id if r else "" for r in parts)},
                    parts=parts,
                    grid=grid,
                )
            )
    return out


def decode_part(part: Record, storage: Storage, max_pixels: int, role: str) -> Image.Image:
    """A composed record's part (mosaic member, clutter layer) as RGB; a part that does
    not decode is rejected naming its role and id."""
    data = part.data if part.data is not None else storage.read_bytes(part.uri)
    try:
        return decode_rgb(data, max_pixels=max_pixels)
    except ImageRejected as rej:
        raise ImageRejected(rej.reason, f"{role} {part.id}: {rej.detail}") from None


def compose(record: Record, storage: Storage, max_pixels: int) -> bytes:
    """PNG bytes of a mosaic record (grayscale when every member is)."""
    images: list[Image.Image | None] = []
    gray = True
    for part in record.parts or []:
        if part is None:
            images.append(None)
            continue
        img = decode_part(part, storage, max_pixels, "member")
        arr = np.asarray(img)
        gray &= bool((arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all())
        images.append(img)
    filled = [im for im in images if im is not None]
    cell = max(max(im.size) for im in filled)
    grid = record.grid or math.isqrt(len(images))
    canvas = np.zeros((grid * cell, grid * cell, 3), dtype=np.uint8)
    for k, img in enumerate(images):
        if img is None:
            continue
        if img.size != (cell, cell):
            img = img.resize((cell, cell), Image.BILINEAR)
        r, c = divmod(k, grid)
        canvas[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell] = np.asarray(img)
    return encode_png(canvas[..., 0] if gray else canvas)
