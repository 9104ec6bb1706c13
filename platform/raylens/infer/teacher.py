"""The teacher pass of fast distillation, and its replay check.

``teacher_pass`` runs a teacher (a run dir's best checkpoint) over the train split for
``distill.aug_epochs`` augmentation epochs with Ray Data batch inference (an actor pool,
the teacher loaded once per actor) and stores each sample's top-k targets per epoch
(:mod:`raylens.data.teacher_store`). Epoch ``e`` augments sample ``id`` with the seed
``sample_seed(run.seed, id, e)``, the same seed the student's pipeline derives, so the
student sees exactly the pixels the teacher saw.

With ``mix.*`` on, the teacher scores mixed images: the train split is mixed at decode time,
per row group of the prepared dataset (:mod:`raylens.data.mix`), and the store keeps each
sample's partner and lambda, which the student re-derives and checks.

``check_store`` replays the augmentation (and mixing) of a sample subset from the seeds,
reruns the teacher and compares: index mismatch rate and mean absolute probability error,
and the partners and lambdas re-derived against the stored ones. It refuses a run whose
``data.decode_reduce*`` differ from the store's (the pixels would), and reports a
libjpeg-turbo other than the store's.
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
from raylens.data.images import decoder_version
from raylens.data.mix import decode_unit, mix_settings
from raylens.data.prepare import load_card
from raylens.data.transforms import (
    ImageTransform,
    decode_and_transform,
    sample_seed,
)
from raylens.data.units import list_units, read_unit
from raylens.preprocess import require_preprocess
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
        ids = np.asarray(batch["id"], dtype=object)
        return {
            "id": ids,
            "seed": np.asarray(batch["aug_seed"], dtype=np.uint32),
            "idx": idx.cpu().numpy().astype(np.uint16),
            "prob": prob.cpu().numpy().astype(np.float16),
            # decode-time mixing: whom each image was mixed with, and how much of it is its own
            "partner": np.asarray(batch.get("mix_partner", ids), dtype=object),
            "lam": np.asarray(batch.get("mix_lam", np.ones(len(ids))), dtype=np.float32),
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
    require_preprocess(teacher_cfg.data, what=f"teacher run {d.teacher!r}")
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
    mix = mix_settings(cfg.mix)
    for epoch in range(d.aug_epochs):
        ds, _ = build_split(
            cfg, "train", storage, train=True, epoch=epoch, mix_units=mix is not None
        )
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
        parts: dict[str, list] = {k: [] for k in ("id", "seed", "idx", "prob", "partner", "lam")}
        for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
            for key in parts:
                parts[key].append(batch[key])
        ids = [str(i) for i in np.concatenate(parts["id"])]
        mixing = {}
        if mix:  # whom each image was mixed with, and the weight of its own
            partners = [str(p) for p in np.concatenate(parts["partner"])]
            mixing = {"partners": partners, "lams": np.concatenate(parts["lam"])}
        table = TS.encode(
            ids,
            epoch,
            np.concatenate(parts["seed"]),
            np.concatenate(parts["idx"]),
            np.concatenate(parts["prob"]),
            **mixing,
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
        "decoder": decoder_version(),  # libjpeg-turbo: reduced-scale pixels depend on it
        "mix": mix,
        "rows_per_epoch": rows // d.aug_epochs,
        "bytes": total_bytes,
        "bytes_per_sample_epoch": {
            # ids (the sample's, and its partner's when mixed) are not counted
            "without_id": sum(v for c, v in per_sample.items() if c not in ("id", "partner")),
            "bound": 4 + 4 * d.topk + (4 if mix else 0),
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
    """Replays ``distill.check_samples`` samples per stored epoch; compares with the store.

    A mixed store (its card has ``mix``; ``cfg.mix`` must match it) is replayed unit by unit:
    the samples are drawn from a few seeded-random row groups (reading a row group's images
    is the cost), each re-decoded and re-mixed with only the sampled rows and their
    partners, and the re-derived partners and lambdas are compared too.
    """
    d = cfg.distill
    card = TS.load_card(storage, d.store)
    if card.get("mix") is not None or cfg.mix.enabled:
        TS.check_mix(card, mix_settings(cfg.mix))
    decoder_note = TS.check_decode(card, vars(cfg.data), decoder_version())
    if decoder_note:
        log(f"[check] {decoder_note}")
    model, teacher_cfg, _ = load_teacher(d.teacher or card["teacher"], storage)
    require_preprocess(teacher_cfg.data, what=f"teacher run {d.teacher or card['teacher']!r}")
    to_input = TeacherInput(teacher_cfg)
    transform = ImageTransform.from_config(cfg.data, train=True)
    stats = {"mismatched": 0, "compared": 0, "abs_err": 0.0, "seeds": 0, "partners": 0, "lams": 0}

    def compare(epoch: int, ids: list[str], pixels, stored, partners=None, lams=None) -> None:
        rows = stored.rows(ids)
        stats["seeds"] += sum(
            int(s) != sample_seed(card["seed"], i, epoch)
            for i, s in zip(ids, stored.seeds[rows], strict=True)
        )
        if partners is not None:
            stats["partners"] += int((stored.partners[rows] != np.asarray(partners)).sum())
            stats["lams"] += int((stored.lams[rows] != lams).sum())
        with torch.no_grad():
            logits = model(to_input(torch.from_numpy(pixels))).float()
        idx, prob = topk_sparse(logits, card["k"])
        stats["mismatched"] += int((idx.numpy() != stored.idx[rows]).sum())
        stats["compared"] += idx.numel()
        stats["abs_err"] += float(np.abs(prob.numpy() - stored.prob[rows]).sum())

    if card.get("mix") is None:
        ids = _sample_ids(sorted(TS.read_ids(storage, d.store, 0)), d.check_samples, cfg.run.seed)
        images = _train_images(cfg, storage, ids)
        for epoch in range(card["epochs"]):
            stored = TS.read_epoch(storage, d.store, epoch, card["k"], ids=ids)
            seeds = stored.seeds[stored.rows(ids)].astype(np.int64)
            pixels, _, failures = decode_and_transform([images[i] for i in ids], transform, seeds)
            if failures:
                raise ValueError(f"check: {len(failures)} stored samples no longer decode")
            compare(epoch, ids, pixels, stored)
    else:
        ids = _check_mixed(cfg, storage, card, transform, compare)
    compared = max(stats["compared"], 1)
    result = {
        "samples": len(ids),
        "epochs": card["epochs"],
        "k": card["k"],
        "index_mismatch_rate": stats["mismatched"] / compared,
        "mean_abs_prob_error": stats["abs_err"] / compared,
        "seed_mismatches": stats["seeds"],
        "mixed": card.get("mix") is not None,
        "partner_mismatches": stats["partners"],
        "lam_mismatches": stats["lams"],
        "decoder_note": decoder_note,
    }
    log(
        f"[check] {len(ids)} samples x {card['epochs']} epochs: index mismatch rate "
        f"{result['index_mismatch_rate']:.6f}, mean |prob error| "
        f"{result['mean_abs_prob_error']:.2e}, seeds re-derived wrong: {stats['seeds']}"
        + (
            f", mix partners wrong: {stats['partners']}, lambdas wrong: {stats['lams']}"
            if result["mixed"]
            else ""
        )
    )
    return result


def _sample_ids(ids: list[str], n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [ids[i] for i in sorted(rng.choice(len(ids), min(n, len(ids)), replace=False))]


CHECK_PER_UNIT = 64  # samples checked per row group read (a row group's images are read whole)


def _check_mixed(cfg: RunConfig, storage: Storage, card: dict, transform, compare) -> list[str]:
    """Replays the samples of a mixed store from seeded-random row groups; returns the ids."""
    from raylens.runtime.ingest import DatasetInfo

    d, dataset = cfg.distill, cfg.data.dataset
    dataset_card = load_card(storage, dataset)
    remap = None
    if cfg.data.classes:
        _, remap = DatasetInfo.from_card(dataset_card).select(list(cfg.data.classes))
    units = list_units(storage, dataset, dataset_card["splits"]["train"]["files"])
    in_store = TS.read_ids(storage, d.store, 0)
    rng = np.random.default_rng(cfg.run.seed)
    chosen: list[tuple[Any, list[str]]] = []
    total = 0
    for u in rng.permutation(len(units)):
        if total >= d.check_samples:
            break
        unit_ids = read_unit(storage, dataset, units[u], ("id", "label"), remap).column("id")
        present = [i for i in unit_ids.to_pylist() if i in in_store]
        take = min(CHECK_PER_UNIT, d.check_samples - total, len(present))
        picked = _sample_ids(present, take, int(rng.integers(2**31)))
        if picked:
            chosen.append((units[u], picked))
            total += len(picked)
    ids = [i for _, picked in chosen for i in picked]
    stored = [TS.read_epoch(storage, d.store, e, card["k"], ids=ids) for e in range(card["epochs"])]
    mix = cfg.mix
    for unit, picked in chosen:
        table = read_unit(storage, dataset, unit, remap=remap)
        for epoch in range(card["epochs"]):
            out, failures = decode_unit(
                table.column("id").to_pylist(),
                table.column("image").to_pylist(),
                table.column("label").to_numpy(),
                transform=transform,
                mix=mix,
                seed=card["seed"],
                epoch=epoch,
                unit=unit,
                only=set(picked),
            )
            if len(out["id"]) != len(picked):
                raise ValueError(f"check: {len(picked) - len(out['id'])} stored samples no "
                                 f"longer decode ({failures[:3]})")  # fmt: skip
            compare(
                epoch,
                [str(i) for i in out["id"]],
                out["image"],
                stored[epoch],
                out["mix_partner"],
                out["mix_lam"],
            )
    return ids
