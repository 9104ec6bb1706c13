"""Report plots and report.md (pure: matplotlib only), and TensorBoard event files."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from raylens.report import (
    Samples,
    confusion_matrix,
    learning_curves,
    per_class_f1,
    sample_grid,
    write_report,
)
from raylens.runtime.events import EventLog
from raylens.storage import Storage, join
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def _image(png: bytes) -> Image.Image:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(png))
    img.load()
    return img


HISTORY = [
    {
        "epoch": 0,
        "step": 5,
        "epoch_end": False,
        "train/loss": 1.2,
        "val/loss": 1.1,
        "val/top1": 0.5,
        "best": True,
    },  # noqa: E501
    {
        "epoch": 1,
        "step": 10,
        "epoch_end": True,
        "train/loss": 0.8,
        "val/loss": 0.9,
        "val/top1": 0.7,
        "best": True,
    },  # noqa: E501
    {
        "epoch": 2,
        "step": 20,
        "epoch_end": True,
        "train/loss": 0.5,
        "val/loss": 0.95,
        "val/top1": 0.65,
        "best": False,
    },  # noqa: E501
]


def test_plots_are_real_pngs_of_a_sensible_size():
    for png in (
        learning_curves(HISTORY, "top1"),
        confusion_matrix([[5, 1], [0, 4]], ["a", "b"], "cm"),
        per_class_f1([0.2, 0.9, 0.5], ["x", "y", "z"], "f1"),
        sample_grid(np.zeros((10, 8, 8, 3), np.uint8), ["a"] * 10, ["a"] * 9 + ["b"], "s"),
    ):
        img = _image(png)
        assert img.width >= 300 and img.height >= 200


def test_write_report_lays_out_plots_and_metrics(tmp_path):
    storage = Storage()
    run = str(tmp_path / "run")
    val = {"top1": 0.7, "loss": 0.9, "count": 10, "confusion": [[5, 1], [2, 2]],
           "per_class_f1": [0.77, 0.57]}  # fmt: skip
    test = {"top1": 0.6543, "loss": 1.0, "count": 10, "confusion": [[4, 1], [3, 2]],
            "per_class_f1": [0.67, 0.5]}  # fmt: skip
    samples = Samples(np.full((3, 8, 8, 3), 128, np.uint8), ["a", "b", "b"], ["a", "a", "b"])
    md_uri = write_report(
        storage,
        run,
        history=HISTORY,
        metric="top1",
        best={"epoch": 1, "checkpoint": "checkpoints/epoch=1"},
        splits={"val": val, "test": test},
        classes=["a", "b"],
        multi_label=False,
        samples=samples,
        summary={"model": "vgg_s16"},
    )
    assert md_uri == join(run, "report", "report.md")
    md = storage.read_text(md_uri)
    assert "| top1 | 0.7000 | 0.6543 |" in md
    assert "`checkpoints/epoch=1` (epoch 1, selected by val top1)" in md
    assert "| b | 0.5000 |" in md  # per-class F1 of the test split
    for name in ("learning_curves", "confusion_matrix", "per_class_f1", "val_samples"):
        assert f"![{name}.png]({name}.png)" in md
        _image(storage.read_bytes(join(run, "report", f"{name}.png")))


def test_multilabel_report_names_best_and_worst_classes(tmp_path):
    storage = Storage()
    per_class = {c: {"f1": f, "precision": f, "recall": f, "support": 3}
                 for c, f in zip("abc", (0.9, 0.1, 0.5), strict=True)}  # fmt: skip
    val = {"f1_weighted": 0.5, "per_class": per_class, "best5": [("a", 0.9), ("c", 0.5)],
           "worst5": [("b", 0.1)]}  # fmt: skip
    md = storage.read_text(
        write_report(
            storage,
            str(tmp_path),
            history=[{**r, "val/f1_weighted": r["val/top1"]} for r in HISTORY],
            metric="f1_weighted",
            best=None,
            splits={"val": val},
            classes=["a", "b", "c"],
            multi_label=True,
            samples=None,
            summary={},
        )
    )
    assert "best: a 0.900, c 0.500" in md and "worst: b 0.100" in md
    assert "confusion_matrix" not in md and "| b | 0.1000 |" in md


# The two code paths: written in place (local) or uploaded after each flush (any object
# store alike; tests/test_storage.py covers Storage writes on GCS too).
@pytest.mark.parametrize("store", ["local", "s3"], indirect=True)
def test_event_log_writes_scalars_locally_and_to_object_storage(tmp_path, store):
    storage, root = store
    run = join(root, "run")
    log = EventLog(storage, join(run, "tensorboard"))
    for row in HISTORY:
        log.add(row)
    log.close()
    files = [f for f in storage.list_files(join(run, "tensorboard")) if "tfevents" in f.uri]
    assert len(files) == 1
    local = tmp_path / "tb"
    local.mkdir()
    (local / "events.out.tfevents.0").write_bytes(storage.read_bytes(files[0].uri))
    acc = EventAccumulator(str(local))
    acc.Reload()
    assert {"train/loss", "val/loss", "val/top1"} <= set(acc.Tags()["scalars"])
    assert "best" not in acc.Tags()["scalars"] and "epoch_end" not in acc.Tags()["scalars"]
    top1 = acc.Scalars("val/top1")
    assert [e.step for e in top1] == [5, 10, 20]
    assert np.allclose([e.value for e in top1], [0.5, 0.7, 0.65])
