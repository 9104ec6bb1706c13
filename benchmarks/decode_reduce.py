"""Reduced-scale JPEG decoding (``data.decode_reduce``): ``decode_and_transform`` to 224 px
with full decodes vs libjpeg's DCT scaling (1/2, 1/4, 1/8, chosen per sample from the seeded
crop) at several ``data.decode_reduce_gap`` values, interleaved in one process, and how far
the reduced pixels are from the full decode's.

    .venv/bin/python benchmarks/decode_reduce.py [--n12mp 24] [--ntile 64] [--nphoto 300]
        [--gaps 1,2] [--quality-gaps 1,1.5,2,3] [--reps 5] [--write] [--json FILE]

Workloads, made from scikit-learn's two sample photos (``china.jpg``, ``flower.jpg``, 640 x
427; no downloads), JPEG quality 90 (4:2:0):

- 12 MP: 4000 x 3000 (or 3000 x 4000) mosaics of crops of the photos, each upscaled 2-3x,
  plus mild noise (sigma 2): a plain upscale compresses far better than a camera photo and
  would flatter decoding.
- tiles: 512-1,024 px squares, a crop upscaled up to 2x, noise sigma 2.
- photos: short side 256-400 px, a crop resized, noise sigma 1 (where reduction should
  rarely fire: at 224 px a crop needs >= 448 px a side even at gap 1).

Transforms: train (random-resized crop, area 0.08-1, ratio 3:4-4:3, flip; fresh seeds, the
same for every variant) and eval (crop_pct 0.875), bilinear. Reported: images/s and CPU-ms
per image (this process; medians of the rounds), the speed-up against the full decode, the
scales picked, and mean / max absolute error and PSNR of the reduced output against the full
decode's output of the same sample (0-255).
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from collections import Counter
from pathlib import Path

import harness  # benchmarks/harness.py (the script's own folder is on sys.path)
from harness import log

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Reduced-scale JPEG decoding (benchmarks/decode_reduce.py)"
SIZE = 224


# ----------------------------------------------------------------------------- images


def sources():
    """scikit-learn's sample photos as RGB arrays (each 427 x 640)."""
    import numpy as np
    import sklearn
    from PIL import Image

    folder = Path(sklearn.__file__).parent / "datasets" / "images"
    return [np.asarray(Image.open(folder / n).convert("RGB")) for n in ("china.jpg", "flower.jpg")]


def _crop(rng, src, w: int, h: int, zoom: float):
    """A ``w`` x ``h`` PIL image: a random crop of ``src`` of ``w / zoom`` x ``h / zoom``
    source pixels (clamped to the source), resized bicubically."""
    from PIL import Image

    sh, sw = src.shape[:2]
    cw, ch = min(sw, max(8, round(w / zoom))), min(sh, max(8, round(h / zoom)))
    x, y = int(rng.integers(0, sw - cw + 1)), int(rng.integers(0, sh - ch + 1))
    return Image.fromarray(src[y : y + ch, x : x + cw]).resize((w, h), Image.BICUBIC)


ORIGINALS: dict[bytes, object] = {}  # the first images of each set, before JPEG encoding
KEEP = 4


def _jpeg(arr, rng, noise: float, keep: bool = False) -> bytes:
    import numpy as np
    from PIL import Image

    arr = arr.astype(np.float32)
    arr += rng.standard_normal(arr.shape, dtype=np.float32) * np.float32(noise)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    if keep:
        ORIGINALS[buf.getvalue()] = img
    return buf.getvalue()


def photos_12mp(n: int, seed: int = 0, sources_for=None) -> list[bytes]:
    """4000 x 3000 (every other one 3000 x 4000) mosaics of 2-3x upscaled photo crops.

    ``sources_for(i)``: the arrays image ``i``'s tiles are cropped from, each tile's drawn
    uniformly from the list (list one twice to weight it); default: the two sample photos.
    """
    import numpy as np

    rng, photos = np.random.default_rng(seed), None if sources_for else sources()
    out = []
    for i in range(n):
        srcs = photos if photos is not None else sources_for(i)
        w, h = (4000, 3000) if i % 2 == 0 else (3000, 4000)
        canvas = np.empty((h, w, 3), np.uint8)
        y = 0
        while y < h:
            rh, x = min(h - y, int(rng.integers(700, 1100))), 0
            while x < w:
                tw = min(w - x, int(rng.integers(900, 1500)))
                tile = _crop(rng, srcs[int(rng.integers(len(srcs)))], tw, rh, rng.uniform(2, 3))
                canvas[y : y + rh, x : x + tw] = np.asarray(tile)
                x += tw
            y += rh
        out.append(_jpeg(canvas, rng, 2.0, keep=i < KEEP))
    return out


def tiles(n: int, seed: int = 1) -> list[bytes]:
    """512-1,024 px squares: photo crops upscaled up to 2x."""
    import numpy as np

    rng, srcs = np.random.default_rng(seed), sources()
    out = []
    for i in range(n):
        side = int(rng.integers(512, 1025))
        tile = _crop(rng, srcs[int(rng.integers(2))], side, side, max(1.0, side / 427))
        out.append(_jpeg(np.asarray(tile), rng, 2.0, keep=i < KEEP))
    return out


