"""Image fine-tuning and distillation on Ray Train: the per-worker function and the driver.

The driver reads the prepared dataset through Ray Data (:mod:`raylens.runtime.ingest`),
checks the config against the data and the task, records the run dir
(:class:`raylens.rundir.RunDir`), launches the ``TorchTrainer``
(:mod:`raylens.runtime.launch`), then evaluates the best checkpoint on the test split and
writes the report. Tasks with the ``images`` pipeline run here: classify, multilabel,
distill (stored top-k targets replayed with the teacher's augmentation, or an online
teacher).
"""

from __future__ import annotations

import dataclasses
import math
import uuid
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch

from raylens.checkpoint import load_checkpoint
from raylens.data.mix import build_mixer
from raylens.loop import Hooks, build_optimizer, evaluate
from raylens.models.classifier import build_model
from raylens.preprocess import require_preprocess, resolve_preprocess
from raylens.report import Samples, write_report
from raylens.rundir import RunDir, absolute_paths
from raylens.runtime.ingest import (
    DatasetInfo,
    EpochClock,
    TeacherTargets,
    TorchCollate,
    build_split,
)
from raylens.runtime.launch import (
    build_trainer,
    fit_on_worker,
    ray_run_config,
    say,
    sync_batchnorm,
)
from raylens.schema import RunConfig
from raylens.serving.labels import choose, probabilities
from raylens.storage import Storage, join
from raylens.tasks import create_task, get_task
from raylens.tasks.distill import TeacherInput, load_teacher


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: builds the model, consumes its dataset shards, runs :func:`fit`."""
    cfg: RunConfig = config["cfg"]
    info: DatasetInfo = config["info"]
    storage = Storage(cfg.storage)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model, len(info.classes), storage)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = sync_batchnorm(model, cfg, device, world, say if rank == 0 else lambda m: None)
    model = ray.train.torch.prepare_model(model)
    task = create_task(cfg, len(info.classes), teacher=_online_teacher(cfg, device))
    mixer = build_mixer(cfg, len(info.classes), info.multi_label)  # None: mix off
    targets: TeacherTargets | None = config.get("targets")
    clock = ray.get_actor(targets.clock, namespace="raylens") if targets else None
    collate = TorchCollate(cfg.data, channels_last=cfg.model.channels_last)
    bs = cfg.data.batch_size
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")

    def batches(shard, epoch: int | None = None):
        """Train batches (``epoch`` given) shuffle with a seed per (run seed, epoch, rank), so
        a run is reproducible and epochs differ; validation batches don't shuffle."""
        shuffle = epoch is not None and cfg.data.shuffle_buffer > 0
        if clock is not None and epoch is not None:
            ray.get(clock.set.remote(epoch))  # the decode tasks replay the teacher's epoch
        it = shard.iter_torch_batches(
            batch_size=bs,
            collate_fn=collate,
            prefetch_batches=cfg.data.prefetch_batches,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer if shuffle else None,
            local_shuffle_seed=cfg.run.seed * 1_000_003 + epoch * 1009 + rank if shuffle else None,
        )
        if clock is None or epoch is None:
            return it
        return _replayed(it, epoch % targets.epochs)

    fit_on_worker(
        cfg,
        model,
        task,
        train_batches=lambda epoch: batches(train_shard, epoch),
        val_batches=lambda: batches(val_shard),
        steps_per_epoch=math.ceil(info.num_rows["train"] / world / bs),
        device=device,
        channels_last=cfg.model.channels_last,
        mixer=mixer,
    )


def _replayed(batches, replay: int):
    """Train batches of a distillation run, checked to replay the expected teacher epoch."""
    for batch in batches:
        if not bool((batch["aug_epoch"] == replay).all()):
            raise RuntimeError(
                f"distillation: a batch replays teacher epoch(s) "
                f"{sorted(set(batch['aug_epoch'].tolist()))}, expected {replay}"
            )
        yield batch


