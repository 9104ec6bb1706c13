"""The optimisation side of the training recipe: timm optimizers and layer-wise LR decay, model
EMA (checkpointed, resumed), frozen BatchNorm kept frozen, torch.compile, the mixer hook,
SyncBatchNorm, and checkpoint retention (best + last N, unit and on Ray)."""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from raylens import config as C
from raylens.checkpoint import load_checkpoint, save_checkpoint
from raylens.loop import Hooks, build_optimizer, evaluate, fit, precise_bn
from raylens.models.classifier import build_model
from raylens.rundir import BEST_CHECKPOINT, RunDir
from raylens.runtime.launch import BestAndLast, sync_batchnorm
from raylens.schema import ModelConfig, RunConfig, TaskConfig, TrainConfig
from raylens.storage import Storage
from raylens.tasks import create_task
from timm.optim import param_groups_layer_decay
from timm.utils import ModelEmaV3
from torch import nn

DEV = torch.device("cpu")
QUIET = Hooks(log=lambda m: None)


def _cfg(**kw):
    return TrainConfig(**{"epochs": 2, "lr": 1e-2, "warmup_epochs": 0.5, "amp": "off", **kw})


def _data(n=128, c=4, seed=0, side=4):
    centers = torch.randn(c, 3, side, side, generator=torch.Generator().manual_seed(42)) * 2
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    return centers[y] + torch.randn(n, 3, side, side, generator=g) * 0.5, y


def _batches(x, y, bs=16):
    return lambda *_: [
        {"image": x[i : i + bs], "label": y[i : i + bs]} for i in range(0, len(x), bs)
    ]


def _bn_model(seed=0, dropout=0.2):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(24, 4),
    )


def _task():
    return create_task(RunConfig(task=TaskConfig()), 4)


def _by_name(model, opt):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g for g in opt.param_groups for p in g["params"]}


# ----------------------------------------------------------------------------- optimizer


def test_the_optimizer_comes_from_timm_with_momentum_betas_and_no_decay_on_norms_and_biases():
    model = _bn_model()
    sgd = build_optimizer(model, _cfg(optimizer="sgd", momentum=0.8, weight_decay=0.1))
    assert type(sgd) is torch.optim.SGD
    assert all(g["momentum"] == 0.8 and g["nesterov"] for g in sgd.param_groups)
    groups = _by_name(model, sgd)
    assert groups["0.weight"]["weight_decay"] == 0.1 and groups["5.weight"]["weight_decay"] == 0.1
    for name in ("0.bias", "1.weight", "1.bias", "5.bias"):  # biases and the norm: no decay
        assert groups[name]["weight_decay"] == 0.0
    adamw = build_optimizer(model, _cfg(optimizer="adamw", betas=(0.8, 0.9)))
    assert type(adamw) is torch.optim.AdamW
    assert all(g["betas"] == (0.8, 0.9) for g in adamw.param_groups)
    with pytest.raises(ValueError, match=r"'train.optimizer': unknown optimizer 'adamz'"):
        build_optimizer(model, _cfg(optimizer="adamz"))


def test_lr_multipliers_keep_their_ratio_through_the_schedule():
    class WithProxies(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(4, 4)
            self.criterion = nn.Linear(4, 2)

        def lr_multipliers(self):
            return {"criterion.": 100.0}

    model = WithProxies()
    opt = build_optimizer(model, _cfg(lr=1e-3, weight_decay=0.05))
    groups = _by_name(model, opt)
    assert groups["criterion.weight"]["lr"] == pytest.approx(0.1)
    assert groups["criterion.bias"]["lr"] == pytest.approx(0.1)
    assert groups["net.weight"]["lr"] == pytest.approx(1e-3)
    assert groups["criterion.weight"]["weight_decay"] == 0.05
    assert groups["criterion.bias"]["weight_decay"] == 0.0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** (step + 1))
    for _ in range(3):
        opt.step()
        sched.step()
    assert groups["criterion.weight"]["lr"] == pytest.approx(0.1 / 16)
    assert groups["net.weight"]["lr"] == pytest.approx(1e-3 / 16)


