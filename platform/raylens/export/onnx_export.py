"""A run's model as ONNX for edge runtimes, verified against PyTorch on real images.

    plan = plan_export(ExportConfig(run="runs/fashion-mnist-vgg"), storage)  # cheap checks
    report = export_run(plan, storage)   # raises VerificationFailed when parity fails

Output dir (``export.output``, default ``<run>/export``; local, ``s3://`` or ``gs://``)::

    model.onnx       # input "pixels": float32 [batch, 3, s, s] (NCHW, RGB, normalized);
                     # outputs "logits" [batch, C] and "probs" [batch, C] (softmax for a
                     # single-label run, sigmoid for a multi-label one: label if >= threshold)
    preprocess.json  # image bytes -> "pixels", classes, outputs, source checkpoint + sha256
    export.json      # written last, only when verification passed: numbers, image ids, command

Verification uses ``export.images`` real images of the run's dataset (its test split, topped up
from val). PyTorch's input is the run's own eval transform, and its outputs are the served
model's (:class:`~raylens.predict.Predictor`, fp32). ONNX Runtime (CPUExecutionProvider)
runs the exported file on the same input twice, as one batch of all images and one image
at a time, neither of them the export's example batch (2): the batch axis is dynamic. The
images are also preprocessed by :mod:`raylens.export.preprocess` from preprocess.json alone
(NumPy + Pillow, no torch), which must reproduce PyTorch's input tensor, and ONNX Runtime on
that input must match PyTorch's outputs too: preprocess.json is proven sufficient.

Tolerances, elementwise as ``numpy.allclose``: ``|onnx - torch| <= atol + rtol * |torch|``
on logits and probs, default ``atol = rtol = 1e-4``. Both run fp32 on the CPU; ONNX Runtime
fuses Conv + BatchNorm and orders sums differently, which moves outputs by float32 rounding
only. Measured here (32 images each): logits differ by at most 1.2e-6 for the trained
vgg_s32 of ``runs/fashion-mnist-seen5-vgg32``, 2.9e-6 for the trained multi-label vgg_s32
(mosaics, 56 px), 1.3e-6 for a random tiny_vit_5m_224 at 224 px, 1.5e-6 for timm
test_vit / test_convnext, resnet10t and tiny Hugging Face DINOv3 / CLIP towers: the default
is 30x above the worst. Real errors are far above it: on that trained vgg_s32, one uint8
level on one pixel of the input moves logits by 1.3e-2, train-mode BatchNorm by 1.3.
The preprocessing check allows ``1e-5`` on the normalized input (float32 rounding of the
two formulas, 2.4e-7 to 4.8e-7 seen; one uint8 level is ~1e-2).

Opset: default 18, the lowest the torch.export-based exporter (``dynamo=True``, needs
onnxscript) emits, and run by every current edge runtime. A lower ``export.opset`` (or a model
torch.export cannot trace) goes through the deprecated TorchScript exporter; export.json
records which one wrote the file. Pure: no Ray.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import platform
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

import raylens
from raylens.checkpoint import MODEL
from raylens.config import ConfigError
from raylens.export import preprocess as P
from raylens.predict import ModelSource, Predictor, resolve_model
from raylens.rundir import BEST, CLASSIFY, METRIC, MULTILABEL, RunDir
from raylens.schema import ExportConfig, RunConfig, SourceConfig
from raylens.storage import Storage, join, split_uri

INPUT = "pixels"
OUTPUTS = ("logits", "probs")
MODEL_FILE, PREPROCESS_FILE, REPORT_FILE = "model.onnx", "preprocess.json", "export.json"
FILES = (MODEL_FILE, PREPROCESS_FILE, REPORT_FILE)
FAILED_DIR = "failed"
STAGING_PREFIX = "_staging-"
EXPORT_BATCH = 2  # the example batch traced; verification uses other sizes
DYNAMO_MIN_OPSET = 18
PREPROCESS_ATOL = 1e-5
FORMAT = "raylens.onnx-export/1"


class ExportError(RuntimeError):
    """torch.onnx could not write the model (both exporters failed, or the wrong opset)."""


class VerificationFailed(RuntimeError):
    """ONNX Runtime or the preprocess.json reference disagrees with PyTorch beyond the
    tolerance; ``report`` is what was written to ``<output>/failed/export.json``."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report


