"""A fine-tuning run on Ray Train: the per-worker function and the driver that launches it.

Run directory (``<run.output_dir>/<run.name>``, local, ``s3://`` or ``gs://``)::

    config.yaml  labels.json  metrics.jsonl  best.json  test_metrics.json
    checkpoints/epoch=N/{model,optimizer}.safetensors + state.json
    tensorboard/events.out.tfevents.*
    report/report.md + learning_curves.png, confusion_matrix.png, per_class_f1.png,
           val_samples.png

Ray Train keeps its own run state in the same directory, so re-running the same command
with the same run name resumes from the last checkpoint, and a worker that dies is
replaced and resumes from it too (``FailureConfig(ray.max_failures)``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import tempfile
import uuid
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import yaml

from raylens import config as C
from raylens.checkpoint import load_checkpoint, save_checkpoint
from raylens.loop import Hooks, evaluate, fit, make_distill_task, make_task
from raylens.models.classifier import build_model
from raylens.report import Samples, write_report
from raylens.runtime.ingest import (
    DatasetInfo,
    EpochClock,
    TeacherTargets,
    TorchCollate,
    build_split,
)
from raylens.runtime.launch import build_trainer
from raylens.schema import RunConfig
from raylens.storage import Storage, join, split_uri
from raylens.train.events import EventLog
from raylens.train.teacher import TeacherInput, load_teacher


def run_dir(cfg: RunConfig) -> str:
    return join(cfg.run.output_dir, cfg.run.name)


# Keys a resumed run may change: where and how it runs, and how long (more epochs extend
# it: the cosine is recomputed over the new total at the resumed step), not what it trains.
RESUME_MAY_CHANGE = (
    "run.output_dir", "storage.", "source.", "prepare.", "embed.", "tune.", "ray.",
    "train.epochs", "train.patience", "train.val_every_n_steps",
    "data.decode_batch_size", "data.prefetch_batches", "distill.teacher_batch_size",
    "distill.teacher_concurrency", "distill.teacher_num_gpus", "distill.check_samples",
    "metric.cache",  # the location and the cache_* knobs; the features are keyed
)  # fmt: skip


def write_run_config(cfg: RunConfig, storage: Storage) -> str:
    """Writes ``config.yaml`` to the run dir and returns the dir. Re-running a run name
    resumes that run, so a run dir that has trained (``metrics.jsonl``) under a config
    that differs in what it trains is refused, naming the keys: resuming would continue
    the old run's weights and then record the new config as how they were trained."""
    out = run_dir(cfg)
    path = join(out, "config.yaml")
    if storage.exists(join(out, "metrics.jsonl")) and storage.exists(path):
        old = yaml.safe_load(storage.read_text(path)) or {}
        diff = C.changed_keys(old, C.to_dict(cfg), ignore=RESUME_MAY_CHANGE)
        if diff:
            keys = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
            raise C.ConfigError(
                f"run dir {out!r} already holds a run trained with another config ({keys}); "
                "re-running a run name resumes that run. Choose another run.name, or "
                "delete the run dir to start over"
            )
    storage.write_text(path, C.to_yaml(cfg))
    return out


def _say(message: str) -> None:
    """One progress line on the worker's stdout (shown once by the driver). Not ``print``:
    Ray Train patches it into a logger whose output reached the driver twice."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


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
    model = ray.train.torch.prepare_model(model)
    task = make_task(cfg.task, len(info.classes))
    targets: TeacherTargets | None = config.get("targets")
    if config.get("distill"):
        task = make_distill_task(cfg.distill, len(info.classes), _online_teacher(cfg, device))
    clock = ray.get_actor(targets.clock, namespace="raylens") if targets else None
    collate = TorchCollate(cfg.data)
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
    )


def fit_on_worker(
    cfg: RunConfig,
    model: torch.nn.Module,
    task,
    *,
    train_batches,
    val_batches,
    steps_per_epoch: int,
    device: torch.device,
    channels_last: bool,
) -> None:
    """:func:`fit` on a Ray Train worker: resumes from Ray Train's checkpoint, reports
    metrics and checkpoints through :func:`make_reporter`, sums metrics over workers."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as path:
            resume = load_checkpoint(Storage(), path)
    report, events = make_reporter(cfg, Storage(cfg.storage), rank, resume)

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        if world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    fit(
        model,
        task,
        cfg.train,
        train_batches=train_batches,
        val_batches=val_batches,
        steps_per_epoch=steps_per_epoch,
        device=device,
        hooks=Hooks(
            all_reduce=all_reduce,
            report=report,
            is_main=rank == 0,
            log=_say if rank == 0 else (lambda m: None),
        ),
        resume=resume,
        channels_last=channels_last,
    )
    if events is not None:
        events.close()


