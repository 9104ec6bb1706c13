"""ONNX export: a run dir (written here without Ray, as jobs.finetune leaves it) over a small
real prepared dataset exports to model.onnx + preprocess.json + export.json; ONNX Runtime
matches the served PyTorch model on the dataset's images at other batch sizes than the
traced one, preprocess.json alone (NumPy + Pillow) reproduces the eval input, a parity
failure commits nothing, re-runs replace, and bad input is refused naming it. No Ray."""

from __future__ import annotations

import hashlib
import io
import json
import math
import subprocess
import sys
import uuid

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from raylens import config as C
from raylens.checkpoint import save_checkpoint
from raylens.export import preprocess as P
from raylens.models.classifier import build_model
from raylens.predict import Predictor
from raylens.schema import RunConfig
from raylens.storage import Storage, join

import jobs.export as job
from tests.imagegen import bad_files, class_image, encode, photo
from tests.repo import REPO
from tests.sourcegen import CLASSES, prepare_quiet, read_prepared, write_manifest
from tests.stores import s3_storage

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
SPLIT = {"train_fraction": 0.4, "val_fraction": 0.2, "test_fraction": 0.4}


def _image(c: int, i: int) -> tuple[str, bytes]:
    """A class's i-th file: colour PNG/JPEG, non-square both ways, grayscale, RGBA, 16-bit."""
    rng = np.random.default_rng(c * 1000 + i)
    kind = i % 6
    if kind in (0, 1):
        return ("png", class_image(c, i)) if kind == 0 else ("jpg", class_image(c, i, fmt="JPEG"))
    if kind in (2, 3):  # 20 x 30 (portrait) and 41 x 17 (landscape, upscaled to 18 high)
        h, w = (30, 20) if kind == 2 else (17, 41)
        return "png", encode(Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)))
    if kind == 4:
        return "png", encode(Image.fromarray(rng.integers(0, 255, (26, 22), np.uint8), "L"))
    rgba = rng.integers(0, 255, (22, 25, 4), np.uint8)
    return "png", encode(Image.fromarray(rgba, "RGBA"))


def write_images(storage: Storage, root: str, per_class: int = 8) -> None:
    for c, name in enumerate(CLASSES):
        for i in range(per_class):
            ext, data = _image(c, i)
            storage.write_bytes(join(root, f"{name}/{i:03d}.{ext}"), data)


def make_run(storage: Storage, run: str, dataset: str, *, multi: bool = False) -> None:
    """A run dir as jobs.finetune leaves it: vgg_s16 at 16 px (resize to 18, center crop),
    channels_last, two checkpoints with non-trivial BatchNorm statistics, best = epoch 2."""
    card = json.loads(storage.read_text(join(dataset, "dataset.json")))
    overrides = [
        "run.name=tiny",
        "model.backbone=vgg_s16",
        "data.image_size=16",
        "data.eval_crop_pct=0.875",
        f"data.dataset={dataset}",
        f"data.mean={list(MEAN)}",
        f"data.std={list(STD)}",
        f"task.name={'multilabel' if multi else 'classify'}",
        "task.threshold=0.4",
    ]
    cfg = C.load(RunConfig, None, overrides)
    for epoch in (1, 2):
        torch.manual_seed(epoch)
        model = build_model(cfg.model, len(card["classes"]))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
        save_checkpoint(
            storage, join(run, f"checkpoints/epoch={epoch}"), model=model.state_dict(), extra={}
        )
    storage.write_text(join(run, "config.yaml"), C.to_yaml(cfg))
    labels = {"classes": card["classes"], "task": card["task"]}
    storage.write_text(join(run, "labels.json"), json.dumps(labels))
    best = {"epoch": 2, "checkpoint": "checkpoints/epoch=2", "metrics": {}}
    storage.write_text(join(run, "best.json"), json.dumps(best))


def export(*args: str) -> dict:
    return job.main(["export.images=12", *args])


def read_json(path) -> dict:
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    storage = Storage()
    write_images(storage, str(root / "raw"))
    prepare_quiet(storage, str(root / "raw"), str(root / "ds"), **SPLIT)
    run = str(root / "run")
    make_run(storage, run, str(root / "ds"))
    report = export(f"export.run={run}")  # default output: <run>/export
    card, rows = read_prepared(storage, str(root / "ds"))
    return {"root": root, "run": run, "ds": str(root / "ds"), "rows": rows, "report": report}