@dataclass
class ExportPlan:
    """What :func:`plan_export` checked: the model, its run and the verification images."""

    options: ExportConfig
    run: str  # the run dir URI (local paths absolute)
    source: ModelSource
    run_cfg: RunConfig
    output: str
    dataset: str
    images: list[tuple[str, str, bytes]] = field(default_factory=list)  # (id, split, bytes)
    command: str = ""  # the command line, recorded (scrubbed) in export.json

    @property
    def task(self) -> str:
        """The run kind exported (:data:`raylens.rundir.CLASSIFY` or ``MULTILABEL``)."""
        return MULTILABEL if self.source.multi_label else CLASSIFY

    @property
    def threshold(self) -> float | None:
        return float(self.run_cfg.task.threshold) if self.source.multi_label else None


# ----------------------------------------------------------------------------- planning


def check_options(options: ExportConfig) -> None:
    """What :meth:`ExportConfig.validate` cannot know: ``export.run`` is set (only this job
    needs it), the opset is one the installed onnx has, the device is here.

    Raises:
        ConfigError: naming the key and what it expects.
    """
    import onnx

    if not options.run:
        raise ConfigError("config key 'export.run' is required: a run dir written by jobs.finetune")
    top = onnx.defs.onnx_opset_version()
    if not 7 <= options.opset <= top:
        raise ConfigError(
            f"config key 'export.opset': expected 7..{top} (the installed onnx's range), "
            f"got {options.opset}"
        )
    try:
        device = torch.device(options.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(
            f"config key 'export.device': expected cpu or cuda[:N], got {options.device!r}"
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"export.device={options.device}: no CUDA device here; use cpu")


def plan_export(
    options: ExportConfig, storage: Storage | None = None, *, command: str = ""
) -> ExportPlan:
    """Checks the options, the run dir, its checkpoint, its model and its dataset, and reads
    the verification images; loads no weights. ``command`` is recorded in export.json.

    Raises:
        ConfigError: a bad option. FileNotFoundError: no run / checkpoint / dataset there.
        ValueError: a run that cannot be exported (metric learning, unknown backbone).
    """
    storage = storage or Storage()
    options.validate()
    check_options(options)
    what = f"export.run {options.run!r}"
    rd = RunDir(options.run, storage, what=what)
    run = rd.uri
    kind = rd.labels()["kind"]  # FileNotFoundError: "not a run dir (no labels ...)"
    if kind not in (CLASSIFY, MULTILABEL):
        name = "a metric-learning run (fused frozen backbones)" if kind == METRIC else kind
        raise ValueError(f"{what} is {name}: jobs.export exports {CLASSIFY} and {MULTILABEL} runs")
    if options.checkpoint is None and not rd.has_best():
        raise FileNotFoundError(
            f"{what}: no {BEST} (is the run still training?); set export.checkpoint, one of "
            f"{rd.checkpoints() or 'none found'}"
        )
    try:
        rd.checkpoint(options.checkpoint)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{err}; export.checkpoint takes a checkpoint dir relative to the run dir, one of "
            f"{rd.checkpoints() or 'none found'}"
        ) from None
    source = resolve_model(run, storage, checkpoint=options.checkpoint)
    run_cfg = rd.config()
    output = options.output or join(run, "export")
    output = output.rstrip("/") if "://" in output else split_uri(output)[1]
    if output == run:
        raise ConfigError(
            f"config key 'export.output': {options.output!r} is the run dir; give a dir of its own"
        )
    plan = ExportPlan(options, run, source, run_cfg, output, run_cfg.data.dataset, command=command)
    plan.images = sample_images(storage, run_cfg, options.images, what)
    return plan


