"""Backbones by short name, all honouring one contract.

    bb = create_backbone("tiny_vit_5m_224")             # any timm model name
    bb = create_backbone("hf:facebook/dinov3-vits16-pretrain-lvd1689m", pretrained=True)
    bb = create_backbone("hf:/models/clip-vit-b16")      # a save_pretrained directory
    feats = bb(images)                                   # [b, bb.num_features] pooled
    bb.blocks                                            # blocks in forward order
    bb.preprocess                                        # size, mean, std, crop_pct
    bb.set_trainable(unfreeze_last_n=3)                  # 0 frozen, N last blocks, "all"

Weights: ``pretrained=True`` loads from the hub (needs network); ``weights=`` loads a local
file, or an ``s3://`` / ``gs://`` one fetched first (timm: safetensors or a state dict via
``pretrained_cfg_overlay=dict(file=...)``; HF: a ``save_pretrained`` directory). Nothing is
unpickled: timm loads ``.safetensors`` or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from raylens.models._registry import BACKBONES, parse_backbone_spec, register_backbone
from raylens.models.base import (
    Backbone,
    Preprocess,
    UnknownBackbone,
    find_blocks,
    local_weights,
)
from raylens.schema import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "BACKBONES",
    "HF_PREFIX",
    "Backbone",
    "Preprocess",
    "UnknownBackbone",
    "create_backbone",
    "find_blocks",
    "local_weights",
    "parse_backbone_spec",
    "register_backbone",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HF_PREFIX = "hf:"


# ----------------------------------------------------------------------------- builders


def _timm(name: str, *, pretrained: bool, weights: str | None, storage) -> Backbone:
    import timm

    kwargs: dict = {"num_classes": 0}
    if weights:
        kwargs["pretrained_cfg_overlay"] = {"file": local_weights(weights, storage)}
        pretrained = True
    net = timm.create_model(name, pretrained=pretrained, **kwargs)
    cfg = timm.data.resolve_data_config({}, model=net)
    pre = Preprocess(
        int(cfg["input_size"][-1]),
        tuple(cfg["mean"]),
        tuple(cfg["std"]),
        float(cfg.get("crop_pct", 0.875)),
    )
    return Backbone(name, net, int(net.num_features), find_blocks(net), pre, lambda m, x: m(x))


def _hf(name: str, *, pretrained: bool, weights: str | None, storage) -> Backbone:
    from transformers import AutoConfig, AutoModel

    source = weights or name[len(HF_PREFIX) :]
    local = "://" in source or os.path.exists(source)
    if local:
        source = local_weights(source, storage)
    config = AutoConfig.from_pretrained(source)
    # A local save_pretrained dir carries weights; a hub id loads them only if pretrained
    # (otherwise: the hub config's architecture with random weights).
    net = (
        AutoModel.from_pretrained(source)
        if (pretrained or local)
        else AutoModel.from_config(config)
    )
    if hasattr(net, "vision_model") and not hasattr(net, "encoder"):
        net = net.vision_model  # a full CLIP model: keep the vision tower
    vcfg = getattr(config, "vision_config", config)
    is_clip = "clip" in config.model_type
    size = vcfg.image_size if isinstance(vcfg.image_size, int) else vcfg.image_size[0]
    mean, std = (CLIP_MEAN, CLIP_STD) if is_clip else (IMAGENET_MEAN, IMAGENET_STD)
    if os.path.isdir(source) and os.path.exists(os.path.join(source, "preprocessor_config.json")):
        import json

        with open(os.path.join(source, "preprocessor_config.json")) as f:
            proc = json.load(f)
        mean, std = tuple(proc.get("image_mean", mean)), tuple(proc.get("image_std", std))

    def pool(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = m(pixel_values=x)
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state[:, 0]

    return Backbone(
        name,
        net,
        int(vcfg.hidden_size),
        find_blocks(net),
        Preprocess(int(size), tuple(mean), tuple(std), 1.0 if is_clip else 0.875),
        pool,
    )


def create_backbone(
    name: str, *, pretrained: bool = False, weights: str | None = None, storage=None
) -> Backbone:
    """Builds a registered backbone, any timm model, or ``hf:<hub id or directory>``.

    Raises:
        UnknownBackbone: listing the registered names and how to name timm/HF models.
    """
    if name in BACKBONES:
        return BACKBONES[name](pretrained=pretrained, weights=weights, storage=storage)
    if name.startswith(HF_PREFIX):
        return _hf(name, pretrained=pretrained, weights=weights, storage=storage)
    import timm

    if timm.is_model(name):
        return _timm(name, pretrained=pretrained, weights=weights, storage=storage)
    import difflib

    close = difflib.get_close_matches(name, list(BACKBONES) + timm.list_models(), n=3)
    raise UnknownBackbone(
        f"unknown backbone {name!r}; registered: {sorted(BACKBONES) or '(none)'}, any timm model "
        f"(timm.list_models(), {len(timm.list_models())} names), or 'hf:<hub id or directory>'"
        + (f"; closest: {close}" if close else "")
    )
