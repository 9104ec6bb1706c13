"""Train overhead benchmark: the TorchTrainer path vs. a plain PyTorch loop, same model and data.

    .venv/bin/python benchmarks/train_overhead.py [--steps S] [--warmup W] [--reps R]
        [--reps-2w R2] [--batch-size B] [--no-two-workers] [--diagnose]
        [--worker-niceness N] [--gpu] [--write] [--out benchmarks/RESULTS.md]

Both paths run the project's own loop, ``raylens.loop.fit``, on the CPU default of
``jobs/configs/fashion_mnist.yaml`` (``vgg_s32`` + linear head, 10 classes, 28 px,
channels_last, ``train.amp=auto`` = bf16 autocast on CPU), over the same fixed in-memory
batches (deterministic random tensors, ``--distinct`` of them cycled; ingest is benchmarked
separately by ``ingest.py``). Each measurement ("window") builds a fresh model (same seed)
and runs ``fit`` for one epoch of S steps. The only difference is the runner:

  plain   ``fit`` in this process's main thread, ``Hooks()`` (no Ray in the loop);
  1w      one ``TorchTrainer.fit()`` from ``build_trainer`` (``ray.init(num_cpus=3)`` via
          ``init_ray``: the demo's ``ray.local_num_cpus: 3``) whose worker does what
          ``raylens.train.images.train_worker`` does: ``prepare_model``, ``fit`` with DDP-ready
          hooks, ``ray.train.report`` at the epoch end;
  2w      the same with ``ray.num_workers=2`` (DDP, gloo): the same batches split between
          the ranks (rank r takes every 2nd one); aggregate images/s;
  thread  (``--diagnose``) plain ``fit`` in a new Python thread of this process, the way
          Train V2 runs the train function (a thread of the worker actor).

Steady state: a generator hands ``fit`` its batches and stamps the time it is asked for
each, so steps W..S-1 take ``t(end) - t(ask for batch W)`` (W warm-up steps skipped; the
epoch-end validation and report excluded). Workers time themselves (no start-up) and write
``rank-<r>.json`` to a temp dir (Train V2 keeps no metrics reported without a checkpoint);
the driver records ``trainer.fit()``'s wall time and the start-up (``fit()`` called to
the worker ready to train). Over the steady window each run records the CPU time of the
process that trains (per thread too, in ``--json``) and of the whole machine
(``/proc/stat``), so windows slowed by other load show up. Before each window the script
waits (up to ``--quiet-wait`` s) for the machine to be idle. Rounds interleave the variants
(the plain/1w order flips every round; 2w in the first R2 rounds) and medians are compared,
because the 2-core machine is shared and noisy.

``--gpu`` also measures ``tiny_vit_5m_224`` at 224 px on CUDA, bf16 autocast vs fp32, with
the plain loop (batches already on the GPU). ``--write`` replaces this script's section
of ``--out`` (other sections kept).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import harness  # benchmarks/harness.py (the script's own folder is on sys.path)
from harness import log, machine_busy_s, median

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "jobs" / "configs" / "fashion_mnist.yaml"
SECTION = "## Train overhead (benchmarks/train_overhead.py)"
NUM_CLASSES = 10
TARGET = 0.97  # trainer (1 worker) / plain, steady-state images/s


def load_cfg(*overrides: str):
    """The Fashion-MNIST demo config, one epoch, with ``overrides`` (dotted keys)."""
    from raylens import config as C
    from raylens.schema import RunConfig

    return C.load(RunConfig, CONFIG.read_text(), ["train.epochs=1", *overrides])


def make_batches(distinct: int, batch_size: int, size: int, seed: int = 0):
    """``distinct`` fixed batches: normalized-like float32 images and int64 labels."""
    import torch

    g = torch.Generator().manual_seed(seed)
    images = torch.randn(distinct, batch_size, 3, size, size, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (distinct, batch_size), generator=g)
    return images, labels


def thread_ticks() -> dict[int, tuple[str, int]]:
    """CPU ticks (user + system) of each thread of this process: ``{tid: (name, ticks)}``."""
    out = {}
    for task in Path("/proc/self/task").glob("*"):
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(task.name)] = (name, int(fields[11]) + int(fields[12]))  # utime, stime
    return out


def thread_cores(before: dict, after: dict, seconds: float) -> list[list]:
    """``[[name, cores], ...]`` of the threads busy between two ``thread_ticks()``, busiest first."""
    hz = os.sysconf("SC_CLK_TCK")
    rows = [
        [name, (ticks - before.get(tid, (name, 0))[1]) / hz / seconds]
        for tid, (name, ticks) in after.items()
    ]
    return sorted([r for r in rows if r[1] >= 0.005], key=lambda r: -r[1])


# ----------------------------------------------------------------------------- the loop


def timed_fit(model, cfg, images, labels, order, warmup, device, hooks) -> dict:
    """``fit`` for one epoch over ``images[order[i]]``; steady-state time of steps >= warmup.

    ``marks[k]`` is when ``fit`` asks for batch ``k`` (the end of step ``k - 1``);
    ``marks[-1]`` is when it asks past the last one (the end of the last step, before the
    epoch-end validation and report).
    """
    import torch
    from raylens.loop import fit
    from raylens.tasks import create_task

    marks: list[float] = []
    cpu: list[tuple[float, float]] = []  # (this process's CPU s, machine busy CPU s)
    per_thread: list[dict] = []

    def train_batches(_epoch):
        for k, i in enumerate(order):
            if k == warmup:
                per_thread.append(thread_ticks())
                cpu.append((time.process_time(), machine_busy_s()))
            marks.append(time.perf_counter())
            yield {"image": images[i], "label": labels[i]}
        marks.append(time.perf_counter())
        cpu.append((time.process_time(), machine_busy_s()))
        per_thread.append(thread_ticks())

    val = [{"image": images[0][:64], "label": labels[0][:64]}]
    t0 = time.perf_counter()
    fit(
        model,
        create_task(cfg, NUM_CLASSES),
        cfg.train,
        train_batches=train_batches,
        val_batches=lambda: val,
        steps_per_epoch=len(order),
        device=device,
        hooks=hooks,
        channels_last=cfg.model.channels_last,
    )
    fit_s = time.perf_counter() - t0
    assert len(marks) == len(order) + 1, f"fit took {len(marks) - 1} of {len(order)} batches"
    bs = int(images.shape[1])
    steps = len(order) - warmup
    steady_s = marks[-1] - marks[warmup]
    step_s = [b - a for a, b in zip(marks[warmup:-1], marks[warmup + 1 :], strict=True)]
    return {
        "steps": steps,
        "images": steps * bs,
        "items": steps * bs,  # harness window keys: items, seconds, ips, cpu_per_item
        "seconds": steady_s,
        "steady_s": steady_s,
        "ips": steps * bs / steady_s,
        "cpu_per_item": (cpu[1][0] - cpu[0][0]) / (steps * bs),
        "warmup_s": marks[warmup] - marks[0],
        "fit_s": fit_s,
        "step_median_ms": 1000 * statistics.median(step_s),
        "step_max_ms": 1000 * max(step_s),
        "proc_cores": (cpu[1][0] - cpu[0][0]) / steady_s,
        "machine_cores": (cpu[1][1] - cpu[0][1]) / steady_s,
        "thread_cores": thread_cores(per_thread[0], per_thread[1], steady_s),
        "threads": torch.get_num_threads(),
        "nice": os.getpriority(os.PRIO_PROCESS, 0),  # Linux: the calling thread's
        "omp_env": os.environ.get("OMP_NUM_THREADS"),
        "thread_name": threading.current_thread().name,
    }


def new_model(cfg, device):
    """``build_model`` + channels_last, as ``raylens.train.images.train_worker`` does."""
    import torch
    from raylens.models.classifier import build_model

    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model, NUM_CLASSES)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.to(device)


def run_plain(cfg, images, labels, steps: int, warmup: int, in_thread: bool = False) -> dict:
    """Plain ``fit`` in this process (its main thread, or a new thread with ``in_thread``)."""
    import torch
    from raylens.loop import Hooks

    device = torch.device("cpu")
    order = [i % images.shape[0] for i in range(steps)]

    def go() -> dict:
        model = new_model(cfg, device)
        return timed_fit(
            model, cfg, images, labels, order, warmup, device, Hooks(log=lambda m: None)
        )

    if not in_thread:
        r = go()
    else:
        box: list = []
        th = threading.Thread(target=lambda: box.append(go()), name="TrainingThread")
        th.start()
        th.join()
        if not box:
            raise RuntimeError("the plain loop in a thread failed (see its traceback above)")
        r = box[0]
    r["wall_s"] = r["fit_s"]
    r["other_cores"] = r["machine_cores"] - r["proc_cores"]
    return r


# ----------------------------------------------------------------------------- TorchTrainer


def trainer_worker(config: dict) -> None:
    """Ray Train worker: ``raylens.train.images.train_worker``'s model/hooks set-up, fixed batches.

    Writes ``<out>/rank-<r>.json`` with the in-worker timings (wall-clock stamps too).
    """
    import ray
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from raylens.loop import Hooks

    t_start = time.time()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = config["cfg"]
    images, labels = ray.get(config["data"])
    images, labels = images.clone(), labels.clone()  # ordinary process memory, like plain
    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(new_model(cfg, device))

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        if world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    hooks = Hooks(
        all_reduce=all_reduce,
        report=lambda metrics, checkpoint: ray.train.report(metrics),
        log=lambda m: None,
        is_main=rank == 0,
    )
    order = [i % images.shape[0] for i in range(config["steps"])][rank::world]
    t_ready = time.time()
    r = timed_fit(model, cfg, images, labels, order, config["warmup"], device, hooks)
    r.update(
        rank=rank,
        world=world,
        t_start=t_start,
        t_ready=t_ready,
        t_done=time.time(),
        model_type=type(model).__name__,
        backend=dist.get_backend() if dist.is_initialized() else None,
        pid=os.getpid(),
    )
    Path(config["out"], f"rank-{rank}.json").write_text(json.dumps(r))


def run_trainer(cfg, data_ref, steps: int, warmup: int, tmp: Path, tag: str) -> dict:
    """One ``TorchTrainer.fit()`` (``build_trainer``) of one window; its ranks' timings."""
    from ray.train import RunConfig as RayRunConfig
    from raylens.runtime.launch import build_trainer

    out = tmp / f"out-{tag}"
    out.mkdir(parents=True)
    trainer, plan = build_trainer(
        trainer_worker,
        {"cfg": cfg, "data": data_ref, "steps": steps, "warmup": warmup, "out": str(out)},
        {},
        cfg,
        run_config=RayRunConfig(storage_path=str(tmp / "ray_results"), name=f"overhead-{tag}"),
    )
    t0 = time.time()
    trainer.fit()
    t1 = time.time()
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank-*.json"))]
    assert len(ranks) == cfg.ray.num_workers, f"{len(ranks)} rank files"
    images = sum(r["images"] for r in ranks)
    steady_s = max(r["steady_s"] for r in ranks)
    proc = sum(r["proc_cores"] for r in ranks)
    return {
        "images": images,
        "items": images,
        "seconds": steady_s,
        "steady_s": steady_s,
        "ips": images / steady_s,  # aggregate over ranks / slowest rank
        "cpu_per_item": sum(r["proc_cores"] * r["steady_s"] for r in ranks) / images,
        "proc_cores": proc,
        "other_cores": max(r["machine_cores"] for r in ranks) - proc,
        "threads": "+".join(str(r["threads"]) for r in ranks),
        "nice": ranks[0]["nice"],
        "wall_s": t1 - t0,  # trainer.fit(): start-up, every step, validation, report, shutdown
        "startup_s": max(r["t_ready"] for r in ranks) - t0,
        "teardown_s": t1 - max(r["t_done"] for r in ranks),
        "plan": plan.describe(),
        "cluster_cpus": plan.cluster_cpus,
        "ranks": ranks,
    }