def sample_images(
    storage: Storage, cfg: RunConfig, n: int, what: str = "run"
) -> list[tuple[str, str, bytes]]:
    """The first ``n`` images of the run's dataset, test split first then val:
    ``[(id, split, encoded bytes)]``. A prepared dataset is read shard by shard (only the
    rows needed); a raw folder / manifest is split as ``jobs.prepare`` would split it.

    Raises:
        FileNotFoundError: the run's ``data.dataset`` is missing. ValueError: no test/val rows.
    """
    from raylens.data.prepare import load_card

    dataset = cfg.data.dataset
    if not dataset:
        raise ValueError(f"{what}: its config has no data.dataset to take verification images from")
    out: list[tuple[str, str, bytes]] = []
    card = load_card(storage, dataset)  # a damaged card is named
    if card is not None:
        import pyarrow.parquet as pq

        for split in ("test", "val"):
            for f in card["splits"][split]["files"]:
                fs, path = storage.resolve(join(dataset, f))
                with fs.open_input_file(path) as fh:
                    for batch in pq.ParquetFile(fh).iter_batches(
                        batch_size=max(n, 1), columns=["id", "image"]
                    ):
                        for rid, data in zip(
                            batch.column("id").to_pylist(),
                            batch.column("image").to_pylist(),
                            strict=True,
                        ):
                            out.append((rid, split, data))
                        if len(out) >= n:
                            return out[:n]
    else:
        out = _sample_raw(storage, cfg, n, what)
    if not out:
        raise ValueError(
            f"{what}: its dataset {dataset!r} has no test or val images to verify the export on"
        )
    return out


def _sample_raw(storage: Storage, cfg: RunConfig, n: int, what: str) -> list:
    from raylens.data.prepare import splits_for
    from raylens.data.sources import open_source

    src_cfg = SourceConfig(**{**cfg.source.__dict__, "uri": cfg.data.dataset})
    try:
        source = open_source(src_cfg, storage)
        records = sorted(source.records(), key=lambda r: r.id)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{what}: its dataset {cfg.data.dataset!r} is not there ({err}); verification "
            "needs real images from the run's dataset"
        ) from None
    splits = splits_for(records, cfg.prepare, cfg.run.seed)
    out = []
    for split in ("test", "val"):
        for r in records:
            if splits[r.id] == split and len(out) < n:
                data = r.data if r.data is not None else storage.read_bytes(r.uri)
                out.append((r.id, split, data))
    return out


# ----------------------------------------------------------------------------- export


class Exported(nn.Module):
    """``pixels -> (logits, probs)``: the run's classifier with its output activation."""

    def __init__(self, net: nn.Module, multi_label: bool):
        super().__init__()
        self.net = net
        self.multi_label = multi_label

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(pixels)
        probs = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=1)
        return logits, probs


def export_onnx(module: nn.Module, example: torch.Tensor, path: str, opset: int) -> dict:
    """Writes ``module`` (eval, CPU) as one ONNX file with a dynamic batch axis.

    The torch.export-based exporter first (opset >= 18), else the TorchScript one.

    Returns:
        ``{"exporter", "opset", "fallback_reason"}``.
    Raises:
        ExportError: every exporter failed, or the file's opset is not ``opset``.
    """
    errors: list[str] = []
    names = {"input_names": [INPUT], "output_names": list(OUTPUTS), "opset_version": opset}
    attempts = []
    if opset >= DYNAMO_MIN_OPSET:
        batch = torch.export.Dim("batch", min=1)
        attempts.append(
            ("torch.onnx dynamo", {"dynamo": True, "dynamic_shapes": {INPUT: {0: batch}}})
        )
    else:
        errors.append(f"the torch.export-based exporter emits opset >= {DYNAMO_MIN_OPSET}")
    dynamic_axes = {name: {0: "batch"} for name in (INPUT, *OUTPUTS)}
    attempts.append(("torch.onnx torchscript", {"dynamo": False, "dynamic_axes": dynamic_axes}))
    for exporter, kw in attempts:
        log = io.StringIO()
        try:
            with (
                contextlib.redirect_stdout(log),
                contextlib.redirect_stderr(log),
                warnings.catch_warnings(),
            ):
                warnings.simplefilter("ignore")
                torch.onnx.export(module, (example,), path, external_data=False, **names, **kw)
        except Exception as err:  # exporters raise many types; the next one may work
            errors.append(f"{exporter}: {type(err).__name__}: {str(err).strip()[:500]}")
            continue
        import onnx

        got = {o.domain: o.version for o in onnx.load(path, load_external_data=False).opset_import}
        actual = got.get("", got.get("ai.onnx"))
        if actual != opset:
            errors.append(f"{exporter}: wrote opset {actual}, not the requested {opset}")
            continue
        return {"exporter": exporter, "opset": actual, "fallback_reason": "; ".join(errors) or None}
    raise ExportError("torch.onnx could not export the model: " + " | ".join(errors))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import PIL

    out = {
        "python": platform.python_version(),
        "raylens": raylens.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
    }
    with contextlib.suppress(ImportError):
        import onnxscript

        out["onnxscript"] = onnxscript.__version__
    return out


