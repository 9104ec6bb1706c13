"""HTTP load on the classification endpoint: raylens on Serve (one-hop and split) vs plain
uvicorn, beside Serve's own one-hop and two-hop floors, and 12 MP photo uploads.

    .venv/bin/python benchmarks/serve_load.py [--seconds 15] [--models fm,convnext,floor,upload]

Models:

- ``fm``: the run ``make demo`` trains (runs/fashion-mnist-vgg: vgg_s32, 0.29 M parameters,
  28 px), about 1 ms per image: Serve's per-request overhead dominates. Without that run
  (``--run`` missing), a random-init vgg_s32 run dir at 28 px with the demo's data settings
  (benchmarks/_work/serve-vgg_s32-28): the same compute per image, predictions meaningless.
- ``convnext``: a compute-bound model, convnext_atto at 224 px (3.7 M parameters), as a run
  dir with random-init weights (benchmarks/_work/serve-convnext_atto-224; throughput only).

Variants, serving the same run with the same preprocessing, at 1, 8 and 32 closed-loop
clients for a fixed duration each:

  (a) raylens one-hop (serve/app.py, ``topology: one_hop``): the model deployment is the
      FastAPI ingress; ``@serve.batch`` on (max batch 32, 5 ms wait)
  (s) raylens split (``topology: split``): Ingress → ModelServer through handles, batched
  (c) a plain single-process FastAPI + uvicorn app (benchmarks/plain_app.py), no Ray
  (f1) Serve one-hop floor: one FastAPI ingress deployment that returns a constant
  (f2) Serve two-hop floor: a FastAPI ingress forwarding the body to a deployment that
       answers at once (the floor of any ingress + model deployment app)

``upload``: 64 concurrent clients each post 12 MP JPEGs (4000 x 3000 photo mosaics, made
from scikit-learn's sample photos as benchmarks/decode_reduce.py makes them, ~2.4 MB) to
``/v1/classify`` of the ``fm`` model through (a), (s) and (c).

Clients (asyncio + aiohttp, in this process) post raw image bytes. Reported: requests/s,
p50/p99 latency, errors, and CPU-ms per request of this process and all its descendants
(clients, Ray's proxy and replicas, uvicorn). One model replica with every CPU for (a)/(s);
uvicorn has the same CPUs. Results go to benchmarks/RESULTS.md ("Serve load").
"""

import argparse
import asyncio
import contextlib
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
    """PNG bytes of ``n`` Fashion-MNIST test images: the prepared dataset's, else encoded
    from the Debian package's test split."""
    import pyarrow.parquet as pq

    files = sorted(glob.glob(f"{dataset}/test/**/*.parquet", recursive=True))
    if files:
        return pq.read_table(files[0], columns=["image"]).column("image").to_pylist()[:n]
    import gzip

    from raylens.data import fashion_mnist as fm
    from raylens.data.images import encode_png

    path = os.path.join(fm.DEBIAN_DIR, fm.FILES["test_images"] + ".gz")
    if not os.path.exists(path):
        sys.exit(f"no prepared test split under {dataset!r} and no {path}: run `make demo`")
    with open(path, "rb") as f:
        pixels = fm.parse_idx(gzip.decompress(f.read()))
    return [encode_png(p) for p in pixels[:n]]


