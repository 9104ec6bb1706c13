"""What ``data.preserve_order`` costs: one train pass with blocks handed out in a fixed
order vs as they finish, interleaved in one process.

    .venv/bin/python benchmarks/preserve_order.py [--reps 3] [--consumers 2] [--write]

Reads the prepared Fashion-MNIST train split (``make demo`` or ``jobs.prepare`` first)
through ``build_split`` with the CPU default config's train transform, split with
``streaming_split(consumers, equal=True)`` as Ray Train's DataConfig does, each split
consumed by its own thread with ``iter_torch_batches`` + ``TorchCollate`` (the workers'
path, without a model). Local Ray with 3 CPUs, as the config's ``ray.local_num_cpus``.
Reported: images/s per mode and the ratio, after one untimed warm-up pass of each.
"""

from __future__ import annotations

import argparse
import os
import threading
from pathlib import Path

import harness  # benchmarks/harness.py (the script's own folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]

SECTION = "## Ingest: data.preserve_order (benchmarks/preserve_order.py)"


def one_pass(ds, consumers: int, cfg) -> dict:
    """Rows delivered as torch batches by ``consumers`` threads: a harness window (images/s,
    CPU-s per image of this process and Ray's)."""
    from raylens.runtime.ingest import TorchCollate

    splits = ds.streaming_split(consumers, equal=True)
    counts = [0] * consumers

    def consume(k: int) -> None:
        for b in splits[k].iter_torch_batches(
            batch_size=cfg.data.batch_size, collate_fn=TorchCollate(cfg.data)
        ):
            counts[k] += len(b["id"])

    meter = harness.Meter(tree=True)
    threads = [threading.Thread(target=consume, args=(k,)) for k in range(consumers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return meter.stop(sum(counts))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--consumers", type=int, default=2, help="streaming_split consumers")
    harness.add_output_args(p)
    args = p.parse_args()

    import ray
    from raylens import config as C
    from raylens.runtime.ingest import build_split
    from raylens.schema import RunConfig
    from raylens.storage import Storage

    os.chdir(REPO)
    cfg = C.load(RunConfig, Path("jobs/configs/fashion_mnist.yaml").read_text(), [])
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False

    def one(preserve: bool) -> dict:
        ctx.execution_options.preserve_order = preserve
        ds, _ = build_split(cfg, "train", Storage(cfg.storage))
        return one_pass(ds, args.consumers, cfg)

    modes = {"false": False, "true": True}
    runs, _ = harness.interleave(
        {k: lambda v=v: one(v) for k, v in modes.items()},
        args.reps,
        warmup=True,
        order=lambda rnd: list(modes),
        unit="images",
    )
    ray.shutdown()
    rows = int(runs["false"][-1]["items"])
    off, on = (harness.summarize(runs[k]) for k in modes)
    lines = [
        *harness.heading(SECTION),
        f"One train pass of Fashion-MNIST ({rows:,} images, "
        f"`jobs/configs/fashion_mnist.yaml`'s transform, batches of {cfg.data.batch_size}) "
        f"through `build_split` + `streaming_split({args.consumers})` + `iter_torch_batches`, "
        f"Ray with 3 CPUs; median of {args.reps} interleaved passes after a warm-up. CPU-ms "
        "per image: this process and its descendants (Ray's processes), sampled.",
        "",
        "| `data.preserve_order` | images/s (median) | CPU-ms per image (median) | passes |",
        "|---|---:|---:|---|",
        f"| false (blocks as they finish) | {off['ips']:,.0f} | "
        f"{1000 * off['cpu_per_item']:.3f} | {harness.rates(runs['false'])} |",
        f"| true (fixed order) | {on['ips']:,.0f} | {1000 * on['cpu_per_item']:.3f} | "
        f"{harness.rates(runs['true'])} |",
        "",
        f"- Fixed order delivers **{on['ips'] / off['ips']:.2f}x** the images/s of the default.",
        "",
    ]
    harness.emit(SECTION, lines, args.write)


if __name__ == "__main__":
    main()
