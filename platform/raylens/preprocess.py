"""Preprocessing from the backbone: a run config's null ``data.mean``, ``data.std``,
``data.eval_crop_pct`` and ``data.interpolation`` filled from what its backbone was
pretrained with (timm ``pretrained_cfg``, a Hugging Face image processor config, a registered
backbone's declared statistics); values the user set win.

    cfg = resolve_preprocess(cfg, storage)                 # before a job writes or uses it
    data = require_preprocess(run_cfg.data, what="run dir 'runs/x'")  # a saved run's

Every job that trains from a model config resolves it once, before it records the run
(``config.yaml`` then holds concrete values), so everything that later reads the run
(Serve, ONNX export, jobs.embed, a distillation teacher) gets the numbers it was trained
with, never a default. A consumer handed an unresolved config fails, naming the key, rather
than guessing ImageNet's statistics. Pure: no Ray.
"""

from __future__ import annotations

import dataclasses

from raylens.config import ConfigError
from raylens.models.backbones import Preprocess, backbone_preprocess
from raylens.rundir import LEGACY_INTERPOLATION
from raylens.schema import DataConfig, RunConfig

KEYS = ("mean", "std", "eval_crop_pct", "interpolation")


def is_resolved(data: DataConfig) -> bool:
    return all(getattr(data, k) is not None for k in KEYS)


def fill_data(data: DataConfig, pre: Preprocess, *, source: str) -> DataConfig:
    """``data`` with its null preprocessing fields taken from ``pre`` (``source`` names the
    backbone in errors).

    Raises:
        ConfigError: ``data.mean``/``data.std`` are null and the backbone has no statistics
            of its own (a Hugging Face model without an image processor config).
    """
    mean = data.mean if data.mean is not None else pre.mean
    std = data.std if data.std is not None else pre.std
    if mean is None or std is None:
        key = "data.mean" if mean is None else "data.std"
        raise ConfigError(
            f"config key '{key}' is null (take it from the backbone), but {source} has no "
            "image statistics of its own (no image processor config with image_mean/"
            "image_std); set data.mean and data.std"
        )
    return dataclasses.replace(
        data,
        mean=tuple(float(x) for x in mean),
        std=tuple(float(x) for x in std),
        eval_crop_pct=data.eval_crop_pct if data.eval_crop_pct is not None else pre.crop_pct,
        interpolation=data.interpolation or pre.interpolation,
    )


def resolve_preprocess(cfg: RunConfig, storage=None) -> RunConfig:
    """``cfg`` with ``data``'s null preprocessing fields filled from ``model.backbone``
    (``model.weights`` for an ``hf:`` weights dir); no model is built where the backbone's
    metadata says it (:func:`raylens.models.backbones.backbone_preprocess`). Idempotent, and
    free once every field is set.

    A metric-learning config is returned as it is: its frozen backbones each bring their
    own preprocessing (``metric.backbones``), ``model.backbone`` is not used.

    Raises:
        UnknownBackbone, ConfigError: the backbone is unknown, or says no mean/std.
    """
    if is_resolved(cfg.data):
        return cfg
    from raylens.tasks import get_task

    if get_task(cfg.task.name).pipeline == "features":
        return cfg
    m = cfg.model
    pre = backbone_preprocess(m.backbone, weights=m.weights, storage=storage)
    data = fill_data(cfg.data, pre, source=f"model.backbone {m.backbone!r}")
    return dataclasses.replace(cfg, data=data)


def require_preprocess(data: DataConfig, *, what: str) -> DataConfig:
    """A saved run's ``data`` section as a consumer (Serve, export, embed, a teacher) uses
    it: every preprocessing field concrete. ``interpolation`` null is a run recorded before
    the field existed: bilinear, what it was trained with.

    Raises:
        ValueError: ``data.mean``, ``data.std`` or ``data.eval_crop_pct`` is null, naming
            ``what`` (the run) and the key.
    """
    missing = [f"data.{k}" for k in ("mean", "std", "eval_crop_pct") if getattr(data, k) is None]
    if missing:
        raise ValueError(
            f"{what}: config key '{missing[0]}' is null in its config (null: "
            f"{', '.join(missing)}); a run's config records the preprocessing it was trained "
            "with, resolved from its backbone (raylens.preprocess.resolve_preprocess) when the "
            "run was written, and no default is assumed: set the values it was trained with"
        )
    if data.interpolation is None:
        data = dataclasses.replace(data, interpolation=LEGACY_INTERPOLATION)
    return data
