"""Fault injection: the object store goes away mid-run, a dataset arrives with corrupt images.

The rest of the fault suite lives beside the features it exercises, all marked ``faults``
(``pytest -m faults`` runs every scenario):
- a train worker SIGKILLed mid-run: test_finetune.py
- the Tune driver killed mid-sweep, then ``--resume``: test_tune.py
- a Serve replica killed under load: test_serve.py
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import threading
import time
import uuid

import numpy as np
import pytest
from PIL import Image
from raylens import config as C
from raylens.data import fashion_mnist as fm
from raylens.schema import RunConfig
from raylens.storage import Storage, StorageError, join
from raylens.train import finetune

from tests.imagegen import encode
from tests.servers import start_seaweedfs
from tests.sourcegen import prepare_quiet, write_folder
from tests.stores import s3_storage

pytestmark = [pytest.mark.ray, pytest.mark.faults]


def _log(storage: Storage, run: str) -> list[dict]:
    return [json.loads(x) for x in storage.read_text(join(run, "metrics.jsonl")).splitlines()]


def _epochs(storage: Storage, run: str) -> list[dict]:
    """The run's metric rows (its restarts and failures are ``event`` rows: left out)."""
    return [row for row in _log(storage, run) if "event" not in row]


@pytest.mark.timeout(600)
def test_s3_server_stopped_and_restarted_during_ingest_the_run_completes(ray_session, tmp_path):
    """Dataset and run dir on S3 (a SeaweedFS of this test's own); the server is stopped
    right after epoch 1 is reported, while epoch 2 streams its shards, and started again
    some seconds later. The run must end with every epoch, every validation and test image
    counted once, and its checkpoints readable."""
    server = start_seaweedfs(tmp_path / "weed")
    run_done = threading.Event()
    try:
        bucket = f"faults-{uuid.uuid4().hex[:8]}"
        server.create_bucket(bucket)
        storage = s3_storage(server)
        impatient = Storage(dataclasses.replace(storage.cfg, retry_seconds=0))
        write_folder(storage, f"s3://{bucket}/raw", per_class=30)
        card = prepare_quiet(storage, f"s3://{bucket}/raw", f"s3://{bucket}/ds")
        run = f"s3://{bucket}/runs/outage"
        outage: dict = {}

        def saboteur() -> None:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                try:
                    rows = storage.read_text(join(run, "metrics.jsonl")).splitlines()
                except (FileNotFoundError, StorageError):
                    rows = []
                if rows:  # epoch 1 reported: epoch 2 is streaming now
                    t0 = time.monotonic()
                    server.stop()
                    try:  # the server is really gone for the run, too (no retries here)
                        impatient.read_text(join(run, "metrics.jsonl"))
                        outage["still_up"] = True
                    except (OSError, StorageError) as err:
                        outage["error"] = str(err)[:200]
                    time.sleep(8)
                    server.start()
                    outage.update(rows_before=len(rows), seconds=time.monotonic() - t0)
                    # stay alive: the server dies with the thread that started it
                    run_done.wait(timeout=900)
                    return
                time.sleep(0.2)

        def guarded() -> None:
            try:
                saboteur()
            except BaseException as err:  # seen by the asserts below, not lost in a thread
                outage["saboteur_error"] = repr(err)
                raise

        thread = threading.Thread(target=guarded, daemon=True)
        thread.start()
        cfg = C.load(
            RunConfig,
            None,
            [
                f"data.dataset=s3://{bucket}/ds",
                f"run.output_dir=s3://{bucket}/runs",
                "run.name=outage",
                f"storage.s3_endpoint_url={server.endpoint_url}",
                f"storage.s3_access_key_id={server.access_key}",
                f"storage.s3_secret_access_key={server.secret_key}",
                "data.image_size=16",
                "data.batch_size=2",  # 36 steps an epoch: the outage lands mid-epoch
                "model.backbone=vgg_s16",
                "train.lr=0.005",
                "train.warmup_epochs=0.5",
                "train.epochs=3",
                "ray.num_workers=1",
                "ray.max_failures=2",
            ],
        )
        t0 = time.monotonic()
        try:
            out = finetune(cfg)
        finally:
            print(f"outage: {outage}; run {time.monotonic() - t0:.1f}s")
        assert outage.get("rows_before") == 1 and "error" in outage, outage

        metrics = _epochs(storage, run)
        assert [m["epoch"] for m in metrics] == [1, 2, 3], metrics
        print("resumes per epoch:", [m["resumes"] for m in metrics])
        # a restart the outage caused is an event row with its cause (recorded while the
        # store may still be down: best effort, so not counted here)
        events = [row for row in _log(storage, run) if "event" in row]
        print("events:", [(e["event"], e["kind"], e["cause"][:120]) for e in events])
        assert all(e["event"] == "restart" and e["kind"] and e["cause"] for e in events), events
        val, test = card["splits"]["val"]["count"], card["splits"]["test"]["count"]
        assert all(m["val/count"] == val for m in metrics), [m["val/count"] for m in metrics]
        assert out["test"]["count"] == test
        assert out["test"]["top1"] >= 0.8
        best = json.loads(storage.read_text(join(run, "best.json")))
        assert storage.exists(join(run, best["checkpoint"], "model.safetensors"))
    finally:
        server.stop()
        run_done.set()  # the saboteur thread may end now


