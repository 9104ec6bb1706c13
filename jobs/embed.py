"""Embed a dataset with a model: Parquet of id, source, embedding, labels and metadata.

    python -m jobs.embed --config jobs/configs/embed_fashion_mnist.yaml [key=value ...]
    python -m jobs.embed data.dataset=s3://b/ds embed.model=s3://b/runs/fm embed.output=s3://b/emb
    ray job submit --working-dir . -- python -m jobs.embed ... embed.num_gpus=1 embed.concurrency=4

embed.model is a run dir (its best checkpoint; embed.include_logits adds logits/probs) or a
backbone name (model.pretrained / model.weights apply). A metric-learning run dir embeds
through its frozen backbones' feature cache, then its fusion model. The eval transform comes from the
model (the run's data section or the backbone's preprocessing); of data.*, data.dataset
is read: a prepared dataset, or a raw folder / manifest (source.*, prepare.*_fraction).
Re-running replaces the output: one row per image, never duplicates. A second job on an
output being written is refused (exit 2), naming the first; exit status 1 when a later
run took the output over after this one's lease lapsed (nothing of this run is committed).
"""

from __future__ import annotations

from raylens.cli import init_ray, run_job
from raylens.lease import hold
from raylens.schema import RunConfig
from raylens.storage import Storage, join

PROG = "python -m jobs.embed"


def main(argv: list[str] | None = None) -> dict:
    return run_job(
        argv,
        prog=PROG,
        description=__doc__,
        sections=["run", "storage", "data", "model", "embed", "ray"],
        main=_embed,
        exit_codes=_exit_codes,
    )


def _exit_codes() -> dict:
    from raylens.infer.embed import NotCommitted

    return {NotCommitted: 1}  # a later run took the output over: nothing of this run committed


def _embed(cfg: RunConfig, _flags) -> dict:
    from raylens.data.prepare import check_dataset

    storage = Storage(cfg.storage)
    check_dataset(cfg.data.dataset, cfg.source, storage)  # a typo fails before Ray's import
    from raylens.infer.embed import MANIFEST, plan_embed, run_embed
    from raylens.infer.metric_embed import is_metric_run, plan_metric_embed, run_metric_embed

    metric = is_metric_run(cfg.embed.model, storage)
    # model, dataset and output are checked before Ray starts
    plan = plan_metric_embed(cfg, storage) if metric else plan_embed(cfg, storage)
    with hold(
        plan.output,
        storage,
        job="jobs.embed",
        what=f"embeddings output {plan.output!r}",
        key="embed.output",
        run=cfg.run.name,
    ):
        init_ray(cfg.ray)
        manifest = run_metric_embed(plan, storage) if metric else run_embed(plan, storage)
    print(
        f"\nembeddings: {plan.output}  ({manifest['rows']:,} rows, dim {manifest['dim']}, "
        f"{len(manifest['files'])} file(s); manifest: {join(plan.output, MANIFEST)})"
    )
    if manifest["dropped"]:
        print(f"dropped (undecodable): {len(manifest['dropped'])}, e.g. {manifest['dropped'][:5]}")
    return manifest


if __name__ == "__main__":
    main()
