"""Distillation cost: a student epoch on stored top-k targets vs with an online teacher.

    .venv/bin/python benchmarks/distill.py [--steps 40 --reps 3 --write]
        [--runs STORED_RUN_DIR ONLINE_RUN_DIR]

Same student (``--student``, default vgg_s8 as in jobs/configs/distill_fashion_mnist.yaml),
same teacher (``--teacher``, default vgg_s32, the CPU default; random init: the cost does
not depend on the weights), same in-memory batches, same loop (``raylens.loop.fit``
with the ``distill`` task): stored mode reads each batch's top-k targets, online mode runs
the teacher forward on every step. Rounds interleave (stored, online, ...) and medians are
compared, because the machine is shared. Also reports the bytes a sample and epoch of a real
store (``--store``), vs 4 + 4k, and, with ``--runs``, the end-to-end training images/s
(Ray Data decode + augmentation + loop, from each run's metrics.jsonl) of two real
``jobs.distill`` runs, one with ``distill.mode=stored`` and one with ``distill.mode=online``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import harness  # benchmarks/harness.py (the script's own folder is on sys.path)
import torch
from raylens import config as C
from raylens.loop import Hooks, fit
from raylens.models.classifier import build_model
from raylens.schema import RunConfig
from raylens.tasks import create_task
from raylens.tasks.distill import topk_sparse

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## Distillation (benchmarks/distill.py)"


def run(mode: str, batches: list[dict], teacher, steps: int, cfg: RunConfig) -> dict:
    """One epoch of ``steps`` steps timed after 3 untimed warm-up steps: a harness window
    (images/s, CPU-s per image)."""
    torch.manual_seed(0)
    student = build_model(cfg.model, 10)
    cfg = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, name="distill"))
    task = create_task(cfg, 10, teacher=teacher if mode == "online" else None)
    meter: list[harness.Meter] = []
    out: list[dict] = []

    def timed(epoch):
        for i in range(steps + 3):
            if i == 3:
                meter.append(harness.Meter())
            yield batches[i % len(batches)]
        out.append(meter[0].stop(steps * batches[0]["image"].shape[0]))

    fit(
        student,
        task,
        cfg.train,
        train_batches=timed,
        val_batches=lambda: batches[:1],
        steps_per_epoch=steps + 3,
        device=torch.device("cpu"),
        hooks=Hooks(log=lambda m: None),
        channels_last=True,
    )
    return out[0]


def epoch_rates(run_dir: str) -> list[float]:
    """Training images/s of each epoch after the first (warm-up) from a run's metrics.jsonl."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r["images_per_s"] for r in rows if r.get("epoch_end") and r["epoch"] > 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--store", default=os.path.join(REPO, "data", "fashion-mnist-teacher-top5"))
    ap.add_argument("--student", default="vgg_s8")
    ap.add_argument("--teacher", default="vgg_s32")
    ap.add_argument("--runs", nargs=2, metavar=("STORED", "ONLINE"), help="two jobs.distill runs")
    harness.add_output_args(ap)
    args = ap.parse_args()
    cfg = C.load(
        RunConfig,
        None,
        [
            f"model.backbone={args.student}",
            "train.epochs=1",
            "train.warmup_epochs=0",
            "train.grad_clip=null",
            "train.amp=auto",
            "distill.topk=5",
        ],
    )
    g = torch.Generator().manual_seed(0)
    teacher_model = build_model(
        C.load(RunConfig, None, [f"model.backbone={args.teacher}"]).model, 10
    ).eval()
    teacher_model = teacher_model.to(memory_format=torch.channels_last)

    def teacher(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return teacher_model(x.contiguous(memory_format=torch.channels_last))

    batches = []
    for _ in range(8):
        x = torch.randn(args.batch_size, 3, 28, 28, generator=g)
        with torch.no_grad():
            idx, prob = topk_sparse(teacher(x).float(), 5)
        batches.append(
            {
                "image": x,
                "label": torch.randint(0, 10, (args.batch_size,), generator=g),
                "teacher_idx": idx,
                "teacher_prob": prob,
            }
        )
    results, _ = harness.interleave(
        {m: lambda m=m: run(m, batches, teacher, args.steps, cfg) for m in ("stored", "online")},
        args.reps,
        unit="images",
    )
    summary = {m: harness.summarize(v) for m, v in results.items()}
    med = {m: s["ips"] for m, s in summary.items()}
    cpu_ms = {m: 1000 * s["cpu_per_item"] for m, s in summary.items()}
    ratio = med["online"] / med["stored"]  # epoch time stored / online
    store_line = "no store found (run jobs.teacher_logits first)"
    store_card = os.path.join(args.store, "store.json")
    if os.path.exists(store_card):
        with open(store_card) as f:
            card = json.load(f)
        b = card["bytes_per_sample_epoch"]
        cols = ", ".join(f"{c} {v:.2f}" for c, v in b["by_column"].items())
        store_line = (
            f"`{os.path.relpath(args.store, REPO)}`: {card['rows_per_epoch']:,} samples x "
            f"{card['epochs']} epochs, k={card['k']}: **{b['without_id']:.2f} bytes** a sample "
            f"and epoch besides the id (bound 4 + 4k = {b['bound']}, 1.1x = "
            f"{1.1 * b['bound']:.1f}); per column: {cols}"
        )
    runs_text = ""
    if args.runs:
        e2e = {m: epoch_rates(d) for m, d in zip(("stored", "online"), args.runs, strict=True)}
        e2e_med = {m: harness.median(v) for m, v in e2e.items()}
        e2e_ratio = e2e_med["online"] / e2e_med["stored"]
        runs_text = f"""
End to end (`jobs.distill`, Ray Data decode + augmentation + the loop, 1 Train worker;
training images/s per epoch from each run's `metrics.jsonl`, epochs 2 onward):

| run | `distill.mode` | median images/s | epochs |
|---|---|---:|---|
| `{os.path.relpath(args.runs[0], REPO)}` | stored | {e2e_med["stored"]:,.0f} | {", ".join(f"{v:,.0f}" for v in e2e["stored"])} |
| `{os.path.relpath(args.runs[1], REPO)}` | online | {e2e_med["online"]:,.0f} | {", ".join(f"{v:,.0f}" for v in e2e["online"])} |

Epoch time stored / online, end to end: **{e2e_ratio:.2f}** (target <= 0.6:
{"met" if e2e_ratio <= 0.6 else "NOT met"}).
"""
    text = f"""{chr(10).join(harness.heading(SECTION))}
Student `{args.student}` trained by `raylens.loop.fit` (bf16 autocast, channels_last) on the
same {len(batches)} in-memory batches of {args.batch_size} 28 px images, {args.steps} timed
steps after 3 warm-up steps; teacher `{args.teacher}` (bf16 autocast, random init: cost only).
CPU-ms per image: this process's CPU time over the timed steps.

| mode | median images/s | median CPU-ms per image | runs (images/s) |
|---|---:|---:|---|
| stored top-5 targets | {med["stored"]:,.0f} | {cpu_ms["stored"]:.2f} | {harness.rates(results["stored"])} |
| online teacher | {med["online"]:,.0f} | {cpu_ms["online"]:.2f} | {harness.rates(results["online"])} |

| ratio | value | target | |
|---|---:|---:|---|
| epoch time, stored / online | {ratio:.2f} | <= 0.6 | {"met" if ratio <= 0.6 else "NOT met"} |
| CPU per image, stored / online | {cpu_ms["stored"] / cpu_ms["online"]:.2f} | | |

Store size: {store_line}.
{runs_text}"""
    harness.emit(SECTION, text, args.write)


if __name__ == "__main__":
    main()