# ------------------------------------------------------------------ corrupt images

CORRUPTIONS = ("truncated", "zero_bytes", "garbage", "header_smashed")


def _corrupt(data: bytes, kind: str, rng: np.random.Generator) -> bytes:
    if kind == "truncated":  # cut inside the pixel data
        return data[: len(data) // 2]
    if kind == "zero_bytes":
        return b""
    if kind == "garbage":
        return rng.integers(0, 256, size=len(data), dtype=np.uint8).tobytes()
    return b"\0" * 16 + data[16:]  # signature and header gone


@pytest.mark.skipif(
    not os.path.exists(fm.DEBIAN_DIR),
    reason="needs the Debian package dataset-fashion-mnist (installed by .ci/run)",
)
@pytest.mark.timeout(600)
def test_five_percent_corrupt_images_are_rejected_exactly_and_the_rest_trains(
    ray_session, tmp_path
):
    """800 real Fashion-MNIST images (80 a class), 40 of them (5 %) corrupted four ways.
    Prepare must reject exactly those 40, each with its reason, keep the other 760, and a
    run on the result must see every kept image: nothing lost, nothing extra. (80 a class,
    3 epochs at lr 0.008: with 40 a class, 2 epochs at 0.004, test top-1 on the 39-image
    test split ranged 0.38-0.51 over runs and CI failed once on the floor below; this
    setting measured 0.69-0.71.)"""
    with open(os.path.join(fm.DEBIAN_DIR, fm.FILES["train_images"] + ".gz"), "rb") as f:
        images = fm.parse_idx(gzip.decompress(f.read()))
    with open(os.path.join(fm.DEBIAN_DIR, fm.FILES["train_labels"] + ".gz"), "rb") as f:
        labels = fm.parse_idx(gzip.decompress(f.read()))
    storage, raw = Storage(), tmp_path / "raw"
    rng = np.random.default_rng(5)
    files = []
    for c, name in enumerate(fm.CLASSES):
        for j in np.nonzero(labels == c)[0][:80]:
            rel = f"{name.replace('/', '-')}/{j}.png"
            files.append(rel)
            storage.write_bytes(str(raw / rel), encode(Image.fromarray(images[j])))
    corrupted = {}
    for i, rel in enumerate(sorted(rng.choice(files, size=len(files) // 20, replace=False))):
        kind = CORRUPTIONS[i % len(CORRUPTIONS)]
        path = raw / rel
        path.write_bytes(_corrupt(path.read_bytes(), kind, rng))
        corrupted[rel] = kind
    assert len(corrupted) == 40 and set(corrupted.values()) == set(CORRUPTIONS)

    card = prepare_quiet(storage, str(raw), str(tmp_path / "ds"))
    rejected = {r["id"]: r for r in card["rejected"]}
    assert set(rejected) == set(corrupted), sorted(set(rejected) ^ set(corrupted))
    for rel, kind in corrupted.items():  # each with a reason that says what is wrong
        expected = "zero_bytes" if kind == "zero_bytes" else "undecodable"
        assert rejected[rel]["reason"] == expected, (rel, kind, rejected[rel])
        assert kind == "zero_bytes" or rejected[rel]["detail"], rejected[rel]
    assert card["total"] == 760
    assert sum(s["count"] for s in card["splits"].values()) == 760

    out = finetune(
        C.load(
            RunConfig,
            None,
            [
                f"data.dataset={tmp_path / 'ds'}",
                f"run.output_dir={tmp_path / 'runs'}",
                "run.name=corrupt",
                "data.image_size=28",
                "data.eval_crop_pct=1.0",
                "data.mean=[0.286, 0.286, 0.286]",
                "data.std=[0.353, 0.353, 0.353]",
                "data.rrc_scale=[0.8, 1.0]",
                "data.batch_size=16",
                "model.backbone=vgg_s16",
                "train.lr=0.008",
                "train.warmup_epochs=0.5",
                "train.epochs=3",
                "ray.num_workers=1",
            ],
        )
    )
    metrics = _epochs(storage, out["run_dir"])
    train_n = card["splits"]["train"]["count"]
    steps = [m["step"] for m in metrics]  # one worker: every train row, once an epoch
    assert steps == [-(-train_n // 16) * e for e in (1, 2, 3)], (steps, train_n)
    assert all(m["val/count"] == card["splits"]["val"]["count"] for m in metrics)
    assert out["test"]["count"] == card["splits"]["test"]["count"]
    assert out["test"]["top1"] >= 0.5, out["test"]  # 10 classes: chance is 0.1
