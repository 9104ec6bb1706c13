"""Hyperparameter sweep: Ray Tune + Optuna TPE + ASHA over a search space.

    python -m jobs.tune --config jobs/configs/fashion_mnist.yaml --space tune_spaces/classify.yaml
    python -m jobs.tune --config ... --space ... tune.num_samples=16 tune.scheduler=fifo
    python -m jobs.tune --config ... --space ... --resume      # after the driver died
    ray job submit --working-dir . -- python -m jobs.tune --config ... --space ...

Each trial trains like jobs.finetune with the trial's overrides; ASHA stops weak trials
at rungs of tune.grace_period x tune.reduction_factor^k epochs, ranked on the task's own
validation metric. Results go to <tune.output_dir or run.output_dir>/<tune.name>/results:
trials.parquet/.csv, best_config.yaml (ready for jobs.finetune), PNG plots, and with
tune.retrain=true the best config retrained with its test-split metrics.
"""

from __future__ import annotations

import argparse
import dataclasses

from raylens.cli import init_ray, run_job
from raylens.lease import hold
from raylens.schema import RunConfig
from raylens.storage import Storage

from jobs.finetune import check_data

PROG = "python -m jobs.tune"
SECTIONS = [
    "run",
    "storage",
    "data",
    "mix",
    "model",
    "task",
    "train",
    "metric",
    "distill",
    "ray",
    "tune",
]


def _flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--space", required=True, help="search space YAML (tune_spaces/*.yaml; local, s3://, gs://)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the sweep at <output_dir>/<tune.name>"
    )
    parser.add_argument(
        "--distill", action="store_true", help="trials train against a teacher (task.name=distill)"
    )


def main(argv: list[str] | None = None) -> dict:
    return run_job(
        argv,
        prog=PROG,
        description=__doc__,
        sections=SECTIONS,
        add_arguments=_flags,
        main=_sweep,
        report=_report,
    )


def _sweep(cfg: RunConfig, flags: argparse.Namespace) -> dict:
    distill = cfg.task.name == "classify" and (flags.distill or cfg.distill.teacher)
    trials = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, name="distill"))
    from raylens.tune.space import load_space  # no Ray: the job's own argument first

    space = load_space(Storage(cfg.storage).read_text(flags.space), cfg, flags.space)
    check_data(trials if distill else cfg)  # before Ray is imported or started
    from raylens.tune.sweep import cluster_resources, plan_sweep, retrain_best, run_sweep

    init_ray(cfg.ray, dashboard=True)  # Tune + Train: stopped trials' CPUs get released
    if distill:
        cfg = trials
    plan = plan_sweep(cfg, space, cluster=cluster_resources())
    print(
        f"[tune] {cfg.tune.num_samples} trials of {len(space.params)} params, "
        f"{cfg.tune.scheduler} on {plan.metric} ({plan.mode}), {plan.concurrency} at once "
        f"x {plan.cpus_per_trial:g} CPUs; experiment {plan.exp_dir}"
    )
    # The sweep's lease covers its experiment dir, the trials' run dirs in it included:
    # trials take none of their own (Tune retries a failed trial while its lease would
    # still look live); the retrain runs under it too.
    with hold(
        plan.exp_dir,
        Storage(cfg.storage),
        job="jobs.tune",
        what=f"sweep {plan.exp_dir!r}",
        key="tune.name",
        run=plan.name,
    ):
        summary = run_sweep(plan, resume=flags.resume)
        if cfg.tune.retrain:
            summary["retrained"] = retrain_best(plan, summary)
    return summary


def _report(summary: dict) -> None:
    print(f"\nexperiment: {summary['exp_dir']}")
    print(f"best config: {summary['best_config']}")
    test = (summary.get("retrained") or {}).get("test")
    if test:
        shown = {k: v for k, v in test.items() if isinstance(v, float)}
        print("retrained best, test: " + ", ".join(f"{k}={v:.4f}" for k, v in shown.items()))


if __name__ == "__main__":
    main()
