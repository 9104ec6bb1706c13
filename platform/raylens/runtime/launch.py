"""Ray wiring: build a ``TorchTrainer`` on a budgeted cluster.

The budget (:mod:`raylens.runtime.resources`) guarantees Ray Data keeps CPUs while the
train workers run, so ingest can't starve (no deadlock on a 2-CPU machine).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import ray
from ray.train import CheckpointConfig, DataConfig, ScalingConfig
from ray.train import RunConfig as RayRunConfig
from ray.train.torch import TorchTrainer

from raylens.runtime.resources import ResourcePlan, plan_resources
from raylens.schema import RayConfig, RunConfig

log = logging.getLogger("raylens")


def init_ray(cfg: RayConfig, *, dashboard: bool = False) -> None:
    """Joins ``ray.address`` / ``RAY_ADDRESS`` (as under ``ray job submit``), else starts local Ray.

    ``dashboard``: a local Ray with its dashboard. Tune needs it: Ray Train's placement-group
    cleaner asks the dashboard's state API whether a trial's trainer is still alive, and
    without it the CPUs of every trial ASHA stops stay reserved (ray#54305) until the
    sweep hangs waiting for them.
    """
    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # "local": always a fresh local instance. A bare ray.init() would silently join a
        # cluster that `ray start` left running on this machine (and refuse num_cpus).
        ray.init(address="local", num_cpus=cfg.local_num_cpus, include_dashboard=dashboard)


def budget(cfg: RayConfig) -> ResourcePlan:
    """The run's CPU plan over ``ray.budget_cpus`` (a Tune trial's share) or the cluster."""
    cpus = cfg.budget_cpus or float(ray.cluster_resources().get("CPU", 1.0))
    return plan_resources(cpus, cfg)


def build_trainer(
    train_loop: Callable[[dict], None],
    loop_config: dict[str, Any],
    datasets: dict[str, ray.data.Dataset],
    cfg: RunConfig,
    *,
    run_config: RayRunConfig | None = None,
    split: list[str] | None = None,
) -> tuple[TorchTrainer, ResourcePlan]:
    """A ``TorchTrainer`` whose workers and Ray Data share the cluster without starving.

    Args:
        split: dataset names sharded across workers (default: all).
    """
    plan = budget(cfg.ray)
    resources = {"CPU": plan.cpus_per_worker}
    if plan.gpus_per_worker:
        resources["GPU"] = plan.gpus_per_worker
    scaling = ScalingConfig(
        num_workers=plan.num_workers, use_gpu=cfg.ray.use_gpu, resources_per_worker=resources
    )
    options = DataConfig.default_ingest_options()
    options.resource_limits = options.resource_limits.copy(cpu=plan.data_cpus)
    options.preserve_order = options.preserve_order or cfg.data.preserve_order
    data_config = DataConfig(datasets_to_split=split or "all", execution_options=options)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=scaling,
        datasets=datasets,
        dataset_config=data_config,
        run_config=run_config,
    )
    log.info("resource plan: %s", plan.describe())
    return trainer, plan


# ----------------------------------------------------------------------------- Train workers


def ray_run_config(cfg: RunConfig, storage, callbacks: list | None = None) -> RayRunConfig:
    """Ray Train's run state in the run dir (so re-running resumes), with the restart budget
    and checkpoint retention (:class:`BestAndLast`). ``callbacks``: Ray Train callbacks (a
    Tune trial passes ``TuneReportCallback``)."""
    from raylens.storage import split_uri

    scheme, path = split_uri(cfg.run.output_dir)
    return RayRunConfig(
        name=cfg.run.name,
        storage_path=path,
        storage_filesystem=storage.arrow_fs(scheme),
        failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
        # no score attribute: Ray keeps the last N reported (always the latest, which a
        # restart resumes from); the best is kept by BestAndLast
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
        callbacks=callbacks,
    )


class BestAndLast:
    """Rank 0's half of ``train.keep_checkpoints = N``: the run keeps its best checkpoint and
    its last N, nothing else.

    Ray Train's ``CheckpointConfig(num_to_keep, checkpoint_score_attribute)`` keeps the top N
    by a score fixed when a checkpoint is reported, plus the latest (or, without a score,
    the last N): it cannot express "the best and the last N" for N > 1, since a
    checkpoint's claim to be kept ends when a better one arrives. Deleting checkpoints
    behind Ray's back is no way out either: a restart then fails on Ray's snapshot naming a
    checkpoint that is gone. So Ray keeps the last N (:func:`ray_run_config`), and just
    before the best would leave that window (the report that pushes it out, before Ray sees
    it) it is copied to ``checkpoints/best`` (:data:`raylens.rundir.BEST_CHECKPOINT`) and
    ``best.json`` names the copy; a later best makes the copy redundant and it is deleted.
    A best is copied at most once, when it ages out. ``keep=None`` keeps everything.

    Args:
        reported: the checkpoint names reported so far, oldest first (from the resumed
            history), in the order Ray registered them.
    """

    def __init__(self, run, keep: int | None, reported: list[str]):
        self.run, self.keep, self.reported = run, keep, list(reported)
        best = run.best()
        self.best: str | None = best["checkpoint"] if best else None

    def before_report(self, name: str, improved: bool) -> None:
        """Call before reporting checkpoint ``name`` to Ray."""
        from raylens.checkpoint import copy_checkpoint
        from raylens.rundir import BEST_CHECKPOINT

        self.reported.append(name)
        if self.keep is None or improved or self.best in (None, BEST_CHECKPOINT):
            return
        if self.best in self.reported[-self.keep :]:
            return
        copy_checkpoint(self.run.storage, self.run.path(self.best), self.run.path(BEST_CHECKPOINT))
        best = self.run.best()
        self.run.write_best(
            {**best["metrics"], "epoch": best["epoch"], "checkpoint": BEST_CHECKPOINT}
        )
        self.best = BEST_CHECKPOINT

    def after_best(self, name: str) -> None:
        """Call once ``best.json`` names the new best checkpoint ``name``."""
        from raylens.rundir import BEST_CHECKPOINT

        old, self.best = self.best, name
        if old == BEST_CHECKPOINT and name != BEST_CHECKPOINT:
            self.run.storage.delete_tree(self.run.path(BEST_CHECKPOINT))


def sync_batchnorm(model, cfg: RunConfig, device, world: int, log: Callable[[str], None]):
    """``model`` with SyncBatchNorm (``train.sync_bn``) when it trains on several GPU workers
    and has BatchNorm layers; call before ``prepare_model``.

    On CPU workers it is skipped, saying so through ``log``: torch's SyncBatchNorm
    synchronizes only GPU (CUDA, XPU, HPU) tensors and raises on CPU ones at the first
    training step under DDP, so each CPU worker keeps its own batch statistics.
    """
    import torch

    if not cfg.train.sync_bn or world < 2:
        return model
    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    if device.type != "cuda":
        log(
            f"[train] train.sync_bn skipped on {device.type} workers: torch's SyncBatchNorm "
            "syncs GPU tensors only; each worker normalizes with its own batch statistics"
        )
        return model
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def say(message: str) -> None:
    """One progress line on the worker's stdout (shown once by the driver). Not ``print``:
    Ray Train patches it into a logger whose output reached the driver twice."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def fit_on_worker(
    cfg: RunConfig,
    model,
    task,
    *,
    train_batches,
    val_batches,
    steps_per_epoch: int,
    device,
    channels_last: bool,
    mixer=None,
) -> None:
    """:func:`raylens.loop.fit` on a Ray Train worker, for every training pipeline: resumes
    from Ray Train's checkpoint, reports metrics and checkpoints through
    :func:`make_reporter`, sums metrics over workers. ``mixer``: Mixup/CutMix (see ``fit``)."""
    import torch
    import torch.distributed as dist

    from raylens.checkpoint import load_checkpoint
    from raylens.loop import Hooks, fit
    from raylens.storage import Storage

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
            log=say if rank == 0 else (lambda m: None),
        ),
        resume=resume,
        channels_last=channels_last,
        mixer=mixer,
    )
    if events is not None:
        events.close()


