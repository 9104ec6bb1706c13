"""The training loop on tiny models and synthetic data, with exact expectations."""

from __future__ import annotations

import copy

import pytest
import torch
from raylens.loop import Hooks, fit, precise_bn, warmup_cosine
from raylens.schema import RunConfig, TaskConfig, TrainConfig
from raylens.tasks import create_task
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
        create_task(RunConfig(task=TaskConfig()), 4),
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
        create_task(RunConfig(task=TaskConfig()), 4),
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
    task = create_task(RunConfig(task=TaskConfig(name="multilabel", loss=loss)), 4)
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
    task, cfg = create_task(RunConfig(task=TaskConfig()), 4), _cfg(epochs=3)
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
    task = create_task(RunConfig(task=TaskConfig()), 4)
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
        create_task(RunConfig(task=TaskConfig()), 4),
        _cfg(epochs=10, lr=1e-12, patience=2),
        train_batches=_batches(x, y, "label"),
        val_batches=_batches(*_data(seed=1), "label"),
        steps_per_epoch=8,
        device=DEV,
        hooks=Hooks(log=logs.append),
    )
    assert state.epoch == 3 and any("early stop" in m for m in logs)


def test_an_unknown_best_metric_fails_before_training_naming_the_reported_metrics():
    x, y = _data()
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(
        ValueError, match=r"'train.best_metric': 'top3' .*\['f1_macro', .*'loss', .*'top1'"
    ):
        fit(
            model,
            create_task(RunConfig(task=TaskConfig()), 4),
            _cfg(epochs=1, best_metric="top3"),
            train_batches=_batches(x, y, "label"),
            val_batches=_batches(*_data(seed=1), "label"),
            steps_per_epoch=8,
            device=DEV,
        )
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_warmup_cosine_shape():
    f = warmup_cosine(100, 10, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.55, abs=0.01) and f(100) == pytest.approx(0.1)


def test_a_mid_epoch_best_carries_its_own_checkpoint():
    x, y = _data()
    reports = []
    fit(
        _model(),
        create_task(RunConfig(task=TaskConfig()), 4),
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


def _bn_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(24, 8),
        nn.BatchNorm1d(8),
        nn.Linear(8, 4),
    )


def _inputs(k, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 3, 4, 4, generator=g) * 2 + 1 for _ in range(k)]


def test_precise_bn_gives_the_statistics_of_the_inputs_under_the_current_weights():
    model = _bn_model()
    model.train()
    model[6].eval()  # a BatchNorm the caller keeps frozen: training would not update it
    frozen = model[6].running_mean.clone(), model[6].running_var.clone()
    params = {k: v.clone() for k, v in model.named_parameters()}
    xs = _inputs(3)
    rng = torch.get_rng_state()
    assert precise_bn(model, xs, None) == 1
    with torch.no_grad():
        h = torch.cat([model[0](x) for x in xs])  # what the BatchNorm2d sees, all batches
    # equal-sized batches: the mean of batch means is the overall mean; the variance is the
    # overall one up to each batch's n / (n - 1) (64 values per channel per batch)
    assert torch.allclose(model[1].running_mean, h.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(model[1].running_var, h.var((0, 2, 3)), rtol=0.03)
    assert model[1].momentum == 0.1 and model.training and not model[6].training
    assert torch.equal(model[6].running_mean, frozen[0])
    assert torch.equal(model[6].running_var, frozen[1])
    assert torch.equal(torch.get_rng_state(), rng)  # dropout saw no draw
    assert all(torch.equal(v, params[k]) for k, v in model.named_parameters())
    assert precise_bn(model.eval(), xs, None) == 0  # nothing in training mode: nothing to do
    before = model[1].running_mean.clone()
    assert precise_bn(model.train(), [], None) == 0  # no batch anywhere: statistics kept
    assert torch.equal(model[1].running_mean, before)


def test_precise_bn_pools_workers_like_one_worker_with_all_batches():
    xs = _inputs(4)
    whole, a, b = _bn_model(), _bn_model(), _bn_model()
    for m in (whole, a, b):
        m[4].eval()  # no dropout: its masks would differ between the splits
    precise_bn(whole, xs, None)
    sent = []  # worker b's all_reduce contributions, in call order
    precise_bn(b, xs[2:], None, all_reduce=lambda t: sent.append(t.clone()) or t)
    received = iter(sent)
    precise_bn(a, xs[:2], None, all_reduce=lambda t: t + next(received))
    for layer in (1, 6):
        assert torch.allclose(a[layer].running_mean, whole[layer].running_mean, atol=1e-6)
        assert torch.allclose(a[layer].running_var, whole[layer].running_var, atol=1e-5)
    assert not torch.allclose(b[1].running_mean, whole[1].running_mean)  # b alone differs


def test_precise_bn_in_fit_changes_the_statistics_not_the_training():
    x, y = _data()
    task = create_task(RunConfig(task=TaskConfig()), 4)
    runs = {}
    for n in (0, 2):
        model, reports = _bn_model(), []
        fit(
            model,
            task,
            _cfg(epochs=2, lr=0.05, precise_bn_batches=n),
            train_batches=_batches(x, y, "label"),
            val_batches=_batches(*_data(seed=1), "label"),
            steps_per_epoch=8,
            device=DEV,
            hooks=Hooks(report=lambda m, ck, r=reports: r.append(m), log=lambda m: None),
        )
        runs[n] = model, reports
    plain, precise = runs[0][0], runs[2][0]
    for (name, p), q in zip(plain.named_parameters(), precise.parameters(), strict=True):
        assert torch.equal(p, q), name  # same weights, dropout masks and steps
    assert not torch.equal(plain[1].running_mean, precise[1].running_mean)
    # the checkpointed statistics are those of the last two training batches, final weights
    expected = copy.deepcopy(plain).train()
    precise_bn(expected, [x[192:224], x[224:256]], None)
    assert torch.allclose(precise[1].running_mean, expected[1].running_mean, atol=1e-6)
    assert torch.allclose(precise[6].running_var, expected[6].running_var, atol=1e-5)
    assert runs[2][1][-1]["val/loss"] != runs[0][1][-1]["val/loss"]


def test_precise_bn_batches_must_not_be_negative():
    with pytest.raises(Exception, match="train.precise_bn_batches"):
        _cfg(precise_bn_batches=-1).validate()