async def load(
    url: str, images: list[bytes], clients: int, seconds: float, per_client: int = 0
) -> dict:
    """``clients`` closed loops for ``seconds`` (or ``per_client`` requests each)."""
    import aiohttp

    lat: list[float] = []
    codes: dict[int, int] = {}
    stop = time.perf_counter() + seconds

    async def client(i: int, session: aiohttp.ClientSession) -> None:
        k, sent = i, 0
        while (sent < per_client) if per_client else (time.perf_counter() < stop):
            sent += 1
            img = images[k % len(images)]
            k += clients
            t0 = time.perf_counter()
            try:
                kind = "image/jpeg" if img[:2] == b"\xff\xd8" else "image/png"
                async with session.post(url, data=img, headers={"content-type": kind}) as r:
                    await r.read()
                    code = r.status
            except Exception:
                code = -1
            lat.append(time.perf_counter() - t0)
            codes[code] = codes.get(code, 0) + 1

    conn = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        tree = harness.TreeCpu()
        t0 = time.perf_counter()
        await asyncio.gather(*(client(i, session) for i in range(clients)))
        wall = time.perf_counter() - t0
        cpu = tree.stop()
    ok = codes.get(200, 0)
    a = np.array(lat) * 1000
    return {
        "cpu_ms": cpu / max(len(lat), 1) * 1000,
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
            f"p99 {r['p99']:.1f} ms, errors {r['errors']}, {r['cpu_ms']:.1f} CPU-ms/req"
        )
        rows.append(r)
    return rows


def uploads(url: str, photos: list[bytes], name: str) -> dict:
    """UPLOAD_CLIENTS concurrent clients, UPLOAD_EACH 12 MP photos each."""
    r = asyncio.run(load(url, photos, UPLOAD_CLIENTS, 0, per_client=UPLOAD_EACH))
    harness.log(
        f"upload {name} 12 MP x {UPLOAD_CLIENTS} clients: {r['rps']:,.1f} req/s, p50 {r['p50']:.0f} ms,"
        f" p99 {r['p99']:.0f} ms, errors {r['errors']}, {r['cpu_ms']:.0f} CPU-ms/req"
    )
    return r


def deploy_raylens(run: str, topology: str, cpus: int, prefix: str, gpus: float = 0) -> str:
    """The raylens app serving ``run`` in ``topology`` at ``prefix`` (its model replica
    with ``cpus`` CPUs and ``gpus`` GPUs); its classify URL."""
    from ray import serve

    from serve.app import make_app

    settings = {
        "models": [{"id": "m", "run": run}],
        "topology": topology,
        "batching": {"enabled": True, "max_batch_size": 32, "batch_wait_timeout_s": 0.005},
        "limits": {"max_inflight": 1024},
    }
    app = make_app(
        settings,
        model_options={
            "num_replicas": 1,
            "ray_actor_options": {"num_cpus": cpus, "num_gpus": gpus},
            "max_ongoing_requests": 64,
        },
    )
    serve.run(app, name=prefix, route_prefix=f"/{prefix}")
    return f"http://127.0.0.1:{PORT}/{prefix}/v1/classify"


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


def deploy_floors() -> dict[str, str]:
    """Serve's own floors on this machine, no model and no checks: (f1) the HTTP proxy and
    one FastAPI ingress deployment answering a constant; (f2) the proxy, an ingress and a
    deployment the ingress forwards the body to through a handle. Their classify URLs."""
    from fastapi import FastAPI, Request
    from ray import serve

    one, two = FastAPI(), FastAPI()

    @serve.deployment(max_ongoing_requests=64)
    @serve.ingress(one)
    class OneHop:
        @one.post("/v1/classify")
        async def classify(self, request: Request) -> dict:
            return {"bytes": len(await request.body())}

    @serve.deployment(max_ongoing_requests=64)
    class Echo:
        async def infer(self, body: bytes) -> dict:
            return {"bytes": len(body)}

    @serve.deployment(max_ongoing_requests=512, ray_actor_options={"num_cpus": 0})
    @serve.ingress(two)
    class Front:
        def __init__(self, echo):
            self.echo = echo

        @two.post("/v1/classify")
        async def classify(self, request: Request) -> dict:
            return await self.echo.infer.remote(await request.body())

    serve.run(OneHop.bind(), name="f1", route_prefix="/f1")
    serve.run(Front.bind(Echo.bind()), name="f2", route_prefix="/f2")
    return {k: f"http://127.0.0.1:{PORT}/{k}/v1/classify" for k in ("f1", "f2")}


