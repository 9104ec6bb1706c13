"""Mixup / CutMix (raylens.data.mix), no Ray: the consumer-side mixer is timm's ``Mixup``
(odd batches too), the soft-target losses, and decode-time mixing per row group, which
mixes as timm would, deterministically in any process and whatever the split of units."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from raylens import config as C
from raylens.data.mix import (
    Mixer,
    apply_plan,
    build_mixer,
    decode_unit,
    plan_unit,
    timm_args,
    unit_seed,
)
from raylens.data.transforms import ImageTransform, decode_and_transform, sample_seed
from raylens.data.units import Unit, list_units, read_unit
from raylens.schema import MixConfig, RunConfig
from raylens.storage import Storage
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

from tests.sourcegen import prepare_quiet, write_folder

C_ = 5  # classes in the synthetic batches


def _cfg(*extra: str) -> RunConfig:
    return C.load(RunConfig, None, ["data.image_size=16", *extra])


def _batch(b: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 8, 8, generator=g), torch.randint(0, C_, (b,), generator=g)


def _smooth(y: torch.Tensor, s: float) -> torch.Tensor:
    return F.one_hot(y, C_).float() * (1 - s) + s / C_


# ----------------------------------------------------------------------------- consumer side


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_the_mixer_is_timm_mixup_with_the_run_settings(mode):
    cfg = _cfg("mix.mixup_alpha=0.8", "mix.cutmix_alpha=1.0", f"mix.mode={mode}",
               "mix.switch_prob=0.5", "task.label_smoothing=0.1")  # fmt: skip
    mixer = build_mixer(cfg, C_, multi_label=False)
    assert isinstance(mixer, Mixup) and mixer.mode == mode and mixer.label_smoothing == 0.1
    assert (mixer.mixup_alpha, mixer.cutmix_alpha, mixer.switch_prob) == (0.8, 1.0, 0.5)
    timm = Mixup(**timm_args(cfg.mix), label_smoothing=0.1, num_classes=C_)
    for seed in range(4):
        x, y = _batch(8, seed)
        np.random.seed(seed)
        got_x, got_t = mixer(x.clone(), y)
        np.random.seed(seed)
        want_x, want_t = timm(x.clone(), y)
        assert torch.equal(got_x, want_x) and torch.equal(got_t, want_t)
        assert not torch.equal(got_x, x) or mixer.mix_prob < 1  # it mixed


def test_single_label_targets_are_the_lambda_mix_of_smoothed_one_hots():
    mixer = build_mixer(_cfg("mix.mixup_alpha=1.0", "task.label_smoothing=0.1"), C_, False)
    x, y = _batch(6, 1)
    np.random.seed(3)
    mixed, soft = mixer(x.clone(), y)
    lam = float(((mixed - x.flip(0)) / (x - x.flip(0))).median())  # from the pixels
    assert 0 < lam < 1 and torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0), atol=1e-5)
    want = lam * _smooth(y, 0.1) + (1 - lam) * _smooth(y.flip(0), 0.1)
    assert torch.allclose(soft, want, atol=1e-5)


def test_multi_label_targets_mix_with_the_images_lambda_and_pairing():
    mixer = build_mixer(_cfg("mix.mixup_alpha=1.0", "mix.mode=elem"), C_, multi_label=True)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 3, 8, 8, generator=g)
    y = (torch.rand(6, C_, generator=g) > 0.5).float()
    np.random.seed(5)
    mixed, soft = mixer(x.clone(), y)
    assert soft.shape == (6, C_) and soft.dtype == torch.float32
    lams = set()
    for i in range(6):  # elem: row i mixes with row 5-i, each with its own lambda
        j = 5 - i
        lam = float(((mixed[i] - x[j]) / (x[i] - x[j])).median())
        assert torch.allclose(mixed[i], lam * x[i] + (1 - lam) * x[j], atol=1e-5)
        assert torch.allclose(soft[i], lam * y[i] + (1 - lam) * y[j], atol=1e-5), i
        lams.add(round(lam, 4))
    assert len(lams) == 6 and all(0 < lam < 1 for lam in lams)


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_an_odd_batch_mixes_all_but_its_last_sample(mode):
    cfg = _cfg("mix.mixup_alpha=0.8", "mix.cutmix_alpha=1.0", f"mix.mode={mode}",
               "task.label_smoothing=0.1")  # fmt: skip
    mixer = build_mixer(cfg, C_, multi_label=False)
    timm = Mixup(**timm_args(cfg.mix), label_smoothing=0.1, num_classes=C_)
    x, y = _batch(5, 7)
    np.random.seed(11)
    got_x, got_t = mixer(x.clone(), y)
    np.random.seed(11)
    want_x, want_t = timm(x[:4].clone(), y[:4])
    assert torch.equal(got_x[:4], want_x) and torch.equal(got_t[:4], want_t)
    assert torch.equal(got_x[4], x[4]) and torch.allclose(got_t[4], _smooth(y[4:], 0.1)[0])
    one_x, one_t = mixer(x[:1].clone(), y[:1])
    assert torch.equal(one_x, x[:1]) and torch.allclose(one_t, _smooth(y[:1], 0.1))


def test_no_consumer_mixer_when_mixing_is_off_or_happens_at_decode_time():
    assert build_mixer(_cfg(), C_, False) is None
    assert build_mixer(_cfg("mix.mixup_alpha=0.8", "mix.prob=0.0"), C_, False) is None
    distill = ["mix.mixup_alpha=0.8", "task.name=distill"]
    assert build_mixer(_cfg(*distill), C_, False) is None  # stored: mixed at decode time
    assert isinstance(build_mixer(_cfg(*distill, "distill.mode=online"), C_, False), Mixer)


def test_tasks_train_on_soft_targets():
    from raylens.tasks import create_task
    from raylens.tasks.multilabel import focal_loss

    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, C_, generator=g)
    soft = torch.softmax(torch.randn(4, C_, generator=g), 1)
    classify = create_task(_cfg(), C_)
    assert torch.allclose(classify.soft_loss(z, soft), SoftTargetCrossEntropy()(z, soft))
    y = torch.tensor([0, 3, 1, 4])
    assert torch.allclose(classify.soft_loss(z, F.one_hot(y, C_).float()), F.cross_entropy(z, y))
    multi = create_task(_cfg("task.name=multilabel", "task.focal_gamma=1.5"), C_)
    assert torch.allclose(multi.soft_loss(z, soft), focal_loss(z, soft, gamma=1.5))
    distill = create_task(_cfg("task.name=distill"), C_)
    assert torch.allclose(distill.soft_loss(z, soft), SoftTargetCrossEntropy()(z, soft))


def test_kd_kl_takes_the_mixed_hard_labels_of_decode_time_mixing():
    from raylens.tasks import create_task
    from raylens.tasks.distill import kd_kl, topk_sparse

    g = torch.Generator().manual_seed(4)
    z, t = torch.randn(4, C_, generator=g), torch.randn(4, C_, generator=g)
    idx, prob = topk_sparse(t, C_)
    y, y2 = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 1, 0, 2])
    lam = torch.tensor([0.7, 1.0, 0.25, 0.5])
    batch = {"teacher_idx": idx, "teacher_prob": prob, "label": y, "mix_label": y2,
             "mix_lam": lam}  # fmt: skip
    task = create_task(_cfg("task.name=distill", "distill.loss=kl", "distill.alpha=0.5"), C_)
    got = task.train_loss(z, batch, None)
    ce = lam * F.cross_entropy(z, y, reduction="none") + (1 - lam) * F.cross_entropy(
        z, y2, reduction="none"
    )
    kl = kd_kl(z, torch.softmax(t, 1), y, temperature=4.0, alpha=0.0)
    assert torch.allclose(got, kl + 0.5 * ce.mean(), atol=1e-4)
    plain = {k: v for k, v in batch.items() if not k.startswith("mix_")}
    assert torch.allclose(task.train_loss(z, plain, None), kl + 0.5 * F.cross_entropy(z, y),
                          atol=1e-4)  # fmt: skip


# ----------------------------------------------------------------------------- decode side


MIXES = {
    "batch-cutmix": MixConfig(cutmix_alpha=1.0, mode="batch"),
    "batch-mixup": MixConfig(mixup_alpha=0.8, mode="batch"),
    "pair": MixConfig(mixup_alpha=0.8, cutmix_alpha=1.0, mode="pair"),
    "elem": MixConfig(mixup_alpha=0.8, cutmix_alpha=1.0, mode="elem", prob=0.8),
    "elem-minmax": MixConfig(cutmix_minmax=(0.2, 0.8), mode="elem"),
}


@pytest.mark.parametrize("name", list(MIXES))
def test_a_unit_mixes_as_timm_mixup_on_its_permuted_rows(name):
    mix, n, size = MIXES[name], 10, 16
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)
    labels = rng.integers(0, C_, n)
    kinds = set()
    for seed in (1, 2, 3):
        plan = plan_unit(mix, n, size, seed)
        assert sorted(plan.order) == list(range(n))
        mixed, partner, lam = apply_plan(plan, pixels, np.ones(n, bool))
        order = plan.order
        timm = Mixup(**timm_args(mix), label_smoothing=0.0, num_classes=C_)
        np.random.seed(seed)
        want_x, want_t = timm(
            torch.from_numpy(pixels[order]).float(), torch.from_numpy(labels[order])
        )
        # mixup rounds to uint8 (timm's FastCollateMixup); CutMix boxes are copied exactly
        assert np.abs(mixed[order].astype(np.float32) - want_x.numpy()).max() <= 0.5 + 1e-3
        got_t = lam[:, None] * np.eye(C_)[labels] + (1 - lam[:, None]) * np.eye(C_)[labels[partner]]
        assert np.allclose(got_t[order], want_t.numpy(), atol=1e-6)
        assert plan.partner[plan.partner].tolist() == list(range(n))  # rows pair up
        assert all(p in (r, plan.partner[r]) for r, p in enumerate(partner))  # or unmixed
        kinds |= {
            "cutmix" if c else "mixup" for c, lm in zip(plan.cutmix, lam, strict=True) if lm < 1
        }
        if mix.mode != "elem":
            assert np.array_equal(lam, lam[partner])  # both members of a pair: one lambda
    assert kinds == ({"cutmix"} if "cutmix" in name or "minmax" in name else
                     {"mixup"} if "mixup" in name else {"cutmix", "mixup"})  # fmt: skip


def test_an_odd_unit_leaves_its_middle_row_unmixed_and_the_global_numpy_state_alone():
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    plan = plan_unit(MixConfig(mixup_alpha=1.0, mode="elem"), 7, 16, 9)
    assert np.array_equal(np.random.get_state()[1], before)
    mid = plan.order[3]
    assert plan.partner[mid] == mid and plan.lam[mid] == 1.0 and (plan.lam < 1).sum() == 6
    assert plan_unit(MixConfig(mixup_alpha=1.0), 0, 16, 9).order.size == 0


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A tiny prepared dataset whose train split is 5 row groups (shards of 6 rows)."""
    root = tmp_path_factory.mktemp("mix")
    storage = Storage()
    write_folder(storage, str(root / "raw"), per_class=12)
    card = prepare_quiet(storage, str(root / "raw"), str(root / "ds"), shard_rows=6)
    return storage, str(root / "ds"), card


