"""ASHA vs FIFO: the same space, TPE seed and number of trials, one after the other.

    .venv/bin/python benchmarks/tune_asha.py [--trials 8] [--epochs 8] [--seeds 0 1 2]
        [--grace 2] [--rf 2] [--precise-bn 8] [--write]

Both sweeps run ``jobs.tune`` (each trial a real TorchTrainer run on Fashion-MNIST, the
CPU default config with a small model and short epochs: ``vgg_s8``,
``train.max_steps_per_epoch``) over ``tune_spaces/classify.yaml``. Reported: trial-epochs
each scheduler spent (the cost ASHA saves), its best validation top-1, wall time, per
TPE seed (``--seeds``: one ASHA/FIFO pair each) and their mean: one pair is a sample of
one, and a trial's validation top-1 at an early epoch moves by several points between two
runs of the same config. The first seed's ASHA sweep also retrains its best config
(``tune.retrain=true``) and reports the test top-1: the acceptance sweep. Needs ``make demo`` (or ``jobs.prepare``) to have prepared
data/fashion-mnist first.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import harness  # benchmarks/harness.py (the script's own folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]

SECTION = "## Tune: ASHA vs FIFO (benchmarks/tune_asha.py)"


def sweep(name: str, scheduler: str, seed: int, args, retrain: bool) -> tuple[dict, float]:
    out = Path(args.output_dir)
    shutil.rmtree(out / name, ignore_errors=True)
    shutil.rmtree(out / f"{name}-best", ignore_errors=True)
    cmd = [
        sys.executable, "-m", "jobs.tune",
        "--config", "jobs/configs/fashion_mnist.yaml",
        "--space", "tune_spaces/classify.yaml",
        f"run.output_dir={out}", f"tune.name={name}", f"tune.scheduler={scheduler}",
        f"tune.num_samples={args.trials}", f"tune.retrain={str(retrain).lower()}",
        f"tune.seed={seed}", "model.backbone=vgg_s8", f"train.epochs={args.epochs}",
        f"train.max_steps_per_epoch={args.steps}", "train.warmup_epochs=0.5",
        f"tune.grace_period={args.grace}", f"tune.reduction_factor={args.rf}",
        f"train.precise_bn_batches={args.precise_bn}",
        "ray.local_num_cpus=3",
    ]  # fmt: skip
    t0 = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        subprocess.run(cmd, cwd=REPO, check=True, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    summary = json.loads((out / name / "results" / "summary.json").read_text())
    if retrain:
        summary["retrained"] = json.loads(
            (out / name / "results" / "best_retrained.json").read_text()
        )
    return summary, seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--steps", type=int, default=30, help="train.max_steps_per_epoch")
    p.add_argument("--grace", type=int, default=2, help="tune.grace_period (epochs)")
    p.add_argument("--rf", type=float, default=2.0, help="tune.reduction_factor")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="TPE seeds (tune.seed)")
    p.add_argument(
        "--precise-bn", type=int, default=8,
        help="train.precise_bn_batches (0: validate with BatchNorm running statistics)",
    )  # fmt: skip
    p.add_argument("--output-dir", default=str(REPO / "runs" / "bench-tune"))
    harness.add_output_args(p)
    args = p.parse_args()
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    pairs = []  # (seed, asha summary, asha s, fifo summary, fifo s)
    for k, seed in enumerate(args.seeds):
        sfx = "" if k == 0 else f"-seed{seed}"
        asha, asha_s = sweep(f"asha{sfx}", "asha", seed, args, retrain=k == 0)
        fifo, fifo_s = sweep(f"fifo{sfx}", "fifo", seed, args, retrain=False)
        pairs.append((seed, asha, asha_s, fifo, fifo_s))
        harness.log(f"seed {seed}: ASHA {asha['trial_epochs']} trial-epochs, best "
                    f"{asha['best']['value']:.4f}; FIFO {fifo['trial_epochs']}, best "
                    f"{fifo['best']['value']:.4f}")  # fmt: skip
    asha = pairs[0][1]
    saved = 1 - sum(p[1]["trial_epochs"] for p in pairs) / sum(p[3]["trial_epochs"] for p in pairs)
    gaps = [100 * (p[3]["best"]["value"] - p[1]["best"]["value"]) for p in pairs]
    gap = sum(gaps) / len(gaps)
    test = asha["retrained"]["test"]
    seeds = ", ".join(str(s) for s in args.seeds)
    lines = [
        *harness.heading(SECTION),
        f"{args.trials} trials of `tune_spaces/classify.yaml`, TPE seed(s) {seeds}, vgg_s8 on "
        f"Fashion-MNIST, {args.epochs} epochs of {args.steps} steps x 256 images; ASHA "
        f"grace {args.grace} epochs, reduction factor {args.rf:g}; one trial at a time; validation "
        + (
            f"with precise BN (`train.precise_bn_batches={args.precise_bn}`)."
            if args.precise_bn
            else "with BatchNorm running statistics (`train.precise_bn_batches=0`)."
        ),
        "",
        "| TPE seed | scheduler | trial-epochs | completed / stopped / errored | best val top-1 "
        "| gap (FIFO - ASHA) | wall |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for (seed, a, a_s, f, f_s), g in zip(pairs, gaps, strict=True):
        for name, s, secs in (("ASHA", a, a_s), ("FIFO", f, f_s)):
            st = s["status"]
            lines.append(
                f"| {seed} | {name} | {s['trial_epochs']} | {st['completed']} / "
                f"{st['stopped']} / {st['error']} | {s['best']['value']:.4f} | "
                f"{f'{g:+.2f}' if name == 'ASHA' else ''} | {secs:.0f} s |"
            )
    lines += [
        "",
        f"- Over {len(pairs)} seed(s), ASHA spent **{100 * saved:.0f} % fewer trial-epochs** "
        f"than FIFO (target >= 40 %: {'met' if saved >= 0.4 else 'NOT met'}); its best "
        f"validation top-1 is on average **{gap:+.2f} points** below FIFO's (per seed: "
        f"{', '.join(f'{g:+.2f}' for g in gaps)}; target within 0.5: "
        f"{'met' if gap <= 0.5 else 'NOT met'}).",
        f"- Seed {args.seeds[0]}'s ASHA best config ({json.dumps(asha['best']['params'])}) "
        f"retrained ({args.epochs} epochs): test top-1 **{test['top1']:.4f}** "
        f"(`{asha['retrained']['run_dir']}`).",
        "- Wall time includes each trial's TorchTrainer start (~10-15 s) and is noisy on this "
        "shared machine; trial-epochs are the comparable cost.",
        "",
    ]
    harness.emit(SECTION, lines, args.write)


if __name__ == "__main__":
    main()
