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

import torch
import torch.nn.functional as F


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
    """``T² · KL(temper(target, T) || softmax(logits / T)) + α · CE(logits, labels)``."""
    t = temperature
    p = temper(target.float(), t)
    log_q = F.log_softmax(logits.float() / t, dim=1)
    kl = F.kl_div(log_q, p, reduction="batchmean")
    return t * t * kl + alpha * F.cross_entropy(logits.float(), labels)
