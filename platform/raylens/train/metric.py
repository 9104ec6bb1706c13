"""Metric learning on Ray Train: ProxyAnchor over fused frozen-backbone features.

The driver fills the feature cache (:mod:`raylens.infer.features`), reads the features
once and puts them in the object store; Train workers read features, not images, and run
the same loop as every task (:func:`raylens.loop.fit`: early stopping, validation
every N steps, best checkpoint). Held-out protocol: ``metric.train_classes`` are trained
on (their train split; their val split selects the checkpoint); the other classes are
never seen and are evaluated by retrieval only.

Besides what every run writes (:mod:`raylens.rundir`), a metric run's test metrics hold
NCM top-1/top-3 on seen classes and Recall@K, MAP@R on held-out classes, for the trained
embedding and the raw fused features; its prototypes (class, seen, count, embedding) are
each class's mean train embedding; its report adds ``embedding_projection.png``.
"""

from __future__ import annotations

import dataclasses
import io
import math
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.train
import ray.train.torch
import torch

from raylens.checkpoint import load_checkpoint
from raylens.infer.features import (
    FeatureTable,
    ensure_cache,
    load_features,
    plan_cache,
)
from raylens.models.fusion import FusionModel, embed_all, l2_concat
from raylens.rundir import METRIC, RunDir, absolute_paths
from raylens.runtime.launch import build_trainer, fit_on_worker, ray_run_config
from raylens.schema import RunConfig
from raylens.storage import Storage
from raylens.tasks import check_best_metric, create_task, get_task
from raylens.tasks.metric import (
    MetricMeter,
    build_fusion,
    check_retrievable,
    class_prototypes,
    ncm_accuracy,
    retrieval_metrics,
)

# ----------------------------------------------------------------------------- data


@dataclasses.dataclass
class MetricData:
    """Fused (per-backbone L2-normalized, concatenated) features and the class protocol."""

    x: np.ndarray  # (n, sum(dims)) float32
    split: np.ndarray
    label: np.ndarray  # dataset class index
    classes: list[str]
    seen: list[int]  # dataset class indices trained on (in label order 0..S-1)
    unseen: list[int]
    dims: list[int]

    def rows(self, split: str, seen: bool) -> np.ndarray:
        keep = np.isin(self.label, self.seen if seen else self.unseen)
        return np.nonzero((self.split == split) & keep)[0]

    def seen_labels(self, idx: np.ndarray) -> np.ndarray:
        remap = {c: i for i, c in enumerate(self.seen)}
        return np.array([remap[int(c)] for c in self.label[idx]], dtype=np.int64)


def class_protocol(cfg: RunConfig, classes: list[str]) -> tuple[list[int], list[int]]:
    names = list(cfg.metric.train_classes)
    unknown = [n for n in names if n not in classes]
    if unknown:
        raise ValueError(
            f"config key 'metric.train_classes': unknown class(es) {unknown}; "
            f"the dataset has {classes}"
        )
    seen = [classes.index(n) for n in names] if names else list(range(len(classes)))
    return seen, [i for i in range(len(classes)) if i not in seen]


def prepare_data(cfg: RunConfig, table: FeatureTable) -> MetricData:
    """The fused features and the protocol; fails naming a class/split that can't work."""
    seen, unseen = class_protocol(cfg, table.classes)
    x = l2_concat([torch.from_numpy(b) for b in table.blocks]).numpy()
    data = MetricData(x, table.split, table.label, table.classes, seen, unseen, table.dims)
    names = [table.classes[i] for i in seen]
    for split in ("train", "val"):
        idx = data.rows(split, seen=True)
        if split == "val" and not len(idx):
            raise ValueError("metric learning needs a val split (checkpoint selection)")
        check_retrievable(data.seen_labels(idx), f"split {split!r} (trained classes)", names)
        counts = np.bincount(data.seen_labels(idx), minlength=len(seen))
        if split == "train" and (counts == 0).any():
            missing = [names[i] for i in np.nonzero(counts == 0)[0]]
            raise ValueError(f"split 'train' has no images of trained class(es) {missing}")
    held = data.rows("test", seen=False)
    if len(held):
        check_retrievable(data.label[held], "split 'test' (held-out classes)", table.classes)
    return data


# ----------------------------------------------------------------------------- worker


