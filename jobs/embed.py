"""Embed a dataset with a model: Parquet of id, source, embedding, labels and metadata.

    python -m jobs.embed --config jobs/configs/embed_fashion_mnist.yaml [key=value ...]
    python -m jobs.embed data.dataset=s3://b/ds embed.model=s3://b/runs/fm embed.output=s3://b/emb
    ray job submit --working-dir . -- python -m jobs.embed ... embed.num_gpus=1 embed.concurrency=4

embed.model is a run dir (its best checkpoint; embed.include_logits adds logits/probs) or a
backbone name (model.pretrained / model.weights apply). A metric-learning run dir embeds
through its frozen backbones' feature cache, then its fusion model. The eval transform comes from the
model (the run's data section or the backbone's preprocessing); of data.*, data.dataset
is read: a prepared dataset, or a raw folder / manifest (source.*, prepare.*_fraction).
Re-running replaces the output: one row per image, never duplicates.
"""

from __future__ import annotations

import sys

from raylens.cli import parse_job_args
from raylens.config import ConfigError
from raylens.infer.embed import MANIFEST, NotCommitted, plan_embed, run_embed
from raylens.storage import Storage, StorageError, join
from raylens.train.launch import init_ray
from raylens.train.metric_run import is_metric_run, plan_metric_embed, run_metric_embed

PROG = "python -m jobs.embed"


def _fail(storage: Storage, err: BaseException, code: int) -> None:
    print(f"{PROG}: error: {storage.scrub(str(err))}", file=sys.stderr)
    raise SystemExit(code) from None


def main(argv: list[str] | None = None) -> dict:
    cfg, _ = parse_job_args(
        argv,
        prog=PROG,
        description=__doc__,
        sections=["run", "storage", "data", "model", "embed", "ray"],
    )
    storage = Storage(cfg.storage)
    metric = is_metric_run(cfg.embed.model, storage)
    try:  # model, dataset and output are checked before Ray starts
        plan = plan_metric_embed(cfg, storage) if metric else plan_embed(cfg, storage)
    except StorageError as err:  # unreachable or refused storage: already scrubbed
        _fail(storage, err, 1)
    except (ValueError, FileNotFoundError) as err:  # ConfigError, UnknownBackbone included
        _fail(storage, err, 2)
    init_ray(cfg.ray)
    try:
        manifest = run_metric_embed(plan, storage) if metric else run_embed(plan, storage)
    except ConfigError as err:  # an actor pool the cluster can't hold
        _fail(storage, err, 2)
    except (StorageError, NotCommitted) as err:
        _fail(storage, err, 1)
    print(
        f"\nembeddings: {plan.output}  ({manifest['rows']:,} rows, dim {manifest['dim']}, "
        f"{len(manifest['files'])} file(s); manifest: {join(plan.output, MANIFEST)})"
    )
    if manifest["dropped"]:
        print(f"dropped (undecodable): {len(manifest['dropped'])}, e.g. {manifest['dropped'][:5]}")
    return manifest


if __name__ == "__main__":
    main()
