"""Cluttered canvases from a single-label source (``prepare.clutter_canvas``).

Each source image becomes one ``canvas × canvas`` image with the same id, label and
split: the item is resized to a random fraction of the canvas (``clutter_scale``) and
pasted at a random position over ``clutter_fragments`` square crops of other images of
the same split (so no pixel crosses splits), dimmed to ``clutter_fragment_gain``; the
canvas is then scaled by a random brightness (``clutter_brightness``) and gets Gaussian
noise (``clutter_noise``, in 0-255 units). Layers are combined with a per-pixel maximum,
which suits dark-background sources such as Fashion-MNIST.

Why: on a centred, clean dataset, frozen features already separate unseen classes well,
so there is little for a metric-learning head to learn. Clutter, scale and position
variation are what real photographs of objects have, and what a trained embedding must
learn to ignore.

The draw is seeded per image (``clutter_seed`` column: the run seed and the id), so the
same source and settings give the same pixels. Listing is cheap: a record carries its
item and fragment records in ``parts``; :func:`compose_clutter` builds the pixels in
prepare's thread pool. A fragment whose image does not decode is left out (that image is
rejected, with its reason, as an item of its own); it never costs the canvas it was drawn
for.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

import numpy as np
from PIL import Image

from raylens.data.images import ImageRejected, encode_png
from raylens.data.mosaic import decode_part
from raylens.data.sources import Record
from raylens.schema import PrepareConfig
from raylens.storage import Storage


def _record_seed(seed: int, rid: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{rid}".encode(), digest_size=4).digest(), "big")


def build_clutter(
    records: list[Record], splits: dict[str, str], cfg: PrepareConfig, seed: int
) -> list[Record]:
    """One clutter record per single-label ``record`` (same id, label, split)."""
    if any(r.label is None for r in records):
        raise ValueError("prepare.clutter_canvas needs a single-label source (label per image)")
    by_split: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_split[splits[r.id]].append(r)
    out = []
    for r in records:
        split = splits[r.id]
        pool = by_split[split]
        rseed = _record_seed(seed, r.id)
        rng = np.random.default_rng(rseed)
        frags = (
            [pool[i] for i in rng.integers(len(pool), size=cfg.clutter_fragments)]
            if len(pool) > 1
            else []
        )
        out.append(
            Record(
                id=r.id,
                uri=r.uri,
                label=r.label,
                split=split,
                meta={
                    **r.meta,
                    "members": ";".join(f.id for f in frags),
                    "clutter_seed": rseed,
                },
                parts=[r, *frags],
                canvas=cfg.clutter_canvas,
            )
        )
    return out


def _pixels(part: Record, storage: Storage, max_pixels: int, role: str) -> np.ndarray:
    return np.asarray(decode_part(part, storage, max_pixels, role), dtype=np.float32)


def _resize(arr: np.ndarray, side: int) -> np.ndarray:
    img = Image.fromarray(arr.astype(np.uint8))
    return np.asarray(img.resize((side, side), Image.BILINEAR), dtype=np.float32)


def compose_clutter(record: Record, storage: Storage, cfg: PrepareConfig) -> bytes:
    """PNG bytes of a clutter record (grayscale when every layer is)."""
    side = record.canvas
    rng = np.random.default_rng(int(record.meta["clutter_seed"]) + 1)
    parts = record.parts or []
    item = _pixels(parts[0], storage, cfg.max_image_pixels, "item")
    canvas = np.zeros((side, side, 3), np.float32)
    for frag in parts[1:]:
        try:
            arr = _pixels(frag, storage, cfg.max_image_pixels, "fragment")
        except (ImageRejected, FileNotFoundError):
            continue  # rejected as an item on its own; it must not cost this image
        h, w = arr.shape[:2]
        crop = max(1, int(min(h, w) * rng.uniform(*cfg.clutter_fragment_size)))
        crop = min(crop, side)
        y0, x0 = rng.integers(0, h - crop + 1), rng.integers(0, w - crop + 1)
        oy, ox = rng.integers(0, side - crop + 1, size=2)
        patch = arr[y0 : y0 + crop, x0 : x0 + crop] * cfg.clutter_fragment_gain
        view = canvas[oy : oy + crop, ox : ox + crop]
        np.maximum(view, patch, out=view)
    s = int(round(side * rng.uniform(*cfg.clutter_scale)))
    s = min(max(s, 1), side)
    oy, ox = rng.integers(0, side - s + 1, size=2)
    view = canvas[oy : oy + s, ox : ox + s]
    np.maximum(view, _resize(item, s), out=view)
    canvas *= rng.uniform(*cfg.clutter_brightness)
    if cfg.clutter_noise > 0:
        canvas += rng.normal(0.0, cfg.clutter_noise, size=(side, side, 1)).astype(np.float32)
    out = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    gray = bool((out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all())
    return encode_png(out[..., 0] if gray else out)