def test_layer_decay_groups_of_a_wrapped_timm_vit_equal_timms_on_the_bare_model():
    model = build_model(ModelConfig(backbone="test_vit"), 5)
    cfg = _cfg(lr=0.1, weight_decay=0.05, layer_decay=0.6)
    ours = {
        n: (g["lr"] / cfg.lr, g["weight_decay"])
        for n, g in _by_name(model, build_optimizer(model, cfg)).items()
    }
    bare = timm.create_model("test_vit", num_classes=5)
    names = {id(p): n for n, p in bare.named_parameters()}
    theirs = {
        names[id(p)]: (g["lr_scale"], g["weight_decay"])
        for g in param_groups_layer_decay(
            bare,
            weight_decay=0.05,
            no_weight_decay_list=bare.no_weight_decay(),
            layer_decay=0.6,
        )
        for p in g["params"]
    }
    prefix = "backbone.net."
    body = {n[len(prefix) :]: v for n, v in ours.items() if n.startswith(prefix)}
    assert body.keys() == {n for n in theirs if not n.startswith("head.")}
    for name, (scale, wd) in body.items():
        assert scale == pytest.approx(theirs[name][0]) and wd == theirs[name][1], name
    assert theirs["blocks.0.attn.qkv.weight"][0] < theirs["blocks.5.attn.qkv.weight"][0] < 1
    assert body["pos_embed"][1] == 0.0  # timm's no_weight_decay() reaches through the wrapper
    # the head is the last layer on both sides: full LR
    assert {n: s for n, (s, _) in ours.items() if n.startswith("head.")} == {
        "head.1.weight": pytest.approx(1.0),
        "head.1.bias": pytest.approx(1.0),
    }
    assert theirs["head.weight"][0] == pytest.approx(1.0)


def test_layer_decay_on_a_backbone_without_a_timm_matcher_follows_its_blocks():
    model = build_model(ModelConfig(backbone="vgg_s8"), 3)  # blocks: its 3 stages
    opt = build_optimizer(model, _cfg(lr=1.0, layer_decay=0.5))
    scale = {n: g["lr"] for n, g in _by_name(model, opt).items()}
    assert scale["backbone.net.stages.0.0.weight"] == pytest.approx(0.125)
    assert scale["backbone.net.stages.1.1.weight"] == pytest.approx(0.25)
    assert scale["backbone.net.stages.2.5.bias"] == pytest.approx(0.5)
    assert scale["head.1.weight"] == pytest.approx(1.0)
    frozen = build_model(ModelConfig(backbone="vgg_s8", unfreeze_last_n=1), 3)
    groups = _by_name(frozen, build_optimizer(frozen, _cfg(layer_decay=0.5)))
    assert not any(n.startswith("backbone.net.stages.0.") for n in groups)  # frozen: left out
    with pytest.raises(ValueError, match=r"'train.layer_decay': Sequential has no group_matcher"):
        build_optimizer(_bn_model(), _cfg(layer_decay=0.5))


# ----------------------------------------------------------------------------- EMA


def test_the_ema_after_n_steps_is_timms_model_ema_v3_over_the_same_updates():
    x, y = _data()
    model = _bn_model()
    start = copy.deepcopy(model)
    snapshots = []

    def train_batches(epoch):  # the weights before each batch: after the previous step
        for batch in _batches(x, y)(epoch):
            snapshots.append(copy.deepcopy(model.state_dict()))
            yield batch

    reports = []
    state = fit(
        model,
        _task(),
        _cfg(ema_decay=0.9, ema_warmup=True),
        train_batches=train_batches,
        val_batches=_batches(*_data(seed=1)),
        steps_per_epoch=8,
        device=DEV,
        hooks=Hooks(report=lambda m, ck: reports.append(ck), log=lambda m: None),
    )
    steps = snapshots[1:] + [model.state_dict()]  # after steps 1..16 (validation moves none)
    assert state.step == 16 == len(steps)
    reference = ModelEmaV3(start, decay=0.9, use_warmup=True)
    scratch = copy.deepcopy(start)
    for step, weights in enumerate(steps, 1):
        scratch.load_state_dict(weights)
        reference.update(scratch, step=step)
    last = reports[-1]
    for k, v in reference.module.state_dict().items():
        assert torch.allclose(last["model"][k], v, atol=1e-6), k
    for k, v in model.state_dict().items():
        assert torch.equal(last["train_model"][k], v), k
    assert not torch.allclose(last["model"]["5.weight"], last["train_model"]["5.weight"])


