"""What the retrying object-store filesystem costs: pyarrow's native S3 filesystem vs
``Storage.arrow_fs("s3")`` (a ``PyFileSystem`` over it that retries transient errors and
pickles with its settings), side by side on one SeaweedFS, no outage.

    .venv/bin/python benchmarks/storage_retry.py [--shards 16 --objects 400 --reps 5 --write]

Workloads, each timed for both filesystems in alternating order per round (medians):

  parquet   pq.read_table of --shards Parquet files of ~4 MiB image bytes (what Ray Data's
            read of a prepared dataset does per shard: open_input_file + ranged reads);
  small     --objects 20 KiB objects read whole, one open_input_stream each (raw images,
            checkpoints' JSON files);
  write     --objects 20 KiB objects written, one open_output_stream each (run outputs).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import results_md  # noqa: E402  (benchmarks/ is on sys.path: the script's own folder)
from conftest import s3_storage  # noqa: E402
from servers import start_seaweedfs  # noqa: E402

SECTION = "## Object-store retries (benchmarks/storage_retry.py)"
TARGET = 0.9  # wrapped throughput / native throughput


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--objects", type=int, default=400)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--write", action="store_true", help="replace this section of RESULTS.md")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        server = start_seaweedfs(Path(tmp) / "weed")
        try:
            server.create_bucket("bench")
            storage = s3_storage(server)
            fss = {"native": storage.native_fs("s3"), "raylens": storage.arrow_fs("s3")}
            rng = os.urandom
            rows = 200
            for i in range(args.shards):
                table = pa.table(
                    {"id": list(range(rows)), "image": [rng(20_000) for _ in range(rows)]}
                )
                pq.write_table(table, f"bench/shards/{i:03d}.parquet", filesystem=fss["native"])
            blob = rng(20_000)
            for i in range(args.objects):
                with fss["native"].open_output_stream(f"bench/small/{i:04d}.bin") as f:
                    f.write(blob)

            def parquet(fs) -> int:
                return sum(
                    pq.read_table(f"bench/shards/{i:03d}.parquet", filesystem=fs).nbytes
                    for i in range(args.shards)
                )

            def small(fs) -> int:
                n = 0
                for i in range(args.objects):
                    with fs.open_input_stream(f"bench/small/{i:04d}.bin") as f:
                        n += len(f.read())
                return n

            def write(fs) -> int:
                for i in range(args.objects):
                    with fs.open_output_stream(f"bench/out/{i:04d}.bin") as f:
                        f.write(blob)
                return args.objects * len(blob)

            work = {"parquet": parquet, "small": small, "write": write}
            runs = {(w, k): [] for w in work for k in fss}
            for name, fn in work.items():
                for fs in fss.values():  # warm-up
                    fn(fs)
                for rep in range(args.reps):
                    order = list(fss) if rep % 2 == 0 else list(reversed(fss))
                    for k in order:
                        t0 = time.perf_counter()
                        nbytes = fn(fss[k])
                        runs[(name, k)].append(nbytes / (time.perf_counter() - t0) / 2**20)
        finally:
            server.stop()

    med = {key: statistics.median(v) for key, v in runs.items()}
    lines = []
    for name in work:
        ratio = med[(name, "raylens")] / med[(name, "native")]
        lines.append(
            f"| {name} | {med[(name, 'native')]:.0f} | {med[(name, 'raylens')]:.0f} | "
            f"{ratio:.2f} | >= {TARGET:g} | {'met' if ratio >= TARGET else 'NOT met'} |"
        )
    cmd = (
        f"`.venv/bin/python benchmarks/storage_retry.py --shards {args.shards} "
        f"--objects {args.objects} --reps {args.reps} --write`"
    )
    header = "  \n".join(
        [
            f"Command: {cmd}",
            f"Date: {time.strftime('%a %b %d %H:%M:%S UTC %Y', time.gmtime())}",
            f"Machine: {os.cpu_count()} CPUs, no GPU; Python {platform.python_version()}, "
            f"pyarrow {pa.__version__}; SeaweedFS on 127.0.0.1 shares the CPUs",
        ]
    )
    text = f"""{SECTION}

{header}

Native `pyarrow.fs.S3FileSystem` vs raylens' retrying `PyFileSystem` over it
(`Storage.arrow_fs("s3")`), no faults injected; {args.reps} rounds after a warm-up,
order alternating; MiB/s medians. parquet: {args.shards} files x {rows} rows of 20 KB;
small/write: {args.objects} objects of 20 KB, one request each.

| workload | native MiB/s | raylens MiB/s | raylens / native | target | |
|---|---:|---:|---:|---:|---|
{chr(10).join(lines)}
"""
    print(text)
    if args.write:
        results_md.write_section(results_md.RESULTS, SECTION, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