def _online_teacher(cfg: RunConfig, device: torch.device):
    """Online distillation: the teacher's logits on the student's (normalized) input."""
    if cfg.task.name != "distill" or cfg.distill.mode != "online":
        return None
    model, teacher_cfg, _ = load_teacher(cfg.distill.teacher, Storage(cfg.storage))
    model.to(device)
    to_input = TeacherInput(teacher_cfg)
    mean = torch.tensor(cfg.data.mean, device=device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(cfg.data.std, device=device).view(1, 3, 1, 1) * 255.0

    def teacher(x: torch.Tensor) -> torch.Tensor:
        return model(to_input(x.float() * std + mean))

    return teacher


def distill_setup(
    cfg: RunConfig, info: DatasetInfo, storage: Storage
) -> tuple[TeacherTargets | None, Any]:
    """Checks the teacher (online) or its store (stored) against the student's run before
    any worker starts; for a store, creates the epoch clock the decode tasks read."""
    from raylens.data import teacher_store as TS
    from raylens.data.mix import mix_settings
    from raylens.data.prepare import load_card

    d = cfg.distill
    if d.mode == "online":
        _, teacher_cfg, classes = load_teacher(d.teacher, storage)
        require_preprocess(teacher_cfg.data, what=f"teacher run {d.teacher!r}")
        if len(classes) != len(info.classes):
            raise ValueError(
                f"teacher {d.teacher!r} has {len(classes)} classes, the student {len(info.classes)}"
            )
        return None, None
    if not d.store:
        raise ValueError("config key 'distill.store' is required (or distill.mode=online)")
    card = TS.load_card(storage, d.store)
    dataset_card = load_card(storage, cfg.data.dataset)
    TS.check_compatible(
        card,
        dataset_card=dataset_card,
        data=dataclasses.asdict(cfg.data),
        topk=d.topk,
        num_classes=len(info.classes),
        seed=cfg.run.seed,
        aug_epochs=d.aug_epochs,
        mix=mix_settings(cfg.mix),  # a mixed store: the train split mixes at decode time too
    )
    train_ids = _train_ids(cfg.data.dataset, dataset_card, storage)
    for epoch in range(d.aug_epochs):
        missing = train_ids - TS.read_ids(storage, d.store, epoch)
        if missing:
            raise ValueError(
                f"teacher store {d.store!r} does not cover the dataset: epoch {epoch} lacks "
                f"{len(missing)} of {len(train_ids)} train ids (e.g. {sorted(missing)[:3]})"
            )
    name = f"raylens-clock-{uuid.uuid4().hex[:12]}"
    clock = EpochClock.options(name=name, namespace="raylens").remote()
    targets = TeacherTargets(
        name, d.store, cfg.storage, d.topk, card["seed"], d.aug_epochs, store_k=card["k"]
    )
    return targets, clock


def _train_ids(dataset: str, card: dict, storage: Storage) -> set[str]:
    import io

    import pyarrow.parquet as pq

    ids: set[str] = set()
    for f in card["splits"]["train"]["files"]:
        table = pq.read_table(io.BytesIO(storage.read_bytes(join(dataset, f))), columns=["id"])
        ids.update(table.column("id").to_pylist())
    return ids


def check_config(cfg: RunConfig, info: DatasetInfo, storage: Storage) -> None:
    """Fails before any worker starts, naming the problem (backbone, unfreeze, task/data,
    optimizer)."""
    if not info.classes:
        raise ValueError(f"dataset {cfg.data.dataset!r} has zero classes")
    spec = get_task(cfg.task.name)
    if spec.labels == "multi" and not info.multi_label:
        raise ValueError(
            f"config key 'task.name': {spec.name} needs a multi-label dataset; "
            f"{cfg.data.dataset!r} is single-label"
        )
    if spec.labels == "single" and info.multi_label:
        if spec.name == "distill":
            raise ValueError(
                f"distillation needs a single-label dataset; {cfg.data.dataset!r} is not"
            )
        raise ValueError(
            f"config key 'task.name': {spec.name} needs single labels; "
            f"{cfg.data.dataset!r} is multi-label (use task.name=multilabel)"
        )
    if not cfg.run.name:
        raise ValueError("config key 'run.name' is required: the run dir is <output_dir>/<name>")
    model = build_model(cfg.model, len(info.classes), storage)  # backbone, unfreeze_last_n
    build_optimizer(model, cfg.train)  # unknown train.optimizer, layer_decay without layers


def train_images(
    cfg: RunConfig, *, callbacks: list | None = None, evaluate: bool = True
) -> dict[str, Any]:
    """Runs (or resumes) an image run; returns ``{"run_dir", "best", "test", "report",
    "result"}``. ``callbacks``: extra Ray Train callbacks. ``evaluate=False`` stops after
    training (no test split, no report): what a Tune trial wants.
    """
    storage = Storage(cfg.storage)
    # data.mean/std/crop/interpolation from the backbone, recorded in config.yaml below
    cfg = resolve_preprocess(absolute_paths(cfg), storage)
    spec = get_task(cfg.task.name)
    distill = spec.name == "distill"
    train_ds, info = build_split(cfg, "train", storage)
    val_ds, _ = build_split(cfg, "val", storage)
    check_config(cfg, info, storage)
    targets, clock = distill_setup(cfg, info, storage) if distill else (None, None)
    if targets is not None:
        train_ds, _ = build_split(cfg, "train", storage, targets=targets)
    run = RunDir.of(cfg, storage)
    run.write_config(cfg)
    run.write_labels(info.classes, spec.kind)
    out = run.uri
    trainer, plan = build_trainer(
        train_worker,
        {"cfg": cfg, "info": info, "targets": targets},
        {"train": train_ds, "val": val_ds},
        cfg,
        run_config=ray_run_config(cfg, storage, callbacks),
        split=["train", "val"],
    )
    print(f"[finetune] {plan.describe()}; run dir {out}")
    result = trainer.fit()
    del clock  # the epoch clock lives as long as the run
    best = run.best()
    if not evaluate:
        return {"run_dir": out, "best": best, "test": None, "report": None, "result": result}
    splits: dict[str, dict] = {}
    samples = None
    if best:
        checkpoint = run.checkpoint(best["checkpoint"])
        samples = Samples(np.zeros((0, 1, 1, 3), np.uint8))
        for split in ("val", "test"):
            metrics = evaluate_split(
                cfg, info, checkpoint, split, storage, samples if split == "val" else None
            )
            if metrics is not None:
                splits[split] = metrics
    test = splits.get("test")
    if test is not None:
        run.write_test_metrics(test)
    report = None
    if best:
        history = run.history()
        report = write_report(
            storage,
            out,
            history=history,
            metric=spec.best_metric(cfg),
            best=best,
            splits=splits,
            classes=info.classes,
            multi_label=info.multi_label,
            samples=samples,
            summary={
                "dataset": f"`{cfg.data.dataset}` ({len(info.classes)} classes, "
                + ", ".join(f"{k} {v}" for k, v in info.num_rows.items())
                + ")",
                "task": cfg.task.name
                + (f" ({cfg.task.loss} loss)" if cfg.task.name == "multilabel" else "")
                + (
                    f", distilled ({cfg.distill.mode}, {cfg.distill.loss}, k={cfg.distill.topk}) "
                    f"from `{cfg.distill.teacher}`"
                    if distill
                    else ""
                ),
                "model": f"{cfg.model.backbone} + {cfg.model.head} head",
                "epochs run": max((r["epoch"] for r in history), default=0),
                "workers": cfg.ray.num_workers,
            },
        )
    return {"run_dir": out, "best": best, "test": test, "report": report, "result": result}


def evaluate_split(
    cfg: RunConfig,
    info: DatasetInfo,
    checkpoint: str,
    split: str,
    storage: Storage,
    samples: Samples | None = None,
    max_samples: int = 32,
) -> dict | None:
    """Metrics of a checkpoint on one split (eval transform), on the driver; None if empty.
    The checkpoint's ``model`` is evaluated: the EMA weights when the run kept a model EMA.

    The test split is only ever evaluated here, after training: never for model selection.
    It runs in full precision whatever ``train.amp`` (as Serve and the predictor do by
    default), so the reported metrics are what the served model scores on the same images.
    ``samples``, when given, receives the split's first ``max_samples`` images (un-normalized)
    with their true and predicted labels.
    """
    if not info.num_rows.get(split):
        return None
    ds, _ = build_split(cfg, split, storage, train=False)
    model = build_model(cfg.model, len(info.classes), storage)
    model.load_state_dict(load_checkpoint(storage, checkpoint, with_optimizer=False)["model"])
    task = create_task(cfg, len(info.classes))
    batches = ds.iter_torch_batches(batch_size=256, collate_fn=TorchCollate(cfg.data))
    cpu = torch.device("cpu")
    mean = torch.tensor(cfg.data.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    kept: list[np.ndarray] = []

    kind = get_task(cfg.task.name).kind

    def names(indices: list[int]) -> str:
        return ",".join(info.classes[i] for i in indices) or "-"

    def keep(batch: dict, logits: torch.Tensor) -> None:
        room = max_samples - sum(len(k) for k in kept)
        if samples is None or room <= 0:
            return
        x = batch["image"][:room].float() * std + mean
        kept.append((x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy())
        y = batch[task.target_key][:room]
        true = [row.nonzero().flatten().tolist() if info.multi_label else [int(row)] for row in y]
        # the same decision Serve makes for a request (raylens.serving.labels)
        probs = probabilities(logits[:room].float().numpy(), kind=kind)
        pred = [choose(p, kind=kind, k=1, threshold=cfg.task.threshold) for p in probs]
        samples.true.extend(names(t) for t in true)
        samples.pred.extend(names(p) for p in pred)

    metrics = evaluate(
        model,
        task,
        batches,
        cpu,
        None,  # full precision
        Hooks(log=lambda m: None),
        on_batch=keep,
    )
    if samples is not None and kept:
        samples.images = np.concatenate(kept)
    if info.multi_label and "per_class" in metrics:  # index keys -> class names
        metrics["per_class"] = dict(zip(info.classes, metrics["per_class"].values(), strict=True))
        by_name = dict(enumerate(info.classes))
        for key in ("best5", "worst5"):
            metrics[key] = [(by_name[int(c)], f) for c, f in metrics[key]]
    return {"split": split, "checkpoint": checkpoint, **metrics}
