"""The GPU rows of the train, embed and serve benchmarks, in one script for a lent GPU machine.

    python benchmarks/gpu.py --json OUT.json [--photos 24000] [--epochs 3] [--seconds 8]
    python benchmarks/gpu.py --render OUT.json --write      # the section, from a saved run

Saved runs: benchmarks/gpu_runs/ (the JSON each RESULTS.md section was rendered from).

Workload (no downloads): ``--photos`` JPEG crops of scikit-learn's two sample photos
(``decode_reduce``'s photo maker: short side 256-400 px, aspect 3:4-4:3, noise sigma 1,
quality 90); the class is the source photo (``china`` / ``flower``), so the task is easy and
the accuracies say only that training ran. Written as ``<work>/raw/<class>/<id>.jpg`` and
prepared with ``python -m jobs.prepare`` (train / val / test 0.8 / 0.1 / 0.1).

Rows, one after the other on the same machine (every step's result is saved to ``--json``
as soon as it exists, so a run cut short keeps what it measured):

- train, plain: ``tiny_vit_5m_224`` at 224 px, batch 128, ``raylens.loop.fit`` with batches
  already on the GPU, bf16 autocast vs fp32, interleaved (``train_overhead.run_gpu``): the
  GPU's own rate, no ingest.
- train, raylens: ``python -m jobs.finetune --config jobs/configs/tiny_vit_5m_224.yaml`` (the
  shipped GPU recipe: RandAugment ``rand-m9-mstd0.5-inc1``, random erasing 0.25, bicubic,
  layer decay, bf16) on the photos, 1 GPU worker, random init, ``--epochs`` epochs; the
  run's own images/s per epoch (Ray Data ingest from the Parquet shards + the step). Once
  more with RandAugment and erasing off: what strong augmentation costs a GPU-fed pipeline.
- embed: ``python -m jobs.embed`` of every split with that run on 1 GPU actor, and the test
  split alone: rows/s of the whole job (Ray start and model load included) and the marginal
  rate (full - small rows) / (full - small s), beside the model's forward alone on the GPU.
- serve: the run served by the raylens app one-hop and split (``@serve.batch`` 32, 5 ms;
  half a GPU each) and by a plain FastAPI + uvicorn process (``benchmarks/plain_app.py``,
  same model on the GPU), and Serve's own floors (``serve_load.deploy_floors``); photo JPEG
  uploads to ``POST /v1/classify`` at 1, 8 and 32 clients, ``--seconds`` each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import harness  # benchmarks/harness.py (the script's own folder is on sys.path)
from harness import log, median

REPO = Path(__file__).resolve().parents[1]
SECTION = "## GPU rows (benchmarks/gpu.py)"
CLASSES = ("china", "flower")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


# ----------------------------------------------------------------------------- data


def _make_chunk(job: tuple[int, int, str]) -> int:
    """Photos ``start .. start + n`` of the set, written under ``raw/<class>/``."""
    import decode_reduce as dr
    import numpy as np

    start, n, raw = job
    srcs = dr.sources()
    for i in range(start, start + n):
        rng = np.random.default_rng([7, i])
        c = i % len(CLASSES)
        short = int(rng.integers(256, 401))
        long = int(short * rng.uniform(1.0, 4 / 3))
        w, h = (long, short) if rng.random() < 0.5 else (short, long)
        img = dr._crop(rng, srcs[c], w, h, rng.uniform(0.7, 1.0))
        Path(raw, CLASSES[c], f"{i:06d}.jpg").write_bytes(dr._jpeg(np.asarray(img), rng, 1.0))
    return n


def make_dataset(work: Path, n: int) -> dict:
    """``n`` photos under ``work/raw`` and their prepared dataset at ``work/ds``."""
    from multiprocessing import Pool

    raw, ds = work / "raw", work / "ds"
    t0 = time.perf_counter()
    for c in CLASSES:
        (raw / c).mkdir(parents=True, exist_ok=True)
    step = 500
    jobs = [(s, min(step, n - s), str(raw)) for s in range(0, n, step)]
    with Pool(os.cpu_count()) as pool:
        made = sum(pool.map(_make_chunk, jobs))
    t1 = time.perf_counter()
    cmd = [sys.executable, "-m", "jobs.prepare", f"source.uri={raw}", f"prepare.output={ds}"]
    cmd += ["prepare.train_fraction=0.8", "prepare.val_fraction=0.1", "prepare.test_fraction=0.1"]
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    card = json.loads((ds / "dataset.json").read_text())
    size = sum(p.stat().st_size for p in raw.rglob("*.jpg"))
    return {
        "images": made,
        "mean_kb": size / made / 1024,
        "make_s": t1 - t0,
        "prepare_s": time.perf_counter() - t1,
        "splits": {k: v.get("count") for k, v in card.get("splits", {}).items()},
    }


# ----------------------------------------------------------------------------- train


def train_plain(device: str, steps: int, reps: int) -> dict:
    """``train_overhead.run_gpu``: tiny_vit_5m_224, batch 128, bf16 vs fp32, interleaved."""
    import train_overhead as to

    args = argparse.Namespace(
        gpu_device=device,
        gpu_batch_size=128,
        distinct=4,
        gpu_steps=steps,
        gpu_warmup=max(2, steps // 6),
        gpu_reps=reps,
    )
    return to.run_gpu(args)


def finetune(work: Path, name: str, epochs: int, extra: list[str], device: str) -> dict:
    """One ``jobs.finetune`` of the shipped TinyViT-5M recipe on the photos."""
    runs = work / "runs"
    cmd = [sys.executable, "-m", "jobs.finetune", "--config", "jobs/configs/tiny_vit_5m_224.yaml"]
    cmd += [f"run.name={name}", f"run.output_dir={runs}", f"data.dataset={work / 'ds'}"]
    cmd += ["model.pretrained=false", "ray.num_workers=1", "ray.cpus_per_worker=2"]
    cmd += [f"train.epochs={epochs}", "train.warmup_epochs=0", *extra]
    if device == "cpu":  # smoke test of this script on a machine without a GPU
        cmd += ["ray.use_gpu=false", "ray.cpus_per_worker=1", "data.batch_size=16"]
        cmd += ["model.backbone=test_vit", "data.image_size=64"]  # TinyViT: minutes on a CPU
    log_path = work / f"{name}.log"
    meter = harness.Meter(tree=True)
    with open(log_path, "w") as logf:
        proc = subprocess.run(cmd, cwd=REPO, stdout=logf, stderr=subprocess.STDOUT)
    window = meter.stop(1)
    if proc.returncode:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"jobs.finetune {name} exited {proc.returncode}:\n{tail}")
    rows = [json.loads(x) for x in (runs / name / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "images_per_s" in r]
    test = [r for r in rows if any(k.startswith("test") for k in r)]
    return {
        "run": str(runs / name),
        "wall_s": window["seconds"],
        "cpu_s": window["cpu_s"],
        "ips": [r["images_per_s"] for r in train],
        "last": {k: v for k, v in (train[-1] if train else {}).items() if not isinstance(v, dict)},
        "test": test[-1] if test else {},
        "overrides": extra,
    }


# ----------------------------------------------------------------------------- embed


def embed_job(work: Path, run: str, splits: str, tag: str, device: str) -> dict:
    out = work / f"emb-{tag}"
    cmd = [sys.executable, "-m", "jobs.embed", "--config", "jobs/configs/embed_fashion_mnist.yaml"]
    cmd += [f"data.dataset={work / 'ds'}", f"embed.model={run}", f"embed.output={out}"]
    cmd += [f"embed.splits=[{splits}]", "embed.batch_size=256"]
    if device == "cuda":
        cmd += ["ray.local_num_cpus=null"]  # every CPU of the machine
        cmd += ["embed.num_gpus=1", "embed.concurrency=1", "embed.num_cpus=2", "embed.amp=bf16"]
    t0 = time.perf_counter()
    log_path = work / f"emb-{tag}.log"
    with open(log_path, "w") as logf:
        proc = subprocess.run(cmd, cwd=REPO, stdout=logf, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"jobs.embed exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
    manifest = json.loads((out / "_manifest.json").read_text())
    return {"rows": manifest["rows"], "wall_s": wall, "rps": manifest["rows"] / wall}


def forward_only(run: str, device: str, batch: int = 256, seconds: float = 5.0) -> dict:
    """The run's model alone (``Predictor``), random normalized input already on the device."""
    import torch
    from raylens.predict import Predictor
    from raylens.storage import Storage

    pred = Predictor.load(run, Storage(), device=device)
    size = pred.data.image_size
    x = torch.randn(batch, 3, size, size, device=device)
    out = {}
    for amp in ("bf16", "off"):
        ctx = torch.autocast(device, dtype=torch.bfloat16, enabled=amp == "bf16")
        with torch.inference_mode(), ctx:
            for _ in range(3):
                pred.net(x)
            if device == "cuda":
                torch.cuda.synchronize()
            t0, n = time.perf_counter(), 0
            while time.perf_counter() - t0 < seconds:
                pred.net(x)
                n += 1
            if device == "cuda":
                torch.cuda.synchronize()
            out[amp] = n * batch / (time.perf_counter() - t0)
    return {"batch": batch, "size": size, "ips": out}


