"""Multi-label classification: focal loss (or BCE) and per-class metrics at a threshold.

Focal loss (Lin et al. 2017) down-weights easy examples: with ``p_t`` the probability of
the true value, ``FL = -alpha_t (1 - p_t)^gamma log(p_t)``. Defaults alpha 0.65, gamma 2.0
(the xView seed's values). Metrics come from summable per-class TP/FP/FN counts, so
workers all-reduce :meth:`MultiLabelMeter.state`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from raylens.rundir import MULTILABEL
from raylens.schema import RunConfig
from raylens.tasks.base import Task, TaskSpec, register_task
from raylens.tasks.classification import SumMeter, absent_classes, averaged, prf_from_counts


def focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    alpha: float = 0.65,
    gamma: float = 2.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Sigmoid focal loss. ``logits``, ``targets`` [b, c]; targets in {0, 1} (or soft).

    ``alpha`` weights positives (``1 - alpha`` negatives); ``alpha < 0`` disables weighting.
    ``reduction``: ``"mean"`` over all b*c elements, ``"sum"``, or ``"none"``.
    """
    logits, targets = logits.float(), targets.float()
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction {reduction!r}: expected 'mean', 'sum' or 'none'")


def bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Plain binary cross-entropy (mean over b*c), the baseline to focal loss."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float())


class MultiLabelMeter(SumMeter):
    """Accumulates multi-label predictions; a class is predicted when p >= ``threshold``."""

    COUNTS = ("tp", "fp", "fn", "exact")

    def __init__(self, num_classes: int, threshold: float = 0.5):
        self.num_classes = num_classes
        self.threshold = threshold
        self.reset()

    def reset(self) -> None:
        c = self.num_classes
        self.tp, self.fp, self.fn = (np.zeros(c, np.int64) for _ in range(3))
        self.exact = np.zeros(1, np.int64)  # samples with every label right
        self.loss_sum = 0.0
        self.count = 0

    @torch.no_grad()
    def update(
        self, logits: torch.Tensor, targets: torch.Tensor, loss: float | None = None
    ) -> None:
        """Adds a batch: ``logits`` [b, c], ``targets`` [b, c] multi-hot."""
        pred = torch.sigmoid(logits.detach().float().cpu()) >= self.threshold
        true = targets.detach().cpu() > 0.5
        self.tp += (pred & true).sum(0).numpy()
        self.fp += (pred & ~true).sum(0).numpy()
        self.fn += (~pred & true).sum(0).numpy()
        self.exact += int((pred == true).all(1).sum())
        self._add_batch(true.shape[0], loss)

    def compute(self, class_names: list[str] | None = None) -> dict:
        """Macro/weighted P/R/F1 (macro over the classes present in the targets, weights:
        true support), subset accuracy, per-class F1, ``absent_classes`` (indices of classes
        no target has), and the 5 best and 5 worst classes by F1 (among present classes)."""
        tp, fp, fn = (x.astype(np.float64) for x in (self.tp, self.fp, self.fn))
        support = tp + fn
        precision, recall, f1 = prf_from_counts(tp, fp, fn)
        out: dict = {}
        for name, values in (("precision", precision), ("recall", recall), ("f1", f1)):
            out[f"{name}_macro"], out[f"{name}_weighted"] = averaged(values, support)
        out["subset_accuracy"] = float(self.exact[0] / max(self.count, 1))
        if self.loss_sum or self.count:
            out["loss"] = self.loss_sum / max(self.count, 1)
        out["count"] = self.count
        out["absent_classes"] = absent_classes(support)
        names = class_names or [str(i) for i in range(self.num_classes)]
        out["per_class"] = {
            names[i]: {
                "precision": precision[i],
                "recall": recall[i],
                "f1": f1[i],
                "support": int(support[i]),
            }
            for i in range(self.num_classes)
        }
        present = [i for i in np.argsort(-f1, kind="stable") if support[i] > 0]
        out["best5"] = [(names[i], float(f1[i])) for i in present[:5]]
        out["worst5"] = [(names[i], float(f1[i])) for i in present[::-1][:5]]
        return out


# ----------------------------------------------------------------------------- task


def _build(cfg: RunConfig, num_classes: int, **_: object) -> Task:
    t = cfg.task
    if t.loss == "focal":
        loss = lambda z, y: focal_loss(z, y, alpha=t.focal_alpha, gamma=t.focal_gamma)  # noqa: E731
    else:
        loss = bce_loss
    return Task(
        "multilabel",
        "labels",
        loss,
        lambda: MultiLabelMeter(num_classes, t.threshold),
        "f1_weighted",
        soft_loss=loss,  # focal and BCE take soft (mixed) targets in [0, 1] as they are
    )


register_task(
    TaskSpec(
        "multilabel",
        kind=MULTILABEL,
        pipeline="images",
        labels="multi",
        build=_build,
        default_metric=lambda cfg: "f1_weighted",
        doc="multi-label tagging, focal loss or BCE (task.loss)",
    )
)
