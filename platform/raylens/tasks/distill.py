"""Knowledge distillation losses on sparse teacher targets (TinyViT-style fast distillation).

The teacher's output for a sample is stored as its top-k class indices and probabilities;
:func:`dense_from_topk` rebuilds a full distribution, spreading the remaining mass
``1 - sum(top-k)`` uniformly over the other ``C - k`` classes (as TinyViT does).

Two losses:

- :func:`soft_target_ce` — TinyViT's soft-target cross-entropy ``-sum(p_t log q_s)``;
- :func:`kd_kl` — Hinton's ``T² · KL(p_t^T || q_s^T) + α · CE(q_s, y)`` (the seed
  reproduction's variant), where ``p^T ∝ p^(1/T)`` re-tempers a stored distribution
  exactly as ``softmax(z / T)`` would the teacher's logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from raylens.data.transforms import normalize
from raylens.rundir import BEST, CLASSIFY, RunDir
from raylens.schema import RunConfig
from raylens.storage import Storage
from raylens.tasks.base import Task, TaskSpec, register_task
from raylens.tasks.classification import ClassificationMeter, classification_loss


def topk_sparse(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(idx int64 [b, k], prob float32 [b, k])`` of ``softmax(logits)``, highest first.

    Probabilities are rounded to float16 before ranking (what a store keeps), ties
    broken by class index, so two runs whose logits differ in the last bits still agree.
    """
    prob = torch.softmax(logits.float(), dim=1).half().float()
    c = prob.shape[1]
    # rank by (-prob, class index): a stable sort of -prob keeps index order among ties
    order = torch.sort(-prob, dim=1, stable=True).indices[:, : min(k, c)]
    return order, torch.gather(prob, 1, order)


def dense_from_topk(idx: torch.Tensor, prob: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Full teacher distribution ``[b, C]`` from top-k; the rest spread uniformly."""
    idx, prob = idx.long(), prob.float()
    b, k = prob.shape
    rest = (1.0 - prob.sum(dim=1, keepdim=True)).clamp(min=0.0)
    fill = rest / max(num_classes - k, 1) if num_classes > k else torch.zeros_like(rest)
    dense = fill.expand(b, num_classes).clone()
    dense.scatter_(1, idx, prob)
    return dense / dense.sum(dim=1, keepdim=True).clamp(min=1e-12)


def soft_target_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum_c target_c · log softmax(logits)_c``."""
    return -(target * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def temper(prob: torch.Tensor, temperature: float) -> torch.Tensor:
    """``p^(1/T)`` renormalized: ``softmax(z/T)`` computed from ``p = softmax(z)``."""
    if temperature == 1.0:
        return prob
    logp = torch.log(prob.clamp(min=1e-12)) / temperature
    return torch.softmax(logp, dim=1)


def kd_kl(
    logits: torch.Tensor,
    target: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 4.0,
    alpha: float = 0.5,
) -> torch.Tensor:
    """``T² · KL(temper(target, T) || softmax(logits / T)) + α · CE(logits, labels)``.

    ``labels``: int64 [b], or a distribution float [b, C] (mixed hard labels, see
    :func:`mixed_labels`): CE against it is ``lam · CE(y) + (1 - lam) · CE(y')``.
    """
    t = temperature
    p = temper(target.float(), t)
    log_q = F.log_softmax(logits.float() / t, dim=1)
    kl = F.kl_div(log_q, p, reduction="batchmean")
    return t * t * kl + alpha * F.cross_entropy(logits.float(), labels)


def mixed_labels(
    label: torch.Tensor, mix_label: torch.Tensor, mix_lam: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """The hard labels of mixed images as a distribution float [b, C]: ``lam`` on the own
    ``label``, ``1 - lam`` on the partner's ``mix_label`` (all [b])."""
    lam = mix_lam.float().view(-1, 1)
    own = F.one_hot(label.long(), num_classes).float()
    other = F.one_hot(mix_label.long(), num_classes).float()
    return lam * own + (1.0 - lam) * other


# ----------------------------------------------------------------------------- teacher


def load_teacher(run_dir: str, storage: Storage) -> tuple[nn.Module, RunConfig, list[str]]:
    """A run dir's model at its best checkpoint (eval mode), its config and classes."""
    if not run_dir:
        raise ValueError("config key 'distill.teacher' is required: the teacher's run dir")
    from raylens.checkpoint import load_checkpoint
    from raylens.models.classifier import build_model

    run = RunDir(run_dir, storage, what=f"teacher run {run_dir!r}")
    best = run.best()
    if best is None:
        raise FileNotFoundError(f"teacher run {run_dir!r}: no {BEST} (not a finished run?)")
    cfg = run.config()
    classes = run.labels()["classes"]
    model = build_model(cfg.model, len(classes), storage)
    state = load_checkpoint(storage, run.checkpoint(best["checkpoint"]), with_optimizer=False)
    model.load_state_dict(state["model"])
    return model.eval(), cfg, classes


class TeacherInput:
    """Student-augmented uint8 pixels → the teacher's input (its size, mean and std)."""

    def __init__(self, teacher_cfg: RunConfig):
        self.size = teacher_cfg.data.image_size
        self.mean, self.std = tuple(teacher_cfg.data.mean), tuple(teacher_cfg.data.std)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        x = normalize(pixels, self.mean, self.std)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
        return x


# ----------------------------------------------------------------------------- task


def _build(
    cfg: RunConfig,
    num_classes: int,
    *,
    teacher: Callable[[torch.Tensor], torch.Tensor] | None = None,
    **_: object,
) -> Task:
    """Classification validated on hard labels, trained against the teacher: stored top-k
    targets (``teacher_idx``/``teacher_prob`` in the batch) or, with ``teacher`` (online
    mode), the teacher's full softmax on the same input."""
    d = cfg.distill

    def train_loss(logits: torch.Tensor, batch: dict, x: torch.Tensor) -> torch.Tensor:
        if teacher is not None:
            with torch.no_grad():
                target = torch.softmax(teacher(x).float(), dim=1)
        else:
            target = dense_from_topk(
                batch["teacher_idx"].to(logits.device),
                batch["teacher_prob"].to(logits.device),
                num_classes,
            )
        if d.loss == "soft_ce":
            return soft_target_ce(logits, target)
        labels = hard_target(batch).to(logits.device)
        return kd_kl(logits, target, labels, temperature=d.temperature, alpha=d.alpha)

    def hard_target(batch: dict) -> torch.Tensor:
        """The CE term's target: the consumer-side mixer's soft target (online mode), the
        decode-time mix's labels (stored mode), or the plain labels."""
        if "soft_target" in batch:
            return batch["soft_target"]
        label = batch["label"]
        if "mix_lam" in batch:
            return mixed_labels(label, batch["mix_label"], batch["mix_lam"], num_classes)
        return label

    return Task(
        "distill",
        "label",
        lambda z, y: classification_loss(z, y),
        lambda: ClassificationMeter(num_classes),
        "top1",
        train_loss,
        soft_loss=soft_target_ce,
    )


register_task(
    TaskSpec(
        "distill",
        kind=CLASSIFY,
        pipeline="images",
        labels="single",
        build=_build,
        default_metric=lambda cfg: "top1",
        doc="a classifier trained against a teacher (distill.*), validated on hard labels",
    )
)
