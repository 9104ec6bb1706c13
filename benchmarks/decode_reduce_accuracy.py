"""Does reduced-scale JPEG decoding change what a model learns? The same model trained on
the same 12 MP photos with ``data.decode_reduce=true`` and ``=false``, real `jobs.finetune`
runs, 2 seeds each: test top-1, wall and CPU seconds per run, ingest images/s.

    .venv/bin/python benchmarks/decode_reduce_accuracy.py [--images 300] [--share 0.4]
        [--epochs 12] [--seeds 0 1] [--out runs/decode_reduce_acc] [--lock FILE] [--write]

The dataset (no downloads): ``--images`` 12 MP JPEGs (quality 90) made by
``decode_reduce.photos_12mp`` (4000 x 3000 or 3000 x 4000 mosaics of 2-3x upscaled crops,
noise sigma 2). Six classes, the left / middle / right thirds of scikit-learn's
``china.jpg`` and ``flower.jpg``: an image of class c takes each tile from strip c with
probability ``--share`` and from one of the five other strips otherwise, so a random crop
often holds other classes' tiles and the two flower sides look alike (a task the model
learns at 224 px but not perfectly). Written as ``<out>/raw/<class>/<id>.jpg``, prepared
with ``python -m jobs.prepare`` (train / val / test 0.6 / 0.1 / 0.3, seed 0); both are
kept and reused while ``--images`` / ``--share`` stay the same.

Every run: ``python -m jobs.finetune`` with the overrides in ``COMMON`` (timm
``resnet10t`` from scratch at 224 px, batch 32, AdamW, bf16 on CPU, 3 logical CPUs: Ray
Data keeps 1) plus ``data.decode_reduce`` and ``run.seed``; the eval transform (val, test)
follows the same setting. Test top-1 is the best-by-val checkpoint's, as `make demo`
reports it. Runs alternate between the settings (seed 0: reduce first, seed 1: full first)
so machine load falls on both alike; each run's result is kept in ``<out>/results.json``
and not trained again (nor the ingest timing). Wall and CPU seconds come from
``harness.Meter(tree=True)`` (the job and its Ray processes; waiting for ``--lock`` not
counted). Train images/s is the run's own figure (images per second of each epoch,
decode and model together; median over epochs). Then, in one local Ray with 2 CPUs, the
ingest alone: ``build_split`` of the train split + ``iter_torch_batches``, either setting,
``--ingest-rounds`` interleaved rounds after a warm-up: images/s and CPU-ms per image.

``--lock FILE``: hold an exclusive ``flock`` on FILE around each Ray job (a machine where
one Ray runs at a time).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import statistics
import subprocess
import sys
from pathlib import Path

import decode_reduce  # benchmarks/decode_reduce.py: the 12 MP photo maker
import harness  # benchmarks/harness.py (the script's own folder is on sys.path)
from harness import log

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Reduced-scale decoding: accuracy at 12 MP (benchmarks/decode_reduce_accuracy.py)"
SETTINGS = {"reduce": "data.decode_reduce=true", "full": "data.decode_reduce=false"}
COMMON = [
    "data.image_size=224",
    "data.eval_crop_pct=0.875",
    "data.interpolation=bilinear",
    "data.mean=[0.485,0.456,0.406]",
    "data.std=[0.229,0.224,0.225]",
    "data.batch_size=32",
    "model.backbone=resnet10t",
    "task.label_smoothing=0.1",
    "train.lr=0.002",
    "train.warmup_epochs=1",
    "ray.local_num_cpus=3",
]
SPLIT = ["prepare.train_fraction=0.6", "prepare.val_fraction=0.1", "prepare.test_fraction=0.3"]
CHUNK = 10  # images per photos_12mp call (one seed each): bounded memory, any --jobs


# ----------------------------------------------------------------------------- dataset


def strips() -> dict[str, object]:
    """The six classes' pixels: left / middle / right thirds of each sample photo."""
    out = {}
    for name, photo in zip(("china", "flower"), decode_reduce.sources(), strict=True):
        third = photo.shape[1] // 3
        for k, side in enumerate(("left", "middle", "right")):
            out[f"{name}-{side}"] = photo[:, k * third : (k + 1) * third]
    return out


