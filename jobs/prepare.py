"""Prepare a dataset: read a source, validate every image, write Parquet shards + dataset.json.

python -m jobs.prepare --config jobs/configs/fashion_mnist.yaml [key=value ...]
ray job submit --working-dir . -- python -m jobs.prepare source.uri=s3://b/raw prepare.output=s3://b/ds
"""

from __future__ import annotations

from raylens import config as C
from raylens.cli import run_job
from raylens.lease import hold
from raylens.schema import RunConfig
from raylens.storage import Storage, join


def main(argv: list[str] | None = None) -> dict:
    return run_job(
        argv,
        prog="python -m jobs.prepare",
        description=__doc__,
        sections=["run", "storage", "source", "prepare"],
        main=_prepare,
    )


def _prepare(cfg: RunConfig, _flags) -> dict:
    from raylens.data.prepare import format_card, prepare, return_freed_buffers

    return_freed_buffers()  # peak memory follows prepare.shard_bytes, not num_threads
    storage = Storage(cfg.storage)
    out = cfg.prepare.output
    with hold(
        out,
        storage,
        job="jobs.prepare",
        what=f"dataset output {out!r}",
        key="prepare.output",
        run=cfg.run.name,
    ):
        card = prepare(cfg.source, cfg.prepare, storage, seed=cfg.run.seed)
        storage.write_text(join(out, "config.yaml"), C.to_yaml(cfg))
    print(format_card(card))
    print(f"\ndataset: {cfg.prepare.output}  (card: {join(cfg.prepare.output, 'dataset.json')})")
    return card


if __name__ == "__main__":
    main()
