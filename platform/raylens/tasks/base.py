"""What a task is, and the registry of tasks by name (a leaf: task files register here).

A task declares its loss, its metric meter, the batch keys it reads, the run kind it
produces, the training pipeline that feeds it, and the validation metric (and direction)
that selects its best checkpoint. The loop, Tune, the jobs and the reports ask the task;
none of them re-derives these. Pure: no Ray.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from raylens.schema import RunConfig


@dataclass
class Task:
    """A built task, as the training loop uses it: a loss, a metric meter, batch keys."""

    name: str
    target_key: str
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    meter: Callable[[], Any]
    best_metric: str
    # training loss from (logits, batch, model input) when it needs more than the target,
    # e.g. distillation's teacher targets; validation always uses ``loss``
    train_loss: Callable[[torch.Tensor, dict, torch.Tensor], torch.Tensor] | None = None
    input_key: str = "image"  # the batch key fed to the model (metric tasks: "features")
    # training loss against soft targets float [b, C] (Mixup / CutMix, raylens.data.mix),
    # used when the task has no ``train_loss``; None: the task cannot train on mixed targets
    soft_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None


@dataclass(frozen=True)
class TaskSpec:
    """A registered task.

    Attributes:
        name: the ``task.name`` that selects it.
        kind: the run kind its runs produce (:data:`raylens.rundir.KINDS`).
        pipeline: ``images`` (Ray Data image ingest) or ``features`` (frozen-backbone
            feature cache, :mod:`raylens.train.metric`).
        labels: the dataset labels it needs: ``single``, ``multi`` or ``any``.
        build: ``(cfg, num_classes, *, model=None, teacher=None) -> Task``.
        default_metric: ``cfg -> metric name`` selecting the best checkpoint when
            ``train.best_metric`` is unset.
    """

    name: str
    kind: str
    pipeline: Literal["images", "features"]
    labels: Literal["single", "multi", "any"]
    build: Callable[..., Task]
    default_metric: Callable[[RunConfig], str]
    doc: str = ""

    def best_metric(self, cfg: RunConfig) -> str:
        """The validation metric that selects the run's best checkpoint."""
        return cfg.train.best_metric or self.default_metric(cfg)

    def mode(self, cfg: RunConfig) -> Literal["min", "max"]:
        return "min" if lower_is_better(self.best_metric(cfg)) else "max"


TASKS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    TASKS[spec.name] = spec
    return spec


def get_task(name: str) -> TaskSpec:
    """The registered task ``name``.

    Raises:
        ValueError: naming the registered tasks (and the closest name).
    """
    if name not in TASKS:
        close = difflib.get_close_matches(name, list(TASKS), n=1)
        raise ValueError(
            f"config key 'task.name': unknown task {name!r}; registered: {sorted(TASKS)}"
            + (f" (did you mean {close[0]!r}?)" if close else "")
        )
    return TASKS[name]


def create_task(cfg: RunConfig, num_classes: int, **context: Any) -> Task:
    """Builds ``cfg.task.name``'s task for ``num_classes`` classes. ``context``: what a task
    needs beyond the config (``model`` for metric learning, ``teacher`` for online
    distillation)."""
    if num_classes < 1:
        raise ValueError(f"task {cfg.task.name!r}: the dataset has no classes")
    return get_task(cfg.task.name).build(cfg, num_classes, **context)


def lower_is_better(metric: str) -> bool:
    """Losses are minimized; every other metric (top1, f1_weighted, ...) is maximized."""
    return metric.endswith("loss")


def is_better(metric: str, new: float, best: float | None) -> bool:
    if best is None:
        return True
    return new < best if lower_is_better(metric) else new > best


def check_best_metric(metric: str, meter: Any) -> None:
    """Fails naming ``train.best_metric`` unless ``meter`` (a fresh one) reports ``metric``."""
    if callable(getattr(meter, "keys", None)):  # metric learning: known without data
        names = list(meter.keys())
    else:  # an empty meter computes the same scalar keys as a full one
        names = [k for k, v in meter.compute().items() if isinstance(v, (int, float))]
    reported = sorted({*names, "loss"} - {"count"})
    if metric not in reported:
        raise ValueError(
            f"config key 'train.best_metric': {metric!r} is not a validation metric of "
            f"this task; it reports {reported}"
        )
