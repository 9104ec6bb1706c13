"""Embedding job throughput vs a pure model forward over the same preprocessed batches.

    .venv/bin/python benchmarks/embed.py [--splits train,val,test] [--reps 3]
        [--model RUN_DIR_OR_BACKBONE] [--variant NAME:key=value,...] [--write]

Workload: the prepared Fashion-MNIST (``data/fashion-mnist``, all 70,000 images by
default), the shipped ``jobs/configs/embed_fashion_mnist.yaml`` (normalized embeddings +
logits/probs, batch 256, 2 model actors x 1 CPU, Ray with 3 logical CPUs on 2 cores) and,
unless ``--model`` names another, a run dir this script writes: the CPU default's model
(``vgg_s32`` + linear head, 10 classes, 28 px, from ``jobs/configs/fashion_mnist.yaml``),
random init (the cost does not depend on the weights). Two variants:

  forward  every image decoded and eval-transformed once up front (not timed), normalized
           float32 batches of ``embed.batch_size`` in memory; timed: the model's forward
           (``Predictor.embed_and_logits`` + softmax + L2 norm, the job's computation), fp32,
           in this process with torch's default threads;
  job      ``run_embed(plan)``: read the Parquet shards, decode + transform, the actor
           pool's forward, write Parquet, commit; timed from the call to its return (actor
           start-up and model load included; ``ray.init`` and the plan, which reads no
           image, are not).

The job also runs on a small input (``--small-splits``, the 10,000-image test split) next
to each full run: (full rows - small rows) / (full s - small s) is its marginal rate, with
the fixed costs of a run (actor start-up, Ray Data start, commit) cancelled out.

One untimed warm-up of each, then ``--reps`` rounds alternating the order (forward, job,
small / small, job, forward, ...). Before each window the script waits (up to ``--quiet-wait`` s) for the
machine to be idle, and records the whole machine's busy cores during the window: the
2-core machine is shared. Medians are compared: target job / forward >= 0.8. ``--variant``
adds job configurations (dotted overrides) to the rounds. ``--write`` replaces this
script's section of ``--out`` (other sections kept).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import results_md  # benchmarks/results_md.py (the script's own folder is on sys.path)

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "jobs" / "configs" / "embed_fashion_mnist.yaml"
TRAIN_CONFIG = REPO / "jobs" / "configs" / "fashion_mnist.yaml"
SECTION = "## Embeddings (benchmarks/embed.py)"
TARGET = 0.8


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine so far (all cores, from ``/proc/stat``)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def wait_quiet(max_cores: float, timeout: float) -> float:
    """Waits until the machine's busy CPU over 1 s is <= ``max_cores``; returns the last value."""
    deadline = time.monotonic() + timeout
    while True:
        b0 = machine_busy_s()
        time.sleep(1.0)
        load = machine_busy_s() - b0
        if load <= max_cores or time.monotonic() >= deadline:
            return load


class OwnCpu:
    """CPU seconds used by this process and all its descendants (Ray's processes, actors)
    during a window: a thread samples the process tree every 0.2 s, so processes that exit
    within the window (the actors) are counted up to their last sample."""

    def __init__(self):
        import threading

        import psutil

        self.psutil, self.me = psutil, psutil.Process()
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.stop = threading.Event()
        self.initial = True
        self.sample()
        self.initial = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        for proc in [self.me, *self.me.children(recursive=True)]:
            try:
                t = proc.cpu_times()
                cpu = t.user + t.system
            except self.psutil.Error:
                continue
            self.first.setdefault(proc.pid, cpu if self.initial else 0.0)
            self.last[proc.pid] = cpu

    def _run(self) -> None:
        while not self.stop.wait(0.2):
            self.sample()

    def done(self) -> float:
        self.stop.set()
        self.thread.join()
        self.sample()
        return sum(self.last[p] - self.first[p] for p in self.last)