def test_export_writes_a_verified_model_and_its_preprocessing(data):
    out = join(data["run"], "export")
    report = read_json(join(out, "export.json"))
    assert report == json.loads(json.dumps(data["report"]))
    spec = read_json(join(out, "preprocess.json"))
    with open(join(out, "model.onnx"), "rb") as f:
        model = f.read()
    assert report["passed"] and not report["failed_checks"]
    c = report["checks"]
    # real differences (ORT fuses Conv + BN), far inside the default tolerance
    assert 0 < c["logits"]["max_abs_diff"] <= 1e-4 and c["logits"]["within_tolerance"]
    assert c["probs"]["max_abs_diff"] <= 1e-4 and c["top1_agreement"] == 1.0
    assert c["preprocess"]["uint8_mismatches"] == 0 and c["preprocess"]["max_abs_diff"] <= 1e-5
    assert all(v["within_tolerance"] for v in c["edge_pipeline"].values())
    assert c["batch_sizes"] == [12, 1] and c["export_batch"] == 2
    assert report["tolerance"]["atol"] == 1e-4 and report["tolerance"]["rtol"] == 1e-4
    # real images: the test split first, topped up from val, by their dataset ids
    ids = {r["id"]: r["split"] for r in data["rows"]}
    imgs = report["images"]
    assert imgs["used"] == 12 and len(set(imgs["ids"])) == 12
    assert [ids[i] for i in imgs["ids"]] == ["test"] * imgs["splits"]["test"] + ["val"] * imgs[
        "splits"
    ]["val"]
    assert imgs["splits"]["test"] > 0 and imgs["splits"]["val"] > 0
    assert imgs["dataset"] == data["ds"]
    # the run's classes, the checkpoint and the file, by hash
    labels = read_json(join(data["run"], "labels.json"))
    assert spec["classes"] == report["classes"] == labels["classes"] == CLASSES
    ck = join(data["run"], "checkpoints/epoch=2")
    with open(join(ck, "model.safetensors"), "rb") as f:
        ck_sha = hashlib.sha256(f.read()).hexdigest()
    assert spec["source"]["checkpoint"] == report["checkpoint"] == ck
    assert spec["source"]["checkpoint_sha256"] == report["checkpoint_sha256"] == ck_sha
    assert report["model"]["sha256"] == hashlib.sha256(model).hexdigest()
    assert report["model"]["exporter"] == "torch.onnx dynamo" and report["model"]["opset"] == 18
    assert report["command"] == f"python -m jobs.export export.images=12 export.run={data['run']}"
    # everything an edge runtime needs
    assert spec["input"] == {
        "name": "pixels",
        "dtype": "float32",
        "layout": "NCHW",
        "shape": ["batch", 3, 16, 16],
        "channel_order": "RGB",
    }
    assert spec["resize"]["shorter_side"] == 18 and spec["resize"]["interpolation"] == "bilinear"
    assert spec["crop"]["size"] == [16, 16]
    assert spec["normalize"]["mean"] == list(MEAN) and spec["normalize"]["std"] == list(STD)
    assert math.isclose(spec["normalize"]["scale"], 1 / 255)
    assert spec["outputs"]["probs"]["activation"] == "softmax" and "threshold" not in spec
    assert {"torch", "onnx", "onnxruntime"} <= set(spec["versions"])
    assert sorted(p.name for p in (data["root"] / "run" / "export").iterdir()) == [
        "export.json",
        "model.onnx",
        "preprocess.json",
    ]


