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
import sys
import tempfile
from pathlib import Path

import harness  # benchmarks/harness.py (the script's own folder is on sys.path)
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the tests package: its server helpers

from tests.servers import start_seaweedfs  # noqa: E402
from tests.stores import s3_storage  # noqa: E402

SECTION = "## Object-store retries (benchmarks/storage_retry.py)"
TARGET = 0.9  # wrapped throughput / native throughput


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--objects", type=int, default=400)
    ap.add_argument("--reps", type=int, default=5)
    harness.add_output_args(ap)
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
            runs = {}  # workload -> {filesystem: [window, ...]}, a window's items in MiB
            for name, fn in work.items():
                harness.log(f"workload {name}")
                runs[name], _ = harness.interleave(
                    {k: lambda fs=fs, fn=fn: fn(fs) / 2**20 for k, fs in fss.items()},
                    args.reps,
                    warmup=True,
                    unit="MiB",
                )
        finally:
            server.stop()

    lines = []
    for name in work:
        native, wrapped = (harness.summarize(runs[name][k]) for k in ("native", "raylens"))
        ratio = wrapped["ips"] / native["ips"]
        cpu = wrapped["cpu_per_item"] / native["cpu_per_item"]
        lines.append(
            f"| {name} | {native['ips']:.0f} | {wrapped['ips']:.0f} | {ratio:.2f} | "
            f">= {TARGET:g} | {'met' if ratio >= TARGET else 'NOT met'} | "
            f"{1000 * native['cpu_per_item']:.1f} | {1000 * wrapped['cpu_per_item']:.1f} | "
            f"{cpu:.2f} |"
        )
    argv = ["--shards", str(args.shards), "--objects", str(args.objects)]
    argv += ["--reps", str(args.reps), "--write"]
    text = f"""{chr(10).join(harness.heading(SECTION, argv))}
Native `pyarrow.fs.S3FileSystem` vs raylens' retrying `PyFileSystem` over it
(`Storage.arrow_fs("s3")`), no faults injected, SeaweedFS on 127.0.0.1 sharing the CPUs;
{args.reps} rounds after a warm-up, order alternating; medians. parquet: {args.shards}
files x {rows} rows of 20 KB; small/write: {args.objects} objects of 20 KB, one request
each. CPU-ms per MiB: this process's CPU time (not the server's).

| workload | native MiB/s | raylens MiB/s | raylens / native | target | | native CPU-ms per MiB | raylens CPU-ms per MiB | CPU raylens / native |
|---|---:|---:|---:|---:|---|---:|---:|---:|
{chr(10).join(lines)}
"""
    harness.emit(SECTION, text, args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