def ray_run_config(
    cfg: RunConfig, storage: Storage, callbacks: list | None = None
) -> ray.train.RunConfig:
    """Ray Train's run state in the run dir (so re-running resumes), with the restart budget.
    ``callbacks``: Ray Train callbacks (a Tune trial passes ``TuneReportCallback``)."""
    scheme, path = split_uri(cfg.run.output_dir)
    return ray.train.RunConfig(
        name=cfg.run.name,
        storage_path=path,
        storage_filesystem=storage.arrow_fs(scheme),
        failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
        callbacks=callbacks,
    )


def read_history(storage: Storage, run: str) -> list[dict]:
    """A run dir's ``metrics.jsonl`` rows (one per report); [] before the first report."""
    path = join(run, "metrics.jsonl")
    if not storage.exists(path):
        return []
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


def make_reporter(cfg: RunConfig, storage: Storage, rank: int, resume: dict | None):
    """The loop's ``report`` hook on a Train worker, and rank 0's TensorBoard log.

    ``report(metrics, checkpoint)`` reports to Ray Train (with the checkpoint), then rank 0
    writes metrics.jsonl and best.json: they never name a checkpoint not persisted first.
    """
    out = run_dir(cfg)
    history: list[dict] = list((resume or {}).get("extra", {}).get("history", []))
    events = EventLog(storage, out) if rank == 0 else None

    def report(metrics: dict, ck: dict | None) -> None:
        if ck is None:
            ray.train.report(metrics)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                if rank == 0:
                    save_checkpoint(
                        Storage(),
                        tmp,
                        model=ck["model"],
                        optimizer=ck["optimizer"],
                        scheduler=ck["scheduler"],
                        extra=ck["extra"],
                    )
                ray.train.report(
                    metrics,
                    checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None,
                    checkpoint_dir_name=ck["name"],
                )
        if rank != 0:
            return
        history.append(metrics)
        events.add(metrics)
        storage.write_text(
            join(out, "metrics.jsonl"), "".join(json.dumps(m) + "\n" for m in history)
        )
        if metrics.get("best"):
            storage.write_text(
                join(out, "best.json"),
                json.dumps(
                    {
                        "epoch": metrics["epoch"],
                        "checkpoint": metrics["checkpoint"],
                        "metrics": {k: v for k, v in metrics.items() if k.startswith("val/")},
                    },
                    indent=1,
                ),
            )

    return report, events


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
    if cfg.distill.mode != "online":
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
    from raylens.data.prepare import load_card

    d = cfg.distill
    if info.multi_label:
        raise ValueError(f"distillation needs a single-label dataset; {cfg.data.dataset!r} is not")
    if d.mode == "online":
        _, _, classes = load_teacher(d.teacher, storage)
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
    """Fails before any worker starts, naming the problem (backbone, unfreeze, task/data)."""
    if not info.classes:
        raise ValueError(f"dataset {cfg.data.dataset!r} has zero classes")
    if cfg.task.name == "multilabel" and not info.multi_label:
        raise ValueError(
            f"config key 'task.name': multilabel needs a multi-label dataset; "
            f"{cfg.data.dataset!r} is single-label"
        )
    if cfg.task.name == "classify" and info.multi_label:
        raise ValueError(
            f"config key 'task.name': classify needs single labels; "
            f"{cfg.data.dataset!r} is multi-label (use task.name=multilabel)"
        )
    if not cfg.run.name:
        raise ValueError("config key 'run.name' is required: the run dir is <output_dir>/<name>")
    build_model(cfg.model, len(info.classes), storage)  # unknown backbone, bad unfreeze_last_n


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """Local paths made absolute on the driver: Ray workers run in other directories."""
    run = cfg.run
    if split_uri(run.output_dir)[0] == "file":
        run = dataclasses.replace(run, output_dir=split_uri(run.output_dir)[1])
    data = cfg.data
    if data.dataset and split_uri(data.dataset)[0] == "file":
        data = dataclasses.replace(data, dataset=split_uri(data.dataset)[1])
    distill = cfg.distill
    for key in ("teacher", "store"):
        value = getattr(distill, key)
        if value and split_uri(value)[0] == "file":
            distill = dataclasses.replace(distill, **{key: split_uri(value)[1]})
    return dataclasses.replace(cfg, run=run, data=data, distill=distill)


