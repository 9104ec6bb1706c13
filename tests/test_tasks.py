"""Task losses and metrics against reference implementations (sklearn, torchvision)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from raylens.tasks.classification import ClassificationMeter, classification_loss
from raylens.tasks.geo import class_centroids, haversine_km, median_error_km
from raylens.tasks.multilabel import MultiLabelMeter, bce_loss, focal_loss
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, top_k_accuracy_score
from torchvision.ops import sigmoid_focal_loss


def _batches(n: int, c: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g) * 2
    target = torch.randint(0, c, (n,), generator=g)
    logits[torch.arange(n)[: n // 2], target[: n // 2]] += 3  # half are easy
    return logits, target


def test_classification_metrics_equal_sklearn():
    logits, target = _batches(300, 7, 0)
    meter = ClassificationMeter(7)
    for i in range(0, 300, 64):  # batches of uneven size
        meter.update(logits[i : i + 64], target[i : i + 64])
    m = meter.compute()
    y, p = target.numpy(), logits.argmax(1).numpy()
    assert m["top1"] == pytest.approx((y == p).mean())
    assert m["top5"] == pytest.approx(top_k_accuracy_score(y, logits.numpy(), k=5, labels=range(7)))
    for avg in ("macro", "weighted"):
        ref = precision_recall_fscore_support(y, p, average=avg, labels=range(7), zero_division=0)
        assert (m[f"precision_{avg}"], m[f"recall_{avg}"], m[f"f1_{avg}"]) == pytest.approx(ref[:3])
    assert m["confusion"] == confusion_matrix(y, p, labels=range(7)).tolist()


def test_classification_handles_absent_classes_and_small_k():
    meter = ClassificationMeter(4, topk=(1, 5))  # top5 of 4 classes: always a hit
    meter.update(torch.tensor([[3.0, 0, 0, 0], [0, 3.0, 0, 0]]), torch.tensor([0, 0]))
    m = meter.compute()
    assert m["top1"] == 0.5 and m["top5"] == 1.0
    # macro over the classes with samples (class 0): class 1 was predicted, never true
    ref = precision_recall_fscore_support(
        [0, 0], [0, 1], average="macro", labels=[0], zero_division=0
    )
    assert m["f1_macro"] == pytest.approx(ref[2]) == pytest.approx(2 / 3)
    assert m["absent_classes"] == [1, 2, 3]


def test_macro_metrics_cover_present_classes_and_list_absent_ones():
    """A class seen in training but with no sample in the evaluated split (the dataset
    card warns of it) is listed, not scored F1 0: a perfect model gets macro F1 1."""
    target = torch.tensor([0, 0, 1, 1, 1, 3])  # class 2: train only
    perfect = torch.nn.functional.one_hot(target, 4).float() * 5
    meter = ClassificationMeter(4)
    meter.update(perfect, target)
    m = meter.compute()
    assert m["top1"] == 1.0 and m["absent_classes"] == [2]
    assert m["f1_macro"] == m["precision_macro"] == m["recall_macro"] == 1.0
    # with mistakes: equal to sklearn's macro over the present classes, not over all 4
    logits, target = _batches(120, 4, 7)
    target[target == 2] = 0
    meter = ClassificationMeter(4)
    meter.update(logits, target)
    m = meter.compute()
    y, p = target.numpy(), logits.argmax(1).numpy()
    assert (p == 2).any()  # predicted although absent: counts against recall of true classes
    for avg, labels in (("macro", [0, 1, 3]), ("weighted", range(4))):
        ref = precision_recall_fscore_support(y, p, average=avg, labels=labels, zero_division=0)
        assert (m[f"precision_{avg}"], m[f"recall_{avg}"], m[f"f1_{avg}"]) == pytest.approx(ref[:3])
    all4 = precision_recall_fscore_support(y, p, average="macro", labels=range(4), zero_division=0)
    assert m["f1_macro"] > all4[2] + 0.1 and m["absent_classes"] == [2]


def test_meters_merge_across_workers_exactly():
    logits, target = _batches(200, 5, 1)
    whole, a, b = ClassificationMeter(5), ClassificationMeter(5), ClassificationMeter(5)
    whole.update(logits, target, loss=1.0)
    a.update(logits[:120], target[:120], loss=1.0)
    b.update(logits[120:], target[120:], loss=1.0)
    merged = ClassificationMeter(5)
    merged.load_state(a.state() + b.state())  # what all_reduce(SUM) does
    assert merged.compute() == whole.compute()

    hot = torch.nn.functional.one_hot(target, 5).float()
    whole, a, b = MultiLabelMeter(5), MultiLabelMeter(5), MultiLabelMeter(5)
    whole.update(logits, hot)
    a.update(logits[:77], hot[:77])
    b.update(logits[77:], hot[77:])
    merged = MultiLabelMeter(5)
    merged.load_state(a.state() + b.state())
    assert merged.compute() == whole.compute()


@pytest.mark.parametrize("alpha,gamma", [(0.65, 2.0), (0.25, 2.0), (0.5, 0.0), (-1.0, 1.5)])
def test_focal_loss_equals_torchvision(alpha, gamma):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 9, generator=g) * 3
    targets = (torch.rand(64, 9, generator=g) < 0.3).float()
    for reduction in ("mean", "sum", "none"):
        ours = focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction=reduction)
        ref = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction=reduction)
        assert torch.allclose(ours, ref, atol=1e-6)


def test_focal_with_gamma_zero_and_no_alpha_is_bce():
    logits, targets = torch.randn(8, 3), (torch.rand(8, 3) > 0.5).float()
    assert torch.allclose(
        focal_loss(logits, targets, alpha=-1, gamma=0.0), bce_loss(logits, targets)
    )


def test_multilabel_metrics_equal_sklearn():
    g = torch.Generator().manual_seed(5)
    targets = (
        torch.rand(150, 6, generator=g) < torch.tensor([0.5, 0.3, 0.2, 0.1, 0.05, 0.0])
    ).float()
    logits = torch.randn(150, 6, generator=g) + (targets * 2 - 1) * 1.5
    meter = MultiLabelMeter(6, threshold=0.5)
    for i in range(0, 150, 40):
        meter.update(logits[i : i + 40], targets[i : i + 40])
    m = meter.compute(class_names=list("abcdef"))
    y, p = targets.numpy().astype(int), (torch.sigmoid(logits) >= 0.5).numpy().astype(int)
    assert y[:, 5].sum() == 0 and m["absent_classes"] == [5]  # "f": no target has it
    for avg, labels in (("macro", range(5)), ("weighted", range(6))):
        ref = precision_recall_fscore_support(y, p, average=avg, labels=labels, zero_division=0)
        assert (m[f"precision_{avg}"], m[f"recall_{avg}"], m[f"f1_{avg}"]) == pytest.approx(ref[:3])
    per = precision_recall_fscore_support(y, p, average=None, zero_division=0)
    assert [m["per_class"][c]["f1"] for c in "abcdef"] == pytest.approx(per[2].tolist())
    assert m["subset_accuracy"] == pytest.approx((y == p).all(1).mean())
    assert "f" not in dict(m["best5"]) and "f" not in dict(m["worst5"])  # no support: not ranked
    assert m["best5"][0][1] >= m["best5"][-1][1] and m["worst5"][0][1] <= m["worst5"][-1][1]


def test_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    x, y = torch.randn(32, 64), torch.randint(0, 4, (32,))  # separable: 32 points in 64-d
    hot = torch.nn.functional.one_hot(y, 4).float()
    for loss_fn, target in (
        (lambda z, t: classification_loss(z, t, label_smoothing=0.1), y),
        (focal_loss, hot),
        (bce_loss, hot),
    ):
        model = torch.nn.Linear(64, 4)
        opt = torch.optim.AdamW(model.parameters(), lr=0.05)
        first = None
        for _ in range(60):
            loss = loss_fn(model(x), target)
            first = first if first is not None else loss.item()
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert loss.item() < 0.5 * first


def test_geo_error():
    # Madrid -> Barcelona ~ 505 km
    assert haversine_km(40.4168, -3.7038, 41.3874, 2.1686) == pytest.approx(505, abs=5)
    labels = np.array([0, 0, 1, 1])
    lat, lon = np.array([0.0, 0.0, 10.0, 10.0]), np.array([179.0, -179.0, 0.0, 2.0])
    cent = class_centroids(labels, lat, lon, 3)
    assert abs(abs(cent[0, 1]) - 180) < 1e-6 and np.isnan(cent[2]).all()  # antimeridian-safe
    err = median_error_km(np.array([0, 0, 1, 1]), lat, lon, cent)
    assert err == pytest.approx(haversine_km(10, 0, 10, 1), rel=0.01)
