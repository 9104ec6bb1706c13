"""Validation with BatchNorm running statistics vs precise BN, on one training trajectory.

    .venv/bin/python benchmarks/precise_bn.py [--lrs 0.025 0.003] [--seeds 0 1] [--write]

Trains ``vgg_s8`` + a linear head on Fashion-MNIST (the IDX files of
``raylens.data.fashion_mnist.default_dir``: the Debian ``dataset-fashion-mnist`` package,
else a download; 55,000 train images, the other 5,000 as validation) in this process, as
the Tune benchmark's trials do: batch 256, 30 steps an epoch, AdamW from
``raylens.loop.build_optimizer`` (weight decay 0.01, none on norms and biases),
0.5-epoch warmup, cosine over 8 epochs, label smoothing 0.05. After every epoch the same
model is validated twice: with the running statistics training keeps (``model.eval()``)
and after ``raylens.loop.precise_bn`` over the last 8 training batches
(``train.precise_bn_batches: 8``), on a copy, so the trajectory is one and the same.
Accuracy, not speed: no timing.
``--write`` replaces this script's section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import gzip
from pathlib import Path

import harness  # benchmarks/harness.py (the script's own folder is on sys.path)
import numpy as np
import torch
from raylens.data import fashion_mnist
from raylens.loop import build_optimizer, precise_bn, warmup_cosine
from raylens.models.small import FMNIST_MEAN, FMNIST_STD, VGGSmall
from raylens.schema import TrainConfig
from torch import nn

SECTION = "## Precise BN vs running statistics (benchmarks/precise_bn.py)"


def load() -> tuple[torch.Tensor, torch.Tensor]:
    root = Path(fashion_mnist.default_dir())

    def read(key: str) -> np.ndarray:
        name = fashion_mnist.FILES[key]
        return fashion_mnist.parse_idx(gzip.decompress((root / f"{name}.gz").read_bytes()))

    x = read("train_images")[:, None]
    x = (torch.tensor(x, dtype=torch.float32) / 255 - FMNIST_MEAN[0]) / FMNIST_STD[0]
    return x.expand(-1, 3, -1, -1), torch.tensor(read("train_labels"), dtype=torch.int64)


def run(x, y, lr: float, seed: int, epochs: int, steps: int = 30, bs: int = 256) -> list:
    torch.manual_seed(seed)
    net = VGGSmall(8)
    model = nn.Sequential(net, nn.Linear(net.num_features, 10))
    opt = build_optimizer(model, TrainConfig(lr=lr, weight_decay=0.01))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(8 * steps, steps // 2, 0.0))
    order = torch.randperm(55_000, generator=torch.Generator().manual_seed(seed))
    loss_fn, recent, rows, k = nn.CrossEntropyLoss(label_smoothing=0.05), [], [], 0
    xv, yv = x[55_000:], y[55_000:]
    for epoch in range(1, epochs + 1):
        model.train()
        for _ in range(steps):
            i = order[(k * bs) % 55_000 :][:bs]
            k += 1
            loss = loss_fn(model(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            recent = (recent + [x[i]])[-8:]
        precise = copy.deepcopy(model)
        precise_bn(precise, recent, None)
        with torch.no_grad():
            top1 = [(m.eval()(xv).argmax(1) == yv).float().mean().item() for m in (model, precise)]
        rows.append((epoch, *top1))
        harness.log(
            f"lr {lr} seed {seed} epoch {epoch}: running {top1[0]:.4f}, precise {top1[1]:.4f}"
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lrs", type=float, nargs="+", default=[0.025, 0.003])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--epochs", type=int, default=4)
    harness.add_output_args(p)
    args = p.parse_args()
    torch.set_num_threads(2)
    x, y = load()
    results = {(lr, s): run(x, y, lr, s, args.epochs) for lr in args.lrs for s in args.seeds}
    head = "| lr | seed | " + " | ".join(f"epoch {e}" for e in range(1, args.epochs + 1)) + " |"
    argv = ["--lrs", *map(str, args.lrs), "--seeds", *map(str, args.seeds)]
    argv += ["--epochs", str(args.epochs), "--write"]
    lines = [
        *harness.heading(SECTION, argv),
        f"{torch.get_num_threads()} torch threads. Validation top-1 (5,000 images) after each "
        "epoch of one training run, `running` / `precise` (running statistics / precise BN "
        "over the last 8 training batches):",
        "",
        head,
        "|---|---|" + "---:|" * args.epochs,
    ]
    for (lr, s), rows in results.items():
        cells = " | ".join(f"{a:.3f} / {b:.3f}" for _, a, b in rows)
        lines.append(f"| {lr} | {s} | {cells} |")
    gaps = [b - a for rows in results.values() for _, a, b in rows[:2]]
    lines += [
        "",
        f"- Over epochs 1-2 precise BN reads {100 * float(np.mean(gaps)):+.1f} points on average "
        "(same weights): the running statistics, an average over past weights, lag the model "
        "while the learning rate is high, and swing between epochs. ASHA's rungs, early "
        "stopping and the best-checkpoint choice all rank on what validation measures.",
        "",
    ]
    harness.emit(SECTION, lines, args.write)


if __name__ == "__main__":
    main()