def make_run(run: Path) -> str:
    """A run dir holding the CPU default's architecture (random init) and its data section."""
    import torch
    from raylens import config as C
    from raylens.models.classifier import build_model
    from raylens.schema import RunConfig
    from raylens.storage import Storage
    from raylens.train.checkpoint import save_checkpoint

    cfg = C.load(RunConfig, TRAIN_CONFIG.read_text(), ["run.name=embed-bench"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 10)
    save_checkpoint(Storage(), str(run / "checkpoints" / "epoch=1"), model=model.state_dict())
    (run / "config.yaml").write_text(C.to_yaml(cfg))
    card = json.loads((REPO / cfg.data.dataset / "dataset.json").read_text())
    labels = {"classes": card["classes"], "task": card["task"]}
    (run / "labels.json").write_text(json.dumps(labels))
    (run / "best.json").write_text(json.dumps({"epoch": 1, "checkpoint": "checkpoints/epoch=1"}))
    return str(run)


def preprocessed_batches(plan, pred, batch_size: int):
    """Every input image decoded + eval-transformed + normalized, in batches (not timed)."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    ids, batches, pending = [], [], []
    for shard in plan.shards:
        table = pq.read_table(shard, columns=["id", "image"])
        ids += table.column("id").to_pylist()
        pixels, kept, failures = pred.preprocess(table.column("image").to_pylist())
        assert not failures and len(kept) == table.num_rows
        pending.append(pixels)
    pixels = torch.from_numpy(np.concatenate(pending))
    for lo in range(0, len(pixels), batch_size):
        batches.append(pred.normalize(pixels[lo : lo + batch_size]))
    return ids, batches


def run_forward(pred, batches, e) -> dict:
    """The job's computation on in-memory batches: features (+ logits, probs), L2 norm."""
    import torch

    outs = []
    b0, own = machine_busy_s(), OwnCpu()
    t0 = time.perf_counter()
    for x in batches:
        if e.include_logits:
            feats, logits = pred.embed_and_logits(x)
            probs = pred.probs(logits)
        else:
            feats, probs = pred.embed(x), None
        if e.normalize:
            feats = torch.nn.functional.normalize(feats, dim=1)
        outs.append((feats, probs))
    seconds = time.perf_counter() - t0
    rows = sum(len(x) for x in batches)
    return {
        "rows": rows,
        "seconds": seconds,
        "ips": rows / seconds,
        "machine_cores": (machine_busy_s() - b0) / seconds,
        "own_cores": own.done() / seconds,
        "out": outs,
    }


def run_job(plan) -> dict:
    from raylens.infer.embed import run_embed

    b0, own = machine_busy_s(), OwnCpu()
    t0 = time.perf_counter()
    manifest = run_embed(plan)
    seconds = time.perf_counter() - t0
    return {
        "rows": manifest["rows"],
        "seconds": seconds,
        "ips": manifest["rows"] / seconds,
        "machine_cores": (machine_busy_s() - b0) / seconds,
        "own_cores": own.done() / seconds,
        "write_s": manifest["seconds"],
    }


def check_outputs(plan, ids, forward_out, e) -> dict:
    """The job's rows: one per image; its vectors equal the in-process forward's."""
    import numpy as np
    import pyarrow.parquet as pq

    table = pq.read_table(plan.output)
    got_ids = table.column("id").to_pylist()
    assert sorted(got_ids) == sorted(ids) and len(set(got_ids)) == len(got_ids)
    feats = np.concatenate([f.numpy() for f, _ in forward_out])
    index = {i: k for k, i in enumerate(ids)}
    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    rows = np.array([index[i] for i in got_ids])
    err = float(np.abs(emb - feats[rows]).max())
    out = {"rows": len(got_ids), "max_abs_embedding_diff": err}
    if e.include_logits:
        probs = np.concatenate([p.numpy() for _, p in forward_out])
        got = np.stack(table.column("probs").to_numpy(zero_copy_only=False))
        out["max_abs_probs_diff"] = float(np.abs(got - probs[rows]).max())
    return out


def marginal_rates(runs: dict) -> list[float]:
    """Per round: (full rows - small rows) / (full s - small s): the job's images/s with its
    fixed costs (actor start, Ray Data start, commit) cancelled out."""
    return [
        (j["rows"] - s["rows"]) / (j["seconds"] - s["seconds"])
        for j, s in zip(runs["job"], runs["small"], strict=True)
        if j["seconds"] > s["seconds"]
    ]


def others(r: dict) -> float:
    """Busy cores of other jobs during a window: the machine's minus ours."""
    return max(0.0, r["machine_cores"] - r["own_cores"])


def clean_medians(runs: dict, max_others: float) -> dict[str, tuple[float, int]]:
    """``{variant: (median images/s, windows)}`` over windows others hardly disturbed."""
    out = {}
    for name, rs in runs.items():
        ok = [r["ips"] for r in rs if others(r) <= max_others]
        if ok:
            out[name] = (statistics.median(ok), len(ok))
    return out


def machine_line() -> str:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from ingest import machine_info  # benchmarks/ingest.py

    i = machine_info()
    return (
        f"{i['nproc']} CPUs ({i['cpu']}), {i['ram_gib']} GiB RAM, no GPU; Python {i['python']}, "
        f"Ray {i['ray']}, torch {i['torch']}, pyarrow {i['pyarrow']}; {i['os']}"
    )


def render(args, date, plan, runs, warm, check, variants, notes) -> str:
    med = {k: statistics.median(r["ips"] for r in v) for k, v in runs.items()}
    fmt = lambda rs: ", ".join(f"{r['ips']:,.0f}" for r in rs)  # noqa: E731
    load = lambda rs: ", ".join(f"{others(r):.2f}" for r in rs)  # noqa: E731
    e = plan.cfg.embed
    cmd = ".venv/bin/python benchmarks/embed.py " + " ".join(args.argv)
    ratio = med["job"] / med["forward"]
    model = plan.model
    lines = [
        SECTION,
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Date: {date}  ",
        f"Machine: {machine_line()}",
        "",
        f"Workload: {plan.input_rows:,} images ({', '.join(plan.splits)}) of the prepared "
        f"Fashion-MNIST, model `{args.model or 'vgg_s32 + linear head (10 classes)'}` "
        f"(dim {model.dim}) at {model.data.image_size} px, fp32; job config "
        f"`jobs/configs/embed_fashion_mnist.yaml`: normalize={e.normalize}, "
        f"include_logits={e.include_logits}, batch {e.batch_size}, {e.concurrency} actor(s) x "
        f"{e.num_cpus:g} CPU, Ray with {plan.cfg.ray.local_num_cpus} logical CPUs. "
        f"{args.reps} timed rounds, order alternating, after one warm-up of each.",
        "",
        "| variant | median images/s | runs (images/s) | other jobs' cores per run | warm-up |",
        "|---|---:|---|---|---:|",
        f"| forward: in-memory preprocessed batches, one process "
        f"| {med['forward']:,.0f} | {fmt(runs['forward'])} | {load(runs['forward'])} "
        f"| {warm['forward']['ips']:,.0f} |",
        f"| job: `run_embed` (read, decode, actor pool, write, commit) "
        f"| {med['job']:,.0f} | {fmt(runs['job'])} | {load(runs['job'])} "
        f"| {warm['job']['ips']:,.0f} |",
        f"| job on a small input ({runs['small'][0]['rows']:,} images: {args.small_splits}) "
        f"| {med['small']:,.0f} | {fmt(runs['small'])} | {load(runs['small'])} "
        f"| {warm['small']['ips']:,.0f} |",
    ]
    for name, overrides in variants.items():
        lines.append(
            f"| job variant `{name}` ({', '.join(overrides)}) | {med[name]:,.0f} | "
            f"{fmt(runs[name])} | {load(runs[name])} | {warm[name]['ips']:,.0f} |"
        )
    verdict = "met" if ratio >= TARGET else "NOT MET"
    lines += [
        "",
        "| ratio | value | target | |",
        "|---|---:|---:|---|",
        f"| job / forward (medians) | {ratio:.2f} | >= {TARGET:g} | {verdict} |",
    ]
    clean = clean_medians(runs, args.clean_max)
    if "forward" in clean and "job" in clean:
        r = clean["job"][0] / clean["forward"][0]
        lines.append(
            f"| job / forward (medians of windows with other jobs <= {args.clean_max:g} cores: "
            f"{clean['forward'][1]} forward, {clean['job'][1]} job) | {r:.2f} | >= {TARGET:g} "
            f"| {'met' if r >= TARGET else 'NOT MET'} |"
        )
    marginal = marginal_rates(runs)
    if marginal:
        m = statistics.median(marginal)
        lines.append(
            f"| job marginal images/s (fixed costs cancelled) / forward | "
            f"{m / med['forward']:.2f} | | report only |"
        )
    for name in variants:
        lines.append(f"| `{name}` / forward (medians) | {med[name] / med['forward']:.2f} | | |")
    paired = [j["ips"] / f["ips"] for f, j in zip(runs["forward"], runs["job"], strict=True)]
    fixed = [j["seconds"] - (j["rows"] / r) for j, r in zip(runs["job"], marginal, strict=False)]
    lines += [
        "",
        f"Per-round job / forward: {', '.join(f'{x:.2f}' for x in paired)}. Marginal job rate "
        f"per round, (full rows - small rows) / (full s - small s): "
        f"{', '.join(f'{x:,.0f}' for x in marginal)} images/s, i.e. a fixed cost of "
        f"{', '.join(f'{x:.1f}' for x in fixed)} s per run. Job time split "
        "(median): until the last row was written "
        f"{statistics.median(r['write_s'] for r in runs['job']):.1f} s of "
        f"{statistics.median(r['seconds'] for r in runs['job']):.1f} s (the rest: listing the "
        "staged files, checking ids, moving them into place, the manifest).",
        "",
        "Notes:",
        "",
        f"- Checks (last job run vs the in-process forward): {check['rows']:,} rows, one per "
        f"image; max |embedding difference| {check['max_abs_embedding_diff']:.1e}"
        + (
            f", max |probs difference| {check['max_abs_probs_diff']:.1e}."
            if "max_abs_probs_diff" in check
            else "."
        ),
    ]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str) -> None:
    """Replaces this script's section of ``path`` (appends it if absent); others kept."""
    results_md.write_section(path, SECTION, text)


