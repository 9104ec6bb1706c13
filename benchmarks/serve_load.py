"""HTTP load on the classification endpoint: batched Serve vs unbatched Serve vs plain uvicorn.

    .venv/bin/python benchmarks/serve_load.py [--seconds 15] [--models fm,convnext,floor]

Two models, each served three ways, and Serve's own floor (``floor``: (d) below):

- ``fm``: the run ``make demo`` trains (runs/fashion-mnist-vgg: vgg_s32, 0.29 M parameters,
  28 px), about 1 ms per image: Serve's per-request overhead dominates.
- ``convnext``: a compute-bound model, convnext_atto at 224 px (3.7 M parameters), as a run
  dir with random-init weights (benchmarks/_work/serve-convnext_atto-224; throughput only,
  its predictions mean nothing), preprocessing Fashion-MNIST images to 224 px.

Variants, all serving the same run with the same preprocessing, one after the other on
the same machine, each at 1, 8 and 32 concurrent clients for a fixed duration:

  (a) the raylens Serve app (serve/app.py), ``@serve.batch`` on (max batch 32, 5 ms wait)
  (b) the same app and deployment with batching off (one forward per request)
  (c) a plain single-process FastAPI + uvicorn app (benchmarks/plain_app.py), no Ray
  (d) no model: a FastAPI ingress forwarding the body to a deployment that answers at once,
      the ceiling any Serve app with an ingress and a model deployment has on this machine

Clients (asyncio + aiohttp, in this process) post raw PNG bytes of Fashion-MNIST test images
to ``POST /v1/classify`` in a closed loop. Reported: requests/s, p50/p99 latency, errors.
One model replica with every CPU for (a)/(b); uvicorn has the same CPUs. Results go to
benchmarks/RESULTS.md ("Serve load").
"""

import argparse
import asyncio
import glob
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import harness  # benchmarks/harness.py (the script's own folder is on sys.path)
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # serve/app.py
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

SECTION = "## Serve load (benchmarks/serve_load.py)"
LEVELS = (1, 8, 32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_images(dataset: str, n: int) -> list[bytes]:
    import pyarrow.parquet as pq

    files = sorted(glob.glob(f"{dataset}/test/**/*.parquet", recursive=True))
    if not files:
        sys.exit(f"no prepared test split under {dataset!r}: run `make demo` first")
    return pq.read_table(files[0], columns=["image"]).column("image").to_pylist()[:n]


async def load(url: str, images: list[bytes], clients: int, seconds: float) -> dict:
    import aiohttp

    lat: list[float] = []
    codes: dict[int, int] = {}
    stop = time.perf_counter() + seconds

    async def client(i: int, session: aiohttp.ClientSession) -> None:
        k = i
        while time.perf_counter() < stop:
            img = images[k % len(images)]
            k += clients
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=img, headers={"content-type": "image/png"}) as r:
                    await r.read()
                    code = r.status
            except Exception:
                code = -1
            lat.append(time.perf_counter() - t0)
            codes[code] = codes.get(code, 0) + 1

    conn = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(i, session) for i in range(clients)))
        wall = time.perf_counter() - t0
    ok = codes.get(200, 0)
    a = np.array(lat) * 1000
    return {
        "clients": clients,
        "requests": len(lat),
        "rps": ok / wall,
        "p50": float(np.percentile(a, 50)) if len(a) else float("nan"),
        "p99": float(np.percentile(a, 99)) if len(a) else float("nan"),
        "errors": len(lat) - ok,
        "codes": codes,
    }


def measure(url: str, images: list[bytes], seconds: float, name: str) -> list[dict]:
    asyncio.run(load(url, images, 8, 2.0))  # warm-up: models loaded, batches formed
    rows = []
    for c in LEVELS:
        r = asyncio.run(load(url, images, c, seconds))
        harness.log(
            f"{name} {c:>2} clients: {r['rps']:,.0f} req/s, p50 {r['p50']:.1f} ms, "
            f"p99 {r['p99']:.1f} ms, errors {r['errors']}"
        )
        rows.append(r)
    return rows


def serve_variant(run: str, images, seconds, batching: bool, cpus: int) -> list[dict]:
    from ray import serve

    from serve.app import make_app

    settings = {
        "models": [{"id": "m", "run": run}],
        "batching": {"enabled": batching, "max_batch_size": 32, "batch_wait_timeout_s": 0.005},
        "limits": {"max_inflight": 1024},
    }
    app = make_app(
        settings,
        model_options={
            "num_replicas": 1,
            "ray_actor_options": {"num_cpus": cpus},
            "max_ongoing_requests": 64,
        },
    )
    serve.run(app, name="raylens", route_prefix="/")
    rows = measure(f"http://127.0.0.1:{PORT}/v1/classify", images, seconds, "abc"[not batching])
    serve.delete("raylens")
    return rows


