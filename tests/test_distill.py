"""Distillation, pure parts: sparse targets, the two losses, the top-k store format."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from raylens.data import teacher_store as TS
from raylens.data.images import decoder_version
from raylens.storage import Storage
from raylens.tasks.distill import dense_from_topk, kd_kl, soft_target_ce, temper, topk_sparse


def test_dense_from_topk_keeps_the_topk_and_spreads_the_rest_uniformly():
    logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    idx, prob = topk_sparse(logits, 3)
    dense = dense_from_topk(idx, prob, 10)
    assert torch.allclose(dense.sum(1), torch.ones(6))
    assert torch.equal(idx, torch.softmax(logits, 1).topk(3).indices)
    assert torch.allclose(torch.gather(dense, 1, idx), prob / dense.sum(1, keepdim=True) * 1)
    others = torch.ones(6, 10, dtype=torch.bool).scatter_(1, idx, False)
    rest = dense[others].view(6, 7)
    assert torch.allclose(rest, rest[:, :1].expand(-1, 7))  # uniform over the 7 others
    assert torch.allclose(rest[:, 0] * 7, 1 - prob.sum(1), atol=1e-6)
    full_idx, full_prob = topk_sparse(logits, 10)  # k = C: the distribution itself
    assert torch.allclose(
        dense_from_topk(full_idx, full_prob, 10), torch.softmax(logits, 1), atol=1e-3
    )


def test_topk_ties_are_broken_by_class_index():
    idx, prob = topk_sparse(torch.tensor([[0.0, 1.0, 1.0, 0.0]]), 3)
    assert idx.tolist() == [[1, 2, 0]] and prob[0, 0] == prob[0, 1]


def test_soft_target_ce_is_cross_entropy_with_probability_targets():
    g = torch.Generator().manual_seed(1)
    logits, target = (
        torch.randn(5, 7, generator=g),
        torch.softmax(torch.randn(5, 7, generator=g), 1),
    )
    assert torch.allclose(soft_target_ce(logits, target), F.cross_entropy(logits, target))
    onehot = F.one_hot(torch.arange(5), 7).float()
    assert torch.allclose(soft_target_ce(logits, onehot), F.cross_entropy(logits, torch.arange(5)))


def test_kd_kl_matches_hinton_on_teacher_logits():
    g = torch.Generator().manual_seed(2)
    s, t, y = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g), torch.arange(4)
    T, a = 3.0, 0.4
    expected = T * T * F.kl_div(
        F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction="batchmean"
    ) + a * F.cross_entropy(s, y)
    got = kd_kl(s, torch.softmax(t, 1), y, temperature=T, alpha=a)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(temper(torch.softmax(t, 1), T), torch.softmax(t / T, 1), atol=1e-6)


def test_store_round_trip_and_its_size_bound(tmp_path):
    storage, store, k, n = Storage(), str(tmp_path / "store"), 5, 2000
    rng = np.random.default_rng(0)
    ids = [f"train-{i:05d}" for i in range(n)]
    seeds = rng.integers(0, 2**32, n, dtype=np.uint64)
    logits = torch.from_numpy(rng.normal(size=(n, 10)).astype(np.float32))
    idx, prob = topk_sparse(logits, k)
    TS.write_epoch(storage, store, TS.encode(ids, 3, seeds, idx.numpy(), prob.numpy()))
    got = TS.read_epoch(storage, store, 3, k)
    rows = got.rows(ids[::-1])
    assert list(got.ids[rows]) == ids[::-1]
    assert np.array_equal(got.seeds[rows][::-1], seeds.astype(np.uint32))
    assert np.array_equal(got.idx[rows][::-1], idx.numpy())
    assert np.allclose(got.prob[rows][::-1], prob.numpy())  # float16 values, exactly
    sizes = TS.column_bytes(storage, store, 3)
    per_sample = sum(v for c, v in sizes.items() if c != "id") / n
    assert per_sample <= 1.1 * (4 + 4 * k), sizes
    with pytest.raises(KeyError, match="no targets for sample 'nope'"):
        got.rows(["nope"])


def _card(**kw):
    card = {
        "format": TS.FORMAT, "store": "s", "dataset_fingerprint": "abc", "k": 5,
        "num_classes": 10, "epochs": 4, "seed": 0,
        "augmentation": {"image_size": 28, "rrc_scale": [0.8, 1.0], "rrc_ratio": [0.9, 1.1],
                         "hflip": 0.5, "augment": True},
    }  # fmt: skip
    card.update(kw)
    return card


@pytest.mark.parametrize(
    "card,kw,message",
    [
        (_card(dataset_fingerprint="old"), {}, "another version of the dataset"),
        (_card(k=3), {}, "'distill.topk': 5, but s keeps only k=3"),
        (_card(num_classes=9), {}, "9 classes, the student's head 10"),
        (_card(epochs=2), {}, "'distill.aug_epochs': 4, but s holds 2"),
        (_card(), {"data": {"image_size": 32}}, "'data.image_size': 32, but s was made with 28"),
    ],
)
def test_a_store_that_does_not_fit_the_student_is_named(card, kw, message):
    args = dict(
        dataset_card={"fingerprint": "abc"},
        data={"image_size": 28, "rrc_scale": (0.8, 1.0), "rrc_ratio": (0.9, 1.1), "hflip": 0.5,
              "augment": True},
        topk=5, num_classes=10, seed=0, aug_epochs=4,
    )  # fmt: skip
    args["data"] = {**args["data"], **kw.get("data", {})}
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        TS.check_compatible(card, **args)
    TS.check_compatible(_card(), **{**args, "data": {**args["data"], "image_size": 28}})
    TS.check_compatible(_card(k=8), **{**args, "data": {**args["data"], "image_size": 28}})


def test_check_replays_reduced_jpeg_decodes_without_a_mismatch(tmp_path):
    """jobs.teacher_logits --check (check_store, no Ray) on a store whose teacher saw JPEGs
    decoded at reduced scale (1600x1200 photos, 64 px crops): the replay decodes at the same
    scales, so the targets match exactly; a check that decodes otherwise is refused."""
    import json

    import pyarrow.parquet as pq
    from raylens import config as C
    from raylens.checkpoint import save_checkpoint
    from raylens.data.images import open_image
    from raylens.data.transforms import ImageTransform, decode_and_transform, sample_seed
    from raylens.infer.teacher import TeacherTopK, check_store
    from raylens.models.classifier import build_model
    from raylens.schema import RunConfig
    from raylens.storage import join
    from raylens.tasks.distill import TeacherInput

    from tests.imagegen import encode, photo
    from tests.sourcegen import prepare_quiet

    storage, classes, jpegs = Storage(), ["cat", "dog", "eel"], []
    for c, name in enumerate(classes):
        for i in range(4):
            size = (1600, 1200) if i % 2 else (1200, 1600)
            jpegs.append(encode(photo(*size, seed=10 * c + i), "JPEG", quality=90))
            storage.write_bytes(str(tmp_path / "raw" / name / f"{i}.jpg"), jpegs[-1])
    card = prepare_quiet(storage, str(tmp_path / "raw"), str(tmp_path / "ds"))
    teacher, store = str(tmp_path / "teacher"), str(tmp_path / "store")
    stats = ["data.mean=[0.5,0.45,0.4]", "data.std=[0.25,0.25,0.25]", "data.eval_crop_pct=0.875"]
    tcfg = C.load(RunConfig, None, ["model.backbone=vgg_s16", "data.image_size=64", *stats])
    torch.manual_seed(0)
    model = build_model(tcfg.model, len(classes))
    # A teacher whose outputs follow its input (a fresh one's barely do): BatchNorm statistics
    # of these photos, a sharper head.
    pixels, _, _ = decode_and_transform(jpegs, ImageTransform(64, train=False), None)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average
    with torch.no_grad():
        model.train()(TeacherInput(tcfg)(torch.from_numpy(pixels)))
        model.head[-1].weight.mul_(10.0)
    weights = model.state_dict()
    save_checkpoint(storage, join(teacher, "checkpoints/epoch=1"), model=weights, extra={})
    storage.write_text(join(teacher, "config.yaml"), C.to_yaml(tcfg))
    storage.write_text(join(teacher, "labels.json"), json.dumps({"classes": classes}))
    best = {"epoch": 1, "checkpoint": "checkpoints/epoch=1", "metrics": {}}
    storage.write_text(join(teacher, "best.json"), json.dumps(best))

    def cfg_with(*extra):
        return C.load(RunConfig, None, [
            f"data.dataset={tmp_path / 'ds'}", "data.image_size=64", *stats,
            f"distill.teacher={teacher}", f"distill.store={store}", "distill.aug_epochs=2",
            "distill.topk=2", "distill.check_samples=6", "task.name=distill", *extra])  # fmt: skip

    # the teacher pass's decode and targets, one image per batch (the check batches them all)
    cfg = cfg_with()
    transform = ImageTransform.from_config(cfg.data, train=True)
    rows = [r for f in card["splits"]["train"]["files"]
            for r in pq.read_table(tmp_path / "ds" / f, columns=["id", "image"]).to_pylist()]  # fmt: skip
    topk = TeacherTopK(teacher, cfg.storage, k=2)
    picked = []
    for epoch in range(2):
        seeds = np.array([sample_seed(cfg.run.seed, r["id"], epoch) for r in rows])
        for r, seed in zip(rows, seeds, strict=True):
            box, _ = transform.crop_box(*open_image(r["image"], 10**8).size, seed)
            picked.append(transform.reduction("JPEG", box))
        parts = []
        for r, seed in zip(rows, seeds, strict=True):
            pixels, _, _ = decode_and_transform([r["image"]], transform, np.array([seed]))
            parts.append(topk({"id": np.array([r["id"]], dtype=object), "image": pixels,
                               "aug_seed": np.array([seed])}))  # fmt: skip
        cat = {k: np.concatenate([p[k] for p in parts]) for k in ("id", "seed", "idx", "prob")}
        TS.write_epoch(storage, store, TS.encode([str(i) for i in cat["id"]], epoch, cat["seed"],
                                                 cat["idx"], cat["prob"]))  # fmt: skip
    assert max(picked) > 1, picked  # the teacher pass did decode at reduced scale
    augmentation = {k: _listed(getattr(cfg.data, k)) for k in TS.AUG_KEYS}
    store_card = {"format": TS.FORMAT, "store": store, "teacher": teacher, "k": 2, "epochs": 2,
                  "seed": cfg.run.seed, "mix": None, "augmentation": augmentation,
                  "decoder": decoder_version()}  # fmt: skip
    storage.write_text(join(store, TS.CARD), json.dumps(store_card))

    report = check_store(cfg, storage, log=lambda m: None)
    assert report["samples"] == 6 and report["epochs"] == 2 and report["seed_mismatches"] == 0
    assert report["index_mismatch_rate"] == 0.0 and report["mean_abs_prob_error"] < 1e-4
    assert report["decoder_note"] is None
    with pytest.raises(ValueError, match="'data.decode_reduce': False, but .* made with True"):
        check_store(cfg_with("data.decode_reduce=false"), storage, log=lambda m: None)
    with pytest.raises(ValueError, match="'data.decode_reduce_gap': 2.0, but .* made with 1.0"):
        check_store(cfg_with("data.decode_reduce_gap=2.0"), storage, log=lambda m: None)
    # the check sees decoding differences: a card claiming full decodes, checked with full
    # decodes, finds the teacher's probabilities off (0.0 above, ~1e-3 here)
    full = {**store_card, "augmentation": {**augmentation, "decode_reduce": False}}
    storage.write_text(join(store, TS.CARD), json.dumps(full))
    other = check_store(cfg_with("data.decode_reduce=false"), storage, log=lambda m: None)
    assert other["mean_abs_prob_error"] > 3e-4, other


# ----------------------------------------------------------------------------- on Ray


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A tiny prepared dataset and a teacher trained on it by finetune (vgg_s16, 16 px)."""
    from raylens import config as C
    from raylens.schema import RunConfig
    from raylens.train import finetune

    from tests.sourcegen import prepare_quiet, write_folder

    root = tmp_path_factory.mktemp("distill")
    storage = Storage()
    write_folder(storage, str(root / "raw"), per_class=30)
    prepare_quiet(storage, str(root / "raw"), str(root / "ds"))
    base = [
        f"data.dataset={root / 'ds'}", "data.image_size=16", "data.batch_size=8",
        "data.rrc_scale=[0.6,1.0]", f"run.output_dir={root / 'runs'}", "train.lr=0.005",
        "train.warmup_epochs=0.5", "ray.num_workers=1",
    ]  # fmt: skip
    import ray

    if not ray.is_initialized():
        pytest.skip("needs the ray_session fixture")
    out = finetune(C.load(RunConfig, None, [*base, "run.name=teacher", "model.backbone=vgg_s16",
                                            "train.epochs=2"]))  # fmt: skip
    return root, base, out["run_dir"]