def tile_sources(share: float) -> tuple[dict[str, list], float]:
    """Per class, the list a tile's source is drawn from (the class's strip repeated so it
    is drawn with probability ~``share``), and that probability exactly."""
    regions = strips()
    k = len(regions)
    repeat = max(1, round(share * (k - 1) / (1 - share)))
    lists = {
        c: [arr] * repeat + [a for o, a in regions.items() if o != c] for c, arr in regions.items()
    }
    return lists, repeat / (repeat + k - 1)


def _make_chunk(job: tuple[int, list[str], float, str]) -> int:
    """Writes one chunk of images (``start`` names the first); returns its bytes."""
    start, labels, share, raw = job
    lists, _ = tile_sources(share)
    images = decode_reduce.photos_12mp(
        len(labels), seed=1000 + start // CHUNK, sources_for=lambda i: lists[labels[i]]
    )
    decode_reduce.ORIGINALS.clear()  # the maker keeps its first images for its own checks
    for i, (label, data) in enumerate(zip(labels, images, strict=True)):
        (Path(raw) / label / f"{label}-{start + i:04d}.jpg").write_bytes(data)
    return sum(map(len, images))


def make_images(raw: Path, n: int, share: float, jobs: int) -> dict:
    """``n`` labelled 12 MP JPEGs under ``raw`` (kept when made with the same settings)."""
    import multiprocessing

    import numpy as np

    made = raw / "made.json"
    want = {"images": n, "share": share, "chunk": CHUNK}
    if made.exists() and json.loads(made.read_text())["settings"] == want:
        log(f"reusing the images in {raw}")
        return json.loads(made.read_text())
    classes = list(strips())
    labels = [classes[i % len(classes)] for i in range(n)]
    np.random.default_rng(0).shuffle(labels)
    for c in classes:
        (raw / c).mkdir(parents=True, exist_ok=True)
    chunks = [(s, labels[s : s + CHUNK], share, str(raw)) for s in range(0, n, CHUNK)]
    log(f"making {n} 12 MP images in {raw} ({jobs} processes)")
    meter = harness.Meter()
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        sizes = pool.map(_make_chunk, chunks, chunksize=1)
    w = meter.stop(n)
    info = {
        "settings": want,
        "share_exact": tile_sources(share)[1],
        "mb_per_image": sum(sizes) / n / 1e6,
        "make_s": w["seconds"],
        "make_cpu_s": w["cpu_s"],
    }
    made.write_text(json.dumps(info, indent=1))
    return info


def prepare(raw: Path, ds: Path) -> None:
    """``python -m jobs.prepare`` (a no-op when the dataset is up to date with ``raw``)."""
    cmd = [
        sys.executable, "-m", "jobs.prepare", f"source.uri={raw}", f"prepare.output={ds}",
        "run.seed=0", *SPLIT,
    ]  # fmt: skip
    log(" ".join(cmd[1:]))
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)


# ----------------------------------------------------------------------------- runs


@contextlib.contextmanager
def locked(path: str | None):
    """An exclusive flock on ``path`` (none without one)."""
    if not path:
        yield
        return
    with open(path, "a") as f:
        log(f"waiting for {path}")
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def overrides(ds: Path, setting: str) -> list[str]:
    return [f"data.dataset={ds}", *COMMON, SETTINGS[setting]]


def train(name: str, setting: str, seed: int, args, ds: Path) -> dict:
    """One `jobs.finetune` run: test / val top-1, best epoch, wall, CPU-s, train images/s."""
    out = Path(args.out) / "runs"
    cmd = [
        sys.executable, "-m", "jobs.finetune", f"run.name={name}", f"run.output_dir={out}",
        f"run.seed={seed}", f"train.epochs={args.epochs}", *overrides(ds, setting),
    ]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / f"{name}.log"
    with locked(args.lock), open(log_path, "w") as logf:
        log(" ".join(cmd[1:]))
        meter = harness.Meter(tree=True)
        proc = subprocess.run(cmd, cwd=REPO, stdout=logf, stderr=subprocess.STDOUT)
        w = meter.stop(1)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: jobs.finetune exited {proc.returncode}; see {log_path}")
    run = out / name
    test = json.loads((run / "test_metrics.json").read_text())
    best = json.loads((run / "best.json").read_text())
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    epochs = [r for r in rows if r.get("epoch_end")]
    return {
        "test_top1": test["top1"],
        "val_top1": best["metrics"]["val/top1"],
        "best_epoch": best.get("epoch"),
        "train_ips": harness.median(r["images_per_s"] for r in epochs),
        "wall_s": w["seconds"],
        "cpu_s": w["cpu_s"],
        "other_cores": w["other_cores"],
    }


