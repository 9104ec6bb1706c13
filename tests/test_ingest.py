"""Ray Data ingest on the shared 2-CPU Ray session: batches, decode failures, raw folders,
and the 2-worker TorchTrainer on 2 CPUs that deadlocks without a resource budget."""

from __future__ import annotations

import io
import json
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
from raylens import config as C
from raylens.data.transforms import sample_seed
from raylens.runtime.ingest import TorchCollate, build_split, clear_ingest_failures, ingest_failures
from raylens.schema import RunConfig
from raylens.storage import Storage, join

from tests.sourcegen import CLASSES, prepare_quiet, write_folder
from tests.stores import s3_storage

pytestmark = pytest.mark.ray


def _cfg(dataset: str, *extra: str) -> RunConfig:
    return C.load(
        RunConfig,
        None,
        [
            f"data.dataset={dataset}",
            "data.image_size=16",
            "data.eval_crop_pct=1.0",
            "data.mean=[0.485, 0.456, 0.406]",
            "data.std=[0.229, 0.224, 0.225]",
            "data.batch_size=8",
            "data.decode_batch_size=16",
            *extra,
        ],
    )


def _collect(ds, cfg):
    rows = []
    for b in ds.iter_torch_batches(
        batch_size=cfg.data.batch_size, collate_fn=TorchCollate(cfg.data)
    ):
        rows.extend(
            zip(b["id"], b["label"].tolist(), b["image"], b["aug_seed"].tolist(), strict=True)
        )
    return rows


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("ingest")
    storage = Storage()
    truth = write_folder(storage, str(root / "raw"), per_class=10)
    prepare_quiet(storage, str(root / "raw"), str(root / "ds"))
    return storage, str(root / "ds"), str(root / "raw"), truth


def test_batches_are_normalized_tensors_with_the_right_labels(ray_session, prepared):
    storage, ds_uri, _, truth = prepared
    cfg = _cfg(ds_uri)
    ds, info = build_split(cfg, "train", storage, train=False)
    rows = _collect(ds, cfg)
    assert info.classes == CLASSES and len(rows) == info.num_rows["train"] == 24
    for rid, label, image, _ in rows:
        assert CLASSES[label] == truth[rid]
        assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    # normalized with ImageNet stats: reconstruct 0-255 pixels and compare with the source
    rid, _, image, _ = rows[0]
    mean, std = torch.tensor(cfg.data.mean).view(3, 1, 1), torch.tensor(cfg.data.std).view(3, 1, 1)
    pixels = (image * std + mean) * 255
    from PIL import Image

    src = np.asarray(
        Image.open(io.BytesIO(storage.read_bytes(join(prepared[2], rid))))
        .convert("RGB")
        .resize((16, 16), Image.BILINEAR)
    )
    assert torch.allclose(pixels, torch.tensor(src).permute(2, 0, 1).float(), atol=1.0)


def test_augmentation_is_seeded_per_sample_and_replayable(ray_session, prepared):
    storage, ds_uri, _, _ = prepared
    cfg = _cfg(ds_uri, "run.seed=3", "data.rrc_scale=[0.3, 1.0]")
    a = {r[0]: r for r in _collect(build_split(cfg, "val", storage, train=True, epoch=5)[0], cfg)}
    b = {r[0]: r for r in _collect(build_split(cfg, "val", storage, train=True, epoch=5)[0], cfg)}
    c = {r[0]: r for r in _collect(build_split(cfg, "val", storage, train=True, epoch=6)[0], cfg)}
    assert a.keys() == b.keys() == c.keys() and len(a) == 3
    for rid in a:
        assert a[rid][3] == sample_seed(3, rid, 5)
        assert torch.equal(a[rid][2], b[rid][2])
    assert any(not torch.equal(a[rid][2], c[rid][2]) for rid in a)


def test_train_passes_differ_and_a_rerun_repeats_them(ray_session, prepared, tmp_path):
    """Ray Train reads one pass per epoch from a streaming split. Each pass has its own
    block order and augmentation seeds (an int block-order seed repeated the first blocks
    every epoch); with preserve_order, a second build replays the same passes exactly."""
    storage, _, raw, _ = prepared
    ds_uri = str(tmp_path / "small-shards")
    prepare_quiet(storage, raw, ds_uri, shard_rows=3)
    cfg = _cfg(ds_uri, "run.seed=3", "data.shuffle_buffer=0")

    def passes():
        ds, _ = build_split(cfg, "train", storage)
        (it,) = ds.streaming_split(1, equal=True)
        out = []
        for _ in range(2):
            rows = [
                (rid, seed)
                for b in it.iter_batches(batch_size=8)
                for rid, seed in zip(b["id"], b["aug_seed"].tolist(), strict=True)
            ]
            out.append(rows)
        return out

    ctx = ray.data.DataContext.get_current()
    keep, ctx.execution_options.preserve_order = ctx.execution_options.preserve_order, True
    try:
        first, second = passes(), passes()
    finally:
        ctx.execution_options.preserve_order = keep
    assert first == second
    (p0, p1) = first
    assert len(p0) == len(p1) == 24 and {r for r, _ in p0} == {r for r, _ in p1}
    assert [r for r, _ in p0] != [r for r, _ in p1]  # a new block order in epoch 2
    for epoch, rows in enumerate(first):
        assert all(seed == sample_seed(3, rid, epoch) for rid, seed in rows)