def _distill_cfg(base, teacher, store, *extra):
    from raylens import config as C
    from raylens.schema import RunConfig

    return C.load(
        RunConfig,
        None,
        [*base, "model.backbone=vgg_s16", f"distill.teacher={teacher}", f"distill.store={store}",
         "distill.aug_epochs=2", "distill.topk=2", "task.name=distill", *extra],
    )  # fmt: skip


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_teacher_pass_check_replay_and_stored_distillation(ray_session, teacher_run):
    import json
    from pathlib import Path

    from raylens.infer.teacher import check_store, teacher_pass
    from raylens.train import finetune

    root, base, teacher = teacher_run
    storage, store = Storage(), str(root / "store")
    cfg = _distill_cfg(base, teacher, store, "run.name=student")
    card = teacher_pass(cfg, storage, log=lambda m: None)
    assert card["epochs"] == 2 and card["k"] == 2 and card["rows_per_epoch"] == 72
    b = card["bytes_per_sample_epoch"]
    assert b["without_id"] <= 1.1 * b["bound"] == 1.1 * 12, b
    # epochs differ (fresh augmentation per epoch), and every seed is re-derivable
    e0, e1 = (TS.read_epoch(storage, store, e, 2) for e in (0, 1))
    assert list(e0.ids) == list(e1.ids) and (e0.seeds != e1.seeds).mean() > 0.9
    report = check_store(_distill_cfg(base, teacher, store, "distill.check_samples=40"),
                         storage, log=lambda m: None)  # fmt: skip
    assert report["samples"] == 40 and report["seed_mismatches"] == 0
    assert report["index_mismatch_rate"] == 0.0 and report["mean_abs_prob_error"] < 1e-3
    # a student with k' < k reads the first k' columns (the store keeps top-k highest first)
    import ray
    from raylens.rundir import absolute_paths
    from raylens.runtime.ingest import build_split
    from raylens.train.images import distill_setup

    k1 = absolute_paths(_distill_cfg(base, teacher, store, "run.name=k1", "distill.topk=1"))
    _, info = build_split(k1, "train", storage)
    targets, clock = distill_setup(k1, info, storage)
    ray.get(clock.set.remote(1))
    ds, _ = build_split(k1, "train", storage, targets=targets)
    rows = ds.take_all()
    pos = {i: n for n, i in enumerate(e1.ids)}
    assert len(rows) == 72 and all(r["teacher_idx"].shape == (1,) for r in rows)
    for r in rows:  # epoch 1 replays stored epoch 1: its top-1, class and probability
        assert r["aug_epoch"] == 1 and r["teacher_idx"][0] == e1.idx[pos[r["id"]], 0], r["id"]
        assert r["teacher_prob"][0] == pytest.approx(e1.prob[pos[r["id"]], 0]), r["id"]
    del clock
    # the student: 3 epochs over 2 stored ones (epoch 2 replays stored epoch 0)
    out = finetune(_distill_cfg(base, teacher, store, "run.name=student", "train.epochs=3"))  # fmt: skip
    rows = [json.loads(x) for x in Path(out["run_dir"], "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[-1]["val/top1"] >= 0.8, rows
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
    assert "distilled (stored, soft_ce, k=2)" in Path(out["report"]).read_text()


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_online_distillation_and_bad_stores_fail_before_training(
    ray_session, teacher_run, monkeypatch
):
    import raylens.train.images as R
    from raylens.infer.teacher import teacher_pass
    from raylens.train import finetune

    root, base, teacher = teacher_run
    storage, store = Storage(), str(root / "store-bad")
    out = finetune(_distill_cfg(base, teacher, store, "run.name=online", "distill.mode=online",
                                "train.epochs=1", "distill.loss=kl"))  # fmt: skip
    assert out["test"]["count"] == 9
    teacher_pass(_distill_cfg(base, teacher, store, "run.name=x"), storage, log=lambda m: None)
    monkeypatch.setattr(R, "build_trainer", lambda *a, **k: pytest.fail("trainer started"))
    with pytest.raises(ValueError, match="'distill.topk': 3, but .* keeps only k=2"):
        finetune(_distill_cfg(base, teacher, store, "run.name=x", "distill.topk=3"))
    # a store that misses some train ids
    t = TS.read_epoch(storage, store, 1, 2)
    keep = slice(5, None)
    TS.write_epoch(storage, store, TS.encode(list(t.ids[keep]), 1, t.seeds[keep], t.idx[keep],
                                             t.prob[keep]))  # fmt: skip
    with pytest.raises(ValueError, match="does not cover the dataset: epoch 1 lacks 5 of 72"):
        finetune(_distill_cfg(base, teacher, store, "run.name=x"))
    # the dataset changed since the store was written (another version)
    from tests.sourcegen import prepare_quiet

    prepare_quiet(storage, str(root / "raw"), str(root / "ds"), train_fraction=0.7,
                  val_fraction=0.2)  # fmt: skip
    with pytest.raises(ValueError, match="another version of the dataset"):
        finetune(_distill_cfg(base, teacher, store, "run.name=x"))


# ----------------------------------------------------------------------------- mixing (format 2)


def test_store_format_2_keeps_partners_and_lambdas_and_format_1_reads_as_unmixed(tmp_path):
    import pyarrow.parquet as pq

    storage, store = Storage(), str(tmp_path / "store")
    ids, n = ["a", "b", "c", "d"], 4
    idx, prob = topk_sparse(torch.randn(n, 6, generator=torch.Generator().manual_seed(0)), 2)
    lams = np.array([0.25, 0.25, 1.0, 0.6], np.float32)
    table = TS.encode(ids, 0, np.arange(n), idx.numpy(), prob.numpy(), ["b", "a", "c", "a"], lams)
    assert table.column("partner").to_pylist() == ["b", "a", None, "a"]  # unmixed: null
    TS.write_epoch(storage, store, table)
    got = TS.read_epoch(storage, store, 0, 2)
    assert list(got.partners) == ["b", "a", "c", "a"] and np.array_equal(got.lams, lams)
    some = TS.read_epoch(storage, store, 0, 2, ids=["d", "b"])
    assert list(some.ids) == ["b", "d"] and list(some.partners) == ["a", "a"]
    v1 = table.drop_columns(["partner", "lam"])  # what format 1 wrote
    pq.write_table(v1, TS.epoch_file(store, 0))
    old = TS.read_epoch(storage, store, 0, 2)
    assert list(old.partners) == ids and old.lams.tolist() == [1.0] * n
    plain = TS.encode(ids, 0, np.arange(n), idx.numpy(), prob.numpy())  # not mixed
    assert plain.column_names == v1.column_names  # not mixed: no partner/lam columns


MIX = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "cutmix_minmax": None, "prob": 1.0,
       "switch_prob": 0.5, "mode": "pair"}  # fmt: skip
DATA = {"image_size": 28, "rrc_scale": (0.8, 1.0), "rrc_ratio": (0.9, 1.1), "hflip": 0.5,
        "augment": True, "interpolation": "bicubic", "auto_augment": "rand-m9-n2",
        "color_jitter": None, "reprob": 0.25, "remode": "pixel", "recount": 1,
        "mean": (0.286,) * 3, "std": (0.353,) * 3, "decode_reduce": True,
        "decode_reduce_gap": 2.0}  # fmt: skip


@pytest.mark.parametrize(
    "card,kw,message",
    [
        ({"mix": None}, {}, "'mix': this run mixes, but s was made without mixing"),
        ({}, {"mix": None}, "'mix': this run does not mix, but s was made with mix"),
        ({}, {"mix": {**MIX, "mode": "elem"}}, "'mix.mode': 'elem', but s was made with 'pair'"),
        ({}, {"mix": {**MIX, "cutmix_minmax": [0.2, 0.8]}}, "'mix.cutmix_minmax': \\[0.2, 0.8\\]"),
        ({}, {"data": {"auto_augment": None}}, "'data.auto_augment': None, but s was made with"),
        ({}, {"data": {"reprob": 0.0}}, "'data.reprob': 0.0, but s was made with 0.25"),
        ({}, {"data": {"interpolation": "bilinear"}}, "'data.interpolation': 'bilinear'"),
        # RandAugment's fill colour and erasing's fills depend on the statistics
        ({}, {"data": {"mean": (0.5,) * 3}}, "'data.mean': \\(0.5, 0.5, 0.5\\), but s was made"),
        ({"format": "raylens.teacher_topk/0"}, {}, "format 'raylens.teacher_topk/0', expected"),
        # reduced-scale JPEG decoding changes pixels: the student must decode as the teacher
        ({}, {"data": {"decode_reduce": False}}, "'data.decode_reduce': False, but s was made "
                                                 "with True"),
        ({}, {"data": {"decode_reduce_gap": 1.0}}, "'data.decode_reduce_gap': 1.0, but s was "
                                                   "made with 2.0"),
    ],
)  # fmt: skip
def test_a_store_whose_mix_or_augmentation_differs_is_named(card, kw, message):
    full = _card(mix=MIX, augmentation={k: list(v) if isinstance(v, tuple) else v
                                        for k, v in DATA.items()},
                 decoder=decoder_version())  # fmt: skip
    args = dict(dataset_card={"fingerprint": "abc"}, data=DATA, topk=5, num_classes=10, seed=0,
                aug_epochs=4, mix=MIX)  # fmt: skip
    TS.check_compatible(full, **args)
    with pytest.raises(ValueError, match=message):
        TS.check_compatible(
            {**full, **card}, **{**args, **kw, "data": {**DATA, **kw.get("data", {})}}
        )


def test_a_format_1_store_fits_a_student_with_the_augmentation_it_had():
    v1 = _card(format="raylens.teacher_topk/1")  # no mix, none of the newer augmentation keys
    args = dict(dataset_card={"fingerprint": "abc"}, topk=5, num_classes=10, seed=0, aug_epochs=4)
    old = {**DATA, "rrc_scale": (0.8, 1.0), "rrc_ratio": (0.9, 1.1), "auto_augment": None,
           "reprob": 0.0, "decode_reduce": False}  # fmt: skip
    for interpolation in (None, "bilinear"):  # null resizes bilinearly, as format 1 did
        TS.check_compatible(v1, data={**old, "interpolation": interpolation}, **args)
    # without RandAugment or erasing the statistics shape no pixels: not compared
    TS.check_compatible(v1, data={**old, "interpolation": None, "mean": (0.5,) * 3}, **args)
    with pytest.raises(ValueError, match="'data.interpolation': 'bicubic', but s was made"):
        TS.check_compatible(v1, data={**old, "interpolation": "bicubic"}, **args)
    with pytest.raises(ValueError, match="'data.auto_augment': 'rand-m9-n2', but s was made"):
        TS.check_compatible(v1, data={**old, "interpolation": None, "auto_augment": "rand-m9-n2"},
                            **args)  # fmt: skip
    with pytest.raises(ValueError, match="'mix': this run mixes"):
        TS.check_compatible(v1, data={**old, "interpolation": None}, mix=MIX, **args)


def test_a_store_from_before_reduced_decoding_fits_full_decoding_only_and_builds_are_flagged():
    """A card without data.decode_reduce* was made decoding in full; the libjpeg-turbo a
    reducing store was decoded with is compared, and a different one is warned about."""
    args = dict(dataset_card={"fingerprint": "abc"}, topk=5, num_classes=10, seed=0, aug_epochs=4,
                mix=MIX)  # fmt: skip
    before = {k: v for k, v in DATA.items() if not k.startswith("decode_reduce")}
    card = _card(mix=MIX, augmentation={k: _listed(v) for k, v in before.items()})
    off = {**DATA, "decode_reduce": False}
    TS.check_compatible(card, data=off, **args)
    TS.check_compatible(card, data={**off, "decode_reduce_gap": 1.0}, **args)  # unused: off
    with pytest.raises(ValueError, match="'data.decode_reduce': True, but s was made with False"):
        TS.check_compatible(card, data=DATA, **args)
    reducing = _card(mix=MIX, augmentation={k: _listed(v) for k, v in DATA.items()},
                     decoder="0.0.1")  # fmt: skip
    with pytest.warns(UserWarning, match="decoded with libjpeg-turbo 0.0.1, this process has"):
        TS.check_compatible(reducing, data=DATA, **args)
    same = {**reducing, "decoder": decoder_version()}
    assert TS.check_decode(same, DATA, decoder_version()) is None


def _listed(v):
    return list(v) if isinstance(v, tuple) else v


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_mixed_teacher_pass_replays_exactly_for_the_check_and_one_or_two_workers(
    ray_session, teacher_run
):
    """Decode-time mixing end to end: the teacher pass stores targets of mixed (and
    RandAugment-ed, erased) images, check_store re-derives them exactly, and the student's
    decode, split over 1 or 2 consumers as Ray Train splits it, yields the very pixels,
    partners and lambdas the teacher saw; then a 2-worker student trains on them."""
    from concurrent.futures import ThreadPoolExecutor

    import ray
    from raylens.infer.teacher import check_store, teacher_pass
    from raylens.preprocess import resolve_preprocess
    from raylens.rundir import absolute_paths
    from raylens.runtime.ingest import build_split
    from raylens.train import finetune
    from raylens.train.images import distill_setup

    from tests.sourcegen import prepare_quiet

    root, base, teacher = teacher_run
    storage, store = Storage(), str(root / "store-mixed")
    units_ds = str(root / "ds-units")  # the same images, train split in row groups of <= 16
    prepare_quiet(storage, str(root / "raw"), units_ds, shard_rows=16)
    mixed = [f"data.dataset={units_ds}", "mix.mixup_alpha=0.8", "mix.cutmix_alpha=1.0",
             "mix.mode=pair", "data.auto_augment=rand-m9-n2", "data.reprob=0.25",
             "distill.check_samples=40"]  # fmt: skip

    def config(*extra):  # resolved as jobs.teacher_logits and jobs.distill resolve it
        cfg = absolute_paths(_distill_cfg(base, teacher, store, *mixed, *extra))
        return resolve_preprocess(cfg, storage)

    cfg = config("run.name=mixed-student")
    card = teacher_pass(cfg, storage, log=lambda m: None)
    assert card["format"] == TS.FORMAT and card["mix"]["mode"] == "pair"
    assert card["augmentation"]["auto_augment"] == "rand-m9-n2" and card["rows_per_epoch"] == 72
    e1 = TS.read_epoch(storage, store, 1, 2)
    assert (e1.lams < 1).mean() > 0.8 and (e1.partners != e1.ids).mean() > 0.8
    report = check_store(cfg, storage, log=lambda m: None)
    assert report["mixed"] and report["samples"] == 40 and report["seed_mismatches"] == 0
    assert report["partner_mismatches"] == 0 and report["lam_mismatches"] == 0
    assert report["index_mismatch_rate"] == 0.0 and report["mean_abs_prob_error"] < 1e-3
    # what the teacher saw in epoch 1 (teacher_pass's own split), matching the store
    seen_ds, info = build_split(cfg, "train", storage, epoch=1, mix_units=True)
    seen = {r["id"]: r for r in seen_ds.take_all()}
    pos = {i: n for n, i in enumerate(e1.ids)}
    assert len(seen) == 72
    for i, r in seen.items():
        assert r["mix_partner"] == e1.partners[pos[i]] and r["mix_lam"] == e1.lams[pos[i]], i
    # the student at train epoch 3 replays stored epoch 1, split over 1 or 2 consumers
    targets, clock = distill_setup(cfg, info, storage)
    ray.get(clock.set.remote(3))
    student, _ = build_split(cfg, "train", storage, targets=targets)
    for workers in (1, 2):
        shards = student.streaming_split(workers)
        with ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(
                lambda it: list(it.iter_batches(batch_size=8, batch_format="numpy")), shards
            ))  # fmt: skip
        rows = [(b, n) for part in parts for b in part for n in range(len(b["id"]))]
        assert sorted(b["id"][n] for b, n in rows) == sorted(seen), workers
        for b, n in rows:
            r = seen[b["id"][n]]
            assert np.array_equal(b["image"][n], r["image"]), (workers, b["id"][n])
            assert b["mix_partner"][n] == r["mix_partner"] and b["mix_lam"][n] == r["mix_lam"]
            assert b["mix_label"][n] == r["mix_label"] and b["aug_epoch"][n] == 1
            assert b["teacher_idx"][n].tolist() == e1.idx[pos[b["id"][n]]].tolist()
        assert all(len(p) for p in parts) or workers == 1  # both consumers got rows
    del clock
    # a 2-worker student trains on the mixed store (kd_kl: CE on the mixed hard labels)
    out = finetune(config("run.name=mixed-student", "train.epochs=1", "ray.num_workers=2",
                          "distill.loss=kl"))  # fmt: skip
    assert out["best"] is not None and out["test"]["count"] == 9