# ----------------------------------------------------------------------------- serve


def serve_rows(run: str, images: list[bytes], seconds: float, device: str) -> dict:
    """``serve_load``'s variants with the model on the GPU: the raylens app one-hop and
    split (half a GPU each, both deployed at once), Serve's floors, plain uvicorn; each at
    ``LEVELS`` clients, one variant after the other."""
    import ray
    import serve_load as sl
    from ray import serve

    gpus = 0.5 if device == "cuda" else 0
    cpus = 4 if gpus else 1
    # every variant deployed at once: logical CPUs as serve_load gives them
    ray.init(num_cpus=(os.cpu_count() or 2) * 8, include_dashboard=False, log_to_driver=False)
    sl.PORT = sl.free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": sl.PORT})
    os.environ["RAYLENS_DEVICE"] = device  # benchmarks/plain_app.py: the model on the GPU
    out: dict[str, list[dict]] = {}
    try:
        urls = {
            "one_hop": sl.deploy_raylens(run, "one_hop", cpus, "gpu-a", gpus=gpus),
            "split": sl.deploy_raylens(run, "split", cpus, "gpu-s", gpus=gpus),
            **sl.deploy_floors(),
        }
        with sl.plain_app(run) as plain:
            urls["plain"] = plain
            for key, url in urls.items():
                out[key] = sl.measure(url, images, seconds, key)
    finally:
        serve.shutdown()
        ray.shutdown()
    return out