# ----------------------------------------------------------------------------- GPU


def run_gpu(args) -> dict:
    """``tiny_vit_5m_224`` at 224 px: bf16 autocast vs fp32 (plain ``fit``), interleaved."""
    import torch
    from raylens.loop import Hooks

    device = torch.device(args.gpu_device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--gpu: CUDA is not available on this machine")
    bs = args.gpu_batch_size
    images, labels = make_batches(args.distinct, bs, 224)
    images, labels = images.to(device), labels.to(device)  # no host->device copies timed
    order = [i % args.distinct for i in range(args.gpu_steps)]

    def one(amp: str) -> dict:
        cfg = load_cfg(
            "model.backbone=tiny_vit_5m_224",
            "data.image_size=224",
            f"data.batch_size={bs}",
            f"train.amp={amp}",
        )
        return timed_fit(
            new_model(cfg, device),
            cfg,
            images,
            labels,
            order,
            args.gpu_warmup,
            device,
            Hooks(log=lambda m: None),
        )  # fit's per-step loss.item() synchronizes, so the stamps are step ends

    amps = ["bf16", "off"]
    runs, _ = harness.interleave(
        {amp: lambda amp=amp: one(amp) for amp in amps},
        args.gpu_reps,
        order=lambda rnd: amps,
        unit="images",
    )
    rates = {amp: [r["ips"] for r in runs[amp]] for amp in amps}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    return {"device": name, "batch_size": bs, "rates": rates}


# ----------------------------------------------------------------------------- report


LABELS = {
    "plain": "plain: `fit` in the driver's main thread, `Hooks()`",
    "thread": "plain `fit` in a new thread of the driver (as Train V2 runs the train fn)",
    "1w": "1w: `TorchTrainer`, 1 worker",
    "2w": "2w: `TorchTrainer`, 2 workers, DDP, aggregate",
}


def ratios(runs: dict, tag: str, base: str = "plain") -> dict:
    """``tag`` vs ``base``: ``harness.compare`` of their windows (``ips``: ratio of medians,
    ``paired``: per-round ratios, ``best``: of the best windows, ``cpu_per_item``)."""
    return harness.compare(runs[base], runs[tag])


def render(args, date, runs, gpu, notes) -> str:
    fmt = lambda xs: ", ".join(f"{x:,.0f}" for x in xs)  # noqa: E731
    bs = args.batch_size
    t1 = runs["1w"][0]
    lines = [
        *harness.heading(SECTION, args.argv, date=date, gpu=gpu and gpu["device"]),
        f"Workload: `raylens.loop.fit`, one epoch of {args.steps} steps per window, on the "
        "CPU default of `jobs/configs/fashion_mnist.yaml` (`vgg_s32` + linear head, 10 classes, "
        f"28 px, channels_last, bf16 autocast, AdamW + cosine), batch {bs}, over {args.distinct} "
        f"fixed random batches `[{bs}, 3, 28, 28]` held in memory (no ingest); a fresh model "
        f"(same seed) per window. Steady state = steps {args.warmup}..{args.steps - 1} (the first "
        f"{args.warmup} skipped; the epoch-end validation and report excluded), timed inside the "
        "process that trains. Each 1w/2w window is one `TorchTrainer.fit()` (`build_trainer`, "
        f"`ray.init(num_cpus={t1['cluster_cpus']:g})` as the demo's `ray.local_num_cpus`). "
        f"{args.reps} rounds, variants interleaved ({', '.join(runs)}; plain/1w order flipped "
        f"every round; 2w in the first {len(runs.get('2w', []))}); medians.",
        "",
        "| variant | median steady images/s | windows (images/s) | torch threads (nice) "
        "| CPU cores used by the training process(es) | CPU-ms per image (median) "
        "| other busy CPU on the machine (cores) "
        "| median start-up | median `fit()` wall incl. start-up (images/s over all steps) |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for v, rs in runs.items():
        r0 = rs[0]
        wall = median(r["wall_s"] for r in rs)
        startup = f"{median(r['startup_s'] for r in rs):.1f} s" if "startup_s" in r0 else "-"
        lines.append(
            f"| {LABELS[v]} | {median(r['ips'] for r in rs):,.0f} | {fmt(r['ips'] for r in rs)} "
            f"| {r0['threads']} ({r0['nice']}) | {median(r['proc_cores'] for r in rs):.2f} | "
            f"{1000 * median(r['cpu_per_item'] for r in rs):.3f} | "
            f"{median(r['other_cores'] for r in rs):.2f} | {startup} | "
            f"{wall:.1f} s ({args.steps * bs / wall:,.0f}) |"
        )
    r1 = ratios(runs, "1w")
    verdict = "met" if r1["ips"] >= TARGET else "not met"
    lines += [
        "",
        f"Resource plans: 1w {t1['plan']}"
        + (f"; 2w {runs['2w'][0]['plan']}" if "2w" in runs else "")
        + ". Start-up: `trainer.fit()` called -> the worker ready to train (worker process, "
        "torch process group, `ray.get` of the batches, `prepare_model`).",
        "",
        "| ratio | value | target | |",
        "|---|---:|---:|---|",
        f"| 1w / plain (medians) | {r1['ips']:.3f} | >= {TARGET:g} | {verdict} |",
        f"| 1w / plain (median of per-round ratios) | {r1['paired_median']:.3f} | | |",
        f"| 1w / plain (best window of each) | {r1['best']:.3f} | | |",
        f"| 1w / plain, CPU per image (medians) | {r1['cpu_per_item']:.3f} | report only | |",
    ]
    if "thread" in runs:
        lines.append(
            f"| plain in a thread / plain (medians) | {ratios(runs, 'thread')['ips']:.3f} | | |"
        )
    if "2w" in runs:
        r2 = ratios(runs, "2w")
        lines.append(f"| 2w (aggregate) / plain (medians) | {r2['ips']:.3f} | report only | |")
    lines += [
        "",
        f"Per-round 1w / plain: {', '.join(f'{x:.3f}' for x in r1['paired'])}.",
        "",
    ]
    if gpu:
        rb, rf = median(gpu["rates"]["bf16"]), median(gpu["rates"]["off"])
        lines += [
            f"GPU ({gpu['device']}): `tiny_vit_5m_224` at 224 px, batch {gpu['batch_size']}, "
            f"plain `fit`, batches already on the device, {args.gpu_steps} steps "
            f"({args.gpu_warmup} warm-up), {args.gpu_reps} interleaved rounds:",
            "",
            "| precision | median images/s | runs |",
            "|---|---:|---|",
            f"| bf16 autocast | {rb:,.0f} | {fmt(gpu['rates']['bf16'])} |",
            f"| fp32 | {rf:,.0f} | {fmt(gpu['rates']['off'])} |",
            "",
            f"bf16 / fp32: {rb / rf:.2f}.",
            "",
        ]
    else:
        lines += [
            "GPU (`tiny_vit_5m_224` at 224 px, bf16 vs fp32; `--gpu`): not run, no GPU was "
            "lent to this issue.",
            "",
        ]
    lines += ["Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def default_notes(args, runs, discarded) -> list[str]:
    w1 = runs["1w"][0]["ranks"][0]
    r1 = ratios(runs, "1w")
    notes = [
        "Same in both paths: config, model init seed, batches (order and content), the loop "
        "(`fit`, incl. its per-step `loss.item()`), the epoch-end validation on one 64-image "
        "batch (outside the timed window). The 1w worker also runs `prepare_model` (at world "
        f"size 1 it wraps nothing: `{w1['model_type']}`), runs `fit` in Train V2's training "
        f"thread (`{w1['thread_name']}`), and reports through `ray.train.report` at the end.",
        f"Intra-op threads: plain {runs['plain'][0]['threads']} (torch's default here), 1w "
        f"{w1['threads']} (OMP_NUM_THREADS={w1['omp_env']}, set by Ray from the worker's CPU "
        "resource)"
        + (f", 2w {runs['2w'][0]['threads']}" if "2w" in runs else "")
        + f". Ray workers run at nice {w1['nice']} (`RAY_worker_niceness`: Ray's default is 15; "
        "`--worker-niceness` changes it), the driver and the plain loop at nice "
        f"{runs['plain'][0]['nice']}.",
        "CPU columns are over the steady window: CPU time of the process(es) that train (all "
        "their threads) and the rest of the machine's busy time (for 1w/2w that includes Ray's "
        "own processes: Train controller, raylet, GCS, ...; for plain, the idle Ray session "
        "this driver started). Before each window the script waited up to "
        f"{args.quiet_wait:g} s for the machine to be idle (<= {args.quiet_max:g} busy cores "
        "over 1 s).",
        "The machine is shared (tests and training runs of other sessions may use its 2 "
        "cores) and its speed drifts by about +-10 % between windows even when idle, so "
        "windows are interleaved and medians compared; a single window proves little. A "
        f"window during which the rest of the machine used more than {args.max_other:g} "
        f"cores was discarded and repeated once the machine was idle again (up to "
        f"{args.retries} times, waiting up to {args.retry_wait:g} s; the last attempt is kept "
        "either way): discarded "
        + ", ".join(f"{v} {len(d)}" for v, d in discarded.items())
        + "; kept but disturbed "
        + ", ".join(f"{v} {sum(r['disturbed'] for r in rs)}" for v, rs in runs.items())
        + ".",
    ]
    if "2w" in runs:
        notes.append(
            f"2w: each rank trains on half the batches (batch {args.batch_size} per rank, "
            f"{args.warmup} warm-up steps per rank), gradients all-reduced every step "
            "(gloo); aggregate = all ranks' steady images / the slowest rank's steady time. "
            "Two workers on 2 cores have no more CPU than one, so no speedup is expected."
        )
    if r1["ips"] < TARGET:
        notes.append(f"Target 1w / plain >= {TARGET:g} NOT MET ({r1['ips']:.3f}).")
    return notes


# ----------------------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=80, help="steps per window (incl. warm-up)")
    p.add_argument("--warmup", type=int, default=10, help="first steps of a window not timed")
    p.add_argument("--reps", type=int, default=6, help="interleaved rounds")
    p.add_argument("--reps-2w", type=int, default=3, help="rounds that include 2w")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--distinct", type=int, default=8, help="distinct batches, cycled")
    p.add_argument("--no-two-workers", action="store_true", help="skip the 2-worker trainer")
    p.add_argument("--diagnose", action="store_true", help="also plain fit in a new thread")
    p.add_argument(
        "--worker-niceness", type=int, help="RAY_worker_niceness for this Ray (default: Ray's)"
    )
    p.add_argument("--quiet-wait", type=float, default=60, help="max s to wait for idle")
    p.add_argument("--quiet-max", type=float, default=0.3, help="idle: busy cores at most")
    p.add_argument(
        "--max-other",
        type=float,
        default=0.35,
        help="a window during which the rest of the machine used more cores is repeated",
    )
    p.add_argument("--retries", type=int, default=3, help="repeats of a disturbed window")
    p.add_argument("--retry-wait", type=float, default=600, help="max s to wait for idle then")
    p.add_argument("--gpu", action="store_true", help="also tiny_vit_5m_224 bf16 vs fp32")
    p.add_argument("--gpu-device", default="cuda", help=argparse.SUPPRESS)  # cpu: smoke test
    p.add_argument("--gpu-steps", type=int, default=60)
    p.add_argument("--gpu-warmup", type=int, default=10)
    p.add_argument("--gpu-reps", type=int, default=3)
    p.add_argument("--gpu-batch-size", type=int, default=128)
    harness.add_output_args(p, out=True)
    args = p.parse_args()
    args.argv = sys.argv[1:]
    if not 0 < args.warmup < args.steps:
        p.error("need 0 < --warmup < --steps")
    if not args.no_two_workers and (args.steps % 2 or args.warmup >= args.steps // 2):
        p.error("2 workers: --steps must be even and --warmup < --steps / 2")
    if args.worker_niceness is not None:
        os.environ["RAY_worker_niceness"] = str(args.worker_niceness)  # noqa: SIM112

    import ray
    import torch
    from raylens.runtime.launch import init_ray

    date = harness.utc_date()
    with harness.scratch("raylens-overhead-") as tmp:
        gpu = run_gpu(args) if args.gpu else None
        cfg1 = load_cfg(f"data.batch_size={args.batch_size}", "ray.num_workers=1")
        cfg2 = load_cfg(f"data.batch_size={args.batch_size}", "ray.num_workers=2")
        assert cfg1.model.backbone == "vgg_s32" and cfg1.ray.local_num_cpus == 3
        images, labels = make_batches(args.distinct, args.batch_size, cfg1.data.image_size)
        init_ray(cfg1.ray)
        data_ref = ray.put((images, labels))
        log(f"plain loop torch threads: {torch.get_num_threads()}")

        variants = ["plain", "1w"]
        variants += [] if args.no_two_workers else ["2w"]
        variants += ["thread"] if args.diagnose else []
        discarded: dict[str, list[dict]] = {v: [] for v in variants}
        tags = itertools.count()

        def order(rnd: int) -> list[str]:
            """2w in the first --reps-2w rounds; plain / 1w swapped every other round."""
            todo = [v for v in variants if v != "2w" or rnd < args.reps_2w]
            if rnd % 2:
                todo[0], todo[1] = todo[1], todo[0]
            return todo

        def window(v: str) -> dict:
            """One window of ``v``, repeated (up to --retries) while others disturb it."""
            for attempt in range(args.retries + 1):
                bg = harness.wait_quiet(
                    args.quiet_max, args.quiet_wait if not attempt else args.retry_wait
                )
                if v in ("plain", "thread"):
                    r = run_plain(cfg1, images, labels, args.steps, args.warmup, v == "thread")
                else:
                    cfg = cfg1 if v == "1w" else cfg2
                    r = run_trainer(
                        cfg, data_ref, args.steps, args.warmup, tmp, f"{v}-{next(tags)}"
                    )
                r["idle_probe_cores"] = bg
                r["disturbed"] = r["other_cores"] > args.max_other
                extra = f", start-up {r['startup_s']:.1f} s" if "startup_s" in r else ""
                log(
                    f"{v}: {r['ips']:,.0f} img/s steady (threads "
                    f"{r['threads']}, nice {r['nice']}, training CPU {r['proc_cores']:.2f} "
                    f"cores, other {r['other_cores']:.2f}, wall {r['wall_s']:.1f} s{extra}, "
                    f"load before {bg:.2f})" + (" DISTURBED" if r["disturbed"] else "")
                )
                if not r["disturbed"] or attempt == args.retries:
                    return r
                discarded[v].append(r)
            raise AssertionError("unreachable")

        runs, _ = harness.interleave(
            {v: lambda v=v: window(v) for v in variants}, args.reps, order=order, verbose=False
        )
        runs = {k: v for k, v in runs.items() if v}
        log(f"1w / plain = {ratios(runs, '1w')['ips']:.3f} (medians)")

        notes = default_notes(args, runs, discarded) + args.note
        text = render(args, date, runs, gpu, notes)
        harness.emit(SECTION, text, args.write, args.out)
        harness.dump(args.json, {"runs": runs, "discarded": discarded, "gpu": gpu})
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
