"""Run a teacher over the train split for E augmentation epochs; store sparse top-k targets.

    python -m jobs.teacher_logits --config jobs/configs/distill_fashion_mnist.yaml [key=value ...]
    python -m jobs.teacher_logits --config ... --check     # replay a subset, compare

The store (``distill.store``) holds per sample and epoch: id, augmentation seed, top-k
class indices and float16 probabilities (see raylens/data/teacher_store.py). Exit status 2
also when the store lacks a sample the dataset has.
"""

from __future__ import annotations

import argparse
import json

from raylens.cli import init_ray, run_job
from raylens.lease import hold
from raylens.schema import RunConfig
from raylens.storage import Storage

PROG = "python -m jobs.teacher_logits"


def main(argv: list[str] | None = None) -> dict:
    return run_job(
        argv,
        prog=PROG,
        description=__doc__,
        sections=["run", "storage", "data", "mix", "distill", "ray"],
        add_arguments=lambda p: p.add_argument(
            "--check", action="store_true", help="replay stored samples and compare"
        ),
        main=_teacher,
        exit_codes={KeyError: 2},  # the teacher store has no targets for a sample
    )


def _teacher(cfg: RunConfig, flags: argparse.Namespace) -> dict:
    from raylens.data.prepare import check_dataset

    storage = Storage(cfg.storage)
    check_dataset(  # before Ray is imported or started: a typo fails in seconds
        cfg.data.dataset,
        cfg.source,
        storage,
        raw_kinds=(),
        why_prepared="the teacher store keys a prepared dataset's rows",
    )
    from raylens.infer.teacher import check_store, teacher_pass
    from raylens.preprocess import resolve_preprocess
    from raylens.rundir import absolute_paths

    # the student's train transform (its interpolation), as jobs.distill will resolve it
    cfg = resolve_preprocess(absolute_paths(cfg), storage)
    if flags.check:
        out = check_store(cfg, storage)
        print(json.dumps(out, indent=1))
        return out
    store = cfg.distill.store
    with hold(
        store,
        storage,
        job="jobs.teacher_logits",
        what=f"teacher store {store!r}",
        key="distill.store",
        run=cfg.run.name,
    ):
        init_ray(cfg.ray)
        card = teacher_pass(cfg, storage)
    b = card["bytes_per_sample_epoch"]
    print(
        f"\nstore: {card['store']}  ({card['rows_per_epoch']} samples x {card['epochs']} epochs, "
        f"k={card['k']}; {b['without_id']:.1f} bytes a sample-epoch besides the id, "
        f"bound 4+4k = {b['bound']})"
    )
    return card


if __name__ == "__main__":
    main()