def small_photos(n: int, seed: int = 2) -> list[bytes]:
    """Short side 256-400 px, aspect 3:4 to 4:3: photo crops resized."""
    import numpy as np

    rng, srcs = np.random.default_rng(seed), sources()
    out = []
    for i in range(n):
        short = int(rng.integers(256, 401))
        long = int(short * rng.uniform(1.0, 4 / 3))
        w, h = (long, short) if rng.random() < 0.5 else (short, long)
        img = _crop(rng, srcs[int(rng.integers(2))], w, h, rng.uniform(0.7, 1.0))
        out.append(_jpeg(np.asarray(img), rng, 1.0, keep=i < KEEP))
    return out


# ----------------------------------------------------------------------------- measuring


def transform(train: bool, gap: float | None):
    """The train or eval transform at 224 px; ``gap`` None: full decodes."""
    from raylens.data.transforms import ImageTransform

    reduce = {"decode_reduce": gap is not None, "decode_reduce_gap": gap or 1.0}
    if train:
        return ImageTransform(SIZE, train=True, **reduce)
    return ImageTransform(SIZE, train=False, crop_pct=0.875, **reduce)


def decode_pass(images, tf, seeds) -> dict:
    """One pass of ``decode_and_transform`` over all images, in batches of 64."""
    from raylens.data.transforms import decode_and_transform

    rows = 0
    for lo in range(0, len(images), 64):
        pixels, _kept, failures = decode_and_transform(
            images[lo : lo + 64], tf, None if seeds is None else seeds[lo : lo + 64]
        )
        assert not failures, failures[:3]
        rows += len(pixels)
    return {"items": rows}


def picked_scales(images, tf, seeds) -> Counter:
    from PIL import Image

    out = Counter()
    for i, data in enumerate(images):
        img = Image.open(io.BytesIO(data))
        seed = None if seeds is None else int(seeds[i])
        out[tf.reduction(img.format, tf.crop_box(*img.size, seed)[0])] += 1
    return out


def _errors(got, ref) -> dict:
    import numpy as np

    err = got.astype(np.int16) - ref
    mse = float((err.astype(np.float64) ** 2).mean())
    return {
        "mae": float(np.abs(err).mean()),
        "max": int(np.abs(err).max()),
        "psnr": math.inf if mse == 0 else 10 * math.log10(255**2 / mse),
    }


def quality(images, seeds, train: bool, gaps) -> dict:
    """Reduced vs full output of every sample (MAE, max error, PSNR, scales picked), and of
    the first images both against the transform of the image before JPEG encoding
    (``vs_original``, key None: the full decode): how the reduction's error compares with
    the compression's at the output size."""
    import numpy as np
    from raylens.data.transforms import decode_and_transform

    s = seeds if train else None
    ref, _, _ = decode_and_transform(images, transform(train, None), s)
    kept = [i for i, b in enumerate(images) if b in ORIGINALS]
    plain = transform(train, None)
    orig = np.stack([plain(ORIGINALS[images[i]], None if s is None else int(s[i])) for i in kept])
    out = {"vs_original": {None: _errors(ref[kept], orig)}}
    for gap in gaps:
        tf = transform(train, gap)
        got, _, _ = decode_and_transform(images, tf, s)
        out[gap] = {
            **_errors(got, ref),
            "scales": dict(sorted(picked_scales(images, tf, s).items())),
        }
        out["vs_original"][gap] = _errors(got[kept], orig)
    return out


def workload(images, gaps, quality_gaps, reps: int) -> dict:
    from raylens.data.transforms import fresh_seeds

    seeds = fresh_seeds(len(images))
    variants = {}
    for train in (True, False):
        kind = "train" if train else "eval"
        s = seeds if train else None
        for gap in (None, *gaps):
            name = f"{kind} full" if gap is None else f"{kind} gap {gap:g}"
            tf = transform(train, gap)
            variants[name] = lambda i=images, t=tf, s=s: decode_pass(i, t, s)
    runs, _ = harness.interleave(variants, reps, warmup=True, unit="images")
    q = {kind: quality(images, seeds, kind == "train", quality_gaps) for kind in ("train", "eval")}
    return {"runs": runs, "quality": q}


# ----------------------------------------------------------------------------- report


def _gap(name: str) -> float | None:
    return None if name.endswith("full") else float(name.rsplit(" ", 1)[1])


