"""The teacher pass of fast distillation, and its replay check.

``teacher_pass`` runs a teacher (a run dir's best checkpoint) over the train split for
``distill.aug_epochs`` augmentation epochs with Ray Data batch inference (an actor pool,
the teacher loaded once per actor) and stores each sample's top-k targets per epoch
(:mod:`raylens.data.teacher_store`). Epoch ``e`` augments sample ``id`` with the seed
``sample_seed(run.seed, id, e)``, the same seed the student's pipeline derives, so the
student sees exactly the pixels the teacher saw.

``check_store`` replays the augmentation of a sample subset from the stored seeds,
reruns the teacher and compares: index mismatch rate and mean absolute probability error.
"""

from __future__ import annotations

import io
import json
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from raylens.data import teacher_store as TS
from raylens.data.prepare import load_card
from raylens.data.transforms import (
    ImageTransform,
    decode_and_transform,
    sample_seed,
)
from raylens.schema import RunConfig, StorageConfig
from raylens.storage import Storage, join
from raylens.tasks.distill import TeacherInput, load_teacher, topk_sparse


class TeacherTopK:
    """Ray Data UDF (one actor = one loaded teacher): uint8 batch → top-k targets."""

    def __init__(self, run_dir: str, storage_cfg: StorageConfig, k: int, device: str = "cpu"):
        storage = Storage(storage_cfg)
        self.model, cfg, _ = load_teacher(run_dir, storage)
        self.device = torch.device(device)
        self.model.to(self.device)
        self.input = TeacherInput(cfg)
        self.k = k

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels = torch.from_numpy(np.asarray(batch["image"])).to(self.device)
        logits = self.model(self.input(pixels)).float()  # fp32: replayable bit for bit
        idx, prob = topk_sparse(logits, self.k)
        return {
            "id": np.asarray(batch["id"], dtype=object),
            "seed": np.asarray(batch["aug_seed"], dtype=np.uint32),
            "idx": idx.cpu().numpy().astype(np.uint16),
            "prob": prob.cpu().numpy().astype(np.float16),
        }