def preprocess_spec(plan: ExportPlan, checkpoint_sha: str, model: dict) -> dict[str, Any]:
    """preprocess.json: the eval transform as numbers, the outputs, the classes, the source."""
    d, s = plan.source.data, plan.source
    spec = P.build_spec(
        image_size=d.image_size,
        crop_pct=d.eval_crop_pct,
        mean=d.mean,
        std=d.std,
        interpolation=d.interpolation,
        input_name=INPUT,
        reduce_gap=d.decode_reduce_gap if d.decode_reduce else None,
    )
    activation = "sigmoid" if s.multi_label else "softmax"
    spec["task"] = plan.task
    spec["classes"] = list(s.classes)
    spec["outputs"] = {
        "logits": {
            "shape": ["batch", len(s.classes)],
            "meaning": "raw class scores, in the order of 'classes'",
        },
        "probs": {
            "shape": ["batch", len(s.classes)],
            "activation": activation,
            "meaning": (
                f"per-class probability (sigmoid of logits); a label is predicted when "
                f"probs >= threshold ({plan.threshold})"
                if s.multi_label
                else "class probabilities (softmax over logits); prediction = argmax"
            ),
        },
    }
    if s.multi_label:
        spec["threshold"] = plan.threshold
    spec["source"] = {
        "run": plan.run,
        "checkpoint": s.checkpoint,
        "checkpoint_file": MODEL,
        "checkpoint_sha256": checkpoint_sha,
        "backbone": s.model.backbone,
        "head": s.model.head,
    }
    spec["model"] = {"file": MODEL_FILE, **model}
    spec["versions"] = _versions()
    return spec


# ----------------------------------------------------------------------------- verification


def compare(got: np.ndarray, ref: np.ndarray, atol: float, rtol: float) -> dict[str, Any]:
    """``got`` vs ``ref`` as numpy.allclose judges them, with the largest differences.

    ``max_rel_diff`` is over elements with ``|ref| > atol`` (smaller ones are atol's)."""
    got64, ref64 = got.astype(np.float64), ref.astype(np.float64)
    diff = np.abs(got64 - ref64)
    mag = np.abs(ref64)
    big = mag > atol
    ok = bool(np.all(diff <= atol + rtol * mag)) and got.shape == ref.shape
    return {
        "max_abs_diff": float(diff.max(initial=0.0)),
        "max_rel_diff": float((diff[big] / mag[big]).max(initial=0.0)),
        "within_tolerance": ok,
    }


def _merge(*results: dict[str, Any]) -> dict[str, Any]:
    return {
        "max_abs_diff": max(r["max_abs_diff"] for r in results),
        "max_rel_diff": max(r["max_rel_diff"] for r in results),
        "within_tolerance": all(r["within_tolerance"] for r in results),
    }


