"""The training loop on tiny models and synthetic data, with exact expectations."""

from __future__ import annotations

import copy

import pytest
import torch
from raylens.schema import TaskConfig, TrainConfig
from raylens.train.loop import Hooks, fit, make_task, warmup_cosine
from torch import nn

DEV = torch.device("cpu")


def _data(n=256, c=4, seed=0, multilabel=False):
    centers = torch.randn(c, 3, 4, 4, generator=torch.Generator().manual_seed(42)) * 2
    g = torch.Generator().manual_seed(seed)  # samples vary with the seed, classes don't
    y = torch.randint(0, c, (n,), generator=g)
    x = centers[y] + torch.randn(n, 3, 4, 4, generator=g) * 0.5
    if multilabel:
        y2 = torch.randint(0, c, (n,), generator=g)
        x = x + centers[y2]
        hot = torch.zeros(n, c)
        hot[torch.arange(n), y] = 1
        hot[torch.arange(n), y2] = 1
        return x, hot
    return x, y


def _batches(x, y, key, bs=32):
    return lambda *_: [{"image": x[i : i + bs], key: y[i : i + bs]} for i in range(0, len(x), bs)]


def _model(c=4, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, c))


def _cfg(**kw):
    return TrainConfig(**{"epochs": 4, "lr": 1e-2, "warmup_epochs": 0.5, "amp": "off", **kw})


def test_classification_learns_and_reports_every_epoch():
    x, y = _data()
    reports = []
    hooks = Hooks(report=lambda m, ck: reports.append((m, ck)), log=lambda m: None)
    state = fit(
        _model(),
        make_task(TaskConfig(), 4),
        _cfg(),
        train_batches=_batches(x, y, "label"),
        val_batches=_batches(*_data(seed=1), "label"),
        steps_per_epoch=8,
        device=DEV,
        hooks=hooks,
    )
    assert [m["epoch"] for m, _ in reports] == [1, 2, 3, 4]
    assert all(ck is not None for _, ck in reports)
    assert reports[-1][0]["val/top1"] > 0.9 and state.best >= reports[-1][0]["val/top1"]
    assert reports[-1][0]["train/loss"] < reports[0][0]["train/loss"]
    assert state.step == 32


def test_bf16_autocast_trains_too():
    x, y = _data()
    state = fit(
        _model(),
        make_task(TaskConfig(), 4),
        _cfg(amp="bf16"),
        train_batches=_batches(x, y, "label"),
        val_batches=_batches(*_data(seed=1), "label"),
        steps_per_epoch=8,
        device=DEV,
        hooks=Hooks(log=lambda m: None),
    )
    assert state.best > 0.9


@pytest.mark.parametrize("loss", ["focal", "bce"])
def test_multilabel_learns(loss):
    x, y = _data(multilabel=True)
    task = make_task(TaskConfig(name="multilabel", loss=loss), 4)
    state = fit(
        _model(),
        task,
        _cfg(epochs=6),
        train_batches=_batches(x, y, "labels"),
        val_batches=_batches(*_data(seed=1, multilabel=True), "labels"),
        steps_per_epoch=8,
        device=DEV,
        hooks=Hooks(log=lambda m: None),
    )
    assert state.best > 0.8  # weighted F1


def test_resume_from_a_checkpoint_matches_the_uninterrupted_run():
    x, y = _data()
    task, cfg = make_task(TaskConfig(), 4), _cfg(epochs=3)
    args = dict(
        train_batches=_batches(x, y, "label"),
        val_batches=_batches(*_data(seed=1), "label"),
        steps_per_epoch=8,
        device=DEV,
    )
    checkpoints = []
    straight = _model()
    fit(
        straight,
        task,
        cfg,
        hooks=Hooks(report=lambda m, ck: checkpoints.append(copy.deepcopy(ck)), log=lambda m: None),
        **args,
    )
    resumed = _model(seed=5)
    state = fit(resumed, task, cfg, resume=checkpoints[0], hooks=Hooks(log=lambda m: None), **args)
    assert state.epoch == 3 and len(state.history) == 3  # epoch counter continued, not restarted
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_grad_accumulation_matches_a_bigger_batch():
    x, y = _data(n=64)
    task = make_task(TaskConfig(), 4)
    val = _batches(x[:8], y[:8], "label")
    big, small = _model(), _model()
    fit(
        big,
        task,
        _cfg(epochs=1, grad_clip=None),
        train_batches=_batches(x, y, "label", bs=16),
        val_batches=val,
        steps_per_epoch=4,
        device=DEV,
        hooks=Hooks(log=lambda m: None),
    )
    fit(
        small,
        task,
        _cfg(epochs=1, grad_clip=None, grad_accum=2),
        train_batches=_batches(x, y, "label", bs=8),
        val_batches=val,
        steps_per_epoch=8,
        device=DEV,
        hooks=Hooks(log=lambda m: None),
    )
    for a, b in zip(big.parameters(), small.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_early_stopping_stops_after_patience():
    x, y = _data()
    logs = []
    state = fit(
        _model(),
        make_task(TaskConfig(), 4),
        _cfg(epochs=10, lr=1e-12, patience=2),
        train_batches=_batches(x, y, "label"),
        val_batches=_batches(*_data(seed=1), "label"),
        steps_per_epoch=8,
        device=DEV,
        hooks=Hooks(log=logs.append),
    )
    assert state.epoch == 3 and any("early stop" in m for m in logs)


def test_warmup_cosine_shape():
    f = warmup_cosine(100, 10, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.55, abs=0.01) and f(100) == pytest.approx(0.1)


def test_a_mid_epoch_best_carries_its_own_checkpoint():
    x, y = _data()
    reports = []
    fit(
        _model(),
        make_task(TaskConfig(), 4),
        _cfg(epochs=2, val_every_n_steps=3),
        train_batches=_batches(x, y, "label"),
        val_batches=_batches(*_data(seed=1), "label"),
        steps_per_epoch=8,
        device=DEV,
        hooks=Hooks(report=lambda m, ck: reports.append((m, ck)), log=lambda m: None),
    )
    assert any(m["best"] and "step=" in m["checkpoint"] for m, _ in reports)  # mid-epoch best
    for m, ck in reports:
        if m["best"]:
            assert ck is not None and ck["name"] == m["checkpoint"]
        if ck is not None:
            assert ck["name"].startswith(f"checkpoints/epoch={ck['extra']['epoch']}")