@contextlib.contextmanager
def plain_app(run: str):
    """(c): the plain uvicorn app serving ``run``, running; its classify URL."""
    port = free_port()
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "RAYLENS_RUN": run, "PYTHONPATH": path}  # keep the caller's entries
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
        yield f"http://127.0.0.1:{port}/v1/classify"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def rounds(urls: dict[str, str], n: int, window) -> dict[str, list[dict]]:
    """``window(url, key)`` for every variant, ``n`` rounds, the order alternating each
    round (harness.alternate): each variant's windows."""
    got: dict[str, list[dict]] = {k: [] for k in urls}
    for rnd in range(n):
        for key in harness.alternate(list(urls), rnd):
            got[key].append(window(urls[key], key))
    return got


def combine(windows: list[dict]) -> dict:
    """One row from a variant's rounds: medians of req/s, p50, p99 and CPU-ms per request;
    errors summed."""
    med = {k: harness.median(w[k] for w in windows) for k in ("rps", "p50", "p99", "cpu_ms")}
    errors = sum(w["errors"] for w in windows)
    return {**med, "clients": windows[0]["clients"], "errors": errors, "rounds": windows}


PORT = 0
UPLOAD_CLIENTS, UPLOAD_EACH = 64, 2


def random_run(path: Path, backbone: str, size: int) -> str:
    """A run dir for ``backbone`` at ``size`` px with random-init weights and the demo's
    data settings (Fashion-MNIST classes): throughput only, its predictions mean nothing."""
    import json

    import torch
    from raylens import config as C
    from raylens.checkpoint import save_checkpoint
    from raylens.data import fashion_mnist as fm
    from raylens.models.classifier import build_model
    from raylens.schema import RunConfig
    from raylens.storage import Storage

    storage = Storage()
    if not (path / "best.json").exists():
        cfg = C.load(
            RunConfig,
            (REPO / "jobs/configs/fashion_mnist.yaml").read_text(),
            [f"run.name={path.name}", f"model.backbone={backbone}", f"data.image_size={size}"],
        )
        classes = [c.replace("/", "-") for c in fm.CLASSES]
        torch.manual_seed(0)
        model = build_model(cfg.model, len(classes))
        save_checkpoint(
            storage, str(path / "checkpoints/epoch=0"), model=model.state_dict(), extra={}
        )
        storage.write_text(str(path / "config.yaml"), C.to_yaml(cfg))
        labels = {"classes": classes, "task": "single_label"}
        storage.write_text(str(path / "labels.json"), json.dumps(labels))
        best = {"epoch": 0, "checkpoint": "checkpoints/epoch=0", "metrics": {}}
        storage.write_text(str(path / "best.json"), json.dumps(best))
    return str(path)


