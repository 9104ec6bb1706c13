"""Peak memory of ``jobs.prepare`` against ``prepare.shard_bytes``: the baseline commit's
prepare (f3ba7e0: whole shards built in memory, read-ahead of 64 images per thread) vs this
checkout's (shards streamed row group by row group, read-ahead and decodes bounded in
bytes), run alternately in fresh subprocesses on the same photos.

    .venv/bin/python benchmarks/prepare_memory.py [--n 560] [--shards 32,64,128] [--rounds 2]
        [--threads 16] [--base f3ba7e0] [--write] [--json FILE]

The baseline's code runs from a git worktree of ``--base`` (made at /tmp/prep-base when
absent). Workload: ``--n`` photo-like JPEGs (1000 x 800, quality 92, ~350 KB; 2 classes),
local disk in and out, ``prepare.num_threads`` = ``--threads`` (16: the default).

Each run is a fresh process: it imports prepare and warms it up on 2 of the images (so
lazily imported modules and the codecs' first buffers count as the imports), then samples
its RSS every 2 ms from a thread while prepare runs. Reported per shard size: peak RSS
above that baseline (the target: <= 2 x shard_bytes), the baseline itself, wall and CPU
seconds per image of the prepare call; and whether both versions wrote the same rows.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import harness  # benchmarks/harness.py (the script's own folder is on sys.path)
from harness import log

REPO = Path(__file__).resolve().parents[1]
SECTION = "## jobs.prepare peak memory vs shard size (benchmarks/prepare_memory.py)"
MiB = 2**20

CHILD = r"""
import json, resource, sys, tempfile, threading, time
import psutil
from raylens.data import prepare as P
from raylens.data.prepare import prepare
from raylens.schema import PrepareConfig, SourceConfig
from raylens.storage import Storage
src, tiny, out, shard, threads = sys.argv[1:6]
def run(s, o):
    cfg = PrepareConfig(output=o, shard_bytes=int(shard), num_threads=int(threads),
                        overwrite=True)
    return prepare(SourceConfig(uri=s), cfg, Storage(), progress=False, log=lambda m: None)
if hasattr(P, "return_freed_buffers"):  # what jobs.prepare does first
    P.return_freed_buffers()
with tempfile.TemporaryDirectory() as d:
    run(tiny, d)
proc = psutil.Process()
base = peak = proc.memory_info().rss
done = threading.Event()
def sample():
    global peak
    while not done.is_set():
        peak = max(peak, proc.memory_info().rss)
        time.sleep(0.002)
t = threading.Thread(target=sample); t.start()
w0, c0 = time.perf_counter(), time.process_time()
card = run(src, out)
wall, cpu = time.perf_counter() - w0, time.process_time() - c0
done.set(); t.join()
print(json.dumps({"base": base, "peak": peak, "wall": wall, "cpu": cpu, "n": card["total"],
                  "files": sum(len(s["files"]) for s in card["splits"].values())}))
"""


def make_photos(root: Path, n: int) -> int:
    """``n`` photo-like JPEGs in two classes (tests/imagegen.py's generator); total bytes."""
    sys.path.insert(0, str(REPO))
    from tests.imagegen import encode, photo

    total = 0
    for i in range(n):
        path = root / f"c{i % 2}" / f"{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = encode(photo(1000, 800, seed=i, noise=14), "JPEG", quality=92)
        path.write_bytes(data)
        total += len(data)
    return total


def baseline_tree(commit: str) -> Path:
    where = Path("/tmp/prep-base")
    if not (where / "platform").exists():
        log(f"git worktree add {where} {commit}")
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(where), commit],
            check=True,
            capture_output=True,
        )
    return where