def verify(
    plan: ExportPlan,
    pred: Predictor,
    model_bytes: bytes,
    spec: dict[str, Any],
) -> dict[str, Any]:
    """Runs PyTorch, ONNX Runtime and the preprocess.json reference on the plan's images.

    Returns:
        the ``images`` and ``checks`` sections of export.json, and ``passed``.
    Raises:
        ExportError: onnxruntime cannot load the model. ValueError: no image decodes.
    """
    import onnxruntime as ort

    o = plan.options
    atol, rtol = o.atol, o.rtol
    encoded = [b for _, _, b in plan.images]
    pixels, kept, failures = pred.preprocess(encoded)
    if not len(kept):
        raise ValueError(
            f"none of the {len(encoded)} images taken from {plan.dataset!r} decodes: {failures[:3]}"
        )
    used = [plan.images[i] for i in kept]
    x = pred.normalize(torch.from_numpy(pixels))
    feats, logits_t = pred.embed_and_logits(x)
    ref = {"logits": logits_t.numpy(), "probs": pred.probs(logits_t).numpy()}
    x_np = x.cpu().numpy()

    try:
        sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own types (Fail, InvalidGraph, ...)
        raise ExportError(
            f"onnxruntime {ort.__version__} cannot load the exported model (opset "
            f"{spec['model']['opset']}): {type(err).__name__}: {str(err)[:500]}; try export.opset=18"
        ) from None

    def run(batch: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(OUTPUTS, sess.run(list(OUTPUTS), {INPUT: batch}), strict=True))

    full = run(x_np)  # one batch of every image
    single = [run(x_np[i : i + 1]) for i in range(len(x_np))]  # batch size 1
    ones = {k: np.concatenate([s[k] for s in single]) for k in OUTPUTS}
    checks: dict[str, Any] = {
        "batch_sizes": sorted({len(x_np), 1}, reverse=True),
        "export_batch": EXPORT_BATCH,
    }
    for k in OUTPUTS:
        checks[k] = _merge(
            compare(full[k], ref[k], atol, rtol), compare(ones[k], ref[k], atol, rtol)
        )
    top_t = ref["logits"].argmax(1)
    checks["top1_agreement"] = float(
        min((full["logits"].argmax(1) == top_t).mean(), (ones["logits"].argmax(1) == top_t).mean())
    )
    if plan.threshold is not None:
        thr = plan.threshold
        checks["label_agreement"] = float(((full["probs"] >= thr) == (ref["probs"] >= thr)).mean())

    # preprocess.json alone (NumPy + Pillow) on the same bytes, then ONNX Runtime on it
    pix_np, x_edge = P.preprocess([b for _, _, b in used], spec)
    pdiff = float(np.abs(x_edge.astype(np.float64) - x_np).max(initial=0.0))
    checks["preprocess"] = {
        "max_abs_diff": pdiff,
        "uint8_mismatches": int((pix_np != pixels).sum()),
        "atol": PREPROCESS_ATOL,
        "within_tolerance": pdiff <= PREPROCESS_ATOL,
    }
    edge = run(x_edge)
    checks["edge_pipeline"] = {
        k: compare(edge[k], ref[k], atol, rtol) for k in OUTPUTS
    }  # preprocess.json + model.onnx end to end vs the served PyTorch model
    failed = [k for k in OUTPUTS if not checks[k]["within_tolerance"]]
    if not checks["preprocess"]["within_tolerance"]:
        failed.append("preprocess")
    failed += [
        f"edge_pipeline.{k}" for k in OUTPUTS if not checks["edge_pipeline"][k]["within_tolerance"]
    ]
    return {
        "passed": not failed,
        "failed_checks": failed,
        "images": {
            "dataset": plan.dataset,
            "requested": o.images,
            "used": len(used),
            "splits": {s: sum(1 for _, sp, _ in used if sp == s) for s in ("test", "val")},
            "ids": [rid for rid, _, _ in used],
            "dropped": [{"id": plan.images[i][0], "reason": why} for i, why in failures],
            "image_size": pred.data.image_size,
        },
        "checks": checks,
        "embedding_dim": int(feats.shape[1]),
    }


# ----------------------------------------------------------------------------- writing


def _move(storage: Storage, src: str, dst: str) -> None:
    """A rename on local disk, a server-side copy + delete on object stores."""
    fs, src_path = storage.resolve(src)
    _, dst_path = storage.resolve(dst)
    fs.move(src_path, dst_path)


def commit(storage: Storage, output: str, files: dict[str, bytes], report: dict) -> None:
    """Stages ``files`` beside ``output``'s, moves them into place and writes export.json
    last: a reader that finds export.json finds the files it describes (re-runs replace)."""
    storage.delete_dirs_named(output, STAGING_PREFIX)
    staging = join(output, f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}")
    for name, data in files.items():
        storage.write_bytes(join(staging, name), data)
    storage.delete(join(output, REPORT_FILE))  # from here until the end: not committed
    for name in files:
        _move(storage, join(staging, name), join(output, name))
    storage.delete_tree(staging)
    storage.delete_tree(join(output, FAILED_DIR))
    storage.write_text(join(output, REPORT_FILE), json.dumps(report, indent=1))