def ingest(ds: Path, rounds: int) -> dict:
    """The train split through ``build_split`` + ``iter_torch_batches`` either way, in one
    local Ray with 2 CPUs: windows per setting."""
    from raylens import config as C
    from raylens.runtime.ingest import TorchCollate, build_split
    from raylens.runtime.launch import init_ray
    from raylens.schema import RayConfig, RunConfig
    from raylens.storage import Storage

    init_ray(RayConfig(local_num_cpus=2))
    storage = Storage()

    def one_pass(cfg) -> dict:
        split, _ = build_split(cfg, "train", storage)
        rows = 0
        for batch in split.iter_torch_batches(batch_size=32, collate_fn=TorchCollate(cfg.data)):
            assert tuple(batch["image"].shape[1:]) == (3, 224, 224), batch["image"].shape
            rows += batch["image"].shape[0]
        return {"items": rows}

    cfgs = {s: C.load(RunConfig, None, overrides(ds, s)) for s in SETTINGS}
    variants = {s: (lambda c=c: one_pass(c)) for s, c in cfgs.items()}
    runs, _ = harness.interleave(variants, rounds, warmup=True, tree=True, unit="images")
    return runs


# ----------------------------------------------------------------------------- report


def render(args, results: dict, made: dict, card: dict, ingest_runs: dict | None) -> list[str]:
    # the command that reproduces the numbers: without this call's notes and --write
    argv, skip = [], False
    for a in sys.argv[1:]:
        if not skip and a not in ("--note", "--write"):
            argv.append(a)
        skip = a == "--note"
    lines = harness.heading(SECTION, argv, date=results.get("date"))
    lines += [
        f"{made['settings']['images']} JPEGs of 4000 x 3000 / 3000 x 4000 px, quality 90, "
        f"{made['mb_per_image']:.2f} MB on average, 6 classes (thirds of china.jpg and "
        f"flower.jpg; each tile from the class's strip with probability "
        f"{made['share_exact']:.2f}, else another strip), train / val / test "
        + " / ".join(str(card["splits"][k]["count"]) for k in ("train", "val", "test"))
        + f" images (one test image: {1 / card['splits']['test']['count']:.4f} top-1); "
        f"made in {made['make_s']:.0f} s. Each run: `python -m jobs.finetune "
        + " ".join(COMMON)
        + f" train.epochs={args.epochs} data.decode_reduce=...` (resnet10t from scratch); "
        "test top-1 of the best-by-val checkpoint. Wall and CPU: the whole job (Ray start, "
        "training, val, test, report; the job and its Ray processes). Train images/s: the "
        "run's own, median over epochs (decode and model together, Ray Data on 1 CPU).",
        "",
        "| setting | seed | test top-1 | val top-1 (best epoch) | wall s | CPU-s | "
        "train images/s | other load (cores) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by = {
        s: [results["runs"].get(f"{s}-e{args.epochs}-s{k}") for k in args.seeds] for s in SETTINGS
    }
    for s, rows in by.items():
        for seed, r in zip(args.seeds, rows, strict=True):
            if r:
                lines.append(
                    f"| {s} | {seed} | {r['test_top1']:.4f} | {r['val_top1']:.4f} "
                    f"({r['best_epoch']}) | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | "
                    f"{r['train_ips']:.1f} | {r['other_cores']:.2f} |"
                )
    lines += [
        "",
        "| setting | mean test top-1 | seed spread (max - min) | mean wall s | mean CPU-s | "
        "train images/s (mean) | ingest alone: images/s | CPU-ms per image |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    means = {}
    for s, rows in by.items():
        rows = [r for r in rows if r]
        if not rows:
            continue
        top1 = [r["test_top1"] for r in rows]
        means[s] = statistics.mean(top1)
        ing = ["", ""]
        if ingest_runs:
            sm = harness.summarize(ingest_runs[s])
            ing = [f"{sm['ips']:.1f}", f"{1000 * sm['cpu_per_item']:.0f}"]
        lines.append(
            f"| {s} | {means[s]:.4f} | {max(top1) - min(top1):.4f} | "
            f"{statistics.mean(r['wall_s'] for r in rows):.0f} | "
            f"{statistics.mean(r['cpu_s'] for r in rows):.0f} | "
            f"{statistics.mean(r['train_ips'] for r in rows):.1f} | {ing[0]} | {ing[1]} |"
        )
    if len(means) == 2:
        # a seed fixes the initial weights and every sample's crop alike in both settings
        # (the batch order may differ: blocks go out as they finish), so a pair differs in
        # the decoded pixels and little else
        paired = [
            f"seed {k} {a['test_top1'] - b['test_top1']:+.4f}"
            for k, a, b in zip(args.seeds, by["reduce"], by["full"], strict=True)
            if a and b
        ]
        lines += [
            "",
            f"- reduce - full, mean test top-1: {means['reduce'] - means['full']:+.4f} "
            f"(same seed: {', '.join(paired)}).",
        ]
    if ingest_runs:
        c = harness.compare(ingest_runs["full"], ingest_runs["reduce"])
        lines.append(
            f"- Ingest alone (train split, {args.ingest_rounds} rounds after a warm-up, 2 CPUs): "
            f"reduce / full {c['ips']:.2f}x images/s; CPU per image, full / reduce "
            f"{1 / c['cpu_per_item']:.2f}x; rounds (images/s): "
            + "; ".join(f"{s} {harness.rates(ingest_runs[s], spec='.1f')}" for s in SETTINGS)
            + "."
        )
    lines += [f"- {n}" for n in args.note]
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=300, help="12 MP images in the dataset")
    p.add_argument("--share", type=float, default=0.4, help="tiles from the class's own strip")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--ingest-rounds", type=int, default=2, help="0: no ingest-alone timing")
    p.add_argument("--jobs", type=int, default=2, help="processes making the images")
    p.add_argument("--out", default=str(REPO / "runs" / "decode_reduce_acc"))
    p.add_argument("--lock", help="flock this file around each Ray job")
    p.add_argument("--note", action="append", default=[], help="extra note for RESULTS.md")
    harness.add_output_args(p)
    args = p.parse_args()
    sys.path.insert(0, str(REPO / "platform"))
    out = Path(args.out)
    raw, ds = out / "raw", out / "dataset"
    made = make_images(raw, args.images, args.share, args.jobs)
    prepare(raw, ds)

    keep = out / "results.json"
    results = json.loads(keep.read_text()) if keep.exists() else {}
    if results.get("data") != made["settings"]:  # results on other images are not reused
        results = {"data": made["settings"], "runs": {}}
    results.setdefault("date", harness.utc_date())
    for k, seed in enumerate(args.seeds):
        for setting in harness.alternate(list(SETTINGS), k):
            name = f"{setting}-e{args.epochs}-s{seed}"
            if name not in results["runs"]:
                results["runs"][name] = train(name, setting, seed, args, ds)
                keep.write_text(json.dumps(results, indent=1))
            log(f"{name}: {results['runs'][name]}")
    ingest_runs = None
    if args.ingest_rounds:
        kept = results.get("ingest", {})
        if kept.get("rounds") != args.ingest_rounds:
            with locked(args.lock), harness.scratch("decode-reduce-acc-"):
                kept = {"rounds": args.ingest_rounds, "runs": ingest(ds, args.ingest_rounds)}
            results["ingest"] = kept
            keep.write_text(json.dumps(results, indent=1))
        ingest_runs = kept["runs"]
    card = json.loads((ds / "dataset.json").read_text())
    harness.emit(SECTION, render(args, results, made, card, ingest_runs), args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
