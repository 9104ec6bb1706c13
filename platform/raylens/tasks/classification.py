"""Single-label classification: cross-entropy loss and metrics from a confusion matrix.

Metrics are computed from summable statistics (the confusion matrix and top-k hit
counts), so N data-parallel workers all-reduce one tensor (:meth:`ClassificationMeter.state`)
and report exactly what a single worker would have.

Macro averages cover the classes present in the evaluated split (true support > 0), as
sklearn's ``precision_recall_fscore_support(labels=present)``: a class with no sample
there has no recall to measure, and scoring it 0 would pull the macro F1 of a perfect
model below 1. Such classes are listed in ``absent_classes`` (class indices) instead.
Support-weighted averages give them weight 0 either way.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

from raylens.rundir import CLASSIFY
from raylens.schema import RunConfig
from raylens.tasks.base import Task, TaskSpec, register_task


def classification_loss(
    logits: torch.Tensor, target: torch.Tensor, *, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Mean cross-entropy. ``logits`` [b, c] (any float dtype), ``target`` [b] int64."""
    return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)


def soft_target_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """timm's ``SoftTargetCrossEntropy``: mean over the batch of ``-sum_c target_c ·
    log softmax(logits)_c``. ``logits``, ``target`` [b, c] (Mixup / CutMix soft targets,
    label smoothing already in them)."""
    return SoftTargetCrossEntropy()(logits.float(), target.float())


def prf_from_counts(
    tp: np.ndarray, fp: np.ndarray, fn: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall, F1 from counts; 0 where undefined (sklearn's zero_division=0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
        recall = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return precision, recall, f1


def averaged(values: np.ndarray, support: np.ndarray) -> tuple[float, float]:
    """``(macro, weighted)`` averages of per-class values over the classes with true
    support > 0 (weights of the weighted average: that support); 0.0 when none has any."""
    present = support > 0
    macro = float(values[present].mean()) if present.any() else 0.0
    total = support.sum()
    weighted = float((values * support).sum() / total) if total > 0 else 0.0
    return macro, weighted


def absent_classes(support: np.ndarray) -> list[int]:
    """Indices of the classes with no true sample: left out of macro averages."""
    return [int(i) for i in np.flatnonzero(support == 0)]


class SumMeter:
    """Statistics that add up over batches and over workers.

    Subclasses keep integer count arrays, named in ``COUNTS``; this base class adds the
    loss sum and the sample count, and packs everything into one float64 vector.
    """

    COUNTS: tuple[str, ...] = ()

    def _add_batch(self, b: int, loss: float | None) -> None:
        if loss is not None:
            self.loss_sum += float(loss) * b
        self.count += b

    def state(self) -> torch.Tensor:
        """Every statistic as one float64 vector, to ``all_reduce(SUM)`` across workers."""
        parts = [getattr(self, name).ravel().astype(np.float64) for name in self.COUNTS]
        return torch.from_numpy(np.concatenate([*parts, [self.loss_sum, float(self.count)]]))

    def load_state(self, state: torch.Tensor) -> None:
        s = state.double().cpu().numpy()
        offset = 0
        for name in self.COUNTS:
            current = getattr(self, name)
            values = np.rint(s[offset : offset + current.size]).astype(np.int64)
            setattr(self, name, values.reshape(current.shape))
            offset += current.size
        self.loss_sum, self.count = float(s[-2]), int(round(s[-1]))


class ClassificationMeter(SumMeter):
    """Accumulates predictions of a single-label classifier.

    Args:
        num_classes: number of classes ``c``.
        topk: the k of the top-k accuracies reported (``top1``, ``top5``); k > c is clipped.
    """

    COUNTS = ("confusion", "hits")

    def __init__(self, num_classes: int, topk: tuple[int, ...] = (1, 5)):
        self.num_classes = num_classes
        self.topk = tuple(topk)
        self.reset()

    def reset(self) -> None:
        self.confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        self.hits = np.zeros(len(self.topk), dtype=np.int64)
        self.loss_sum = 0.0
        self.count = 0

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor, loss: float | None = None) -> None:
        """Adds a batch: ``logits`` [b, c], ``target`` [b]; ``loss`` is the batch's mean loss."""
        logits, target = logits.detach().float().cpu(), target.detach().cpu()
        b = target.shape[0]
        kmax = min(max(self.topk), self.num_classes)
        top = logits.topk(kmax, dim=1).indices  # [b, kmax]
        correct = top.eq(target.view(-1, 1))  # [b, kmax]
        for i, k in enumerate(self.topk):
            self.hits[i] += int(correct[:, : min(k, kmax)].any(dim=1).sum())
        np.add.at(self.confusion, (target.numpy(), top[:, 0].numpy()), 1)
        self._add_batch(b, loss)

    def compute(self) -> dict:
        """Scalars (``top1``, ``top5``, ``loss``, macro/weighted P/R/F1) plus per-class arrays
        (``per_class_f1``: 0.0 for an absent class) and ``absent_classes``."""
        cm = self.confusion
        tp = np.diag(cm).astype(np.float64)
        support = cm.sum(axis=1).astype(np.float64)
        fp = cm.sum(axis=0) - tp
        fn = support - tp
        precision, recall, f1 = prf_from_counts(tp, fp, fn)
        out: dict = {
            f"top{k}": float(self.hits[i] / max(self.count, 1)) for i, k in enumerate(self.topk)
        }
        for name, values in (("precision", precision), ("recall", recall), ("f1", f1)):
            out[f"{name}_macro"], out[f"{name}_weighted"] = averaged(values, support)
        if self.loss_sum or self.count:
            out["loss"] = self.loss_sum / max(self.count, 1)
        out["count"] = self.count
        out["per_class_f1"] = f1.tolist()
        out["absent_classes"] = absent_classes(support)
        out["confusion"] = cm.tolist()
        return out


# ----------------------------------------------------------------------------- task


def _build(cfg: RunConfig, num_classes: int, **_: object) -> Task:
    return Task(
        "classify",
        "label",
        lambda z, y: classification_loss(z, y, label_smoothing=cfg.task.label_smoothing),
        lambda: ClassificationMeter(num_classes),
        "top1",
        soft_loss=soft_target_loss,
    )


register_task(
    TaskSpec(
        "classify",
        kind=CLASSIFY,
        pipeline="images",
        labels="single",
        build=_build,
        default_metric=lambda cfg: "top1",
        doc="single-label classification, cross-entropy",
    )
)