def rows_digest(out: Path) -> str:
    """A digest of every row of a prepared dataset (sorted by id), all columns."""
    import pyarrow.parquet as pq

    card = json.loads((out / "dataset.json").read_text())
    rows = []
    for split in ("train", "val", "test"):
        for f in card["splits"][split]["files"]:
            rows.extend(pq.read_table(io.BytesIO((out / f).read_bytes())).to_pylist())
    h = hashlib.sha256()
    for r in sorted(rows, key=lambda r: r["id"]):
        h.update(repr(sorted(r.items())).encode())
    return f"{len(rows)} rows, {h.hexdigest()[:16]}"


def run_child(code: Path, src: Path, tiny: Path, out: Path, shard: int, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(code / "platform"), str(code)])}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(src), str(tiny), str(out), str(shard), str(threads)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=560)
    parser.add_argument("--shards", default="32,64,128", help="shard_bytes values, MiB")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--base", default="f3ba7e0")
    harness.add_output_args(parser, out=True)
    args = parser.parse_args()
    code = {"baseline": baseline_tree(args.base), "streamed": REPO}
    shards = [int(s) for s in args.shards.split(",")]
    results: dict[str, dict] = {}
    with harness.scratch("prep-mem-") as tmp:
        src, tiny = tmp / "src", tmp / "tiny"
        log(f"making {args.n} photos")
        total = make_photos(src, args.n)
        for c in ("c0", "c1"):
            name = f"{c}/000{c[1]}.jpg"
            (tiny / c).mkdir(parents=True)
            (tiny / name).write_bytes((src / name).read_bytes())
        log(f"{total / MiB:.0f} MiB of JPEGs")
        for mib in shards:
            runs: dict[str, list[dict]] = {k: [] for k in code}
            digests = {}
            for rnd in range(args.rounds):
                for name in harness.alternate(list(code), rnd):
                    out = tmp / f"out-{name}"
                    r = run_child(code[name], src, tiny, out, mib * MiB, args.threads)
                    r["grew_mib"] = (r["peak"] - r["base"]) / MiB
                    r["window"] = harness.window(r["n"], r["wall"], r["cpu"])
                    runs[name].append(r)
                    log(
                        f"{mib} MiB shards, round {rnd}, {name}: peak +{r['grew_mib']:.0f} MiB "
                        f"over {r['base'] / MiB:.0f} MiB, {r['wall']:.2f} s, "
                        f"{1000 * r['cpu'] / r['n']:.2f} CPU-ms/img, {r['files']} shards"
                    )
                    if name not in digests:
                        digests[name] = rows_digest(out)
            results[str(mib)] = {"runs": runs, "digests": digests}

    lines = harness.heading(SECTION)
    lines += [
        f"{args.n} photo-like JPEGs (1000 x 800, quality 92), {total / MiB:.0f} MiB, local "
        f"disk; prepare.num_threads = {args.threads}; {args.rounds} interleaved rounds per "
        f"shard size, each run a fresh process. Peak: RSS above the process's own after "
        f"imports and a 2-image warm-up (max over rounds); time: medians.",
        "",
        "| shard_bytes | version | peak RSS above imports | target 2 x shard | imports RSS "
        "| wall s | images/s | CPU-ms per image | shards | same rows |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for mib, res in results.items():
        same = len(set(res["digests"].values())) == 1
        for name, rs in res["runs"].items():
            grew = max(r["grew_mib"] for r in rs)
            ok = "met" if grew <= 2 * int(mib) else "missed"
            wall = harness.median(r["wall"] for r in rs)
            cpu = harness.median(1000 * r["cpu"] / r["n"] for r in rs)
            lines.append(
                f"| {mib} MiB | {name} | {grew:.0f} MiB | {2 * int(mib)} MiB ({ok}) | "
                f"{harness.median(r['base'] for r in rs) / MiB:.0f} MiB | {wall:.2f} | "
                f"{rs[0]['n'] / wall:.0f} | {cpu:.2f} | {rs[0]['files']} | "
                f"{'yes' if same else 'NO'} ({res['digests'][name]}) |"
            )
    lines += ["", *(f"- {n}" for n in args.note)]
    harness.emit(SECTION, lines, args.write, args.out)
    harness.dump(args.json, results)


if __name__ == "__main__":
    main()