def rows(label: str, res: dict) -> list[str]:
    runs, out = res["runs"], []
    for name, windows in runs.items():
        kind, gap = name.split(" ", 1)[0], _gap(name)
        s = harness.summarize(windows)
        cells = [f"{label}, {name}", f"{s['ips']:,.1f}", f"{1000 * s['cpu_per_item']:.2f}"]
        if gap is None:
            cells += ["", "", "", "", ""]
        else:
            c = harness.compare(runs[f"{kind} full"], windows)
            q = res["quality"][kind][gap]
            scales = ", ".join(f"1/{k}: {v}" for k, v in q["scales"].items() if k > 1) or "none"
            cells += [
                f"**{c['ips']:.2f}x** (rounds {c['paired_median']:.2f}x)",
                f"{1 / c['cpu_per_item']:.2f}x",
                scales,
                f"{q['mae']:.2f} / {q['max']}",
                f"{q['psnr']:.1f}",
            ]
        cells.append(harness.rates(windows, spec=",.1f"))
        out.append("| " + " | ".join(cells) + " |")
    return out


def quality_rows(label: str, res: dict, n: int) -> list[str]:
    out = []
    for kind, by_gap in res["quality"].items():
        vs = by_gap["vs_original"]
        out.append(
            f"| {label}, {kind} | full | | | | | {vs[None]['mae']:.2f} | {vs[None]['psnr']:.1f} |"
        )
        for gap, q in by_gap.items():
            if gap == "vs_original":
                continue
            reduced = sum(v for k, v in q["scales"].items() if k > 1)
            scales = ", ".join(f"1/{k}: {v}" for k, v in q["scales"].items() if k > 1) or "none"
            out.append(
                f"| {label}, {kind} | {gap:g} | {reduced}/{n} ({scales}) | {q['mae']:.2f} | "
                f"{q['max']} | {q['psnr']:.1f} | {vs[gap]['mae']:.2f} | {vs[gap]['psnr']:.1f} |"
            )
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n12mp", type=int, default=24, help="12 MP images per pass")
    p.add_argument("--ntile", type=int, default=64, help="512-1,024 px tiles per pass")
    p.add_argument("--nphoto", type=int, default=300, help="256-400 px photos per pass")
    p.add_argument("--gaps", default="1,2", help="decode_reduce_gap values timed")
    p.add_argument("--quality-gaps", default="1,1.5,2,3", help="gaps whose pixels are compared")
    p.add_argument("--reps", type=int, default=5, help="timed interleaved rounds")
    harness.add_output_args(p, out=True)
    args = p.parse_args()
    sys.path.insert(0, str(REPO / "platform"))
    from PIL import features

    gaps = [float(g) for g in args.gaps.split(",")]
    quality_gaps = sorted({*gaps, *(float(g) for g in args.quality_gaps.split(","))})
    date = harness.utc_date()
    log("making the images")
    sets = {
        "12 MP": photos_12mp(args.n12mp),
        "tiles 512-1024": tiles(args.ntile),
        "photos 256-400": small_photos(args.nphoto),
    }
    sizes = {k: sum(map(len, v)) / len(v) / 1e6 for k, v in sets.items()}
    results = {}
    for label, images in sets.items():
        log(f"{label}: {len(images)} images, {sizes[label]:.2f} MB each on average")
        results[label] = workload(images, gaps, quality_gaps, args.reps)

    lines = [
        *harness.heading(SECTION, date=date),
        f"`decode_and_transform` to {SIZE} px in one process (batches of 64), full decodes vs "
        "`data.decode_reduce` at each gap, the same images and per-sample seeds for every "
        f"variant; {args.reps} rounds interleaved after a warm-up. Pillow "
        f"{features.version('pil')}, libjpeg-turbo {features.version('libjpeg_turbo')}. "
        "Images made from scikit-learn's china.jpg and flower.jpg, quality 90: "
        + "; ".join(f"{k}: {len(v)} images, {sizes[k]:.2f} MB on average" for k, v in sets.items())
        + " (see the script's docstring). CPU-ms per image: this process.",
        "",
        "| workload, variant | images/s (median) | CPU-ms per image (median) | images/s vs full "
        "| CPU vs full | scales picked | error vs full: mean / max | PSNR dB | rounds (images/s) |",
        "|---|---:|---:|---|---:|---|---|---:|---|",
    ]
    for label, res in results.items():
        lines += rows(label, res)
    lines += [
        "",
        "Pixels against the full decode, every sample (train: its seeded crop; eval: the "
        f"center box), by gap; and, for the first {KEEP} images of each set, against the same "
        "transform of the image before JPEG encoding (the `full` row: what quality-90 "
        "compression itself costs at 224 px):",
        "",
        "| workload, transform | gap | samples reduced (scales) | vs full: mean abs error | "
        "max | PSNR dB | vs original: mean abs error | PSNR dB |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for label, res in results.items():
        lines += quality_rows(label, res, len(sets[label]))
    others = [w["other_cores"] for r in results.values() for ws in r["runs"].values() for w in ws]
    lines += [
        "",
        f"- Other processes kept {harness.median(others):.2f} cores busy (median over the "
        "windows): images/s swings with that load, CPU-ms per image far less.",
        "- \"CPU vs full\": full decode's CPU-ms per image over the variant's (> 1: cheaper).",
        *[f"- {n}" for n in args.note],
    ]
    harness.emit(SECTION, lines, args.write, args.out)
    harness.dump(args.json, {"results": results, "mb_per_image": sizes})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
