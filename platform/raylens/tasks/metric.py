"""Deep metric learning: ProxyAnchor loss, Nearest-Class-Mean and retrieval metrics.

- :class:`ProxyAnchorCriterion`: pytorch-metric-learning's ``ProxyAnchorLoss`` (margin,
  alpha) with an optional miner (``MultiSimilarityMiner``). Its proxies are parameters with
  their own learning-rate multiplier (``lr_mult``, 100 in the official Proxy-Anchor code).
  The loss always runs in float32 outside autocast: under CPU autocast PML would silently
  cast the proxies themselves to bfloat16 (its autocast check is CUDA-only).
- Retrieval (:func:`retrieval_metrics`): Recall@K (a query counts if a same-class item is
  among its K nearest neighbours, itself excluded), precision@1 and MAP@R, computed with
  PML's ``AccuracyCalculator`` and a custom cosine kNN (no faiss). Queries whose class has
  no other item are left out, as PML does.
- NCM (:func:`ncm_topk`): prototypes = the mean embedding of each class's training items
  (re-normalized); a query's classes ranked by cosine similarity to the prototypes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raylens.models.fusion import FusionModel
from raylens.rundir import METRIC
from raylens.schema import RunConfig
from raylens.tasks.base import Task, TaskSpec, register_task

RECALL_KS = (1, 2, 4, 8)


class ProxyAnchorCriterion(nn.Module):
    """ProxyAnchor (+ optional miner); ``proxies`` are learned with ``lr_mult`` x the LR."""

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        margin: float = 0.1,
        alpha: float = 32.0,
        lr_mult: float = 100.0,
        miner: str = "none",
        miner_epsilon: float = 0.1,
    ):
        super().__init__()
        from pytorch_metric_learning import losses, miners

        if num_classes < 2:
            raise ValueError(f"ProxyAnchor needs at least 2 classes, got {num_classes}")
        self.loss = losses.ProxyAnchorLoss(
            num_classes=num_classes, embedding_size=embedding_dim, margin=margin, alpha=alpha
        )
        self.lr_mult = lr_mult
        if miner == "multi_similarity":
            self.miner = miners.MultiSimilarityMiner(epsilon=miner_epsilon)
        elif miner == "none":
            self.miner = None
        else:
            raise ValueError(f"unknown miner {miner!r}; expected 'none' or 'multi_similarity'")

    @property
    def proxies(self) -> torch.Tensor:
        return self.loss.proxies

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(embeddings.device.type, enabled=False):
            emb, y = embeddings.float(), labels.long()
            mined = self.miner(emb, y) if self.miner is not None else None
            return self.loss(emb, y, mined)


# ----------------------------------------------------------------------------- retrieval


def _calculator(ks: Sequence[int], k: int | str):
    from pytorch_metric_learning import distances
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    class _Calc(AccuracyCalculator):
        """PML's calculator with Recall@K (the Proxy-Anchor paper's retrieval metric)."""

        def requires_knn(self):
            return super().requires_knn() + [f"recall_at_{k}" for k in ks]

    def recall(k: int):
        def calculate(self, knn_labels, query_labels, not_lone_query_mask, **kwargs):
            m = not_lone_query_mask
            if not bool(m.any()):
                return 0.0
            hit = (knn_labels[m, :k] == query_labels[m, None]).any(1)
            return hit.float().mean().item()

        return calculate

    for kk in ks:
        setattr(_Calc, f"calculate_recall_at_{kk}", recall(kk))
    return _Calc(
        include=(
            "precision_at_1",
            "mean_average_precision_at_r",
            *(f"recall_at_{k}" for k in ks),
        ),
        k=k,  # neighbours per query: enough for MAP@R (largest class - 1) and every K
        device=torch.device("cpu"),
        knn_func=CustomKNN(distances.CosineSimilarity(), batch_size=2048),
    )


def check_retrievable(labels: np.ndarray | torch.Tensor, what: str, names=None) -> None:
    """Every class needs >= 2 items for retrieval (a query needs another of its class)."""
    values, counts = np.unique(np.asarray(labels), return_counts=True)
    lone = [int(v) for v, c in zip(values, counts, strict=True) if c < 2]
    if lone:
        shown = [names[v] if names is not None else v for v in lone[:5]]
        raise ValueError(
            f"{what}: class(es) {shown} have a single image; retrieval needs at least 2 per class"
        )


def retrieval_metrics(
    embeddings: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = RECALL_KS
) -> dict[str, float]:
    """Recall@K, precision@1 and MAP@R of every item against all others (self excluded)."""
    emb = F.normalize(embeddings.detach().float().cpu(), dim=1)
    y = labels.detach().cpu().long()
    if len(y) < 2:
        raise ValueError(f"retrieval needs at least 2 items, got {len(y)}")
    ks = [k for k in ks if k <= len(y) - 1]
    need = int(torch.bincount(y).max()) - 1  # MAP@R: R = the largest class minus the query
    # "max_bin_count" when it covers every K (PML warns about any int k), else enough for K
    k: int | str = "max_bin_count" if max(ks) <= need else min(len(y) - 1, max(ks))
    acc = _calculator(ks, k).get_accuracy(emb, y, emb, y, ref_includes_query=True)
    out = {f"recall_at_{k}": float(acc[f"recall_at_{k}"]) for k in ks}
    out["precision_at_1"] = float(acc["precision_at_1"])
    out["map_at_r"] = float(acc["mean_average_precision_at_r"])
    return out


# ----------------------------------------------------------------------------- NCM


def class_prototypes(
    embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """(num_classes, dim): each class's mean embedding, L2-normalized. A class without
    items is an error (it could never be predicted)."""
    emb = F.normalize(embeddings.detach().float(), dim=1)
    y = labels.long()
    counts = torch.bincount(y, minlength=num_classes)
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"NCM: class(es) {missing[:5]} have no training embeddings")
    sums = torch.zeros(num_classes, emb.shape[1]).index_add_(0, y, emb)
    return F.normalize(sums / counts[:, None], dim=1)


def ncm_topk(prototypes: torch.Tensor, queries: torch.Tensor, k: int = 3) -> torch.Tensor:
    """(n, k) class indices of the nearest prototypes by cosine similarity."""
    sim = F.normalize(queries.float(), dim=1) @ prototypes.float().T
    return sim.topk(min(k, prototypes.shape[0]), dim=1).indices


def ncm_accuracy(
    prototypes: torch.Tensor, queries: torch.Tensor, labels: torch.Tensor, ks=(1, 3)
) -> dict[str, float]:
    top = ncm_topk(prototypes, queries, max(ks))
    hit = top == labels.long()[:, None]
    return {f"ncm_top{k}": float(hit[:, :k].any(1).float().mean()) for k in ks}


# ----------------------------------------------------------------------------- meter


class MetricMeter:
    """Validation of a metric task: keeps the embeddings and labels it sees and computes
    retrieval metrics over them (every worker evaluates the whole validation set, so its
    numbers equal the others'; ``state`` averages them over workers)."""

    def __init__(self, ks: Sequence[int] = RECALL_KS):
        self.ks = tuple(ks)
        self.embeddings: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.loss_sum = 0.0
        self.batches = 0
        self._merged: dict[str, float] | None = None

    def update(self, embeddings: torch.Tensor, labels: torch.Tensor, loss: float = 0.0) -> None:
        self.embeddings.append(embeddings.detach().float().cpu())
        self.labels.append(labels.detach().cpu())
        self.loss_sum += float(loss)
        self.batches += 1

    def _local(self) -> dict[str, float]:
        if not self.embeddings:
            return {f"recall_at_{k}": 0.0 for k in self.ks} | {"map_at_r": 0.0}
        emb, y = torch.cat(self.embeddings), torch.cat(self.labels)
        out = retrieval_metrics(emb, y, self.ks)
        out["count"] = float(len(y))
        return out

    def keys(self) -> list[str]:
        return [*(f"recall_at_{k}" for k in self.ks), "precision_at_1", "map_at_r", "count"]

    def state(self) -> torch.Tensor:
        local = self._local()
        values = [local.get(k, 0.0) for k in self.keys()]
        return torch.tensor([*values, self.loss_sum, float(self.batches), 1.0], dtype=torch.float64)

    def load_state(self, state: torch.Tensor) -> None:
        workers = float(state[-1])
        keys = self.keys()
        merged = {k: float(state[i]) / workers for i, k in enumerate(keys)}
        merged["loss"] = float(state[len(keys)]) / max(float(state[len(keys) + 1]), 1.0)
        self._merged = merged

    def compute(self) -> dict[str, float]:
        return dict(self._merged) if self._merged is not None else self._local()


# ----------------------------------------------------------------------------- model


def build_fusion(cfg: RunConfig, dims: Sequence[int], num_classes: int) -> FusionModel:
    """The fusion model of a metric run's config (``cfg.metric``), with its ProxyAnchor
    criterion (the proxies are part of the checkpoint)."""
    m = cfg.metric
    criterion = ProxyAnchorCriterion(
        num_classes,
        m.embedding_dim,
        margin=m.margin,
        alpha=m.alpha,
        lr_mult=m.proxy_lr_mult,
        miner=m.miner,
        miner_epsilon=m.miner_epsilon,
    )
    return FusionModel(
        dims,
        m.embedding_dim,
        hidden=list(m.fusion_hidden) or m.fusion,
        gate=m.gate,
        gate_hidden=m.gate_hidden,
        dropout=m.dropout,
        activation=m.activation,
        criterion=criterion,
    )


# ----------------------------------------------------------------------------- task


def _build(cfg: RunConfig, num_classes: int, *, model: nn.Module, **_: object) -> Task:
    """ProxyAnchor on the model's embeddings; validated by retrieval (Recall@k selects)."""
    inner = getattr(model, "module", model)
    return Task(
        "metric",
        "label",
        lambda emb, y: inner.criterion(emb, y),
        lambda: MetricMeter(cfg.metric.recall_ks),
        _default_metric(cfg),
        input_key="features",
    )


def _default_metric(cfg: RunConfig) -> str:
    return f"recall_at_{min(cfg.metric.recall_ks)}"


register_task(
    TaskSpec(
        "metric",
        kind=METRIC,
        pipeline="features",
        labels="single",
        build=_build,
        default_metric=_default_metric,
        doc="metric learning: ProxyAnchor over fused frozen-backbone features (metric.*)",
    )
)
