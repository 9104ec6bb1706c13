"""Fine-tuning on the shared 2-CPU Ray: 2 DDP workers with bf16 autocast, run dir on real S3,
resume by re-running the same run name, and bad configs refused before any worker starts."""

from __future__ import annotations

import json
import uuid

import pytest
import yaml
from raylens import config as C
from raylens.checkpoint import load_checkpoint
from raylens.schema import RunConfig
from raylens.storage import Storage, join
from raylens.train import finetune

from tests.sourcegen import prepare_quiet, write_folder, write_manifest
from tests.stores import s3_storage

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    storage = Storage()
    write_folder(storage, str(root / "raw"), per_class=30)
    prepare_quiet(storage, str(root / "raw"), str(root / "ds"))
    return str(root / "ds")


def _cfg(dataset, *extra):
    return C.load(
        RunConfig,
        None,
        [
            f"data.dataset={dataset}",
            "data.image_size=16",
            "data.batch_size=8",  # 36 train rows per worker: 5 steps an epoch
            "model.backbone=vgg_s16",  # small CNN: learns the colour classes in a few steps
            "train.lr=0.005",
            "train.warmup_epochs=0.5",
            "train.epochs=3",
            "ray.num_workers=2",
            *extra,
        ],
    )


@pytest.mark.timeout(600)
def test_two_workers_train_and_resume_with_the_run_dir_on_s3(ray_session, seaweed, dataset):
    bucket = f"runs-{uuid.uuid4().hex[:8]}"
    seaweed.create_bucket(bucket)
    storage = s3_storage(seaweed)
    s3 = [
        f"storage.s3_endpoint_url={seaweed.endpoint_url}",
        f"storage.s3_access_key_id={seaweed.access_key}",
        f"storage.s3_secret_access_key={seaweed.secret_key}",
    ]
    cfg = _cfg(dataset, "run.name=fm", f"run.output_dir=s3://{bucket}/runs", *s3)
    out = finetune(cfg)
    run = f"s3://{bucket}/runs/fm"
    assert out["run_dir"] == run
    metrics = [json.loads(x) for x in storage.read_text(join(run, "metrics.jsonl")).splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert metrics[-1]["val/top1"] >= 0.9, metrics
    assert metrics[-1]["train/loss"] == metrics[-1]["train/loss"]  # not NaN
    saved = storage.read_text(join(run, "config.yaml"))
    assert (
        seaweed.secret_key not in saved and yaml.safe_load(saved)["model"]["backbone"] == "vgg_s16"
    )
    assert json.loads(storage.read_text(join(run, "labels.json")))["classes"] == [
        "cat",
        "dog",
        "eel",
    ]
    best = json.loads(storage.read_text(join(run, "best.json")))
    ck = load_checkpoint(storage, join(run, best["checkpoint"]))
    assert ck["extra"]["epoch"] == best["epoch"] and "head.1.weight" in ck["model"]
    test = json.loads(storage.read_text(join(run, "test_metrics.json")))
    assert test["split"] == "test" and test["count"] == 9 and test["top1"] >= 0.8
    assert out["report"] == join(run, "report", "report.md")
    md = storage.read_text(out["report"])
    for png in ("learning_curves", "confusion_matrix", "per_class_f1", "val_samples"):
        assert storage.read_bytes(join(run, "report", f"{png}.png"))[:4] == b"\x89PNG"
        assert f"({png}.png)" in md
    assert f"{test['top1']:.4f}" in md  # the test column of the metrics table
    events = [f for f in storage.list_files(join(run, "tensorboard")) if "tfevents" in f.uri]
    assert events and all(f.size > 100 for f in events)
    assert out["test"]["top1"] == test["top1"]
    # the same command with more epochs resumes after epoch 2 instead of starting over
    finetune(
        _cfg(dataset, "run.name=fm", f"run.output_dir=s3://{bucket}/runs", "train.epochs=4", *s3)
    )
    metrics = [json.loads(x) for x in storage.read_text(join(run, "metrics.jsonl")).splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4]
    assert [m["resumes"] for m in metrics] == [0, 0, 0, 1]
    assert storage.exists(join(run, "checkpoints/epoch=4/state.json"))
    # the same run name with another learning rate would resume weights trained at the old
    # one and record the new: refused before anything runs, naming the key; nothing changed
    saved = storage.read_text(join(run, "config.yaml"))
    with pytest.raises(C.ConfigError, match=r"another config \(train\.lr: 0\.005 -> 0\.02\)"):
        finetune(
            _cfg(dataset, "run.name=fm", f"run.output_dir=s3://{bucket}/runs", "train.lr=0.02", *s3)
        )
    assert storage.read_text(join(run, "config.yaml")) == saved


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.backbone=resnet_nope", "unknown backbone 'resnet_nope'"),
        (
            "model.unfreeze_last_n=9",
            "'model.unfreeze_last_n': unfreeze_last_n=9: expected 'all' or 0..3",
        ),
        ("task.name=multilabel", "'task.name': multilabel needs a multi-label dataset"),
    ],
)
def test_bad_config_fails_before_any_worker_starts(
    ray_session, dataset, override, message, monkeypatch
):
    import raylens.train.images as R

    started = []
    monkeypatch.setattr(R, "build_trainer", lambda *a, **k: started.append(1))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        finetune(_cfg(dataset, "run.name=bad", override))
    assert not started