def metric_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: the fusion model over in-memory features from the object store."""
    cfg: RunConfig = config["cfg"]
    arrays = ray.get(config["arrays"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.run.seed)
    model = build_fusion(cfg, config["dims"], config["num_classes"])
    model = ray.train.torch.prepare_model(model)
    task = create_task(cfg, config["num_classes"], model=model)
    xt, yt, xv, yv = (
        torch.from_numpy(np.array(arrays[k])) for k in ("x_train", "y_train", "x_val", "y_val")
    )
    bs = cfg.data.batch_size
    per_rank = len(xt) // world

    def train_batches(epoch: int):
        g = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + epoch)
        order = torch.randperm(len(xt), generator=g)[rank * per_rank : (rank + 1) * per_rank]
        for lo in range(0, len(order) - 1, bs):  # BatchNorm needs >= 2 rows
            idx = order[lo : lo + bs]
            if len(idx) >= 2:
                yield {"features": xt[idx], "label": yt[idx]}

    def val_batches():  # every worker sees all of val: retrieval needs the whole set
        for lo in range(0, len(xv), 1024):
            yield {"features": xv[lo : lo + 1024], "label": yv[lo : lo + 1024]}

    fit_on_worker(
        cfg,
        model,
        task,
        train_batches=train_batches,
        val_batches=val_batches,
        steps_per_epoch=max(1, math.ceil(per_rank / bs)),
        device=device,
        channels_last=False,
    )


# ----------------------------------------------------------------------------- driver


def check_metric_config(cfg: RunConfig) -> None:
    if get_task(cfg.task.name).pipeline != "features":
        raise ValueError("config key 'task.name': expected 'metric' for metric learning")
    if not cfg.run.name:
        raise ValueError("config key 'run.name' is required: the run dir is <output_dir>/<name>")
    if not cfg.metric.backbones:
        raise ValueError("config key 'metric.backbones': expected at least one frozen backbone")
    if cfg.train.best_metric:  # before any cache work
        check_best_metric(cfg.train.best_metric, MetricMeter(cfg.metric.recall_ks))


def evaluate_metric(
    cfg: RunConfig, data: MetricData, model: FusionModel | None
) -> dict[str, dict[str, float]]:
    """NCM on the seen classes' test split (prototypes from their train split), retrieval
    on the held-out classes' test split; ``model=None``: the raw fused features."""
    ks = cfg.metric.recall_ks

    def emb(idx: np.ndarray) -> torch.Tensor:
        x = data.x[idx]
        return torch.from_numpy(x) if model is None else embed_all(model, x)

    out: dict[str, dict[str, float]] = {}
    tr, te = data.rows("train", True), data.rows("test", True)
    if len(te):
        protos = class_prototypes(emb(tr), torch.from_numpy(data.seen_labels(tr)), len(data.seen))
        seen = ncm_accuracy(protos, emb(te), torch.from_numpy(data.seen_labels(te)))
        seen.update(retrieval_metrics(emb(te), torch.from_numpy(data.seen_labels(te)), ks))
        out["seen_test"] = {**seen, "count": float(len(te))}
    held = data.rows("test", False)
    if len(held):
        r = retrieval_metrics(emb(held), torch.from_numpy(data.label[held]), ks)
        out["heldout_test"] = {**r, "count": float(len(held))}
    return out