def make_reporter(cfg: RunConfig, storage, rank: int, resume: dict | None):
    """The loop's ``report`` hook on a Train worker, and rank 0's TensorBoard log.

    ``report(metrics, checkpoint)`` reports to Ray Train (with the checkpoint), then rank 0
    records the run dir's history and best checkpoint: they never name a checkpoint not
    persisted first. Rank 0 keeps the best and the last ``train.keep_checkpoints``
    (:class:`BestAndLast`).
    """
    import tempfile

    from raylens.checkpoint import save_checkpoint
    from raylens.rundir import RunDir
    from raylens.runtime.events import EventLog
    from raylens.storage import Storage

    run = RunDir.of(cfg, storage)
    history: list[dict] = list((resume or {}).get("extra", {}).get("history", []))
    events = EventLog(storage, run.tensorboard) if rank == 0 else None
    keeper = None
    if rank == 0:
        reported = [row["checkpoint"] for row in history if row.get("checkpoint")]
        keeper = BestAndLast(run, cfg.train.keep_checkpoints, reported)

    def report(metrics: dict, ck: dict | None) -> None:
        if ck is None:
            ray.train.report(metrics)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                if rank == 0:
                    keeper.before_report(ck["name"], bool(metrics.get("best")))
                    save_checkpoint(
                        Storage(),
                        tmp,
                        model=ck["model"],
                        optimizer=ck["optimizer"],
                        scheduler=ck["scheduler"],
                        extra=ck["extra"],
                        train_model=ck.get("train_model"),
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
        run.write_history(history)
        if metrics.get("best"):
            run.write_best(metrics)
            keeper.after_best(metrics["checkpoint"])

    return report, events


def ingest_check_loop(config: dict) -> None:
    """Train-worker function that consumes its shard and reports counts and throughput.

    Used to check an ingest pipeline end to end on the real workers (tests, benchmarks,
    ``jobs`` dry runs). ``config``: ``{"data": DataConfig, "dataset": name, "out": uri,
    "storage": Storage}``; each rank writes ``<out>/rank-<r>.json`` (Train V2 keeps no
    metrics reported without a checkpoint).
    """
    import json

    import torch

    from raylens.runtime.ingest import TorchCollate

    data = config["data"]
    shard = ray.train.get_dataset_shard(config.get("dataset", "train"))
    rows, batches, checksum = 0, 0, 0.0
    t0 = time.perf_counter()
    for batch in shard.iter_torch_batches(
        batch_size=data.batch_size,
        collate_fn=TorchCollate(data),
        prefetch_batches=data.prefetch_batches,
    ):
        image = batch["image"]
        assert image.dtype == torch.float32 and image.ndim == 4
        rows += image.shape[0]
        batches += 1
        checksum += float(image.mean())
    seconds = time.perf_counter() - t0
    rank = ray.train.get_context().get_world_rank()
    metrics = {
        "rows": rows,
        "batches": batches,
        "seconds": seconds,
        "rank": rank,
        "mean_pixel": checksum / max(batches, 1),
    }
    if config.get("out"):
        from raylens.storage import join

        config["storage"].write_text(join(config["out"], f"rank-{rank}.json"), json.dumps(metrics))
    ray.train.report(metrics)