TRANSFORM = dict(size=16, train=True, scale=(0.5, 1.0), auto_augment="rand-m9-mstd0.5-inc1",
                 reprob=0.25, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))  # fmt: skip
PAIR = MixConfig(mixup_alpha=0.8, cutmix_alpha=1.0, mode="pair")


def _digest(rows: dict) -> str:
    h = hashlib.sha256()
    for i in sorted(rows):
        r = rows[i]
        h.update(
            f"{i}|{r['mix_partner']}|{r['mix_lam']!r}|{r['mix_label']}|{r['aug_seed']}".encode()
        )
        h.update(np.ascontiguousarray(r["image"]).tobytes())
    return h.hexdigest()


def _by_id(batches) -> dict:
    rows: dict = {}
    for b in batches:
        for n, i in enumerate(b["id"]):
            assert i not in rows, f"{i} emitted twice"
            rows[str(i)] = {k: v[n] for k, v in b.items()}
    return rows


def test_decode_time_mixing_is_the_same_in_a_fresh_process_and_for_any_split_of_units(dataset):
    from raylens.runtime.ingest import DecodeUnits

    storage, ds, card = dataset
    units = list_units(storage, ds, card["splits"]["train"]["files"])
    assert len(units) >= 4 and all(u.row_group == 0 for u in units)
    udf = DecodeUnits(ds, storage.cfg, ImageTransform(**TRANSFORM), PAIR, seed=7, epoch=2,
                      batch_rows=4)  # fmt: skip
    files = np.array([u.file for u in units], dtype=object)
    groups = np.array([u.row_group for u in units])
    together = _by_id(udf({"file": files, "row_group": groups}))
    one_by_one = _by_id(b for i in range(len(units))[::-1]
                        for b in udf({"file": files[i : i + 1], "row_group": groups[i : i + 1]}))  # fmt: skip
    assert len(together) == card["splits"]["train"]["count"]
    assert _digest(together) == _digest(one_by_one)
    lams = np.array([r["mix_lam"] for r in together.values()])
    assert (lams < 1).mean() > 0.5, lams  # most rows mixed (prob 1; odd units keep one)
    for i, r in together.items():  # a pair mixes both ways, with one lambda
        p = together[str(r["mix_partner"])]
        assert str(p["mix_partner"]) == i and p["mix_lam"] == r["mix_lam"]
    script = f"""
import json, numpy as np, sys
sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parents[1])!r})
from raylens.data.mix import decode_unit
from raylens.data.units import Unit, read_unit
from raylens.data.transforms import ImageTransform
from raylens.storage import Storage
from tests.test_mix import PAIR, TRANSFORM, _by_id, _digest
out = []
for f in json.loads(sys.argv[1]):
    t = read_unit(Storage(), {ds!r}, Unit(f, 0))
    cols, _ = decode_unit(t.column("id").to_pylist(), t.column("image").to_pylist(),
        t.column("label").to_numpy(), transform=ImageTransform(**TRANSFORM), mix=PAIR,
        seed=7, epoch=2, unit=Unit(f, 0))
    out.append(cols)
print(_digest(_by_id(out)))
"""
    fresh = subprocess.run([sys.executable, "-c", script, json.dumps(list(files))],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert fresh.stdout.strip() == _digest(together)
    other_epoch = DecodeUnits(ds, storage.cfg, ImageTransform(**TRANSFORM), PAIR, seed=7, epoch=3)
    assert _digest(_by_id(other_epoch({"file": files, "row_group": groups}))) != _digest(together)


def test_a_unit_mixes_its_decoded_rows_and_a_failed_partner_leaves_a_row_unmixed(dataset):
    storage, ds, card = dataset
    unit = Unit(card["splits"]["train"]["files"][0], 0)
    table = read_unit(storage, ds, unit)
    ids, images = table.column("id").to_pylist(), table.column("image").to_pylist()
    labels = table.column("label").to_numpy()
    tf = ImageTransform(size=16, train=True, scale=(0.5, 1.0))
    mix = MixConfig(mixup_alpha=0.8, mode="elem")
    kw = dict(transform=tf, mix=mix, seed=3, epoch=0, unit=unit)
    out, failures = decode_unit(ids, images, labels, **kw)
    assert failures == [] and sorted(out["id"]) == sorted(ids)
    seeds = np.array([sample_seed(3, i, 0) for i in ids])
    plain, _, _ = decode_and_transform(images, tf, seeds)  # the unmixed augmented images
    pos = {i: n for n, i in enumerate(ids)}
    for n, i in enumerate(out["id"]):
        p, lam = out["mix_partner"][n], out["mix_lam"][n]
        assert out["aug_seed"][n] == sample_seed(3, i, 0) and out["label"][n] == labels[pos[i]]
        assert out["mix_label"][n] == labels[pos[p]]
        own, other = plain[pos[i]].astype(np.float32), plain[pos[p]].astype(np.float32)
        assert np.array_equal(out["image"][n], np.rint(own * lam + other * (1 - lam)))
    assert out["mix_lam"].dtype == np.float32 and (out["mix_lam"] < 1).sum() >= len(ids) - 1
    # a row that no longer decodes: dropped and reported, and whoever drew it stays unmixed
    bad = out["id"][0]
    victim = [
        i for i, p in zip(out["id"], out["mix_partner"], strict=True) if p == bad and i != bad
    ]
    broken = [b"not an image" if i == bad else b for i, b in zip(ids, images, strict=True)]
    out2, failures = decode_unit(ids, broken, labels, **kw)
    assert [f[0] for f in failures] == [bad] and bad not in list(out2["id"])
    row2 = {i: n for n, i in enumerate(out2["id"])}
    for i in victim:
        assert out2["mix_partner"][row2[i]] == i and out2["mix_lam"][row2[i]] == 1.0
        assert np.array_equal(out2["image"][row2[i]], plain[pos[i]])
    for n, i in enumerate(out["id"][1:], 1):  # everyone else: as before
        if i not in victim:
            assert np.array_equal(out2["image"][row2[i]], out["image"][n])
    # only= decodes just those rows and their partners: the same rows out
    few = set(list(out["id"])[2:5])
    part, _ = decode_unit(ids, images, labels, **kw, only=few)
    for n, i in enumerate(part["id"]):
        m = list(out["id"]).index(i)
        assert np.array_equal(part["image"][n], out["image"][m])
        assert part["mix_partner"][n] == out["mix_partner"][m]
    assert set(part["id"]) == few


def test_read_unit_selects_classes_before_pairing(dataset):
    storage, ds, card = dataset
    unit = Unit(card["splits"]["train"]["files"][1], 0)
    full = read_unit(storage, ds, unit)
    sub = read_unit(storage, ds, unit, remap={2: 0, 0: 1})  # data.classes = [eel, cat]
    old = full.column("label").to_numpy()
    assert sub.num_rows == int(np.isin(old, [0, 2]).sum())
    assert sub.column("id").to_pylist() == [i for i, o in zip(full.column("id").to_pylist(), old,
                                                                strict=True) if o in (0, 2)]  # fmt: skip
    assert sorted(set(sub.column("label").to_pylist())) <= [0, 1]


def test_unit_seeds_are_stable_and_distinct():
    assert unit_seed(0, 1, "train/part-00000.parquet", 0) == unit_seed(
        0, 1, "train/part-00000.parquet", 0
    )
    seeds = {unit_seed(s, e, f"train/part-{p:05d}.parquet", g)
             for s in (0, 1) for e in (0, 1) for p in (0, 1) for g in (0, 1)}  # fmt: skip
    assert len(seeds) == 16 and all(0 <= s < 2**32 for s in seeds)


def test_collate_passes_the_mix_columns_through():
    from raylens.runtime.ingest import TorchCollate

    cfg = _cfg("data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]")
    batch = {
        "id": np.array(["a", "b"], dtype=object),
        "image": np.zeros((2, 3, 16, 16), np.uint8),
        "aug_seed": np.array([1, 2]),
        "label": np.array([0, 1]),
        "mix_partner": np.array(["b", "a"], dtype=object),
        "mix_lam": np.array([0.25, 0.25], np.float32),
        "mix_label": np.array([1, 0]),
    }
    out = TorchCollate(cfg.data)(batch)
    assert out["mix_partner"] == ["b", "a"] and out["mix_label"].tolist() == [1, 0]
    assert out["mix_lam"].dtype == torch.float32 and out["mix_lam"].tolist() == [0.25, 0.25]


def test_the_student_decode_checks_stored_partners_and_lambdas(dataset, tmp_path, monkeypatch):
    """A student's unit decode re-derives the mix and refuses a store that recorded another."""
    import raylens.runtime.ingest as ingest
    from raylens.data import teacher_store as TS
    from raylens.schema import StorageConfig

    storage, ds, card = dataset
    monkeypatch.setattr(ingest, "_replay_epoch", lambda targets: 0)  # no epoch clock here
    units = list_units(storage, ds, card["splits"]["train"]["files"])
    batch = {"file": np.array([u.file for u in units], dtype=object),
             "row_group": np.array([u.row_group for u in units])}  # fmt: skip
    tf = ImageTransform(size=16, train=True, scale=(0.5, 1.0))
    teacher = _by_id(ingest.DecodeUnits(ds, storage.cfg, tf, PAIR, seed=7, epoch=0)(batch))
    ids = sorted(teacher)
    n = len(ids)
    idx = np.tile(np.arange(2), (n, 1))
    prob = np.full((n, 2), 0.5)
    seeds = [teacher[i]["aug_seed"] for i in ids]
    partners = [teacher[i]["mix_partner"] for i in ids]
    lams = np.array([teacher[i]["mix_lam"] for i in ids], np.float32)

    def student(name: str, partners=partners, lams=lams, seeds=seeds):
        store = str(tmp_path / name)
        TS.write_epoch(storage, store, TS.encode(ids, 0, seeds, idx, prob, partners, lams))
        targets = ingest.TeacherTargets("clock", store, StorageConfig(), 2, 7, 1)
        return _by_id(
            ingest.DecodeUnits(ds, storage.cfg, tf, PAIR, 7, None, targets=targets)(batch)
        )

    got = student("same")
    assert _digest(got) == _digest(teacher) and all(r["aug_epoch"] == 0 for r in got.values())
    assert all(r["teacher_idx"].tolist() == [0, 1] for r in got.values())
    other = lams.copy()
    other[3] = np.nextafter(other[3], np.float32(0))  # one lambda, one ulp off
    with pytest.raises(RuntimeError, match="stored mix partners or lambdas differ"):
        student("lam", lams=other)
    with pytest.raises(RuntimeError, match="stored mix partners or lambdas differ"):
        student("partner", partners=partners[1:] + partners[:1])
    with pytest.raises(RuntimeError, match="stored augmentation seeds differ"):
        student("seed", seeds=[s + 1 for s in seeds])
