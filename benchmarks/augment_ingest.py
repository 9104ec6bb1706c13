"""What strong augmentation costs at decode time: ``decode_and_transform`` with the train
transform's crop + flip only ("off") vs RandAugment ``rand-m9-mstd0.5-inc1`` + random
erasing ``reprob=0.25`` ("on"), interleaved in one process.

    .venv/bin/python benchmarks/augment_ingest.py [--n28 4000] [--n224 300] [--reps 3]
        [--ray] [--write] [--json FILE]

Workloads (encoded bytes in memory, decoded and transformed one by one, as a Ray Data
decode task does):

- 28 px: Fashion-MNIST PNGs: the prepared ``data/fashion-mnist`` test split when present,
  else the IDX test images (Debian's dataset-fashion-mnist) encoded as prepare does, else
  generated garment-like images; mean/std of ``jobs/configs/fashion_mnist.yaml``.
- 224 px: generated photo-like JPEGs (gradients, soft blobs, noise; quality 90), short side
  256-400 px, aspect 3:4-4:3; ImageNet mean/std.

torch runs with one thread, as in Ray Data workers (Ray sets ``OMP_NUM_THREADS=1``).
Reported: images/s and CPU-ms per image per variant (medians of the rounds), on/off ratios,
and the per-call cost of the pieces (the seeded RNG block, the erasing round trip).
``--ray`` also times one train pass of a prepared copy of the 224 px images through
``build_split`` (Ray Data, 2 CPUs), off vs on, taking ``/tmp/raylens-ray.lock`` first.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from pathlib import Path

import harness  # benchmarks/harness.py (the script's own folder is on sys.path)
from harness import log

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Strong augmentation at decode time (benchmarks/augment_ingest.py)"
RECIPE = {"auto_augment": "rand-m9-mstd0.5-inc1", "reprob": 0.25}
FMNIST_MEAN, FMNIST_STD = (0.286,) * 3, (0.353,) * 3
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- images


def fashion_mnist_pngs(n: int) -> tuple[list[bytes], str]:
    """``n`` Fashion-MNIST PNGs and where they came from."""
    import numpy as np

    prepared = REPO / "data" / "fashion-mnist"
    if (prepared / "dataset.json").exists():
        import pyarrow.parquet as pq

        card = json.loads((prepared / "dataset.json").read_text())
        images: list[bytes] = []
        for f in card["splits"]["test"]["files"]:
            images += pq.read_table(prepared / f, columns=["image"]).column("image").to_pylist()
            if len(images) >= n:
                return images[:n], "prepared data/fashion-mnist test split"
    from raylens.data.fashion_mnist import DEBIAN_DIR, parse_idx
    from raylens.data.images import encode_png

    idx = Path(DEBIAN_DIR) / "t10k-images-idx3-ubyte.gz"
    if idx.exists():
        import gzip

        pixels = parse_idx(gzip.decompress(idx.read_bytes()))[:n]
        return [encode_png(p) for p in pixels], f"IDX test images ({idx}) encoded as PNG"
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:28, 0:28]
    out = []
    for _ in range(n):
        a, b = rng.uniform(6, 10), rng.uniform(9, 13)
        body = ((x - 14) / a) ** 2 + ((y - 15) / b) ** 2 <= 1.0
        arr = np.where(body, 120 + rng.integers(0, 120, size=(28, 28)), 0).astype(np.uint8)
        out.append(encode_png(arr))
    return out, "generated garment-like 28 px PNGs (no Fashion-MNIST found)"


def photo_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """``n`` photo-like JPEGs, short side 256-400 px, aspect 3:4 to 4:3."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        short = int(rng.integers(256, 401))
        long = int(short * rng.uniform(1.0, 4 / 3))
        h, w = (short, long) if rng.random() < 0.5 else (long, short)
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        phase = rng.uniform(0, 2 * math.pi, size=3)
        img = np.stack(
            [
                128 + 90 * np.sin(x / w * math.pi * rng.uniform(0.5, 3) + phase[0]),
                100 + 80 * np.sin(y / h * math.pi * rng.uniform(0.5, 3) + phase[1]),
                90 + 70 * np.cos((x + y) / (w + h) * math.pi * 2 + phase[2]),
            ],
            axis=-1,
        )
        for _ in range(4):
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(15, 80)
            img += np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))[..., None] * (
                rng.uniform(-90, 90, size=3)
            )
        img += rng.normal(0, 6, size=img.shape)
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


# ----------------------------------------------------------------------------- in-process


def transforms(size: int, mean, std) -> dict:
    from raylens.data.transforms import ImageTransform

    base = {"size": size, "train": True, "mean": mean, "std": std}
    if size == 28:  # jobs/configs/fashion_mnist.yaml's crop
        base |= {"scale": (0.8, 1.0), "ratio": (0.9, 1.1)}
    return {"off": ImageTransform(**base), "on": ImageTransform(**base, **RECIPE)}