def main(argv: list[str] | None = None) -> dict:
    global PORT
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--run", default=str(REPO / "runs/fashion-mnist-vgg"), help="the fm model")
    p.add_argument("--dataset", default=str(REPO / "data/fashion-mnist"))
    p.add_argument("--models", default="fm,convnext,floor,upload")
    p.add_argument("--seconds", type=float, default=15.0, help="per window")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per level")
    p.add_argument("--upload-rounds", type=int, default=2)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    work = REPO / "benchmarks/_work"
    fm_run = args.run if "://" in args.run else str(Path(args.run).resolve())
    args.fm_random = "://" not in fm_run and not Path(fm_run, "best.json").exists()
    if args.fm_random:
        fm_run = random_run(work / "serve-vgg_s32-28", "vgg_s32", 28)
    runs = {}
    for name in args.models.split(","):
        if name in ("fm", "upload"):
            runs[name] = fm_run
        elif name == "floor":
            runs[name] = "(no model)"
        elif name == "convnext":
            runs[name] = random_run(work / "serve-convnext_atto-224", "convnext_atto", 224)
        else:
            sys.exit(f"--models: unknown {name!r}; expected fm, convnext, floor, upload")
    images = load_images(args.dataset, 512)
    photos = []
    if "upload" in runs:
        from decode_reduce import photos_12mp  # benchmarks/decode_reduce.py

        photos = photos_12mp(8)
        args.photo_mb = sum(map(len, photos)) / len(photos) / 1e6
    cpus = os.cpu_count() or 2

    import ray
    from ray import serve

    results: dict[str, dict] = {}
    forward = {n: forward_cost(r, images, cpus) for n, r in runs.items() if n in ABOUT}
    # Every variant deployed at once (logical CPUs: each replica still sees `cpus` threads),
    # then measured in interleaved rounds, so load from elsewhere hits them alike.
    ray.init(address="local", num_cpus=cpus * 8, include_dashboard=False, log_to_driver=False)
    PORT = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    floors = deploy_floors() if "floor" in runs else {}
    for name, run in runs.items():
        if name == "floor":
            continue
        harness.log(f"{name}: {run}")
        urls = {
            "a": deploy_raylens(run, "one_hop", cpus, f"{name}-a"),
            "s": deploy_raylens(run, "split", cpus, f"{name}-s"),
        }
        with plain_app(run) as plain:
            urls["c"] = plain
            if name == "upload":
                for url in urls.values():  # warm-up: models loaded, batches formed
                    asyncio.run(load(url, photos, 2, 0, per_client=1))
                got = rounds(urls, args.upload_rounds, lambda u, k: uploads(u, photos, k))
                results[name] = {k: [combine(w)] for k, w in got.items()}
            else:
                both = {**urls, **(floors if "floor" not in results else {})}
                for url in both.values():
                    asyncio.run(load(url, images, 8, 2.0))  # warm-up
                res: dict[str, list[dict]] = {k: [] for k in both}
                for c in LEVELS:

                    def window(url: str, key: str, c: int = c, name: str = name) -> dict:
                        r = asyncio.run(load(url, images, c, args.seconds))
                        harness.log(
                            f"{name} {key} {c:>2} clients: {r['rps']:,.0f} req/s, p50 "
                            f"{r['p50']:.1f} ms, p99 {r['p99']:.1f} ms, errors {r['errors']}, "
                            f"{r['cpu_ms']:.1f} CPU-ms/req"
                        )
                        return r

                    for k, w in rounds(both, args.rounds, window).items():
                        res[k].append(combine(w))
                results[name] = {k: v for k, v in res.items() if k in "asc"}
                if floors and "floor" not in results:
                    results["floor"] = {k: res[k] for k in floors}
        for key in ("a", "s"):
            serve.delete(f"{name}-{key}")
    serve.shutdown()
    ray.shutdown()
    harness.emit(SECTION, render(args, cpus, results, forward), not args.no_write)
    return results


NAMES = {
    "a": "(a) raylens one-hop, `@serve.batch`",
    "s": "(s) raylens split (ingress → model), `@serve.batch`",
    "c": "(c) plain FastAPI + uvicorn, 1 process",
    "f1": "(f1) Serve one-hop floor: ingress returns a constant",
    "f2": "(f2) Serve two-hop floor: ingress → deployment, no model",
}
ABOUT = {
    "fm": "`fm`: vgg_s32, 0.29 M parameters, 28 px; ~1 ms per image",
    "convnext": (
        "`convnext`: convnext_atto at 224 px (3.7 M parameters, random init; its "
        "forward cost is in the table above)"
    ),
}
TODAY_UPLOAD_P50_MS = 7700.0  # issue 23: 64 concurrent 12 MP uploads, p50 before one-hop