def teacher_pass(cfg: RunConfig, storage: Storage, log=print) -> dict[str, Any]:
    """Writes the store ``distill.store``; returns its card."""
    from raylens.runtime.ingest import build_split

    d = cfg.distill
    if not d.store:
        raise ValueError("config key 'distill.store' is required: where to write the targets")
    dataset_card = load_card(storage, cfg.data.dataset)
    if dataset_card is None:
        raise FileNotFoundError(f"data.dataset {cfg.data.dataset!r} is not a prepared dataset")
    _, teacher_cfg, teacher_classes = load_teacher(d.teacher, storage)  # fail before Ray work
    if teacher_classes != dataset_card["classes"]:
        raise ValueError(
            f"teacher {d.teacher!r} was trained on classes {teacher_classes[:5]}..., "
            f"the dataset has {dataset_card['classes'][:5]}..."
        )
    if d.topk > len(teacher_classes):
        raise ValueError(f"config key 'distill.topk': {d.topk} > {len(teacher_classes)} classes")
    if storage.exists(join(d.store, TS.CARD)):
        storage.delete(join(d.store, TS.CARD))  # rewriting: incomplete until the card is back
    t0 = time.time()
    total_bytes, rows = 0, 0
    columns: dict[str, int] = {}
    for epoch in range(d.aug_epochs):
        ds, _ = build_split(cfg, "train", storage, train=True, epoch=epoch)
        out = ds.map_batches(
            TeacherTopK,
            fn_constructor_kwargs={
                "run_dir": d.teacher,
                "storage_cfg": cfg.storage,
                "k": d.topk,
                "device": "cuda" if d.teacher_num_gpus > 0 else "cpu",
            },
            batch_size=d.teacher_batch_size,
            batch_format="numpy",
            concurrency=d.teacher_concurrency,
            num_gpus=d.teacher_num_gpus,
        )
        parts: dict[str, list] = {"id": [], "seed": [], "idx": [], "prob": []}
        for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
            for key in parts:
                parts[key].append(batch[key])
        ids = [str(i) for i in np.concatenate(parts["id"])]
        table = TS.encode(
            ids,
            epoch,
            np.concatenate(parts["seed"]),
            np.concatenate(parts["idx"]),
            np.concatenate(parts["prob"]),
        )
        total_bytes += TS.write_epoch(storage, d.store, table)
        rows += len(ids)
        for col, size in TS.column_bytes(storage, d.store, epoch).items():
            columns[col] = columns.get(col, 0) + size
        log(
            f"[teacher] epoch {epoch + 1}/{d.aug_epochs}: {len(ids)} samples, "
            f"{time.time() - t0:.0f} s"
        )
    per_sample = {c: v / max(rows, 1) for c, v in columns.items()}
    card = {
        "format": TS.FORMAT,
        "store": d.store,
        "dataset": cfg.data.dataset,
        "dataset_fingerprint": dataset_card["fingerprint"],
        "teacher": d.teacher,
        "teacher_backbone": teacher_cfg.model.backbone,
        "classes": teacher_classes,
        "num_classes": len(teacher_classes),
        "k": d.topk,
        "epochs": d.aug_epochs,
        "seed": cfg.run.seed,
        "augmentation": {k: _plain(getattr(cfg.data, k)) for k in TS.AUG_KEYS},
        "rows_per_epoch": rows // d.aug_epochs,
        "bytes": total_bytes,
        "bytes_per_sample_epoch": {
            "without_id": sum(v for c, v in per_sample.items() if c != "id"),
            "bound": 4 + 4 * d.topk,
            "by_column": per_sample,
        },
        "seconds": round(time.time() - t0, 1),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    storage.write_text(join(d.store, TS.CARD), json.dumps(card, indent=1))
    return card


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _train_images(cfg: RunConfig, storage: Storage, ids: list[str]) -> dict[str, bytes]:
    """Image bytes of ``ids`` from the prepared train split (pyarrow, on this process)."""
    card = load_card(storage, cfg.data.dataset)
    out: dict[str, bytes] = {}
    for f in card["splits"]["train"]["files"]:
        table = pq.read_table(io.BytesIO(storage.read_bytes(join(cfg.data.dataset, f))))
        table = table.filter(pc.is_in(table.column("id"), value_set=pa.array(ids)))
        rows = table.select(["id", "image"]).to_pylist()
        out.update((r["id"], r["image"]) for r in rows)
    return out


def check_store(cfg: RunConfig, storage: Storage, log=print) -> dict[str, Any]:
    """Replays ``distill.check_samples`` samples per stored epoch; compares with the store."""
    d = cfg.distill
    card = TS.load_card(storage, d.store)
    model, teacher_cfg, _ = load_teacher(d.teacher or card["teacher"], storage)
    to_input = TeacherInput(teacher_cfg)
    all_ids = sorted(TS.read_ids(storage, d.store, 0))
    rng = np.random.default_rng(cfg.run.seed)
    ids = [
        all_ids[i]
        for i in sorted(rng.choice(len(all_ids), min(d.check_samples, len(all_ids)), replace=False))
    ]
    images = _train_images(cfg, storage, ids)
    transform = ImageTransform.from_config(cfg.data, train=True)
    mismatched, compared, abs_err, seed_errors = 0, 0, 0.0, 0
    for epoch in range(card["epochs"]):
        stored = TS.read_epoch(storage, d.store, epoch, card["k"])
        rows = stored.rows(ids)
        seeds = stored.seeds[rows].astype(np.int64)
        seed_errors += sum(
            int(s) != sample_seed(card["seed"], i, epoch) for i, s in zip(ids, seeds, strict=True)
        )
        pixels, kept, failures = decode_and_transform([images[i] for i in ids], transform, seeds)
        if failures:
            raise ValueError(f"check: {len(failures)} stored samples no longer decode")
        with torch.no_grad():
            logits = model(to_input(torch.from_numpy(pixels))).float()
        idx, prob = topk_sparse(logits, card["k"])
        mismatched += int((idx.numpy() != stored.idx[rows]).sum())
        compared += idx.numel()
        abs_err += float(np.abs(prob.numpy() - stored.prob[rows]).sum())
    result = {
        "samples": len(ids),
        "epochs": card["epochs"],
        "k": card["k"],
        "index_mismatch_rate": mismatched / max(compared, 1),
        "mean_abs_prob_error": abs_err / max(compared, 1),
        "seed_mismatches": seed_errors,
    }
    log(
        f"[check] {len(ids)} samples x {card['epochs']} epochs: index mismatch rate "
        f"{result['index_mismatch_rate']:.6f}, mean |prob error| "
        f"{result['mean_abs_prob_error']:.2e}, seeds re-derived wrong: {seed_errors}"
    )
    return result