def export_run(plan: ExportPlan, storage: Storage | None = None) -> dict[str, Any]:
    """Exports, verifies and writes the plan's model; returns export.json's content.

    Raises:
        ExportError: torch.onnx failed. VerificationFailed: parity failed (the files and
        the report went to ``<output>/failed``; a committed earlier export is left as is).
    """
    storage = storage or Storage()
    o, source = plan.options, plan.source
    t0 = time.perf_counter()
    device = torch.device(o.device)
    if device.type == "cuda":  # fp32 means fp32: no TF32 convolutions or matmuls
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    checkpoint_sha = sha256(storage.read_bytes(join(source.checkpoint, MODEL)))
    pred = Predictor.from_source(source, storage, device=device, amp="off")
    net = copy.deepcopy(pred.net).cpu().float().eval().to(memory_format=torch.contiguous_format)
    module = Exported(net, source.multi_label).eval()
    size = source.data.image_size
    example = torch.zeros(EXPORT_BATCH, 3, size, size)
    with tempfile.TemporaryDirectory(prefix="raylens-export-") as tmp:
        path = os.path.join(tmp, MODEL_FILE)
        info = export_onnx(module, example, path, o.opset)
        import onnx

        onnx.checker.check_model(path)
        with open(path, "rb") as f:
            model_bytes = f.read()
    t_export = time.perf_counter() - t0
    model = {
        "sha256": sha256(model_bytes),
        "bytes": len(model_bytes),
        **info,
        "input": {"name": INPUT, "shape": ["batch", 3, size, size], "dtype": "float32"},
        "outputs": list(OUTPUTS),
    }
    spec = preprocess_spec(plan, checkpoint_sha, model)
    result = verify(plan, pred, model_bytes, spec)
    report = {
        "format": FORMAT,
        "passed": result["passed"],
        "failed_checks": result["failed_checks"],
        "command": storage.scrub(plan.command),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run": plan.run,
        "checkpoint": source.checkpoint,
        "checkpoint_sha256": checkpoint_sha,
        "task": plan.task,
        "classes": list(source.classes),
        "threshold": plan.threshold,
        "model": {"file": MODEL_FILE, **model},
        "preprocess": PREPROCESS_FILE,
        "device": str(device),
        "tolerance": {
            "atol": o.atol,
            "rtol": o.rtol,
            "rule": "|onnx - torch| <= atol + rtol * |torch|, every element of logits and probs",
            "preprocess_atol": PREPROCESS_ATOL,
        },
        "images": result["images"],
        "checks": result["checks"],
        "versions": spec["versions"],
        "seconds": {
            "export": round(t_export, 3),
            "verify": round(time.perf_counter() - t0 - t_export, 3),
        },
    }
    files = {MODEL_FILE: model_bytes, PREPROCESS_FILE: json.dumps(spec, indent=1).encode()}
    if not result["passed"]:
        failed = join(plan.output, FAILED_DIR)
        storage.delete_tree(failed)
        for name, data in files.items():
            storage.write_bytes(join(failed, name), data)
        storage.write_text(join(failed, REPORT_FILE), json.dumps(report, indent=1))
        raise VerificationFailed(
            f"verification failed ({', '.join(result['failed_checks'])}): "
            + describe(report)
            + f"; nothing committed, see {join(failed, REPORT_FILE)}",
            report,
        )
    commit(storage, plan.output, files, report)
    return report


def describe(report: dict[str, Any]) -> str:
    """One line of the numbers: max abs / rel diff, top-1 agreement, preprocessing."""
    c, t = report["checks"], report["tolerance"]
    parts = [
        f"{k} max abs diff {c[k]['max_abs_diff']:.3g}, max rel diff {c[k]['max_rel_diff']:.3g}"
        for k in OUTPUTS
    ]
    parts[-1] += f" (allowed: {t['atol']:g} + {t['rtol']:g} * |torch|)"
    parts.append(f"top-1 agreement {c['top1_agreement']:.4f}")
    if "label_agreement" in c:
        parts.append(f"label agreement {c['label_agreement']:.4f}")
    p = c["preprocess"]
    parts.append(
        f"preprocess.json input max abs diff {p['max_abs_diff']:.3g} "
        f"({p['uint8_mismatches']} uint8 mismatches)"
    )
    e = c["edge_pipeline"]["logits"]
    parts.append(f"edge pipeline logits max abs diff {e['max_abs_diff']:.3g}")
    parts.append(
        f"{report['images']['used']} images, batch sizes {c['batch_sizes']} "
        f"(exported at {c['export_batch']})"
    )
    return "; ".join(parts)


def main_summary(report: dict[str, Any], output: str) -> str:
    """The job's closing lines."""
    m = report["model"]
    return (
        f"exported {report['checkpoint']} -> {join(output, MODEL_FILE)} "
        f"({m['bytes'] / 2**20:.2f} MiB, opset {m['opset']}, {m['exporter']})\n"
        f"verified: {describe(report)}\n"
        f"preprocess: {join(output, PREPROCESS_FILE)}; report: {join(output, REPORT_FILE)}"
    )