def forward_cost(run: str, images: list[bytes], cpus: int) -> dict[int, float]:
    """In-process ``ServedModel.infer`` (decode, eval transform, forward), ms per image at
    batch 1, 8 and 32: what batching can gain for this model on this machine."""
    import torch
    from raylens.serving.models import load_served_model
    from raylens.serving.settings import ModelEntry
    from raylens.storage import Storage

    torch.set_num_threads(cpus)
    model = load_served_model(ModelEntry(id="m", run=run), Storage())
    out = {}
    for b in (1, 8, 32):
        model.infer(images[:b])
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < 3:
            model.infer(images[n * b % 256 : n * b % 256 + b])
            n += 1
        out[b] = (time.perf_counter() - t0) / n / b * 1000
    harness.log(f"forward ms/image by batch size: {out}")
    return out


def floor_variant(images, seconds) -> list[dict]:
    """(d) Serve's own floor on this machine: a FastAPI ingress forwarding the body to a
    deployment that returns at once (no model, no checks), same proxy and handle path."""
    from fastapi import FastAPI, Request
    from ray import serve

    api = FastAPI()

    @serve.deployment(max_ongoing_requests=64)
    class Echo:
        async def infer(self, body: bytes) -> dict:
            return {"bytes": len(body)}

    @serve.deployment(max_ongoing_requests=512, ray_actor_options={"num_cpus": 0})
    @serve.ingress(api)
    class Front:
        def __init__(self, echo):
            self.echo = echo

        @api.post("/v1/classify")
        async def classify(self, request: Request) -> dict:
            return await self.echo.infer.remote(await request.body())

    serve.run(Front.bind(Echo.bind()), name="floor", route_prefix="/")
    rows = measure(f"http://127.0.0.1:{PORT}/v1/classify", images, seconds, "d")
    serve.delete("floor")
    return rows


def plain_variant(run: str, images, seconds) -> list[dict]:
    port = free_port()
    env = {**os.environ, "RAYLENS_RUN": run, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "benchmarks.plain_app:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        cwd=REPO,
        env=env,
    )
    try:
        import urllib.request

        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/docs", timeout=1)
                break
            except Exception:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("plain uvicorn app did not start") from None
                time.sleep(0.3)
        return measure(f"http://127.0.0.1:{port}/v1/classify", images, seconds, "c")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


PORT = 0


def convnext_run(path: Path, dataset: str) -> str:
    """A run dir for convnext_atto at 224 px with random-init weights (throughput only)."""
    import json

    import torch
    from raylens import config as C
    from raylens.checkpoint import save_checkpoint
    from raylens.models.classifier import build_model
    from raylens.schema import RunConfig
    from raylens.storage import Storage

    storage = Storage()
    if not (path / "best.json").exists():
        cfg = C.load(
            RunConfig,
            (REPO / "jobs/configs/fashion_mnist.yaml").read_text(),
            ["run.name=serve-convnext_atto-224", "model.backbone=convnext_atto"]
            + ["data.image_size=224", f"data.dataset={dataset}"],
        )
        card = json.loads(storage.read_text(f"{dataset}/dataset.json"))
        torch.manual_seed(0)
        model = build_model(cfg.model, len(card["classes"]))
        save_checkpoint(
            storage, str(path / "checkpoints/epoch=0"), model=model.state_dict(), extra={}
        )
        storage.write_text(str(path / "config.yaml"), C.to_yaml(cfg))
        labels = {"classes": card["classes"], "task": "single_label"}
        storage.write_text(str(path / "labels.json"), json.dumps(labels))
        best = {"epoch": 0, "checkpoint": "checkpoints/epoch=0", "metrics": {}}
        storage.write_text(str(path / "best.json"), json.dumps(best))
    return str(path)