def finetune(
    cfg: RunConfig,
    *,
    distill: bool = False,
    callbacks: list | None = None,
    evaluate: bool = True,
) -> dict[str, Any]:
    """Runs (or resumes) a fine-tuning run; returns ``{"run_dir", "best", "test", "result"}``.

    ``distill``: train against a teacher (``cfg.distill``: stored top-k targets replayed
    with the teacher's augmentation, or an online teacher); validated on hard labels.
    ``callbacks``: extra Ray Train callbacks. ``evaluate=False`` stops after training (no
    test split, no report): what a Tune trial wants.
    """
    if cfg.task.name == "metric":
        from raylens.train.metric_run import metric_learn

        return metric_learn(cfg, callbacks=callbacks, evaluate=evaluate)
    cfg = absolute_paths(cfg)
    storage = Storage(cfg.storage)
    train_ds, info = build_split(cfg, "train", storage)
    val_ds, _ = build_split(cfg, "val", storage)
    check_config(cfg, info, storage)
    targets, clock = distill_setup(cfg, info, storage) if distill else (None, None)
    if targets is not None:
        train_ds, _ = build_split(cfg, "train", storage, targets=targets)
    out = write_run_config(cfg, storage)
    storage.write_text(
        join(out, "labels.json"), json.dumps({"classes": info.classes, "task": info.task}, indent=1)
    )
    run_config = ray_run_config(cfg, storage, callbacks)
    trainer, plan = build_trainer(
        train_worker,
        {"cfg": cfg, "info": info, "distill": distill, "targets": targets},
        {"train": train_ds, "val": val_ds},
        cfg,
        run_config=run_config,
        split=["train", "val"],
    )
    print(f"[finetune] {plan.describe()}; run dir {out}")
    result = trainer.fit()
    del clock  # the epoch clock lives as long as the run
    best = (
        json.loads(storage.read_text(join(out, "best.json")))
        if storage.exists(join(out, "best.json"))
        else None
    )
    if not evaluate:
        return {"run_dir": out, "best": best, "test": None, "report": None, "result": result}
    splits: dict[str, dict] = {}
    samples = None
    if best:
        checkpoint = join(out, best["checkpoint"])
        samples = Samples(np.zeros((0, 1, 1, 3), np.uint8))
        for split in ("val", "test"):
            metrics = evaluate_split(
                cfg, info, checkpoint, split, storage, samples if split == "val" else None
            )
            if metrics is not None:
                splits[split] = metrics
    test = splits.get("test")
    if test is not None:
        storage.write_text(join(out, "test_metrics.json"), json.dumps(test, indent=1))
    report = None
    if best:
        history = read_history(storage, out)
        report = write_report(
            storage,
            out,
            history=history,
            metric=cfg.train.best_metric or make_task(cfg.task, len(info.classes)).best_metric,
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
    task = make_task(cfg.task, len(info.classes))
    batches = ds.iter_torch_batches(batch_size=256, collate_fn=TorchCollate(cfg.data))
    cpu = torch.device("cpu")
    mean = torch.tensor(cfg.data.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    kept: list[np.ndarray] = []

    def names(row: torch.Tensor) -> str:
        if info.multi_label:
            return ",".join(info.classes[i] for i in row.nonzero().flatten().tolist()) or "-"
        return info.classes[int(row)]

    def keep(batch: dict, logits: torch.Tensor) -> None:
        room = max_samples - sum(len(k) for k in kept)
        if samples is None or room <= 0:
            return
        x = batch["image"][:room].float() * std + mean
        kept.append((x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy())
        y = batch[task.target_key][:room]
        if info.multi_label:
            pred = torch.sigmoid(logits[:room]) >= cfg.task.threshold
        else:
            pred = logits[:room].argmax(1)
        samples.true.extend(names(t) for t in y)
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