def _rows(res: dict, keys) -> list[str]:
    out = [
        "| variant | clients | req/s | p50 ms | p99 ms | errors | CPU-ms / request |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for k in keys:
        for r in res[k]:
            out.append(
                f"| {NAMES[k]} | {r['clients']} | {r['rps']:,.1f} | {r['p50']:.1f} | "
                f"{r['p99']:.1f} | {r['errors']} | {r['cpu_ms']:.1f} |"
            )
    return out


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def render(args, cpus: int, results: dict, forward: dict) -> list[str]:
    model = (
        "a random-init vgg_s32 run at 28 px with the demo's data settings (no trained demo "
        "run here; the same compute per image)"
        if args.fm_random
        else f"`{args.run}`"
    )
    lines = [
        *harness.heading(SECTION, args.argv),
        "`POST /v1/classify` with raw PNG bytes of 512 Fashion-MNIST test images, closed-loop "
        f"clients (aiohttp) in the benchmark process, {args.seconds:g} s windows after a 2 s "
        f"warm-up; every variant deployed at once and measured in {args.rounds} interleaved "
        "rounds per level (order alternating), medians of the rounds. (a)/(s): one "
        f"ModelServer replica with {cpus} torch threads; the HTTP proxy, the split "
        "topology's ingress and the clients share the machine. (c): the same model and "
        "preprocessing in one uvicorn process. CPU-ms per request: this process and all its "
        "descendants (clients, Ray, replicas, uvicorn). "
        f"`fm`: {model}.",
        "",
    ]
    if forward:
        lines += [
            "In-process `ServedModel.infer` (decode, eval transform, forward; no HTTP), "
            f"{cpus} torch threads, ms per image:",
            "",
            "| model | batch 1 | batch 8 | batch 32 | batch-32 gain |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, f in forward.items():
            lines.append(
                f"| `{name}` | {f[1]:.2f} | {f[8]:.2f} | {f[32]:.2f} | {f[1] / f[32]:.2f}x |"
            )
        lines.append("")
    if "floor" in results:
        lines += [
            "Serve's floors on this machine (no model, no input checks):",
            "",
            *_rows(results["floor"], ("f1", "f2")),
            "",
        ]
    for name, res in results.items():
        if name not in ABOUT:
            continue
        lines += [f"Model {ABOUT[name]}:", "", *_rows(res, "asc"), ""]
        a1, a32, c32 = res["a"][0], res["a"][-1], res["c"][-1]
        errors = sum(r["errors"] for k in "asc" for r in res[k])
        lines += [
            f"| `{name}` | value | target | |",
            "|---|---:|---:|---|",
        ]
        if "floor" in results:
            f1 = results["floor"]["f1"][0]
            r = a1["p50"] / f1["p50"]
            lines.append(
                f"| p50 at 1 client, (a) / (f1) | {a1['p50']:.1f} / {f1['p50']:.1f} ms = "
                f"{r:.2f}x | <= 1.5x | {_verdict(r <= 1.5)} |"
            )
        r = a32["rps"] / max(c32["rps"], 1e-9)
        lines += [
            f"| req/s at 32 clients, (a) / (c) | {r:.2f} | >= 0.7 | {_verdict(r >= 0.7)} |",
            f"| errors, all levels | {errors} | 0 | {_verdict(errors == 0)} |",
            "",
        ]
    if "upload" in results:
        res = results["upload"]
        lines += [
            f"12 MP uploads: {UPLOAD_CLIENTS} concurrent clients, {UPLOAD_EACH} photos each, "
            f"{args.upload_rounds} interleaved rounds (medians) "
            f"(4000 x 3000 JPEG mosaics of scikit-learn's sample photos, quality 90, "
            f"{args.photo_mb:.2f} MB on average) to `/v1/classify` of `fm`:",
            "",
            *_rows(res, "asc"),
            "",
        ]
        p50 = res["a"][0]["p50"]
        errors = sum(r["errors"] for k in "asc" for r in res[k])
        lines += [
            "| 12 MP uploads | value | target | |",
            "|---|---:|---:|---|",
            f"| p50, (a) | {p50:,.0f} ms = {p50 / TODAY_UPLOAD_P50_MS:.2f} of 7.7 s | <= 1/4 "
            f"| {_verdict(p50 <= TODAY_UPLOAD_P50_MS / 4)} |",
            f"| errors | {errors} | 0 | {_verdict(errors == 0)} |",
            "",
        ]
    return lines


if __name__ == "__main__":
    main()