def write_prototypes(
    storage: Storage, out: str, data: MetricData, model: FusionModel
) -> dict[str, Any]:
    """Every class's mean train embedding (held-out classes enrolled too)."""
    tr = data.rows("train", True)
    tr = np.concatenate([tr, data.rows("train", False)])
    e = embed_all(model, data.x[tr])
    labels = torch.from_numpy(data.label[tr])
    present = sorted(set(labels.tolist()))
    remap = {c: i for i, c in enumerate(present)}
    protos = class_prototypes(e, torch.tensor([remap[int(c)] for c in labels]), len(present))
    counts = np.bincount(data.label[tr], minlength=len(data.classes))
    table = pa.table(
        {
            "class": [data.classes[c] for c in present],
            "seen": [c in data.seen for c in present],
            "count": [int(counts[c]) for c in present],
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(protos.numpy().reshape(-1)), protos.shape[1]
            ),
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(RunDir(out, storage).prototypes, buf.getvalue())
    return {"classes": len(present), "dim": int(protos.shape[1])}


def projection_png(data: MetricData, model: FusionModel, max_points: int = 3000) -> bytes:
    """PCA of validation (seen) and test (held-out) embeddings, coloured by class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    panels = [("trained classes, val", data.rows("val", True))]
    if data.unseen:
        panels.append(("held-out classes, test", data.rows("test", False)))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5.5), squeeze=False)
    rng = np.random.default_rng(0)
    for ax, (title, idx) in zip(axes[0], panels, strict=True):
        if len(idx) > max_points:
            idx = np.sort(rng.choice(idx, max_points, replace=False))
        if len(idx) < 3:
            ax.set_title(f"{title}: too few images")
            continue
        z = PCA(n_components=2, random_state=0).fit_transform(embed_all(model, data.x[idx]))
        for c in sorted(set(data.label[idx].tolist())):
            m = data.label[idx] == c
            ax.scatter(z[m, 0], z[m, 1], s=4, alpha=0.6, label=data.classes[c])
        ax.set_title(f"{title} (PCA of the embedding)")
        ax.legend(markerscale=3, fontsize=7, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def metric_learn(
    cfg: RunConfig, *, callbacks: list | None = None, evaluate: bool = True
) -> dict[str, Any]:
    """Fills the feature cache, trains the fusion model, evaluates; returns
    ``{"run_dir", "best", "test", "baseline", "report", "cache"}``. ``callbacks`` and
    ``evaluate`` as in :func:`raylens.train.images.train_images`."""
    from raylens.report import write_report

    check_metric_config(cfg)
    cfg = absolute_paths(cfg)
    storage = Storage(cfg.storage)
    planned = plan_cache(cfg, storage)  # bad backbones fail here, before any Ray work
    class_protocol(cfg, planned[0].plan.classes)  # and unknown class names
    t0 = time.time()
    entries = ensure_cache(cfg, storage)
    table = load_features(entries, storage)
    data = prepare_data(cfg, table)
    cache_s = time.time() - t0
    tr, va = data.rows("train", True), data.rows("val", True)
    arrays = {
        "x_train": data.x[tr],
        "y_train": data.seen_labels(tr),
        "x_val": data.x[va],
        "y_val": data.seen_labels(va),
    }
    run = RunDir.of(cfg, storage)
    run.write_config(cfg)
    out = run.uri
    labels = {
        "classes": [data.classes[i] for i in data.seen],
        "held_out": [data.classes[i] for i in data.unseen],
        "backbones": table.backbones,
        "dims": data.dims,
        "embedding_dim": cfg.metric.embedding_dim,
    }
    run.write_labels(
        labels["classes"], METRIC, **{k: v for k, v in labels.items() if k != "classes"}
    )
    run_config = ray_run_config(cfg, storage, callbacks)
    loop_config = {
        "cfg": cfg,
        "arrays": ray.put(arrays),
        "dims": data.dims,
        "num_classes": len(data.seen),
    }
    trainer, plan = build_trainer(metric_worker, loop_config, {}, cfg, run_config=run_config)
    print(
        f"[metric] {len(tr):,} train / {len(va):,} val feature rows of {len(data.seen)} "
        f"classes ({len(data.unseen)} held out), features {'+'.join(map(str, data.dims))} "
        f"from {len(entries)} backbone(s) ({cache_s:.1f} s incl. cache); {plan.describe()}; "
        f"run dir {out}"
    )
    result = trainer.fit()
    best = run.best()
    cache = [{"backbone": e.backbone, "uri": e.uri, "hit": e.hit} for e in entries]
    if not evaluate:
        return {"run_dir": out, "best": best, "test": None, "baseline": None, "report": None,
                "cache": cache, "result": result}  # fmt: skip
    test, baseline, report = None, evaluate_metric(cfg, data, None), None
    if best:
        model = build_fusion(cfg, data.dims, len(data.seen))
        ck = load_checkpoint(storage, run.checkpoint(best["checkpoint"]), with_optimizer=False)
        model.load_state_dict(ck["model"])
        test = evaluate_metric(cfg, data, model)
        protos = write_prototypes(storage, out, data, model)
        summary = {"trained": test, "raw_fused_features": baseline, "prototypes": protos}
        run.write_test_metrics(summary)
        history = run.history()
        splits = {f"{k} (trained)": v for k, v in test.items()}
        splits.update({f"{k} (raw features)": v for k, v in baseline.items()})
        report = write_report(
            storage,
            out,
            history=history,
            metric=get_task(cfg.task.name).best_metric(cfg),
            best=best,
            splits=splits,
            classes=labels["classes"],
            multi_label=False,
            samples=None,
            summary={
                "dataset": f"`{cfg.data.dataset}` ({len(data.classes)} classes; trained on "
                f"{labels['classes']}, held out {labels['held_out']})",
                "task": f"metric (ProxyAnchor margin {cfg.metric.margin}, alpha "
                f"{cfg.metric.alpha}, proxies at {cfg.metric.proxy_lr_mult:g}x LR, miner "
                f"{cfg.metric.miner})",
                "model": f"frozen {' + '.join(table.backbones)} ({'+'.join(map(str, data.dims))}"
                f" features){' + gate' if cfg.metric.gate else ''} -> fusion "
                f"{list(cfg.metric.fusion_hidden) or cfg.metric.fusion} -> "
                f"{cfg.metric.embedding_dim}-d",
                "epochs run": max((r["epoch"] for r in history), default=0),
                "workers": cfg.ray.num_workers,
            },
            extra_images={"embedding_projection.png": projection_png(data, model)},
        )
    return {
        "run_dir": out,
        "best": best,
        "test": test,
        "baseline": baseline,
        "report": report,
        "cache": cache,
        "result": result,
    }