def test_the_onnx_model_takes_any_batch_and_matches_the_served_model(data):
    sess = ort.InferenceSession(
        join(data["run"], "export", "model.onnx"), providers=["CPUExecutionProvider"]
    )
    (inp,) = sess.get_inputs()
    assert inp.name == "pixels" and inp.shape == ["batch", 3, 16, 16]
    assert [o.name for o in sess.get_outputs()] == ["logits", "probs"]
    pred = Predictor.load(data["run"])
    train = [r["image"] for r in data["rows"] if r["split"] == "train"]  # unseen by the export
    for n in (1, 3, 5):
        pixels, kept, _ = pred.preprocess(train[:n])
        x = pred.normalize(torch.from_numpy(pixels))
        logits = pred.logits(x)
        got_logits, got_probs = sess.run(None, {"pixels": x.numpy()})
        assert got_logits.shape == (n, 3)
        np.testing.assert_allclose(got_logits, logits.numpy(), atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(got_probs, pred.probs(logits).numpy(), atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(got_probs.sum(1), 1.0, atol=1e-5)


def test_preprocess_json_alone_reproduces_the_eval_input(data):
    """Every image of the dataset (colour, grayscale, RGBA, non-square both ways, resized
    down and up) and the planted converted modes (CMYK, 16-bit, alpha)."""
    spec = read_json(join(data["run"], "export", "preprocess.json"))
    pred = Predictor.load(data["run"])
    images = [r["image"] for r in data["rows"]]
    images += [b for b, kind, _ in bad_files().values() if kind == "converted"]
    palette = Image.new("P", (19, 23), 3)
    palette.info["transparency"] = 3
    images.append(encode(palette, "PNG", transparency=3))
    # large JPEGs, which the run (data.decode_reduce on) decodes at 1/8 scale, and a PNG
    large = [encode(photo(640, 480, seed=1), "JPEG", quality=90),
             encode(photo(300, 700, seed=2).convert("L"), "JPEG", quality=90),
             encode(photo(640, 480, seed=3), "PNG")]  # fmt: skip
    images += large
    assert spec["decode"]["reduce"]["gap"] == pred.data.decode_reduce_gap
    assert all(P.reduced(b, spec) is not None for b in large[:2]) and not P.reduced(large[2], spec)
    pixels, kept, failures = pred.preprocess(images)
    assert not failures
    ref_pixels, ref_x = P.preprocess(images, spec)
    np.testing.assert_array_equal(ref_pixels, pixels)
    x = pred.normalize(torch.from_numpy(pixels)).numpy()
    assert ref_x.dtype == np.float32 and np.abs(ref_x - x).max() <= 1e-5
    modes = {Image.open(io.BytesIO(b)).mode for b in images}
    assert {"RGB", "L", "RGBA", "CMYK", "I;16", "P"} <= modes
    code = (
        "import sys; import raylens.export.preprocess; assert 'torch' not in sys.modules; "
        "import jobs.export; assert 'ray' not in sys.modules; print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr


def test_multi_label_run_exports_sigmoids_and_its_threshold(data, tmp_path):
    storage = Storage()
    manifest, _ = write_manifest(storage, str(tmp_path / "raw"), "parquet", multi=True)
    prepare_quiet(storage, manifest, str(tmp_path / "ds"), **SPLIT)
    run, out = str(tmp_path / "run"), str(tmp_path / "edge")
    make_run(storage, run, str(tmp_path / "ds"), multi=True)
    report = export(f"export.run={run}", f"export.output={out}")
    spec = read_json(join(out, "preprocess.json"))
    assert report["passed"] and report["task"] == spec["task"] == "multilabel"
    assert spec["outputs"]["probs"]["activation"] == "sigmoid"
    assert report["threshold"] == spec["threshold"] == 0.4
    assert report["checks"]["label_agreement"] == 1.0
    sess = ort.InferenceSession(join(out, "model.onnx"), providers=["CPUExecutionProvider"])
    logits, probs = sess.run(None, {"pixels": np.zeros((4, 3, 16, 16), np.float32)})
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-logits)), atol=1e-6)


def test_a_failed_verification_commits_nothing_and_reruns_replace(data, tmp_path, capsys):
    """An earlier export stays as it was after a failed one; the next good one replaces it
    (another checkpoint, the TorchScript exporter for opset 17, then the defaults)."""
    run, out = data["run"], tmp_path / "edge"
    first = export(
        f"export.run={run}",
        f"export.output={out}",
        "export.checkpoint=checkpoints/epoch=1",
        "export.opset=17",
    )
    assert first["checkpoint"].endswith("checkpoints/epoch=1")
    assert first["model"]["exporter"] == "torch.onnx torchscript" and first["model"]["opset"] == 17
    committed = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:  # any difference at all fails at zero tolerance
        export(f"export.run={run}", f"export.output={out}", "export.atol=0", "export.rtol=0")
    assert err.value.code == 1
    msg = capsys.readouterr().err
    assert "verification failed (logits, probs" in msg and "nothing committed" in msg
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == committed
    failed = read_json(out / "failed" / "export.json")
    assert failed["passed"] is False and "logits" in failed["failed_checks"]
    assert failed["checks"]["logits"]["max_abs_diff"] > 0  # a real difference, not a no-op
    assert failed["checkpoint"].endswith("checkpoints/epoch=2")
    assert (out / "failed" / "model.onnx").exists()

    last = export(f"export.run={run}", f"export.output={out}")
    assert last["passed"] and last["checkpoint"].endswith("checkpoints/epoch=2")
    assert last["model"]["exporter"] == "torch.onnx dynamo"
    assert last["checkpoint_sha256"] != first["checkpoint_sha256"]
    assert read_json(out / "export.json") == json.loads(json.dumps(last))
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.onnx", "preprocess.json"]