def default_notes(plan, runs) -> list[str]:
    actors = plan.cfg.embed.concurrency
    return [
        "forward runs in this process (torch's default intra-op threads: "
        f"{runs['forward'][0]['threads']}); the job's {actors} actor(s) run 1 torch thread per "
        "reserved CPU. Without a GPU, decode is fused into the actors (same CPU request), so "
        "each actor decodes and embeds its own batches; Parquet read and write tasks use the "
        "third logical CPU.",
        "'other jobs' cores': the whole machine's busy CPU time over each window "
        "(`/proc/stat`) minus this benchmark's own (its process and every descendant: Ray's "
        "processes and the actors, sampled every 0.2 s), per second. Windows started only "
        "after the machine was idle for 1 s (or after waiting the maximum); the machine is "
        "shared with other sessions' jobs, so medians are compared, also over the windows "
        "they hardly touched.",
        "The job's time includes its fixed costs, which a larger input amortizes: starting "
        "the actor processes (each imports torch: ~1.5 s of the ~2.3 s an actor took to "
        "start here, measured separately), loading the model, Ray Data's start, the last "
        "batches' write, the commit.",
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default=str(REPO / "data" / "fashion-mnist"))
    p.add_argument("--splits", default="train,val,test", help="comma-separated splits")
    p.add_argument(
        "--small-splits", default="test", help="the small job input (marginal rate: see above)"
    )
    p.add_argument("--model", help="run dir or backbone (default: a vgg_s32 run dir made here)")
    p.add_argument("--reps", type=int, default=3, help="timed rounds")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:key=value,...",
        help="an extra job configuration in the rounds",
    )
    p.add_argument("--quiet-wait", type=float, default=60, help="max s to wait for idle")
    p.add_argument("--quiet-max", type=float, default=0.3, help="idle: busy cores at most")
    p.add_argument(
        "--clean-max", type=float, default=0.25, help="a clean window: other jobs' cores at most"
    )
    p.add_argument("--write", action="store_true", help="write the section into --out")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "RESULTS.md"))
    p.add_argument("--json", help="also write raw results as JSON here")
    p.add_argument("--note", action="append", default=[], help="extra note for RESULTS.md")
    args = p.parse_args()
    args.argv = sys.argv[1:]

    import ray
    import torch
    from raylens import config as C
    from raylens.infer.embed import plan_embed
    from raylens.predict import Predictor
    from raylens.schema import RunConfig
    from raylens.train.launch import init_ray

    date = subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip()
    tmp = Path(tempfile.mkdtemp(prefix="raylens-embed-bench-"))
    try:
        model = args.model or make_run(tmp / "run")
        base = [
            f"data.dataset={args.dataset}",
            f"embed.model={model}",
            f"embed.splits=[{args.splits}]",
        ]
        if args.model and "/" not in args.model:
            base.append("embed.include_logits=false")  # a bare backbone has no head
        text = CONFIG.read_text()
        cfg = C.load(RunConfig, text, base + [f"embed.output={tmp / 'out-job'}"])
        plan = plan_embed(cfg)
        variants = {}
        small = [*base[:2], f"embed.splits=[{args.small_splits}]"] + base[3:]
        plans = {
            "job": plan,
            "small": plan_embed(C.load(RunConfig, text, small + [f"embed.output={tmp / 's'}"])),
        }
        for spec in args.variant:
            name, _, kv = spec.partition(":")
            variants[name] = [x for x in kv.split(",") if x]
            vcfg = C.load(RunConfig, text, base + [f"embed.output={tmp / name}", *variants[name]])
            plans[name] = plan_embed(vcfg)
        e = plan.cfg.embed
        pred = Predictor.from_source(plan.model)
        log(f"preprocessing {plan.input_rows:,} images in this process (not timed)")
        ids, batches = preprocessed_batches(plan, pred, e.batch_size)
        init_ray(cfg.ray)
        log(f"Ray: {ray.cluster_resources().get('CPU')} CPUs")

        def one(name: str) -> dict:
            if name == "forward":
                r = run_forward(pred, batches, e)
                r["threads"] = torch.get_num_threads()
            else:
                r = run_job(plans[name])
            return r

        names = ["forward", "job", "small", *variants]
        warm = {n: one(n) for n in names}
        for n in names:
            warm[n].pop("out", None)
        log("warm-up: " + ", ".join(f"{n} {warm[n]['ips']:,.0f} img/s" for n in names))
        runs: dict[str, list[dict]] = {n: [] for n in names}
        last_forward = None
        for rnd in range(args.reps):
            order = names[:3] if rnd % 2 == 0 else names[2::-1]
            order += names[3:]
            for n in order:
                idle = wait_quiet(args.quiet_max, args.quiet_wait)
                r = one(n)
                r["idle_before"] = idle
                if "out" in r:
                    last_forward = r.pop("out")
                runs[n].append(r)
                log(
                    f"round {rnd} {n}: {r['ips']:,.0f} img/s ({r['seconds']:.1f} s, machine "
                    f"{r['machine_cores']:.2f} busy cores, ours {r['own_cores']:.2f}, "
                    f"{idle:.2f} before)"
                )
        check = check_outputs(plan, ids, last_forward, e)
        log(f"checks: {check}")
        med = {n: statistics.median(r["ips"] for r in v) for n, v in runs.items()}
        marginal = marginal_rates(runs)
        log(
            f"job / forward = {med['job'] / med['forward']:.3f} (medians); marginal / forward "
            f"= {statistics.median(marginal) / med['forward']:.3f}"
        )
        text = render(
            args, date, plan, runs, warm, check, variants, default_notes(plan, runs) + args.note
        )
        print(text)
        if args.write:
            write_section(Path(args.out), text)
            log(f"wrote {args.out}")
        if args.json:
            Path(args.json).write_text(json.dumps({"runs": runs, "warm": warm, "check": check}))
        return 0
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