def decode_pass(images, transform, seeds) -> dict:
    """One pass of ``decode_and_transform`` over all images, in batches of 256."""
    from raylens.data.transforms import decode_and_transform

    rows = 0
    for lo in range(0, len(images), 256):
        pixels, _kept, failures = decode_and_transform(
            images[lo : lo + 256], transform, seeds[lo : lo + 256]
        )
        assert not failures
        rows += len(pixels)
    return {"items": rows}


def pieces(size: int, mean, std, n: int = 2000) -> dict:
    """CPU microseconds per call of the pieces the "on" variant adds."""
    import numpy as np
    from raylens.data.augment import auto_augment, erase_uint8, random_erasing, seeded

    def per_call(fn, reps: int) -> float:  # CPU time: steadier than wall on a shared machine
        t0 = time.process_time()
        for i in range(reps):
            fn(i)
        return (time.process_time() - t0) / reps * 1e6

    def block(i):
        with seeded(i) as use:
            use("auto_augment")
            use("random_erasing")

    from PIL import Image

    rng = np.random.default_rng(0)
    pil = Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8))
    img = np.asarray(pil).transpose(2, 0, 1)  # [3, h, w] view, as the transform passes it
    ra = auto_augment(RECIPE["auto_augment"], size=size, mean=mean)
    fire, skip = random_erasing(1.0, "pixel"), random_erasing(0.0, "pixel")
    reps = max(50, n // (1 if size == 28 else 8))

    def ra_call(i):
        with seeded(i) as use:
            use("auto_augment")
            ra(pil)

    return {
        "seeded_us": per_call(block, n),
        "erase_fires_us": per_call(lambda i: erase_uint8(img, fire, mean, std), reps),
        "erase_skips_us": per_call(lambda i: erase_uint8(img, skip, mean, std), reps),
        "randaugment_us": per_call(ra_call, reps),
    }


# ----------------------------------------------------------------------------- Ray Data


def ray_passes(images: list[bytes], reps: int, tmp: Path) -> dict:
    """Train passes of a prepared copy of ``images`` through ``build_split``, off vs on."""
    import ray
    from raylens import config as C
    from raylens.data.prepare import prepare
    from raylens.runtime.ingest import build_split
    from raylens.schema import PrepareConfig, RunConfig, SourceConfig
    from raylens.storage import Storage

    folder = tmp / "photos"
    for i, data in enumerate(images):
        cls = folder / f"c{i % 4}"
        cls.mkdir(parents=True, exist_ok=True)
        (cls / f"{i:05d}.jpg").write_bytes(data)
    storage = Storage(C.load(RunConfig, None, []).storage)
    out = str(tmp / "prepared")
    card = prepare(
        SourceConfig(uri=str(folder), kind="folder"),
        PrepareConfig(output=out, train_fraction=0.9, val_fraction=0.05, test_fraction=0.05),
        storage,
        progress=False,
    )
    common = [
        f"data.dataset={out}",
        "data.image_size=224",
        f"data.mean={list(IMAGENET_MEAN)}",
        f"data.std={list(IMAGENET_STD)}",
        "data.eval_crop_pct=0.875",
    ]
    cfgs = {
        "off": C.load(RunConfig, None, common),
        "on": C.load(RunConfig, None, common + [f"data.{k}={v}" for k, v in RECIPE.items()]),
    }
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False

    def one(name: str) -> dict:
        ds, _ = build_split(cfgs[name], "train", storage, train=True, epoch=0)
        rows = sum(len(b["id"]) for b in ds.iter_batches(batch_size=256, batch_format="numpy"))
        return {"items": rows}

    runs, _ = harness.interleave(
        {"off": lambda: one("off"), "on": lambda: one("on")},
        reps,
        warmup=True,
        tree=True,
        unit="images",
    )
    ray.shutdown()
    return {"rows": card["splits"]["train"]["count"], "runs": runs}


# ----------------------------------------------------------------------------- report


def table(label: str, runs: dict) -> list[str]:
    off, on = harness.summarize(runs["off"]), harness.summarize(runs["on"])
    cmp = harness.compare(runs["off"], runs["on"])
    cell = lambda s, k: (  # noqa: E731
        f"{s['ips']:,.0f} | {1000 * s['cpu_per_item']:.3f} | {harness.rates(runs[k])}"
    )
    return [
        f"| {label}, off (crop + flip) | {cell(off, 'off')} | |",
        f"| {label}, on (RandAugment + erasing 0.25) | {cell(on, 'on')} | "
        f"**{cmp['ips']:.2f}x** images/s, **{cmp['cpu_per_item']:.2f}x** CPU per image |",
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n28", type=int, default=4000, help="28 px images per pass")
    p.add_argument("--n224", type=int, default=300, help="224 px images per pass")
    p.add_argument("--reps", type=int, default=3, help="timed interleaved rounds")
    p.add_argument("--ray", action="store_true", help="also time build_split (Ray Data)")
    p.add_argument("--ray-n", type=int, default=600, help="224 px images for --ray")
    harness.add_output_args(p, out=True)
    args = p.parse_args()
    sys.path.insert(0, str(REPO))

    import numpy as np
    import torch

    torch.set_num_threads(1)
    from raylens.data.transforms import fresh_seeds

    date = harness.utc_date()
    log(f"encoding {args.n28} 28 px PNGs and {args.n224} 224 px JPEGs")
    small, small_src = fashion_mnist_pngs(args.n28)
    big = photo_jpegs(args.n224)
    sides = [min(im.size) for im in map(_open, big[:50])]
    workloads = {
        "28 px": (small, *transforms(28, FMNIST_MEAN, FMNIST_STD).values()),
        "224 px": (big, *transforms(224, IMAGENET_MEAN, IMAGENET_STD).values()),
    }
    results, micro = {}, {}
    for label, (images, off, on) in workloads.items():
        seeds = fresh_seeds(len(images))
        a = off(_open(images[0]), 1)
        assert np.array_equal(a, off(_open(images[0]), 1))  # replays
        runs, _ = harness.interleave(
            {
                "off": lambda i=images, t=off, s=seeds: decode_pass(i, t, s),
                "on": lambda i=images, t=on, s=seeds: decode_pass(i, t, s),
            },
            args.reps,
            warmup=True,
            unit="images",
        )
        results[label] = runs
        size = off.size
        micro[label] = pieces(size, off.mean, off.std)
        log(f"{label} pieces: {micro[label]}")

    ray_runs = None
    if args.ray:
        import fcntl

        with harness.scratch("raylens-augbench-") as tmp, open("/tmp/raylens-ray.lock", "w") as lk:
            log("waiting for /tmp/raylens-ray.lock")
            fcntl.flock(lk, fcntl.LOCK_EX)
            ray_runs = ray_passes(photo_jpegs(args.ray_n, seed=1), args.reps, tmp)

    lines = [
        *harness.heading(SECTION, date=date),
        f"`decode_and_transform` in one process (torch with 1 thread, as in Ray Data workers), "
        f"batches of 256, the same images and per-sample seeds for both variants; "
        f"{args.reps} rounds interleaved after a warm-up. 28 px: {len(small):,} images, "
        f"{small_src}, Fashion-MNIST config crop (RRC scale 0.8-1, ratio 0.9-1.1). 224 px: "
        f"{len(big):,} generated photo-like JPEGs (short side {min(sides)}-{max(sides)} px in "
        "the first 50), default crop (RRC scale 0.08-1). On: "
        f"`data.auto_augment={RECIPE['auto_augment']}`, `data.reprob={RECIPE['reprob']}` "
        "(pixel mode, 1 box). CPU-ms per image: this process.",
        "",
        "| workload, variant | images/s (median) | CPU-ms per image (median) | rounds (images/s) "
        "| on vs off |",
        "|---|---:|---:|---|---|",
        *table("28 px", results["28 px"]),
        *table("224 px", results["224 px"]),
        "",
        "Pieces, CPU microseconds per call (mean of many calls; same process, same settings):",
        "",
        "| | 28 px | 224 px |",
        "|---|---:|---:|",
    ]
    names = {
        "seeded_us": "`seeded` block: save the three RNG states, 2 x `use(op)`, restore",
        "randaugment_us": "RandAugment on the PIL image, in its `seeded` block",
        "erase_fires_us": "`erase_uint8` when erasing fires (normalize, erase, map back)",
        "erase_skips_us": "`erase_uint8` when it does not (p = 0.75 of samples at 0.25)",
    }
    for key, text in names.items():
        lines.append(f"| {text} | {micro['28 px'][key]:,.0f} | {micro['224 px'][key]:,.0f} |")
    if ray_runs:
        lines += [
            "",
            f"Ray Data (`build_split`, train split of a prepared copy of {args.ray_n} photo-like "
            f"JPEGs: {ray_runs['rows']} rows, 224 px, `ray.init(num_cpus=2)`, one pass per "
            "window, CPU of this process and Ray's, sampled):",
            "",
            "| workload, variant | images/s (median) | CPU-ms per image (median) | rounds "
            "(images/s) | on vs off |",
            "|---|---:|---:|---|---|",
            *table("build_split 224 px", ray_runs["runs"]),
        ]
    others = [w["other_cores"] for r in results.values() for ws in r.values() for w in ws]
    lines += [
        "",
        f"- Other processes kept {harness.median(others):.2f} cores busy (median over the "
        "in-process windows) on this machine: images/s swings with that load, CPU-ms per image "
        "far less, so the CPU ratio is the one to read.",
        "- Erasing works in normalized float space (timm's semantics) and maps back to uint8; "
        "it runs on every sample whether or not a box is drawn (timm decides inside), so its "
        "round trip costs even when nothing is erased.",
        *[f"- {n}" for n in args.note],
    ]
    harness.emit(SECTION, lines, args.write, args.out)
    harness.dump(args.json, {"runs": results, "pieces": micro, "ray": ray_runs})
    return 0


def _open(data: bytes):
    from raylens.data.images import decode_rgb

    return decode_rgb(data)


if __name__ == "__main__":
    raise SystemExit(main())