# ----------------------------------------------------------------------------- report


def _fmt(xs, spec=",.0f") -> str:
    return " / ".join(format(x, spec) for x in xs)


def render(res: dict, argv) -> list[str]:
    gpu = res.get("device_name")
    lines = [*harness.heading(SECTION, argv, date=res.get("date"), gpu=gpu)]
    lines[lines.index("") + 3] = f"Machine: {res.get('machine', '')}"
    d = res.get("data")
    if d:
        lines += [
            f"Data: {d['images']:,} photo JPEGs ({d['mean_kb']:.0f} KB mean; made in "
            f"{d['make_s']:.0f} s on every core, prepared in {d['prepare_s']:.0f} s), splits "
            f"{d['splits']}.",
            "",
        ]
    p = res.get("train_plain")
    if p:
        rb, rf = median(p["rates"]["bf16"]), median(p["rates"]["off"])
        lines += [
            f"**Train, plain loop** (`tiny_vit_5m_224`, 224 px, batch {p['batch_size']}, batches "
            "already on the GPU; images/s per round):",
            "",
            "| precision | images/s (median) | rounds |",
            "|---|---:|---|",
            f"| bf16 autocast | {rb:,.0f} | {_fmt(p['rates']['bf16'])} |",
            f"| fp32 | {rf:,.0f} | {_fmt(p['rates']['off'])} |",
            "",
        ]
    rows = [(k, res[k]) for k in ("finetune_aug", "finetune_plain_aug") if res.get(k)]
    if rows:
        lines += [
            "**Train, raylens** (`jobs.finetune` of `jobs/configs/tiny_vit_5m_224.yaml`, 1 GPU "
            "worker with 2 CPUs, Ray Data on the other CPUs, random init; the run's images/s "
            "per epoch, decode + augmentation + step; CPU-s: the job and all its processes, val "
            "and test passes included):",
            "",
            "| augmentation | images/s per epoch | last epoch / plain bf16 | wall s | CPU-s | "
            "CPU-ms per train image |",
            "|---|---|---:|---:|---:|---:|",
        ]
        base = median(p["rates"]["bf16"]) if p else float("nan")
        for k, r in rows:
            what = "RandAugment m9 + erasing 0.25" if k == "finetune_aug" else "crop + flip only"
            n_img = res["data"]["splits"]["train"] * len(r["ips"]) if res.get("data") else 0
            cpu_ms = r["cpu_s"] / n_img * 1000 if n_img else float("nan")
            lines.append(
                f"| {what} | {_fmt(r['ips'])} | {harness.ratio(r['ips'][-1], base):.2f} | "
                f"{r['wall_s']:.0f} | {r['cpu_s']:.0f} | {cpu_ms:.2f} |"
            )
        lines.append("")
    e = res.get("embed")
    if e:
        full, small, fwd = e["full"], e["small"], e["forward"]
        marginal = (full["rows"] - small["rows"]) / max(full["wall_s"] - small["wall_s"], 1e-9)
        lines += [
            "**Embed** (`jobs.embed`, that run, 1 GPU actor with 2 CPUs, batch 256, bf16):",
            "",
            "| what | rows | s | rows/s |",
            "|---|---:|---:|---:|",
            f"| job, every split | {full['rows']:,} | {full['wall_s']:.1f} | {full['rps']:,.0f} |",
            f"| job, test split | {small['rows']:,} | {small['wall_s']:.1f} | {small['rps']:,.0f} |",
            f"| marginal (full - small) | | | {marginal:,.0f} |",
            f"| model forward alone, bf16 / fp32 (batch {fwd['batch']}, on the GPU) | | | "
            f"{fwd['ips']['bf16']:,.0f} / {fwd['ips']['off']:,.0f} |",
            "",
        ]
    s = res.get("serve")
    if s:
        lines += [
            "**Serve** (`POST /v1/classify`, photo JPEG bodies; the model on the GPU):",
            "",
            "| path | clients | req/s | p50 ms | p99 ms | errors |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        names = {
            "raylens": "raylens app (split), 1 GPU replica, batching 32",
            "one_hop": "raylens app, one-hop, batching 32",
            "split": "raylens app, split (ingress -> model), batching 32",
            "plain": "plain FastAPI + uvicorn, same model",
            "floor": "Serve floor (ingress -> no-op deployment)",
            "f1": "Serve floor, one hop (ingress answers a constant)",
            "f2": "Serve floor, two hops (ingress -> no-op deployment)",
        }
        for k in names:
            for r in s.get(k, []):
                lines.append(
                    f"| {names[k]} | {r['clients']} | {r['rps']:,.0f} | {r['p50']:.1f} | "
                    f"{r['p99']:.1f} | {r['errors']} |"
                )
        lines.append("")
    lines += [f"- {n}" for n in res.get("notes", [])]
    for k, msg in res.get("errors", {}).items():
        lines.append(f"- `{k}` failed: {msg.splitlines()[-1][:300] if msg else ''}")
    if res.get("errors"):
        lines.append("")
    return lines