def _metric_run(run: str) -> None:
    Storage().write_text(join(run, "labels.json"), json.dumps({"classes": ["a"], "task": "metric"}))


def _moved_dataset(run: str) -> None:
    cfg = C.load(RunConfig, Storage().read_text(join(run, "config.yaml")))
    cfg.data.dataset = run + "/nowhere"
    Storage().write_text(join(run, "config.yaml"), C.to_yaml(cfg))


def _no_best(run: str) -> None:
    Storage().delete(join(run, "best.json"))


@pytest.mark.parametrize(
    "args, setup, expected",
    [
        (["export.run={tmp}/none"], None, "not a run dir (no labels.json"),
        (
            ["export.run={run}", "export.checkpoint=checkpoints/epoch=9"],
            None,
            "no complete checkpoint",
        ),
        (["export.run={run}"], _no_best, "no best.json (is the run still training?)"),
        (["export.run={run}"], _metric_run, "is a metric-learning run"),
        (["export.run={run}"], _moved_dataset, "verification needs real images"),
        (
            ["export.run={run}", "export.images=0"],
            None,
            "'export.images': expected a count >= 1, got 0",
        ),
        (
            ["export.run={run}", "export.atol=-1"],
            None,
            "'export.atol': expected a finite tolerance >= 0",
        ),
        (
            ["export.run={run}", "export.rtol=.nan"],
            None,
            "'export.rtol': expected a finite tolerance >= 0",
        ),
        (
            ["export.run={run}", "export.opset=3"],
            None,
            "'export.opset': expected an ONNX opset >= 7",
        ),
        (
            ["export.run={run}", "export.device=tpu"],
            None,
            "'export.device': expected cpu or cuda[:N]",
        ),
        (["export.run={run}", "export.opset=99"], None, "'export.opset': expected 7.."),
        (["export.run={run}", "export.output={run}"], None, "is the run dir"),
        ([], None, "config key 'export.run' is required"),
    ],
)
def test_bad_input_is_refused_naming_it(data, tmp_path, capsys, args, setup, expected):
    import shutil

    run = str(tmp_path / "run")
    shutil.copytree(data["run"], run, ignore=shutil.ignore_patterns("export"))
    if setup:
        setup(run)
    with pytest.raises(SystemExit) as err:
        job.main([a.format(run=run, tmp=tmp_path) for a in args])
    assert err.value.code == 2
    msg = capsys.readouterr().err
    assert msg.startswith("python -m jobs.export: error: ") and expected in msg, msg
    if "checkpoint" in " ".join(args) or setup is _no_best:
        assert "['checkpoints/epoch=1', 'checkpoints/epoch=2']" in msg  # what there is
    assert not (tmp_path / "run" / "export").exists()


@pytest.mark.e2e
def test_export_of_a_run_on_s3(seaweed, data, monkeypatch, capsys):
    """Run dir and dataset in a bucket; the default output (<run>/export) lands there too."""
    bucket = f"rl-{uuid.uuid4().hex[:12]}"
    seaweed.create_bucket(bucket)
    for key, value in seaweed.env().items():
        monkeypatch.setenv(key, value)
    storage = s3_storage(seaweed)
    ds, run = f"s3://{bucket}/ds", f"s3://{bucket}/runs/tiny"
    prepare_quiet(storage, str(data["root"] / "raw"), ds, **SPLIT)
    make_run(storage, run, ds)
    report = export(f"export.run={run}")
    assert report["passed"] and report["run"] == run
    written = json.loads(storage.read_text(join(run, "export/export.json")))
    assert written == json.loads(json.dumps(report))
    model = storage.read_bytes(join(run, "export/model.onnx"))
    assert hashlib.sha256(model).hexdigest() == report["model"]["sha256"]
    names = sorted(f.uri.rsplit("/", 1)[1] for f in storage.list_files(join(run, "export")))
    assert names == ["export.json", "model.onnx", "preprocess.json"]  # no staging left
    assert seaweed.secret_key not in capsys.readouterr().out