def test_with_ema_validation_and_the_checkpoint_use_the_ema_and_resume_continues_exactly(
    tmp_path,
):
    x, y = _data()
    task, cfg = _task(), _cfg(epochs=3, ema_decay=0.8)
    val = _batches(*_data(seed=1))
    args = dict(train_batches=_batches(x, y), val_batches=val, steps_per_epoch=8, device=DEV)
    rows, checkpoints = [], []

    def keep(m, ck):
        rows.append(m)
        checkpoints.append(copy.deepcopy(ck))

    straight = _bn_model(dropout=0.0)  # no dropout draws: the RNG is not checkpointed
    fit(straight, task, cfg, hooks=Hooks(report=keep, log=lambda m: None), **args)
    # validation scored the EMA weights, which the checkpoint holds as its model
    ema, raw = _bn_model(dropout=0.0), _bn_model(dropout=0.0)
    ema.load_state_dict(checkpoints[-1]["model"])
    raw.load_state_dict(checkpoints[-1]["train_model"])
    assert evaluate(ema, task, val(), DEV, None, QUIET)["loss"] == pytest.approx(
        rows[-1]["val/loss"]
    )
    assert evaluate(raw, task, val(), DEV, None, QUIET)["loss"] != pytest.approx(
        rows[-1]["val/loss"]
    )
    # checkpoint round trip: both sets of weights come back
    storage, uri = Storage(), str(tmp_path / "epoch=1")
    first = checkpoints[0]
    save_checkpoint(
        storage,
        uri,
        model=first["model"],
        train_model=first["train_model"],
        optimizer=first["optimizer"],
        scheduler=first["scheduler"],
        extra=first["extra"],
    )
    loaded = load_checkpoint(storage, uri)
    for key in ("model", "train_model"):
        assert loaded[key].keys() == first[key].keys()
        assert all(torch.equal(loaded[key][k], v) for k, v in first[key].items())
    assert load_checkpoint(storage, uri, with_optimizer=False)["train_model"] is None
    # resumed from epoch 1: the raw weights and the EMA end as the uninterrupted run's
    resumed, last = _bn_model(seed=5, dropout=0.0), []
    fit(
        resumed,
        task,
        cfg,
        resume=loaded,
        hooks=Hooks(report=lambda m, ck: last.append(ck), log=lambda m: None),
        **args,
    )
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for k, v in checkpoints[-1]["model"].items():
        assert torch.allclose(last[-1]["model"][k], v, atol=1e-7), k


def test_precise_bn_with_ema_recomputes_the_ema_models_statistics_only():
    x, y = _data()
    reports = []
    model = _bn_model()
    fit(
        model,
        _task(),
        _cfg(epochs=1, ema_decay=0.5, precise_bn_batches=2),
        train_batches=_batches(x, y),
        val_batches=_batches(*_data(seed=1)),
        steps_per_epoch=8,
        device=DEV,
        hooks=Hooks(report=lambda m, ck: reports.append(ck), log=lambda m: None),
    )
    ck = reports[-1]
    expected = _bn_model()
    expected.load_state_dict(ck["model"])
    precise_bn(expected.train(), [x[96:112], x[112:128]], None)  # the last two batches
    assert torch.allclose(ck["model"]["1.running_mean"], expected[1].running_mean, atol=1e-6)
    # the training model keeps the statistics training gave it
    assert torch.equal(ck["train_model"]["1.running_mean"], model[1].running_mean)
    assert not torch.allclose(model[1].running_mean, expected[1].running_mean, atol=1e-4)


# ----------------------------------------------------------------------------- frozen BN


def test_batchnorm_of_frozen_blocks_keeps_its_statistics_through_an_epoch():
    model = build_model(ModelConfig(backbone="vgg_s8", unfreeze_last_n=1, channels_last=False), 4)
    bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    before = {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in bns.items()}
    x, y = _data(side=16)
    fit(
        model,
        _task(),
        _cfg(epochs=1),
        train_batches=_batches(x, y),
        val_batches=_batches(*_data(seed=1, side=16)),
        steps_per_epoch=8,
        device=DEV,
        hooks=QUIET,
    )
    frozen = [n for n in bns if not n.startswith("backbone.net.stages.2.")]
    trained = [n for n in bns if n.startswith("backbone.net.stages.2.")]
    assert len(frozen) == 4 and len(trained) == 2
    for n in frozen:
        assert torch.equal(bns[n].running_mean, before[n][0]), n
        assert torch.equal(bns[n].running_var, before[n][1]), n
    for n in trained:
        assert not torch.equal(bns[n].running_mean, before[n][0]), n


# ----------------------------------------------------------------------------- compile, mixer


