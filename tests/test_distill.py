"""Distillation, pure parts: sparse targets, the two losses, the top-k store format."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from raylens.data import teacher_store as TS
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
        (_card(k=3), {}, "'distill.topk': 5, but s keeps k=3"),
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
