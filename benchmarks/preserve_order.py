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
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "platform"))
import results_md  # noqa: E402

SECTION = "## Ingest: data.preserve_order (benchmarks/preserve_order.py)"


def one_pass(ds, consumers: int, cfg) -> tuple[int, float]:
    """Rows delivered as torch batches by ``consumers`` threads, and the seconds taken."""
    from raylens.data.ingest import TorchCollate

    splits = ds.streaming_split(consumers, equal=True)
    counts = [0] * consumers

    def consume(k: int) -> None:
        for b in splits[k].iter_torch_batches(
            batch_size=cfg.data.batch_size, collate_fn=TorchCollate(cfg.data)
        ):
            counts[k] += len(b["id"])

    t0 = time.perf_counter()
    threads = [threading.Thread(target=consume, args=(k,)) for k in range(consumers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts), time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--consumers", type=int, default=2, help="streaming_split consumers")
    p.add_argument("--write", action="store_true", help="replace this section of RESULTS.md")
    args = p.parse_args()

    import ray
    from raylens import config as C
    from raylens.data.ingest import build_split
    from raylens.schema import RunConfig
    from raylens.storage import Storage

    os.chdir(REPO)
    cfg = C.load(RunConfig, Path("jobs/configs/fashion_mnist.yaml").read_text(), [])
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    rates: dict[bool, list[float]] = {False: [], True: []}
    rows = 0
    for rep in range(args.reps + 1):  # rep 0 warms up
        for preserve in (False, True):
            ctx.execution_options.preserve_order = preserve
            ds, _ = build_split(cfg, "train", Storage(cfg.storage))
            rows, seconds = one_pass(ds, args.consumers, cfg)
            if rep:
                rates[preserve].append(rows / seconds)
            print(f"[bench] rep {rep} preserve_order={preserve}: {rows / seconds:,.0f} img/s")
    ray.shutdown()
    off, on = (statistics.median(rates[k]) for k in (False, True))
    lines = [
        SECTION,
        "",
        f"`{' '.join(['.venv/bin/python', 'benchmarks/preserve_order.py', *sys.argv[1:]])}` on "
        f"{platform.node() or 'this machine'} ({os.cpu_count()} cores), "
        f"{time.strftime('%Y-%m-%d')}. One train pass of Fashion-MNIST ({rows:,} images, "
        f"`jobs/configs/fashion_mnist.yaml`'s transform, batches of {cfg.data.batch_size}) "
        f"through `build_split` + `streaming_split({args.consumers})` + `iter_torch_batches`, "
        f"Ray with 3 CPUs; median of {args.reps} interleaved passes after a warm-up.",
        "",
        "| `data.preserve_order` | images/s (median) | passes |",
        "|---|---:|---|",
        f"| false (blocks as they finish) | {off:,.0f} | "
        + ", ".join(f"{r:,.0f}" for r in rates[False])
        + " |",
        f"| true (fixed order) | {on:,.0f} | " + ", ".join(f"{r:,.0f}" for r in rates[True]) + " |",
        "",
        f"- Fixed order delivers **{on / off:.2f}x** the images/s of the default.",
        "",
    ]
    results_md.emit(SECTION, lines, args.write)


if __name__ == "__main__":
    main()
