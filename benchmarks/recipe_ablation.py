"""Training-recipe ablation on Fashion-MNIST: each ingredient on/off, real `jobs.finetune` runs.

    .venv/bin/python benchmarks/recipe_ablation.py [--epochs 15] [--seeds 0 1]
        [--variants base erasing ...] [--out runs/ablation] [--write]

Every variant is the `make demo` config (`jobs/configs/fashion_mnist.yaml`, the shipped
recipe) with the overrides below, trained through `python -m jobs.finetune` on local Ray
(prepare the dataset first: `make demo` or `jobs.prepare`); test top-1 is the best-by-val
checkpoint on the test split, as `make demo` reports it. Runs go round-robin over (seed,
variant) so machine load falls on every variant alike; each finished run's result is kept
in `<out>/results.json`, so an interrupted ablation continues where it stopped (a run
whose `test_metrics.json` exists is not trained again). Wall and CPU seconds per run come
from the harness (the job and its Ray processes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import harness  # benchmarks/harness.py (the script's own folder is on sys.path)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## Training-recipe ablation on Fashion-MNIST (benchmarks/recipe_ablation.py)"
CONFIG = "jobs/configs/fashion_mnist.yaml"

# The "plain" recipe: the demo's crop + flip + label smoothing, nothing the issue-21 recipe
# added; each other variant is plain plus one ingredient, and "all" the shipped combination
# is measured as the config itself ("shipped").
PLAIN = [
    "data.auto_augment=null",
    "data.reprob=0.0",
    "mix.mixup_alpha=0.0",
    "mix.cutmix_alpha=0.0",
    "train.ema_decay=null",
]
VARIANTS: dict[str, list[str]] = {
    "plain": PLAIN,
    "erasing": [*PLAIN, "data.reprob=0.25"],
    "randaugment": [*PLAIN, "data.auto_augment=rand-m9-mstd0.5-inc1"],
    "trivialaugment": [*PLAIN, "data.auto_augment=trivialaugment"],
    "mixup_cutmix": [*PLAIN, "mix.mixup_alpha=0.8", "mix.cutmix_alpha=1.0"],
    "ema": [*PLAIN, "train.ema_decay=0.999", "train.ema_warmup=true"],
    "compile": [*PLAIN, "train.compile=true"],  # speed, not accuracy
    "shipped": [],
}


def train(name: str, overrides: list[str], seed: int, epochs: int, out: str) -> dict:
    """One `jobs.finetune` run (or its kept result): test top-1, val top-1, wall, CPU-s."""
    run_dir = os.path.join(out, name)
    done = os.path.join(run_dir, "test_metrics.json")
    if not os.path.exists(done):
        cmd = [
            sys.executable, "-m", "jobs.finetune", "--config", CONFIG,
            f"run.name={name}", f"run.output_dir={out}", f"run.seed={seed}",
            f"train.epochs={epochs}", *overrides,
        ]  # fmt: skip
        harness.log(" ".join(cmd[1:]))
        log_path = os.path.join(out, f"{name}.log")
        meter = harness.Meter(tree=True)
        with open(log_path, "w") as log:
            proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        w = meter.stop(1)
        if proc.returncode != 0:
            raise SystemExit(f"{name}: jobs.finetune exited {proc.returncode}; see {log_path}")
        timing = {"wall_s": w["seconds"], "cpu_s": w["cpu_s"]}
        with open(os.path.join(run_dir, "ablation_timing.json"), "w") as f:
            json.dump(timing, f)
    with open(done) as f:
        test = json.load(f)
    with open(os.path.join(run_dir, "best.json")) as f:
        best = json.load(f)
    with open(os.path.join(run_dir, "ablation_timing.json")) as f:
        timing = json.load(f)
    return {"test_top1": test["top1"], "val_top1": best["metrics"]["val/top1"], **timing}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", default=os.path.join(REPO, "runs", "ablation"))
    harness.add_output_args(ap)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    keep = os.path.join(args.out, "results.json")
    results: dict = {}
    if os.path.exists(keep):
        with open(keep) as f:
            results = json.load(f)
    for seed in args.seeds:  # round-robin: every variant sees the same machine phases
        for variant in harness.alternate(args.variants, seed):
            name = f"{variant}-e{args.epochs}-s{seed}"
            results[name] = train(name, VARIANTS[variant], seed, args.epochs, args.out)
            harness.log(f"{name}: {results[name]}")
            with open(keep, "w") as f:
                json.dump(results, f, indent=1)

    lines = harness.heading(SECTION)
    lines += [
        f"Each variant: `{CONFIG}` (vgg_s32, 28 px) for {args.epochs} epochs, the listed "
        "overrides, seeds " + ", ".join(map(str, args.seeds)) + "; test top-1 of the best-by-val "
        "checkpoint. Wall and CPU are the whole job (Ray start, prepare not included, "
        "training, val, test, report), median over seeds.",
        "",
        "| variant | overrides beyond plain | test top-1 per seed | mean | vs plain | "
        "wall (min) | CPU-s |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    base = None
    for variant in args.variants:
        rows = [results.get(f"{variant}-e{args.epochs}-s{s}") for s in args.seeds]
        rows = [r for r in rows if r]
        if not rows:
            continue
        mean = statistics.mean(r["test_top1"] for r in rows)
        base = mean if variant == "plain" else base
        delta = f"{100 * (mean - base):+.2f}" if base is not None and variant != "plain" else ""
        extra = [o for o in VARIANTS[variant] if o not in PLAIN] or (
            ["(the shipped config)"] if variant == "shipped" else ["-"]
        )
        lines.append(
            f"| {variant} | {', '.join(f'`{o}`' for o in extra)} | "
            + " / ".join(f"{r['test_top1']:.4f}" for r in rows)
            + f" | {mean:.4f} | {delta} | "
            f"{harness.median(r['wall_s'] for r in rows) / 60:.1f} | "
            f"{harness.median(r['cpu_s'] for r in rows):.0f} |"
        )
    harness.emit(SECTION, lines, args.write)


if __name__ == "__main__":
    main()
