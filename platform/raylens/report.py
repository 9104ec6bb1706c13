"""Run reports: learning curves, confusion matrix, per-class F1, sample predictions, report.md.

Pure (matplotlib, no Ray). Every plot is returned as PNG bytes so the caller writes it to
any storage (local, ``s3://``, ``gs://``); :func:`write_report` does that for a run dir::

    <run>/report/report.md
    <run>/report/learning_curves.png
    <run>/report/confusion_matrix.png     (classification)
    <run>/report/per_class_f1.png         (multi-label; classification too)
    <run>/report/val_samples.png

Classes with no sample in a split are shown as absent there (not as F1 0) and left out of
the macro line, as the metrics leave them out of macro averages.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: headless workers, CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from raylens.rundir import REPORT  # noqa: E402
from raylens.storage import Storage, join  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def learning_curves(history: Sequence[dict], metric: str) -> bytes:
    """Train/val loss and the validation ``metric`` against optimizer steps.

    ``history`` rows are the run dir's metric rows (``step``, ``epoch``, ``train/loss``,
    ``val/loss``, ``val/<metric>``); validation can be per epoch or every N steps.
    """
    rows = sorted(history, key=lambda r: r["step"])
    steps = [r["step"] for r in rows]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4))
    for key, style in (("train/loss", "o-"), ("val/loss", "s-")):
        ys = [r.get(key) for r in rows]
        if any(y is not None for y in ys):
            ax_loss.plot(steps, [np.nan if y is None else y for y in ys], style, label=key, ms=3)
    ax_loss.set(xlabel="optimizer step", ylabel="loss", title="loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ys = [r.get(f"val/{metric}", np.nan) for r in rows]
    ax_metric.plot(steps, ys, "o-", color="tab:green", ms=3, label=f"val/{metric}")
    best = [(s, y) for s, y, r in zip(steps, ys, rows, strict=True) if r.get("best")]
    if best:
        ax_metric.plot(*best[-1], "*", color="tab:red", ms=14, label="best")
    ax_metric.set(xlabel="optimizer step", ylabel=metric, title=f"validation {metric}")
    ax_metric.legend()
    ax_metric.grid(alpha=0.3)
    # epoch boundaries as light vertical lines
    ends = [r["step"] for r in rows if r.get("epoch_end", True)]
    for ax in (ax_loss, ax_metric):
        for s in ends:
            ax.axvline(s, color="grey", alpha=0.15, lw=0.8)
    return _png(fig)


def confusion_matrix(cm: Sequence[Sequence[int]], classes: Sequence[str], title: str) -> bytes:
    """Row-normalized confusion matrix (true × predicted) with counts in the cells."""
    counts = np.asarray(cm, dtype=np.int64)
    rows = counts.sum(axis=1, keepdims=True)
    norm = np.divide(counts, np.maximum(rows, 1), dtype=np.float64)
    n = len(classes)
    size = max(5.0, 0.55 * n + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of true class")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(
                        j,
                        i,
                        str(counts[i, j]),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black",
                    )
    return _png(fig)


def per_class_f1(
    f1: Sequence[float], classes: Sequence[str], title: str, absent: Sequence[int] = ()
) -> bytes:
    """Horizontal bars of per-class F1, sorted, with the macro mean (over the classes not in
    ``absent``) as a line; ``absent`` classes (no sample in the split) are named, unbarred."""
    values = np.asarray(f1, dtype=np.float64)
    missing = set(absent)
    present = [i for i in np.argsort(values, kind="stable") if i not in missing]
    order = sorted(missing) + present  # absent classes at the bottom
    fig, ax = plt.subplots(figsize=(7, max(3.0, 0.3 * len(classes) + 1)))
    bars = [0.0 if i in missing else values[i] for i in order]
    ax.barh(range(len(order)), bars, color="tab:blue")
    ax.set_yticks(
        range(len(order)), [f"{classes[i]} (absent)" if i in missing else classes[i] for i in order]
    )
    if present:
        macro = float(values[present].mean())
        ax.axvline(macro, color="tab:red", ls="--", label=f"macro {macro:.3f}")
        ax.legend(loc="lower right")
    ax.set(xlim=(0, 1), xlabel="F1", title=title)
    return _png(fig)


def sample_grid(
    images: np.ndarray, true: Sequence[str], pred: Sequence[str], title: str, cols: int = 8
) -> bytes:
    """A grid of images ``[n, h, w, 3]`` uint8 titled ``pred / true`` (green right, red wrong)."""
    n = len(images)
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.1 * rows), squeeze=False)
    for k, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if k >= n:
            continue
        ax.imshow(images[k])
        ok = true[k] == pred[k]
        ax.set_title(f"{pred[k]}\n({true[k]})", fontsize=7, color="green" if ok else "red")
    fig.suptitle(f"{title}: predicted (true)", fontsize=10)
    return _png(fig)


@dataclass
class Samples:
    """Validation images with predictions, for :func:`sample_grid`."""

    images: np.ndarray  # [n, h, w, 3] uint8
    true: list[str] = field(default_factory=list)
    pred: list[str] = field(default_factory=list)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _scalars(metrics: dict) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def render_markdown(
    *,
    run: str,
    summary: dict[str, Any],
    metric: str,
    best: dict | None,
    splits: dict[str, dict],
    classes: Sequence[str],
    images: Sequence[str],
    multi_label: bool,
) -> str:
    """``report.md``: what was trained, the final metrics per split, and the plots."""
    lines = [f"# Run report: {run}", ""]
    lines += [f"- **{k}**: {v}" for k, v in summary.items()]
    if best:
        lines.append(
            f"- **best checkpoint**: `{best['checkpoint']}` (epoch {best['epoch']}, "
            f"selected by val {metric})"
        )
    lines += ["", "## Final metrics (best checkpoint)", ""]
    names = sorted({k for m in splits.values() for k in _scalars(m)})
    lines.append("| metric | " + " | ".join(splits) + " |")
    lines.append("|---|" + "---:|" * len(splits))
    for name in names:
        lines.append(
            f"| {name} | " + " | ".join(_fmt(m.get(name, "")) for m in splits.values()) + " |"
        )
    lines.append("")
    if "test" in splits:
        lines.append("The test split was never used for model selection.")
        lines.append("")
    last = splits.get("test") or splits.get("val") or {}
    if multi_label and last.get("best5"):
        lines += ["## Best and worst classes (F1)", ""]
        lines.append("best: " + ", ".join(f"{c} {f:.3f}" for c, f in last["best5"]))
        lines.append("")
        lines.append("worst: " + ", ".join(f"{c} {f:.3f}" for c, f in last["worst5"]))
        lines.append("")
    absent = {s: absent_classes(m, multi_label) for s, m in splits.items()}
    if any(absent.values()):
        lines += ["## Classes absent from a split", ""]
        lines.append(
            "No sample of these classes is in the split: they are left out of its macro "
            "averages (not scored 0); the dataset card warns of them."
        )
        lines.append("")
        lines += [f"- {s}: " + ", ".join(classes[i] for i in a) for s, a in absent.items() if a]
        lines.append("")
    per_class = _per_class_f1(last, classes, multi_label)
    if per_class is not None and len(classes) <= 50:
        split = "test" if "test" in splits else "val"
        missing = set(absent.get(split, []))
        lines += [f"## Per-class F1 ({split})", "", "| class | F1 |", "|---|---:|"]
        lines += [
            f"| {c} | {'absent' if i in missing else f'{f:.4f}'} |"
            for i, (c, f) in enumerate(zip(classes, per_class, strict=True))
        ]
        lines.append("")
    lines += ["## Plots", ""]
    lines += [f"![{name}]({name})" for name in images]
    lines.append("")
    return "\n".join(lines)


def absent_classes(metrics: dict, multi_label: bool) -> list[int]:
    """Indices of the classes with no sample in a split's ``metrics``: its
    ``absent_classes``, or for metrics written before that key, the classes whose
    confusion-matrix row (single-label) or support (multi-label) is 0."""
    if "absent_classes" in metrics:
        return [int(i) for i in metrics["absent_classes"]]
    if multi_label and metrics.get("per_class"):
        supports = [v.get("support") for v in metrics["per_class"].values()]
        return [i for i, n in enumerate(supports) if n == 0]
    if not multi_label and metrics.get("confusion") is not None:
        return [i for i, row in enumerate(metrics["confusion"]) if sum(row) == 0]
    return []


def _per_class_f1(metrics: dict, classes: Sequence[str], multi_label: bool) -> list[float] | None:
    if multi_label:
        per = metrics.get("per_class")
        if not per:
            return None
        values = list(per.values())  # in class-index order
        return [float(v["f1"]) for v in values]
    f1 = metrics.get("per_class_f1")
    return [float(x) for x in f1] if f1 is not None else None


def write_report(
    storage: Storage,
    run_dir: str,
    *,
    history: Sequence[dict],
    metric: str,
    best: dict | None,
    splits: dict[str, dict],
    classes: Sequence[str],
    multi_label: bool,
    samples: Samples | None,
    summary: dict[str, Any],
    extra_images: dict[str, bytes] | None = None,
) -> str:
    """Writes the PNGs and ``report.md`` under ``<run_dir>/report/``; returns the md's URI.

    ``extra_images``: more PNGs (name -> bytes) a task drew, e.g. an embedding projection.
    """
    out = join(run_dir, REPORT)
    images: list[str] = []

    def put(name: str, png: bytes) -> None:
        storage.write_bytes(join(out, name), png)
        images.append(name)

    if history:
        put("learning_curves.png", learning_curves(history, metric))
    last_split = "test" if "test" in splits else "val"
    last = splits.get(last_split, {})
    if not multi_label and last.get("confusion") is not None:
        put(
            "confusion_matrix.png",
            confusion_matrix(last["confusion"], classes, f"confusion matrix ({last_split})"),
        )
    f1 = _per_class_f1(last, classes, multi_label)
    if f1 is not None:
        put(
            "per_class_f1.png",
            per_class_f1(
                f1, classes, f"per-class F1 ({last_split})", absent_classes(last, multi_label)
            ),
        )
    if samples is not None and len(samples.images):
        put(
            "val_samples.png",
            sample_grid(samples.images, samples.true, samples.pred, "validation samples"),
        )
    for name, png in (extra_images or {}).items():
        put(name, png)
    md = render_markdown(
        run=run_dir,
        summary=summary,
        metric=metric,
        best=best,
        splits=splits,
        classes=classes,
        images=images,
        multi_label=multi_label,
    )
    storage.write_text(join(out, "report.md"), md)
    return join(out, "report.md")
