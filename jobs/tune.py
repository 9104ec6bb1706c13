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

import sys

from raylens.cli import parse_job_args
from raylens.config import ConfigError
from raylens.models.backbones import UnknownBackbone
from raylens.storage import Storage, StorageError
from raylens.train.launch import init_ray
from raylens.tune.space import load_space

PROG = "python -m jobs.tune"


def _flags(parser) -> None:
    parser.add_argument(
        "--space", required=True, help="search space YAML (tune_spaces/*.yaml; local, s3://, gs://)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the sweep at <output_dir>/<tune.name>"
    )
    parser.add_argument(
        "--distill", action="store_true", help="trials train against a teacher (jobs.distill)"
    )


def main(argv: list[str] | None = None) -> dict:
    from raylens.tune.sweep import cluster_resources, plan_sweep, retrain_best, run_sweep

    sections = ["run", "storage", "data", "model", "task", "train", "metric", "distill", "ray",
                "tune"]  # fmt: skip
    cfg, args = parse_job_args(
        argv, prog=PROG, description=__doc__, sections=sections, add_arguments=_flags
    )
    storage = Storage(cfg.storage)
    try:
        space = load_space(storage.read_text(args.space), cfg, args.space)
    except StorageError as err:  # unreachable or refused storage: already scrubbed
        print(f"{PROG}: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except (ConfigError, FileNotFoundError) as err:
        print(f"{PROG}: error: {storage.scrub(str(err))}", file=sys.stderr)
        raise SystemExit(2) from None
    distill = args.distill or bool(cfg.distill.teacher)
    init_ray(cfg.ray, dashboard=True)  # Tune + Train: stopped trials' CPUs get released
    try:
        plan = plan_sweep(cfg, space, distill=distill, cluster=cluster_resources())
        print(
            f"[tune] {cfg.tune.num_samples} trials of {len(space.params)} params, "
            f"{cfg.tune.scheduler} on {plan.metric} ({plan.mode}), {plan.concurrency} at once "
            f"x {plan.cpus_per_trial:g} CPUs; experiment {plan.exp_dir}"
        )
        summary = run_sweep(plan, resume=args.resume)
        if cfg.tune.retrain:
            summary["retrained"] = retrain_best(plan, summary)
    except StorageError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except (ConfigError, UnknownBackbone, ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"{PROG}: error: {storage.scrub(str(err))}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"\nexperiment: {plan.exp_dir}")
    print(f"best config: {summary['best_config']}")
    test = (summary.get("retrained") or {}).get("test")
    if test:
        shown = {k: v for k, v in test.items() if isinstance(v, float)}
        print("retrained best, test: " + ", ".join(f"{k}={v:.4f}" for k, v in shown.items()))
    return summary


if __name__ == "__main__":
    main()
