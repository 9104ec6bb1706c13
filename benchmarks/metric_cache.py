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
from pathlib import Path

import harness  # benchmarks/harness.py (the script's own folder is on sys.path)

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
    harness.add_output_args(p)
    args = p.parse_args()

    import json

    import pyarrow.parquet as pq
    import torch
    from raylens import config as C
    from raylens.loop import build_optimizer
    from raylens.models.fusion import l2_concat
    from raylens.schema import RunConfig
    from raylens.tasks.metric import build_fusion

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

    def epoch(variant: str) -> dict:
        """One epoch: a harness window (images/s, CPU-s per image; ``seconds`` per epoch)."""
        torch.manual_seed(0)
        model = build_fusion(cfg, dims, 5)
        opt = build_optimizer(model, cfg.train)
        model.train()
        order = torch.randperm(len(images))
        meter = harness.Meter()
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
        return meter.stop(steps * bs)

    runs, _ = harness.interleave(
        {v: lambda v=v: epoch(v) for v in ("cached", "recompute")},
        args.reps,
        warmup=True,
        unit="images",
    )
    summary = {k: harness.summarize(v) for k, v in runs.items()}
    med = {k: s["seconds"] for k, s in summary.items()}
    cpu_ms = {k: 1000 * s["cpu_per_item"] for k, s in summary.items()}
    ratio = med["recompute"] / med["cached"]
    names = ", ".join(f"`{n}` ({d}-d)" for (n, _, _), d in zip(backbones, dims, strict=True))
    secs = {k: harness.rates(v, "seconds", ".2f") for k, v in runs.items()}
    text = f"""{chr(10).join(harness.heading(SECTION))}
One epoch of {steps} steps x {bs} Fashion-MNIST train images of the fusion model of
`jobs/configs/metric_fashion_mnist.yaml` (gate + `{cfg.metric.fusion}` head ->
{cfg.metric.embedding_dim}-d, ProxyAnchor), frozen backbones {names}; images decoded and
transformed once up front for both variants (decode not timed). CPU-ms per image: this
process's CPU time over the epoch.

| variant | median s / epoch | median CPU-ms per image | runs (s) |
|---|---:|---:|---|
| cached features | {med["cached"]:.2f} | {cpu_ms["cached"]:.3f} | {secs["cached"]} |
| recompute backbone features every step | {med["recompute"]:.2f} | {cpu_ms["recompute"]:.3f} | {secs["recompute"]} |

| ratio | value | target | |
|---|---:|---:|---|
| epoch time, recompute / cached | {ratio:.1f} | >= {TARGET:g} | {"met" if ratio >= TARGET else "NOT met"} |
| CPU per image, recompute / cached | {cpu_ms["recompute"] / cpu_ms["cached"]:.1f} | | |
"""
    harness.emit(SECTION, text, args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