def test_compile_trains_the_same_weights_and_checkpoints_plain_names(monkeypatch):
    compiled = []
    real = torch.compile

    def eager_compile(model, **kw):  # dynamo without inductor: exact, and seconds on a CPU
        compiled.append(model)
        return real(model, backend="eager", **kw)

    monkeypatch.setattr(torch, "compile", eager_compile)
    x, y = _data()
    runs = {}
    for flag in (False, True):
        model, reports = _bn_model(), []
        fit(
            model,
            _task(),
            _cfg(epochs=1, compile=flag),
            train_batches=_batches(x, y),
            val_batches=_batches(*_data(seed=1)),
            steps_per_epoch=8,
            device=DEV,
            hooks=Hooks(report=lambda m, ck, r=reports: r.append(ck), log=lambda m: None),
        )
        runs[flag] = model, reports[-1]
    assert len(compiled) == 1
    assert runs[True][1]["model"].keys() == runs[False][1]["model"].keys()
    for a, b in zip(runs[False][0].parameters(), runs[True][0].parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_a_mixer_mixes_every_training_batch_and_the_soft_loss_trains_on_its_targets():
    x, y = _data()
    task = _task()
    seen = []

    def mixer(xb, yb):  # reverse-pair mixing with a fixed weight
        soft = nn.functional.one_hot(yb, 4).float()
        return 0.7 * xb + 0.3 * xb.flip(0), 0.7 * soft + 0.3 * soft.flip(0)

    def soft_loss(logits, target):
        seen.append(target)
        return torch.sum(-target * torch.log_softmax(logits, dim=-1), dim=-1).mean()

    task.soft_loss = soft_loss
    fit(
        _bn_model(),
        task,
        _cfg(epochs=1),
        train_batches=_batches(x, y),
        val_batches=_batches(*_data(seed=1)),
        steps_per_epoch=8,
        device=DEV,
        hooks=QUIET,
        mixer=mixer,
    )
    assert len(seen) == 8
    first = nn.functional.one_hot(y[:16], 4).float()
    assert torch.allclose(seen[0], 0.7 * first + 0.3 * first.flip(0))
    without = _task()
    without.soft_loss = None
    with pytest.raises(ValueError, match="config key 'mix'"):
        fit(
            _bn_model(),
            without,
            _cfg(epochs=1),
            train_batches=_batches(x, y),
            val_batches=_batches(x, y),
            steps_per_epoch=8,
            device=DEV,
            mixer=mixer,
        )


def test_grad_checkpointing_through_the_loop_trains_the_same_weights():
    """A timm ViT with activation checkpointing (model.grad_checkpointing), layer decay and an
    EMA: the loop's steps give the weights they give without checkpointing."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 160, 160, generator=g), torch.randint(0, 3, (4,), generator=g)
    runs = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        spec = ModelConfig(
            backbone="test_vit", grad_checkpointing=checkpointing, channels_last=False
        )
        model = build_model(spec, 3)
        assert model.backbone.net.grad_checkpointing is checkpointing
        start = model.head[1].weight.detach().clone()
        fit(
            model,
            create_task(RunConfig(task=TaskConfig()), 3),
            _cfg(epochs=1, lr=1e-3, layer_decay=0.7, ema_decay=0.9),
            train_batches=_batches(x, y, bs=2),
            val_batches=_batches(x, y, bs=2),
            steps_per_epoch=2,
            device=DEV,
            hooks=QUIET,
        )
        assert not torch.equal(model.head[1].weight, start)
        runs.append(model)
    for a, b in zip(runs[0].parameters(), runs[1].parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


# ----------------------------------------------------------------------------- SyncBatchNorm


def test_sync_batchnorm_converts_for_gpu_workers_and_says_why_it_skips_cpu_ones():
    cfg = RunConfig()
    logs = []
    model = _bn_model()
    assert sync_batchnorm(model, cfg, DEV, 2, logs.append) is model
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    assert len(logs) == 1 and "train.sync_bn skipped on cpu" in logs[0]
    assert sync_batchnorm(model, cfg, torch.device("cuda"), 1, logs.append) is model
    off = C.load(RunConfig, None, ["train.sync_bn=false"])
    assert sync_batchnorm(model, off, torch.device("cuda"), 2, logs.append) is model
    assert len(logs) == 1
    converted = sync_batchnorm(model, cfg, torch.device("cuda"), 2, logs.append)
    assert isinstance(converted[1], nn.SyncBatchNorm)  # a module swap: no GPU needed for it


def test_precise_bn_runs_syncbatchnorm_layers_locally(monkeypatch):
    plain, synced = _bn_model(), nn.SyncBatchNorm.convert_sync_batchnorm(_bn_model())
    xs = [torch.randn(8, 3, 4, 4) for _ in range(2)]
    # as under DDP: SyncBatchNorm's own forward would sync, and refuses CPU tensors
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    with pytest.raises(ValueError, match="SyncBatchNorm expected input tensor to be on GPU"):
        synced.train()(xs[0])
    assert precise_bn(plain.train(), xs, None) == precise_bn(synced.train(), xs, None) == 1
    assert torch.allclose(plain[1].running_var, synced[1].running_var)
    assert "forward" not in synced[1].__dict__  # its own forward is back


# ----------------------------------------------------------------------------- retention


@pytest.mark.parametrize("restart", [False, True])
def test_best_and_last_n_keeps_exactly_the_best_and_the_last_n(tmp_path, monkeypatch, restart):
    """Ray's part simulated: it persists each reported checkpoint, then deletes all but the
    last ``keep`` (``CheckpointConfig(num_to_keep=keep)`` without a score). ``restart``: a
    new keeper every report, as after a restart (reported names from the history)."""
    import raylens.checkpoint as ckpt

    copies = []
    real_copy = ckpt.copy_checkpoint
    monkeypatch.setattr(ckpt, "copy_checkpoint", lambda *a: copies.append(a[1]) or real_copy(*a))
    storage = Storage()
    run = RunDir(str(tmp_path / "run"), storage)
    keep, best, reported = 2, None, []
    keeper = BestAndLast(run, keep, [])
    scores = [0.5, 0.9, 0.6, 0.7, 0.8, 0.95, 0.1, 0.2]
    for epoch, score in enumerate(scores, 1):
        if restart:
            keeper = BestAndLast(run, keep, reported)
        name = f"checkpoints/epoch={epoch}"
        improved = best is None or score > best[1]
        keeper.before_report(name, improved)
        save_checkpoint(storage, run.path(name), model={"w": torch.tensor([float(epoch)])})
        reported.append(name)
        for old in reported[:-keep]:
            storage.delete_tree(run.path(old))
        if improved:
            best = (epoch, score)
            run.write_best({"epoch": epoch, "checkpoint": name, "val/top1": score})
            keeper.after_best(name)
        last = reported[-keep:]
        best_name = f"checkpoints/epoch={best[0]}"
        expected = set(last) | {best_name if best_name in last else BEST_CHECKPOINT}
        assert set(run.checkpoints()) == expected, epoch
        record = run.best()
        assert record["epoch"] == best[0] and record["metrics"] == {"val/top1": best[1]}
        weights = load_checkpoint(storage, run.checkpoint(record["checkpoint"]))["model"]
        assert weights["w"].item() == best[0]
    assert len(copies) == 2  # each best copied once, when it aged out (epochs 2 and 6)


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_a_run_keeps_the_best_and_the_last_n_checkpoints_and_resumes(ray_session, tmp_path):
    """5 epochs, keep_checkpoints=2, a best that stays at epoch 1 (frozen backbone, LR ~ 0):
    checkpoints/best (epoch 1), epoch=4, epoch=5 remain; one more epoch resumes from Ray's
    latest (epoch 5) and leaves best, epoch=5, epoch=6. With EMA, every checkpoint holds the
    raw training weights too."""
    from raylens.train import finetune

    from tests.sourcegen import prepare_quiet, write_folder

    storage = Storage()
    write_folder(storage, str(tmp_path / "raw"), per_class=10)
    prepare_quiet(storage, str(tmp_path / "raw"), str(tmp_path / "ds"))

    def cfg(epochs):
        return C.load(
            RunConfig,
            None,
            [
                f"data.dataset={tmp_path / 'ds'}",
                f"run.output_dir={tmp_path / 'runs'}",
                "run.name=keep",
                "data.image_size=16",
                "data.batch_size=8",
                "model.backbone=vgg_s8",
                "model.unfreeze_last_n=0",  # frozen BatchNorm: val top1 cannot move
                "train.lr=1e-12",
                f"train.epochs={epochs}",
                "train.keep_checkpoints=2",
                "train.ema_decay=0.5",
                "ray.num_workers=1",
            ],
        )

    out = finetune(cfg(5))
    run = RunDir(out["run_dir"], storage)
    assert [r["epoch"] for r in run.history()] == [1, 2, 3, 4, 5]
    assert run.checkpoints() == [BEST_CHECKPOINT, "checkpoints/epoch=4", "checkpoints/epoch=5"]
    best = run.best()
    assert best["epoch"] == 1 and best["checkpoint"] == BEST_CHECKPOINT
    ck = load_checkpoint(storage, run.checkpoint())
    assert ck["extra"]["epoch"] == 1 and ck["train_model"] is not None
    assert out["test"]["checkpoint"] == run.path(BEST_CHECKPOINT)
    finetune(cfg(6))
    rows = run.history()
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["resumes"] for r in rows] == [0, 0, 0, 0, 0, 1]
    assert run.checkpoints() == [BEST_CHECKPOINT, "checkpoints/epoch=5", "checkpoints/epoch=6"]
    assert json.loads(storage.read_text(run.path("best.json")))["epoch"] == 1