def test_corrupt_record_at_ingest_is_skipped_and_counted(ray_session, prepared, tmp_path):
    storage, ds_uri, _, _ = prepared
    # copy the dataset and corrupt one row's bytes inside a shard (prepare would have caught it)
    card = json.loads(storage.read_text(join(ds_uri, "dataset.json")))
    out = str(tmp_path / "corrupt")
    for split, info in card["splits"].items():
        for f in info["files"]:
            table = pq.read_table(io.BytesIO(storage.read_bytes(join(ds_uri, f))))
            if split == "train":
                images = table.column("image").to_pylist()
                images[2] = b"\xff\xd8\xff\xe0 corrupted on the way"
                bad_id = table.column("id")[2].as_py()
                table = table.set_column(
                    table.schema.get_field_index("image"),
                    "image",
                    __import__("pyarrow").array(images, __import__("pyarrow").binary()),
                )
            buf = io.BytesIO()
            pq.write_table(table, buf)
            storage.write_bytes(join(out, f), buf.getvalue())
    storage.write_text(join(out, "dataset.json"), json.dumps(card))
    clear_ingest_failures()
    cfg = _cfg(out)
    rows = _collect(build_split(cfg, "train", storage)[0], cfg)
    assert len(rows) == 23 and bad_id not in {r[0] for r in rows}
    failures = ingest_failures()
    assert [f["id"] for f in failures] == [bad_id]
    assert failures[0]["reason"].startswith("undecodable")


def test_raw_folder_is_readable_without_prepare(ray_session, prepared):
    storage, _, raw, truth = prepared
    cfg = _cfg(raw)
    ds, info = build_split(cfg, "train", storage, train=False)
    rows = _collect(ds, cfg)
    assert info.classes == CLASSES and len(rows) == 24
    assert all(CLASSES[label] == truth[rid] for rid, label, *_ in rows)


@pytest.mark.timeout(300)
def test_two_train_workers_on_two_cpus_finish(ray_session, seaweed, tmp_path):
    """ray.init(num_cpus=2) + TorchTrainer(2 workers) + Ray Data: hangs unless budgeted."""
    from raylens.runtime.launch import build_trainer, ingest_check_loop

    assert ray_session.cluster_resources()["CPU"] == 2
    bucket = f"dl-{uuid.uuid4().hex[:8]}"
    seaweed.create_bucket(bucket)
    storage = s3_storage(seaweed)
    write_folder(storage, f"s3://{bucket}/raw", per_class=20)
    prepare_quiet(storage, f"s3://{bucket}/raw", f"s3://{bucket}/ds")
    cfg = _cfg(f"s3://{bucket}/ds", "ray.num_workers=2")
    ds, info = build_split(cfg, "train", storage)
    out = str(tmp_path / "ranks")
    trainer, plan = build_trainer(
        ingest_check_loop, {"data": cfg.data, "out": out, "storage": Storage()}, {"train": ds}, cfg
    )
    assert plan.cpus_per_worker * 2 + plan.data_cpus <= 2
    trainer.fit()
    ranks = [json.loads(Storage().read_text(join(out, f"rank-{r}.json"))) for r in (0, 1)]
    assert sum(r["rows"] for r in ranks) == info.num_rows["train"] == 48
    assert all(r["rows"] == 24 for r in ranks)  # equal split across the two workers


def test_ingest_from_gcs_converts_every_mode_to_rgb(ray_session, fake_gcs):
    """CMYK, 16-bit, RGBA (and the rest) arrive as 3-channel batches; from a GCS dataset."""
    from tests.imagegen import bad_files
    from tests.stores import gcs_storage

    bucket = f"modes-{uuid.uuid4().hex[:8]}"
    fake_gcs.create_bucket(bucket)
    storage = gcs_storage(fake_gcs)
    write_folder(storage, f"gs://{bucket}/raw", per_class=2)
    for name, (data, outcome, _) in bad_files().items():
        if outcome == "converted":
            storage.write_bytes(f"gs://{bucket}/raw/eel/{name}", data)
    card = prepare_quiet(
        storage,
        f"gs://{bucket}/raw",
        f"gs://{bucket}/ds",
        train_fraction=1.0,
        val_fraction=0.0,
        test_fraction=0.0,
    )
    assert sorted(c["mode"] for c in card["converted"]) == ["CMYK", "I;16", "RGBA"]
    cfg = _cfg(f"gs://{bucket}/ds")
    rows = _collect(build_split(cfg, "train", storage, train=False)[0], cfg)
    assert len(rows) == card["total"] == 9
    assert all(r[2].shape == (3, 16, 16) and torch.isfinite(r[2]).all() for r in rows)


def test_raw_file_that_vanished_is_dropped_and_recorded(ray_session, tmp_path):
    storage = Storage()
    raw = str(tmp_path / "raw")
    write_folder(storage, raw, per_class=10)
    cfg = _cfg(raw)
    ds, _ = build_split(cfg, "train", storage, train=False)  # listed now, read lazily
    victim = "dog/004.png"
    (tmp_path / "raw" / victim).unlink()
    clear_ingest_failures()
    rows = _collect(ds, cfg)
    failures = ingest_failures()
    assert len(rows) == 23 and victim not in {r[0] for r in rows}  # 24 train files, one gone
    assert [f["id"] for f in failures] == [victim]
    assert failures[0]["reason"].startswith("unreadable") and "dog/004.png" in failures[0]["reason"]
