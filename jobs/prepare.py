"""Prepare a dataset: read a source, validate every image, write Parquet shards + dataset.json.

python -m jobs.prepare --config jobs/configs/fashion_mnist.yaml [key=value ...]
ray job submit --working-dir . -- python -m jobs.prepare source.uri=s3://b/raw prepare.output=s3://b/ds
"""

from __future__ import annotations

import sys

from raylens import config as C
from raylens.cli import parse_job_args
from raylens.data.prepare import format_card, prepare
from raylens.storage import Storage, StorageError, join


def main(argv: list[str] | None = None) -> dict:
    cfg, _ = parse_job_args(
        argv,
        prog="python -m jobs.prepare",
        description=__doc__,
        sections=["run", "storage", "source", "prepare"],
    )
    storage = Storage(cfg.storage)
    try:
        card = prepare(cfg.source, cfg.prepare, storage, seed=cfg.run.seed)
    except (ValueError, FileNotFoundError) as err:  # bad input: exit 2, like a bad flag
        print(f"python -m jobs.prepare: error: {storage.scrub(str(err))}", file=sys.stderr)
        raise SystemExit(2) from None
    except StorageError as err:  # storage unreachable or refused: already scrubbed
        print(f"python -m jobs.prepare: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    storage.write_text(join(cfg.prepare.output, "config.yaml"), C.to_yaml(cfg))
    print(format_card(card))
    print(f"\ndataset: {cfg.prepare.output}  (card: {join(cfg.prepare.output, 'dataset.json')})")
    return card


if __name__ == "__main__":
    main()
