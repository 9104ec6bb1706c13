"""Backbones by short name, all honouring one contract.

    bb = create_backbone("tiny_vit_5m_224")             # any timm model name
    bb = create_backbone("hf:facebook/dinov3-vits16-pretrain-lvd1689m", pretrained=True)
    bb = create_backbone("hf:/models/clip-vit-b16")      # a save_pretrained directory
    feats = bb(images)                                   # [b, bb.num_features] pooled
    bb.blocks                                            # blocks in forward order
    bb.preprocess                                        # size, mean, std, crop_pct, interp.
    bb.set_trainable(unfreeze_last_n=3)                  # 0 frozen, N last blocks, "all"
    backbone_preprocess("vit_base_patch16_clip_224.openai")  # the same, without building

``drop_path_rate`` (stochastic depth) and ``grad_checkpointing`` (activation checkpointing)
go to timm's ``create_model`` / ``set_grad_checkpointing`` and to a Hugging Face model's
config field / ``activation_checkpointing_enable``; a backbone that has neither refuses a
non-default value, naming the config key, instead of ignoring it.

Weights: ``pretrained=True`` loads from the hub (needs network); ``weights=`` loads a local
file, or an ``s3://`` / ``gs://`` one fetched first (timm: safetensors or a state dict via
``pretrained_cfg_overlay=dict(file=...)``; HF: a ``save_pretrained`` directory). Nothing is
unpickled: timm loads ``.safetensors`` or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import inspect
import os

import torch
from torch import nn

from raylens.models._registry import (
    BACKBONES,
    PREPROCESS,
    parse_backbone_spec,
    register_backbone,
)
from raylens.models.base import (
    Backbone,
    Interpolation,
    Preprocess,
    UnknownBackbone,
    find_blocks,
    local_weights,
)

__all__ = [
    "BACKBONES",
    "HF_PREFIX",
    "Backbone",
    "Preprocess",
    "UnknownBackbone",
    "backbone_preprocess",
    "create_backbone",
    "find_blocks",
    "local_weights",
    "parse_backbone_spec",
    "register_backbone",
]

HF_PREFIX = "hf:"

# PIL resample codes in HF image processor configs, and timm's interpolation names, mapped
# to the three the eval/train transforms offer: Lanczos to bicubic and box/Hamming to
# bilinear, the nearest filters of the same kind.
_PIL_RESAMPLE: dict[int, Interpolation] = {
    0: "nearest",
    1: "bicubic",
    2: "bilinear",
    3: "bicubic",
    4: "bilinear",
    5: "bilinear",
}
_TIMM_INTERPOLATION: dict[str, Interpolation] = {
    "nearest": "nearest",
    "bilinear": "bilinear",
    "bicubic": "bicubic",
    "lanczos": "bicubic",
    "box": "bilinear",
    "hamming": "bilinear",
    "random": "bilinear",
}


# ----------------------------------------------------------------------------- preprocessing


def _timm_preprocess(pretrained_cfg: dict) -> Preprocess:
    import timm.data

    cfg = timm.data.resolve_data_config({}, pretrained_cfg=pretrained_cfg)
    return Preprocess(
        int(cfg["input_size"][-1]),
        tuple(float(x) for x in cfg["mean"]),
        tuple(float(x) for x in cfg["std"]),
        float(cfg.get("crop_pct", 0.875)),
        _TIMM_INTERPOLATION.get(str(cfg.get("interpolation", "bilinear")), "bilinear"),
    )


def _hf_source(name: str, weights: str | None, storage) -> tuple[str, bool]:
    """(a local dir or a hub id, whether it is local) for ``hf:<id or dir>`` / its weights."""
    source = weights or name[len(HF_PREFIX) :]
    local = "://" in source or os.path.exists(source)
    return (local_weights(source, storage) if local else source), local


def _hf_preprocess(source: str, config) -> Preprocess:
    """From the model config (input size) and its image processor config
    (``preprocessor_config.json``: image_mean/std, resample, crop); mean/std None when
    there is no processor config (none saved, or a hub id not reachable offline)."""
    from transformers.image_processing_utils import ImageProcessingMixin

    vcfg = getattr(config, "vision_config", config)
    size = vcfg.image_size if isinstance(vcfg.image_size, int) else vcfg.image_size[0]
    try:
        proc, _ = ImageProcessingMixin.get_image_processor_dict(source)
    except OSError:
        proc = {}

    def triple(value) -> tuple[float, float, float] | None:
        if value is None:
            return None
        values = [float(value)] * 3 if isinstance(value, (int, float)) else list(value)
        return tuple(float(x) for x in values)

    resample = proc.get("resample")
    return Preprocess(
        int(size),
        triple(proc.get("image_mean")),
        triple(proc.get("image_std")),
        _hf_crop_pct(proc),
        _PIL_RESAMPLE.get(int(resample), "bilinear") if resample is not None else "bilinear",
    )


def _hf_crop_pct(proc: dict) -> float:
    """An HF processor's eval crop as timm's crop_pct: its own ``crop_pct`` when it has one,
    else center-crop side / resized short side (CLIP: 224/224; DINOv2: 224/256), else 1.0
    (a plain resize to the input size)."""
    if proc.get("crop_pct"):
        return float(proc["crop_pct"])

    def side(value) -> float | None:
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, dict):
            got = value.get("shortest_edge") or value.get("height")
            return float(got) if got else None
        return None

    crop, short = side(proc.get("crop_size")), side(proc.get("size"))
    if proc.get("do_center_crop") and crop and short and crop <= short:
        return crop / short
    return 1.0


def backbone_preprocess(name: str, *, weights: str | None = None, storage=None) -> Preprocess:
    """A backbone's preprocessing, without building it or reading weights where possible:
    a registered name's declared one (else it is built, small), a timm name's
    ``pretrained_cfg`` (its tag's, e.g. ``vit_base_patch16_clip_224.openai``), an ``hf:``
    model's config and image processor config. Equal to ``create_backbone(name).preprocess``.

    Raises:
        UnknownBackbone: as :func:`create_backbone`.
    """
    if name in BACKBONES:
        if name in PREPROCESS:
            return PREPROCESS[name]
        return create_backbone(name, storage=storage).preprocess
    if name.startswith(HF_PREFIX):
        from transformers import AutoConfig

        source, _ = _hf_source(name, weights, storage)
        return _hf_preprocess(source, AutoConfig.from_pretrained(source))
    import timm

    if timm.is_model(name):
        pretrained_cfg = timm.models.get_pretrained_cfg(name)
        if pretrained_cfg is not None:
            return _timm_preprocess(pretrained_cfg.to_dict())
        return create_backbone(name, storage=storage).preprocess
    raise _unknown(name)


# ----------------------------------------------------------------------------- builders


def _timm(
    name: str,
    *,
    pretrained: bool,
    weights: str | None,
    storage,
    drop_path_rate: float = 0.0,
    grad_checkpointing: bool = False,
) -> Backbone:
    import timm

    kwargs: dict = {"num_classes": 0}
    if weights:
        kwargs["pretrained_cfg_overlay"] = {"file": local_weights(weights, storage)}
        pretrained = True
    if drop_path_rate > 0:
        kwargs["drop_path_rate"] = drop_path_rate
    try:
        net = timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as err:
        if drop_path_rate > 0 and "drop_path_rate" in str(err):
            raise ValueError(
                f"config key 'model.drop_path_rate': timm model {name!r} has no drop path "
                f"(stochastic depth); set it to 0 ({err})"
            ) from None
        raise
    if grad_checkpointing:
        try:
            net.set_grad_checkpointing(True)
        except (AssertionError, NotImplementedError) as err:
            raise ValueError(
                f"config key 'model.grad_checkpointing': timm model {name!r} does not support "
                f"it ({err or type(err).__name__}); set it to false"
            ) from None
    pre = _timm_preprocess(dict(net.pretrained_cfg))
    return Backbone(name, net, int(net.num_features), find_blocks(net), pre, lambda m, x: m(x))


def _hf(
    name: str,
    *,
    pretrained: bool,
    weights: str | None,
    storage,
    drop_path_rate: float = 0.0,
    grad_checkpointing: bool = False,
) -> Backbone:
    from transformers import AutoConfig, AutoModel

    source, local = _hf_source(name, weights, storage)
    config = AutoConfig.from_pretrained(source)
    vcfg = getattr(config, "vision_config", config)
    if drop_path_rate > 0:
        if not hasattr(vcfg, "drop_path_rate"):
            raise ValueError(
                f"config key 'model.drop_path_rate': {name!r} ({config.model_type}) has no "
                "drop path (stochastic depth) in its config; set it to 0"
            )
        vcfg.drop_path_rate = drop_path_rate
    # A local save_pretrained dir carries weights; a hub id loads them only if pretrained
    # (otherwise: the hub config's architecture with random weights).
    net = (
        AutoModel.from_pretrained(source, config=config)
        if (pretrained or local)
        else AutoModel.from_config(config)
    )
    if grad_checkpointing:
        if not getattr(net, "supports_gradient_checkpointing", False):
            raise ValueError(
                f"config key 'model.grad_checkpointing': {name!r} ({type(net).__name__}) does "
                "not support activation checkpointing; set it to false"
            )
        enable = getattr(net, "activation_checkpointing_enable", None)
        if enable is not None:
            enable({"use_reentrant": False})
        else:  # transformers before activation_checkpointing_enable
            net.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
    if hasattr(net, "vision_model") and not hasattr(net, "encoder"):
        net = net.vision_model  # a full CLIP model: keep the vision tower

    def pool(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = m(pixel_values=x)
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state[:, 0]

    return Backbone(
        name,
        net,
        int(vcfg.hidden_size),
        find_blocks(net),
        _hf_preprocess(source, config),
        pool,
    )


def _registered(
    name: str,
    *,
    pretrained: bool,
    weights: str | None,
    storage,
    drop_path_rate: float,
    grad_checkpointing: bool,
) -> Backbone:
    build = BACKBONES[name]
    takes = inspect.signature(build).parameters
    extra: dict = {}
    for key, value, off in (
        ("drop_path_rate", drop_path_rate, 0.0),
        ("grad_checkpointing", grad_checkpointing, False),
    ):
        if key in takes:
            extra[key] = value
        elif value != off:
            raise ValueError(
                f"config key 'model.{key}': registered backbone {name!r} does not support it; "
                f"set it to {str(off).lower()}"
            )
    return build(pretrained=pretrained, weights=weights, storage=storage, **extra)


def create_backbone(
    name: str,
    *,
    pretrained: bool = False,
    weights: str | None = None,
    storage=None,
    drop_path_rate: float = 0.0,
    grad_checkpointing: bool = False,
) -> Backbone:
    """Builds a registered backbone, any timm model, or ``hf:<hub id or directory>``.

    Args:
        drop_path_rate: stochastic depth rate (timm's per-block linear ramp to this maximum;
            an HF config's ``drop_path_rate``).
        grad_checkpointing: recompute block activations in the backward pass.

    Raises:
        UnknownBackbone: listing the registered names and how to name timm/HF models.
        ValueError: ``drop_path_rate > 0`` or ``grad_checkpointing`` for a backbone that
            does not support it, naming the config key.
    """
    kw = {"drop_path_rate": drop_path_rate, "grad_checkpointing": grad_checkpointing}
    if name in BACKBONES:
        return _registered(name, pretrained=pretrained, weights=weights, storage=storage, **kw)
    if name.startswith(HF_PREFIX):
        return _hf(name, pretrained=pretrained, weights=weights, storage=storage, **kw)
    import timm

    if timm.is_model(name):
        return _timm(name, pretrained=pretrained, weights=weights, storage=storage, **kw)
    raise _unknown(name)


def _unknown(name: str) -> UnknownBackbone:
    import difflib

    import timm

    close = difflib.get_close_matches(name, list(BACKBONES) + timm.list_models(), n=3)
    return UnknownBackbone(
        f"unknown backbone {name!r}; registered: {sorted(BACKBONES) or '(none)'}, any timm model "
        f"(timm.list_models(), {len(timm.list_models())} names), or 'hf:<hub id or directory>'"
        + (f"; closest: {close}" if close else "")
    )
