"""Fine-tune a backbone + head on a prepared dataset with Ray Train (DDP, AMP).

    python -m jobs.finetune --config jobs/configs/fashion_mnist.yaml [key=value ...]
    python -m jobs.finetune --config jobs/configs/metric_fashion_mnist.yaml  # task.name=metric
    python -m jobs.finetune --config jobs/configs/distill_fashion_mnist.yaml # task.name=distill
    ray job submit --working-dir . -- python -m jobs.finetune --config jobs/configs/<x>.yaml

Re-running with the same run.name resumes from the run's last checkpoint. While one job
trains a run, a second on the same run dir is refused (exit 2), naming the first.
"""

from __future__ import annotations

import dataclasses
import functools

from raylens.cli import init_ray, run_job
from raylens.schema import RunConfig
from raylens.storage import Storage

PROG = "python -m jobs.finetune"
SECTIONS = ["run", "storage", "data", "mix", "model", "task", "train", "metric", "distill", "ray"]


def main(argv: list[str] | None = None) -> dict:
    return run(argv, prog=PROG, description=__doc__, distill=False)


def run(argv: list[str] | None, *, prog: str, description: str, distill: bool) -> dict:
    """The fine-tune (or, with ``distill``, the distillation) job's command line."""
    return run_job(
        argv,
        prog=prog,
        description=description,
        sections=SECTIONS,
        main=functools.partial(_train, distill=distill, job=prog.split()[-1]),
        report=_report,
    )


def _train(cfg: RunConfig, _flags, *, distill: bool, job: str) -> dict:
    from raylens.rundir import RunDir
    from raylens.tasks import get_task

    if distill:  # jobs.distill: an alias of task.name=distill
        cfg = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, name="distill"))
    spec = get_task(cfg.task.name)
    check_data(cfg)
    from raylens.train import finetune

    with RunDir.of(cfg).lease(job):  # before Ray starts: a second job fails in seconds
        init_ray(cfg.ray)
        return {**finetune(cfg), "metric": spec.default_metric(cfg)}


def check_data(cfg: RunConfig) -> None:
    """Checks data.dataset before Ray starts (a typo fails in seconds, naming the path),
    for the reader the task's pipeline uses."""
    from raylens.data.prepare import check_dataset
    from raylens.data.sources import KINDS
    from raylens.tasks import get_task

    spec, why = get_task(cfg.task.name), ""
    if spec.name == "distill" and cfg.distill.mode == "stored":
        kinds, why = (), "stored distillation replays the teacher store over a prepared dataset"
    elif spec.pipeline == "features":  # read like jobs.embed: raw IDX too
        kinds = tuple(KINDS)
    else:  # Ray Data reads raw images by URI; IDX pixels come only through jobs.prepare
        kinds = tuple(k for k in KINDS if k != "idx")
    check_dataset(
        cfg.data.dataset, cfg.source, Storage(cfg.storage), raw_kinds=kinds, why_prepared=why
    )


def _report(out: dict) -> None:
    best = out["best"] or {}
    print(f"\nrun dir: {out['run_dir']}")
    val = best.get("metrics", {})
    print(f"best: epoch {best.get('epoch')}, " + ", ".join(f"{k}={v:.4f}" for k, v in val.items()))
    if out.get("baseline") is not None:  # metric learning
        for split, t in (out.get("test") or {}).items():
            raw = out["baseline"].get(split, {})
            print(
                f"{split} ({t['count']:.0f} images): "
                + ", ".join(
                    f"{k}={v:.4f} (raw {raw.get(k, float('nan')):.4f})"
                    for k, v in t.items()
                    if k != "count"
                )
            )
    elif out.get("test"):
        t = out["test"]
        metric = out["metric"]  # the task's own selection metric
        print(f"test ({t['count']} images, best checkpoint): {metric}={t[metric]:.4f}")
    if out.get("report"):
        print(f"report: {out['report']}")
    print(f"tensorboard: tensorboard --logdir {out['tensorboard']}")


if __name__ == "__main__":
    main()