# ----------------------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", help="save results here as they come")
    p.add_argument("--render", metavar="JSON", help="only render a saved run's section")
    p.add_argument("--work", default=str(REPO / "benchmarks" / "_work" / "gpu"))
    p.add_argument("--photos", type=int, default=24000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--steps", type=int, default=60, help="plain-loop steps per round")
    p.add_argument("--reps", type=int, default=3, help="plain-loop rounds")
    p.add_argument("--seconds", type=float, default=8.0, help="per serve load level")
    p.add_argument("--run", help="embed and serve this run dir (default: the finetune's)")
    p.add_argument("--only", default="data,plain,finetune,embed,serve,finetune_noaug")
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: smoke test
    harness.add_output_args(p)
    args = p.parse_args()
    if args.render:
        res = json.loads(Path(args.render).read_text())
        harness.emit(SECTION, render(res, res.get("argv")), args.write)
        return 0

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device on this machine")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {
        "argv": sys.argv[1:],
        "date": harness.utc_date(),
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "errors": {},
    }
    res["machine"] = harness.machine_line(res["device_name"])
    steps = args.only.split(",")

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1, default=str))

    def step(name: str, fn) -> object:
        if name.split(":")[0] not in steps:
            return None
        log(f"--- {name}")
        t0 = time.perf_counter()
        try:
            out = fn()
        except Exception as e:  # keep the other rows: a benchmark, not a product path
            res["errors"][name] = f"{type(e).__name__}: {e}"
            log(f"{name} failed: {res['errors'][name][-2000:]}")
            out = None
        log(f"--- {name}: {time.perf_counter() - t0:.0f} s")
        save()
        return out

    res["data"] = step("data", lambda: make_dataset(work, args.photos))
    res["train_plain"] = step("plain", lambda: train_plain(args.device, args.steps, args.reps))
    aug = step("finetune", lambda: finetune(work, "gpu-aug", args.epochs, [], args.device))
    res["finetune_aug"] = aug
    save()
    if aug or args.run:
        run = args.run or aug["run"]
        e = {}
        e["full"] = step(
            "embed", lambda: embed_job(work, run, "train,val,test", "full", args.device)
        )
        e["small"] = step("embed:small", lambda: embed_job(work, run, "test", "small", args.device))
        e["forward"] = step("embed:fwd", lambda: forward_only(run, args.device))
        res["embed"] = e if all(e.values()) else None
        save()

        def photos() -> list[bytes]:
            files = sorted((work / "raw").rglob("*.jpg"))[:512]
            return [f.read_bytes() for f in files]

        res["serve"] = step("serve", lambda: serve_rows(run, photos(), args.seconds, args.device))
    noaug = ["data.auto_augment=null", "data.reprob=0.0"]
    res["finetune_plain_aug"] = step(
        "finetune_noaug", lambda: finetune(work, "gpu-noaug", args.epochs, noaug, args.device)
    )
    save()
    print("\n".join(render(res, res["argv"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
