"""Metric learning epoch time: training from the feature cache vs recomputing the frozen
backbones' features every step.

    .venv/bin/python benchmarks/metric_cache.py [--images 8192 --reps 3 --write]

Same fusion model (``jobs/configs/metric_fashion_mnist.yaml``: gate + minimal fusion head
-> 512-d, ProxyAnchor), same batches (256), same loop step (bf16 autocast forward, fp32
ProxyAnchor, AdamW with the proxies at their own LR), same images (``--images`` train
images of the prepared Fashion-MNIST, decoded and eval-transformed once, up front, for
each backbone's own preprocessing: decoding is left out of both variants, so the ratio is
a lower bound on what the cache saves a pipeline that also decodes every epoch):

  cached     the step reads the cached features (rows of an in-memory array);
  recompute  the step first runs every frozen backbone (eval, no grad, bf16 autocast) on
             the batch's images, then the same fusion step.

Backbones: the config's run dirs when present (``make``-free: train them with
``jobs/configs/fashion_mnist_seen5.yaml``), else the same architectures at random init
(the cost does not depend on the weights). Rounds alternate the order; medians compared.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import results_md  # benchmarks/results_md.py (the script's own folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "jobs" / "configs" / "metric_fashion_mnist.yaml"
SECTION = "## Metric learning feature cache (benchmarks/metric_cache.py)"
TARGET = 5.0


def load_backbones(cfg):
    """[(name, model in eval mode, transform, mean, std)] for the config's backbones."""
    from raylens.predict import Predictor

    out = []
    for spec in cfg.metric.backbones:
        path = REPO / spec
        if path.exists():
            pred = Predictor.load(str(path))
            out.append((spec, pred, pred.data))
        else:  # same architecture, random init
            arch = {"seen5-vgg32": "vgg_s32", "seen5-vgg16": "vgg_s16"}
            name = next((a for k, a in arch.items() if k in spec), spec)
            pred = Predictor.load(name)  # seeded init
            out.append((f"{name} (random init)", pred, pred.data))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dataset", default=str(REPO / "data" / "fashion-mnist"))
    p.add_argument("--write", action="store_true", help="replace this section of RESULTS.md")
    args = p.parse_args()

    import json

    import pyarrow.parquet as pq
    import torch
    from raylens import config as C
    from raylens.models.fusion import l2_concat
    from raylens.schema import RunConfig
    from raylens.train.loop import build_optimizer
    from raylens.train.metric_run import build_fusion

    cfg = C.load(RunConfig, CONFIG.read_text())
    card = json.loads((Path(args.dataset) / "dataset.json").read_text())
    images, labels = [], []
    for f in card["splits"]["train"]["files"]:
        t = pq.read_table(Path(args.dataset) / f, columns=["image", "label"])
        images += t.column("image").to_pylist()
        labels += t.column("label").to_pylist()
        if len(images) >= args.images:
            break
    images, labels = images[: args.images], torch.tensor(labels[: args.images]) % 5
    backbones = load_backbones(cfg)
    pixels, feats = [], []
    for _name, pred, _data in backbones:  # decode + transform once (not timed)
        x, kept, failures = pred.preprocess(images)
        assert not failures
        x = pred.normalize(torch.from_numpy(x))
        pixels.append(x)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            feats.append(torch.cat([pred.embed(x[i : i + 512]) for i in range(0, len(x), 512)]))
    cached = l2_concat(feats)
    dims = [f.shape[1] for f in feats]
    bs = args.batch_size
    steps = len(images) // bs

    def epoch(variant: str) -> float:
        torch.manual_seed(0)
        model = build_fusion(cfg, dims, 5)
        opt = build_optimizer(model, cfg.train)
        model.train()
        order = torch.randperm(len(images))
        t0 = time.perf_counter()
        for s in range(steps):
            idx = order[s * bs : (s + 1) * bs]
            if variant == "cached":
                x = cached[idx]
            else:
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                    x = l2_concat(
                        [
                            pred.embed(px[idx])
                            for (_, pred, _), px in zip(backbones, pixels, strict=True)
                        ]
                    )
            with torch.autocast("cpu", dtype=torch.bfloat16):
                emb = model(x)
            loss = model.criterion(emb, labels[idx])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    epoch("cached"), epoch("recompute")  # warm-up
    runs: dict[str, list[float]] = {"cached": [], "recompute": []}
    for rep in range(args.reps):
        for v in ("cached", "recompute") if rep % 2 == 0 else ("recompute", "cached"):
            runs[v].append(epoch(v))
            print(f"round {rep + 1} {v}: {runs[v][-1]:.2f} s", flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    ratio = med["recompute"] / med["cached"]
    names = ", ".join(f"`{n}` ({d}-d)" for (n, _, _), d in zip(backbones, dims, strict=True))
    text = f"""{SECTION}

Command: `.venv/bin/python benchmarks/metric_cache.py {" ".join(sys.argv[1:])}`
Date: {time.strftime("%a %b %d %H:%M:%S UTC %Y", time.gmtime())}
Machine: {os.cpu_count()} CPUs, no GPU; Python {platform.python_version()}, torch {torch.__version__}

One epoch of {steps} steps x {bs} Fashion-MNIST train images of the fusion model of
`jobs/configs/metric_fashion_mnist.yaml` (gate + `{cfg.metric.fusion}` head ->
{cfg.metric.embedding_dim}-d, ProxyAnchor), frozen backbones {names}; images decoded and
transformed once up front for both variants (decode not timed).

| variant | median s / epoch | runs (s) |
|---|---:|---|
| cached features | {med["cached"]:.2f} | {", ".join(f"{v:.2f}" for v in runs["cached"])} |
| recompute backbone features every step | {med["recompute"]:.2f} | {", ".join(f"{v:.2f}" for v in runs["recompute"])} |

| ratio | value | target | |
|---|---:|---:|---|
| epoch time, recompute / cached | {ratio:.1f} | >= {TARGET:g} | {"met" if ratio >= TARGET else "NOT met"} |
"""
    print(text)
    if args.write:
        results_md.write_section(results_md.RESULTS, SECTION, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