def main(argv: list[str] | None = None) -> dict:
    global PORT
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--run", default=str(REPO / "runs/fashion-mnist-vgg"), help="the fm model")
    p.add_argument("--dataset", default=str(REPO / "data/fashion-mnist"))
    p.add_argument("--models", default="fm,convnext,floor")
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    runs = {}
    for name in args.models.split(","):
        if name == "fm":
            runs[name] = str(Path(args.run).resolve()) if "://" not in args.run else args.run
        elif name == "floor":
            runs[name] = "(no model)"
        elif name == "convnext":
            work = REPO / "benchmarks/_work/serve-convnext_atto-224"
            runs[name] = convnext_run(work, str(Path(args.dataset).resolve()))
        else:
            sys.exit(f"--models: unknown {name!r}; expected fm, convnext, floor")
    images = load_images(args.dataset, 512)
    cpus = os.cpu_count() or 2

    import ray
    from ray import serve

    results: dict[str, dict] = {}
    forward = {n: forward_cost(r, images, cpus) for n, r in runs.items() if n != "floor"}
    for name, run in runs.items():
        harness.log(f"model {name}: {run}")
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        PORT = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        if name == "floor":
            results[name] = {"d": floor_variant(images, args.seconds)}
            serve.shutdown()
            ray.shutdown()
            continue
        res = {
            "a": serve_variant(run, images, args.seconds, True, cpus),
            "b": serve_variant(run, images, args.seconds, False, cpus),
        }
        serve.shutdown()
        ray.shutdown()
        res["c"] = plain_variant(run, images, args.seconds)
        results[name] = res
    harness.emit(SECTION, render(args, cpus, results, forward), not args.no_write)
    return results


NAMES = {
    "a": "(a) Serve, `@serve.batch` (max 32, 5 ms)",
    "b": "(b) Serve, batching off",
    "c": "(c) plain FastAPI + uvicorn, 1 process",
    "d": "(d) Serve floor: ingress → deployment, no model",
}
ABOUT = {
    "fm": "`fm`: runs/fashion-mnist-vgg (vgg_s32, 0.29 M parameters, 28 px; ~1 ms per image)",
    "convnext": (
        "`convnext`: convnext_atto at 224 px (3.7 M parameters, random init; its "
        "forward cost is in the table above)"
    ),
}


def render(args, cpus: int, results: dict, forward: dict) -> list[str]:
    lines = [
        *harness.heading(SECTION, args.argv),
        "`POST /v1/classify` with raw PNG bytes of 512 Fashion-MNIST test images, closed-loop "
        f"clients (aiohttp) in the benchmark process, {args.seconds:g} s per level after a 2 s "
        f"warm-up. (a)/(b): one ModelServer replica with {cpus} CPUs; the HTTP proxy, the "
        "ingress and the clients share the machine. (c): the same model and preprocessing in "
        "one uvicorn process. Variants ran one after the other.",
        "",
    ]
    lines += [
        "In-process `ServedModel.infer` (decode, eval transform, forward; no HTTP), "
        f"{cpus} torch threads, ms per image:",
        "",
        "| model | batch 1 | batch 8 | batch 32 | batch-32 gain |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, f in forward.items():
        lines.append(f"| `{name}` | {f[1]:.2f} | {f[8]:.2f} | {f[32]:.2f} | {f[1] / f[32]:.2f}x |")
    lines.append("")
    for name, res in results.items():
        if name == "floor":
            continue
        lines += [
            f"Model {ABOUT[name]}:",
            "",
            "| variant | clients | req/s | p50 ms | p99 ms | errors |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for k in "abc":
            for r in res[k]:
                lines.append(
                    f"| {NAMES[k]} | {r['clients']} | {r['rps']:,.0f} | {r['p50']:.1f} | "
                    f"{r['p99']:.1f} | {r['errors']} |"
                )
        a, b, c = (res[k][-1] for k in "abc")
        ab, ac = a["rps"] / max(b["rps"], 1e-9), a["rps"] / max(c["rps"], 1e-9)
        errors = sum(r["errors"] for k in "abc" for r in res[k])
        lines += [
            "",
            f"| `{name}` at 32 clients | value | target | |",
            "|---|---:|---:|---|",
            f"| a / b throughput | {ab:.2f} | >= 2 | {'met' if ab >= 2 else 'NOT met'} |",
            f"| a / c throughput | {ac:.2f} | >= 1 | {'met' if ac >= 1 else 'NOT met'} |",
            f"| errors, all levels | {errors} | 0 | {'met' if errors == 0 else 'NOT met'} |",
            "",
        ]
    if "floor" in results:
        lines += [
            "Serve's floor on this machine, the same HTTP proxy → FastAPI ingress → deployment "
            "handle path with nothing else (no model, no input checks):",
            "",
            "| variant | clients | req/s | p50 ms | p99 ms | errors |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in results["floor"]["d"]:
            lines.append(
                f"| {NAMES['d']} | {r['clients']} | {r['rps']:,.0f} | {r['p50']:.1f} | "
                f"{r['p99']:.1f} | {r['errors']} |"
            )
        lines.append("")
    return lines


if __name__ == "__main__":
    main()
