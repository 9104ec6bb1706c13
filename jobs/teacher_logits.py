"""Run a teacher over the train split for E augmentation epochs; store sparse top-k targets.

    python -m jobs.teacher_logits --config jobs/configs/distill_fashion_mnist.yaml [key=value ...]
    python -m jobs.teacher_logits --config ... --check     # replay a subset, compare

The store (``distill.store``) holds per sample and epoch: id, augmentation seed, top-k
class indices and float16 probabilities (see raylens/data/teacher_store.py).
"""

from __future__ import annotations

import json
import sys

from raylens.cli import parse_job_args
from raylens.storage import Storage, StorageError
from raylens.train.launch import init_ray
from raylens.train.run import absolute_paths
from raylens.train.teacher import check_store, teacher_pass

PROG = "python -m jobs.teacher_logits"


def main(argv: list[str] | None = None) -> dict:
    cfg, args = parse_job_args(
        argv,
        prog=PROG,
        description=__doc__,
        sections=["run", "storage", "data", "distill", "ray"],
        add_arguments=lambda p: p.add_argument(
            "--check", action="store_true", help="replay stored samples and compare"
        ),
    )
    cfg = absolute_paths(cfg)
    storage = Storage(cfg.storage)
    try:
        if args.check:
            out = check_store(cfg, storage)
            print(json.dumps(out, indent=1))
            return out
        init_ray(cfg.ray)
        card = teacher_pass(cfg, storage)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"{PROG}: error: {storage.scrub(str(err))}", file=sys.stderr)
        raise SystemExit(2) from None
    except StorageError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    b = card["bytes_per_sample_epoch"]
    print(
        f"\nstore: {card['store']}  ({card['rows_per_epoch']} samples x {card['epochs']} epochs, "
        f"k={card['k']}; {b['without_id']:.1f} bytes a sample-epoch besides the id, "
        f"bound 4+4k = {b['bound']})"
    )
    return card


if __name__ == "__main__":
    main()
