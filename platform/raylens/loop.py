"""One training loop for every task (pure PyTorch; Ray is reached only through hooks).

Any timm optimizer (no weight decay on norms and biases; optional layer-wise LR decay),
per-step cosine with linear warmup or ReduceLROnPlateau, gradient clipping and
accumulation, AMP (bf16/fp16), optional torch.compile, Mixup/CutMix through a mixer, a
model EMA, validation each epoch or every N steps (optionally with precise BatchNorm
statistics), best-checkpoint selection by a metric, early stopping. BatchNorm layers of
frozen blocks stay in eval mode. Under DDP the caller passes ``all_reduce`` (sum over
workers): metrics are computed from summed statistics, so 1 or N workers report the same
numbers for the same predictions.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from raylens.rundir import CHECKPOINTS
from raylens.schema import TrainConfig
from raylens.tasks.base import Task, check_best_metric, is_better, lower_is_better

# ----------------------------------------------------------------------------- pieces


def unwrap(model: nn.Module) -> nn.Module:
    """The module under a DDP (``.module``) wrapper: the one whose names the checkpoint uses."""
    return getattr(model, "module", model)


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """The optimizer's parameter groups, each with its own ``lr`` and ``weight_decay``.

    Weight decay as timm's ``param_groups_weight_decay``: none on 1-d tensors (norms,
    biases) nor on the model's ``no_weight_decay()`` names (e.g. ViT position embeddings).
    With ``train.layer_decay``, timm's ``param_groups_layer_decay`` over the model's
    ``group_matcher()``: layer i of n gets ``lr * layer_decay^(n - 1 - i)``, the head the
    full ``lr``. A model may name parameter prefixes with their own LR multiplier through
    ``lr_multipliers() -> {prefix: multiplier}`` (e.g. ProxyAnchor's proxies at 100x); it
    multiplies the layer scale. Frozen parameters are left out.

    Raises:
        ValueError: naming ``train.layer_decay`` when the model has no ``group_matcher``.
    """
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    inner = unwrap(model)
    no_decay = set(inner.no_weight_decay()) if hasattr(inner, "no_weight_decay") else set()
    if cfg.layer_decay is not None:
        if not hasattr(inner, "group_matcher"):
            raise ValueError(
                f"config key 'train.layer_decay': {type(inner).__name__} has no "
                "group_matcher() naming its layers; set train.layer_decay=null"
            )
        groups = param_groups_layer_decay(
            inner,
            weight_decay=cfg.weight_decay,
            no_weight_decay_list=no_decay,
            layer_decay=cfg.layer_decay,
        )
    else:
        groups = param_groups_weight_decay(
            inner, weight_decay=cfg.weight_decay, no_weight_decay_list=no_decay
        )
    mults = inner.lr_multipliers() if hasattr(inner, "lr_multipliers") else {}
    names = {id(p): n for n, p in inner.named_parameters()}
    out: list[dict] = []
    for group in groups:
        by_mult: dict[float, list[nn.Parameter]] = {}
        for p in group["params"]:
            prefix = next((k for k in mults if names[id(p)].startswith(k)), None)
            by_mult.setdefault(mults[prefix] if prefix else 1.0, []).append(p)
        scale = group.get("lr_scale", 1.0)
        for mult, params in sorted(by_mult.items()):
            out.append(
                {
                    "params": params,
                    # torch schedulers scale every group's own lr (LambdaLR: its initial_lr),
                    # so the layer scale and multiplier are folded into it here (timm's own
                    # schedulers read "lr_scale" instead; ours would not)
                    "lr": cfg.lr * scale * mult,
                    "weight_decay": group["weight_decay"],
                }
            )
    return out


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """``train.optimizer`` from timm's registry (``timm.optim.create_optimizer_v2``) over
    :func:`param_groups`; ``betas`` reach Adam-family optimizers, ``momentum`` SGD-family.

    Raises:
        ValueError: naming ``train.optimizer`` (unknown name) or ``train.layer_decay``.
    """
    from timm.optim import create_optimizer_v2, list_optimizers

    name = cfg.optimizer.lower()
    if name.split("_")[-1] not in list_optimizers():
        raise ValueError(
            f"config key 'train.optimizer': unknown optimizer {cfg.optimizer!r}; expected a "
            f"timm optimizer name (timm.optim.list_optimizers()), e.g. adamw, sgd, lamb, lion"
        )
    return create_optimizer_v2(
        param_groups(model, cfg),
        opt=name,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        betas=tuple(cfg.betas),
    )


def keep_frozen_bn_in_eval(model: nn.Module) -> int:
    """Puts every BatchNorm layer whose parameters are all frozen in eval mode; returns how
    many. Call it after ``model.train()``: a frozen block's BatchNorm then keeps its running
    statistics, as timm's ``freeze`` does (it swaps in ``FrozenBatchNorm2d``; switching the
    mode instead keeps the module types and checkpoint keys). A BatchNorm without affine
    parameters cannot be told frozen and keeps training.
    """
    count = 0
    for m in unwrap(model).modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters())
            if params and not any(p.requires_grad for p in params):
                m.eval()
                count += 1
    return count


def train_mode(model: nn.Module) -> None:
    """``model.train()``, frozen BatchNorm layers kept in eval mode."""
    model.train()
    keep_frozen_bn_in_eval(model)


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier per optimizer step: linear warmup to 1, cosine down to ``min_ratio``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.amp`` on ``device`` (None: full precision)."""
    if mode == "off":
        return None
    if mode == "bf16":
        return torch.bfloat16
    if mode == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16  # CPU autocast: bf16 measured 1.9x faster here (ENVIRONMENT.md)


