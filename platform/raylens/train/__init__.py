"""Training on Ray Train (the Ray layer). One entry point for every task:

    out = finetune(cfg)   # the task's pipeline: images (classify, multilabel, distill)
                          # or features (metric)

Each pipeline module holds a per-worker function and the driver that launches it through
:mod:`raylens.runtime.launch`; neither imports the other.
"""

from __future__ import annotations

from typing import Any

from raylens.schema import RunConfig


def finetune(
    cfg: RunConfig, *, callbacks: list | None = None, evaluate: bool = True
) -> dict[str, Any]:
    """Runs (or resumes) ``cfg``'s run with its task's pipeline; returns at least
    ``{"run_dir", "best", "test", "report", "result", "tensorboard"}`` (metric runs add
    ``baseline``, ``cache``). ``callbacks``: extra Ray Train callbacks (a Tune trial's reporter);
    ``evaluate=False`` stops after training (no test split, no report).
    """
    from raylens.rundir import RunDir
    from raylens.tasks import get_task

    if get_task(cfg.task.name).pipeline == "features":
        from raylens.train.metric import metric_learn as pipeline
    else:
        from raylens.train.images import train_images as pipeline
    out = pipeline(cfg, callbacks=callbacks, evaluate=evaluate)
    return {**out, "tensorboard": RunDir(out["run_dir"]).tensorboard}