def test_classify_on_a_multilabel_dataset_is_refused(ray_session, tmp_path, monkeypatch):
    import raylens.train.images as R

    storage = Storage()
    uri, _ = write_manifest(storage, str(tmp_path / "raw"), "csv", multi=True)
    prepare_quiet(storage, uri, str(tmp_path / "ds"))
    monkeypatch.setattr(R, "build_trainer", lambda *a, **k: pytest.fail("trainer started"))
    with pytest.raises(ValueError, match="'task.name': classify needs single labels"):
        finetune(_cfg(str(tmp_path / "ds"), "run.name=bad"))


def test_a_dataset_with_zero_classes_is_refused(ray_session, tmp_path, monkeypatch):
    import raylens.train.images as R

    storage = Storage()
    storage.write_text(str(tmp_path / "raw" / "README.txt"), "no images here")
    prepare_quiet(storage, str(tmp_path / "raw"), str(tmp_path / "ds"))
    monkeypatch.setattr(R, "build_trainer", lambda *a, **k: pytest.fail("trainer started"))
    with pytest.raises(ValueError, match="has zero classes"):
        finetune(_cfg(str(tmp_path / "ds"), "run.name=bad"))


def test_local_paths_are_made_absolute_for_the_workers(tmp_path, monkeypatch):
    """Workers run in Ray's own directories: a relative run dir would land there."""
    from raylens.rundir import absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = absolute_paths(C.load(RunConfig, None, ["run.output_dir=runs", "data.dataset=data/ds"]))
    assert cfg.run.output_dir == str(tmp_path / "runs")
    assert cfg.data.dataset == str(tmp_path / "data" / "ds")
    remote = absolute_paths(C.load(RunConfig, None, ["run.output_dir=s3://b/runs"]))
    assert remote.run.output_dir == "s3://b/runs"


@pytest.mark.faults
@pytest.mark.timeout(600)
def test_a_sigkilled_worker_is_replaced_and_the_run_resumes_from_its_checkpoint(
    ray_session, dataset, tmp_path
):
    """SIGKILL the train worker after 2 epochs are reported; with max_failures=1 Ray Train
    starts a new worker that resumes from the last committed checkpoint (not from scratch)."""
    import os
    import signal
    import threading
    import time

    import psutil
    import ray

    # this test session's raylet: its children are this session's workers only (other Ray
    # instances may run on the machine)
    raylet = psutil.Process(ray._private.worker._global_node.all_processes["raylet"][0].process.pid)

    metrics_path = tmp_path / "runs" / "kill" / "metrics.jsonl"
    killed: dict = {}

    def killer() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            rows = metrics_path.read_text().splitlines() if metrics_path.exists() else []
            if len(rows) >= 2:  # epoch 1's checkpoint is committed: mid-epoch 3 now
                workers = [
                    p for p in raylet.children(recursive=True) if "RayTrainWorker" in p.name()
                ]
                if workers:
                    os.kill(workers[0].pid, signal.SIGKILL)
                    killed.update(pid=workers[0].pid, rows_before=len(rows))
                    return
            time.sleep(0.1)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    out = finetune(
        _cfg(
            dataset,
            "run.name=kill",
            f"run.output_dir={tmp_path / 'runs'}",
            "ray.num_workers=1",
            "ray.max_failures=1",
            "data.batch_size=2",  # 36 steps an epoch: the kill lands mid-run
            "train.epochs=4",
        )
    )
    thread.join(timeout=5)
    assert killed and killed["rows_before"] < 4, killed  # killed before the run ended
    rows = [json.loads(x) for x in metrics_path.read_text().splitlines()]
    metrics = [m for m in rows if "event" not in m]
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4]  # continues, no epoch run twice
    # the restart is an event row with its cause, right before the first resumed row
    events = [m for m in rows if "event" in m]
    assert [(e["event"], e["kind"]) for e in events] == [("restart", "worker_lost")], events
    assert rows[rows.index(events[0]) + 1]["resumes"] == 1, rows
    # rows before the kill come from the first worker (resumes 0), the rest from its
    # replacement, which resumed from a checkpoint written before the kill
    resumes = [m["resumes"] for m in metrics]
    first_after = resumes.index(1)
    assert 1 <= first_after <= killed["rows_before"] and resumes[first_after:] == [1] * (
        4 - first_after
    ), (resumes, killed)
    assert metrics[first_after]["step"] > metrics[first_after - 1]["step"]  # step continues
    assert out["test"]["top1"] >= 0.8