# ----------------------------------------------------------------------------- loop


@dataclass
class Hooks:
    """How the loop talks to its runner (Ray Train, or a plain process)."""

    all_reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    report: Callable[[dict, dict | None], None] = lambda metrics, checkpoint: None
    log: Callable[[str], None] = print
    is_main: bool = True


@dataclass
class LoopState:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    best: float | None = None
    best_epoch: int | None = None
    bad_rounds: int = 0
    resumes: int = 0  # times this run continued from a checkpoint (restarts, re-runs)
    history: list[dict] = field(default_factory=list)


def evaluate(
    model: nn.Module,
    task: Task,
    batches: Iterable[dict],
    device: torch.device,
    dtype: torch.dtype | None,
    hooks: Hooks,
    channels_last: bool = False,
    on_batch: Callable[[dict, torch.Tensor], None] | None = None,
) -> dict:
    """Metrics over ``batches`` (summed over workers through ``hooks.all_reduce``).

    ``on_batch(batch, logits)`` sees every batch's float logits (e.g. to keep samples).
    """
    meter = task.meter()
    model.eval()
    with torch.no_grad():
        for batch in batches:
            x = batch[task.input_key].to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = batch[task.target_key].to(device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(x)
            meter.update(logits.float(), y, loss=float(task.loss(logits.float(), y)))
            if on_batch is not None:
                on_batch(batch, logits.float())
    meter.load_state(hooks.all_reduce(meter.state()))
    return meter.compute()


def precise_bn(
    model: nn.Module,
    inputs: Iterable[torch.Tensor],
    dtype: torch.dtype | None,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> int:
    """Recomputes the BatchNorm running statistics training would update, from ``inputs``.

    Running statistics are an exponential average over past steps, taken with past weights;
    at a high learning rate they lag the weights by many steps and eval-mode accuracy sits far
    below the model's (vgg_s8, lr 0.025, 30 steps an epoch: val top-1 0.16 with the running
    statistics, 0.76 recomputed, after one epoch; ``benchmarks/precise_bn.py``). As in
    pycls's precise BN, every BatchNorm layer in training mode gets the statistics of
    ``inputs`` under the current weights: the mean of the per-batch means, and
    E[batch var + batch mean²] - mean² as the variance, pooled over workers through
    ``all_reduce`` (a sum). The forward runs on the unwrapped module (DDP would broadcast
    rank 0's buffers), without gradients, and restores the RNG state, so dropout masks and
    the training that follows are unchanged. SyncBatchNorm layers compute per-worker
    statistics here (pooled by ``all_reduce`` like the rest): their own per-forward sync
    would hang when workers hold different numbers of batches. Every worker must call it
    (it all-reduces). Returns the number of layers updated.
    """
    net = unwrap(model)
    bns = [
        m
        for m in net.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    inputs = list(inputs)
    if not bns:  # the same on every worker (one model)
        return 0
    device = bns[0].running_mean.device
    momenta = [m.momentum for m in bns]
    means = [torch.zeros_like(m.running_mean) for m in bns]
    squares = [torch.zeros_like(m.running_var) for m in bns]
    cuda = [device.index or 0] if device.type == "cuda" else []
    try:
        for m in bns:
            m.momentum = 1.0  # running stats = this batch's stats
            if isinstance(m, nn.SyncBatchNorm):  # plain (local) BatchNorm for these forwards
                m.forward = functools.partial(nn.modules.batchnorm._BatchNorm.forward, m)
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            for x in inputs:
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    net(x)
                for m, mean, square in zip(bns, means, squares, strict=True):
                    mean += m.running_mean
                    square += m.running_var + m.running_mean**2
    finally:
        for m, momentum in zip(bns, momenta, strict=True):
            m.momentum = momentum
            m.__dict__.pop("forward", None)
    count = all_reduce(torch.tensor(float(len(inputs)), device=device))
    if count == 0:  # no worker had a batch: keep the running statistics
        return 0
    for m, mean, square in zip(bns, means, squares, strict=True):
        mean = all_reduce(mean) / count
        m.running_mean.copy_(mean)
        m.running_var.copy_((all_reduce(square) / count - mean**2).clamp_(min=0))
    return len(bns)


def fit(
    model: nn.Module,
    task: Task,
    cfg: TrainConfig,
    *,
    train_batches: Callable[[int], Iterable[dict]],
    val_batches: Callable[[], Iterable[dict]],
    steps_per_epoch: int,
    device: torch.device,
    hooks: Hooks | None = None,
    resume: dict | None = None,
    channels_last: bool = False,
    mixer: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> LoopState:
    """Trains ``model`` for ``cfg.epochs``; reports metrics (and a checkpoint) every epoch.

    With ``train.ema_decay``, a model EMA (timm's ``ModelEmaV3``, updated after every
    optimizer step with the step count) is what is validated, selects the best checkpoint
    and is the checkpoint's ``model``, so whatever reads a checkpoint uses the EMA weights;
    the raw training weights travel as its ``train_model`` and resume from there. Precise
    BN then recomputes the EMA model's statistics (under the EMA weights: the training
    model's would not match them) and leaves the training model's alone.

    Args:
        train_batches: ``epoch -> batches`` (dicts with ``image`` and the task's target).
        steps_per_epoch: micro-batches per epoch on this worker (sizes the schedule).
        resume: a loaded checkpoint (``raylens.checkpoint.load_checkpoint``) to continue.
        mixer: ``(x, y) -> (x_mixed, soft_target)`` (Mixup / CutMix) on every training
            batch; the loss is then ``task.soft_loss(logits, soft_target)``, unless the task
            has a ``train_loss`` (it finds the soft target in ``batch["soft_target"]``).
    Returns:
        The final loop state (history of per-epoch metrics, best metric and epoch).
    Raises:
        ValueError: naming the config key, before any step (best metric, optimizer,
            layer decay, a mixer for a task without a soft-target loss).
    """
    hooks = hooks or Hooks()
    metric = cfg.best_metric or task.best_metric
    check_best_metric(metric, task.meter())
    if mixer is not None and task.train_loss is None and getattr(task, "soft_loss", None) is None:
        raise ValueError(
            f"config key 'mix': task {task.name!r} has no soft-target loss for mixed batches; "
            "turn mixup/cutmix off (mix.mixup_alpha=0, mix.cutmix_alpha=0)"
        )
    inner = unwrap(model)
    opt = build_optimizer(model, cfg)
    updates_per_epoch = max(1, math.ceil(steps_per_epoch / cfg.grad_accum))
    if cfg.max_steps_per_epoch:
        updates_per_epoch = min(
            updates_per_epoch, math.ceil(cfg.max_steps_per_epoch / cfg.grad_accum)
        )
    total = updates_per_epoch * cfg.epochs
    if cfg.scheduler == "cosine":
        sched: Any = torch.optim.lr_scheduler.LambdaLR(
            opt, warmup_cosine(total, int(cfg.warmup_epochs * updates_per_epoch), cfg.min_lr_ratio)
        )
    else:
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="min" if lower_is_better(metric) else "max", patience=1, factor=0.3
        )
    dtype = amp_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    state = LoopState()
    raw = resume.get("train_model") if resume else None  # set when the run keeps an EMA
    if resume:
        inner.load_state_dict(raw if raw is not None else resume["model"])
        if resume.get("optimizer"):
            opt.load_state_dict(resume["optimizer"])
        if resume.get("scheduler"):
            sched.load_state_dict(resume["scheduler"])
        extra = resume.get("extra", {})
        state = LoopState(**{k: extra[k] for k in LoopState.__dataclass_fields__ if k in extra})
        state.resumes += 1
        hooks.log(f"[train] resumed after epoch {state.epoch} (step {state.step})")
    ema = None
    if cfg.ema_decay is not None:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(inner, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup)
        if raw is not None:
            ema.module.load_state_dict(resume["model"])
    # the compiled module shares the model's parameters; evaluation, precise BN and the
    # checkpoint use the model itself (no recompiles for eval mode or odd batch sizes)
    net = torch.compile(model) if cfg.compile else model

    def validate_and_report(epoch_done: bool, train_loss: float, seen: int, t0: float) -> bool:
        """Validates; returns True when early stopping says stop."""
        target = ema.module if ema is not None else model
        if recent:
            if ema is not None:
                train_mode(target)  # precise BN updates the layers in training mode
            precise_bn(target, recent, dtype, hooks.all_reduce)
        metrics = evaluate(target, task, val_batches(), device, dtype, hooks, channels_last)
        scalars = {f"val/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        row = {
            "epoch": state.epoch + (1 if epoch_done else 0),
            "step": state.step,
            "epoch_end": epoch_done,
            "resumes": state.resumes,
            "train/loss": train_loss,
            "lr": opt.param_groups[0]["lr"],
            "images_per_s": seen / max(time.perf_counter() - t0, 1e-9),
            **scalars,
        }
        value = float(metrics[metric])
        improved = bool(is_better(metric, value, state.best))
        if improved:
            state.best, state.best_epoch, state.bad_rounds = value, row["epoch"], 0
        else:
            state.bad_rounds += 1
        if cfg.scheduler == "plateau":
            sched.step(value)
        row["best"] = improved
        stop = cfg.patience is not None and state.bad_rounds >= cfg.patience
        row["final"] = bool(stop or (epoch_done and state.epoch + 1 >= cfg.epochs))
        state.history.append(row)
        checkpoint = None
        if epoch_done:
            state.epoch += 1
        if epoch_done or improved:  # a mid-epoch best gets its own checkpoint too
            name = (
                f"epoch={state.epoch}" if epoch_done else f"epoch={state.epoch}-step={state.step}"
            )
            row["checkpoint"] = f"{CHECKPOINTS}/{name}"  # relative to the run dir
            checkpoint = {
                "name": row["checkpoint"],
                "model": (ema.module if ema is not None else inner).state_dict(),
                "train_model": inner.state_dict() if ema is not None else None,
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "extra": {**state.__dict__, "metrics": metrics},
            }
        hooks.report(row, checkpoint)
        if hooks.is_main:
            hooks.log(
                f"[train] epoch {row['epoch']} step {state.step}: train loss {train_loss:.4f}, "
                f"val {metric} {value:.4f}{' (best)' if improved else ''}"
                f"{' (EMA)' if ema is not None else ''}, {row['images_per_s']:.0f} img/s"
            )
        return stop

    def optimizer_step() -> None:
        if cfg.grad_clip:
            scaler.unscale_(opt)
            # foreach=False on CPU: torch 2.15's foreach norm returned garbage (6e16 for a true
            # norm of 5) under CPU DDP + bf16 autocast, and the run went NaN.
            nn.utils.clip_grad_norm_(
                model.parameters(), cfg.grad_clip, foreach=None if device.type == "cuda" else False
            )
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if cfg.scheduler == "cosine":
            sched.step()
        state.step += 1
        if ema is not None:
            ema.update(inner, step=state.step)

    recent: deque[torch.Tensor] = deque(maxlen=cfg.precise_bn_batches)  # maxlen 0: keeps none

    for epoch in range(state.epoch, cfg.epochs):
        train_mode(model)
        t0, seen, loss_sum, n_loss = time.perf_counter(), 0, 0.0, 0
        micro = 0
        for micro, batch in enumerate(train_batches(epoch), 1):
            if cfg.max_steps_per_epoch and micro > cfg.max_steps_per_epoch:
                break
            x = batch[task.input_key].to(device, non_blocking=True)
            y = batch[task.target_key].to(device)
            if mixer is not None:
                x, soft = mixer(x, y)
                batch["soft_target"] = soft
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            last_micro = micro % cfg.grad_accum == 0
            sync = (
                contextlib.nullcontext()
                if last_micro or not hasattr(model, "no_sync")
                else model.no_sync()
            )
            with sync:
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    logits = net(x)
                if task.train_loss is not None:
                    loss = task.train_loss(logits.float(), batch, x)
                elif mixer is not None:
                    loss = task.soft_loss(logits.float(), soft)
                else:
                    loss = task.loss(logits.float(), y)
                scaler.scale(loss / cfg.grad_accum).backward()
            if last_micro:
                optimizer_step()
                if cfg.val_every_n_steps and state.step % cfg.val_every_n_steps == 0:
                    if validate_and_report(False, loss_sum / max(n_loss, 1), seen, t0):
                        return state
                    train_mode(model)
            recent.append(x)
            seen += x.shape[0]
            loss_sum += loss.item()
            n_loss += 1
        if micro % cfg.grad_accum:  # a partial accumulation at the epoch's end still counts
            optimizer_step()
        if validate_and_report(True, loss_sum / max(n_loss, 1), seen, t0):
            hooks.log(f"[train] early stop: no {metric} improvement in {cfg.patience} validations")
            break
    return state
